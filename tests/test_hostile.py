"""
Hostile input against both ports: malformed and oversized request heads,
request smuggling, path traversal in mirror and pip file routes, invalid
project names, and every spelling of a host or port that could slip past
the open-proxy rules.

Each hand-written case goes through the running service on 127.0.0.1
(real TCP, the real :class:`buildcache.service.Server` wiring) and asserts what
the client saw, the exact request paths the in-process upstreams
received, and what the cache directory holds.  Name resolution is
answered by an in-process resolver, so no case ever reaches a real DNS
server; listeners on 127.0.0.1, 127.0.0.2 and ::1 that must receive
nothing check the connection guard.

Property tests (hypothesis) cover the parsers behind them: the router's
mirror and absolute-URI targets, ``_checked_path``, ``parse_connect_target``,
``normalize_host``, project-name normalisation and the index's project
route.
"""

from __future__ import annotations

import ipaddress
import os
import re
import string
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import attrs
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from buildcache.access import AccessPolicy, InvalidHost, normalize_host
from buildcache.config import Mirror
from buildcache.ecosystems.pypi.assemble import index_resource
from buildcache.ecosystems.pypi.model import (
    is_valid_project_name,
    normalize_project_name,
)
from buildcache.engine.core import Engine
from buildcache.engine.keys import cache_key
from buildcache.fetch.connect import TargetRefused, connect_tcp, make_http_client
from buildcache.fetch.fetcher import UpstreamError, UpstreamRequest, request_uri
from buildcache.frontends.channel import ProxyChannel
from buildcache.frontends.proxy import BadTarget, Router, _checked_path
from buildcache.frontends.sites import ProxySite
from buildcache.frontends.tunnel import parse_connect_target
from buildcache.store import Store
from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import (
    FakeUpstream,
    GatedBody,
    Running,
    listen,
    reactor,
    start_server,
    url_of,
)
from tests.test_connect import FakeResolver
from tests.test_proxy import (
    RawConnection,
    RawResponse,
    port_number,
    raw_connection,
    raw_request,
    silent_listener,
)

#: Where the mirror route /up/ leads on the in-process upstream: anything
#: it receives outside this path is a traversal.
BASE = "/base"
WHEEL = "bcdemo_a-2.0-py3-none-any.whl"
#: Seconds a server has to close a connection it refused.
CLOSE_WAIT = 5.0
#: What the fake resolver answers, as a C library would for the numeric
#: spellings (inet_aton reads hex, octal and short forms).
RESOLVED = {
    "localhost": ["127.0.0.1"],
    "0": ["0.0.0.0"],
    "2130706433": ["127.0.0.1"],
    "0x7f000001": ["127.0.0.1"],
    "0177.0.0.1": ["127.0.0.1"],
    "017700000001": ["127.0.0.1"],
    "127.1": ["127.0.0.1"],
    "2130706434": ["127.0.0.2"],
    "0x7f000002": ["127.0.0.2"],
    "0177.0.0.2": ["127.0.0.2"],
    "0x7f.0.0.2": ["127.0.0.2"],
    "127.2": ["127.0.0.2"],
    "127.000.000.002": ["127.0.0.2"],
    "xn--bcher-kva.example": ["127.0.0.2"],
    "rebind.example": ["127.0.0.2", "::1"],
    # Names below *.allowed.test, the allow_upstream pattern of
    # AllowListEncodingTests.
    "box.allowed.test": ["127.0.0.3"],
    "xn--bcher-kva.allowed.test": ["127.0.0.3"],
}


# -- helpers ----------------------------------------------------------------


async def exchange(
    testcase: TestCase, port: int, data: bytes, closes: bool = True
) -> RawResponse:
    """
    Send ``data`` on a new connection and read one response; with
    ``closes``, also wait for the server to close the connection.
    """
    connection = await raw_connection(testcase, port)
    connection.send(data)
    response = await connection.response()
    if closes:
        await closed(connection, f"{response.status} to {data[:80]!r}")
    else:
        await connection.close()
    return response


async def closed(connection: RawConnection, what: str) -> None:
    """
    Wait (:class:`CLOSE_WAIT` seconds at most) for the server to close
    ``connection``.
    """
    if connection.closed:
        return
    waiting: Deferred[None] = Deferred()

    def lost(result: object) -> object:
        if not waiting.called:
            waiting.callback(None)
        return result

    connection.lost.addBoth(lost)
    waiting.addTimeout(CLOSE_WAIT, reactor)
    try:
        await waiting
    except defer.TimeoutError:
        raise AssertionError(f"the server kept the connection open after {what}") from None


async def dropped_or_refused(testcase: TestCase, port: int, data: bytes) -> int | None:
    """
    Send ``data`` and wait for the server to close the connection; the
    status it answered first, or None when it answered nothing.
    """
    connection = await raw_connection(testcase, port)
    connection.send(data)
    await closed(connection, repr(data[:80]))
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", connection.buffer)
    return int(match.group(1)) if match else None


def cache_files(directory: str) -> list[str]:
    """
    Every file under a cache directory, relative to it.
    """
    found = []
    for root, _, names in os.walk(directory):
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


