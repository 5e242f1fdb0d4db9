"""
Tests for :func:`buildcache.ecosystems.pypi.index`: the pip / uv simple index, served on
127.0.0.1 from in-process :func:`tests.pyindex.StaticSimpleIndex` upstreams
(PEP 691 JSON and HTML-only), through a real store and fetcher.

The store, the fetcher and the index share one :class:`Clock`, so TTLs and the
one-minute memory of upstream 404s are tested by advancing it; network I/O
runs on the real reactor.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from buildcache.access import AccessPolicy
from buildcache.ecosystems.pypi.assemble import index_resource
from buildcache.ecosystems.pypi.index import IndexResource, file_link
from buildcache.ecosystems.pypi.model import (
    MEDIA_TYPE_HTML,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_LEGACY_HTML,
    UPSTREAM_ACCEPT,
    ProjectPage,
)
from buildcache.ecosystems.pypi.pages import NEGATIVE_TTL, page_key
from buildcache.ecosystems.pypi.parse import (
    parse_html_page,
    parse_json_page,
)
from buildcache.ecosystems.pypi.policy import CLIENT_REVALIDATION_FLOOR
from buildcache.ecosystems.pypi.prefetch import Prefetcher
from buildcache.ecosystems.pypi.render import (
    render_root_html,
)
from buildcache.engine.backoff import UPSTREAM_FAILURE_BACKOFF
from buildcache.engine.core import Engine
from buildcache.engine.keys import cache_key
from buildcache.fetch.fetcher import Fetcher, UpstreamRequest, upstream_client
from buildcache.ops.activity import Activity
from buildcache.store import BlockingRunner, Store
from tests.pyindex import (
    FIXTURE_EPOCH,
    DemoRelease,
    IndexFixture,
    StaticSimpleIndex,
    build_index,
)
from tests.support import Client, HeldRunner, Received, listen, reactor

PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)
UV_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html; q=0.2, text/html; q=0.01"
)
TTL = 300.0
WHEEL_A2 = "bcdemo_a-2.0-py3-none-any.whl"
SDIST_A2 = "bcdemo_a-2.0.tar.gz"
WHEEL_B1 = "bcdemo_b-1.0-py3-none-any.whl"


@attrs.define
class Got(Received):
    """
    A :class:`Received` that also knows the announced length: Twisted's client
    moves ``Content-Length`` of a GET response out of the headers.
    """

    length: int | None = None

    def header(self, name: str) -> str | None:
        value = super().header(name)
        if value is None and name.lower() == "content-length" and self.length is not None:
            return str(self.length)
        return value


class _Collector(Protocol):
    def __init__(self, done: Deferred[tuple[bytes, Failure]]) -> None:
        self._chunks: list[bytes] = []
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._done.callback((b"".join(self._chunks), reason))


async def fetch(
    agent: Any, url: str, headers: Mapping[str, str] | None = None,
    method: bytes = b"GET",
) -> Got:
    raw = Headers({k: [v] for k, v in (headers or {}).items()})
    response = await agent.request(method, url.encode(), raw)
    done: Deferred[tuple[bytes, Failure]] = Deferred()
    response.deliverBody(_Collector(done))
    body, reason = await done
    complete = reason.check(ResponseDone) is not None
    length = response.length if isinstance(response.length, int) else None
    return Got(
        response.code, response.headers, body, complete,
        None if complete else reason, length,
    )


@implementer(IAgent)
class CountingAgent:
    """
    The agent under the fetcher's treq client, recording every upstream
    request it makes.
    """

    def __init__(self, agent: IAgent) -> None:
        self.agent = agent
        self.urls: list[str] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        self.urls.append(uri.decode("ascii"))
        return self.agent.request(method, uri, headers, bodyProducer)


def port_number(port: IListeningPort) -> int:
    return int(getattr(port.getHost(), "port"))


async def stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


def stop_later(port: IListeningPort) -> Deferred[None]:
    return Deferred.fromCoroutine(stop(port))


@attrs.define
class Upstream:
    index: StaticSimpleIndex
    port: IListeningPort
    stopped: bool = False

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{port_number(self.port)}/simple"

    def requests_for(self, path: str) -> int:
        return self.index.requests[path]

    async def stop(self) -> None:
        self.stopped = True
        await stop(self.port)


class Harness:
    """
    An :class:`IndexResource` on 127.0.0.1 in front of some upstreams, with its
    store, fetcher and clock.
    """

    def __init__(
        self,
        testcase: TestCase,
        indexes: Sequence[StaticSimpleIndex],
        index_ttl: float = TTL,
        clock: IReactorTime | None = None,
        run_blocking: BlockingRunner | None = None,
        prefetch_max_size: int | None = None,
    ) -> None:
        self.testcase = testcase
        if clock is None:
            fake = Clock()
            fake.advance(FIXTURE_EPOCH + 86400)
            clock = fake
        self.clock: Any = clock
        self.store = Store.open(testcase.mktemp(), 1 << 30, self.clock, run_blocking)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = CountingAgent(Agent(reactor, pool=self.pool))
        self.fetcher = Fetcher(self.store, upstream_client(self.http), self.clock)
        # Outcomes, bytes and read-aheads, as the status page counts them.
        self.activity = Activity(self.clock)
        self.engine = Engine(self.store, self.fetcher, self.clock, self.activity, index_ttl)
        self.prefetcher = (
            None if prefetch_max_size is None
            else Prefetcher(self.engine, reactor, prefetch_max_size, observer=self.activity)
        )
        self.upstreams = [Upstream(index, listen(index)) for index in indexes]
        self.resource = self.make_resource(index_ttl)
        self.port = listen(self.resource)
        self.client = Client()
        testcase.addCleanup(lambda: Deferred.fromCoroutine(self._shut()))

    def make_resource(self, index_ttl: float = TTL) -> IndexResource:
        return index_resource(
            self.engine, [u.base for u in self.upstreams], index_ttl,
            prefetcher=self.prefetcher,
        )

    async def _shut(self) -> None:
        await stop(self.port)
        for upstream in self.upstreams:
            if not upstream.stopped:
                await stop(upstream.port)
        await self.pool.closeCachedConnections()
        await self.client.close()
        self.store.close()

    @property
    def index_port(self) -> int:
        return port_number(self.port)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.index_port}{path}"

    async def get(
        self, path: str, headers: Mapping[str, str] | None = None,
        method: bytes = b"GET",
    ) -> Got:
        return await fetch(self.client.agent(), self.url(path), headers, method)

    async def page(
        self, name: str, accept: str | None = PIP_ACCEPT, **headers: str
    ) -> Got:
        wanted = dict(headers)
        if accept is not None:
            wanted["accept"] = accept
        return await self.get(f"/simple/{name}/", wanted)


def fixture_for(
    testcase: TestCase,
    releases: Sequence[DemoRelease] | None = None,
    with_metadata: bool = True,
) -> IndexFixture:
    directory = Path(testcase.mktemp())
    if releases is None:
        return build_index(directory, with_metadata=with_metadata)
    return build_index(directory, releases=releases, with_metadata=with_metadata)


def log_events(testcase: TestCase) -> EventLoggingObserver:
    return EventLoggingObserver.createWithCleanup(testcase, globalLogPublisher)


def logged(observer: EventLoggingObserver, level: LogLevel, text: str) -> bool:
    return any(
        event.get("log_level") == level and text in event.get("log_format", "")
        for event in observer
    )


class PageTests(TestCase):
    """
    Project pages: negotiation, rendering, redirects, conditional requests.
    """

    def setUp(self) -> None:
        self.fixture = fixture_for(self)
        self.harness = Harness(self, [StaticSimpleIndex(self.fixture)])
        self.upstream = self.harness.upstreams[0]

    def expected(self, name: str) -> ProjectPage:
        return self.fixture.page(name, "http://x/")

    async def test_json_page(self) -> None:
        """
        pip's Accept gets the PEP 691 JSON page with every field of the
        upstream's model, file links relative to this port, and the cache
        headers pip and uv rely on.
        """
        received = await self.harness.page("bcdemo-a")
        self.assertEqual(received.status, 200, received.body)
        self.assertEqual(received.header("content-type"), MEDIA_TYPE_JSON)
        self.assertEqual(received.header("vary"), "Accept")
        self.assertEqual(received.header("cache-control"), "max-age=300")
        self.assertEqual(received.header("x-cache"), "MISS")
        self.assertTrue(received.header("etag"))
        self.assertEqual(received.header("content-length"), str(len(received.body)))
        document = json.loads(received.body)
        self.assertEqual(document["meta"]["api-version"], "1.1")
        self.assertEqual(document["versions"], ["1.0", "2.0", "3.0"])
        page_url = self.harness.url("/simple/bcdemo-a/")
        page = parse_json_page(received.body, page_url)
        expected = self.expected("bcdemo-a")
        self.assertEqual(
            [f.filename for f in page.files], [f.filename for f in expected.files]
        )
        for got, want in zip(page.files, expected.files):
            self.assertEqual(
                got.url, self.harness.url(f"/files/bcdemo-a/{want.filename}")
            )
            self.assertEqual(got.hashes, want.hashes)
            self.assertEqual(got.requires_python, want.requires_python)
            self.assertEqual(got.yanked, want.yanked)
            self.assertEqual(got.core_metadata, want.core_metadata)
            self.assertEqual(got.size, want.size)
            self.assertEqual(got.upload_time, want.upload_time)
        raw_urls = [entry["url"] for entry in document["files"]]
        self.assertTrue(all(url.startswith("../../files/bcdemo-a/") for url in raw_urls))
        # The upstream was asked for JSON first.
        self.assertEqual(self.upstream.index.request_log[0].headers["accept"], UPSTREAM_ACCEPT)
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 1)

    async def test_html_page(self) -> None:
        """
        HTML clients get PEP 503 anchors: text equal to the file name, the
        hash fragment kept, requires-python escaped, yanks and core
        metadata mirrored.
        """
        received = await self.harness.page("bcdemo-b", accept="text/html")
        self.assertEqual(received.header("content-type"), MEDIA_TYPE_LEGACY_HTML)
        body = received.body
        yanked_wheel = "bcdemo_b-2.0-py3-none-any.whl"
        digest = self.fixture.file(yanked_wheel).sha256
        self.assertIn(
            f'<a href="../../files/bcdemo-b/{yanked_wheel}#sha256={digest}"'.encode(),
            body,
        )
        self.assertIn(f">{yanked_wheel}</a>".encode(), body)
        self.assertIn(b'data-yanked="broken build"', body)
        self.assertIn(b'data-core-metadata="sha256=', body)
        self.assertIn(b'data-dist-info-metadata="sha256=', body)
        page = parse_html_page(body, self.harness.url("/simple/bcdemo-b/"))
        expected = self.expected("bcdemo-b")
        for got, want in zip(page.files, expected.files, strict=True):
            self.assertEqual(
                (got.filename, got.hashes, got.yanked, got.core_metadata),
                (want.filename, want.hashes, want.yanked, want.core_metadata),
            )

        a_page = await self.harness.page("bcdemo-a", accept=MEDIA_TYPE_HTML)
        self.assertEqual(a_page.header("content-type"), MEDIA_TYPE_HTML)
        self.assertIn(b'data-requires-python="&gt;=3.8"', a_page.body)
        self.assertIn(b'data-requires-python="&gt;=4"', a_page.body)
        self.assertNotIn(b'">=', a_page.body)

    async def test_negotiation_from_one_upstream_request(self) -> None:
        """
        Every representation comes from one upstream fetch of the page;
        no Accept and ``*/*`` mean plain HTML.
        """
        cases = [
            (PIP_ACCEPT, MEDIA_TYPE_JSON),
            (UV_ACCEPT, MEDIA_TYPE_JSON),
            (MEDIA_TYPE_HTML, MEDIA_TYPE_HTML),
            ("text/html", MEDIA_TYPE_LEGACY_HTML),
            ("*/*", MEDIA_TYPE_LEGACY_HTML),
            (None, MEDIA_TYPE_LEGACY_HTML),
        ]
        etags = set()
        for accept, media_type in cases:
            received = await self.harness.page("bcdemo-a", accept=accept)
            self.assertEqual(received.status, 200)
            self.assertEqual(received.header("content-type"), media_type, accept)
            self.assertEqual(received.header("vary"), "Accept")
            etags.add((media_type, received.header("etag")))
        self.assertEqual(len({tag for _, tag in etags}), 3)
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 1)

    async def test_not_acceptable(self) -> None:
        """
        An Accept header naming none of the three types gets 406 with
        ``Vary: Accept``, without asking upstream.
        """
        received = await self.harness.page("bcdemo-a", accept="application/xml")
        self.assertEqual(received.status, 406)
        self.assertEqual(received.header("vary"), "Accept")
        self.assertIn(MEDIA_TYPE_JSON.encode(), received.body)
        self.assertEqual(self.upstream.index.request_log, [])

    async def test_redirects(self) -> None:
        """
        Non-normalised and slash-less project paths get a 301 to the
        normalised page, as does ``/simple``; nothing is asked upstream.
        """
        for path, location in [
            ("/simple/BcDemo_A/", "/simple/bcdemo-a/"),
            ("/simple/bcdemo.a/", "/simple/bcdemo-a/"),
            ("/simple/bcdemo-a", "/simple/bcdemo-a/"),
            ("/simple/BCDEMO__A", "/simple/bcdemo-a/"),
            ("/simple", "/simple/"),
        ]:
            received = await self.harness.get(path)
            self.assertEqual((received.status, received.header("location")), (301, location), path)
        self.assertEqual(self.upstream.index.request_log, [])

    async def test_invalid_names(self) -> None:
        """
        A name that is not a PEP 508 name is a 404 that says why.
        """
        for path in [
            "/simple/-bad/", "/simple/a%20b/", "/simple/bad_/", "/simple/%2E%2E/",
            # Not printable ASCII: refused whatever packaging version.
            "/simple/numpy%0A/", "/simple/caf%C3%A9/", "/simple/%E2%84%AAelvin/",
        ]:
            received = await self.harness.get(path)
            self.assertEqual(received.status, 404, path)
            self.assertIn(b"not a valid project name", received.body)
        self.assertEqual(self.upstream.index.request_log, [])

    async def test_etag_and_304(self) -> None:
        """
        Each representation has its own ETag; ``If-None-Match`` with it gets
        a 304 carrying the same headers and no body.
        """
        first = await self.harness.page("bcdemo-a")
        etag = first.header("etag")
        assert etag is not None
        again = await self.harness.page("bcdemo-a", **{"if-none-match": etag})
        self.assertEqual(again.status, 304)
        self.assertEqual(again.body, b"")
        self.assertEqual(again.header("etag"), etag)
        self.assertEqual(again.header("vary"), "Accept")
        self.assertEqual(again.header("cache-control"), "max-age=300")
        html = await self.harness.page("bcdemo-a", accept="text/html", **{"if-none-match": etag})
        self.assertEqual(html.status, 200)
        self.assertNotEqual(html.header("etag"), etag)
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 1)

    async def test_head(self) -> None:
        """
        HEAD of a page gives the GET's headers without a body.
        """
        get = await self.harness.page("bcdemo-a")
        head = await self.harness.get(
            "/simple/bcdemo-a/", {"accept": PIP_ACCEPT}, b"HEAD"
        )
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertEqual(head.header("content-length"), str(len(get.body)))
        self.assertEqual(head.header("etag"), get.header("etag"))

    async def test_page_stored_by_key(self) -> None:
        """
        The upstream's page body is stored under the page key, as the
        upstream sent it.
        """
        await self.harness.page("bcdemo-a")
        entry = self.harness.store.peek(page_key(self.upstream.base, "bcdemo-a"))
        assert entry is not None
        self.assertEqual(entry.headers["content-type"], MEDIA_TYPE_JSON)

    async def test_front_page_and_unknown_paths(self) -> None:
        """
        ``/`` points at ``/simple/``; other paths are 404 with a hint.
        """
        front = await self.harness.get("/")
        self.assertEqual(front.status, 200)
        self.assertEqual(front.header("content-type"), "text/plain; charset=utf-8")
        self.assertIn(f"http://127.0.0.1:{self.harness.index_port}/simple/".encode(), front.body)
        for path in ["/nothing", "/simple/bcdemo-a/extra/", "/files/bcdemo-a"]:
            received = await self.harness.get(path)
            self.assertEqual(received.status, 404, path)
            self.assertIn(b"/simple/", received.body)
        post = await self.harness.get("/simple/bcdemo-a/", method=b"POST")
        self.assertEqual(post.status, 405)

    async def test_absolute_uri(self) -> None:
        """
        An absolute-form request (as the proxy port forwards one addressed
        to the index port) is served by its path.
        """
        through = Client(proxy_port=self.harness.index_port)
        self.addCleanup(lambda: Deferred.fromCoroutine(through.close()))
        received = await through.get(
            "http://box.invalid:3141/simple/bcdemo-a/", {"accept": PIP_ACCEPT}
        )
        self.assertEqual(received.status, 200)
        self.assertEqual(received.header("content-type"), MEDIA_TYPE_JSON)
        redirected = await through.get("http://box.invalid:3141/simple/BcDemo_A/")
        self.assertEqual(redirected.status, 301)
        self.assertEqual(redirected.header("location"), "/simple/bcdemo-a/")

    async def test_client_policy(self) -> None:
        """
        With an access policy, a client outside ``allow_from`` gets 403 and
        nothing is asked upstream; one inside is served.
        """
        refusing = index_resource(
            self.harness.engine, [self.upstream.base], TTL,
            policy=AccessPolicy.from_config(["10.0.0.0/8"], [], []),
        )
        allowing = index_resource(
            self.harness.engine, [self.upstream.base], TTL,
            policy=AccessPolicy.from_config(["127.0.0.0/8"], [], []),
        )
        for resource, status in ((refusing, 403), (allowing, 200)):
            port = listen(resource)
            self.addCleanup(stop_later, port)
            received = await fetch(
                self.harness.client.agent(),
                f"http://127.0.0.1:{port_number(port)}/simple/bcdemo-a/",
            )
            self.assertEqual(received.status, status)
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 1)

    async def test_concurrent_cold_requests(self) -> None:
        """
        Concurrent requests for a page nobody has fetched share one
        upstream request.
        """
        received = await gatherResults(
            [Deferred.fromCoroutine(self.harness.page("bcdemo-a")) for _ in range(5)]
        )
        self.assertEqual({r.status for r in received}, {200})
        self.assertEqual(len({r.body for r in received}), 1)
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 1)

    def test_file_link_resolves(self) -> None:
        """
        Links on ``/simple/<name>/`` resolve to ``/files/<name>/<filename>``,
        and the last segment is the file name.
        """
        from urllib.parse import unquote, urljoin

        for filename in [WHEEL_A2, "x-1.0+local-py3-none-any.whl", "a b.tar.gz"]:
            link = file_link("bcdemo-a", filename)
            resolved = urljoin("http://h:1/simple/bcdemo-a/", link)
            self.assertTrue(resolved.startswith("http://h:1/files/bcdemo-a/"))
            self.assertEqual(unquote(resolved.rpartition("/")[2]), filename)


