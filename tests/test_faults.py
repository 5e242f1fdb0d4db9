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

import hashlib
import os
import socket
import struct
from collections.abc import Callable, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from buildcache.config import Mirror
from tests.support import (
    Client,
    Received,
    Running,
    pattern_bytes,
    reactor,
    start_server,
)
from tests.test_proxy import silent_listener

KB = 1024
MB = 1024 * KB
#: Seconds an upstream may stay silent in these tests.
SHORT_TIMEOUT = 0.5
#: An immutable package path: stored on a 200, never revalidated.
PACKAGE = "/pool/main/f/faulty_1.0_all.deb"
#: An index path: revalidated on every request with ``index_ttl=0``.
RELEASE = "/dists/stable/InRelease"


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
        self.answered = False
        self.closed = False

    def connectionMade(self) -> None:
        self.upstream.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.answered or b"\r\n\r\n" not in self.received:
            return
        self.answered = True
        request_line = self.received.split(b"\r\n", 1)[0].decode("latin-1")
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
        self.port = reactor.adoptStreamPort(
            self.sock.fileno(), socket.AF_INET, self
        )

    async def _stop(self) -> None:
        for connection in self.connections:
            if not connection.closed and connection.transport is not None:
                connection.transport.abortConnection()
        if self.port is not None:
            await self.port.stopListening()

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
    def script(connection: ScriptedConnection) -> None:
        connection.write(head(length=len(body)) + body[:sent])
        connection.reset()

    return script


def closes_after(body: bytes, sent: int) -> Script:
    def script(connection: ScriptedConnection) -> None:
        connection.write(head(length=len(body)) + body[:sent])
        connection.close()

    return script


def sends_extra(body: bytes, extra: bytes) -> Script:
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


def stalls_after(data: bytes) -> Script:
    def script(connection: ScriptedConnection) -> None:
        connection.write(data)

    return script


def sends_raw(data: bytes) -> Script:
    return stalls_after(data)


def redirects(location: Callable[[ScriptedConnection], str]) -> Script:
    def script(connection: ScriptedConnection) -> None:
        connection.write(
            head("302 Found", length=0, headers=[("Location", location(connection))])
        )

    return script


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

    def assert_failed(self, received: Received) -> None:
        """
        The client cannot take the response for a complete file: an error
        status, or a body its HTTP library reports as cut short.
        """
        self.assertTrue(
            received.status >= 500 or not received.complete,
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
        self.assertEqual([f for f in stored_files(running) if "/tmp/" in f], [])


# -- the tests ---------------------------------------------------------------


class UpstreamFaultTests(FaultTestCase):
    """
    An upstream misbehaving on a cold request: the client sees an error,
    nothing is stored, and the next request works once it is fixed.
    """

    async def check(
        self, make_script: Callable[[bytes], Script], size: int = MB
    ) -> Received:
        body = pattern_bytes(size, b"fault")
        upstream = ScriptedUpstream.start(self, make_script(body))
        running, url = self.serve_through(upstream)
        received = await Client().get(url)
        await running.server.fetcher.when_idle()
        self.assert_failed(received)
        self.assert_nothing_stored(running)
        await self.assert_recovers(running, upstream, url, body)
        return received

    async def test_connection_refused(self) -> None:
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
        self.assertLess(elapsed, SHORT_TIMEOUT * 4)
        self.assert_nothing_stored(running)
        for filler in fillers:
            filler.close()
        upstream.adopt()
        await self.assert_recovers(running, upstream, url, body)

    async def test_no_answer(self) -> None:
        received = await self.check(lambda body: stalls_after(b""))
        self.assertEqual(received.status, 504)

    async def test_stall_mid_body(self) -> None:
        received = await self.check(
            lambda body: stalls_after(head(length=len(body)) + body[: len(body) // 2])
        )
        self.assertEqual((received.status, received.complete), (200, False))

    async def test_reset_at_start_of_body(self) -> None:
        await self.check(lambda body: resets_after(body, 0))

    async def test_reset_half_way(self) -> None:
        await self.check(lambda body: resets_after(body, len(body) // 2))

    async def test_reset_at_99_percent(self) -> None:
        await self.check(lambda body: resets_after(body, len(body) * 99 // 100))

    async def test_fewer_bytes_than_content_length(self) -> None:
        received = await self.check(lambda body: closes_after(body, len(body) - 1000))
        self.assertEqual((received.status, received.complete), (200, False))

    async def test_chunked_body_cut_before_last_chunk(self) -> None:
        received = await self.check(lambda body: chunked_cut(body, 64 * KB))
        self.assertEqual((received.status, received.complete), (200, False))

    async def test_garbage_status_line(self) -> None:
        received = await self.check(lambda body: sends_raw(b"SSH-2.0-OpenSSH_9.6\r\n"))
        self.assertEqual(received.status, 502)

    async def test_garbage_status_code(self) -> None:
        received = await self.check(
            lambda body: sends_raw(b"HTTP/1.1 2x0 OK\r\nContent-Length: 5\r\n\r\nhello")
        )
        self.assertEqual(received.status, 502)

    async def test_server_error(self) -> None:
        received = await self.check(
            lambda body: sends_raw(head("503 Service Unavailable", length=5) + b"down\n")
        )
        self.assertEqual((received.status, received.body), (503, b"down\n"))

    async def test_redirect_loop(self) -> None:
        def other(connection: ScriptedConnection) -> str:
            return "/b" if connection.path != "/b" else "/a"

        received = await self.check(lambda body: redirects(other))
        self.assertEqual(received.status, 502)

    async def test_more_bytes_than_content_length(self) -> None:
        body = pattern_bytes(MB, b"more")
        upstream = ScriptedUpstream.start(self, sends_extra(body, b"X" * 5000))
        running, url = self.serve_through(upstream)
        received = await Client().get(url)
        await running.server.fetcher.when_idle()
        print(received.status, received.complete, len(received.body), list(running.store.keys()))