_OBJECT_FILE = re.compile(r"objects/([0-9a-f]{2})/\1[0-9a-f]{62}\.[0-9a-f]{12}")
_INDEX_FILES = {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm", "lock", "secret"}


def assert_cache_layout(testcase: TestCase, directory: str) -> None:
    """
    The cache directory holds only the store's own files: nothing a
    request path chose.
    """
    for relative in cache_files(directory):
        testcase.assertTrue(
            relative in _INDEX_FILES or _OBJECT_FILE.fullmatch(relative),
            f"unexpected file in the cache directory: {relative}",
        )


@attrs.define
class Box:
    """
    A running buildcache on 127.0.0.1: mirror route ``/up/`` leads to
    :class:`BASE` on a :class:`FakeUpstream`; the index port's upstream is a demo pip
    index; names resolve through :class:`RESOLVED` only.
    """

    running: Running
    upstream: FakeUpstream
    upstream_port: int
    pypi: StaticSimpleIndex
    resolver: FakeResolver

    @classmethod
    def start(
        cls,
        testcase: TestCase,
        config_changes: Mapping[str, object] | None = None,
        connect_ports: Sequence[int] = (),
    ) -> Box:
        upstream = FakeUpstream()
        upstream.bodies[f"{BASE}/pool/ok.deb"] = GatedBody(b"ok\n")
        up_port = listen(upstream)
        testcase.addCleanup(up_port.stopListening)
        fixture = build_index(Path(testcase.mktemp()))
        pypi = StaticSimpleIndex(fixture)
        pypi_port = listen(pypi)
        testcase.addCleanup(pypi_port.stopListening)
        changes = dict(config_changes or {})
        changes["mirrors"] = (Mirror("up", url_of(up_port, BASE)),)
        changes["pypi_upstreams"] = (url_of(pypi_port, "/simple"),)
        running = start_server(testcase, changes)
        resolver = FakeResolver(RESOLVED)
        server = running.server
        # The service's wiring, with name resolution answered in process.
        server.fetcher.http = make_http_client(
            reactor, server.policy, server.config.upstream_timeout,
            pool=server.pool, resolver=resolver,
        )
        server.proxy_site.tunnel_settings = attrs.evolve(
            server.proxy_site.tunnel_settings,
            resolver=resolver,
            connect_ports=frozenset({443, *connect_ports}),
        )
        return cls(running, upstream, port_number(up_port), pypi, resolver)

    @property
    def proxy_port(self) -> int:
        return self.running.proxy_port

    @property
    def index_port(self) -> int:
        return self.running.index_port

    @property
    def cache_dir(self) -> str:
        return str(self.running.store.directory)

    def upstream_paths(self) -> set[str]:
        return set(self.upstream.requests)

    def pypi_paths(self) -> list[str]:
        return [recorded.path for recorded in self.pypi.request_log]

    def stored_keys(self) -> set[str]:
        return {entry.key for entry in self.running.store.keys()}

    async def idle(self) -> None:
        await self.running.server.fetcher.when_idle()


def get(target: str, host: str = "box") -> bytes:
    return raw_request("GET", target, host)


# -- malformed and oversized request heads ----------------------------------


#: Request heads that are not HTTP/1.1: each gets 400 and a closed
#: connection on the proxy port, and reaches no upstream.
MALFORMED = {
    "TLS ClientHello on the plain port":
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(range(32)) + b"\r\n\r\n",
    "garbage line": b"\x00\x01\x02garbage\r\n\r\n",
    "blank lines only": b"\r\n\r\n\r\n",
    "missing version": b"GET /up/pool/ok.deb\r\nHost: box\r\n\r\n",
    "HTTP/2.0 version": b"GET /up/pool/ok.deb HTTP/2.0\r\nHost: box\r\n\r\n",
    "HTTP/1.2 version": b"GET /up/pool/ok.deb HTTP/1.2\r\nHost: box\r\n\r\n",
    "lowercase version": b"GET /up/pool/ok.deb http/1.1\r\nHost: box\r\n\r\n",
    "method with @": b"G@T /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\n\r\n",
    "method with (": b"GET( /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\n\r\n",
    "tab as separator": b"GET\t/up/pool/ok.deb HTTP/1.1\r\nHost: box\r\n\r\n",
    "two spaces": b"GET  /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\n\r\n",
    "four words": b"GET /up/pool/ok.deb HTTP/1.1 x\r\nHost: box\r\n\r\n",
    "raw 0xff in target": b"GET /up/pool/\xff.deb HTTP/1.1\r\nHost: box\r\n\r\n",
    "header without colon": b"GET /up/pool/ok.deb HTTP/1.1\r\nHost box\r\n\r\n",
    "space before colon": b"GET /up/pool/ok.deb HTTP/1.1\r\nHost : box\r\n\r\n",
    "empty header name": b"GET /up/pool/ok.deb HTTP/1.1\r\n: box\r\n\r\n",
    "bad header name": b"GET /up/pool/ok.deb HTTP/1.1\r\nX(y): 1\r\n\r\n",
    "NUL in header value": b"GET /up/pool/ok.deb HTTP/1.1\r\nX-A: 1\x002\r\n\r\n",
    "bare CR in header value": b"GET /up/pool/ok.deb HTTP/1.1\r\nX-A: 1\r2\r\n\r\n",
    "obs-fold": b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nX-A: 1\r\n  folded\r\n\r\n",
    "obs-fold with tab": b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nX-A: 1\r\n\tfolded\r\n\r\n",
    "leading whitespace header": b"GET /up/pool/ok.deb HTTP/1.1\r\n Host: box\r\n\r\n",
    "non-numeric Content-Length": b"GET /up/pool/ok.deb HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
    "negative Content-Length": b"GET /up/pool/ok.deb HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    "CONNECT without port": b"CONNECT 127.0.0.2 HTTP/1.1\r\nHost: x\r\n\r\n",
    "CONNECT obs-fold": b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n",
    "CONNECT header without colon": b"CONNECT 127.0.0.2:443 HTTP/1.1\r\nHost x\r\n\r\n",
    "bare CONNECT": b"CONNECT\r\n\r\n",
}

#: Request-body framing a smuggler relies on; each must be refused (400,
#: closed) before any request in it reaches an upstream.
SMUGGLED = b"GET /up/pool/smuggled.deb HTTP/1.1\r\nHost: box\r\n\r\n"
CONFLICTING_FRAMING = {
    "Content-Length then Transfer-Encoding":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nContent-Length: 5\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding then Content-Length":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "lowercase names":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nhost: box\r\ncontent-length: 5\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "two Content-Lengths":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nContent-Length: 0\r\n"
        b"Content-Length: " + str(len(SMUGGLED)).encode() + b"\r\n\r\n" + SMUGGLED,
    "Content-Length list":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nContent-Length: 0, 0\r\n\r\n" + SMUGGLED,
    "two Transfer-Encodings":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding: chunked, identity":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\n"
        b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding: xchunked":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nTransfer-Encoding: xchunked\r\n"
        b"\r\n0\r\n\r\n" + SMUGGLED,
    "Transfer-Encoding with space before colon":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nContent-Length: 0\r\n"
        b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
    "folded Transfer-Encoding":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nTransfer-Encoding:\r\n chunked\r\n"
        b"\r\n0\r\n\r\n" + SMUGGLED,
    "bad chunk size":
        b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nTransfer-Encoding: chunked\r\n"
        b"\r\nzz\r\n" + SMUGGLED,
}


class MalformedRequestTests(TestCase):
    """
    Request heads that are not HTTP/1.1, request smuggling, oversized heads.
    """

    timeout = 20

    async def test_malformed_heads_are_400_and_close(self) -> None:
        """
        Every malformed head gets 400 and its connection closes; no
        upstream receives anything, nothing is stored.
        """
        box = Box.start(self)
        for name, data in MALFORMED.items():
            response = await exchange(self, box.proxy_port, data)
            self.assertEqual(response.status, 400, name)
        self.assertEqual(box.upstream_paths(), set())
        self.assertEqual(box.stored_keys(), set())

    async def test_malformed_heads_on_the_index_port(self) -> None:
        """
        The index port refuses the same heads (twisted.web's own parser)
        except obsolete line folding, which it joins; nothing reaches
        the pip upstream.
        """
        box = Box.start(self)
        for name, data in MALFORMED.items():
            if b"CONNECT" in data or "fold" in name:
                continue
            data = data.replace(b"/up/pool/ok.deb", b"/simple/bcdemo-a/")
            response = await exchange(self, box.index_port, data)
            self.assertEqual(response.status, 400, name)
        self.assertEqual(box.pypi_paths(), [])

    async def test_tls_hello_answered_at_once(self) -> None:
        """
        A TLS ClientHello on a plain-HTTP port (skopeo tries https first)
        gets a 400 and a close at once, not after the request deadline.
        """
        box = Box.start(self)
        hello = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32)
        for port in (box.proxy_port, box.index_port):
            self.assertEqual(await dropped_or_refused(self, port, hello), 400)

    async def test_lowercase_method_is_not_served(self) -> None:
        """
        A method is case-sensitive: ``get`` is a valid token but not GET,
        so it is 405 (the connection stays usable), nothing fetched.
        """
        box = Box.start(self)
        response = await exchange(
            self, box.proxy_port, raw_request("get", "/up/pool/ok.deb", "box"), closes=False
        )
        self.assertEqual(response.status, 405)
        self.assertEqual(box.upstream_paths(), set())

    async def test_conflicting_framing_is_refused(self) -> None:
        """
        Content-Length with Transfer-Encoding, two lengths, unknown codings
        and broken chunks: 400, closed, and neither the request nor the
        one smuggled in its body reaches the upstream.
        """
        box = Box.start(self)
        for name, data in CONFLICTING_FRAMING.items():
            response = await exchange(self, box.proxy_port, data)
            self.assertEqual(response.status, 400, name)
        self.assertEqual(box.upstream_paths(), set())

    async def test_request_in_a_body_is_never_parsed(self) -> None:
        """
        A GET whose chunked (or Content-Length) body holds a second
        request: the body is read as a body and dropped; only the outer
        request reaches the upstream, and the connection goes on to serve
        the next real request.
        """
        box = Box.start(self)
        chunk = SMUGGLED
        connection = await raw_connection(self, box.proxy_port)
        connection.send(
            b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(chunk) + chunk + b"\r\n0\r\n\r\n"
        )
        first = await connection.response()
        connection.send(
            b"GET /up/pool/ok.deb HTTP/1.1\r\nHost: box\r\nContent-Length: %d\r\n\r\n"
            % len(SMUGGLED) + SMUGGLED
        )
        second = await connection.response()
        connection.send(raw_request("GET", "/up/pool/ok.deb", "box"))
        third = await connection.response()
        await connection.close()
        self.assertEqual(
            [(r.status, r.body, r.header("x-cache")) for r in (first, second, third)],
            [(200, b"ok\n", "MISS"), (200, b"ok\n", "HIT"), (200, b"ok\n", "HIT")],
        )
        self.assertEqual(box.upstream_paths(), {f"{BASE}/pool/ok.deb"})

    async def test_oversized_request_line_is_414(self) -> None:
        """
        A request line longer than the line limit: 414 and closed, at once
        (without waiting for the rest of the line); nothing fetched.
        """
        box = Box.start(self)
        long_target = "/up/pool/" + "a" * (ProxyChannel.MAX_LENGTH + 10)
        response = await exchange(self, box.proxy_port, get(long_target))
        self.assertEqual(response.status, 414)
        self.assertEqual(response.header("connection"), "close")
        endless = b"GET /up/pool/" + b"a" * (2 * ProxyChannel.MAX_LENGTH)
        self.assertEqual(await dropped_or_refused(self, box.proxy_port, endless), 414)
        self.assertEqual(box.upstream_paths(), set())

    async def test_oversized_headers(self) -> None:
        """
        One header line over the line limit: 431; headers over the total
        size or count limits: 400; all closed, nothing fetched.
        """
        box = Box.start(self)
        long_line = [("X-Long", "a" * (ProxyChannel.MAX_LENGTH + 10))]
        many_bytes = [(f"X-{n}", "a" * 500) for n in range(40)]
        many_headers = [(f"X-{n}", "1") for n in range(ProxyChannel.maxHeaders + 1)]
        for headers, status in ((long_line, 431), (many_bytes, 400), (many_headers, 400)):
            data = raw_request("GET", "/up/pool/ok.deb", "box", headers)
            response = await exchange(self, box.proxy_port, data)
            self.assertEqual(response.status, status, len(data))
        connect = raw_request("CONNECT", "127.0.0.2:443", "x", long_line)
        self.assertEqual((await exchange(self, box.proxy_port, connect)).status, 400)
        self.assertEqual(box.upstream_paths(), set())

    async def test_oversized_head_on_the_index_port(self) -> None:
        """
        The index port closes the connection on an over-long line (its
        channel is twisted.web's, which does not answer) and fetches
        nothing.
        """
        box = Box.start(self)
        long_target = "/simple/" + "a" * (ProxyChannel.MAX_LENGTH + 10) + "/"
        await dropped_or_refused(self, box.index_port, get(long_target))
        self.assertEqual(box.pypi_paths(), [])