class HtmlOnlyUpstreamTests(TestCase):
    """
    An upstream that only speaks HTML: its page is parsed from HTML and
    still served as JSON.
    """

    async def test_json_from_html_upstream(self) -> None:
        fixture = fixture_for(self)
        harness = Harness(self, [StaticSimpleIndex(fixture, json=False)])
        received = await harness.page("bcdemo-a")
        self.assertEqual(received.header("content-type"), MEDIA_TYPE_JSON)
        document = json.loads(received.body)
        self.assertEqual(document["meta"]["api-version"], "1.0")
        page = parse_json_page(received.body, harness.url("/simple/bcdemo-a/"))
        expected = fixture.page("bcdemo-a", "http://x/")
        for got, want in zip(page.files, expected.files, strict=True):
            self.assertEqual(
                (got.filename, got.hashes, got.requires_python, got.yanked, got.core_metadata),
                (want.filename, want.hashes, want.requires_python, want.yanked, want.core_metadata),
            )
            self.assertIsNone(got.size)
        entry = harness.store.peek(page_key(harness.upstreams[0].base, "bcdemo-a"))
        assert entry is not None
        self.assertEqual(entry.headers["content-type"], "text/html")
        metadata = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}.metadata")
        self.assertEqual(metadata.status, 200)
        self.assertEqual(metadata.body, fixture.metadata[WHEEL_A2])


