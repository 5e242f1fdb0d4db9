"""
Faults through the running service: upstreams that misbehave on cue,
clients that leave or stop reading, and a cache disk that fails.

Each test states what the client saw (an error it cannot take for a
complete file, or a copy marked ``STALE``), what was stored (nothing bad,
ever: no entry, no temporary file) and that the next request works once
the fault is gone (``MISS`` then ``HIT``).

Upstreams that twisted.web cannot make misbehave enough are
:class:`ScriptedUpstream`: raw TCP on 127.0.0.1 that reads a request head
and plays a script (reset part-way, stall, send garbage...).  Timeouts use
a short real ``upstream_timeout`` (0.5 s): the server is built on the real
reactor, and its fetcher, pool and endpoints share that one clock, so a
fake clock cannot be slipped in through the service.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sqlite3
import struct
import subprocess
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from buildcache.config import Mirror
from buildcache.fetch.connect import UPSTREAM_READ_SIZE
from buildcache.fetch.fetcher import MEMORY_BUFFER, Phase
from buildcache.store import ObjectWriter, Store
from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    Received,
    Running,
    listen,
    pattern_bytes,
    reactor,
    start_server,
    url_of,
)
from tests.test_proxy import events_at, log_events, sha256, silent_listener, until
from tests.test_service import TWISTD, spawn_server

KB = 1024
MB = 1024 * KB
#: Seconds an upstream may stay silent in these tests.
SHORT_TIMEOUT = 0.5
#: An immutable package path: stored on a 200, never revalidated.
PACKAGE = "/pool/main/f/faulty_1.0_all.deb"
#: An index path: revalidated on every request with ``index_ttl=0``.
RELEASE = "/dists/stable/InRelease"
PIP_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html; q=0.01"
WHEEL = "bcdemo_a-2.0-py3-none-any.whl"


# -- a raw upstream that plays a script -------------------------------------


Script = Callable[["ScriptedConnection"], None]


class ScriptedConnection(Protocol):
    """
    One connection to a :class:`ScriptedUpstream`: waits for a request
    head, then hands itself to the upstream's current script.
    """

    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        self.received = b""
        self.closed = False

    def connectionMade(self) -> None:
        self.upstream.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        # Requests on a kept-alive connection are played one after another.
        self.received += data
        while b"\r\n\r\n" in self.received:
            request, _, self.received = self.received.partition(b"\r\n\r\n")
            request_line = request.split(b"\r\n", 1)[0].decode("latin-1")
            self.upstream.requests.append(request_line)
            self.upstream.script(self)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True

    @property
    def path(self) -> str:
        return self.upstream.requests[-1].split(" ")[1]

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        """
        Close once everything written has gone out (a FIN).
        """
        assert self.transport is not None
        self.transport.loseConnection()

    def reset(self) -> None:
        """
        Send what was written, then a TCP reset instead of a FIN.
        """
        assert self.transport is not None
        sock = self.transport.getHandle()  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.loseConnection()


class ScriptedUpstream(ServerFactory):
    """
    A listener on 127.0.0.1 whose connections play :attr:`script`; tests
    change the script between requests ("upstream fixed").
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[str] = []
        self.connections: list[ScriptedConnection] = []
        self.port: IListeningPort | None = None
        self.sock: socket.socket | None = None
        self.url = ""

    def buildProtocol(self, addr: object) -> ScriptedConnection:
        return ScriptedConnection(self)

    @classmethod
    def start(cls, testcase: TestCase, script: Script) -> ScriptedUpstream:
        upstream = cls(script)
        upstream.port = reactor.listenTCP(0, upstream, interface="127.0.0.1")
        upstream.url = f"http://127.0.0.1:{upstream.port.getHost().port}"  # type: ignore[attr-defined]
        testcase.addCleanup(upstream.stop)
        return upstream

    @classmethod
    def on_socket(
        cls, testcase: TestCase, sock: socket.socket, script: Script
    ) -> ScriptedUpstream:
        """
        An upstream at the address of ``sock`` (bound, maybe listening),
        which answers only once :meth:`adopt` is called: until then a
        connection is refused (``sock`` not listening) or hangs (``sock``
        listening with a full backlog).
        """
        upstream = cls(script)
        upstream.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        upstream.sock = sock
        testcase.addCleanup(sock.close)
        testcase.addCleanup(upstream.stop)
        return upstream

    def adopt(self) -> None:
        assert self.sock is not None
        if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0:
            self.sock.listen(16)
        # Twisted expects a non-blocking listening socket.
        self.sock.setblocking(False)
        self.port = reactor.adoptStreamPort(  # type: ignore[attr-defined]
            self.sock.fileno(), socket.AF_INET, self
        )

    async def _stop(self) -> None:
        for connection in self.connections:
            if not connection.closed and connection.transport is not None:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
        if self.port is not None:
            stopping = self.port.stopListening()
            if stopping is not None:
                await stopping

    def stop(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())


