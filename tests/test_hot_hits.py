"""
Repeated hits answered from their request's bytes (issue 16, a cheaper
hit; :mod:`buildcache.engine.hot`): the same bytes as the ordinary path,
the same accounting, and never an answer the ordinary path would not give
now (another client, credentials, a shaped request, a changed store, a
download started).
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import stringToDatetime

from buildcache.config import parse_network
from buildcache.engine import hot as hot_module
from buildcache.engine.hot import repeatable_head
from buildcache.store import Store
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    Running,
    listen,
    pattern_bytes,
    start_server,
    url_of,
)
from tests.test_hit_direct import whole_response, without_date
from tests.test_proxy import raw_connection, raw_request, until
from tests.test_service import committed_entries, spawn_server

SMALL = "/files/small-1.0-r0.apk"
OTHER = "/files/other-1.0-r0.apk"
LARGE = "/files/large-1.0-r0.apk"
PLAIN = "/files/notes.txt"
SIZES = {SMALL: 20 * 1024, OTHER: 30 * 1024, LARGE: 1024 * 1024, PLAIN: 2048}


class HotHitTests(TestCase):
    """
    A server over real TCP, its proxy port's mirror route in front of a
    counting upstream.
    """

    timeout = 60

    def start(self, **config: Any) -> None:
        upstream = FakeUpstream()
        for path, size in SIZES.items():
            headers = {"ETag": '"v1"'}
            if path == PLAIN:
                headers["Cache-Control"] = "max-age=3600"
            upstream.bodies[path] = GatedBody(
                pattern_bytes(size, path.encode()), headers=headers
            )
        self.upstream = upstream
        self.running: Running = start_server(self, config, upstream=upstream)
        self.rendered = 0
        proxy = self.running.server.proxy
        real = proxy.render

        def counting(request: Any) -> Any:
            self.rendered += 1
            return real(request)

        self.patch(proxy, "render", counting)

    def setUp(self) -> None:
        self.start()

    @property
    def table(self) -> hot_module.HotHits:
        table = self.running.server.proxy_site.hot
        assert table is not None
        return table

    async def stored(self, path: str) -> None:
        client = Client()
        url = f"http://127.0.0.1:{self.running.proxy_port}/up{path}"
        for _ in range(200):
            answer = await client.get(url)
            if answer.header("x-cache") == "HIT":
                return
        self.fail(f"{path} never became a hit")

    async def asked(
        self, requests: list[bytes], source: str | None = None, head: bool = False,
    ) -> list[bytes]:
        """The answers to ``requests``, one after the other on one connection."""
        connection = await raw_connection(self, self.running.proxy_port, source)
        return [await whole_response(connection, request, head) for request in requests]

    def request(self, path: str = SMALL, headers: list[tuple[str, str]] = []) -> bytes:
        return raw_request("GET", f"/up{path}", "box", [("User-Agent", "apk"), *headers])

    async def test_repeats_answered_alike(self) -> None:
        """
        The second and third of the same request are answered without
        being parsed or routed, with the first one's bytes (a current
        Date aside), and accounted and logged as hits like it.
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        await self.stored(SMALL)
        # The access lines of a turn are written after its answers: those
        # of the requests that stored it may still be on their way.
        earlier = self.running.server.activity.totals["mirror"].requests
        before = self.rendered
        answers = await self.asked([self.request()] * 3)
        self.assertEqual(self.rendered - before, 1)
        self.assertEqual(len(self.table), 1)
        whole = pattern_bytes(SIZES[SMALL], SMALL.encode())
        for answer in answers:
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:200])
            self.assertTrue(answer.endswith(b"\r\n\r\n" + whole))
            self.assertIn(b"\r\nX-Cache: HIT\r\n", answer)
            date = re.search(rb"\r\nDate: ([^\r]*)\r\n", answer)
            assert date is not None
            self.assertLess(abs(stringToDatetime(date.group(1)) - time.time()), 5)
        self.assertEqual({without_date(a) for a in answers}, {without_date(answers[0])})
        await until(
            lambda: len([e for e in events if e.get("log_system") == "access"]) >= earlier + 3
        )
        lines = [e for e in events if e.get("log_system") == "access"][earlier:]
        self.assertEqual(
            [(e["url"], e["status"], e["bytes"], e["cache"], e["front_end"]) for e in lines],
            [(f"/up{SMALL}", 200, SIZES[SMALL], "HIT", "mirror")] * 3,
        )

    async def test_totals_count_them(self) -> None:
        """Each answer from the table counts as a request, a hit and its bytes."""
        await self.stored(SMALL)
        mirror = self.running.server.activity.totals["mirror"]
        requests, hits, sent = mirror.requests, mirror.by_status["HIT"], mirror.bytes_from_cache
        await self.asked([self.request()] * 4)
        self.assertEqual(mirror.requests - requests, 4)
        self.assertEqual(mirror.by_status["HIT"] - hits, 4)
        self.assertEqual(mirror.bytes_from_cache - sent, 4 * SIZES[SMALL])

    async def test_access_time_recorded(self) -> None:
        """An answer from the table records the entry's access, as a hit does."""
        await self.stored(SMALL)
        await self.asked([self.request()] * 2)
        store: Store = self.running.store
        store.take_accesses()
        before = self.rendered
        await self.asked([self.request()])
        self.assertEqual(self.rendered, before)
        (key,) = [e.key for e in store.keys() if e.key.endswith(SMALL)]
        self.assertIn(key, store.take_accesses())

    async def test_other_client_asks_anew(self) -> None:
        """
        The same bytes from another client address are not answered from
        the table: that client may not be allowed (here it is refused).
        """
        self.start(allow_from=(parse_network("127.0.0.1/32"),))
        await self.stored(SMALL)
        await self.asked([self.request()] * 2)
        before = self.rendered
        refused = await self.asked([self.request()], source="127.0.0.2")
        self.assertTrue(refused[0].startswith(b"HTTP/1.1 403 "), refused[0][:100])
        self.assertEqual(self.rendered - before, 1)

    async def test_credentials_never_remembered(self) -> None:
        """
        A request with credentials (Authorization, Proxy-Authorization, a
        cookie) goes the ordinary way every time.
        """
        await self.stored(SMALL)
        for field in ("Authorization", "Proxy-Authorization", "Cookie"):
            before = self.rendered
            await self.asked([self.request(headers=[(field, "Basic dTpw")])] * 3)
            self.assertEqual(self.rendered - before, 3, field)
        self.assertEqual(len(self.table), 0)

    async def test_shaped_requests_go_the_ordinary_way(self) -> None:
        """
        A range, a conditional, HTTP/1.0 and ``Connection: close`` are
        answered the ordinary way every time (and the last closes).
        """
        await self.stored(SMALL)
        shaped = [
            self.request(headers=[("Range", "bytes=0-9")]),
            self.request(headers=[("If-None-Match", '"nope"')]),
            self.request(headers=[("If-Modified-Since", "Mon, 01 Jan 2024 00:00:00 GMT")]),
        ]
        for request in shaped:
            before = self.rendered
            await self.asked([request] * 2)
            self.assertEqual(self.rendered - before, 2, request)
        closing = [
            raw_request("GET", f"/up{SMALL}", "box", version="HTTP/1.0"),
            self.request(headers=[("Connection", "close")]),
        ]
        for request in closing:
            before = self.rendered
            for _ in range(2):
                connection = await raw_connection(self, self.running.proxy_port)
                answer = await whole_response(connection, request)
                self.assertIn(b" 200 OK\r\n", answer[:20])
                await connection.lost
            self.assertEqual(self.rendered - before, 2, request)
        self.assertEqual(len(self.table), 0)

    async def test_not_immutable_never_remembered(self) -> None:
        """A fresh hit of a file that may change is decided every time."""
        await self.stored(PLAIN)
        before = self.rendered
        await self.asked([self.request(PLAIN)] * 3)
        self.assertEqual(self.rendered - before, 3)

    async def test_removed_entry_is_fetched_again(self) -> None:
        """
        Once the entry is removed from the store, the same request is a
        miss again: fetched upstream, not answered from the table.
        """
        await self.stored(SMALL)
        await self.asked([self.request()] * 2)
        fetched = self.upstream.requests[SMALL]
        store: Store = self.running.store
        (entry,) = [e for e in store.keys() if e.key.endswith(SMALL)]
        store.remove_entry(entry)
        answer = (await self.asked([self.request()]))[0]
        self.assertIn(b"\r\nX-Cache: MISS\r\n", answer)
        self.assertEqual(self.upstream.requests[SMALL], fetched + 1)

    async def test_download_started_forgets(self) -> None:
        """
        In the process that fetches, a download started (a lookup hook may
        wait for one) sends the same request the ordinary way once; then
        it is answered from the table again.
        """
        await self.stored(SMALL)
        await self.asked([self.request()] * 2)
        await self.asked([self.request(OTHER)])
        before = self.rendered
        await self.asked([self.request()] * 3)
        self.assertEqual(self.rendered - before, 1)

    async def test_file_gone(self) -> None:
        """
        A body file gone from the disk is not answered from the table (the
        ordinary path finds it missing and fetches it again).
        """
        await self.stored(SMALL)
        await self.asked([self.request()] * 2)
        store: Store = self.running.store
        path = store.object_path([e.key for e in store.keys() if e.key.endswith(SMALL)][0])
        assert path is not None
        os.unlink(path)
        before = self.rendered
        answer = (await self.asked([self.request()]))[0]
        self.assertEqual(self.rendered - before, 1)
        self.assertTrue(answer.endswith(pattern_bytes(SIZES[SMALL], SMALL.encode())))

    async def test_large_not_remembered(self) -> None:
        """A body over HOT_BODY_MAX goes the ordinary (sendfile) way."""
        await self.stored(LARGE)
        before = self.rendered
        await self.asked([self.request(LARGE)] * 2)
        self.assertEqual(self.rendered - before, 2)

    async def test_pipelined(self) -> None:
        """Two requests in one read are both answered, in order, whole."""
        await self.stored(SMALL)
        await self.stored(OTHER)
        await self.asked([self.request()] * 2)
        connection = await raw_connection(self, self.running.proxy_port)
        connection.send(self.request() + self.request(OTHER))
        small = pattern_bytes(SIZES[SMALL], SMALL.encode())
        other = pattern_bytes(SIZES[OTHER], OTHER.encode())
        await connection._until(lambda: connection.buffer.endswith(other))
        first, second = connection.buffer.split(b"HTTP/1.1 200 OK\r\n")[1:]
        self.assertTrue(first.endswith(b"\r\n\r\n" + small))
        self.assertTrue(second.endswith(b"\r\n\r\n" + other))

    async def test_whole_head_with_a_body_still_has_a_deadline(self) -> None:
        """
        A head that arrives whole in one read, announcing a body that never
        comes, is cut at the request deadline with a 408, as a head sent
        bit by bit is (the read a table may answer started no deadline).
        """
        self.running.server.proxy_site.request_head_timeout = 0.5
        connection = await raw_connection(self, self.running.proxy_port)
        connection.send(
            raw_request("GET", f"/up{SMALL}", "box", [("Content-Length", "10")])
        )
        await connection.lost
        self.assertTrue(connection.buffer.startswith(b"HTTP/1.1 408 "), connection.buffer[:80])

    # Without the deadline the connection stays open: fail soon.
    test_whole_head_with_a_body_still_has_a_deadline.timeout = 10  # type: ignore[attr-defined]

    async def test_bounded(self) -> None:
        """Past HOT_KEPT responses the table starts again: it never holds more."""
        self.patch(hot_module, "HOT_KEPT", 3)
        await self.stored(SMALL)
        for agent in range(7):
            await self.asked([self.request(headers=[("X-Agent", str(agent))])])
            self.assertLessEqual(len(self.table), 3)
        self.assertGreater(len(self.table), 0)


