"""
Unit tests for :mod:`buildcache.engine.core`: the freshness table, stale
serving on each error class, HEAD, joins and accounting, with a fake clock
and an in-memory upstream (treq's ``RequestTraversalAgent`` over a
twisted.web resource, feeding the real fetcher), a real store in a temp
directory, and clients on a real ``Site`` over a memory transport.  No
sockets, no sleeps.
"""

from __future__ import annotations

import gc
import hashlib
import os
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from attrs import Factory, define, field
from treq.testing import RequestTraversalAgent
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from twisted.web.test.requesthelper import DummyRequest
from zope.interface import implementer

from buildcache.engine.core import Engine
from buildcache.engine.events import Exchange
from buildcache.engine.exchanges import Exchanges, client_gone
from buildcache.engine.fields import format_http_date
from buildcache.engine.freshness import Kind
from buildcache.engine.keys import cache_key
from buildcache.engine.policy import Expectation, GenericPolicy, Target, rule
from buildcache.engine.respond import request_headers
from buildcache.fetch.connect import TargetRefused
from buildcache.fetch.fetcher import Fetcher, upstream_client
from buildcache.store import Store

ORIGIN = "http://127.0.0.1:8000"
TTL = 60.0
IDLE_TIMEOUT = 30.0
#: ``.idx`` files are indexes, ``.pkg`` files immutable, the rest HTTP.
POLICY = GenericPolicy((rule(r"\.idx$", Kind.INDEX), rule(r"\.pkg$", Kind.IMMUTABLE)))
#: Request headers the test front end forwards upstream.
FORWARDED = ("accept", "authorization", "cookie")


@define
class Served:
    """What the origin sends for one path."""

    body: bytes
    headers: dict[str, str] = Factory(dict)
    status: int = 200
    etag: str | None = None
    #: Send only this many bytes of the body, then drop the connection.
    cut_at: int | None = None
    #: Never answer.
    hang: bool = False
    #: Run before answering (an eviction meanwhile, say).
    before: Callable[[], None] | None = None
    #: Answer ``Range: bytes=N-`` with a 206 of the rest.
    ranges: bool = False


@define
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class Origin(Resource):
    """
    The upstream: serves :class:`Served` per path, answers ``If-None-Match``
    with 304 and HEAD without a body, and records every request.
    """

    isLeaf = True

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.files: dict[str, Served] = {}
        self.seen: list[Seen] = []
        self.hanging: list[Request] = []

    def count(self, path: str, method: str = "GET") -> int:
        return sum(1 for s in self.seen if s.path == path and s.method == method)

    def render(self, request: Request) -> object:
        path = request.path.decode()
        self.seen.append(Seen(request.method.decode(), path, request_headers(request)))
        # Answered on a later turn, as over a network: the fetcher is
        # never answered inside the call that asks.
        self.clock.callLater(0, self._answer, request, path)
        return NOT_DONE_YET

    def _answer(self, request: Request, path: str) -> None:
        body = self.respond(request, path)
        if body is not NOT_DONE_YET:
            assert isinstance(body, bytes)
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

    def respond(self, request: Request, path: str) -> object:
        served = self.files.get(path)
        if served is None:
            request.setResponseCode(404)
            return b"not here"
        if served.before is not None:
            served.before()
        if served.hang:
            self.hanging.append(request)
            return NOT_DONE_YET
        if served.etag is not None:
            request.setHeader("etag", served.etag)
            if request.getHeader("if-none-match") == served.etag:
                request.setResponseCode(304)
                return b""
        request.setResponseCode(served.status)
        for name, value in served.headers.items():
            request.setHeader(name, value)
        asked = request.getHeader("range") or ""
        if served.ranges and asked.startswith("bytes=") and asked.endswith("-"):
            start, size = int(asked[6:-1]), len(served.body)
            request.setResponseCode(206)
            request.setHeader("content-range", f"bytes {start}-{size - 1}/{size}")
            request.setHeader("content-length", str(size - start))
            return served.body[start:]
        request.setHeader("content-length", str(len(served.body)))
        if served.cut_at is not None:
            request.write(served.body[: served.cut_at])
            assert request.channel is not None and request.channel.transport is not None
            request.channel.transport.loseConnection()
            return NOT_DONE_YET
        return served.body


@implementer(IAgent)
@define
class Line:
    """
    The line to the upstream: the in-memory agent, or a failure while
    ``down`` (a connection refused) or ``refused`` (the access policy).
    """

    inner: RequestTraversalAgent
    down: bool = False
    refused: bool = False

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if self.refused:
            return fail(TargetRefused("127.0.0.1", 8000, "not an allowed upstream"))
        if self.down:
            return fail(ConnectionRefusedError("127.0.0.1"))
        return self.inner.request(method, uri, headers, bodyProducer)  # type: ignore[no-any-return]


@define
class Observer:
    """Records what the engine reports."""

    exchanges: list[Exchange] = Factory(list)
    stale: list[str] = Factory(list)

    def exchange_finished(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)

    def stale_served(self, url: str) -> None:
        self.stale.append(url)

    def __getattr__(self, name: str) -> Callable[..., None]:
        # The rest of CacheObserver and FetchObserver: not looked at here.
        return lambda *args, **kwargs: None