class MetadataTests(TestCase):
    """
    PEP 658 metadata: advertised and served when the upstream has it,
    neither when it does not.
    """

    async def test_metadata_served(self) -> None:
        fixture = fixture_for(self)
        harness = Harness(self, [StaticSimpleIndex(fixture)])
        page = json.loads((await harness.page("bcdemo-a")).body)
        entry = next(f for f in page["files"] if f["filename"] == WHEEL_A2)
        digest = hashlib.sha256(fixture.metadata[WHEEL_A2]).hexdigest()
        self.assertEqual(entry["core-metadata"], {"sha256": digest})
        sdist = next(f for f in page["files"] if f["filename"] == SDIST_A2)
        self.assertNotIn("core-metadata", sdist)
        for expected_status in ["MISS", "HIT"]:
            received = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}.metadata")
            self.assertEqual(received.status, 200)
            self.assertEqual(received.body, fixture.metadata[WHEEL_A2])
            self.assertEqual(received.header("x-cache"), expected_status)
            self.assertEqual(received.header("cache-control"), "max-age=31536000, immutable")
        self.assertEqual(
            harness.upstreams[0].requests_for(f"/files/{WHEEL_A2}.metadata"), 1
        )
        # The sdist's metadata is not advertised, so not served.
        missing = await harness.get(f"/files/bcdemo-a/{SDIST_A2}.metadata")
        self.assertEqual(missing.status, 404)
        self.assertIn(b"no core metadata", missing.body)

    async def test_metadata_not_advertised(self) -> None:
        fixture = fixture_for(self, with_metadata=False)
        harness = Harness(self, [StaticSimpleIndex(fixture)])
        page = json.loads((await harness.page("bcdemo-a")).body)
        for entry in page["files"]:
            self.assertNotIn("core-metadata", entry)
            self.assertNotIn("dist-info-metadata", entry)
        html = await harness.page("bcdemo-a", accept="text/html")
        self.assertNotIn(b"metadata", html.body)
        received = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}.metadata")
        self.assertEqual(received.status, 404)
        self.assertEqual(
            harness.upstreams[0].requests_for(f"/files/{WHEEL_A2}.metadata"), 0
        )


