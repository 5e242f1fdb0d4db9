"""
The package proxy through the running service: real TCP on 127.0.0.1, the
real :class:`buildcache.service.Server` wiring, and an in-process Alpine-style
origin (:class:`tests.apkrepo.RepositoryResource`) serving real packages and a
real ``APKINDEX.tar.gz``.

Covers what issue 3 asks the proxy to show: the forward-proxy and mirror
routes sharing one cache, index revalidation (conditional request,
``no-cache``, stale on failure), client conditionals, ranges, HEAD,
keep-alive, refused methods and targets, checking packages against their
index, and the freshness table for apt paths.  CONNECT itself is covered by
:func:`tests.test_tunnel`; one refusal is checked here through the service.

Shared helpers (:class:`RawConnection`, :class:`ProxyHarness`) are used by
:func:`tests.test_apk_e2e` too.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from buildcache.config import Mirror
from buildcache.engine.fields import format_http_date
from buildcache.engine.keys import MEMOISED_URL_LENGTH, cache_key
from buildcache.fetch.fetcher import STREAM_CHECKED_ABOVE, WITHHELD_TAIL, Fetcher
from buildcache.store import BlockingRunner
from tests.apkrepo import (
    BUILD_TIME,
    BuiltApk,
    RepositoryResource,
    build_apk,
    build_apkindex,
    write_repository,
)
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    HeldRunner,
    Received,
    Running,
    listen,
    reactor,
    start_server,
    url_of,
)

#: Where the test repository lives on the origin, as on an Alpine mirror.
REPOSITORY = "/alpine/v3.20/main"
ARCH_PATH = f"{REPOSITORY}/x86_64"
INDEX_PATH = f"{ARCH_PATH}/APKINDEX.tar.gz"
MB = 1024 * 1024
#: The origin's Last-Modified for the first version of the repository.
PUBLISHED = float(BUILD_TIME)


def default_packages() -> list[BuiltApk]:
    return [
        build_apk("hello", "1.0-r0"),
        # Big enough for ranges that are not the whole body.
        build_apk("world", "2.0-r0", depends=["hello"], data_size_pad=200_000),
    ]


# -- a raw HTTP/1.1 client: exactly the bytes we choose, one connection ----


@define
class RawResponse:
    status: int
    reason: str
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


class RawConnection(Protocol):
    """
    One TCP connection to the proxy that sends the bytes it is given and
    parses responses one after the other, the way libfetch reads them.
    """

    def __init__(self) -> None:
        self.buffer = b""
        self.closed = False
        self.lost: Deferred[None] = Deferred()
        self._wake: list[Deferred[None]] = []

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        self._notify()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed = True
        self._notify()
        self.lost.callback(None)

    def _notify(self) -> None:
        waiting, self._wake = self._wake, []
        for d in waiting:
            d.callback(None)

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self.closed:
                raise ConnectionError(
                    f"connection closed; unparsed bytes: {self.buffer[:200]!r}"
                )
            d: Deferred[None] = Deferred()
            self._wake.append(d)
            await d

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def _take(self, count: int) -> bytes:
        await self._until(lambda: len(self.buffer) >= count)
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken

    async def _line(self) -> bytes:
        await self._until(lambda: b"\r\n" in self.buffer)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    async def response(self, head: bool = False) -> RawResponse:
        """
        The next response; ``head`` says it answers a HEAD (no body).
        """
        await self._until(lambda: b"\r\n\r\n" in self.buffer)
        raw_head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = raw_head.decode("latin-1").split("\r\n")
        _version, code, reason = (status_line.split(" ", 2) + [""])[:3]
        headers: dict[str, list[str]] = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers.setdefault(name.strip().lower(), []).append(value.strip())
        status = int(code)
        body = b""
        if head or status in (204, 304) or 100 <= status < 200:
            pass
        elif "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
            while True:
                size = int((await self._line()).split(b";")[0], 16)
                if size == 0:
                    await self._line()
                    break
                body += await self._take(size)
                await self._line()
        elif "content-length" in headers:
            body = await self._take(int(headers["content-length"][0]))
        else:
            await self._until(lambda: self.closed)
            body, self.buffer = self.buffer, b""
        return RawResponse(status, reason, headers, body)

    async def request(self, data: bytes, head: bool = False) -> RawResponse:
        self.send(data)
        return await self.response(head=head)

    async def close(self) -> None:
        if not self.closed:
            assert self.transport is not None
            self.transport.loseConnection()
        await self.lost


async def raw_connection(
    testcase: TestCase, port: int, source: str | None = None
) -> RawConnection:
    """
    A raw TCP connection to ``port``, from the loopback address ``source``
    when one is given.
    """
    endpoint = TCP4ClientEndpoint(
        reactor, "127.0.0.1", port,
        bindAddress=None if source is None else (source, 0),
    )
    connection = await connectProtocol(endpoint, RawConnection())

    async def cleanup() -> None:
        if not connection.closed:
            assert connection.transport is not None
            connection.transport.abortConnection()
        await connection.lost

    testcase.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
    return connection


def raw_request(
    method: str, target: str, host: str, headers: Sequence[tuple[str, str]] = (),
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {target} {version}", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# -- the proxy in front of an Alpine-style origin ---------------------------


def port_number(port: IListeningPort) -> int:
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    return address.port


@define
class ProxyHarness:
    """
    A running buildcache whose mirror route ``/up/`` leads to an origin on
    127.0.0.1 serving a test repository under :class:`REPOSITORY`.
    """

    testcase: TestCase
    root: Path
    origin: RepositoryResource
    origin_port: IListeningPort
    #: ``127.0.0.1:<port>`` of the origin (also once it has stopped).
    origin_authority: str
    running: Running
    packages: dict[str, BuiltApk]
    client: Client = field(factory=Client)

    @classmethod
    def start(
        cls,
        testcase: TestCase,
        config_changes: Mapping[str, object] | None = None,
        packages: Sequence[BuiltApk] | None = None,
        run_blocking: BlockingRunner | None = None,
    ) -> ProxyHarness:
        root = Path(testcase.mktemp())
        if packages is None:
            packages = default_packages()
        write_repository(root / REPOSITORY.lstrip("/"), packages, mtime=PUBLISHED)
        origin = RepositoryResource(root)
        origin_port = listen(origin)
        testcase.addCleanup(origin_port.stopListening)
        changes = dict(config_changes or {})
        changes["mirrors"] = (
            *changes.get("mirrors", ()),  # type: ignore[misc]
            Mirror("up", url_of(origin_port).rstrip("/")),
        )
        running = start_server(testcase, changes, run_blocking=run_blocking)
        return cls(
            testcase, root, origin, origin_port, f"127.0.0.1:{port_number(origin_port)}",
            running,
            {apk.filename: apk for apk in packages},
        )

    @property
    def proxy_port(self) -> int:
        return self.running.proxy_port

    def proxied(self, path: str) -> str:
        """The absolute URL a client sends to the forward proxy."""
        return f"http://{self.origin_authority}{path}"

    def mirrored(self, path: str) -> str:
        """The mirror-route URL of the same origin file."""
        return f"http://127.0.0.1:{self.proxy_port}/up{path}"

    async def get(
        self, path: str, headers: Mapping[str, str] | None = None,
        method: bytes = b"GET", proxy: bool = False,
    ) -> Received:
        """
        Fetch an origin path through the mirror route (or the forward
        proxy), then wait until any download it started has ended.
        """
        if proxy:
            received = await Client(proxy_port=self.proxy_port).get(
                self.proxied(path), headers, method
            )
        else:
            received = await self.client.get(self.mirrored(path), headers, method)
        await self.idle()
        return received

    async def idle(self) -> None:
        await self.running.server.fetcher.when_idle()

    def requests_for(self, path: str) -> int:
        return self.origin.request_counts[path]

    def total_requests(self) -> int:
        return sum(self.origin.request_counts.values())

    def stored_keys(self) -> set[str]:
        return {entry.key for entry in self.running.store.keys()}

    def package_path(self, name: str) -> str:
        return f"{ARCH_PATH}/{name}"

    def index_bytes(self) -> bytes:
        return (self.root / INDEX_PATH.lstrip("/")).read_bytes()

    def replace_file(self, path: str, content: bytes, mtime: float) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        os.utime(target, (mtime, mtime))

    async def stop_origin(self) -> None:
        """
        The origin goes away: no listener, and no idle keep-alive
        connection left in the proxy's pool to reach it through.
        """
        stopping = self.origin_port.stopListening()
        if stopping is not None:
            await stopping
        await self.running.server.pool.closeCachedConnections()


def log_events(testcase: TestCase) -> EventLoggingObserver:
    return EventLoggingObserver.createWithCleanup(testcase, globalLogPublisher)


def events_at(
    observer: EventLoggingObserver, level: LogLevel, text: str
) -> list[dict[str, Any]]:
    return [
        dict(event) for event in observer
        if event.get("log_level") == level and text in event.get("log_format", "")
    ]


async def until(condition: Callable[[], bool]) -> None:
    """
    Wait, turn by turn of the reactor, until ``condition`` holds (the
    test's timeout bounds it).
    """
    while not condition():
        await deferLater(reactor, 0.005)


def open_bodies(store_directory: str) -> list[str]:
    """
    The object and temporary files of a store this process holds open.
    """
    held = []
    for descriptor in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{descriptor}")
        except OSError:
            continue
        if target.startswith(
            (os.path.join(store_directory, "objects"), os.path.join(store_directory, "tmp"))
        ):
            held.append(target)
    return held


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _ConnectionCounter(ServerFactory):
    """A listener that must receive nothing: counts connections, answers none."""

    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: object) -> Protocol:
        self.connections += 1
        return Protocol()


def silent_listener(testcase: TestCase, interface: str) -> tuple[_ConnectionCounter, int]:
    factory = _ConnectionCounter()
    port = reactor.listenTCP(0, factory, interface=interface)
    testcase.addCleanup(port.stopListening)
    return factory, port_number(port)


# -- tests -----------------------------------------------------------------


class RouteTests(TestCase):
    """
    Forward proxy and mirror route: MISS, then HIT without the origin.
    """

    timeout = 20

    async def test_forward_proxy_miss_then_hit(self) -> None:
        """
        An absolute-URI request is fetched once; the second is a HIT that
        never reaches the origin, with the same bytes and a Via header.
        """
        harness = ProxyHarness.start(self)
        apk = harness.packages["hello-1.0-r0.apk"]
        path = harness.package_path(apk.filename)
        first = await harness.get(path, proxy=True)
        self.assertEqual((first.status, first.complete), (200, True))
        self.assertEqual(first.header("x-cache"), "MISS")
        self.assertEqual(first.body, apk.content)
        self.assertEqual(first.header("via"), "1.1 buildcache")
        second = await harness.get(path, proxy=True)
        self.assertEqual(second.header("x-cache"), "HIT")
        self.assertEqual(second.body, apk.content)
        self.assertEqual(harness.requests_for(path), 1)
        # The upstream request came from the proxy, marked as such.
        self.assertEqual(harness.origin.requests[0].headers.get("via"), "1.1 buildcache")

    async def test_asked_again_while_it_is_being_stored(self) -> None:
        """
        A second request that arrives after the first one's body has all
        arrived, while it is still on its way into the store (its fsync
        and rename held here), is a HIT: nothing went upstream for it (a
        full test run saw the README's second ``curl`` answered ``MISS``).
        """
        runner = HeldRunner(holding=False)
        harness = ProxyHarness.start(self, run_blocking=runner)
        self.addCleanup(runner.run_all)
        # The index packages are checked against, stored and read first.
        self.assertEqual((await harness.get(INDEX_PATH)).status, 200)
        other = harness.package_path(harness.packages["world-2.0-r0.apk"].filename)
        self.assertEqual((await harness.get(other, proxy=True)).status, 200)
        runner.holding = True
        apk = harness.packages["hello-1.0-r0.apk"]
        path = harness.package_path(apk.filename)
        client = Client(proxy_port=harness.proxy_port)
        first = await client.get(harness.proxied(path))
        self.assertEqual((first.header("x-cache"), first.body), ("MISS", apk.content))
        key = f"http://{harness.origin_authority}{path}"
        self.assertIsNone(harness.running.store.peek(key))
        second = await client.get(harness.proxied(path))
        self.assertEqual((second.header("x-cache"), second.body), ("HIT", apk.content))
        self.assertEqual(harness.requests_for(path), 1)
        runner.holding = False
        runner.run_all()
        await harness.idle()
        self.assertIsNotNone(harness.running.store.peek(key))
        third = await client.get(harness.proxied(path))
        self.assertEqual((third.header("x-cache"), third.body), ("HIT", apk.content))
        self.assertEqual(harness.requests_for(path), 1)
        self.assertEqual(harness.running.server.activity.totals["proxy"].by_status["HIT"], 2)

    async def test_mirror_miss_then_hit(self) -> None:
        """
        An origin-form request under a mirror route is fetched from the
        mirror's upstream once, then served from the cache.
        """
        harness = ProxyHarness.start(self)
        first = await harness.get(INDEX_PATH)
        self.assertEqual((first.status, first.header("x-cache")), (200, "MISS"))
        self.assertEqual(first.body, harness.index_bytes())
        second = await harness.get(INDEX_PATH)
        self.assertEqual((second.status, second.header("x-cache")), (200, "HIT"))
        self.assertEqual(second.body, harness.index_bytes())
        self.assertEqual(harness.requests_for(INDEX_PATH), 1)
        # Never re-encoded: the archive arrives as the origin stores it.
        self.assertIsNone(second.header("content-encoding"))

    async def test_proxy_and_mirror_share_one_entry(self) -> None:
        """
        The mirror URL and the proxied URL of one origin file are one cache
        entry, whichever route fetched it first.
        """
        harness = ProxyHarness.start(self)
        index = await harness.get(INDEX_PATH)
        proxied_index = await harness.get(INDEX_PATH, proxy=True)
        self.assertEqual(proxied_index.header("x-cache"), "HIT")
        self.assertEqual(proxied_index.body, index.body)
        apk = harness.packages["world-2.0-r0.apk"]
        path = harness.package_path(apk.filename)
        await harness.get(path, proxy=True)
        mirrored = await harness.get(path)
        self.assertEqual(mirrored.header("x-cache"), "HIT")
        self.assertEqual(mirrored.sha256, sha256(apk.content))
        self.assertEqual(harness.total_requests(), 2)
        self.assertEqual(len(harness.stored_keys()), 2)

    async def test_absolute_uri_naming_the_proxy(self) -> None:
        """
        A client whose HTTP_PROXY points here and whose repository URL is
        already a mirror route on this port sends the mirror URL in
        absolute form: it is served as the mirror route (one entry with
        the origin-form request), not refused as a loopback target.
        """
        harness = ProxyHarness.start(self)
        proxy = Client(proxy_port=harness.proxy_port)
        for host in ("127.0.0.1", "localhost"):
            url = f"http://{host}:{harness.proxy_port}/up{INDEX_PATH}"
            received = await proxy.get(url)
            await harness.idle()
            self.assertEqual((received.status, received.body), (200, harness.index_bytes()))
        self.assertEqual(received.header("x-cache"), "HIT")
        self.assertEqual((await harness.get(INDEX_PATH)).header("x-cache"), "HIT")
        self.assertEqual(harness.requests_for(INDEX_PATH), 1)
        traversal = await proxy.get(
            f"http://127.0.0.1:{harness.proxy_port}/up/alpine/%2e%2e/x"
        )
        self.assertEqual(traversal.status, 400)

    async def test_unknown_mirror_route(self) -> None:
        """
        An origin-form path under no mirror route is a 404 naming the
        routes there are.
        """
        harness = ProxyHarness.start(self)
        received = await harness.client.get(
            f"http://127.0.0.1:{harness.proxy_port}/nowhere{INDEX_PATH}"
        )
        self.assertEqual(received.status, 404)
        self.assertIn(b"/up/", received.body)
        self.assertEqual(harness.total_requests(), 0)


class IndexFreshnessTests(TestCase):
    """
    APKINDEX revalidation: TTL, client no-cache, and stale on failure.
    """

    timeout = 20

    async def test_fresh_index_is_a_hit(self) -> None:
        """
        Within --index-ttl the stored index is served without asking the
        origin, and clients are told to come back after the TTL.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 3600})
        await harness.get(INDEX_PATH)
        second = await harness.get(INDEX_PATH)
        self.assertEqual(second.header("x-cache"), "HIT")
        self.assertEqual(second.header("cache-control"), "max-age=3600")
        self.assertEqual(harness.requests_for(INDEX_PATH), 1)

    async def test_expired_index_is_revalidated(self) -> None:
        """
        After --index-ttl the proxy asks the origin with the stored
        validators; a 304 gives REVALIDATED and the stored bytes, with a
        200 to a client that sent no conditional of its own.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        first = await harness.get(INDEX_PATH)
        second = await harness.get(INDEX_PATH)
        self.assertEqual((second.status, second.header("x-cache")), (200, "REVALIDATED"))
        self.assertEqual(second.body, harness.index_bytes())
        self.assertEqual(harness.requests_for(INDEX_PATH), 2)
        conditional = harness.origin.requests[-1].headers
        self.assertEqual(conditional.get("if-none-match"), first.header("etag"))
        self.assertEqual(
            conditional.get("if-modified-since"), first.header("last-modified")
        )
        # The first request was unconditional.
        self.assertNotIn("if-none-match", harness.origin.requests[0].headers)
        self.assertNotIn("if-modified-since", harness.origin.requests[0].headers)

    async def test_client_no_cache_forces_revalidation(self) -> None:
        """
        ``Cache-Control: no-cache`` (apk update) revalidates a fresh index.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 3600})
        first = await harness.get(INDEX_PATH)
        second = await harness.get(INDEX_PATH, {"cache-control": "no-cache"})
        self.assertEqual((second.status, second.header("x-cache")), (200, "REVALIDATED"))
        self.assertEqual(second.body, first.body)
        self.assertEqual(harness.requests_for(INDEX_PATH), 2)
        self.assertEqual(
            harness.origin.requests[-1].headers.get("if-none-match"), first.header("etag")
        )
        # The client's no-cache is not a reason to refetch the whole index.
        third = await harness.get(INDEX_PATH)
        self.assertEqual(third.header("x-cache"), "HIT")
        self.assertEqual(harness.requests_for(INDEX_PATH), 2)

    async def test_changed_index_replaces_the_stored_one(self) -> None:
        """
        When the origin has a new index, revalidation serves and stores it.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        await harness.get(INDEX_PATH)
        new_packages = [*default_packages(), build_apk("extra", "3.0-r0")]
        write_repository(
            harness.root / REPOSITORY.lstrip("/"), new_packages, mtime=PUBLISHED + 100
        )
        second = await harness.get(INDEX_PATH)
        self.assertEqual((second.status, second.header("x-cache")), (200, "MISS"))
        self.assertEqual(second.body, harness.index_bytes())
        third = await harness.get(INDEX_PATH)
        self.assertEqual(third.header("x-cache"), "REVALIDATED")
        self.assertEqual(third.body, harness.index_bytes())

    async def test_origin_error_serves_stale(self) -> None:
        """
        A 503 from the origin during revalidation serves the stored index
        as STALE and logs a warning.
        """
        events = log_events(self)
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        first = await harness.get(INDEX_PATH)
        harness.origin.set_status(INDEX_PATH, 503)
        stale = await harness.get(INDEX_PATH)
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        # Not fresh for a whole TTL downstream: ask again soon.
        self.assertEqual(stale.header("cache-control"), "max-age=0")
        self.assertEqual(stale.body, first.body)
        self.assertEqual(harness.requests_for(INDEX_PATH), 2)
        warnings = events_at(events, LogLevel.warn, "Serving stale")
        self.assertEqual(len(warnings), 1)
        self.assertIn("503", warnings[0]["why"])
        self.assertIn("APKINDEX.tar.gz", warnings[0]["key"])
        # The 503 did not replace the stored copy; the origin failed
        # moments ago, so the engine's backoff serves it stale at once,
        # without asking again (tests/test_engine.py BackoffTests).
        harness.origin.set_status(INDEX_PATH, None)
        again = await harness.get(INDEX_PATH)
        self.assertEqual((again.header("x-cache"), again.body), ("STALE", first.body))
        self.assertEqual(harness.requests_for(INDEX_PATH), 2)

    async def test_captive_portal_index_serves_stale(self) -> None:
        """
        A revalidation answered 200 with a login page (a captive portal)
        is refused by the index check: the stored index is served STALE
        and stays stored; with nothing stored, the client gets a 502
        (before: the page was stored as the index and served as a HIT).
        """
        portal = b"<html><body>Log in to the guest network</body></html>"
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        first = await harness.get(INDEX_PATH)
        good = harness.index_bytes()
        harness.replace_file(INDEX_PATH, portal, time.time() + 60)
        stale = await harness.get(INDEX_PATH)
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        self.assertEqual(stale.body, first.body)
        self.assertEqual(first.body, good)
        other = "/v3.20/other/x86_64/APKINDEX.tar.gz"
        harness.replace_file(other, portal, time.time())
        refused = await harness.get(other)
        self.assertEqual(refused.status, 502)
        self.assertEqual(
            harness.stored_keys(), {f"http://{harness.origin_authority}{INDEX_PATH}"}
        )

    async def test_origin_down_serves_stale(self) -> None:
        """
        With the origin unreachable (connection refused) the stored index
        is served as STALE, with a warning.
        """
        events = log_events(self)
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        first = await harness.get(INDEX_PATH)
        await harness.stop_origin()
        stale = await harness.get(INDEX_PATH)
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        self.assertEqual(stale.body, first.body)
        self.assertEqual(len(events_at(events, LogLevel.warn, "Serving stale")), 1)
        # Immutable packages are served from the cache without asking.
        self.assertEqual(harness.total_requests(), 1)

    async def test_origin_down_without_copy_is_an_error(self) -> None:
        """
        Nothing stored and no origin: a 502, never an empty 200.
        """
        harness = ProxyHarness.start(self)
        await harness.stop_origin()
        received = await harness.get(INDEX_PATH)
        self.assertEqual(received.status, 502)
        self.assertEqual(harness.stored_keys(), set())


class ConditionalTests(TestCase):
    """
    Client conditionals answered from the cache.
    """

    timeout = 20

    async def test_if_modified_since_download_time(self) -> None:
        """
        apk sends its own download time: 304 when the stored copy has not
        changed since then, a full 200 when it is older than the copy.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 3600})
        await harness.get(INDEX_PATH)
        downloaded = format_http_date(time.time())
        not_modified = await harness.get(INDEX_PATH, {"if-modified-since": downloaded})
        self.assertEqual(not_modified.status, 304)
        self.assertEqual(not_modified.body, b"")
        before = format_http_date(PUBLISHED - 60)
        modified = await harness.get(INDEX_PATH, {"if-modified-since": before})
        self.assertEqual(modified.status, 200)
        self.assertEqual(modified.body, harness.index_bytes())
        self.assertEqual(harness.requests_for(INDEX_PATH), 1)

    async def test_if_none_match(self) -> None:
        """
        The stored ETag answers If-None-Match with 304; another tag gets
        the body.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 3600})
        first = await harness.get(INDEX_PATH)
        etag = first.header("etag")
        assert etag is not None
        matching = await harness.get(INDEX_PATH, {"if-none-match": etag})
        self.assertEqual(matching.status, 304)
        other = await harness.get(INDEX_PATH, {"if-none-match": '"other"'})
        self.assertEqual((other.status, other.body), (200, first.body))

    async def test_if_modified_since_after_revalidation(self) -> None:
        """
        A client conditional on an index the proxy revalidates (sending the
        Last-Modified of its copy, as apt does): 304 when the origin still
        has that copy; 200 with the new index once the origin changed it.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        await harness.get(INDEX_PATH)
        client_copy = format_http_date(PUBLISHED)
        unchanged = await harness.get(INDEX_PATH, {"if-modified-since": client_copy})
        self.assertEqual(
            (unchanged.status, unchanged.header("x-cache")), (304, "REVALIDATED")
        )
        write_repository(
            harness.root / REPOSITORY.lstrip("/"),
            [*default_packages(), build_apk("extra", "3.0-r0")],
            mtime=PUBLISHED + 100,
        )
        changed = await harness.get(INDEX_PATH, {"if-modified-since": client_copy})
        self.assertEqual(changed.status, 200)
        self.assertEqual(changed.body, harness.index_bytes())

    async def test_no_304_without_a_conditional(self) -> None:
        """
        However the stored copy was validated, a request without a
        conditional header gets the body: apk without a copy cannot use a
        304.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        await harness.get(INDEX_PATH)
        for headers in ({}, {"cache-control": "no-cache"}):
            received = await harness.get(INDEX_PATH, headers)
            self.assertEqual(received.status, 200)
            self.assertEqual(received.body, harness.index_bytes())
        # The upstream did answer 304 to the proxy's own conditionals.
        self.assertEqual(harness.requests_for(INDEX_PATH), 3)


class RangeAndHeadTests(TestCase):
    """
    Byte ranges and HEAD, on hits and on misses.
    """

    timeout = 20

    def setUp(self) -> None:
        self.harness = ProxyHarness.start(self)
        self.apk = self.harness.packages["world-2.0-r0.apk"]
        self.path = self.harness.package_path(self.apk.filename)

    async def test_range_on_a_miss(self) -> None:
        """
        A ranged request for an uncached file gets its 206 slice while the
        whole file is fetched once and stored.
        """
        received = await self.harness.get(self.path, {"range": "bytes=1000-1999"})
        self.assertEqual(received.status, 206)
        self.assertEqual(
            received.header("content-range"), f"bytes 1000-1999/{self.apk.size}"
        )
        self.assertEqual(received.body, self.apk.content[1000:2000])
        # The origin was asked for the whole file, not the range.
        self.assertNotIn("range", self.harness.origin.requests[-1].headers)
        whole = await self.harness.get(self.path)
        self.assertEqual((whole.header("x-cache"), whole.body), ("HIT", self.apk.content))
        self.assertEqual(self.harness.requests_for(self.path), 1)

    async def test_ranges_on_a_hit(self) -> None:
        """
        Ranges of a stored file: a middle slice, an open-ended one, a
        suffix, one running past the end, and 416 beyond the end; each with
        the exact Content-Length, all on one connection.
        """
        size = self.apk.size
        await self.harness.get(self.path)
        connection = await raw_connection(self, self.harness.proxy_port)
        host = f"127.0.0.1:{self.harness.proxy_port}"
        cases = [
            ("bytes=10-19", 10, 19),
            (f"bytes={size - 5}-", size - 5, size - 1),
            ("bytes=-100", size - 100, size - 1),
            (f"bytes=100-{size + 1000}", 100, size - 1),
        ]
        for header, start, end in cases:
            received = await connection.request(
                raw_request("GET", f"/up{self.path}", host, [("Range", header)])
            )
            self.assertEqual(received.status, 206, header)
            self.assertEqual(received.header("x-cache"), "HIT")
            self.assertEqual(
                received.header("content-range"), f"bytes {start}-{end}/{size}", header
            )
            self.assertEqual(received.header("content-length"), str(end - start + 1))
            self.assertEqual(received.body, self.apk.content[start : end + 1], header)
        beyond = await connection.request(
            raw_request("GET", f"/up{self.path}", host, [("Range", f"bytes={size}-")])
        )
        self.assertEqual(beyond.status, 416)
        self.assertEqual(beyond.header("content-range"), f"bytes */{size}")
        self.assertEqual((beyond.header("content-length"), beyond.body), ("0", b""))
        await connection.close()
        self.assertEqual(self.harness.requests_for(self.path), 1)

    async def test_range_with_stale_if_range(self) -> None:
        """
        An If-Range naming another version gets the whole file, not a
        slice of this one.
        """
        first = await self.harness.get(self.path)
        self.assertEqual(first.header("accept-ranges"), "bytes")
        received = await self.harness.get(
            self.path, {"range": "bytes=0-9", "if-range": '"another-version"'}
        )
        self.assertEqual((received.status, received.body), (200, self.apk.content))
        etag = first.header("etag")
        assert etag is not None
        matching = await self.harness.get(
            self.path, {"range": "bytes=0-9", "if-range": etag}
        )
        self.assertEqual((matching.status, matching.body), (206, self.apk.content[:10]))

    async def test_head_to_an_upstream_without_head(self) -> None:
        """
        An upstream that answers 405 to a HEAD is asked with a GET: the
        client's HEAD gets the file's length, and the file is stored, so
        the next HEAD is a HIT (before: the 405 was passed on).
        """
        body = b"package bytes\n" * 100

        class NoHead(Resource):
            isLeaf = True
            methods: list[bytes] = []

            def render_HEAD(self, request: Request) -> bytes:
                self.methods.append(b"HEAD")
                request.setResponseCode(405)
                return b""

            def render_GET(self, request: Request) -> bytes:
                self.methods.append(b"GET")
                return body

        origin = NoHead()
        running = start_server(self, {}, upstream=origin)
        url = f"http://127.0.0.1:{running.proxy_port}/up/pool/a_1_amd64.deb"
        first = await Client().get(url, method=b"HEAD")
        self.assertEqual(
            (first.status, first.header("x-cache"), first.header("content-length"), first.body),
            (200, "MISS", str(len(body)), b""),
        )
        await running.server.fetcher.when_idle()
        second = await Client().get(url, method=b"HEAD")
        self.assertEqual((second.status, second.header("x-cache")), (200, "HIT"))
        self.assertEqual(origin.methods, [b"HEAD", b"GET"])

    async def test_head_on_miss_and_hit(self) -> None:
        """
        HEAD carries the file's Content-Length and no body, on a miss (the
        upstream's answer to a HEAD: nothing is fetched or stored) and on a
        hit; the connection stays usable, so no stray body bytes were sent.
        """
        connection = await raw_connection(self, self.harness.proxy_port)
        host = f"127.0.0.1:{self.harness.proxy_port}"
        target = f"/up{self.path}"
        for _ in range(2):
            miss = await connection.request(raw_request("HEAD", target, host), head=True)
            self.assertEqual((miss.status, miss.header("x-cache")), (200, "MISS"))
            self.assertEqual(miss.header("content-length"), str(self.apk.size))
            await self.harness.idle()
            self.assertEqual(self.harness.stored_keys(), set())
        fetched = await connection.request(raw_request("GET", target, host))
        self.assertEqual((fetched.status, fetched.header("x-cache")), (200, "MISS"))
        await self.harness.idle()
        hit = await connection.request(raw_request("HEAD", target, host), head=True)
        self.assertEqual((hit.status, hit.header("x-cache")), (200, "HIT"))
        self.assertEqual(hit.header("content-length"), str(self.apk.size))
        self.assertEqual(hit.header("accept-ranges"), "bytes")
        whole = await connection.request(raw_request("GET", target, host))
        self.assertEqual((whole.status, whole.header("x-cache")), (200, "HIT"))
        self.assertEqual(whole.body, self.apk.content)
        self.assertEqual(connection.buffer, b"")
        await connection.close()
        # Two HEADs and one GET.
        self.assertEqual(self.harness.requests_for(self.path), 3)


class ConnectionTests(TestCase):
    """
    Persistent connections and methods.
    """

    timeout = 20

    async def test_keep_alive_for_http11(self) -> None:
        """
        An HTTP/1.1 client (libfetch sends no Connection header) is told
        ``Connection: keep-alive``, and its next requests on the same TCP
        connection are answered, through the proxy and the mirror route.
        """
        harness = ProxyHarness.start(self)
        connection = await raw_connection(self, harness.proxy_port)
        origin = harness.origin_authority
        apk = harness.packages["hello-1.0-r0.apk"]
        requests = [
            (raw_request("GET", harness.proxied(INDEX_PATH), origin), "MISS"),
            (raw_request("GET", harness.proxied(harness.package_path(apk.filename)), origin), "MISS"),
            (raw_request("GET", f"/up{INDEX_PATH}", f"127.0.0.1:{harness.proxy_port}"), "HIT"),
        ]
        for data, cache in requests:
            response = await connection.request(data)
            await harness.idle()
            self.assertEqual(response.status, 200)
            self.assertEqual(response.header("x-cache"), cache)
            self.assertEqual(response.header("connection"), "keep-alive")
        self.assertFalse(connection.closed)
        await connection.close()

    async def test_connection_close_is_honoured(self) -> None:
        """
        A client that asks to close, or speaks HTTP/1.0, is not promised a
        persistent connection, and the proxy closes it after the response.
        """
        harness = ProxyHarness.start(self)
        origin = harness.origin_authority
        for data in (
            raw_request("GET", harness.proxied(INDEX_PATH), origin, [("Connection", "close")]),
            raw_request("GET", harness.proxied(INDEX_PATH), origin, version="HTTP/1.0"),
        ):
            connection = await raw_connection(self, harness.proxy_port)
            response = await connection.request(data)
            self.assertEqual(response.status, 200)
            self.assertEqual(response.body, harness.index_bytes())
            self.assertNotEqual(response.header("connection"), "keep-alive")
            await connection.lost

    async def test_other_methods_are_refused(self) -> None:
        """
        POST, PUT and DELETE get 405 with ``Allow: GET, HEAD``, on both
        routes, and never reach the origin.
        """
        harness = ProxyHarness.start(self)
        for method in ("POST", "PUT", "DELETE"):
            for target, host in (
                (harness.proxied(INDEX_PATH), harness.origin_authority),
                (f"/up{INDEX_PATH}", f"127.0.0.1:{harness.proxy_port}"),
            ):
                connection = await raw_connection(self, harness.proxy_port)
                response = await connection.request(
                    raw_request(method, target, host, [("Content-Length", "0")])
                )
                self.assertEqual(response.status, 405, (method, target))
                self.assertEqual(response.header("allow"), "GET, HEAD")
                self.assertIn(method.encode(), response.body)
                await connection.close()
        self.assertEqual(harness.total_requests(), 0)

    async def test_connect_to_other_port_refused(self) -> None:
        """
        Through the service's own port, CONNECT to a port other than 443
        is refused with 403 and the target receives nothing.
        """
        harness = ProxyHarness.start(self)
        target, port = silent_listener(self, "127.0.0.1")
        connection = await raw_connection(self, harness.proxy_port)
        response = await connection.request(
            f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        )
        self.assertEqual(response.status, 403)
        self.assertIn(b"443", response.body)
        await connection.lost
        self.assertEqual(target.connections, 0)


class AccessTests(TestCase):
    """
    Not an open proxy: every refusal rule, with listeners that must
    receive nothing.
    """

    timeout = 20

    async def test_client_not_in_allow_from(self) -> None:
        """
        A client outside --allow-from gets 403 on every route, and the
        origin is never asked.
        """
        events = log_events(self)
        harness = ProxyHarness.start(self, {"allow_from": ("10.0.0.0/8",)})
        proxied = await harness.get(INDEX_PATH, proxy=True)
        mirrored = await harness.get(INDEX_PATH)
        self.assertEqual((proxied.status, mirrored.status), (403, 403))
        self.assertIn(b"127.0.0.1", proxied.body)
        self.assertEqual(harness.total_requests(), 0)
        self.assertEqual(len(events_at(events, LogLevel.warn, "Refused client")), 2)

    async def test_loopback_target_not_configured(self) -> None:
        """
        Absolute URIs naming loopback addresses that are not configured
        upstreams (another address, another port, a name resolving to
        loopback) are refused with 403, and nothing connects to them;
        the configured mirror upstream on 127.0.0.1 stays reachable.
        """
        harness = ProxyHarness.start(self)
        other_address, port_2 = silent_listener(self, "127.0.0.2")
        other_port, port_1 = silent_listener(self, "127.0.0.1")
        proxy = Client(proxy_port=harness.proxy_port)
        for url in (
            f"http://127.0.0.2:{port_2}{INDEX_PATH}",
            f"http://127.0.0.1:{port_1}{INDEX_PATH}",
            f"http://localhost:{port_1}{INDEX_PATH}",
        ):
            received = await proxy.get(url)
            self.assertEqual(received.status, 403, url)
            self.assertEqual(received.header("x-cache"), None)
        self.assertEqual((other_address.connections, other_port.connections), (0, 0))
        allowed = await harness.get(INDEX_PATH, proxy=True)
        self.assertEqual(allowed.status, 200)
        self.assertEqual(harness.stored_keys(), {f"http://{harness.origin_authority}{INDEX_PATH}"})

    async def test_allow_upstream_lifts_the_refusal(self) -> None:
        """
        Listing 127.0.0.2 in --allow-upstream lets the proxy fetch from
        it, and only from it: any other host is now refused by name.
        """
        harness = ProxyHarness.start(self, {"allow_upstream": ("127.0.0.2",)})
        upstream = FakeUpstream()
        upstream.bodies["/file.txt"] = GatedBody(
            b"from 127.0.0.2\n", headers={"cache-control": "max-age=3600"}
        )
        port = listen(upstream, interface="127.0.0.2")
        self.addCleanup(port.stopListening)
        url = url_of(port, "/file.txt")
        proxy = Client(proxy_port=harness.proxy_port)
        first = await proxy.get(url)
        self.assertEqual((first.status, first.body), (200, b"from 127.0.0.2\n"))
        await harness.idle()
        self.assertEqual((await proxy.get(url)).header("x-cache"), "HIT")
        self.assertEqual(upstream.requests["/file.txt"], 1)
        # Not on the list: refused before any name lookup.
        refused = await proxy.get(f"http://elsewhere.invalid{INDEX_PATH}")
        self.assertEqual(refused.status, 403)
        self.assertIn(b"--allow-upstream", refused.body)
        # The configured mirror upstream is still allowed.
        self.assertEqual((await harness.get(INDEX_PATH, proxy=True)).status, 200)

    async def test_bad_absolute_uris(self) -> None:
        """
        https:// and other schemes, and user information in the URL, are
        400s that reach no origin.
        """
        harness = ProxyHarness.start(self)
        origin = harness.origin_authority
        for target in (
            f"https://{origin}{INDEX_PATH}",
            f"ftp://{origin}{INDEX_PATH}",
            f"http://user:secret@{origin}{INDEX_PATH}",
            f"http://user@{origin}{INDEX_PATH}",
        ):
            connection = await raw_connection(self, harness.proxy_port)
            response = await connection.request(raw_request("GET", target, origin))
            self.assertEqual(response.status, 400, target)
            await connection.close()
        self.assertEqual(harness.total_requests(), 0)

    async def test_mirror_path_traversal(self) -> None:
        """
        A mirror path that could leave the mirror's base, however it is
        spelled, is a 400 and the origin receives nothing.
        """
        harness = ProxyHarness.start(self)
        host = f"127.0.0.1:{harness.proxy_port}"
        for target in (
            "/up/../secret",
            "/up/alpine/../../secret",
            "/up/alpine/%2e%2e/secret",
            "/up/alpine/%2E%2E/%2e%2e/secret",
            "/up/alpine%2f..%2fsecret",
            "/up/alpine/./v3.20",
            "/up/alpine\\..\\secret",
            "/up/alpine%5c..%5csecret",
            "/up/alpine/%00/secret",
            "/up/..?x=1",
        ):
            connection = await raw_connection(self, harness.proxy_port)
            response = await connection.request(raw_request("GET", target, host))
            self.assertEqual(response.status, 400, target)
            await connection.close()
        self.assertEqual(harness.total_requests(), 0)
        self.assertEqual(harness.stored_keys(), set())


class PackageCheckTests(TestCase):
    """
    Packages checked against the stored APKINDEX entry.
    """

    timeout = 20

    async def test_matching_package_is_stored(self) -> None:
        """
        A package that matches its index entry is served and stored.
        """
        events = log_events(self)
        harness = ProxyHarness.start(self)
        await harness.get(INDEX_PATH)
        for apk in harness.packages.values():
            path = harness.package_path(apk.filename)
            first = await harness.get(path)
            self.assertEqual((first.status, first.header("x-cache")), (200, "MISS"))
            self.assertEqual(first.body, apk.content)
            second = await harness.get(path)
            self.assertEqual(second.header("x-cache"), "HIT")
            self.assertEqual(harness.requests_for(path), 1)
        self.assertEqual(harness.requests_for(INDEX_PATH), 1)
        self.assertEqual(events_at(events, LogLevel.error, ""), [])

    async def _refused(self, harness: ProxyHarness, apk: BuiltApk, served: bytes) -> None:
        events = log_events(self)
        path = harness.package_path(apk.filename)
        harness.replace_file(path, served, PUBLISHED)
        received = await harness.get(path)
        self.assertEqual(received.status, 502)
        self.assertIn(b"index", received.body)
        self.assertNotIn(f"{harness.origin_authority}{path}", harness.stored_keys())
        # The index was asked once more (it might have been newer than the
        # package), then the package was refused.
        self.assertEqual(harness.requests_for(INDEX_PATH), 2)
        index_requests = [r for r in harness.origin.requests if r.path == INDEX_PATH]
        self.assertIn("if-none-match", index_requests[-1].headers)
        self.assertEqual(harness.requests_for(path), 1)
        refusals = events_at(events, LogLevel.error, "does not match its index entry")
        self.assertEqual(len(refusals), 1)
        self.assertIn(apk.filename, refusals[0]["url"])
        # Still bad the next time: refused again, never served from disk.
        again = await harness.get(path)
        self.assertEqual(again.status, 502)

    async def test_tampered_package_same_size_is_refused(self) -> None:
        """
        Different bytes of the right size (one byte changed in the control
        stream) fail the ``C:`` check: 502, nothing stored, an error event.
        """
        harness = ProxyHarness.start(self)
        await harness.get(INDEX_PATH)
        apk = harness.packages["hello-1.0-r0.apk"]
        tampered = bytearray(apk.content)
        position = apk.signature_length + apk.control_length // 2
        tampered[position] ^= 0xFF
        self.assertEqual(len(tampered), apk.size)
        await self._refused(harness, apk, bytes(tampered))

    async def test_tampered_data_stream_is_refused(self) -> None:
        """
        A changed data stream (control intact) fails the datahash check.
        """
        harness = ProxyHarness.start(self)
        await harness.get(INDEX_PATH)
        apk = harness.packages["world-2.0-r0.apk"]
        tampered = bytearray(apk.content)
        tampered[-100] ^= 0x01
        await self._refused(harness, apk, bytes(tampered))

    async def test_large_package_streams_before_its_check(self) -> None:
        """
        A package above STREAM_CHECKED_ABOVE reaches its clients while the
        origin is still sending it (all but its last bytes), and is stored
        once it matches.
        """
        big = build_apk("big", "1.0-r0", data_size_pad=STREAM_CHECKED_ABOVE + MB)
        harness = ProxyHarness.start(self, packages=[*default_packages(), big])
        await harness.get(INDEX_PATH)
        path = harness.package_path(big.filename)
        harness.origin.hold(path)
        first: Deferred[None] = Deferred()
        result = Deferred.fromCoroutine(
            harness.client.get(harness.mirrored(path), first_bytes=first)
        )
        await first  # the origin is holding the second half
        harness.origin.release(path)
        received = await result
        await harness.idle()
        self.assertEqual((received.status, received.complete), (200, True))
        self.assertEqual(received.body, big.content)
        self.assertIn(f"http://{harness.origin_authority}{path}", harness.stored_keys())

    async def test_large_tampered_package_never_completes(self) -> None:
        """
        A large package that fails its check was streamed but its last
        bytes are withheld: the response ends incomplete, nothing is
        stored, an error event is logged.
        """
        events = log_events(self)
        big = build_apk("big", "1.0-r0", data_size_pad=STREAM_CHECKED_ABOVE + MB)
        harness = ProxyHarness.start(self, packages=[*default_packages(), big])
        await harness.get(INDEX_PATH)
        path = harness.package_path(big.filename)
        tampered = bytearray(big.content)
        tampered[-100] ^= 0x01
        harness.replace_file(path, bytes(tampered), PUBLISHED)
        received = await harness.get(path)
        self.assertEqual(received.status, 200)
        self.assertFalse(received.complete)
        self.assertLessEqual(len(received.body), big.size - WITHHELD_TAIL)
        self.assertNotIn(f"{harness.origin_authority}{path}", harness.stored_keys())
        self.assertEqual(
            len(events_at(events, LogLevel.error, "fails its check")), 1
        )

    async def test_package_asked_while_its_index_is_being_stored(self) -> None:
        """
        apk asks for packages the moment its index has arrived, which may
        be before the index is in the store: the package waits for it and
        is checked against it (a tampered one is refused, not served
        unchecked).
        """
        runner = HeldRunner()
        harness = ProxyHarness.start(self, run_blocking=runner)
        self.addCleanup(runner.run_all)
        apk = harness.packages["world-2.0-r0.apk"]
        path = harness.package_path(apk.filename)
        tampered = bytearray(apk.content)
        tampered[-100] ^= 0x01
        harness.replace_file(path, bytes(tampered), PUBLISHED)
        index = await harness.client.get(harness.mirrored(INDEX_PATH))
        self.assertEqual(index.status, 200)
        index_key = f"http://{harness.origin_authority}{INDEX_PATH}"
        self.assertIsNone(harness.running.store.peek(index_key))
        asked: list[str] = []
        real_stored = Fetcher.stored

        def stored_then_let_it_finish(fetcher: Fetcher, key: str) -> Deferred[None]:
            asked.append(key)
            waiting = real_stored(fetcher, key)
            reactor.callLater(0, runner.run_all)
            return waiting

        self.patch(Fetcher, "stored", stored_then_let_it_finish)
        received = await harness.get(path)
        self.assertEqual(asked, [index_key])
        self.assertEqual(received.status, 502)
        self.assertNotIn(f"{harness.origin_authority}{path}", harness.stored_keys())
        self.assertIn(index_key, harness.stored_keys())

    async def test_wrong_size_is_refused(self) -> None:
        """
        A package longer than its ``S:`` size is refused.
        """
        harness = ProxyHarness.start(self)
        await harness.get(INDEX_PATH)
        apk = harness.packages["hello-1.0-r0.apk"]
        await self._refused(harness, apk, apk.content + b"\0" * 512)

    async def test_truncated_package_is_refused(self) -> None:
        """
        A package shorter than its ``S:`` size is refused.
        """
        harness = ProxyHarness.start(self)
        await harness.get(INDEX_PATH)
        apk = harness.packages["world-2.0-r0.apk"]
        await self._refused(harness, apk, apk.content[: apk.size - 1000])

    async def test_client_leaving_during_the_check(self) -> None:
        """
        A client that disconnects while its package is held for checking
        costs nothing: no error, no descriptor left open, and the checked
        package is stored for the next client.
        """
        events = log_events(self)
        harness = ProxyHarness.start(self)
        await harness.get(INDEX_PATH)
        apk = harness.packages["world-2.0-r0.apk"]
        path = harness.package_path(apk.filename)
        harness.origin.hold(path)
        connection = await raw_connection(self, harness.proxy_port)
        connection.send(raw_request("GET", f"/up{path}", f"127.0.0.1:{harness.proxy_port}"))
        await until(lambda: harness.requests_for(path) == 1)
        self.assertEqual(connection.buffer, b"")
        assert connection.transport is not None
        connection.transport.abortConnection()  # type: ignore[attr-defined]
        await connection.lost
        # The proxy has seen the client go (its request is accounted for)
        # before the body completes.
        totals = harness.running.server.activity.totals["mirror"]
        await until(lambda: totals.requests == 2)
        harness.origin.release(path)
        await until(lambda: harness.running.server.fetcher.in_flight() == 0)
        await harness.idle()
        self.assertEqual(open_bodies(harness.running.store.directory), [])
        self.assertEqual(
            [e for e in events if e["log_level"] in (LogLevel.error, LogLevel.critical)], []
        )
        hit = await harness.get(path)
        self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", apk.content))

    async def test_package_newer_than_stored_index(self) -> None:
        """
        The origin rebuilt a package and published its new index after the
        proxy stored the old one: the mismatch makes the proxy revalidate
        the index, and the package matches the new entry, so it is served
        and stored (and so is the new index).
        """
        harness = ProxyHarness.start(self, {"index_ttl": 3600})
        await harness.get(INDEX_PATH)
        rebuilt = build_apk(
            "hello", "1.0-r0", data_files={"usr/share/hello/README": b"rebuilt\n"}
        )
        packages = [rebuilt, harness.packages["world-2.0-r0.apk"]]
        write_repository(
            harness.root / REPOSITORY.lstrip("/"), packages, mtime=PUBLISHED + 100
        )
        path = harness.package_path(rebuilt.filename)
        received = await harness.get(path)
        self.assertEqual((received.status, received.body), (200, rebuilt.content))
        self.assertEqual(harness.requests_for(INDEX_PATH), 2)
        self.assertEqual(harness.requests_for(path), 2)
        hit = await harness.get(path)
        self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", rebuilt.content))
        index = await harness.get(INDEX_PATH)
        self.assertEqual((index.header("x-cache"), index.body), ("HIT", harness.index_bytes()))
        self.assertEqual(harness.requests_for(INDEX_PATH), 2)

    async def test_package_not_in_index_is_served(self) -> None:
        """
        A package no stored index lists (newer than the index, or its index
        never fetched through the proxy) is served, not refused: there is
        nothing to check it against.  Nor is it stored: an immutable file
        nothing checked (an error page sent as 200) would be served for good.
        """
        events = log_events(self)
        harness = ProxyHarness.start(self)
        newer = build_apk("newer", "1.0-r0")
        path = harness.package_path(newer.filename)
        harness.replace_file(path, newer.content, PUBLISHED)
        for with_index in (False, True):
            if with_index:
                await harness.get(INDEX_PATH)
            received = await harness.get(path)
            self.assertEqual((received.status, received.body), (200, newer.content))
            self.assertNotIn(f"{harness.origin_authority}{path}", harness.stored_keys())
        self.assertEqual(harness.requests_for(path), 2)
        self.assertEqual(
            len(events_at(events, LogLevel.info, "without storing it")), 2
        )


class AptAndHTTPFreshnessTests(TestCase):
    """
    The freshness table for apt paths, and the response's own headers
    for everything else.
    """

    timeout = 20

    async def test_pool_deb_is_never_revalidated(self) -> None:
        """
        ``pool/**.deb`` and ``by-hash/`` files are immutable: even with
        index_ttl=0 and a client no-cache they are served from the cache.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        paths = {
            "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb": b"!<arch>\ndeb body\n",
            "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/"
            + "ab" * 32: b"by-hash body\n",
        }
        for path, content in paths.items():
            harness.replace_file(path, content, PUBLISHED)
            for headers in ({}, {}, {"cache-control": "no-cache"}):
                received = await harness.get(path, headers)
                self.assertEqual((received.status, received.body), (200, content))
            self.assertEqual(received.header("x-cache"), "HIT")
            self.assertEqual(
                received.header("cache-control"), "max-age=31536000, immutable"
            )
            self.assertEqual(harness.requests_for(path), 1, path)

    async def test_dists_indexes_are_revalidated(self) -> None:
        """
        ``dists/**/InRelease`` and ``Packages.xz`` revalidate like APKINDEX.
        """
        harness = ProxyHarness.start(self, {"index_ttl": 0})
        for path in (
            "/debian/dists/bookworm/InRelease",
            "/debian/dists/bookworm/main/binary-amd64/Packages.xz",
        ):
            content = f"contents of {path}\n".encode()
            harness.replace_file(path, content, PUBLISHED)
            first = await harness.get(path)
            second = await harness.get(path)
            self.assertEqual(first.header("x-cache"), "MISS")
            self.assertEqual((second.header("x-cache"), second.body), ("REVALIDATED", content))
            self.assertEqual(harness.requests_for(path), 2)
            self.assertEqual(
                harness.origin.requests[-1].headers.get("if-none-match"),
                first.header("etag"),
            )

    def _fake_upstream(self) -> tuple[FakeUpstream, Running]:
        upstream = FakeUpstream()
        return upstream, start_server(self, upstream=upstream)

    async def test_no_store_is_never_stored(self) -> None:
        """
        A response with ``Cache-Control: no-store`` (or ``private``) is
        passed on and fetched again next time.
        """
        upstream, running = self._fake_upstream()
        for path, cache_control in (("/a.json", "no-store"), ("/b.json", "private, max-age=600")):
            upstream.bodies[path] = GatedBody(
                b'{"x": 1}', headers={"cache-control": cache_control}
            )
            url = f"http://127.0.0.1:{running.proxy_port}/up{path}"
            for _ in range(2):
                received = await Client().get(url)
                await running.server.fetcher.when_idle()
                self.assertEqual((received.status, received.body), (200, b'{"x": 1}'))
                self.assertEqual(received.header("x-cache"), "MISS")
            self.assertEqual(upstream.requests[path], 2)
        self.assertEqual(running.store.stats().entries, 0)

    async def test_cacheable_http_response_is_stored(self) -> None:
        """
        The same kind of response with ``max-age`` is stored and hit.
        """
        upstream, running = self._fake_upstream()
        upstream.bodies["/c.json"] = GatedBody(
            b"{}", headers={"cache-control": "max-age=600"}
        )
        url = f"http://127.0.0.1:{running.proxy_port}/up/c.json"
        await Client().get(url)
        await running.server.fetcher.when_idle()
        second = await Client().get(url)
        self.assertEqual(second.header("x-cache"), "HIT")
        self.assertEqual(second.header("cache-control"), "max-age=600")
        self.assertEqual(upstream.requests["/c.json"], 1)

    async def test_errors_are_never_stored(self) -> None:
        """
        A 404 or a 500 is passed on with its status and asked again next
        time; nothing is stored (but the index, fetched to check packages).
        """
        harness = ProxyHarness.start(self)
        missing = harness.package_path("absent-1.0-r0.apk")
        broken = harness.package_path("hello-1.0-r0.apk")
        harness.origin.set_status(broken, 500)
        for path, status in ((missing, 404), (broken, 500), (INDEX_PATH + ".x", 404)):
            for _ in range(2):
                received = await harness.get(path)
                self.assertEqual(received.status, status, path)
                # "Not found" is not the package, which lives for a year:
                # the origin sent no Cache-Control, so neither do we.
                self.assertIsNone(received.header("cache-control"), path)
            self.assertEqual(harness.requests_for(path), 2, path)
        self.assertEqual(harness.stored_keys(), {f"http://{harness.origin_authority}{INDEX_PATH}"})


class UpstreamIsolationTests(TestCase):
    """
    What one client's download must not carry into another's, and bytes
    that must reach clients exactly as the origin stores them.
    """

    timeout = 20

    async def test_cookies_are_not_shared(self) -> None:
        """
        A cookie an origin sets in one response is neither replayed to
        clients from the cache nor sent on later upstream requests.
        """
        upstream = FakeUpstream()
        upstream.bodies["/x86_64/APKINDEX.tar.gz"] = GatedBody(
            build_apkindex([build_apk("cookie", "1-r0")]),
            headers={"set-cookie": "session=secret; Path=/"},
        )
        upstream.bodies["/x86_64/other.txt"] = GatedBody(b"other")
        running = start_server(self, upstream=upstream)
        base = f"http://127.0.0.1:{running.proxy_port}/up/x86_64"
        first = await Client().get(f"{base}/APKINDEX.tar.gz")
        await running.server.fetcher.when_idle()
        self.assertIsNone(first.header("set-cookie"))
        hit = await Client().get(f"{base}/APKINDEX.tar.gz")
        self.assertEqual(hit.header("x-cache"), "HIT")
        self.assertIsNone(hit.header("set-cookie"))
        await Client().get(f"{base}/other.txt")
        for headers in upstream.seen_headers:
            self.assertIsNone(headers.getRawHeaders("cookie"))

    async def test_encoded_archive_is_not_unpacked(self) -> None:
        """
        The proxy asks for identity encoding; an origin that labels a
        ``.tar.gz`` ``Content-Encoding: gzip`` anyway gets its bytes passed
        on and stored unchanged (unpacking them would break the
        checksum apk verifies), and without that label.
        """
        apk = build_apk("hello", "1.0-r0")
        upstream = FakeUpstream()
        upstream.bodies["/pool/hello-1.0.tar.gz"] = GatedBody(
            apk.content, headers={"content-encoding": "gzip"}
        )
        running = start_server(self, upstream=upstream)
        url = f"http://127.0.0.1:{running.proxy_port}/up/pool/hello-1.0.tar.gz"
        for cache in ("MISS", "HIT"):
            received = await Client().get(url, {"accept-encoding": "gzip"})
            await running.server.fetcher.when_idle()
            self.assertEqual(received.header("x-cache"), cache)
            self.assertEqual(received.body, apk.content)
            self.assertIsNone(received.header("content-encoding"))
        self.assertEqual(
            upstream.seen_headers[0].getRawHeaders("accept-encoding"), ["identity"]
        )


class CacheKeyTests(SynchronousTestCase):
    """
    Store keys of upstream URLs: scheme, host, port unless the scheme's
    default, path and query, however long the URL.
    """

    def test_default_port_left_out(self) -> None:
        for url, key in (
            ("http://mirror.test/alpine/x/APKINDEX.tar.gz",
             "http://mirror.test/alpine/x/APKINDEX.tar.gz"),
            ("http://mirror.test:80/alpine/x/APKINDEX.tar.gz",
             "http://mirror.test/alpine/x/APKINDEX.tar.gz"),
            ("HTTPS://MIRROR.test:443/alpine/x/APKINDEX.tar.gz",
             "https://mirror.test/alpine/x/APKINDEX.tar.gz"),
            ("https://mirror.test:80/alpine/x/APKINDEX.tar.gz",
             "https://mirror.test:80/alpine/x/APKINDEX.tar.gz"),
            ("http://mirror.test:443/alpine/x/APKINDEX.tar.gz",
             "http://mirror.test:443/alpine/x/APKINDEX.tar.gz"),
        ):
            self.assertEqual(cache_key(url), key, url)
        self.assertEqual(
            cache_key("http://127.0.0.1:8080/x?a=1#frag"), "http://127.0.0.1:8080/x?a=1"
        )

    def test_scheme_is_part_of_the_key(self) -> None:
        """
        A plain http fetch never names the entry an https route serves.
        """
        self.assertNotEqual(
            cache_key("http://mirror.test/pool/a.deb"),
            cache_key("https://mirror.test/pool/a.deb"),
        )

    def test_long_urls_same_rule(self) -> None:
        path = "/p/" + "a" * MEMOISED_URL_LENGTH
        self.assertEqual(
            cache_key(f"https://mirror.test{path}?q"), f"https://mirror.test{path}?q"
        )
        self.assertEqual(
            cache_key(f"http://mirror.test:81{path}"), f"http://mirror.test:81{path}"
        )