@define
class Answer:
    """A response as the client received it."""

    status: int
    headers: dict[str, str]
    body: bytes
    #: The whole body arrived.
    complete: bool

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def parse_response(raw: bytes) -> Answer:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body, complete = b"", False
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                complete = True
                break
            body, rest = body + rest[:size], rest[size + 2:]
        return Answer(status, headers, body, complete)
    length = int(headers.get("content-length", "0"))
    return Answer(status, headers, rest[:length], len(rest) >= length)


class FrontEnd(Resource):
    """
    The thinnest front end: ``/PATH`` is ``ORIGIN/PATH`` under ``POLICY``.
    """

    isLeaf = True

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self.engine = engine
        self.policy: Any = POLICY

    def render(self, request: Request) -> object:
        self.engine.begin(request, "proxy", request.path.decode().rsplit("/", 1)[-1])
        if request.path == b"/refused":
            self.engine.refuse(request, 403, "not for you")
            return NOT_DONE_YET
        headers = request_headers(request)
        self.engine.serve(request, Target(
            url=ORIGIN + request.uri.decode(),
            front_end="proxy",
            headers=headers,
            upstream_headers={k: headers[k] for k in FORWARDED if k in headers},
        ), self.policy)
        return NOT_DONE_YET


@define
class Client:
    """One client connection, its request sent."""

    transport: StringTransport
    channel: Any

    def answer(self) -> Answer:
        return parse_response(self.transport.value())

    def leave(self) -> None:
        self.channel.connectionLost(Failure(ConnectionDone()))