class FileTests(TestCase):
    """
    Distribution files: checked, stored once, served with lengths, ranges
    and immutable caching.
    """

    def setUp(self) -> None:
        self.fixture = fixture_for(self)
        self.harness = Harness(self, [StaticSimpleIndex(self.fixture)])
        self.upstream = self.harness.upstreams[0]

    async def test_file_miss_then_hit(self) -> None:
        await self.harness.page("bcdemo-a")
        data = self.fixture.content(SDIST_A2)
        for expected_status in ["MISS", "HIT"]:
            received = await self.harness.get(
                f"/files/bcdemo-a/{SDIST_A2}", {"accept-encoding": "gzip"}
            )
            self.assertEqual(received.status, 200)
            self.assertEqual(received.body, data)
            self.assertEqual(received.header("x-cache"), expected_status)
            self.assertEqual(received.header("content-length"), str(len(data)))
            self.assertEqual(received.header("accept-ranges"), "bytes")
            self.assertEqual(received.header("cache-control"), "max-age=31536000, immutable")
            self.assertIsNone(received.header("content-encoding"))
        self.assertEqual(self.upstream.requests_for(f"/files/{SDIST_A2}"), 1)
        url = f"{self.upstream.base.removesuffix('/simple')}/files/{SDIST_A2}"
        entry = self.harness.store.peek(cache_key(url))
        assert entry is not None
        self.assertEqual(entry.sha256, hashlib.sha256(data).hexdigest())

    async def test_head_to_an_upstream_without_head(self) -> None:
        """
        An index that answers 405 to a HEAD for a file is asked with a GET:
        the client's HEAD gets the file's length, and the checked file is
        stored (before: a 502).
        """
        await self.harness.page("bcdemo-a")
        self.upstream.index.head_allowed = False
        data = self.fixture.content(WHEEL_A2)
        head = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}", method=b"HEAD")
        self.assertEqual(
            (head.status, head.header("content-length"), head.body),
            (200, str(len(data)), b""),
        )
        self.assertEqual(
            [r.method for r in self.upstream.index.request_log if r.path == f"/files/{WHEEL_A2}"],
            ["HEAD", "GET"],
        )
        await self.harness.fetcher.when_idle()
        again = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((again.header("x-cache"), again.body), ("HIT", data))

    async def test_head_and_ranges(self) -> None:
        """
        What uv does without metadata: HEAD, then a suffix range; both
        correct on a cold file, the HEAD answered by a HEAD upstream (no
        body fetched for it), the ranges by one download.
        """
        await self.harness.page("bcdemo-a")
        data = self.fixture.content(WHEEL_A2)
        head = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}", method=b"HEAD")
        self.assertEqual(head.status, 200)
        self.assertEqual(head.body, b"")
        self.assertEqual(head.header("content-length"), str(len(data)))
        self.assertEqual(head.header("accept-ranges"), "bytes")
        tail = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}", {"range": "bytes=-100"})
        self.assertEqual(tail.status, 206)
        self.assertEqual(tail.body, data[-100:])
        self.assertEqual(
            tail.header("content-range"),
            f"bytes {len(data) - 100}-{len(data) - 1}/{len(data)}",
        )
        self.assertEqual(tail.header("content-length"), "100")
        middle = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}", {"range": "bytes=10-19"})
        self.assertEqual((middle.status, middle.body), (206, data[10:20]))
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), 2)
        self.assertEqual(
            [r.method for r in self.upstream.index.request_log if r.path == f"/files/{WHEEL_A2}"],
            ["HEAD", "GET"],
        )
        # Nothing was stored for the HEAD; the download for the ranges was.
        self.assertEqual(head.header("x-cache"), "MISS")

    async def test_range_on_cold_file(self) -> None:
        await self.harness.page("bcdemo-b")
        data = self.fixture.content(WHEEL_B1)
        received = await self.harness.get(f"/files/bcdemo-b/{WHEEL_B1}", {"range": "bytes=-64"})
        self.assertEqual((received.status, received.body), (206, data[-64:]))
        self.assertEqual(received.header("x-cache"), "MISS")

    async def test_hash_mismatch(self) -> None:
        """
        A file whose bytes do not match the page's sha256 is a 502 and an
        error event, and is not stored: the next request tries again.
        """
        observer = log_events(self)
        await self.harness.page("bcdemo-a")
        self.fixture.path_for(WHEEL_A2).write_bytes(b"not the wheel you are looking for")
        for attempt in (1, 2):
            received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
            self.assertEqual(received.status, 502)
            self.assertIn(b"sha256", received.body)
            self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), attempt)
        url = f"{self.upstream.base.removesuffix('/simple')}/files/{WHEEL_A2}"
        self.assertIsNone(self.harness.store.peek(cache_key(url)))
        self.assertTrue(logged(observer, LogLevel.error, "does not match the sha256"))

    async def test_file_of_unknown_size_streams_before_its_check(self) -> None:
        """
        A file the page gives no size for may be large: it streams (a
        client waiting for the whole of a big wheel would time out), all but
        its last 64 KB until the check passes.  This one is smaller than
        that, so a mismatch is still a clean 502 before any byte; nothing
        is stored, and an error is logged.
        """
        observer = log_events(self)
        fixture = fixture_for(self)
        harness = Harness(self, [StaticSimpleIndex(fixture, json=False)])
        await harness.page("bcdemo-a")
        good = fixture.content(WHEEL_A2)
        fixture.path_for(WHEEL_A2).write_bytes(b"x" * len(good))
        received = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual(received.status, 502)
        self.assertIn(b"sha256", received.body)
        url = f"{harness.upstreams[0].base.removesuffix('/simple')}/files/{WHEEL_A2}"
        await harness.fetcher.when_idle()
        self.assertIsNone(harness.store.peek(cache_key(url)))
        self.assertTrue(logged(observer, LogLevel.error, "fails its check"))
        # The right bytes stream whole and are stored.
        fixture.path_for(WHEEL_A2).write_bytes(good)
        again = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((again.status, again.complete, again.body), (200, True, good))
        await harness.fetcher.when_idle()
        self.assertIsNotNone(harness.store.peek(cache_key(url)))

    async def test_file_larger_than_max_object_size(self) -> None:
        """
        A file larger than ``--max-object-size`` is served, checked against
        its page's sha256, and not stored: a small one that must be checked
        before any byte goes out is spooled and checked whole; one that
        streams before its check (no size on its page) is streamed without
        being spooled and checked in memory, a mismatch cutting it.
        """
        observer = log_events(self)
        for json_pages in (True, False):
            fixture = fixture_for(self)
            harness = Harness(self, [StaticSimpleIndex(fixture, json=json_pages)])
            harness.store.max_object_size = 100
            await harness.page("bcdemo-a")
            good = fixture.content(WHEEL_A2)
            url = f"{harness.upstreams[0].base.removesuffix('/simple')}/files/{WHEEL_A2}"
            for _ in range(2):
                received = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
                self.assertEqual(
                    (received.status, received.complete, received.body), (200, True, good)
                )
                await harness.fetcher.when_idle()
                self.assertIsNone(harness.store.peek(cache_key(url)))
                self.assertEqual(harness.store.reserved, 0)
                self.assertEqual(os.listdir(os.path.join(harness.store.directory, "tmp")), [])
            self.assertEqual(harness.upstreams[0].requests_for(f"/files/{WHEEL_A2}"), 2)
            fixture.path_for(WHEEL_A2).write_bytes(b"x" * len(good))
            bad = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
            self.assertEqual(bad.status, 502)
            self.assertIn(b"sha256", bad.body)
        self.assertTrue(logged(observer, LogLevel.error, "fails its check"))
        # Only the streaming ones (no size on the HTML page) were never
        # spooled: three fetches.
        streamed = [e for e in observer if e.get("event") == "streamed_not_stored"]
        self.assertEqual(len(streamed), 3)

    async def test_file_without_page(self) -> None:
        """
        A file of a project whose page was never served is a 404 that
        says where to look, and nothing is asked upstream.
        """
        received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual(received.status, 404)
        self.assertIn(b"/simple/bcdemo-a/", received.body)
        self.assertEqual(self.upstream.index.request_log, [])

    async def test_file_not_on_page(self) -> None:
        await self.harness.page("bcdemo-a")
        for filename in [WHEEL_B1, "bcdemo_a-9.0-py3-none-any.whl"]:
            received = await self.harness.get(f"/files/bcdemo-a/{filename}")
            self.assertEqual(received.status, 404)
            self.assertIn(b"not listed", received.body)
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_B1}"), 0)

    async def test_one_request_per_page_and_file(self) -> None:
        """
        Within the TTL, repeated requests (pip's max-age=0 included) make
        exactly one upstream request per page, per file and per metadata
        file, and are counted as hits.
        """
        for _ in range(3):
            for accept in (PIP_ACCEPT, UV_ACCEPT, "text/html"):
                received = await self.harness.page(
                    "bcdemo-a", accept=accept, **{"cache-control": "max-age=0"}
                )
                self.assertEqual(received.status, 200)
            for path in (WHEEL_A2, f"{WHEEL_A2}.metadata", SDIST_A2):
                received = await self.harness.get(f"/files/bcdemo-a/{path}")
                self.assertEqual(received.status, 200)
        for path in ("/simple/bcdemo-a/", f"/files/{WHEEL_A2}",
                     f"/files/{WHEEL_A2}.metadata", f"/files/{SDIST_A2}"):
            self.assertEqual(self.upstream.requests_for(path), 1, path)
        self.assertEqual(len(self.harness.http.urls), 4)
        served = self.harness.activity.totals["index"].by_status
        self.assertEqual((served["MISS"], served["HIT"]), (4, 8 + 6))

    async def test_stored_body_with_wrong_digest_is_replaced(self) -> None:
        """
        A body stored under the file's key by another route (the proxy
        port, unchecked) that does not match the page is not served: the
        checked file is fetched and replaces it.
        """
        await self.harness.page("bcdemo-a")
        url = f"{self.upstream.base.removesuffix('/simple')}/files/{WHEEL_A2}"
        writer = self.harness.store.writer(cache_key(url))
        writer.write(b"something else")
        writer.commit({"content-type": "application/octet-stream"})
        received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        data = self.fixture.content(WHEEL_A2)
        self.assertEqual((received.status, received.body), (200, data))
        self.assertEqual(received.header("x-cache"), "MISS")
        entry = self.harness.store.peek(cache_key(url))
        assert entry is not None
        self.assertEqual(entry.sha256, hashlib.sha256(data).hexdigest())

    def start_unchecked_download(self, filename: str) -> None:
        """
        The proxy port's kind of download of ``filename``: same key, no
        digest to check against.  An index request for it joins it: the
        upstream is asked only once that request has reached the fetcher
        (else the download could end, or give up on being joined, first).
        """
        url = f"{self.upstream.base.removesuffix('/simple')}/files/{filename}"
        unchecked = UpstreamRequest(key=cache_key(url), url=url)
        fetcher = self.harness.fetcher
        counting = self.harness.http
        agent = counting.agent
        joined: Deferred[None] = Deferred()

        @implementer(IAgent)
        class HeldUntilJoined:
            def request(
                self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None,
            ) -> Deferred[IResponse]:
                async def later() -> IResponse:
                    await joined
                    return await agent.request(method, uri, headers, bodyProducer)

                return Deferred.fromCoroutine(later())

        fetch = Fetcher.fetch

        def joining(self: Fetcher, request: UpstreamRequest) -> Deferred[Any]:
            answer = fetch(self, request)
            if self is fetcher and request.key == unchecked.key and request is not unchecked:
                if not joined.called:
                    counting.agent = agent
                    joined.callback(None)
            return answer

        self.patch(Fetcher, "fetch", joining)
        counting.agent = HeldUntilJoined()
        fetcher.fetch(unchecked)

    async def test_joined_unchecked_download_is_served_once_it_matches(self) -> None:
        await self.harness.page("bcdemo-a")
        self.start_unchecked_download(WHEEL_A2)
        received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        data = self.fixture.content(WHEEL_A2)
        self.assertEqual((received.status, received.body), (200, data))
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), 1)

    async def test_joined_unchecked_download_that_mismatches(self) -> None:
        """
        Joined to a download nobody checks whose bytes differ from the
        page's sha256: a 502 naming the digest received, and an error.
        """
        observer = log_events(self)
        await self.harness.page("bcdemo-a")
        wrong = b"not the wheel you are looking for"
        self.fixture.path_for(WHEEL_A2).write_bytes(wrong)
        self.start_unchecked_download(WHEEL_A2)
        received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual(received.status, 502)
        self.assertIn(hashlib.sha256(wrong).hexdigest().encode(), received.body)
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), 1)
        self.assertTrue(logged(observer, LogLevel.error, "does not match the sha256"))

    async def test_joined_unchecked_download_the_disk_refused(self) -> None:
        """
        Joined to a download nobody checks that the disk could not keep
        (so it was never hashed whole): a 502 that says it could not be
        checked, not that it mismatched, and an error naming the disk's.
        """
        observer = log_events(self)
        await self.harness.page("bcdemo-a")

        def full(store: Store, key: str, whole_digest: bool = True) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(Store, "writer", full)
        self.start_unchecked_download(WHEEL_A2)
        received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual(received.status, 502)
        self.assertIn(b"could not be checked", received.body)
        self.assertIn(b"No space left", received.body)
        self.assertTrue(logged(observer, LogLevel.error, "could not keep its body"))
        self.assertFalse(logged(observer, LogLevel.error, "does not match the sha256"))

    async def test_concurrent_cold_file(self) -> None:
        await self.harness.page("bcdemo-a")
        data = self.fixture.content(WHEEL_A2)
        received = await gatherResults(
            [Deferred.fromCoroutine(self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}"))
             for _ in range(5)]
        )
        self.assertEqual({(r.status, r.body) for r in received}, {(200, data)})
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), 1)

    async def test_page_from_store_after_restart(self) -> None:
        """
        A new index on the same store (a restart) finds the project's
        files through the stored page, without asking upstream again.
        """
        await self.harness.page("bcdemo-a")
        restarted = self.harness.make_resource()
        port = listen(restarted)
        self.addCleanup(stop_later, port)
        received = await self.harness.client.get(
            f"http://127.0.0.1:{port_number(port)}/files/bcdemo-a/{WHEEL_A2}"
        )
        self.assertEqual(received.status, 200)
        self.assertEqual(received.body, self.fixture.content(WHEEL_A2))
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 1)