def head(
    status: str = "200 OK",
    length: int | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> bytes:
    lines = [f"HTTP/1.1 {status}"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def serves(body: bytes) -> Script:
    """
    The fixed upstream: a whole, cacheable response.
    """

    def script(connection: ScriptedConnection) -> None:
        connection.write(
            head(length=len(body), headers=[("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")])
            + body
        )
        connection.close()

    return script


def resets_after(body: bytes, sent: int) -> Script:
    """
    ``sent`` bytes of the body, then a TCP reset.
    """

    def script(connection: ScriptedConnection) -> None:
        connection.write(head(length=len(body)) + body[:sent])
        connection.reset()

    return script


def closes_after(body: bytes, sent: int) -> Script:
    """
    ``sent`` bytes of a longer Content-Length, then a clean close.
    """

    def script(connection: ScriptedConnection) -> None:
        connection.write(head(length=len(body)) + body[:sent])
        connection.close()

    return script


def sends_extra(body: bytes, extra: bytes) -> Script:
    """
    The body, then ``extra`` bytes beyond its Content-Length.
    """

    def script(connection: ScriptedConnection) -> None:
        connection.write(head(length=len(body)) + body + extra)

    return script


def chunked_cut(body: bytes, chunk: int) -> Script:
    """
    A chunked body whose connection closes before the last (empty) chunk.
    """

    def script(connection: ScriptedConnection) -> None:
        connection.write(head(headers=[("Transfer-Encoding", "chunked")]))
        for offset in range(0, len(body), chunk):
            piece = body[offset:offset + chunk]
            connection.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        connection.close()

    return script


def sends(data: bytes) -> Script:
    """
    ``data`` as the whole answer, then silence on an open connection.
    """

    def script(connection: ScriptedConnection) -> None:
        connection.write(data)

    return script


def redirects(location: Callable[[ScriptedConnection], str]) -> Script:
    """
    A 302 to ``location(connection)``.
    """

    def script(connection: ScriptedConnection) -> None:
        connection.write(
            head("302 Found", length=0, headers=[("Location", location(connection))])
        )

    return script


# -- a raw HTTP client that can stop reading ---------------------------------


class RawClient(Protocol):
    """
    Sends one HTTP/1.1 request and reads one response with a
    Content-Length, hashing the body as it comes (50 MB never sits in a
    buffer); it can stop reading (:meth:`stall`) or leave (:meth:`leave`).
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.head = b""
        self.status = 0
        self.length: int | None = None
        self.body_received = 0
        self.digest = hashlib.sha256()
        self.first_bytes: Deferred[None] = Deferred()
        self.answered: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.closed = False

    def connectionMade(self) -> None:
        assert self.transport is not None
        # A fixed receive buffer: Linux would otherwise let a loopback
        # socket that nobody reads take up to 32 MB, and a stalled client
        # would not stall.
        self.transport.getHandle().setsockopt(  # type: ignore[attr-defined]
            socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KB
        )
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        if self.length is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            raw, _, data = self.head.partition(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ")[1])
            self.length = next(
                int(line.split(":", 1)[1])
                for line in lines[1:]
                if line.lower().startswith("content-length:")
            )
        if data:
            self.body_received += len(data)
            self.digest.update(data)
            if not self.first_bytes.called:
                self.first_bytes.callback(None)
        if self.body_received >= self.length and not self.answered.called:
            self.answered.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self.lost.callback(None)

    def stall(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def read_again(self) -> None:
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def leave(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


async def raw_client(
    testcase: TestCase, port: int, path: str, close: bool = False
) -> RawClient:
    connection = "Connection: close\r\n" if close else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{connection}\r\n"
    ).encode()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client = await connectProtocol(endpoint, RawClient(request))

    async def cleanup() -> None:
        if not client.closed:
            client.leave()
            await client.lost

    testcase.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    return client


def record_channels(site: Site) -> list[Any]:
    """
    Keep the server-side transport of every connection ``site`` accepts
    from now on (see :func:`transport_of`), caught as it is handed to the
    protocol (``IProtocol.makeConnection``): twisted.web wraps its
    ``HTTPChannel`` in a protocol switcher whose inner channel is private.
    """
    channels: list[Any] = []
    build = site.buildProtocol

    def recording(addr: Any) -> Any:
        protocol = build(addr)
        recorded = _Recorded()
        make_connection = protocol.makeConnection

        def connected(transport: Any) -> None:
            recorded.transport = transport
            make_connection(transport)

        protocol.makeConnection = connected
        channels.append(recorded)
        return protocol

    site.buildProtocol = recording  # type: ignore[method-assign]
    return channels


class _Recorded:
    """A connection :func:`record_channels` saw: its transport, once made."""

    transport: Any = None


def transport_of(channel: Any) -> Any:
    """
    The server-side transport of a connection :func:`record_channels` kept.
    """
    return channel.transport


def buffered_bytes(channel: Any) -> int:
    """
    Bytes the server's transport holds in memory, not yet in the socket.
    """
    transport = transport_of(channel)
    return int(
        transport._tempDataLen + len(transport.dataBuffer) - transport.offset
    )


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- assertions --------------------------------------------------------------


def stored_files(running: Running) -> list[str]:
    found = []
    for sub in ("objects", "tmp"):
        for root, _, files in os.walk(os.path.join(running.store.directory, sub)):
            found += [os.path.join(root, name) for name in files]
    return found


class FaultTestCase(TestCase):
    """
    Assertions shared by the fault tests.
    """

    timeout = 20

    def assert_failed(self, received: Received, lowest_status: int = 500) -> None:
        """
        The client cannot take the response for a complete file: an error
        status, or a body its HTTP library reports as cut short.
        """
        self.assertTrue(
            received.status >= lowest_status or not received.complete,
            f"looks like success: {received.status} complete={received.complete}",
        )

    def assert_nothing_stored(self, running: Running) -> None:
        self.assertEqual(list(running.store.keys()), [])
        self.assertEqual(running.store.stats().entries, 0)
        self.assertEqual(stored_files(running), [])

    def serve_through(
        self, upstream: ScriptedUpstream, **config: object
    ) -> tuple[Running, str]:
        """
        A server whose mirror route ``/up/`` leads to ``upstream``, and the
        URL of :data:`PACKAGE` through it.
        """
        changes: dict[str, object] = {"upstream_timeout": SHORT_TIMEOUT}
        changes.update(config)
        changes["mirrors"] = (Mirror("up", upstream.url),)
        running = start_server(self, changes)
        return running, f"http://127.0.0.1:{running.proxy_port}/up{PACKAGE}"

    async def assert_recovers(
        self, running: Running, upstream: ScriptedUpstream, url: str, body: bytes
    ) -> None:
        """
        With the upstream fixed, the next request is a complete MISS, and
        the one after it a HIT that does not reach the upstream.
        """
        upstream.script = serves(body)
        client = Client()
        fixed = await client.get(url)
        self.assertEqual(
            (fixed.status, fixed.complete, fixed.header("x-cache")), (200, True, "MISS")
        )
        self.assertEqual(fixed.body, body)
        await running.server.fetcher.when_idle()
        asked = len(upstream.requests)
        hit = await client.get(url)
        self.assertEqual((hit.status, hit.header("x-cache")), (200, "HIT"))
        self.assertEqual(hit.body, body)
        self.assertEqual(len(upstream.requests), asked)
        (entry,) = running.store.keys()
        self.assertEqual(entry.sha256, hashlib.sha256(body).hexdigest())
        self.assertEqual(os.listdir(os.path.join(running.store.directory, "tmp")), [])


# -- the tests ---------------------------------------------------------------


class UpstreamFaultTests(FaultTestCase):
    """
    An upstream misbehaving on a cold request: the client sees an error,
    nothing is stored, and the next request works once it is fixed.
    """

    async def check(
        self, make_script: Callable[[bytes], Script], size: int = MB,
        lowest_status: int = 500,
    ) -> Received:
        body = pattern_bytes(size, b"fault")
        upstream = ScriptedUpstream.start(self, make_script(body))
        running, url = self.serve_through(upstream)
        received = await Client().get(url)
        await running.server.fetcher.when_idle()
        self.assert_failed(received, lowest_status)
        self.assert_nothing_stored(running)
        await self.assert_recovers(running, upstream, url, body)
        return received

    async def test_connection_refused(self) -> None:
        """
        Nothing listens at the upstream's address: a 502 that says so.
        """
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        body = pattern_bytes(MB, b"refused")
        upstream = ScriptedUpstream.on_socket(self, sock, serves(body))
        running, url = self.serve_through(upstream)
        received = await Client().get(url)
        self.assertEqual(received.status, 502)
        self.assertIn(b"refused", received.body.lower())
        self.assert_nothing_stored(running)
        upstream.adopt()
        await self.assert_recovers(running, upstream, url, body)

    async def test_connect_timeout(self) -> None:
        """
        The upstream's listen queue is full, so its SYNs go unanswered: a
        504, and not before the upstream timeout.  (No upper bound: on a
        busy machine the reactor may answer late, and a test must not race
        the clock; the timeout itself is unit-tested on a fake clock.)
        """
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(sock.getsockname())
            fillers.append(filler)
            self.addCleanup(filler.close)
        body = pattern_bytes(MB, b"connect")
        upstream = ScriptedUpstream.on_socket(self, sock, serves(body))
        running, url = self.serve_through(upstream)
        started = reactor.seconds()
        received = await Client().get(url)
        elapsed = reactor.seconds() - started
        self.assertEqual(received.status, 504, received.body)
        self.assertGreaterEqual(elapsed, SHORT_TIMEOUT * 0.9)
        self.assert_nothing_stored(running)
        for filler in fillers:
            filler.close()
        upstream.adopt()
        await self.assert_recovers(running, upstream, url, body)

    async def test_no_answer(self) -> None:
        """
        Connected, request sent, no status line: a 504.
        """
        received = await self.check(lambda body: sends(b""))
        self.assertEqual(received.status, 504)

    async def test_stall_mid_body(self) -> None:
        """
        Silent half-way through the body: the client, already streaming,
        gets a response cut short after the upstream timeout.
        """
        received = await self.check(
            lambda body: sends(head(length=len(body)) + body[: len(body) // 2])
        )
        self.assertEqual((received.status, received.complete), (200, False))

    async def test_reset_at_start_of_body(self) -> None:
        """
        Headers, then a TCP reset before any body byte (here and below:
        whatever part arrived, never a complete 200).
        """
        await self.check(lambda body: resets_after(body, 0))

    async def test_reset_half_way(self) -> None:
        await self.check(lambda body: resets_after(body, len(body) // 2))

    async def test_reset_at_99_percent(self) -> None:
        await self.check(lambda body: resets_after(body, len(body) * 99 // 100))

    async def test_fewer_bytes_than_content_length(self) -> None:
        """
        A clean close 1000 bytes before Content-Length.
        """
        received = await self.check(lambda body: closes_after(body, len(body) - 1000))
        self.assertEqual((received.status, received.complete), (200, False))

    async def test_chunked_body_cut_before_last_chunk(self) -> None:
        """
        Every data chunk, then a clean close without the final empty one.
        """
        received = await self.check(lambda body: chunked_cut(body, 64 * KB))
        self.assertEqual((received.status, received.complete), (200, False))

    async def test_garbage_status_line(self) -> None:
        """
        Not HTTP at all (an SSH banner): a 502 at once, no waiting.
        """
        received = await self.check(lambda body: sends(b"SSH-2.0-OpenSSH_9.6\r\n"))
        self.assertEqual(received.status, 502)

    async def test_garbage_status_code(self) -> None:
        """
        An HTTP-looking status line with a status that is not a number.
        """
        received = await self.check(
            lambda body: sends(b"HTTP/1.1 2x0 OK\r\nContent-Length: 5\r\n\r\nhello")
        )
        self.assertEqual(received.status, 502)

    async def test_server_error(self) -> None:
        """
        A 503 on a cold request is passed on (and not stored).
        """
        received = await self.check(
            lambda body: sends(head("503 Service Unavailable", length=5) + b"down\n")
        )
        self.assertEqual((received.status, received.body), (503, b"down\n"))

    async def test_redirect_loop(self) -> None:
        """
        /a redirects to /b and back (the mirror route follows redirects):
        a 502 naming the redirection, not a hang.
        """

        def other(connection: ScriptedConnection) -> str:
            return "/b" if connection.path != "/b" else "/a"

        received = await self.check(lambda body: redirects(other))
        self.assertEqual(received.status, 502)
        self.assertIn(b"redirect", received.body.lower())

    async def test_more_bytes_than_content_length(self) -> None:
        """
        Bytes beyond Content-Length (here shaped like a second response)
        are dropped: the client and the store get the declared body, and
        the pooled upstream connection does not hand them to the next
        request.
        """
        body = pattern_bytes(MB, b"more")
        smuggled = head(length=5) + b"EVIL!"
        upstream = ScriptedUpstream.start(self, sends_extra(body, smuggled))
        running, url = self.serve_through(upstream)
        client = Client()
        received = await client.get(url)
        await running.server.fetcher.when_idle()
        self.assertEqual((received.status, received.complete), (200, True))
        self.assertEqual(received.sha256, hashlib.sha256(body).hexdigest())
        (entry,) = running.store.keys()
        self.assertEqual((entry.size, entry.sha256), (len(body), received.sha256))
        other = pattern_bytes(1000, b"other")
        upstream.script = serves(other)
        next_one = await client.get(url.replace(".deb", "-2.deb"))
        self.assertEqual((next_one.status, next_one.body), (200, other))

    async def test_redirect_to_refused_address(self) -> None:
        """
        A mirror upstream redirecting to an address the access policy
        refuses: a 403, and the refused address sees no connection.
        """
        refused, refused_port = silent_listener(self, "127.0.0.2")
        received = await self.check(
            lambda body: redirects(lambda c: f"http://127.0.0.2:{refused_port}/x"),
            lowest_status=403,
        )
        self.assertEqual(received.status, 403)
        self.assertEqual(refused.connections, 0)


class StaleTests(FaultTestCase):
    """
    An index file stored, then its revalidation fails: the client gets
    the stored copy marked STALE, or (when the upstream's new answer breaks
    off after its status) an incomplete response; the stored copy stays.
    """

    async def revalidate_with(
        self, script: Script, then: tuple[str, ...] = ("REVALIDATED", "MISS")
    ) -> tuple[Received, Running, str, bytes]:
        body = pattern_bytes(200 * KB, b"release")
        upstream = ScriptedUpstream.start(self, serves(body))
        running, _ = self.serve_through(upstream, index_ttl=0)
        url = f"http://127.0.0.1:{running.proxy_port}/up{RELEASE}"
        client = Client()
        first = await client.get(url)
        self.assertEqual((first.status, first.header("x-cache")), (200, "MISS"))
        await running.server.fetcher.when_idle()
        (stored,) = running.store.keys()
        upstream.script = script
        received = await client.get(url)
        await running.server.fetcher.when_idle()
        (kept,) = running.store.keys()
        self.assertEqual((kept.file, kept.sha256), (stored.file, stored.sha256))
        self.assertEqual(os.listdir(os.path.join(running.store.directory, "tmp")), [])
        upstream.script = serves(body)
        again = await client.get(url)
        self.assertEqual((again.status, again.complete, again.body), (200, True, body))
        self.assertIn(again.header("x-cache"), then)
        return received, running, url, body

    async def assert_stale(self, script: Script) -> None:
        # The upstream failed a revalidation moments ago: the engine's
        # backoff serves the stored copy (whole, unchanged) stale at once
        # without asking it again (tests/test_engine.py BackoffTests).
        received, _, _, body = await self.revalidate_with(script, then=("STALE",))
        self.assertEqual(
            (received.status, received.complete, received.header("x-cache")),
            (200, True, "STALE"),
        )
        self.assertEqual(received.body, body)

    async def test_server_error(self) -> None:
        await self.assert_stale(sends(head("500 Internal Server Error", length=0)))

    async def test_no_answer(self) -> None:
        await self.assert_stale(sends(b""))

    async def test_garbage(self) -> None:
        await self.assert_stale(sends(b"\x00\xff garbage\r\n\r\n"))

    async def test_reset_before_status(self) -> None:
        def script(connection: ScriptedConnection) -> None:
            connection.reset()

        await self.assert_stale(script)

    async def test_new_body_cut_short(self) -> None:
        new_body = pattern_bytes(300 * KB, b"new release")
        received, _, _, _ = await self.revalidate_with(
            resets_after(new_body, len(new_body) // 2)
        )
        self.assertEqual(received.header("x-cache"), "MISS")
        self.assert_failed(received)


class ChecksumTests(FaultTestCase):
    """
    A pip index file whose bytes differ from the sha256 on its page.
    """

    async def test_sha256_mismatch(self) -> None:
        fixture = build_index(self.mktemp())
        index = StaticSimpleIndex(fixture)
        port = listen(index)
        self.addCleanup(port.stopListening)
        running = start_server(
            self, {"pypi_upstreams": (url_of(port, "/simple"),)}
        )
        client = Client()
        base = f"http://127.0.0.1:{running.index_port}"
        page = await client.get(f"{base}/simple/bcdemo-a/", {"accept": PIP_ACCEPT})
        self.assertEqual(page.status, 200)
        wheel = fixture.path_for(WHEEL)
        good = wheel.read_bytes()
        tampered = bytearray(good)
        tampered[len(good) // 2] ^= 0xFF
        wheel.write_bytes(bytes(tampered))
        file_url = f"{base}/files/bcdemo-a/{WHEEL}"
        received = await client.get(file_url)
        await running.server.fetcher.when_idle()
        self.assertEqual(received.status, 502)
        self.assertIn(b"sha256", received.body)
        self.assertNotIn(bytes(tampered[:64]), received.body)
        self.assertEqual(
            [entry.key for entry in running.store.keys() if entry.key.endswith(".whl")], []
        )
        self.assertEqual(os.listdir(os.path.join(running.store.directory, "tmp")), [])
        wheel.write_bytes(good)
        fixed = await client.get(file_url)
        self.assertEqual((fixed.status, fixed.body, fixed.header("x-cache")), (200, good, "MISS"))
        hit = await client.get(file_url)
        self.assertEqual((hit.status, hit.body, hit.header("x-cache")), (200, good, "HIT"))
        self.assertEqual(index.requests[f"/files/{WHEEL}"], 2)


class ClientFaultTests(FaultTestCase):
    """
    Clients that leave, stop reading, or keep idle connections open.
    """

    async def test_client_leaves_mid_download(self) -> None:
        """
        One of two clients of a cold download leaves part-way; the other
        gets the whole body, the download is stored, and the next request
        is a HIT without asking the upstream again.
        """
        data = pattern_bytes(4 * MB, b"leaver")
        gate: Deferred[None] = Deferred()
        upstream = FakeUpstream()
        upstream.bodies[PACKAGE] = GatedBody(data, before_gate=MB, gate=gate)
        running = start_server(self, upstream=upstream)
        path = f"/up{PACKAGE}"
        leaver = await raw_client(self, running.proxy_port, path)
        stayer = await raw_client(self, running.proxy_port, path)
        await gatherResults([leaver.first_bytes, stayer.first_bytes])
        leaver.leave()
        await leaver.lost
        gate.callback(None)
        await stayer.answered
        self.assertEqual(stayer.status, 200)
        self.assertEqual(stayer.digest.hexdigest(), hashlib.sha256(data).hexdigest())
        await running.server.fetcher.when_idle()
        (entry,) = running.store.keys()
        self.assertEqual(entry.size, len(data))
        hit = await Client().get(f"http://127.0.0.1:{running.proxy_port}{path}")
        self.assertEqual((hit.header("x-cache"), hit.body == data), ("HIT", True))
        self.assertEqual(upstream.requests[PACKAGE], 1)

    async def test_only_client_leaves(self) -> None:
        """
        The only client leaving does not cancel the download: it is stored
        for the next one.
        """
        data = pattern_bytes(2 * MB, b"alone")
        gate: Deferred[None] = Deferred()
        upstream = FakeUpstream()
        upstream.bodies[PACKAGE] = GatedBody(data, before_gate=MB, gate=gate)
        running = start_server(self, upstream=upstream)
        path = f"/up{PACKAGE}"
        leaver = await raw_client(self, running.proxy_port, path)
        await leaver.first_bytes
        leaver.leave()
        await leaver.lost
        gate.callback(None)
        await running.server.fetcher.when_idle()
        hit = await Client().get(f"http://127.0.0.1:{running.proxy_port}{path}")
        self.assertEqual((hit.status, hit.header("x-cache")), (200, "HIT"))
        self.assertEqual(hit.body, data)
        self.assertEqual(upstream.requests[PACKAGE], 1)

    async def test_slow_reader(self) -> None:
        """
        A client that reads nothing while 50 MB download: the download
        goes to disk at upstream speed and is stored; the server holds at
        most a chunk for that client in memory; the client then reads the
        whole body intact.
        """
        size = 50 * MB
        data = pattern_bytes(size, b"slow")
        upstream = FakeUpstream()
        upstream.bodies[PACKAGE] = GatedBody(data)
        running = start_server(self, upstream=upstream)
        channels = record_channels(running.server.proxy_site)
        reader = await raw_client(self, running.proxy_port, f"/up{PACKAGE}")
        reader.stall()
        fetcher = running.server.fetcher
        await until(lambda: fetcher.in_flight() == 1)
        (download,) = fetcher.running()
        peak = [0]

        def sample() -> None:
            peak[0] = max([peak[0]] + [buffered_bytes(c) for c in channels])
            if not download.finished:
                download.when_more(sample)

        sample()
        await fetcher.when_idle()
        (entry,) = running.store.keys()
        self.assertEqual(entry.size, size)
        # The client has read (almost) nothing: what it has is what the
        # socket buffers took.
        self.assertLess(reader.body_received, size // 4)
        self.assertLess(peak[0], 2 * MB)
        reader.read_again()
        await reader.answered
        self.assertEqual(reader.status, 200)
        self.assertEqual(reader.body_received, size)
        self.assertEqual(reader.digest.hexdigest(), hashlib.sha256(data).hexdigest())

    async def test_idle_keep_alive_connections(self) -> None:
        """
        500 keep-alive connections left idle after one request each (250
        on each port) all stay open for just under the sites' idle timeout
        (60 s), are closed by the server when it passes, and the process's
        open descriptors return to their starting count.

        The sites' connection timers run on a test clock, so the 60 s pass
        at once.
        """
        data = pattern_bytes(10 * KB, b"idle")
        upstream = ScriptedUpstream.start(self, serves(data))
        # All 500 from one address: above the default cap (256).
        running, url = self.serve_through(upstream, max_connections_per_client=1000)
        warm = await raw_client(self, running.proxy_port, f"/up{PACKAGE}", close=True)
        await warm.lost
        self.assertEqual(warm.status, 200)
        await running.server.fetcher.when_idle()
        # Let the upstream connection go, so only the idle clients differ.
        await until(lambda: all(c.closed for c in upstream.connections))
        await running.server.pool.closeCachedConnections()
        clock = Clock()
        sites = (running.server.proxy_site, running.server.index_site)
        for site in sites:
            self.assertEqual(site.timeOut, 60)
            site.reactor = clock
        proxy_channels, index_channels = (record_channels(site) for site in sites)
        before = open_descriptors()
        clients: list[RawClient] = []
        for batch in range(10):
            # Batches stay under the listening backlog (50).
            port, path = (
                (running.proxy_port, f"/up{PACKAGE}") if batch % 2 == 0
                else (running.index_port, "/")
            )
            connected = await gatherResults(
                [Deferred.fromCoroutine(raw_client(self, port, path)) for _ in range(50)]
            )
            await gatherResults([c.answered for c in connected])
            clients += connected
        self.assertEqual({c.status for c in clients}, {200})
        channels = proxy_channels + index_channels
        self.assertEqual((len(proxy_channels), len(index_channels)), (250, 250))
        self.assertEqual(open_descriptors() - before, 2 * len(clients))
        clock.advance(59.9)
        self.assertEqual([c for c in channels if transport_of(c).disconnecting], [])
        clock.advance(0.1)
        self.assertEqual([c for c in channels if not transport_of(c).disconnecting], [])
        await gatherResults([c.lost for c in clients])
        await until(lambda: open_descriptors() <= before)
        self.assertEqual(open_descriptors(), before)


def failing_disk(errno_value: int, after: int = 0) -> Callable[[int, memoryview], int]:
    """
    A ``Store.write_file`` that writes ``after`` bytes in all, then fails
    with ``errno_value`` (ENOSPC, EIO) on every call.
    """
    written = [0]

    def write(fd: int, data: memoryview) -> int:
        room = after - written[0]
        if room <= 0:
            raise OSError(errno_value, os.strerror(errno_value))
        count = os.write(fd, data[:room])
        written[0] += count
        return count

    return write


class DiskFaultTests(FaultTestCase):
    """
    The cache disk fails under a download: its clients still get the
    whole body, nothing partial is stored, an error is logged, and stored
    entries keep being served.
    """

    async def start_with_stored_entry(
        self, config: dict[str, object] | None = None
    ) -> tuple[Running, FakeUpstream, bytes]:
        """
        A server whose mirror route serves ``/up/pool/kept.deb`` (stored
        before the disk fails) and :data:`PACKAGE`.
        """
        upstream = FakeUpstream()
        kept = pattern_bytes(300 * KB, b"kept")
        upstream.bodies["/pool/kept.deb"] = GatedBody(kept)
        running = start_server(self, config, upstream=upstream)
        stored = await Client().get(f"http://127.0.0.1:{running.proxy_port}/up/pool/kept.deb")
        self.assertEqual(stored.status, 200)
        await running.server.fetcher.when_idle()
        return running, upstream, kept

    async def assert_still_serving(
        self, running: Running, upstream: FakeUpstream, kept: bytes, data: bytes
    ) -> None:
        """
        The stored entry is a HIT and the failed key is not stored; once
        the disk works again, the failed key is a MISS, then a HIT.
        """
        client = Client()
        base = f"http://127.0.0.1:{running.proxy_port}/up"
        hit = await client.get(f"{base}/pool/kept.deb")
        self.assertEqual((hit.status, hit.header("x-cache"), hit.body), (200, "HIT", kept))
        self.assertEqual(
            [entry.key.rsplit("/", 1)[-1] for entry in running.store.keys()], ["kept.deb"]
        )
        self.assertEqual(os.listdir(os.path.join(running.store.directory, "tmp")), [])
        running.store.write_file = os.write
        running.store.sync_file = os.fsync
        for expected in ("MISS", "HIT"):
            again = await client.get(f"{base}{PACKAGE}")
            self.assertEqual((again.status, again.complete), (200, True))
            self.assertEqual((again.header("x-cache"), again.sha256), (expected, sha256(data)))
            await running.server.fetcher.when_idle()
        self.assertEqual(upstream.requests[PACKAGE], 2)

    async def check_streamed_through(self, error: int, after: int) -> None:
        observer = log_events(self)
        running, upstream, kept = await self.start_with_stored_entry()
        data = pattern_bytes(8 * MB, b"disk")
        upstream.bodies[PACKAGE] = GatedBody(data)
        running.store.write_file = failing_disk(error, after)
        received = await Client().get(f"http://127.0.0.1:{running.proxy_port}/up{PACKAGE}")
        self.assertEqual((received.status, received.complete), (200, True))
        self.assertEqual((received.header("x-cache"), received.sha256), ("MISS", sha256(data)))
        await running.server.fetcher.when_idle()
        self.assertTrue(events_at(observer, LogLevel.error, "Cannot write"))
        await self.assert_still_serving(running, upstream, kept, data)

    async def test_disk_full_mid_body(self) -> None:
        await self.check_streamed_through(errno.ENOSPC, after=MB + 123)

    async def test_disk_failing_from_the_start(self) -> None:
        await self.check_streamed_through(errno.EIO, after=0)

    async def test_temp_file_cannot_be_created(self) -> None:
        def no_room(store: Store, key: str, whole_digest: bool = True) -> ObjectWriter:
            raise OSError(errno.ENOSPC, "No space left on device")

        observer = log_events(self)
        running, upstream, kept = await self.start_with_stored_entry()
        data = pattern_bytes(3 * MB, b"no temp")
        upstream.bodies[PACKAGE] = GatedBody(data)
        with_writer = Store.writer
        self.patch(Store, "writer", no_room)
        received = await Client().get(f"http://127.0.0.1:{running.proxy_port}/up{PACKAGE}")
        self.assertEqual((received.status, received.complete), (200, True))
        self.assertEqual(received.sha256, sha256(data))
        await running.server.fetcher.when_idle()
        self.assertTrue(events_at(observer, LogLevel.error, "Cannot write"))
        self.patch(Store, "writer", with_writer)
        await self.assert_still_serving(running, upstream, kept, data)

    async def test_fsync_fails_at_commit(self) -> None:
        def broken_sync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        observer = log_events(self)
        running, upstream, kept = await self.start_with_stored_entry()
        data = pattern_bytes(2 * MB, b"sync")
        upstream.bodies[PACKAGE] = GatedBody(data)
        running.store.sync_file = broken_sync
        received = await Client().get(f"http://127.0.0.1:{running.proxy_port}/up{PACKAGE}")
        self.assertEqual((received.status, received.complete), (200, True))
        self.assertEqual(received.sha256, sha256(data))
        await running.server.fetcher.when_idle()
        self.assertTrue(events_at(observer, LogLevel.error, "Cannot store"))
        await self.assert_still_serving(running, upstream, kept, data)

    async def test_memory_bounded_for_a_slow_reader(self) -> None:
        """
        With nothing spooled, a client that stops reading holds the
        upstream back: the download keeps at most about MEMORY_BUFFER
        bytes, and the client then reads the whole body.
        """
        running, upstream, kept = await self.start_with_stored_entry()
        size = 30 * MB
        data = pattern_bytes(size, b"held back")
        upstream.bodies[PACKAGE] = GatedBody(data)
        running.store.write_file = failing_disk(errno.ENOSPC)
        reader = await raw_client(self, running.proxy_port, f"/up{PACKAGE}")
        reader.stall()
        fetcher = running.server.fetcher
        await until(lambda: fetcher.in_flight() == 1)
        (download,) = fetcher.running()
        peak = [0]

        def sample() -> None:
            peak[0] = max(peak[0], download.memory_held)
            if not download.finished:
                download.when_more(sample)

        sample()
        await until(lambda: download.phase is Phase.HELD_BACK)
        self.assertLess(download.received, size)
        reader.read_again()
        await reader.answered
        self.assertEqual(reader.status, 200)
        self.assertEqual(reader.body_received, size)
        self.assertEqual(reader.digest.hexdigest(), sha256(data))
        # The buffer, plus at most one read from the upstream socket.
        self.assertLessEqual(peak[0], MEMORY_BUFFER + UPSTREAM_READ_SIZE)
        await fetcher.when_idle()
        await self.assert_still_serving(running, upstream, kept, data)

    async def test_reader_that_never_reads_is_dropped(self) -> None:
        """
        A client that reads nothing for the upstream timeout while the
        download is held back for it is cut off (an incomplete response);
        the other client gets the whole body.
        """
        running, upstream, kept = await self.start_with_stored_entry(
            {"upstream_timeout": SHORT_TIMEOUT}
        )
        size = 20 * MB
        data = pattern_bytes(size, b"dropped")
        gate: Deferred[None] = Deferred()
        upstream.bodies[PACKAGE] = GatedBody(data, before_gate=0, gate=gate)
        running.store.write_file = failing_disk(errno.ENOSPC)
        staller = await raw_client(self, running.proxy_port, f"/up{PACKAGE}")
        staller.stall()
        reader = await raw_client(self, running.proxy_port, f"/up{PACKAGE}")
        fetcher = running.server.fetcher
        # Both clients have joined the download before its first byte.
        await until(lambda: upstream.requests[PACKAGE] == 1)
        (download,) = fetcher.running()
        await until(lambda: download.readers == 2)
        gate.callback(None)
        await reader.answered
        self.assertEqual(reader.digest.hexdigest(), sha256(data))
        staller.read_again()
        await staller.lost
        self.assertEqual(staller.status, 200)
        self.assertLess(staller.body_received, size)
        await fetcher.when_idle()
        self.assertEqual(upstream.requests[PACKAGE], 1)
        await self.assert_still_serving(running, upstream, kept, data)

    async def test_checked_file_cannot_be_spooled(self) -> None:
        """
        A pip file must be checked against its sha256 before anyone sees
        it; with a full disk it cannot be: a 502, nothing stored.  A
        failing fsync after the check still serves the checked bytes.
        """
        fixture = build_index(self.mktemp())
        index = StaticSimpleIndex(fixture)
        port = listen(index)
        self.addCleanup(port.stopListening)
        running = start_server(self, {"pypi_upstreams": (url_of(port, "/simple"),)})
        client = Client()
        base = f"http://127.0.0.1:{running.index_port}"
        page = await client.get(f"{base}/simple/bcdemo-a/", {"accept": PIP_ACCEPT})
        self.assertEqual(page.status, 200)
        file_url = f"{base}/files/bcdemo-a/{WHEEL}"
        good = fixture.content(WHEEL)

        def wheels() -> list[str]:
            return [e.key for e in running.store.keys() if e.key.endswith(".whl")]

        running.store.write_file = failing_disk(errno.ENOSPC, 100)
        full = await client.get(file_url)
        await running.server.fetcher.when_idle()
        self.assertEqual(full.status, 502)
        self.assertIn(b"cache", full.body)
        self.assertEqual(wheels(), [])

        def broken_sync(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        running.store.write_file = os.write
        running.store.sync_file = broken_sync
        unsynced = await client.get(file_url)
        await running.server.fetcher.when_idle()
        self.assertEqual((unsynced.status, unsynced.complete, unsynced.body), (200, True, good))
        self.assertEqual(wheels(), [])
        running.store.sync_file = os.fsync
        for expected in ("MISS", "HIT"):
            fixed = await client.get(file_url)
            self.assertEqual((fixed.status, fixed.body, fixed.header("x-cache")), (200, good, expected))
        self.assertEqual(os.listdir(os.path.join(running.store.directory, "tmp")), [])

    def test_access_times_kept_when_index_write_fails(self) -> None:
        """
        A full disk refusing the batched access-time update: an error is
        logged, nothing raises (the flush runs from a timer that would stop
        for good), and the times are written by the next flush.
        """
        observer = log_events(self)
        store = Store.open(self.mktemp(), 10 * MB, Clock())
        self.addCleanup(store.close)
        writer = store.writer("k")
        writer.write(b"body")
        writer.commit({})
        store.clock.advance(100)  # type: ignore[attr-defined]
        stored = store.lookup("k")
        assert stored is not None
        stored.close()
        index = store._db
        store._db = FullIndex(index)  # type: ignore[assignment]
        store.flush()
        self.assertTrue(events_at(observer, LogLevel.error, "access times"))
        store._db = index
        store.flush()
        row = index.execute("SELECT last_access FROM entries WHERE key = 'k'").fetchone()
        self.assertEqual(row[0], 100)


class FullIndex:
    """
    An SQLite connection whose writes fail as on a full disk.
    """

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> FullIndex:
        self.connection.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> Any:
        return self.connection.__exit__(*exc_info)

    def execute(self, sql: str, *args: Any) -> Any:
        return self.connection.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")


class StartupTests(TestCase):
    timeout = 30

    async def test_cache_dir_not_writable(self) -> None:
        """
        ``twistd buildcache`` with a cache directory it cannot write to
        exits at once with an error naming the directory, and never
        listens.
        """
        if not os.access(TWISTD, os.X_OK):
            raise self.skipTest("twistd of this Python is not installed")
        cache_dir = os.path.abspath(self.mktemp())
        os.makedirs(cache_dir)
        if os.geteuid() == 0:
            # Root ignores permission bits: make the directory immutable.
            try:
                subprocess.run(
                    ["chattr", "+i", cache_dir], check=True, capture_output=True
                )
            except (OSError, subprocess.CalledProcessError) as e:
                raise self.skipTest(f"cannot make a directory read-only as root: {e}")
            self.addCleanup(
                subprocess.run, ["chattr", "-i", cache_dir], check=True
            )
        else:
            os.chmod(cache_dir, 0o555)
            self.addCleanup(os.chmod, cache_dir, 0o755)
        process, _ = spawn_server(self, "--cache-dir", cache_dir)
        await process.ended
        assert process.reason is not None
        self.assertIsInstance(process.reason.value, ProcessTerminated)
        self.assertNotEqual(process.reason.value.exitCode, 0)
        output = bytes(process.output)
        self.assertIn(f"cannot use {cache_dir!r} as the cache directory".encode(), output)
        self.assertRegex(output, b"Permission denied|Operation not permitted")
        self.assertNotIn(b"starting on", output)
        self.assertEqual(os.listdir(cache_dir), [])