@define
class Harness:
    directory: str
    clock: Clock = Factory(Clock)
    origin: Origin = Factory(lambda self: Origin(self.clock), takes_self=True)
    observer: Observer = Factory(Observer)
    store: Store = field(init=False)
    line: Line = field(init=False)
    engine: Engine = field(init=False)
    front: FrontEnd = field(init=False)
    site: Site = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.store = Store.open(self.directory, 100 * 1024 * 1024, self.clock)
        self.line = Line(RequestTraversalAgent(self.origin))
        fetcher = Fetcher(
            self.store, upstream_client(self.line), self.clock,
            idle_timeout=IDLE_TIMEOUT, activity=self.observer,  # type: ignore[arg-type]
        )
        self.engine = Engine(
            self.store, fetcher, self.clock, self.observer, TTL  # type: ignore[arg-type]
        )
        self.front = FrontEnd(self.engine)
        self.site = Site(self.front, reactor=self.clock)

    def settle(self) -> None:
        """Run everything that can run now, on both sides."""
        for _ in range(50):
            self.line.inner.flush()
            self.clock.advance(0)

    def send(
        self, path: str, headers: Mapping[str, str] | None = None, method: str = "GET"
    ) -> Client:
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8899),
            peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
        )
        channel = self.site.buildProtocol(transport.getPeer())
        assert channel is not None
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: box"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        channel.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        return Client(transport, channel)

    def get(
        self, path: str, headers: Mapping[str, str] | None = None, method: str = "GET"
    ) -> Answer:
        client = self.send(path, headers, method)
        self.settle()
        return client.answer()

    def later(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.settle()

    def close(self) -> None:
        self.settle()
        self.store.close()


class EngineTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(self.mktemp())
        self.addCleanup(self.h.close)

    def serve(self, path: str, body: bytes, **kwargs: Any) -> Served:
        served = Served(body, **kwargs)
        self.h.origin.files[path] = served
        return served

    def assertAnswer(
        self, answer: Answer, status: int, cache: str | None, body: bytes | None = None
    ) -> None:
        self.assertEqual((answer.status, answer.header("x-cache")), (status, cache))
        if body is not None:
            self.assertEqual(answer.body, body)


class FreshnessTableTests(EngineTestCase):
    """
    Every row of the freshness decision, through the whole flow.
    """

    def test_immutable_is_fresh_forever(self) -> None:
        """
        An immutable file is served from the store for good, even to a
        client that sends ``no-cache``: one upstream request.
        """
        self.serve("/a.pkg", b"package")
        self.assertAnswer(self.h.get("/a.pkg"), 200, "MISS", b"package")
        self.h.later(10 * 365 * 86400)
        answer = self.h.get("/a.pkg", {"cache-control": "no-cache"})
        self.assertAnswer(answer, 200, "HIT", b"package")
        self.assertEqual(answer.header("cache-control"), "max-age=31536000, immutable")
        self.assertEqual(self.h.origin.count("/a.pkg"), 1)

    def test_index_fresh_within_ttl(self) -> None:
        self.serve("/i.idx", b"index", etag='"1"')
        self.h.get("/i.idx")
        self.h.later(TTL - 1)
        answer = self.h.get("/i.idx")
        self.assertAnswer(answer, 200, "HIT", b"index")
        self.assertEqual(answer.header("cache-control"), f"max-age={int(TTL)}")
        self.assertEqual(self.h.origin.count("/i.idx"), 1)

    def test_stale_index_revalidated_by_304(self) -> None:
        """
        Past the TTL, a conditional request; its 304 refreshes the entry,
        which is fresh again for a TTL.
        """
        self.serve("/i.idx", b"index", etag='"1"')
        self.h.get("/i.idx")
        self.h.later(TTL)
        self.assertAnswer(self.h.get("/i.idx"), 200, "REVALIDATED", b"index")
        self.assertEqual(self.h.origin.seen[-1].headers.get("if-none-match"), '"1"')
        self.h.later(TTL - 1)
        self.assertAnswer(self.h.get("/i.idx"), 200, "HIT", b"index")
        self.assertEqual(self.h.origin.count("/i.idx"), 2)

    def test_stale_index_replaced_by_200(self) -> None:
        self.serve("/i.idx", b"old index", etag='"1"')
        self.h.get("/i.idx")
        self.serve("/i.idx", b"new index", etag='"2"')
        self.h.later(TTL)
        self.assertAnswer(self.h.get("/i.idx"), 200, "MISS", b"new index")
        self.assertAnswer(self.h.get("/i.idx"), 200, "HIT", b"new index")

    def test_evicted_during_revalidation(self) -> None:
        """
        A 304 for an entry evicted while the upstream was asked: the file
        is fetched again, once, and served as a miss.
        """
        key = cache_key(ORIGIN + "/i.idx")
        served = self.serve("/i.idx", b"index", etag='"1"')
        self.h.get("/i.idx")
        self.h.later(TTL)
        def evict() -> None:
            self.h.store.remove(key)

        served.before = evict
        answer = self.h.get("/i.idx")
        self.assertAnswer(answer, 200, "MISS", b"index")
        self.assertEqual(self.h.origin.count("/i.idx"), 3)
        self.assertEqual(
            [s.headers.get("if-none-match") for s in self.h.origin.seen],
            [None, '"1"', None],
        )

    def test_client_no_cache_revalidates_an_index(self) -> None:
        self.serve("/i.idx", b"index", etag='"1"')
        self.h.get("/i.idx")
        for asking in ({"cache-control": "no-cache"}, {"pragma": "no-cache"},
                       {"cache-control": "max-age=0"}):
            self.assertAnswer(self.h.get("/i.idx", asking), 200, "REVALIDATED", b"index")
        self.assertEqual(self.h.origin.count("/i.idx"), 4)

    def test_client_max_age_against_the_response_age(self) -> None:
        """
        An HTTP-kind response fresh for 100 s: a client's ``max-age``
        shorter than its age revalidates it, a longer one does not.
        """
        self.serve("/page", b"page", etag='"p"', headers={"cache-control": "max-age=100"})
        self.h.get("/page")
        self.h.later(50)
        self.assertAnswer(self.h.get("/page", {"cache-control": "max-age=60"}), 200, "HIT")
        self.assertAnswer(
            self.h.get("/page", {"cache-control": "max-age=10"}), 200, "REVALIDATED"
        )
        self.h.later(100)
        self.assertAnswer(self.h.get("/page"), 200, "REVALIDATED")

    def test_response_no_store_is_never_stored(self) -> None:
        self.serve("/a.pkg", b"package", headers={"cache-control": "no-store"})
        self.assertAnswer(self.h.get("/a.pkg"), 200, "MISS")
        self.assertAnswer(self.h.get("/a.pkg"), 200, "MISS")
        self.assertEqual(self.h.origin.count("/a.pkg"), 2)

    def test_rfc_rules_win_over_the_policy(self) -> None:
        """
        A policy that would store everything still cannot store a response
        RFC 9111 forbids a shared cache to keep.
        """
        self.h.front.policy = StoresAll()
        for path, headers in (
            ("/n.pkg", {"cache-control": "no-store"}),
            ("/p.pkg", {"cache-control": "private"}),
            ("/v.pkg", {"vary": "*"}),
        ):
            self.serve(path, b"body", headers=headers)
            self.h.get(path)
        self.serve("/ok.pkg", b"body")
        self.h.get("/ok.pkg")
        self.assertEqual(
            [e.key for e in self.h.store.keys()], [cache_key(ORIGIN + "/ok.pkg")]
        )

    def test_private_entries_are_their_credentials_own(self) -> None:
        """
        A response to a request with credentials is stored apart, answers
        only the same credentials, and its own directives decide its life
        (an index kind does not shorten or lengthen it).
        """
        self.serve(
            "/i.idx", b"private index",
            headers={"cache-control": "public, max-age=1000"}, etag='"1"',
        )
        alice = {"authorization": "Bearer alice"}
        self.assertAnswer(self.h.get("/i.idx", alice), 200, "MISS")
        self.h.later(TTL * 5)
        self.assertAnswer(self.h.get("/i.idx", alice), 200, "HIT", b"private index")
        self.assertAnswer(
            self.h.get("/i.idx", {"authorization": "Bearer bob"}), 200, "MISS"
        )
        self.assertAnswer(self.h.get("/i.idx"), 200, "MISS")
        self.assertEqual(self.h.origin.count("/i.idx"), 3)
        keys = sorted(e.key for e in self.h.store.keys())
        self.assertEqual(len(keys), 3)
        self.assertFalse(any("alice" in key or "bob" in key for key in keys))

    def test_private_without_a_public_directive_is_not_stored(self) -> None:
        self.serve("/i.idx", b"mine", headers={"cache-control": "max-age=1000"})
        alice = {"authorization": "Bearer alice"}
        self.h.get("/i.idx", alice)
        self.assertAnswer(self.h.get("/i.idx", alice), 200, "MISS")
        self.assertEqual(list(self.h.store.keys()), [])

    def test_immutable_kind_yields_to_credentials(self) -> None:
        """
        A private ``.pkg`` is HTTP: a client's ``no-cache`` revalidates it.
        """
        self.serve(
            "/a.pkg", b"package", headers={"cache-control": "public, max-age=1000"},
            etag='"1"',
        )
        alice = {"authorization": "Bearer alice"}
        self.h.get("/a.pkg", alice)
        answer = self.h.get("/a.pkg", {**alice, "cache-control": "no-cache"})
        self.assertAnswer(answer, 200, "REVALIDATED")
        self.assertEqual(answer.header("cache-control"), "public, max-age=1000")

    def test_vary_variants(self) -> None:
        """
        A response with ``Vary: Accept`` is kept per value of ``Accept``.
        """
        self.serve("/i.idx", b"either", headers={"vary": "Accept"})
        json, html = {"accept": "application/json"}, {"accept": "text/html"}
        self.assertAnswer(self.h.get("/i.idx", json), 200, "MISS")
        self.assertAnswer(self.h.get("/i.idx", html), 200, "MISS")
        self.assertAnswer(self.h.get("/i.idx", json), 200, "HIT")
        self.assertAnswer(self.h.get("/i.idx", html), 200, "HIT")
        self.assertEqual(self.h.origin.count("/i.idx"), 2)
        self.assertEqual(len(list(self.h.store.keys())), 2)

    def test_conditional_client_request_gets_304_from_the_store(self) -> None:
        self.serve("/a.pkg", b"package", etag='"v1"')
        self.h.get("/a.pkg")
        answer = self.h.get("/a.pkg", {"if-none-match": '"v1"'})
        self.assertEqual((answer.status, answer.body), (304, b""))
        self.assertEqual(self.h.origin.count("/a.pkg"), 1)


class NoFetcher:
    """Stands in for the fetcher where none may be used."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the hit path used the fetcher ({name})")


class HitPathTests(EngineTestCase):
    """
    :meth:`Engine.fresh_hit`: what a process holding a read-only store and
    no fetcher (a hit worker, issue 16) can answer.
    """

    def reader(self) -> Engine:
        store = Store.open(self.h.directory, 100 * 1024 * 1024, self.h.clock, read_only=True)
        self.addCleanup(store.close)
        return Engine(store, NoFetcher(), self.h.clock, None, TTL)  # type: ignore[arg-type]

    def target(self, path: str, headers: Mapping[str, str] | None = None) -> Target:
        headers = dict(headers or {})
        return Target(
            url=ORIGIN + path, front_end="proxy", headers=headers,
            upstream_headers={k: headers[k] for k in FORWARDED if k in headers},
        )

    def test_fresh_entries_are_hits_without_a_fetcher(self) -> None:
        self.serve("/a.pkg", b"package")
        self.serve("/i.idx", b"index")
        self.h.get("/a.pkg")
        self.h.get("/i.idx")
        reader = self.reader()
        hit = reader.fresh_hit(self.target("/a.pkg"), POLICY)
        assert hit is not None and hit.stored is not None
        self.addCleanup(hit.close)
        self.assertEqual(hit.cache.value, "HIT")
        self.assertEqual(os.pread(hit.stored.fd, 100, 0), b"package")
        self.assertIsNotNone(reader.fresh_hit(self.target("/i.idx"), POLICY))
        self.assertEqual(self.h.origin.count("/a.pkg") + self.h.origin.count("/i.idx"), 2)

    def test_what_needs_the_upstream_is_not_a_hit(self) -> None:
        """
        A stale index, an entry not stored, and another client's private
        entry are left to the process that fetches.
        """
        self.serve("/i.idx", b"index")
        self.serve("/p.pkg", b"private", headers={"cache-control": "public, max-age=600"})
        self.h.get("/i.idx")
        self.h.get("/p.pkg", {"authorization": "Bearer mine"})
        reader = self.reader()
        self.assertIsNotNone(
            reader.fresh_hit(self.target("/p.pkg", {"authorization": "Bearer mine"}), POLICY)
        )
        self.assertIsNone(
            reader.fresh_hit(self.target("/p.pkg", {"authorization": "Bearer other"}), POLICY)
        )
        self.assertIsNone(reader.fresh_hit(self.target("/p.pkg"), POLICY))
        self.assertIsNone(reader.fresh_hit(self.target("/none.pkg"), POLICY))
        self.h.clock.advance(TTL + 1)
        self.assertIsNone(reader.fresh_hit(self.target("/i.idx"), POLICY))


    def test_would_hit_asks_the_index_only(self) -> None:
        """
        :meth:`Engine.would_hit` says what :meth:`Engine.fresh_hit` would
        answer, without opening a file or counting an access (a read-ahead
        asking is not a use of the entry, for eviction).
        """
        self.serve("/a.pkg", b"package")
        self.serve("/i.idx", b"index")
        self.serve("/p.pkg", b"private", headers={"cache-control": "public, max-age=600"})
        self.h.get("/a.pkg")
        self.h.get("/i.idx")
        self.h.get("/p.pkg", {"authorization": "Bearer mine"})
        reader = self.reader()
        opened: list[str] = []
        real_open = os.open
        self.patch(os, "open", lambda path, *a, **k: opened.append(path) or real_open(path, *a, **k))
        asked = [
            reader.would_hit(self.target(path, headers), POLICY)
            for path, headers in [
                ("/a.pkg", {}), ("/i.idx", {}), ("/none.pkg", {}), ("/p.pkg", {}),
                ("/p.pkg", {"authorization": "Bearer other"}),
                ("/p.pkg", {"authorization": "Bearer mine"}),
            ]
        ]
        self.assertEqual(asked, [True, True, False, False, False, True])
        self.assertEqual((opened, reader.store.take_accesses()), ([], {}))
        self.h.clock.advance(TTL + 1)
        self.assertFalse(reader.would_hit(self.target("/i.idx"), POLICY))
        self.assertTrue(reader.would_hit(self.target("/a.pkg"), POLICY))


class StaleTests(EngineTestCase):
    """
    A stored index whose revalidation fails is served STALE, for each way
    the upstream can fail; without a stored copy the failure's status.
    """

    def stored_then_stale(self) -> Served:
        served = self.serve(
            "/i.idx", b"index", etag='"1"',
            headers={"last-modified": format_http_date(1_000_000)},
        )
        self.assertAnswer(self.h.get("/i.idx"), 200, "MISS")
        self.h.later(TTL)
        return served

    def assertStale(self) -> None:
        answer = self.h.get("/i.idx")
        self.assertAnswer(answer, 200, "STALE", b"index")
        self.assertEqual(answer.header("cache-control"), "max-age=0")
        self.assertEqual(self.h.observer.stale, [ORIGIN + "/i.idx"])
        self.assertEqual(self.h.observer.exchanges[-1].cache, "STALE")

    def test_connection_refused(self) -> None:
        self.stored_then_stale()
        self.h.line.down = True
        self.assertStale()

    def test_timeout(self) -> None:
        self.stored_then_stale().hang = True
        client = self.h.send("/i.idx")
        self.h.settle()
        self.assertEqual(client.transport.value(), b"")
        self.h.later(IDLE_TIMEOUT)
        answer = client.answer()
        self.assertAnswer(answer, 200, "STALE", b"index")

    def test_server_error(self) -> None:
        served = self.stored_then_stale()
        served.status, served.etag, served.body = 503, None, b"busy"
        self.assertStale()

    def test_body_cut_short(self) -> None:
        """
        A new body that breaks off after its status went out: the client's
        answer is incomplete (it started as a MISS), and the stored copy
        stays to be served.
        """
        served = self.stored_then_stale()
        served.body, served.etag, served.cut_at = b"new index, longer", '"2"', 4
        answer = self.h.get("/i.idx")
        self.assertEqual((answer.status, answer.header("x-cache")), (200, "MISS"))
        self.assertFalse(answer.complete)
        self.h.line.down = True
        self.h.observer.stale.clear()
        self.assertStale()

    def test_refused_target_is_403_not_stale(self) -> None:
        self.stored_then_stale()
        self.h.line.refused = True
        self.assertEqual(self.h.get("/i.idx").status, 403)

    def test_must_revalidate_private_is_not_served_stale(self) -> None:
        self.serve(
            "/i.idx", b"mine", etag='"1"',
            headers={"cache-control": "must-revalidate, max-age=10"},
        )
        alice = {"authorization": "Bearer alice"}
        self.assertAnswer(self.h.get("/i.idx", alice), 200, "MISS")
        self.h.later(20)
        self.h.line.down = True
        answer = self.h.get("/i.idx", alice)
        self.assertEqual(answer.status, 504)
        self.assertIn(b"forbid serving it stale", answer.body)
        self.assertEqual(self.h.observer.stale, [])

    def test_without_a_stored_copy(self) -> None:
        """
        The error table: refused 502, timed out 504, refused by the access
        policy 403, a body that fails its check 502.
        """
        self.h.line.down = True
        self.assertEqual(self.h.get("/a.pkg").status, 502)
        self.h.line.down = False
        self.serve("/slow.pkg", b"", hang=True)
        client = self.h.send("/slow.pkg")
        self.h.later(IDLE_TIMEOUT)
        self.assertEqual(client.answer().status, 504)
        self.h.line.refused = True
        self.assertEqual(self.h.get("/b.pkg").status, 403)
        self.h.line.refused = False
        self.serve("/c.pkg", b"not what was expected")
        self.h.front.policy = Expecting(hashlib.sha256(b"expected").hexdigest())
        answer = self.h.get("/c.pkg")
        self.assertEqual(answer.status, 502)
        self.assertEqual(list(self.h.store.keys()), [])


@define
class StoresAll(GenericPolicy):
    """``POLICY`` with a storable rule that says yes to everything."""

    rules: Any = POLICY.rules

    def storable(
        self, kind: Kind, status: int, response_headers: Mapping[str, str],
        request_headers: Mapping[str, str],
    ) -> bool:
        return True


@define
class Expecting(GenericPolicy):
    """``POLICY`` with a digest expected of every body."""

    sha256: str = ""
    rules: Any = POLICY.rules

    async def expect(self, target: Target, engine: Engine) -> Expectation:
        return Expectation(sha256=self.sha256)


class HeadTests(EngineTestCase):
    def test_head_miss_goes_upstream_as_head(self) -> None:
        self.serve("/a.pkg", b"package")
        answer = self.h.get("/a.pkg", method="HEAD")
        self.assertAnswer(answer, 200, "MISS", b"")
        self.assertEqual(answer.header("content-length"), "7")
        self.assertEqual([s.method for s in self.h.origin.seen], ["HEAD"])
        self.assertEqual(list(self.h.store.keys()), [])

    def test_head_refused_upstream_falls_back_to_get(self) -> None:
        class NoHead(Origin):
            def respond(self, request: Request, path: str) -> object:
                if request.method == b"HEAD":
                    request.setResponseCode(405)
                    return b""
                return super().respond(request, path)

        self.h.origin.__class__ = NoHead
        self.serve("/a.pkg", b"package")
        answer = self.h.get("/a.pkg", method="HEAD")
        self.assertAnswer(answer, 200, "MISS", b"")
        self.assertEqual([s.method for s in self.h.origin.seen], ["HEAD", "GET"])
        self.assertAnswer(self.h.get("/a.pkg", method="HEAD"), 200, "HIT")


    def test_concurrent_head_misses_share_one_head(self) -> None:
        self.serve("/a.pkg", b"package")
        same = [self.h.send("/a.pkg", {"accept": "x"}, method="HEAD") for _ in range(3)]
        other = self.h.send("/a.pkg", {"accept": "y"}, method="HEAD")
        self.h.settle()
        for client in (*same, other):
            self.assertAnswer(client.answer(), 200, "MISS", b"")
        # Sent alike: one HEAD; sent with other headers: its own.
        self.assertEqual([s.method for s in self.h.origin.seen], ["HEAD", "HEAD"])


class JoinTests(EngineTestCase):
    def test_two_clients_one_upstream_request(self) -> None:
        self.serve("/a.pkg", b"package")
        first, second = self.h.send("/a.pkg"), self.h.send("/a.pkg")
        self.h.settle()
        for client in (first, second):
            self.assertAnswer(client.answer(), 200, "MISS", b"package")
        self.assertEqual(self.h.origin.count("/a.pkg"), 1)

    def test_different_credentials_do_not_join(self) -> None:
        self.serve("/a.pkg", b"package", headers={"cache-control": "public"})
        first = self.h.send("/a.pkg", {"authorization": "Bearer alice"})
        second = self.h.send("/a.pkg", {"authorization": "Bearer bob"})
        self.h.settle()
        for client in (first, second):
            self.assertAnswer(client.answer(), 200, "MISS", b"package")
        self.assertEqual(self.h.origin.count("/a.pkg"), 2)
        self.assertEqual(
            sorted(s.headers["authorization"] for s in self.h.origin.seen),
            ["Bearer alice", "Bearer bob"],
        )


class AccountingTests(EngineTestCase):
    """
    The engine reports each finished request with the cache outcome it
    decided and the bytes sent.
    """

    def test_exchanges(self) -> None:
        self.serve("/a.pkg", b"package")
        self.h.get("/a.pkg")
        self.h.get("/a.pkg")
        self.h.get("/a.pkg", {"range": "bytes=0-2"})
        self.h.get("/refused")
        self.h.line.down = True
        self.h.get("/b.pkg")
        self.assertEqual(
            [(e.status, e.cache, e.bytes_sent, e.completed, e.name)
             for e in self.h.observer.exchanges],
            [
                (200, "MISS", 7, True, "a.pkg"),
                (200, "HIT", 7, True, "a.pkg"),
                (206, "HIT", 3, True, "a.pkg"),
                (403, None, len(b"403 not for you\n"), True, "refused"),
                (502, None, self.h.observer.exchanges[-1].bytes_sent, True, "b.pkg"),
            ],
        )
        self.assertEqual(
            {(e.front_end, e.method, e.client) for e in self.h.observer.exchanges},
            {("proxy", "GET", "127.0.0.1")},
        )

    def test_client_leaves_while_revalidating(self) -> None:
        """
        A client that leaves while its answer is prepared gets nothing
        written, and is reported incomplete; the revalidation still
        refreshes the entry.
        """
        served = self.serve("/i.idx", b"index", etag='"1"')
        self.h.get("/i.idx")
        self.h.later(TTL)
        served.hang = True
        client = self.h.send("/i.idx")
        self.h.settle()
        client.leave()
        served.hang = False
        (hanging,) = self.h.origin.hanging
        hanging.setResponseCode(304)
        hanging.setHeader("etag", '"1"')
        hanging.finish()
        self.h.settle()
        self.assertEqual(client.transport.value(), b"")
        last = self.h.observer.exchanges[-1]
        self.assertEqual((last.completed, last.bytes_sent), (False, 0))
        self.assertAnswer(self.h.get("/i.idx"), 200, "HIT")


@define
class ByDigest(GenericPolicy):
    """
    A registry's shape: indexes (tags) carry their version in a header and
    are revalidated by a HEAD; 429 is a failure to serve stale for.  (The
    version header is ``ETag`` here, which the store keeps today; a
    registry's ``Docker-Content-Digest`` needs the fetcher to keep it too.)
    """

    rules: Any = POLICY.rules

    def head_validator(self, kind: Kind) -> str | None:
        return "etag" if kind is Kind.INDEX else None

    def stale_on(self, status: int) -> bool:
        return status == 429 or super().stale_on(status)


class HeadRevalidationTests(EngineTestCase):
    """
    The seams a registry uses: revalidation by a HEAD that compares a
    version header, and stale serving on a status of its choosing.
    """

    def setUp(self) -> None:
        super().setUp()
        self.h.front.policy = ByDigest()
        self.tag = self.serve("/t.idx", b"manifest 1", etag='"sha256:1"')
        self.assertAnswer(self.h.get("/t.idx"), 200, "MISS")
        self.h.later(TTL)

    def methods(self) -> list[str]:
        return [s.method for s in self.h.origin.seen]

    def test_same_version_refreshes(self) -> None:
        self.assertAnswer(self.h.get("/t.idx"), 200, "REVALIDATED", b"manifest 1")
        self.assertEqual(self.methods(), ["GET", "HEAD"])
        self.h.later(TTL - 1)
        self.assertAnswer(self.h.get("/t.idx"), 200, "HIT")

    def test_new_version_is_fetched(self) -> None:
        self.tag.body, self.tag.etag = b"manifest 2", '"sha256:2"'
        self.assertAnswer(self.h.get("/t.idx"), 200, "MISS", b"manifest 2")
        self.assertEqual(self.methods(), ["GET", "HEAD", "GET"])
        self.assertAnswer(self.h.get("/t.idx"), 200, "HIT", b"manifest 2")

    def test_rate_limited_serves_stale(self) -> None:
        self.tag.status = 429
        self.assertAnswer(self.h.get("/t.idx"), 200, "STALE", b"manifest 1")
        self.assertEqual(self.h.observer.stale, [ORIGIN + "/t.idx"])

    def test_down_serves_stale(self) -> None:
        self.h.line.down = True
        self.assertAnswer(self.h.get("/t.idx"), 200, "STALE", b"manifest 1")


@define
class RegistryShape(ByDigest):
    """``ByDigest`` on ``Docker-Content-Digest``, fetching tags whole for a HEAD."""

    def head_validator(self, kind: Kind) -> str | None:
        return "docker-content-digest" if kind is Kind.INDEX else None

    def head_fetches(self, kind: Kind) -> bool:
        return kind is Kind.INDEX


class RegistrySeamTests(EngineTestCase):
    """
    What the registry front end needs of the engine: its digest header kept
    with a body, a HEAD that stores what it misses, and its own error form.
    """

    def setUp(self) -> None:
        super().setUp()
        self.h.front.policy = RegistryShape()
        self.tag = self.serve(
            "/t.idx", b"manifest 1", headers={"docker-content-digest": "sha256:1"}
        )

    def methods(self) -> list[str]:
        return [s.method for s in self.h.origin.seen]

    def test_head_miss_fetches_and_stores_the_body(self) -> None:
        answer = self.h.get("/t.idx", method="HEAD")
        self.assertAnswer(answer, 200, "MISS", b"")
        self.assertEqual(answer.header("content-length"), "10")
        self.assertEqual(answer.header("docker-content-digest"), "sha256:1")
        self.assertEqual(self.methods(), ["GET"])
        hit = self.h.get("/t.idx")
        self.assertAnswer(hit, 200, "HIT", b"manifest 1")
        self.assertEqual(hit.header("docker-content-digest"), "sha256:1")
        self.assertEqual(self.methods(), ["GET"])

    def test_head_miss_of_a_cut_body_is_an_error_and_stores_nothing(self) -> None:
        self.tag.cut_at = 4
        answer = self.h.get("/t.idx", method="HEAD")
        self.assertEqual(answer.status, 502)
        self.assertEqual(list(self.h.store.keys()), [])

    def test_head_miss_of_an_error_passes_it_on(self) -> None:
        answer = self.h.get("/missing.idx", method="HEAD")
        self.assertAnswer(answer, 404, "MISS", b"")
        self.assertEqual(list(self.h.store.keys()), [])

    def test_revalidated_by_the_stored_digest_header(self) -> None:
        self.assertAnswer(self.h.get("/t.idx", method="HEAD"), 200, "MISS")
        self.h.later(TTL)
        self.assertAnswer(self.h.get("/t.idx"), 200, "REVALIDATED", b"manifest 1")
        self.assertEqual(self.methods(), ["GET", "HEAD"])

    def test_concurrent_revalidations_share_one_head(self) -> None:
        """
        Six clients revalidate a tag at once: one HEAD upstream, as a miss
        makes one GET.  (Before, each sent its own.)
        """
        self.assertAnswer(self.h.get("/t.idx"), 200, "MISS")
        self.h.later(TTL)
        clients = [self.h.send("/t.idx", method="HEAD") for _ in range(6)]
        self.h.settle()
        self.assertEqual(
            [c.answer().header("x-cache") for c in clients], ["REVALIDATED"] * 6
        )
        self.assertEqual(self.methods(), ["GET", "HEAD"])

    def test_errors_in_the_front_ends_form(self) -> None:
        def as_json(code: int, message: str) -> tuple[str, bytes]:
            return "application/json", f'{{"status": {code}, "why": "{message}"}}'.encode()

        class JsonFrontEnd(FrontEnd):
            def render(self, request: Request) -> object:
                self.engine.begin(request, "registry", "t", errors=as_json)
                return super().render(request)

        self.h.site.resource = JsonFrontEnd(self.h.engine)
        self.h.line.down = True
        answer = self.h.get("/t.idx")
        self.assertEqual(answer.status, 502)
        self.assertEqual(answer.header("content-type"), "application/json")
        self.assertIn(b'"status": 502', answer.body)
        refused = self.h.get("/refused")
        self.assertEqual((refused.status, refused.header("content-type")),
                         (403, "application/json"))
        self.assertEqual(refused.body, b'{"status": 403, "why": "not for you"}')


class ExchangeRecordTests(SynchronousTestCase):
    def test_a_finished_request_is_not_kept(self) -> None:
        """
        The record of a request (kept so that ``client_gone`` can answer
        for it) does not keep the request alive once it has finished.
        """
        exchanges = Exchanges(Clock())
        request: Any = DummyRequest([b"a.pkg"])
        exchanges.begin(request, "proxy")
        request.finish()
        gone = weakref.ref(request)
        del request
        gc.collect()
        self.assertIsNone(gone())

    def test_gone(self) -> None:
        exchanges = Exchanges(Clock())
        request: Any = DummyRequest([b"a.pkg"])
        self.assertFalse(client_gone(request))
        exchanges.begin(request, "proxy")
        self.assertFalse(client_gone(request))
        request.processingFailed(Failure(ConnectionDone()))
        self.assertTrue(client_gone(request))


class Rejects:
    """A verifier that refuses a captive portal's page."""

    def __init__(self) -> None:
        self.data = b""

    def update(self, data: bytes) -> None:
        self.data += data

    def finish(self) -> None:
        if self.data.startswith(b"PORTAL"):
            raise ValueError("not an index: a captive portal")


@define
class Checking(GenericPolicy):
    """``POLICY`` with a verifier on every body (as the pip pages have)."""

    rules: Any = POLICY.rules

    async def expect(self, target: Target, engine: Engine) -> Expectation:
        return Expectation(verify=lambda headers: Rejects())


def track_opened(case: SynchronousTestCase, store: Store) -> list[Any]:
    """
    Every stored object ``store`` opens from now on, for the test ``case``
    (to find one left open).
    """
    opened: list[Any] = []
    cls = type(store)
    original = cls.lookup

    def lookup(self: Store, key: str) -> Any:
        stored = original(self, key)
        if stored is not None:
            opened.append(stored)
        return stored

    case.patch(cls, "lookup", lookup)
    return opened


def leaked(opened: list[Any]) -> list[Any]:
    return [stored for stored in opened if stored.fd >= 0]


class RevalidationIntegrityTests(EngineTestCase):
    """
    A revalidation whose 200 fails its check (a captive portal's page) is
    a failed revalidation: the stored copy is served STALE, and every
    stored object opened is closed.
    """

    def test_failed_check_serves_stale_and_closes(self) -> None:
        self.h.front.policy = Checking()
        self.serve("/a.idx", b"good index")
        self.assertAnswer(self.h.get("/a.idx"), 200, "MISS", b"good index")
        self.h.later(TTL + 1)
        self.serve("/a.idx", b"PORTAL login here")
        opened = track_opened(self, self.h.store)
        answer = self.h.get("/a.idx")
        self.h.settle()
        self.assertAnswer(answer, 200, "STALE", b"good index")
        self.assertEqual(self.h.observer.stale, [ORIGIN + "/a.idx"])
        self.assertEqual(leaked(opened), [], "stored object left open")
        self.assertEqual(len(opened), 1)
        self.assertEqual(self.h.store.peek(cache_key(ORIGIN + "/a.idx")).size, 10)

    def test_failing_expect_closes_the_stored_copy(self) -> None:
        """
        A policy hook that fails during a revalidation (a bug, say) still
        leaves no stored object open.
        """
        @define
        class Broken(GenericPolicy):
            rules: Any = POLICY.rules

            async def expect(self, target: Target, engine: Engine) -> Expectation:
                raise RuntimeError("broken policy")

        self.serve("/a.idx", b"index")
        self.h.get("/a.idx")
        self.h.later(TTL + 1)
        self.h.front.policy = Broken()
        opened = track_opened(self, self.h.store)
        self.assertEqual(self.h.get("/a.idx").status, 500)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(len(opened), 1)
        self.assertEqual(leaked(opened), [])


class Unconditional304Tests(EngineTestCase):
    def test_304_to_an_unconditional_request_is_an_upstream_error(self) -> None:
        """
        An upstream that answers 304 to a request that asked nothing on
        condition has sent no body: a 502, not a MISS without a body.
        """
        self.serve("/a.pkg", b"", status=304)
        answer = self.h.get("/a.pkg")
        self.assertEqual(answer.status, 502)
        self.assertIn(b"answered 304 to an unconditional request", answer.body)
        self.assertEqual(list(self.h.store.keys()), [])
        self.assertEqual(self.h.observer.exchanges[-1].cache, None)