class RepeatableHeadTests(SynchronousTestCase):
    """Which request heads the table may answer again from their bytes."""

    def test_plain_get(self) -> None:
        self.assertTrue(repeatable_head(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"))
        self.assertTrue(repeatable_head(
            b"GET /a HTTP/1.1\r\nHost: x\r\nconnection: Keep-Alive\r\n\r\n"
        ))

    def test_refused(self) -> None:
        for raw in [
            b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a HTTP/1.0\r\nHost: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\n",
            b"GET /a HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n",
            b"GET /a HTTP/1.1\r\nConnection: upgrade\r\n\r\n",
            b"GET /a HTTP/1.1\r\nauthorization: x\r\n\r\n",
            b"GET /a HTTP/1.1\r\nCookie: a=b\r\n\r\n",
            b"GET /a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /a HTTP/1.1\r\nRange: bytes=0-1\r\n\r\n",
            b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /" + b"a" * (hot_module.HOT_REQUEST_MAX) + b" HTTP/1.1\r\n\r\n",
        ]:
            self.assertFalse(repeatable_head(raw), raw[:80])


class StoreChangesTests(SynchronousTestCase):
    """What the table's generation reads: the store's changes."""

    def test_own_writes_and_others_commits(self) -> None:
        from twisted.internet.task import Clock

        directory = self.mktemp()
        writer = Store.open(directory, 10_000_000, Clock())
        self.addCleanup(writer.close)
        reader = Store.open(directory, 10_000_000, Clock(), read_only=True)
        self.addCleanup(reader.close)
        seen = reader.changes(), writer.changes()
        self.assertEqual(reader.changes(), seen[0])
        entry_writer = writer.writer("http://127.0.0.1:9/a.apk")
        entry_writer.write(b"body")
        entry_writer.commit({"content-type": "application/octet-stream"})
        writer.commit_pending()
        self.assertNotEqual(writer.changes(), seen[1])
        self.assertNotEqual(reader.changes(), seen[0])
        still = reader.changes()
        self.assertEqual(reader.changes(), still)


class WorkersHotTests(TestCase):
    """
    ``twistd buildcache --workers 2`` for real: repeated requests spread
    over both processes are answered whole, and every one of them is
    counted and logged once, whichever process (and path) answered it.
    """

    timeout = 120

    async def test_repeats_counted_across_processes(self) -> None:
        # A Debian pool file: immutable, and no index to check first (a
        # worker answers an apk package once its index is checked).
        deb = "/pool/main/s/small/small_1.0_amd64.deb"
        whole = pattern_bytes(20 * 1024, deb.encode())
        upstream = FakeUpstream(bodies={deb: GatedBody(whole)})
        port = listen(upstream)
        self.addCleanup(port.stopListening)
        cache_dir = os.path.abspath(self.mktemp())
        process, proxy_port = spawn_server(
            self, "--cache-dir", cache_dir,
            "--mirror", f"up={url_of(port).rstrip('/')}", "--workers", "2",
        )
        await process.wait_for(b"Worker 1 serving")
        await process.wait_for(b"ProxySite starting on")
        request = raw_request("GET", f"/up{deb}", "box", [("User-Agent", "apt")])
        asked = 0
        for _ in range(200):
            connection = await raw_connection(self, proxy_port)
            answer = await whole_response(connection, request)
            asked += 1
            if b"\r\nX-Cache: HIT\r\n" in answer:
                break
        else:
            self.fail("never a hit")
        # Committed, so that the worker finds it too (until then it hands
        # its connections to the main process).
        await committed_entries(cache_dir, 1)
        for _ in range(16):
            connection = await raw_connection(self, proxy_port)
            for _ in range(3):
                answer = await whole_response(connection, request)
                asked += 1
                self.assertTrue(answer.endswith(b"\r\n\r\n" + whole))
                self.assertIn(b"\r\nX-Cache: HIT\r\n", answer)
        line = re.compile(rb"\] 127\.0\.0\.1 GET /up" + re.escape(deb.encode()) + rb" 200 ")
        for _ in range(400):
            if len(line.findall(process.output)) >= asked:
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(line.findall(process.output)), asked)
        self.assertIn(b"[worker-1,access]", process.output)
        client = Client()
        self.addCleanup(client.close)
        for _ in range(200):
            received = await client.get(f"http://127.0.0.1:{proxy_port}/-/stats.json")
            stats = json.loads(received.body)
            if stats["workers"] is not None:
                break
        self.assertEqual(
            stats["by_status"]["HIT"] + stats["by_status"].get("MISS", 0), asked
        )
        self.assertEqual(upstream.requests[deb], 1)