class ReadAheadTests(TestCase):
    """
    Once a client has read a distribution's core metadata, the distribution
    is fetched into the store: pip asks for it after resolving.
    """

    def harness(self, fixture: IndexFixture, max_size: int = 32 * 1024**2, json: bool = True) -> Harness:
        return Harness(self, [StaticSimpleIndex(fixture, json=json)], prefetch_max_size=max_size)

    def wheel_key(self, harness: Harness) -> str:
        return cache_key(f"{harness.upstreams[0].base.removesuffix('/simple')}/files/{WHEEL_A2}")

    async def read_metadata(self, harness: Harness) -> None:
        await harness.page("bcdemo-a")
        metadata = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}.metadata")
        self.assertEqual(metadata.status, 200)
        assert harness.prefetcher is not None
        await harness.prefetcher.when_done()
        await harness.fetcher.when_idle()

    async def test_distribution_fetched_after_its_metadata(self) -> None:
        fixture = fixture_for(self)
        harness = self.harness(fixture)
        await self.read_metadata(harness)
        data = fixture.content(WHEEL_A2)
        upstream = harness.upstreams[0]
        self.assertEqual(upstream.requests_for(f"/files/{WHEEL_A2}"), 1)
        entry = harness.store.peek(self.wheel_key(harness))
        assert entry is not None
        self.assertEqual(entry.sha256, hashlib.sha256(data).hexdigest())
        activity = harness.activity
        # The wheel, and the page of bcdemo-b its metadata requires.
        self.assertEqual((activity.read_ahead, activity.read_ahead_used), (2, 0))
        # The client's first request is served from the store, but its
        # bytes crossed the line for it: a MISS, not bytes saved.
        saved_before = activity.totals["index"].bytes_from_cache
        received = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((received.status, received.body), (200, data))
        self.assertEqual(received.header("x-cache"), "MISS")
        self.assertEqual(received.header("content-length"), str(len(data)))
        self.assertEqual(activity.totals["index"].bytes_from_cache, saved_before)
        again = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((again.header("x-cache"), again.body), ("HIT", data))
        self.assertEqual((activity.read_ahead, activity.read_ahead_used), (2, 1))
        # Reading the metadata again reads nothing ahead: the file is here.
        again = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}.metadata")
        self.assertEqual(again.header("x-cache"), "HIT")
        assert harness.prefetcher is not None
        await harness.prefetcher.when_done()
        self.assertEqual(upstream.requests_for(f"/files/{WHEEL_A2}"), 1)
        self.assertEqual((activity.read_ahead, activity.read_ahead_used), (2, 1))

    async def test_nothing_read_ahead_when_off_too_large_or_size_unknown(self) -> None:
        size = len(fixture_for(self).content(WHEEL_A2))
        for max_size, json_pages in [(0, True), (size - 1, True), (32 * 1024**2, False)]:
            fixture = fixture_for(self)
            harness = self.harness(fixture, max_size, json=json_pages)
            await self.read_metadata(harness)
            self.assertEqual(
                harness.upstreams[0].requests_for(f"/files/{WHEEL_A2}"), 0,
                (max_size, json_pages),
            )
            # Only the page of bcdemo-b, unless read-ahead is off.
            self.assertEqual(harness.activity.read_ahead, 0 if max_size == 0 else 1)
            self.assertIsNone(harness.store.peek(self.wheel_key(harness)))

    async def test_bad_distribution_is_not_kept(self) -> None:
        """
        A read-ahead is checked like any file: a body that does not match
        the page is not stored, and the client's own request is refused.
        """
        observer = log_events(self)
        fixture = fixture_for(self)
        harness = self.harness(fixture)
        fixture.path_for(WHEEL_A2).write_bytes(b"x" * len(fixture.content(WHEEL_A2)))
        await self.read_metadata(harness)
        self.assertEqual(harness.upstreams[0].requests_for(f"/files/{WHEEL_A2}"), 1)
        self.assertIsNone(harness.store.peek(self.wheel_key(harness)))
        self.assertTrue(logged(observer, LogLevel.error, "fails its check"))
        received = await harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual(received.status, 502)
        self.assertEqual(harness.upstreams[0].requests_for(f"/files/{WHEEL_A2}"), 2)


