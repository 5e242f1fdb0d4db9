"""
Review of the table of repeated hits (issue 16, :mod:`buildcache.engine.hot`):
cases where an answer from the table must be the answer the ordinary path
gives now.  Real TCP on 127.0.0.1, as :mod:`tests.test_hot_hits`.
"""

from __future__ import annotations

import hashlib

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from buildcache.engine.hot import HotAnswer, HotHits
from buildcache.frontends.channel import ProxyChannel
from buildcache.frontends.sites import StrictSite
from tests.pyindex import StaticSimpleIndex
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
from tests.test_hit_direct import whole_response
from tests.test_proxy import RawConnection, raw_connection, raw_request, until
from tests.test_simple_index import TTL, Harness, fixture_for

WHEEL = "demo_p-1.0-py3-none-any.whl"
WHEEL_BODY = b"a wheel, not a real one " * 400


async def _until_hit(test: TestCase, connection: RawConnection, request: bytes) -> None:
    """Ask ``request`` on ``connection`` until it is answered a hit (at most 10 times)."""
    for _ in range(10):
        if b"\r\nX-Cache: HIT\r\n" in await whole_response(connection, request):
            return
    test.fail(f"never a hit: {request[:60]!r}")


def _page(listed: bool) -> bytes:
    """A PEP 503 page of project demo-p, listing the wheel or not."""
    digest = hashlib.sha256(WHEEL_BODY).hexdigest()
    link = (
        f'<a href="/wheels/{WHEEL}#sha256={digest}">{WHEEL}</a><br/>'
        if listed else ""
    )
    return (
        "<!DOCTYPE html><html><body>"
        f'<a href="/wheels/other-1.0.tar.gz">other-1.0.tar.gz</a><br/>{link}'
        "</body></html>"
    ).encode()


#: Pages the upstream marks not to be stored: the page a client saw lives
#: only in the index's memory (PageResolver._served), never in a row.
_PAGE_HEADERS = {"Content-Type": "text/html", "Cache-Control": "no-store"}


class PageChangedTests(TestCase):
    """
    The index port: a file is answered only while the page the client
    last saw lists it (:meth:`PageResolver.known_page`).
    """

    timeout = 60

    def setUp(self) -> None:
        upstream = FakeUpstream()
        upstream.bodies["/simple/demo-p/"] = GatedBody(_page(True), headers=_PAGE_HEADERS)
        upstream.bodies[f"/wheels/{WHEEL}"] = GatedBody(WHEEL_BODY)
        self.upstream = upstream
        port = listen(upstream)
        self.addCleanup(port.stopListening)
        self.running: Running = start_server(
            self, {"pypi_upstreams": (url_of(port).rstrip("/") + "/simple",)}
        )

    async def test_file_delisted_while_page_was_fetched(self) -> None:
        """
        A file answered (and remembered) while a new page of its project
        was on its way is not answered from the table once that page,
        which no longer lists it, has been served: the ordinary path
        answers 404 ("not listed on the page").  The page changed in
        memory only (not stored: ``no-store``), and no download started
        after the file's request was offered.
        """
        port = self.running.index_port
        client = Client()
        self.addCleanup(client.close)
        page_url = f"http://127.0.0.1:{port}/simple/demo-p/"
        first = await client.get(page_url)
        self.assertIn(WHEEL.encode(), first.body)
        file_request = raw_request("GET", f"/files/demo-p/{WHEEL}", "box", [("User-Agent", "pip")])
        files = await raw_connection(self, port)
        await _until_hit(self, files, file_request)
        # A new page, gated: its download starts (and stays in flight).
        gate: Deferred[None] = Deferred()
        self.upstream_page(GatedBody(_page(False), before_gate=10, gate=gate, headers=_PAGE_HEADERS))
        page_answer = ensureDeferred(client.get(page_url))
        await until(lambda: self.upstream.requests["/simple/demo-p/"] >= 2)
        # Meanwhile the wheel is a hit of the page still known (remembered).
        for _ in range(2):
            answer = await whole_response(files, file_request)
            self.assertIn(b" 200 OK\r\n", answer[:20])
        gate.callback(None)
        second = await page_answer
        self.assertNotIn(WHEEL.encode(), second.body)
        # The ordinary path now: a request the table never saw.
        ordinary = await whole_response(
            files, raw_request("GET", f"/files/demo-p/{WHEEL}", "box", [("User-Agent", "pip2")])
        )
        self.assertTrue(ordinary.startswith(b"HTTP/1.1 404 "), ordinary[:100])
        answer = await whole_response(files, file_request)
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 "), answer[:100])

    def upstream_page(self, body: GatedBody) -> None:
        self.upstream.bodies["/simple/demo-p/"] = body