class BoundedHeadTests(SynchronousTestCase):
    """
    What the proxy channel keeps in memory of an endless head.
    """

    def feed(self, prefix: bytes, endless: bytes) -> tuple[StringTransport, int]:
        """
        Feed ``prefix``, then ``endless`` over and over (64 KiB reads, up
        to 16 MiB) until the channel closes the connection (a real TCP
        transport stops reading then); the bytes it took before closing.
        """
        site = ProxySite(Resource(), reactor=Clock(), policy=AccessPolicy())
        address = IPv4Address("TCP", "127.0.0.1", 50000)
        channel = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        channel.dataReceived(prefix)
        taken = len(prefix)
        for _ in range(256):
            channel.dataReceived(endless)
            taken += len(endless)
            if transport.disconnecting:
                break
        # What the channel still holds of a line (LineReceiver's public
        # clearLineBuffer): with no line end in sight, it only grows until
        # dropped, so the end shows any unbounded growth.
        held = channel.clearLineBuffer()
        self.assertLessEqual(len(held), len(endless) + ProxyChannel.MAX_LENGTH)
        return transport, taken

    def test_endless_request_line(self) -> None:
        transport, taken = self.feed(b"GET /", b"a" * 65536)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 414 "))
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(taken, 65536 + 5)

    def test_endless_header_line(self) -> None:
        transport, taken = self.feed(b"GET /up/x HTTP/1.1\r\nX-A: ", b"a" * 65536)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 431 "))
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(taken, 2 * 65536)

    def test_endless_stream_of_headers(self) -> None:
        transport, taken = self.feed(b"GET /up/x HTTP/1.1\r\n", b"X-A: 1\r\n" * 8192)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(taken, 65536 + 100)


