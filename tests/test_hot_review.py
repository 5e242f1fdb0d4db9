"""
Review of the table of repeated hits (issue 16, :mod:`buildcache.engine.hot`):
cases where an answer from the table must be the answer the ordinary path
gives now.  Real TCP on 127.0.0.1, as :mod:`tests.test_hot_hits`.
"""

from __future__ import annotations

import hashlib

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase

from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    Running,
    listen,
    start_server,
    url_of,
)
from tests.test_hit_direct import whole_response
from tests.test_proxy import raw_connection, raw_request, until

WHEEL = "demo_p-1.0-py3-none-any.whl"
WHEEL_BODY = b"a wheel, not a real one " * 400


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
        for _ in range(10):
            answer = await whole_response(files, file_request)
            if b"\r\nX-Cache: HIT\r\n" in answer:
                break
        else:
            self.fail("the wheel never became a hit")
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