class ServedBeforeStoredTests(TestCase):
    """
    A checked file is answered as soon as its digest matches, from the
    download, while its fsync and rename are still to run (in a thread, in
    the server); until they have run, requests for it join the download.
    """

    def setUp(self) -> None:
        self.fixture = fixture_for(self)
        self.runner = HeldRunner()
        self.harness = Harness(
            self, [StaticSimpleIndex(self.fixture)], run_blocking=self.runner
        )
        self.upstream = self.harness.upstreams[0]
        self.addCleanup(self.runner.run_all)

    def file_key(self, filename: str) -> str:
        return cache_key(f"{self.upstream.base.removesuffix('/simple')}/files/{filename}")

    async def test_answered_while_being_stored(self) -> None:
        page = await self.harness.page("bcdemo-a")
        self.assertEqual(page.status, 200)
        data = self.fixture.content(WHEEL_A2)
        first = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((first.status, first.body), (200, data))
        self.assertEqual(first.header("content-length"), str(len(data)))
        self.assertEqual(first.header("x-cache"), "MISS")
        key = self.file_key(WHEEL_A2)
        self.assertIsNone(self.harness.store.peek(key))
        stored = self.harness.fetcher.stored(key)
        self.assertNoResult(stored)
        # Joining the download being stored: no second upstream request,
        # whole body, ranges and HEAD from the spool file.
        again = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((again.status, again.body), (200, data))
        tail = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}", {"range": "bytes=-10"})
        self.assertEqual((tail.status, tail.body), (206, data[-10:]))
        head = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}", method=b"HEAD")
        self.assertEqual(
            (head.status, head.body, head.header("content-length")), (200, b"", str(len(data)))
        )
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), 1)
        self.runner.run_all()
        await stored
        await self.harness.fetcher.when_idle()
        entry = self.harness.store.peek(key)
        assert entry is not None
        self.assertEqual(entry.sha256, hashlib.sha256(data).hexdigest())
        hit = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", data))
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), 1)

    async def test_failing_disk_after_the_answer(self) -> None:
        """
        The disk failing at the fsync loses the copy, not the answer: the
        client has the checked body, an error is logged, and the next
        request fetches it again.
        """
        observer = log_events(self)
        await self.harness.page("bcdemo-a")

        def failing_fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        self.harness.store.sync_file = failing_fsync
        data = self.fixture.content(WHEEL_A2)
        received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((received.status, received.body), (200, data))
        self.runner.run_all()
        await self.harness.fetcher.when_idle()
        self.assertIsNone(self.harness.store.peek(self.file_key(WHEEL_A2)))
        self.assertTrue(logged(observer, LogLevel.error, "served, not stored"))
        self.harness.store.sync_file = os.fsync
        again = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((again.status, again.body), (200, data))
        self.assertEqual(self.upstream.requests_for(f"/files/{WHEEL_A2}"), 2)