class MetadataReadAheadTests(TestCase):
    """
    The index port: answering a wheel's core metadata reads the pages of
    its dependencies ahead when they are not fresh
    (:meth:`Prefetcher.after_core_metadata`), every time, hit or not.
    """

    timeout = 60

    def serve(self, hot: bool) -> tuple[Harness, int]:
        from tests.test_pypi_readahead import RELEASES

        harness = Harness(
            self, [StaticSimpleIndex(fixture_for(self, RELEASES))],
            prefetch_max_size=32 * 1024**2,
        )
        site = StrictSite(
            harness.resource, reactor=reactor,
            hot=harness.engine.hot_hits() if hot else None,
        )
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return harness, port.getHost().port

    async def pages_read_ahead_after_ttl(self, hot: bool) -> int:
        """
        How many times the origin was asked for a dependency's page once
        the same metadata request comes again after the pages' TTL.
        """
        from tests.test_pypi_readahead import METADATA_A, PIP_USER_AGENT

        harness, port = self.serve(hot)
        real_answer = HotHits.answer

        def answer(table: HotHits, client: str, raw: bytes) -> HotAnswer | None:
            response = real_answer(table, client, raw)
            self.from_table.append(response is not None)
            return response

        self.from_table: list[bool] = []
        self.patch(HotHits, "answer", answer)
        assert harness.prefetcher is not None
        upstream = harness.upstreams[0]
        page = await harness.page("rda-a")
        self.assertEqual(page.status, 200)
        request = raw_request("GET", METADATA_A, "box", [("User-Agent", PIP_USER_AGENT)])
        connection = await raw_connection(self, port)
        for _ in range(3):
            answer = await whole_response(connection, request)
            self.assertIn(b" 200 OK\r\n", answer[:20])
            await harness.prefetcher.when_done()
            # pip asks for them next (read ahead: hits).
        for name in ("rda-b", "rda-c"):
            self.assertEqual((await harness.page(name)).header("x-cache"), "HIT")
        before = upstream.requests_for("/simple/rda-b/")
        self.assertEqual(before, 1)
        harness.clock.advance(TTL + 1)
        answer = await whole_response(connection, request)
        self.assertIn(b" 200 OK\r\n", answer[:20])
        await harness.prefetcher.when_done()
        return upstream.requests_for("/simple/rda-b/") - before

    async def test_ordinary_path_reads_ahead(self) -> None:
        """Without the table, the stale page of a dependency is read ahead."""
        self.assertEqual(await self.pages_read_ahead_after_ttl(hot=False), 1)

    async def test_repeated_metadata_still_reads_ahead(self) -> None:
        """
        A metadata request answered from the table of repeated hits reads
        the dependencies' stale pages ahead as the ordinary path does.
        """
        self.assertEqual(await self.pages_read_ahead_after_ttl(hot=True), 1)
        # The third answer and the one after the TTL came from the table.
        self.assertEqual(self.from_table, [False, False, True, True])


class StrayLineTests(TestCase):
    """
    The proxy port's mirror route in front of an upstream with one small
    immutable file: a client that sends a stray CRLF after each request.
    """

    timeout = 60

    async def test_stray_crlf_after_each_answer(self) -> None:
        """
        One stray CRLF before each request line is skipped (RFC 9112 2.2),
        whichever way the request before it was answered: an answer from
        the table, which ``HTTPChannel`` never sees, must not leave it
        counting the next CRLF as the second one in a row (a 400 and a
        closed connection).
        """
        path = "/files/small-1.0-r0.apk"
        whole = pattern_bytes(20 * 1024, path.encode())
        upstream = FakeUpstream()
        upstream.bodies[path] = GatedBody(whole, headers={"ETag": '"v1"'})
        running = start_server(self, {}, upstream=upstream)
        rendered: list[object] = []
        proxy = running.server.proxy
        real_render = proxy.render

        def counting_render(request: object) -> object:
            rendered.append(request)
            return real_render(request)

        self.patch(proxy, "render", counting_render)
        empty_lines: list[bytes] = []
        real_line = ProxyChannel.lineReceived

        def counting_lines(channel: ProxyChannel, line: bytes) -> None:
            # Not the blank line that ends a head: one before a request line.
            if not line and channel._phase.value == "request-line":
                empty_lines.append(line)
            real_line(channel, line)

        self.patch(ProxyChannel, "lineReceived", counting_lines)
        request = raw_request("GET", f"/up{path}", "box", [("User-Agent", "apk")])
        connection = await raw_connection(self, running.proxy_port)
        await _until_hit(self, connection, request)
        answer = await whole_response(connection, request)
        before = len(rendered)
        for turn in range(3):
            connection.send(b"\r\n")
            # Read on its own (then the request is answered from the table).
            await until(lambda: len(empty_lines) > turn)
            answer = await whole_response(connection, request)
            self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:100])
            self.assertTrue(answer.endswith(whole))
        # Answered from the table.
        self.assertEqual(len(rendered), before)