# -- path traversal ---------------------------------------------------------


#: Mirror-route targets that could leave BASE: each is a 400 and reaches
#: no upstream.
TRAVERSALS = (
    "/up/../secret",
    "/up/pool/../../secret",
    "/up/%2e%2e/secret",
    "/up/%2E%2E/secret",
    "/up/.%2e/secret",
    "/up/%2e./secret",
    "/up/pool%2f..%2f..%2fsecret",
    "/up/pool/..%2fsecret",
    "/up/pool/..%2Fsecret",
    "/up/pool\\..\\..\\secret",
    "/up/pool%5c..%5c..%5csecret",
    "/up/pool/%00/secret",
    "/up/pool/ok.deb%00.txt",
    "/up/%252e%252e/secret",
    "/up/pool%252f%252e%252e%252fsecret",
    "/up/%25252e%25252e/secret",
    "/up/%2525252e%2525252e/secret",
    "/up/%c0%ae%c0%ae/secret",
    "/up/%e0%80%ae%e0%80%ae/secret",
    "/up/pool%c0%af..%c0%afsecret",
    "/up/%ef%bc%8e%ef%bc%8e/secret",
    "/up/%e2%80%a5/secret",
    "/up/pool/..;/secret",
    "/up/pool/.;x/ok.deb",
    "/up/pool/ok.deb#/../../secret",
    "/up/..#",
    "/up/pool/..#/x",
    "/up/pool/ok.deb#fragment",
    "/up/%2e",
    "/up/pool/%ff.deb",
)


class TraversalTests(TestCase):
    """
    Mirror routes and pip file routes never lead outside their upstream
    path, nor outside the cache directory.
    """

    timeout = 20

    async def test_mirror_route_traversal(self) -> None:
        """
        Every traversal spelling is a 400 with nothing fetched; the paths
        that are allowed arrive upstream exactly as sent, under :class:`BASE`.
        """
        box = Box.start(self)
        refused = [*TRAVERSALS]
        # The same paths in absolute form naming this box.
        refused += [
            f"http://127.0.0.1:{box.proxy_port}{path}" for path in TRAVERSALS[:6]
        ] + [f"http://localhost:{box.proxy_port}/up/pool/..%2fsecret"]
        for target in refused:
            response = await exchange(self, box.proxy_port, get(target), closes=False)
            self.assertEqual(response.status, 400, target)
        # A byte twisted.web lets through, but not printable ASCII.
        response = await exchange(
            self, box.proxy_port, b"GET /up/pool/\xae.deb HTTP/1.1\r\nHost: box\r\n\r\n",
            closes=False,
        )
        self.assertEqual(response.status, 400)
        self.assertEqual(box.upstream_paths(), set())

        allowed = {
            "/up/pool/ok.deb": (200, f"{BASE}/pool/ok.deb"),
            "/up/pool%2fok.deb": (404, f"{BASE}/pool%2fok.deb"),
            "/up//pool/ok.deb": (404, f"{BASE}//pool/ok.deb"),
            "/up/pool/ok.deb?x=/../../secret": (404, f"{BASE}/pool/ok.deb?x=/../../secret"),
            "/up/pool/a%2520b.deb": (404, f"{BASE}/pool/a%2520b.deb"),
        }
        for target, (status, _) in allowed.items():
            response = await exchange(self, box.proxy_port, get(target), closes=False)
            self.assertEqual(response.status, status, target)
        await box.idle()
        self.assertEqual(box.upstream_paths(), {path for _, path in allowed.values()})
        self.assertEqual(
            box.stored_keys(), {f"http://127.0.0.1:{box.upstream_port}{BASE}/pool/ok.deb"}
        )
        assert_cache_layout(self, box.cache_dir)

    async def test_pip_routes(self) -> None:
        """
        Traversal in the project or file name of ``/files/...`` and
        ``/simple/...``, and invalid project names: 404, and nothing more
        reaches the pip upstream than the page and file a real client
        fetched.
        """
        box = Box.start(self)
        page = await exchange(self, box.index_port, get("/simple/bcdemo-a/"), closes=False)
        wheel = await exchange(
            self, box.index_port, get(f"/files/bcdemo-a/{WHEEL}"), closes=False
        )
        self.assertEqual((page.status, wheel.status), (200, 200))
        await box.idle()
        fetched = ["/simple/bcdemo-a/", f"/files/{WHEEL}"]
        self.assertEqual(box.pypi_paths(), fetched)
        for target in (
            "/simple/../../etc/passwd",
            "/simple/%2e%2e/",
            "/simple/..%2f..%2fetc%2fpasswd/",
            "/simple/bcdemo-a%2f..%2f..%2fx/",
            "/simple/bcdemo-a%00/",
            "/simple/bcdemo-a%0a/",
            "/simple/bcdemo-a%0d%0aX-Injected:%201/",
            "/simple/%E2%84%AA/",
            "/simple/-bcdemo/",
            "/simple/bcdemo-/",
            "/simple/bcdemo%5ca/",
            "/simple/bcdemo%20a/",
            "/simple/caf%c3%a9/",
            "/files/../" + WHEEL,
            "/files/%2e%2e/%2e%2e",
            "/files/bcdemo-a/..%2f..%2fsecret",
            "/files/bcdemo-a/%2e%2e",
            f"/files/bcdemo-a/{WHEEL}%00",
            f"/files/bcdemo-a/..%5c{WHEEL}",
            f"/files/bcdemo-a/{WHEEL}/..",
            f"/files/bcdemo-a/%252e%252e%252f{WHEEL}",
            f"/files/bcdemo-a%2f..%2fbcdemo-b/{WHEEL}",
            f"/files/bcdemo-b/{WHEEL}",
            "/files/bcdemo-a/bcdemo_a-9.9-py3-none-any.whl",
        ):
            response = await exchange(self, box.index_port, get(target), closes=False)
            self.assertEqual(response.status, 404, target)
        # The pip route through the proxy port reaches the same checks.
        own = f"http://127.0.0.1:{box.index_port}/files/bcdemo-a/..%2f..%2fsecret"
        response = await exchange(self, box.proxy_port, get(own), closes=False)
        self.assertEqual(response.status, 404)
        # An absolute URI on the index port names a page of this index,
        # whatever its host says.
        foreign = await exchange(
            self, box.index_port, get("http://127.0.0.2:9/simple/bcdemo-a/"), closes=False
        )
        self.assertEqual((foreign.status, foreign.header("x-cache")), (200, "HIT"))
        self.assertEqual(box.pypi_paths(), fetched)
        assert_cache_layout(self, box.cache_dir)