class FreshnessTests(TestCase):
    """
    Page revalidation: after the TTL, on a client's no-cache past the floor,
    and stale service when the upstream fails.
    """

    def setUp(self) -> None:
        self.fixture = fixture_for(self)
        self.harness = Harness(self, [StaticSimpleIndex(self.fixture)])
        self.upstream = self.harness.upstreams[0]

    async def test_revalidation_after_ttl(self) -> None:
        first = await self.harness.page("bcdemo-a")
        self.harness.clock.advance(TTL + 1)
        again = await self.harness.page("bcdemo-a")
        self.assertEqual(again.status, 200)
        self.assertEqual(again.header("x-cache"), "REVALIDATED")
        self.assertEqual(again.body, first.body)
        self.assertEqual(again.header("etag"), first.header("etag"))
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 2)
        conditional = self.upstream.index.request_log[-1]
        self.assertIn("if-none-match", conditional.headers)
        self.assertEqual(
            self.harness.activity.totals["index"].by_status["REVALIDATED"], 1
        )
        third = await self.harness.page("bcdemo-a")
        self.assertEqual(third.header("x-cache"), "HIT")
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 2)

    async def test_changed_page_after_ttl(self) -> None:
        """
        A yank made upstream shows after the TTL; the ETag changes.
        """
        first = await self.harness.page("bcdemo-b")
        page = self.upstream.index.projects["bcdemo-b"]
        self.upstream.index.projects["bcdemo-b"] = attrs.evolve(
            page,
            files=tuple(attrs.evolve(f, yanked="withdrawn") for f in page.files),
        )
        self.assertEqual((await self.harness.page("bcdemo-b")).body, first.body)
        self.harness.clock.advance(TTL + 1)
        changed = await self.harness.page("bcdemo-b")
        self.assertEqual(changed.header("x-cache"), "MISS")
        self.assertNotEqual(changed.header("etag"), first.header("etag"))
        yanks = {f["yanked"] for f in json.loads(changed.body)["files"]}
        self.assertEqual(yanks, {"withdrawn"})

    async def test_project_removed_upstream(self) -> None:
        """
        A project the upstream no longer has is a 404 after the TTL; its
        stored page and its files go with it.
        """
        await self.harness.page("bcdemo-a")
        del self.upstream.index.projects["bcdemo-a"]
        self.harness.clock.advance(TTL + 1)
        gone = await self.harness.page("bcdemo-a")
        self.assertEqual(gone.status, 404)
        self.assertIsNone(
            self.harness.store.peek(page_key(self.upstream.base, "bcdemo-a"))
        )
        received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual(received.status, 404)

    async def test_client_max_age_zero_is_not_a_refresh(self) -> None:
        """
        pip's max-age=0, sent on every page request, never sends a page
        upstream before the TTL; a client's no-cache (or Pragma: no-cache)
        does, but only for a page validated more than the floor ago.
        """
        await self.harness.page("bcdemo-a")
        self.harness.clock.advance(TTL - 1)
        pip = await self.harness.page("bcdemo-a", **{"cache-control": "max-age=0"})
        self.assertEqual(pip.header("x-cache"), "HIT")
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 1)
        refreshed = await self.harness.page("bcdemo-a", **{"cache-control": "no-cache"})
        self.assertEqual(refreshed.header("x-cache"), "REVALIDATED")
        self.harness.clock.advance(CLIENT_REVALIDATION_FLOOR - 1)
        early = await self.harness.page("bcdemo-a", **{"cache-control": "no-cache"})
        self.assertEqual(early.header("x-cache"), "HIT")
        self.harness.clock.advance(2)
        late = await self.harness.page("bcdemo-a", pragma="no-cache")
        self.assertEqual(late.header("x-cache"), "REVALIDATED")
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 3)

    async def test_stale_when_upstream_fails(self) -> None:
        """
        A 503 from upstream serves the stored page STALE with a warning;
        the failing upstream is left alone for a while, then asked again.
        """
        observer = log_events(self)
        first = await self.harness.page("bcdemo-a")
        self.harness.clock.advance(TTL + 1)
        self.upstream.index.broken = True
        stale = await self.harness.page("bcdemo-a")
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        self.assertEqual(stale.header("cache-control"), "max-age=0")
        self.assertEqual(stale.body, first.body)
        self.assertTrue(logged(observer, LogLevel.warn, "stale"))
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 2)
        again = await self.harness.page("bcdemo-a")
        self.assertEqual(again.header("x-cache"), "STALE")
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 2)
        self.upstream.index.broken = False
        self.harness.clock.advance(UPSTREAM_FAILURE_BACKOFF + 1)
        back = await self.harness.page("bcdemo-a")
        self.assertEqual(back.header("x-cache"), "REVALIDATED")

    async def test_garbage_page_keeps_the_good_one(self) -> None:
        """
        A 200 that is not a simple-index page (a captive portal's login
        page, say) is not stored over the good page: clients get the good
        one STALE, and an error names the upstream page.
        """
        observer = log_events(self)
        first = await self.harness.page("bcdemo-a")
        key = page_key(self.upstream.base, "bcdemo-a")
        good = self.harness.store.peek(key)
        assert good is not None
        self.harness.clock.advance(TTL + 1)
        self.upstream.index.garbage_pages = True
        stale = await self.harness.page("bcdemo-a", **{"cache-control": "max-age=0"})
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        self.assertEqual(stale.body, first.body)
        await self.harness.fetcher.when_idle()
        self.assertEqual(self.harness.store.peek(key).sha256, good.sha256)  # type: ignore[union-attr]
        self.assertTrue(logged(observer, LogLevel.error, "fails its check"))
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 2)

    async def test_stale_when_upstream_unreachable(self) -> None:
        """
        With the upstream gone, stored pages are STALE, stored files are
        hits, and a project never fetched is a 502 that says why.
        """
        await self.harness.page("bcdemo-a")
        await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        await self.upstream.stop()
        self.harness.clock.advance(TTL + 1)
        stale = await self.harness.page("bcdemo-a")
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        hit = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((hit.status, hit.header("x-cache")), (200, "HIT"))
        unknown = await self.harness.page("bcdemo-b")
        self.assertEqual(unknown.status, 502)
        self.assertIn(b"no copy of 'bcdemo-b' is cached", unknown.body)

    async def test_private_or_no_store_page_not_stored(self) -> None:
        """
        RFC 9111 governs what the index stores: a page its upstream sends
        ``Cache-Control: private`` or ``no-store`` is served (a MISS each
        time) but not stored, as a shared cache must.
        """
        key = page_key(self.upstream.base, "bcdemo-a")
        for directive in ("private", "no-store"):
            self.upstream.index.page_cache_control = directive
            for _ in range(2):
                received = await self.harness.page("bcdemo-a")
                self.assertEqual(
                    (received.status, received.header("x-cache")), (200, "MISS"), directive
                )
                self.assertIn(b"bcdemo_a-2.0", received.body)
            await self.harness.fetcher.when_idle()
            self.assertIsNone(self.harness.store.peek(key), directive)
        self.assertEqual(self.upstream.requests_for("/simple/bcdemo-a/"), 4)
        self.upstream.index.page_cache_control = None
        await self.harness.page("bcdemo-a")
        await self.harness.fetcher.when_idle()
        self.assertIsNotNone(self.harness.store.peek(key))

    async def test_file_status_rule(self) -> None:
        """
        A file its upstream no longer has (404, 410) is a 404; any other
        error status is a 502 (``answer_status``, the rule pages and the
        root follow too).
        """
        await self.harness.page("bcdemo-a")
        self.upstream.index.broken = True
        for upstream_status, status in ((410, 404), (404, 404), (403, 502), (503, 502)):
            self.upstream.index.broken_status = upstream_status
            received = await self.harness.get(f"/files/bcdemo-a/{WHEEL_A2}")
            self.assertEqual(received.status, status, upstream_status)
            self.assertIn(f"answered {upstream_status}".encode(), received.body)

    async def test_nothing_stored_upstream_broken(self) -> None:
        self.upstream.index.broken = True
        received = await self.harness.page("bcdemo-a")
        self.assertEqual(received.status, 502)
        self.assertIn(b"answered 503", received.body)
        self.assertIn(self.upstream.base.encode(), received.body)


