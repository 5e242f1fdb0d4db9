"""
Bounded metadata and downloads, over HTTP against the real service on
127.0.0.1: stored headers count against ``--max-size``, oversized heads are
refused, HEADs go upstream as HEADs, objects the store cannot keep are
streamed without being spooled, and the status page's bytes from upstream
are the bytes the origin sent.

The origin (:class:`Origin`) counts requests by method and the body bytes
it wrote, writing bodies in pieces so that a fetch given up early shows.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable
from typing import Any

from attrs import Factory, define
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.fetch.fetcher import spool_plan
from buildcache.fetch.headlimit import MAX_RESPONSE_HEAD, HeadMeter
from buildcache.store import INDEX_NAME, Store, objects
from tests.support import (
    Client,
    Running,
    listen,
    pattern_bytes,
    reactor,
    start_server,
    url_of,
)

KB = 1024
MB = 1024 * KB
#: Response headers a stored entry keeps.
STORED_NAMES = (
    "ETag", "Content-Language", "Content-Disposition", "Content-Type", "Expires"
)
#: Bytes an origin writes per turn of the reactor.
PIECE = 64 * KB


@define
class OriginFile:
    size: int
    #: Header lines (name, value), repeated names allowed.
    headers: list[tuple[str, str]] = Factory(list)
    #: Sent chunked, with no Content-Length.
    chunked: bool = False

    @property
    def data(self) -> bytes:
        return pattern_bytes(self.size, b"origin")


@define(eq=False)
class Origin(Resource):
    """
    Serves :class:`OriginFile` objects by path (404 otherwise), counting
    requests by (method, path) and body bytes written.
    """

    isLeaf = True
    files: dict[str, OriginFile] = Factory(dict)
    requests: Counter[tuple[str, str]] = Factory(Counter)
    body_bytes: int = 0
    #: Called after each piece of a body is written.
    on_piece: Callable[[], None] | None = None
    #: Fired when a body ends, whole or given up by the client.
    ended: list[Deferred[None]] = Factory(list)
    #: When set, bodies stop after their first piece until it fires.
    gate: Deferred[None] | None = None

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: Request) -> object:  # type: ignore[override]
        path = request.uri.decode()
        self.requests[(request.method.decode(), path)] += 1
        found = self.files.get(path)
        if found is None:
            request.setResponseCode(404)
            return b""
        for name, value in found.headers:
            request.responseHeaders.addRawHeader(name, value)
        if not found.chunked:
            request.setHeader("content-length", str(found.size))
        if request.method == b"HEAD" or found.size == 0:
            request.finish()
            return NOT_DONE_YET
        data = found.data
        lost: list[object] = []
        ended: Deferred[None] = Deferred()
        self.ended.append(ended)
        request.notifyFinish().addErrback(lost.append)

        def piece(offset: int) -> None:
            gate = self.gate
            if offset == PIECE and gate is not None and not gate.called:
                gate.addCallback(lambda _: piece(offset))
                return
            if lost:
                ended.callback(None)
                return
            chunk = data[offset:offset + PIECE]
            request.write(chunk)
            self.body_bytes += len(chunk)
            if self.on_piece is not None:
                self.on_piece()
            if offset + PIECE >= len(data):
                request.finish()
                ended.callback(None)
            else:
                reactor.callLater(0, piece, offset + PIECE)

        piece(0)
        return NOT_DONE_YET


class _LeaveAtOnce(Protocol):
    """
    A response body reader that drops the connection at its first bytes.
    """

    def __init__(self, left: Deferred[None]) -> None:
        self.left = left

    def dataReceived(self, data: bytes) -> None:
        if not self.left.called:
            assert self.transport is not None
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: object = None) -> None:
        if not self.left.called:
            self.left.callback(None)


def tmp_bytes(running: Running) -> int:
    """
    Bytes in the cache's tmp/ now.
    """
    tmp = os.path.join(running.store.directory, "tmp")
    return sum(os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp))


def serve(testcase: TestCase, origin: Origin, **config: object) -> tuple[Running, Client]:
    running = start_server(testcase, config, upstream=origin)
    client = Client()
    testcase.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
    return running, client


def url(running: Running, path: str) -> str:
    return f"http://127.0.0.1:{running.proxy_port}/up{path}"


async def stats(running: Running, client: Client) -> dict[str, Any]:
    received = await client.get(f"http://127.0.0.1:{running.proxy_port}/-/stats.json")
    result: dict[str, Any] = json.loads(received.body)
    return result


class HeadMeterTests(SynchronousTestCase):
    """
    The pure counting of response-head bytes.
    """

    def test_head_within_limit_then_body_not_counted(self) -> None:
        meter = HeadMeter(limit=100)
        meter.request_sent()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n"
        self.assertEqual(meter.received(head + b"x" * 500), len(head) + 500)
        self.assertFalse(meter.counting)
        self.assertEqual(meter.seen, len(head))

    def test_too_large_head(self) -> None:
        meter = HeadMeter(limit=100)
        meter.request_sent()
        self.assertEqual(meter.received(b"HTTP/1.1 200 OK\r\n"), 17)
        self.assertEqual(meter.received(b"X: " + b"y" * 200 + b"\r\n"), 83)

    def test_end_split_between_pieces_and_bare_newlines(self) -> None:
        meter = HeadMeter(limit=100)
        meter.request_sent()
        meter.received(b"HTTP/1.1 200 OK\r\nA: b\r")
        self.assertEqual(meter.received(b"\n\r\n" + b"z" * 1000), 1003)
        self.assertFalse(meter.counting)
        meter.request_sent()
        meter.received(b"HTTP/1.1 200 OK\nA: b\n\n" + b"z" * 1000)
        self.assertFalse(meter.counting)

    def test_interim_heads_count_together(self) -> None:
        meter = HeadMeter(limit=60)
        meter.request_sent()
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        final = b"HTTP/1.1 200 OK\r\nA: " + b"b" * 40 + b"\r\n\r\n"
        self.assertLess(meter.received(interim + final), len(interim + final))

    def test_each_request_starts_anew(self) -> None:
        meter = HeadMeter(limit=40)
        for _ in range(3):
            meter.request_sent()
            head = b"HTTP/1.1 204 No Content\r\n\r\n"
            self.assertEqual(meter.received(head), len(head))


class MetadataOverHTTPTests(TestCase):
    """
    Zero-byte bodies with large headers: their headers are counted and
    evicted under ``--max-size``; a head over the limit is refused.
    """

    async def test_large_headers_counted_and_evicted(self) -> None:
        origin = Origin()
        for index in range(12):
            # Four replayed headers of 15 KB (a client reads lines up to
            # 16 KB), 60 KB stored.
            lines = [
                (name, f"{index:02d}" + "a" * 15 * KB) for name in STORED_NAMES[:4]
            ]
            origin.files[f"/empty-{index}"] = OriginFile(0, lines)
        running, client = serve(self, origin, max_size=400 * KB)
        for index in range(12):
            received = await client.get(url(running, f"/empty-{index}"))
            self.assertEqual((received.status, received.body), (200, b""))
            self.assertEqual(len(received.header("etag") or ""), 15 * KB + 2)
        figures = (await stats(running, client))["store"]
        # Six rows of 60 KB fit in 400 KB: the other six were evicted.
        self.assertGreater(figures["bytes_stored"], 6 * 60 * KB)
        self.assertLessEqual(figures["bytes_stored"], 400 * KB)
        self.assertEqual(figures["bytes_stored"], figures["bytes_metadata"])
        self.assertEqual(figures["entries"], 6)
        self.assertEqual(figures["evictions"], 6)
        index_size = sum(
            os.path.getsize(os.path.join(running.store.directory, name))
            for name in os.listdir(running.store.directory)
            if name.startswith(INDEX_NAME)
        )
        # The index holds what is counted, not twelve times 60 KB and more.
        self.assertLess(index_size, 2 * MB)

    async def test_too_many_headers_served_not_stored(self) -> None:
        origin = Origin()
        lines = [(name, "b" * 14 * KB) for name in STORED_NAMES]
        origin.files["/wordy"] = OriginFile(10, lines)
        running, client = serve(self, origin)
        for _ in range(2):
            received = await client.get(url(running, "/wordy"))
            self.assertEqual(received.status, 200)
            self.assertEqual(received.header("x-cache"), "MISS")
            self.assertEqual(len(received.body), 10)
        self.assertEqual(origin.requests[("GET", "/wordy")], 2)
        self.assertEqual(running.store.stats().entries, 0)

    async def test_oversized_head_refused(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        origin = Origin()
        lines = [(f"X-Filler-{n}", "f" * 10 * KB) for n in range(30)]
        origin.files["/huge-head"] = OriginFile(100, lines)
        origin.files["/fine"] = OriginFile(100)
        running, client = serve(self, origin)
        received = await client.get(url(running, "/huge-head"))
        self.assertEqual(received.status, 502)
        self.assertIn(b"response head larger", received.body)
        self.assertEqual(running.store.stats().entries, 0)
        refused = [e for e in events if e.get("event") == "upstream_head_too_large"]
        self.assertEqual(len(refused), 1)
        self.assertEqual(refused[0]["limit"], MAX_RESPONSE_HEAD)
        # The next fetch is unaffected.
        fine = await client.get(url(running, "/fine"))
        self.assertEqual((fine.status, len(fine.body)), (200, 100))


class UnstorableDownloadTests(TestCase):
    """
    HEADs go upstream as HEADs; an object the store cannot keep is
    streamed to its readers, never spooled whole, and not fetched for
    nobody.
    """

    async def test_heads_fetch_nothing(self) -> None:
        origin = Origin()
        for index in range(10):
            origin.files[f"/big-{index}.deb"] = OriginFile(20 * MB)
        running, client = serve(self, origin, max_size=5 * MB)
        answers = await gatherResults([
            Deferred.fromCoroutine(
                client.get(url(running, f"/big-{index}.deb"), method=b"HEAD")
            )
            for index in range(10)
        ])
        for received in answers:
            self.assertEqual(received.status, 200)
            self.assertEqual(received.header("content-length"), str(20 * MB))
            self.assertEqual(received.header("x-cache"), "MISS")
            self.assertEqual(received.header("accept-ranges"), "bytes")
        self.assertEqual(
            sorted(origin.requests.items()),
            sorted(((("HEAD", f"/big-{i}.deb"), 1) for i in range(10))),
        )
        self.assertEqual(origin.body_bytes, 0)
        self.assertEqual(tmp_bytes(running), 0)
        self.assertEqual(running.store.stats().entries, 0)
        self.assertEqual((await stats(running, client))["bytes_from_upstream"], 0)

    async def test_too_large_streamed_not_spooled(self) -> None:
        origin = Origin()
        size = 8 * MB
        origin.files["/large.deb"] = OriginFile(size)
        running, client = serve(self, origin, max_size=20 * MB, max_object_size=2 * MB)
        peaks: list[int] = []
        origin.on_piece = lambda: peaks.append(tmp_bytes(running))
        received = await client.get(url(running, "/large.deb"))
        self.assertEqual(received.status, 200)
        self.assertTrue(received.complete)
        self.assertEqual(received.body, OriginFile(size).data)
        self.assertEqual(max(peaks), 0)
        self.assertEqual(running.store.stats().entries, 0)
        self.assertEqual(running.store.reserved, 0)
        # Never stored, so fetched again.
        again = await client.get(url(running, "/large.deb"))
        self.assertEqual((again.header("x-cache"), len(again.body)), ("MISS", size))
        self.assertEqual(origin.requests[("GET", "/large.deb")], 2)

    async def test_range_of_too_large_object(self) -> None:
        """
        uv's suffix range on a wheel too large to keep: the range, from a
        download streamed in memory.
        """
        origin = Origin()
        size = 3 * MB
        origin.files["/large.deb"] = OriginFile(size)
        running, client = serve(self, origin, max_object_size=MB)
        data = OriginFile(size).data
        for wanted, expected in (("bytes=-1000", data[-1000:]), ("bytes=10-19", data[10:20])):
            received = await client.get(url(running, "/large.deb"), {"range": wanted})
            self.assertEqual((received.status, received.body), (206, expected))
        self.assertEqual(running.store.stats().entries, 0)
        self.assertEqual(tmp_bytes(running), 0)

    async def test_too_large_and_nobody_reading_is_given_up(self) -> None:
        origin = Origin()
        size = 64 * MB
        origin.files["/huge.deb"] = OriginFile(size)
        running, client = serve(self, origin, max_size=5 * MB)
        response = await Agent(reactor).request(b"GET", url(running, "/huge.deb").encode())
        self.assertEqual(response.code, 200)
        left: Deferred[None] = Deferred()
        # The client leaves after its first bytes.
        response.deliverBody(_LeaveAtOnce(left))
        await left
        await origin.ended[0]
        self.assertLess(origin.body_bytes, size // 4)
        self.assertEqual(tmp_bytes(running), 0)
        await running.server.fetcher.when_idle()
        self.assertEqual(running.store.reserved, 0)

    async def test_download_of_unknown_fit_holds_room(self) -> None:
        origin = Origin()
        origin.files["/a.deb"] = OriginFile(3 * MB)
        origin.files["/b.deb"] = OriginFile(3 * MB)
        running, client = serve(self, origin, max_size=5 * MB)
        await client.get(url(running, "/a.deb"))
        self.assertEqual(running.store.stats().entries, 1)
        held: list[int] = []
        origin.on_piece = lambda: held.append(running.store.reserved)
        await client.get(url(running, "/b.deb"))
        # Room for b was held (and a evicted) from its first byte.
        self.assertEqual(max(held), 3 * MB)
        self.assertEqual([e.key.rsplit("/", 1)[-1] for e in running.store.keys()], ["b.deb"])
        self.assertEqual(running.server.activity.evictions, 1)


class BytesFromUpstreamTests(TestCase):
    """
    ``bytes_from_upstream`` is what the origin sent; ``bytes_saved`` is
    what went out of entries already stored.
    """

    async def test_mixed_workload(self) -> None:
        origin = Origin()
        for name in ("h", "r", "c"):
            origin.files[f"/{name}.deb"] = OriginFile(
                300 * KB, [("Cache-Control", "max-age=3600")]
            )
        running, client = serve(self, origin)
        # A HEAD fetches nothing; a range fetches the whole file once.
        head = await client.get(url(running, "/h.deb"), method=b"HEAD")
        self.assertEqual(head.header("x-cache"), "MISS")
        ranged = await client.get(url(running, "/r.deb"), {"range": "bytes=-1000"})
        self.assertEqual((ranged.status, len(ranged.body)), (206, 1000))
        # Three GETs share one download: the later two join while the
        # origin holds the body after its first piece.
        origin.gate = Deferred()
        getting = []
        for _ in range(3):
            first: Deferred[None] = Deferred()
            getting.append(Deferred.fromCoroutine(
                client.get(url(running, "/c.deb"), first_bytes=first)
            ))
            await first
        origin.gate.callback(None)
        together = await gatherResults(getting)
        self.assertEqual([len(r.body) for r in together], [300 * KB] * 3)
        self.assertEqual(origin.requests[("GET", "/c.deb")], 1)
        # Then hits.
        hits = [await client.get(url(running, path)) for path in ("/r.deb", "/c.deb")]
        self.assertEqual([r.header("x-cache") for r in hits], ["HIT", "HIT"])
        figures = await stats(running, client)
        self.assertEqual(origin.body_bytes, 2 * 300 * KB)
        self.assertEqual(figures["bytes_from_upstream"], origin.body_bytes)
        self.assertEqual(figures["front_ends"]["mirror"]["bytes_from_upstream"], origin.body_bytes)
        self.assertEqual(figures["bytes_saved"], 2 * 300 * KB)


class Page(Resource):
    """
    A PEP 503 project page of about ``size`` bytes at any path, chunked or
    with its length, counting the requests for it.
    """

    isLeaf = True

    def __init__(self, size: int, chunked: bool) -> None:
        super().__init__()
        line = (
            b'<a href="http://127.0.0.1:1/x-1.0-py3-none-any.whl">'
            b"x-1.0-py3-none-any.whl</a><br/>\n"
        )
        self.body = (
            b"<!DOCTYPE html><html><body>\n" + line * (size // len(line))
            + b"</body></html>\n"
        )
        self.chunked = chunked
        self.hits = 0

    def render(self, request: Request) -> object:  # type: ignore[override]
        self.hits += 1
        request.setHeader("content-type", "text/html")
        if not self.chunked:
            request.setHeader("content-length", str(len(self.body)))
        for offset in range(0, len(self.body), PIECE):
            request.write(self.body[offset:offset + PIECE])
        request.finish()
        return NOT_DONE_YET


def page_port(testcase: TestCase, page: Page) -> str:
    port = listen(page)
    testcase.addCleanup(port.stopListening)
    return url_of(port, "/simple")


def uncounted(running: Running) -> int:
    """
    Room held now by bodies spooled outside ``--max-size``.
    """
    result: int = running.store.uncounted
    return result


class SpoolPlanTests(SynchronousTestCase):
    """
    Where a body goes, by whether room under the limit is held for it and
    whether it must be checked whole before anyone sees it.
    """

    def test_plan(self) -> None:
        self.assertEqual(spool_plan(True, False), "spool")
        self.assertEqual(spool_plan(True, True), "spool")
        self.assertEqual(spool_plan(False, True), "uncounted")
        self.assertEqual(spool_plan(False, False), "memory")


class CheckedPageTests(TestCase):
    """
    A page the index must parse before serving it, which the store has no
    room for, is spooled outside the limit, served, and stored only if it
    fits once whole; past the safety cap it is refused.
    """

    async def _page(
        self, size: int, chunked: bool, **config: object
    ) -> tuple[Running, Client, Page, Any]:
        page = Page(size, chunked)
        running = start_server(
            self, {"pypi_upstreams": (page_port(self, page),), **config}
        )
        client = Client()
        self.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
        received = await client.get(
            f"http://127.0.0.1:{running.index_port}/simple/x/", {"accept": "text/html"}
        )
        await running.server.fetcher.when_idle()
        return running, client, page, received

    async def test_page_with_length_over_max_size(self) -> None:
        running, _, page, received = await self._page(5 * MB, False, max_size=MB)
        self.assertEqual(received.status, 200, received.body[:200])
        self.assertEqual(received.body.count(b"x-1.0-py3-none-any.whl</a>"), 5 * MB // 84)
        # Too large to keep: not stored, nothing left held or in tmp/.
        self.assertEqual(running.store.stats().entries, 0)
        self.assertEqual((running.store.reserved, uncounted(running)), (0, 0))
        self.assertEqual(tmp_bytes(running), 0)

    async def test_chunked_page_over_max_size(self) -> None:
        running, _, page, received = await self._page(2 * MB, True, max_size=MB)
        self.assertEqual(received.status, 200, received.body[:200])
        self.assertEqual(running.store.stats().entries, 0)
        self.assertEqual((running.store.reserved, uncounted(running)), (0, 0))
        self.assertEqual(tmp_bytes(running), 0)

    async def test_chunked_page_beside_download_holding_room(self) -> None:
        """
        ``--max-size 10M``, an 8 MB download in progress: a 3 MB chunked
        page is served (before: 502).
        """
        origin = Origin()
        origin.files["/big.deb"] = OriginFile(8 * MB)
        origin.gate = Deferred()
        page = Page(3 * MB, chunked=True)
        running, client = serve(
            self, origin, max_size=10 * MB, pypi_upstreams=(page_port(self, page),)
        )
        first: Deferred[None] = Deferred()
        big = Deferred.fromCoroutine(client.get(url(running, "/big.deb"), first_bytes=first))
        await first
        self.assertEqual(running.store.reserved, 8 * MB)
        received = await client.get(
            f"http://127.0.0.1:{running.index_port}/simple/x/", {"accept": "text/html"}
        )
        self.assertEqual(received.status, 200, received.body[:200])
        self.assertIn(b"x-1.0-py3-none-any.whl", received.body)
        origin.gate.callback(None)
        self.assertEqual(len((await big).body), 8 * MB)
        await running.server.fetcher.when_idle()
        self.assertEqual((running.store.reserved, uncounted(running)), (0, 0))
        self.assertEqual(tmp_bytes(running), 0)

    async def test_page_past_safety_cap_refused(self) -> None:
        """
        Past the cap on bodies spooled outside the limit (64 MiB, lowered
        here), a page that cannot be checked unseen is refused.
        """
        self.patch(objects, "UNCOUNTED_LIMIT", MB)
        for chunked in (False, True):
            running, _, page, received = await self._page(2 * MB, chunked, max_size=MB)
            self.assertEqual(received.status, 502)
            self.assertIn(b"it must be checked before it is served", received.body)
            self.assertEqual((running.store.reserved, uncounted(running)), (0, 0))
            self.assertEqual(tmp_bytes(running), 0)


class ReserveFailureTests(TestCase):
    """
    An SQLite error while making room (the index locked by ``buildcache
    purge``, say) holds no room for good: the body is served, not stored.
    """

    def _fail_once(self) -> list[int]:
        real = Store._delete_rows
        calls: list[int] = []

        def failing(store: Store, victims: list[tuple[str, int, int, str]]) -> None:
            if not calls:
                calls.append(1)
                raise sqlite3.OperationalError("database is locked")
            real(store, victims)

        self.patch(Store, "_delete_rows", failing)
        return calls

    async def test_locked_index_while_reserving(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        for chunked in (False, True):
            origin = Origin()
            origin.files["/a.deb"] = OriginFile(3 * MB)
            origin.files["/b.deb"] = OriginFile(3 * MB, chunked=chunked)
            running, client = serve(self, origin, max_size=5 * MB)
            await client.get(url(running, "/a.deb"))
            calls = self._fail_once()
            received = await client.get(url(running, "/b.deb"))
            await running.server.fetcher.when_idle()
            self.assertEqual(calls, [1])
            self.assertEqual(
                (received.status, received.body), (200, OriginFile(3 * MB).data)
            )
            # Nothing downloading now: nothing held, nothing in tmp/.
            self.assertEqual(running.store.reserved, 0)
            self.assertEqual(tmp_bytes(running), 0)
            self.assertEqual(
                [e.key.rsplit("/", 1)[-1] for e in running.store.keys()], ["a.deb"]
            )
            self.patch(Store, "_delete_rows", Store.__dict__["_delete_rows"])
        self.assertEqual(
            len([e for e in events if e.get("event") == "reserve_failed"]), 2
        )


class UnstorableKeepsEntriesTests(TestCase):
    """
    Room is made (entries evicted) only for bodies that may be stored, and
    never by evicting the entry the download would replace.
    """

    async def test_no_store_response_evicts_nothing(self) -> None:
        origin = Origin()
        origin.files["/keep.deb"] = OriginFile(3 * MB)
        origin.files["/private.deb"] = OriginFile(3 * MB, [("Cache-Control", "no-store")])
        origin.files["/chunked.deb"] = OriginFile(
            3 * MB, [("Cache-Control", "no-store")], chunked=True
        )
        running, client = serve(self, origin, max_size=5 * MB)
        await client.get(url(running, "/keep.deb"))
        for path in ("/private.deb", "/chunked.deb", "/missing.deb"):
            received = await client.get(url(running, path))
            self.assertEqual(
                received.status, 404 if path == "/missing.deb" else 200
            )
            await running.server.fetcher.when_idle()
        self.assertEqual(
            [e.key.rsplit("/", 1)[-1] for e in running.store.keys()], ["keep.deb"]
        )
        self.assertEqual(running.server.activity.evictions, 0)
        self.assertEqual((running.store.reserved, tmp_bytes(running)), (0, 0))

    async def test_refetch_keeps_its_own_entry_while_downloading(self) -> None:
        origin = Origin()
        origin.files["/InRelease"] = OriginFile(3 * MB, [("Cache-Control", "max-age=0")])
        running, client = serve(self, origin, max_size=5 * MB)
        await client.get(url(running, "/InRelease"))
        self.assertEqual(running.store.stats().entries, 1)
        seen: list[int] = []
        origin.on_piece = lambda: seen.append(running.store.stats().entries)
        again = await client.get(url(running, "/InRelease"), {"cache-control": "max-age=0"})
        self.assertEqual((again.status, again.header("x-cache")), (200, "MISS"))
        # The old copy stayed until the new one replaced it.
        self.assertEqual(set(seen), {1})
        self.assertEqual(origin.requests[("GET", "/InRelease")], 2)
        self.assertEqual(running.server.activity.evictions, 0)