# -- hosts and ports ----------------------------------------------------------


def try_listen_v6(testcase: TestCase) -> tuple[Any, int] | None:
    try:
        return silent_listener(testcase, "::1")
    except Exception:
        return None


class HostEncodingTests(TestCase):
    """
    The open-proxy rules under every spelling of a host and port, with
    the default policy: loopback and private targets are refused however
    they are written, and the listeners behind them receive nothing.
    """

    timeout = 20

    async def test_absolute_uris(self) -> None:
        """
        User information, bad ports and bad brackets are 400; loopback,
        unspecified, private and link-local targets in any spelling are
        403, names among them refused at the address they resolve to.
        """
        v4_1, p1 = silent_listener(self, "127.0.0.1")
        v4_2, p2 = silent_listener(self, "127.0.0.2")
        v6 = try_listen_v6(self)
        p6 = v6[1] if v6 is not None else p1
        box = Box.start(self)
        cases = {
            # user information
            f"http://user@127.0.0.2:{p2}/x": 400,
            f"http://user:secret@127.0.0.2:{p2}/x": 400,
            f"http://@127.0.0.2:{p2}/x": 400,
            f"http://127.0.0.2:{p2}@127.0.0.1:{p1}/x": 400,
            f"http://box%2f@127.0.0.2:{p2}/x": 400,
            # ports
            "http://127.0.0.2:0/x": 400,
            "http://127.0.0.2:65536/x": 400,
            "http://127.0.0.2:99999/x": 400,
            "http://127.0.0.2:abc/x": 400,
            "http://127.0.0.2:-1/x": 400,
            "http://127.0.0.2:+80/x": 400,
            "http://127.0.0.2:0x50/x": 400,
            # brackets
            "http://[::1/x": 400,
            "http://[zz]/x": 400,
            "http://[127.0.0.1]/x": 400,
            # literals of loopback, unspecified, private, link-local
            f"http://127.0.0.2:{p2}/x": 403,
            f"http://127.0.0.2.:{p2}/x": 403,
            f"http://0.0.0.0:{p1}/x": 403,
            f"http://[::]:{p1}/x": 403,
            f"http://[::1]:{p6}/x": 403,
            f"http://[::ffff:127.0.0.1]:{p1}/x": 403,
            f"http://[::ffff:7f00:2]:{p2}/x": 403,
            f"http://[0:0:0:0:0:ffff:127.0.0.2]:{p2}/x": 403,
            f"http://[::127.0.0.1]:{p1}/x": 403,
            f"http://[64:ff9b::7f00:1]:{p1}/x": 403,
            f"http://[2002:7f00:1::1]:{p1}/x": 403,
            f"http://[fe80::1%25lo]:{p1}/x": 403,
            "http://169.254.169.254/latest/meta-data/": 403,
            "http://10.0.0.1/x": 403,
            # numeric spellings: names, judged at the resolved address
            f"http://2130706433:{p1}/x": 403,
            f"http://0x7f000001:{p1}/x": 403,
            f"http://0177.0.0.1:{p1}/x": 403,
            f"http://017700000001:{p1}/x": 403,
            f"http://127.1:{p1}/x": 403,
            f"http://0:{p1}/x": 403,
            f"http://2130706434:{p2}/x": 403,
            f"http://0x7f000002:{p2}/x": 403,
            f"http://0177.0.0.2:{p2}/x": 403,
            f"http://0x7f.0.0.2:{p2}/x": 403,
            f"http://127.2:{p2}/x": 403,
            f"http://127.000.000.002:{p2}/x": 403,
            # names resolving to loopback, including IDNA and rebinding
            f"http://localhost:{p1}/x": 403,
            f"http://LOCALHOST.:{p1}/x": 403,
            f"http://xn--bcher-kva.example:{p2}/x": 403,
            f"http://XN--BCHER-KVA.example.:{p2}/x": 403,
            f"http://rebind.example:{p2}/x": 403,
            # hosts that are not valid names
            f"http://b%C3%BCcher.example:{p2}/x": 403,
            f"http://xn--a.example:{p2}/x": 403,
            f"http://127.0.0.2%00:{p2}/x": 403,
            f"http://127.0.0.2%2f:{p2}/x": 403,
            f"http://-bad-.example:{p2}/x": 403,
            f"http://{'a' * 64}.example:{p2}/x": 403,
            # the fragment is not the host
            f"http://127.0.0.2:{p2}#@example.org/x": 403,
        }
        for target, status in cases.items():
            response = await exchange(self, box.proxy_port, get(target), closes=False)
            self.assertEqual(response.status, status, target)
            self.assertIsNone(response.header("x-cache"), target)
        await box.idle()
        self.assertEqual((v4_1.connections, v4_2.connections), (0, 0))
        if v6 is not None:
            self.assertEqual(v6[0].connections, 0)
        # Names were looked up (so refused at the address, not by name)
        # only where the host is a valid name.
        self.assertEqual(
            set(box.resolver.asked),
            {
                "2130706433", "0x7f000001", "0177.0.0.1", "017700000001", "127.1",
                "0", "2130706434", "0x7f000002", "0177.0.0.2", "0x7f.0.0.2", "127.2",
                "127.000.000.002", "localhost", "xn--bcher-kva.example",
                "rebind.example",
            },
        )
        self.assertEqual(box.stored_keys(), set())

    async def test_connect_targets(self) -> None:
        """
        The same spellings as ``CONNECT`` targets (the listeners' ports
        are opened to CONNECT for the test): refused, nothing connected.
        """
        v4_1, p1 = silent_listener(self, "127.0.0.1")
        v4_2, p2 = silent_listener(self, "127.0.0.2")
        v6 = try_listen_v6(self)
        p6 = v6[1] if v6 is not None else p1
        box = Box.start(self, connect_ports=(p1, p2, p6))
        cases = {
            f"user@127.0.0.2:{p2}": 400,
            "127.0.0.2:0": 400,
            "127.0.0.2:65536": 400,
            "127.0.0.2:99999": 400,
            "127.0.0.2": 400,
            f"[127.0.0.2]:{p2}": 400,
            f"[::1:{p6}": 400,
            f"127.0.0.2:{p2}/x": 400,
            f"127.0.0.2:{p2}": 403,
            f"0.0.0.0:{p1}": 403,
            f"[::1]:{p6}": 403,
            f"[::ffff:127.0.0.1]:{p1}": 403,
            f"[::ffff:7f00:2]:{p2}": 403,
            f"2130706433:{p1}": 403,
            f"0x7f000001:{p1}": 403,
            f"0177.0.0.1:{p1}": 403,
            f"127.1:{p1}": 403,
            f"2130706434:{p2}": 403,
            f"localhost:{p1}": 403,
            f"xn--bcher-kva.example:{p2}": 403,
            f"rebind.example:{p2}": 403,
            f"127.0.0.2:{p2 + 1 if p2 < 65535 else p2 - 1}": 403,
        }
        for target, status in cases.items():
            data = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()
            response = await exchange(self, box.proxy_port, data)
            self.assertEqual(response.status, status, target)
        self.assertEqual((v4_1.connections, v4_2.connections), (0, 0))
        if v6 is not None:
            self.assertEqual(v6[0].connections, 0)

    async def test_unicode_hosts_at_the_guard(self) -> None:
        """
        U-label hosts (which cannot travel in an HTTP/1.1 request line)
        are normalised to their A-label before the lookup, and refused at
        the resolved loopback address; a fullwidth spelling of localhost
        is localhost.
        """
        _, p2 = silent_listener(self, "127.0.0.2")
        listener, p1 = silent_listener(self, "127.0.0.1")
        policy = AccessPolicy()
        resolver = FakeResolver(RESOLVED)
        self.assertTrue(policy.host_allowed("bücher.example", p2))
        for host, port in (
            ("bücher.example", p2), ("BÜCHER.example.", p2), ("ｌｏｃａｌｈｏｓｔ", p1),
        ):
            with self.assertRaises(TargetRefused, msg=host):
                await connect_tcp(
                    reactor, policy, host, port, Factory.forProtocol(Protocol), 5.0, resolver
                )
        self.assertEqual(
            resolver.asked, ["xn--bcher-kva.example", "xn--bcher-kva.example", "localhost"]
        )
        self.assertEqual(listener.connections, 0)