class UpstreamPriorityTests(TestCase):
    """
    Several upstreams: the first that has a project serves all of it; a
    404 is remembered for a minute.
    """

    def setUp(self) -> None:
        self.first_fixture = fixture_for(self)
        self.second_fixture = fixture_for(
            self,
            releases=(DemoRelease("bcdemo-a", "9.0"), DemoRelease("bcdemo-c", "1.0")),
        )
        self.harness = Harness(
            self,
            [StaticSimpleIndex(self.first_fixture), StaticSimpleIndex(self.second_fixture)],
        )
        self.first, self.second = self.harness.upstreams

    async def test_first_upstream_owns_project(self) -> None:
        received = await self.harness.page("bcdemo-a")
        filenames = {f["filename"] for f in json.loads(received.body)["files"]}
        self.assertEqual(
            filenames, {f.filename for f in self.first_fixture.projects["bcdemo-a"].files}
        )
        self.assertNotIn("bcdemo_a-9.0-py3-none-any.whl", filenames)
        self.assertEqual(self.second.requests_for("/simple/bcdemo-a/"), 0)
        # A file only the second upstream has is not reachable through it.
        other = await self.harness.get("/files/bcdemo-a/bcdemo_a-9.0-py3-none-any.whl")
        self.assertEqual(other.status, 404)
        self.assertEqual(self.second.index.request_log, [])

    async def test_project_only_on_second(self) -> None:
        received = await self.harness.page("bcdemo-c")
        self.assertEqual(received.status, 200)
        wheel = "bcdemo_c-1.0-py3-none-any.whl"
        self.assertEqual([f["filename"] for f in json.loads(received.body)["files"]], [wheel])
        self.assertEqual(self.first.requests_for("/simple/bcdemo-c/"), 1)
        self.assertEqual(self.second.requests_for("/simple/bcdemo-c/"), 1)
        downloaded = await self.harness.get(f"/files/bcdemo-c/{wheel}")
        self.assertEqual(downloaded.body, self.second_fixture.content(wheel))
        self.assertEqual(self.second.requests_for(f"/files/{wheel}"), 1)
        # Within the minute, the first upstream's 404 is believed.
        again = await self.harness.page("bcdemo-c", **{"cache-control": "max-age=0"})
        self.assertEqual(again.header("x-cache"), "HIT")
        self.assertEqual(self.first.requests_for("/simple/bcdemo-c/"), 1)

    async def test_404_cached_for_a_minute(self) -> None:
        missing = await self.harness.page("no-such-project")
        self.assertEqual(missing.status, 404)
        self.assertIn(b"not found", missing.body)
        path = "/simple/no-such-project/"
        self.assertEqual((self.first.requests_for(path), self.second.requests_for(path)), (1, 1))
        self.harness.clock.advance(NEGATIVE_TTL - 1)
        self.assertEqual((await self.harness.page("no-such-project")).status, 404)
        self.assertEqual((self.first.requests_for(path), self.second.requests_for(path)), (1, 1))
        self.harness.clock.advance(2)
        self.assertEqual((await self.harness.page("no-such-project")).status, 404)
        self.assertEqual((self.first.requests_for(path), self.second.requests_for(path)), (2, 2))

    async def test_project_appears_on_first(self) -> None:
        """
        After the 404 memory expires, a project the first upstream now
        has is served from it.
        """
        await self.harness.page("bcdemo-c")
        self.first.index.projects["bcdemo-c"] = self.first.index.projects["bcdemo-b"]
        self.harness.clock.advance(NEGATIVE_TTL + 1)
        received = await self.harness.page("bcdemo-c")
        filenames = [f["filename"] for f in json.loads(received.body)["files"]]
        self.assertIn(WHEEL_B1, filenames)

    async def test_later_upstreams_copy_when_first_fails(self) -> None:
        """
        A project only the second upstream has, stored: when the first
        upstream fails (and has no page of it for the engine to serve
        stale), the second's stored page is served STALE without asking
        the second.
        """
        first = await self.harness.page("bcdemo-c")
        self.harness.clock.advance(NEGATIVE_TTL + 1)
        self.first.index.broken = True
        stale = await self.harness.page("bcdemo-c")
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        self.assertEqual(stale.body, first.body)
        self.assertEqual(self.first.requests_for("/simple/bcdemo-c/"), 2)
        self.assertEqual(self.second.requests_for("/simple/bcdemo-c/"), 1)

    async def test_first_failing_does_not_fall_through(self) -> None:
        """
        A failing first upstream does not hand its projects to the next
        one: with nothing stored, the client gets a 502.
        """
        self.first.index.broken = True
        received = await self.harness.page("bcdemo-a")
        self.assertEqual(received.status, 502)
        self.assertEqual(self.second.requests_for("/simple/bcdemo-a/"), 0)


class RootTests(TestCase):
    """
    The root ``/simple/``: streamed from the first upstream and stored.
    """

    async def test_root_streamed_and_cached(self) -> None:
        fixture = fixture_for(self)
        harness = Harness(self, [StaticSimpleIndex(fixture)])
        upstream = harness.upstreams[0]
        expected = b"".join(render_root_html(sorted(fixture.projects)))
        for status in ("MISS", "HIT"):
            received = await harness.get("/simple/")
            self.assertEqual(received.status, 200)
            self.assertEqual(received.body, expected)
            self.assertEqual(received.header("x-cache"), status)
            self.assertEqual(received.header("vary"), "Accept")
            self.assertEqual(received.header("content-type"), MEDIA_TYPE_LEGACY_HTML)
        self.assertEqual(upstream.requests_for("/simple/"), 1)
        as_json = await harness.get("/simple/", {"accept": PIP_ACCEPT})
        self.assertEqual(as_json.header("content-type"), MEDIA_TYPE_JSON)
        self.assertEqual(
            [p["name"] for p in json.loads(as_json.body)["projects"]], sorted(fixture.projects)
        )
        self.assertEqual(upstream.requests_for("/simple/"), 2)
        refused = await harness.get("/simple/", {"accept": "image/png"})
        self.assertEqual(refused.status, 406)

    async def test_root_stale_when_upstream_down(self) -> None:
        fixture = fixture_for(self)
        harness = Harness(self, [StaticSimpleIndex(fixture)])
        first = await harness.get("/simple/")
        await harness.upstreams[0].stop()
        harness.clock.advance(2 * 86400)
        stale = await harness.get("/simple/")
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        self.assertEqual(stale.body, first.body)
        cold = await harness.get("/simple/", {"accept": MEDIA_TYPE_JSON})
        self.assertEqual(cold.status, 502)

    async def test_root_stale_on_any_error_status(self) -> None:
        """
        The stored root is served stale for any error status of its
        upstream, not only 5xx: a rate limit's 429, a 403.
        """
        fixture = fixture_for(self)
        harness = Harness(self, [StaticSimpleIndex(fixture)])
        upstream = harness.upstreams[0]
        first = await harness.get("/simple/")
        upstream.index.broken = True
        # (A 404 or 410 says the root is gone: the engine never hides it.)
        for status in (429, 403, 500):
            upstream.index.broken_status = status
            harness.clock.advance(2 * 86400)
            stale = await harness.get("/simple/")
            self.assertEqual(
                (stale.status, stale.header("x-cache")), (200, "STALE"), status
            )
            self.assertEqual(stale.body, first.body)