class AllowListEncodingTests(TestCase):
    """
    With ``allow_upstream = *.allowed.test``: names under it (IDNA too)
    reach their upstream on 127.0.0.3; no other spelling reaches the
    listener on 127.0.0.2.
    """

    timeout = 20

    async def test_only_the_allowed_names_pass(self) -> None:
        """
        Names matching the pattern (any case, trailing dot, IDNA) are
        fetched and tunnelled; addresses and numeric spellings are refused
        by name before any lookup.
        """
        allowed = FakeUpstream()
        allowed.bodies["/file.txt"] = GatedBody(b"allowed\n")
        allowed_port = listen(allowed, interface="127.0.0.3")
        self.addCleanup(allowed_port.stopListening)
        p3 = port_number(allowed_port)
        v4_2, p2 = silent_listener(self, "127.0.0.2")
        box = Box.start(self, {"allow_upstream": ("*.allowed.test",)}, connect_ports=(p2, p3))
        cases = {
            f"http://box.allowed.test:{p3}/file.txt": 200,
            f"http://BOX.Allowed.TEST.:{p3}/file.txt": 200,
            f"http://xn--bcher-kva.allowed.test:{p3}/file.txt": 200,
            f"http://127.0.0.2:{p2}/x": 403,
            f"http://127.0.0.3:{p3}/file.txt": 403,
            f"http://2130706434:{p2}/x": 403,
            f"http://0x7f000002:{p2}/x": 403,
            f"http://[::ffff:127.0.0.2]:{p2}/x": 403,
            f"http://allowed.test:{p2}/x": 403,
            f"http://box.allowed.test.evil.example:{p2}/x": 403,
            f"http://box.allowed.test%2e:{p2}/x": 403,
            f"http://box.allowed.test%00.evil:{p2}/x": 403,
            f"http://127.0.0.2:{p2}#.allowed.test/x": 403,
            f"http://box.allowed.test@127.0.0.2:{p2}/x": 400,
            f"http://box.allowed.test\\@127.0.0.2:{p2}/x": 400,
            f"http://box.allowed.test:{p3}@127.0.0.2:{p2}/x": 400,
        }
        for target, status in cases.items():
            response = await exchange(self, box.proxy_port, get(target), closes=False)
            self.assertEqual(response.status, status, target)
        for target, status in {
            f"box.allowed.test:{p3}": 200,
            f"127.0.0.2:{p2}": 403,
            f"2130706434:{p2}": 403,
            f"[::ffff:127.0.0.2]:{p2}": 403,
        }.items():
            connection = await raw_connection(self, box.proxy_port)
            connection.send(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            if status == 200:
                await connection._until(lambda: b"\r\n\r\n" in connection.buffer)
                self.assertTrue(connection.buffer.startswith(b"HTTP/1.1 200 "), target)
                await connection.close()
            else:
                self.assertEqual((await connection.response()).status, status, target)
        await box.idle()
        self.assertEqual(v4_2.connections, 0)
        self.assertEqual(allowed.requests["/file.txt"], 3)
        self.assertNotIn("2130706434", box.resolver.asked)


# -- property tests -----------------------------------------------------------


PROPERTIES = settings(
    max_examples=300, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

MIRROR_BASE = "http://127.0.0.1:8000/base"
MIRRORS = (Mirror("up", MIRROR_BASE), Mirror("other", "http://127.0.0.5:81"))
POLICY = AccessPolicy(
    allow_upstream=("*.allowed.test", "127.0.0.2:8080"),
    configured_upstreams=frozenset({("127.0.0.1", 8000), ("127.0.0.5", 81)}),
)


@attrs.frozen
class FakeRequest:
    """The parts of a request the router reads."""

    uri: bytes

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8899)


_PATH_PIECES = st.sampled_from([
    "a", "b.deb", "pool", ".", "..", "/", "//", "%2e", "%2E", "%2f", "%2F", "%5c",
    "%5C", "\\", "%00", "%25", "%252e", "%252f", "%25252e", "%c0%ae", "%c0%af",
    "%e0%80%ae", "%ef%bc%8e", "%e2%80%a4", "%e2%80%a5", ";", ";x", "?", "#", "%3f",
    "%23", "~", "%", "%zz", "%2", "..;", "%2e%2e", ".%2e", "%2e.", "\u00ae", "\xff",
    "%ff", "%u002e", "\x00", " ",
])
_PATHS = st.lists(
    _PATH_PIECES | st.text(st.characters(min_codepoint=0x20, max_codepoint=0xff), max_size=3),
    max_size=14,
).map("".join)


def _worst_case_segments(path: str) -> list[str]:
    """
    The segments of ``path`` as the most credulous upstream could read
    them: decoded until stable, backslashes as slashes, ``;params``
    dropped, NFKC-normalised.
    """
    for _ in range(6):
        path = unquote(path, errors="strict")
    path = unicodedata.normalize("NFKC", path).replace("\\", "/")
    return [segment.split(";", 1)[0] for segment in path.split("/")]


def _sent_path(url: str) -> str:
    """The request path sent for ``url`` (request_uri, then the Agent)."""
    uri = URI.fromBytes(request_uri(url))
    return uri.originForm.decode("ascii")


def _host_strategy() -> st.SearchStrategy[str]:
    numeric_v4 = st.integers(0, 2**32 - 1).flatmap(
        lambda n: st.sampled_from([
            str(ipaddress.IPv4Address(n)), str(n), hex(n),
            ".".join("0%o" % int(octet) for octet in str(ipaddress.IPv4Address(n)).split(".")),
        ])
    )
    v6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
    names = st.from_regex(r"[a-zA-Z0-9-]{1,10}(\.[a-zA-Z0-9-]{1,10}){0,3}\.?", fullmatch=True)
    fixed = st.sampled_from([
        "localhost", "127.0.0.1", "127.0.0.2", "[::1]", "[::ffff:127.0.0.1]", "box.allowed.test",
        "xn--bcher-kva.allowed.test", "allowed.test", "[::1", "[zz]", "", "%00", "a%2fb",
        "xn--a", "[fe80::1%25lo]", "127.0.0.1.", "[127.0.0.1]", "a..b", "*.allowed.test",
    ])
    noise = st.text(
        st.sampled_from(string.ascii_letters + string.digits + ".-_:@[]%/\\?#"), max_size=12
    )
    return numeric_v4 | v6 | names | fixed | noise


_URIS = st.builds(
    lambda scheme, userinfo, host, port, path: f"{scheme}://{userinfo}{host}{port}{path}",
    st.sampled_from(["http", "HTTP", "https", "ftp", "", "http:"]),
    st.sampled_from(["", "", "", "u@", "u:p@", "@", ":@", "a%40b@"]),
    _host_strategy(),
    st.one_of(
        st.just(""), st.just(":"),
        st.integers(-2, 100_000).map(lambda n: f":{n}"),
        st.sampled_from([":8000", ":8899", ":81", ":8080", ":0", ":65535", ":65536", ":+1", ":0x50"]),
        st.text(st.sampled_from(string.digits + "abc:+-@"), max_size=6).map(lambda t: ":" + t),
    ),
    st.sampled_from(["", "/", "/up/x", "/up/%2e%2e/x", "/other/a", "/x?y=1", "/#f", "?q"]),
)


class RouterProperties(SynchronousTestCase):
    """
    The router: no target it accepts leads outside where it was meant to.
    """

    router = Router(MIRRORS, POLICY)

    def route(self, uri: bytes) -> Any:
        return self.router.target(FakeRequest(uri))  # type: ignore[arg-type]

    @PROPERTIES
    @given(_PATHS)
    @example("..#")
    @example("pool/.#x")
    @example("%252e%252e")
    @example("%c0%ae%c0%ae")
    def test_mirror_paths_stay_under_the_base(self, path: str) -> None:
        """
        A mirror path is refused, or the URL fetched (as it is sent) is
        under the mirror's base however credulously the upstream decodes
        it, and its cache key is the URL's.
        """
        try:
            target = self.route(("/up/" + path).encode("latin-1"))
        except BadTarget as refusal:
            self.assertIn(refusal.code, (400,))
            return
        self.assertTrue(target.url.startswith(MIRROR_BASE + "/"), target.url)
        self.assertEqual(target.key, cache_key(target.url))
        self.assertTrue(target.key.startswith("http://127.0.0.1:8000/base/"), target.key)
        sent = _sent_path(target.url)
        self.assertTrue(sent.startswith("/base/"), sent)
        segments = _worst_case_segments(urlsplit(sent).path)
        self.assertNotIn("..", segments, sent)
        self.assertNotIn(".", segments, sent)
        self.assertNotIn("\x00", "".join(segments), sent)

    @PROPERTIES
    @given(_URIS)
    def test_absolute_uris(self, uri: str) -> None:
        """
        An absolute URI is refused with 400/403/404, or it is an allowed
        host on a valid port without user information, and the host the client
        connects to is the host that was checked.
        """
        try:
            raw = uri.encode("latin-1")
        except UnicodeEncodeError:
            return
        try:
            target = self.route(raw)
        except BadTarget as refusal:
            self.assertIn(refusal.code, (400, 403, 404))
            return
        if target.route != "proxy":
            mirror = {m.name: m.url for m in MIRRORS}[target.route]
            self.assertTrue(target.url.startswith(mirror + "/"), (uri, target.url))
            return
        parts = urlsplit(target.url)
        self.assertEqual(parts.scheme, "http")
        self.assertIsNone(parts.username)
        self.assertIsNone(parts.password)
        port = parts.port if parts.port is not None else 80
        self.assertTrue(1 <= port <= 65535, uri)
        assert parts.hostname is not None
        self.assertTrue(POLICY.host_allowed(parts.hostname, port), uri)
        try:
            sent = URI.fromBytes(request_uri(target.url))
        except Exception:
            # The request cannot even be built: nothing is connected.
            return
        self.assertEqual(
            normalize_host(sent.host.decode("ascii")), normalize_host(parts.hostname), uri
        )
        self.assertEqual(sent.port, port, uri)

    @PROPERTIES
    @given(_PATHS)
    def test_checked_path_raises_only_bad_target(self, path: str) -> None:
        try:
            _checked_path(path)
        except BadTarget:
            return
        decoded = path
        for _ in range(4):
            decoded = unquote(decoded, errors="strict")
            self.assertNotIn("..", decoded.split("/"))

    def test_deep_encoding_is_refused_quickly(self) -> None:
        """
        A path encoded thousands of times is refused after a few rounds,
        not decoded round after round.
        """
        path = "%" + "25" * 8000 + "2e"
        with self.assertRaises(BadTarget):
            _checked_path(path)


class ParserProperties(SynchronousTestCase):
    """
    The host, CONNECT-target and project-name parsers are total: they
    answer or raise their documented error, and their output is canonical.
    """

    @PROPERTIES
    @given(st.binary(max_size=40) | _host_strategy().map(lambda h: h.encode("latin-1", "replace"))
           .flatmap(lambda h: st.sampled_from([h, h + b":443", h + b":0", h + b":65536", h + b":1"])))
    def test_parse_connect_target(self, authority: bytes) -> None:
        try:
            target = parse_connect_target(authority)
        except ValueError:
            return
        self.assertTrue(1 <= target.port <= 65535)
        self.assertTrue(target.host.isascii())
        self.assertEqual(normalize_host(target.host), target.host)
        self.assertEqual(parse_connect_target(str(target).encode("ascii")), target)

    @PROPERTIES
    @given(st.text(max_size=30) | _host_strategy())
    def test_normalize_host(self, host: str) -> None:
        try:
            name = normalize_host(host)
        except InvalidHost:
            return
        except ValueError as error:
            self.fail(f"{host!r}: ValueError that is not InvalidHost: {error}")
        self.assertTrue(name.isascii(), name)
        self.assertEqual(normalize_host(name), name)
        self.assertEqual(name, name.lower())
        self.assertFalse(name.endswith("."))

    @PROPERTIES
    @given(st.text(max_size=30))
    def test_normalize_project_name(self, raw: str) -> None:
        name = normalize_project_name(raw)
        self.assertEqual(normalize_project_name(name), name)
        self.assertEqual(name, name.lower())
        self.assertIsNone(re.search(r"[._]|--", name))

    @PROPERTIES
    @given(st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?", fullmatch=True))
    def test_valid_names_normalise_to_clean_names(self, raw: str) -> None:
        self.assertTrue(is_valid_project_name(raw))
        self.assertRegex(normalize_project_name(raw), r"\A[a-z0-9]+(-[a-z0-9]+)*\Z")

    def test_valid_names_are_ascii_letters_digits_and_separators(self) -> None:
        for raw in ("a\n", "\u212a", "\u0130", "a\u017f"):
            self.assertFalse(is_valid_project_name(raw), repr(raw))


@attrs.define
class RecordingFetcher:
    """A fetcher whose upstream is down; records every URL asked for."""

    urls: list[str] = attrs.Factory(list)

    def fetch(self, request: UpstreamRequest) -> Deferred[Any]:
        self.urls.append(request.url)
        return fail(UpstreamError("upstream down"))

    def used(self, entry: Any) -> None:
        pass


class IndexRouteProperties(SynchronousTestCase):
    """
    The index's project route asks upstream only for clean, normalised
    project names, whatever the client puts in the path.
    """

    def setUp(self) -> None:
        self.store = Store.open(self.mktemp(), 1 << 20, Clock())
        self.addCleanup(self.store.close)

    @PROPERTIES
    @given(
        st.text(max_size=12)
        | st.sampled_from(["a\n", "A\n", "\u212a", "ſ", "..", ".", "a/../b", "a%00", "a b", "a\r\nb"])
    )
    def test_project_route(self, raw: str) -> None:
        from twisted.web.test.requesthelper import DummyRequest

        fetcher = RecordingFetcher()
        index = index_resource(
            Engine(self.store, fetcher, Clock()),  # type: ignore[arg-type]
            ["http://127.0.0.1:9/simple"], 300.0,
        )
        for segment in (quote(raw, safe=""), quote(raw, safe="/")):
            request = DummyRequest([])
            request.method = b"GET"
            request.requestHeaders = Headers({b"accept": [b"text/html"]})
            index.serve(request, f"/simple/{segment}/")  # type: ignore[arg-type]
            self.assertTrue(request.finished, raw)
        for url in fetcher.urls:
            self.assertRegex(
                url, r"\Ahttp://127\.0\.0\.1:9/simple/[a-z0-9]+(-[a-z0-9]+)*/\Z", repr(raw)
            )
