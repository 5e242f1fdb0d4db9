"""
A hits-only engine (a hit worker's, issue 16): it answers what
:meth:`Engine.fresh_hit` answers, and hands everything else off before
any I/O and before a byte is written, through the one ``on_hand_off`` the
service injects; a handed-off request is neither logged nor counted.
The writing harness of :mod:`tests.test_engine` fills the store; a
read-only store and no fetcher serve the worker's side.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel, DummyRequest

from buildcache.engine.core import NO_FETCHER, Engine, HandOff
from buildcache.engine.exchanges import (
    Exchanges,
    ExchangeState,
    exchange_of,
    hand_off_exchange,
)
from buildcache.engine.policy import NO_EXPECTATION, Target
from buildcache.store import Store
from tests.test_engine import (
    FORWARDED,
    ORIGIN,
    POLICY,
    TTL,
    Answer,
    EngineTestCase,
    FrontEnd,
    Observer,
    parse_response,
)


class Worker:
    """The worker's side: a read-only store, a hits-only engine, a site."""

    def __init__(self, case: EngineTestCase) -> None:
        h = case.h
        self.store = Store.open(h.directory, 100 * 1024 * 1024, h.clock, read_only=True)
        case.addCleanup(self.store.close)
        self.observer = Observer()
        self.handed: list[Request] = []
        self.engine = Engine(
            self.store, NO_FETCHER, h.clock, self.observer, TTL,  # type: ignore[arg-type]
            hits_only=True, on_hand_off=self.handed.append,
        )
        self.site = Site(FrontEnd(self.engine), reactor=h.clock)
        self.clock = h.clock

    def send(
        self, path: str, headers: dict[str, str] | None = None, method: str = "GET"
    ) -> StringTransport:
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
        self.clock.advance(0)
        return transport

    def get(self, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> Answer:
        return parse_response(self.send(path, headers, method).value())

    def target(self, path: str, headers: dict[str, str] | None = None) -> Target:
        headers = dict(headers or {})
        return Target(
            url=ORIGIN + path, front_end="proxy", headers=headers,
            upstream_headers={k: headers[k] for k in FORWARDED if k in headers},
        )


class HitsOnlyTests(EngineTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.serve("/a.pkg", b"package")
        self.serve("/i.idx", b"index", etag='"1"')
        self.serve("/other.pkg", b"other")
        self.h.get("/a.pkg")
        self.h.get("/i.idx")
        self.worker = Worker(self)
        self.upstream_before = len(self.h.origin.seen)

    def assertHandedOff(self, transport: StringTransport, count: int = 1) -> None:
        self.assertEqual(transport.value(), b"", "a byte was written before the hand-off")
        self.assertEqual(len(self.worker.handed), count)
        self.assertEqual(self.worker.observer.exchanges, [])
        self.assertEqual(len(self.h.origin.seen), self.upstream_before)

    def test_fresh_hits_are_answered(self) -> None:
        for method in ("GET", "HEAD"):
            answer = self.worker.get("/a.pkg", method=method)
            self.assertAnswer(answer, 200, "HIT", b"package" if method == "GET" else b"")
        self.assertAnswer(self.worker.get("/i.idx"), 200, "HIT", b"index")
        self.assertEqual(self.worker.handed, [])
        self.assertEqual(
            [(e.method, e.cache) for e in self.worker.observer.exchanges],
            [("GET", "HIT"), ("HEAD", "HIT"), ("GET", "HIT")],
        )
        self.assertEqual(len(self.h.origin.seen), self.upstream_before)

    def test_miss_is_handed_off(self) -> None:
        self.assertHandedOff(self.worker.send("/other.pkg"))

    def test_head_miss_is_handed_off(self) -> None:
        self.assertHandedOff(self.worker.send("/other.pkg", method="HEAD"))

    def test_stale_index_is_handed_off(self) -> None:
        """Past its TTL an index is revalidated: by the main process."""
        self.h.clock.advance(TTL + 1)
        self.assertHandedOff(self.worker.send("/i.idx"))

    def test_client_revalidation_is_handed_off(self) -> None:
        self.assertHandedOff(self.worker.send("/i.idx", {"cache-control": "no-cache"}))

    def test_another_clients_private_entry_is_handed_off(self) -> None:
        self.assertHandedOff(self.worker.send("/a.pkg", {"authorization": "Bearer x"}))

    def test_handed_off_request_is_not_counted_when_it_closes(self) -> None:
        transport = self.worker.send("/other.pkg")
        self.assertHandedOff(transport)
        request = self.worker.handed[0]
        assert request.channel is not None
        request.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.worker.observer.exchanges, [])

    def test_other_entry_points_raise_hand_off(self) -> None:
        engine = self.worker.engine
        target = self.worker.target("/i.idx")
        self.assertRaises(HandOff, engine.stale, target, POLICY, "failed")
        for call in (
            engine.refresh(target, POLICY),
            engine.adopt(target, POLICY, NO_EXPECTATION),
            engine.resolve(self.worker.target("/other.pkg"), POLICY),
            engine.resolve(self.worker.target("/other.pkg"), POLICY, b"HEAD"),
        ):
            with self.assertRaises(HandOff):
                call.send(None)
        self.assertEqual(len(self.h.origin.seen), self.upstream_before)

    def test_fetcher_stand_in_hands_off(self) -> None:
        with self.assertRaises(HandOff):
            NO_FETCHER.fetch  # noqa: B018

    def test_without_a_way_out_a_503(self) -> None:
        """A hits-only engine nobody gave ``on_hand_off``: a 503, logged."""
        self.worker.engine.on_hand_off = None
        answer = self.worker.get("/other.pkg")
        self.assertEqual(answer.status, 503)
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class HandOffExchangeTests(SynchronousTestCase):
    def test_hand_off_marks_the_exchange(self) -> None:
        request: Any = DummyRequest([b""])
        observer = Observer()
        Exchanges(Clock(), observer).begin(request, "proxy")
        hand_off_exchange(request)
        record = exchange_of(request)
        assert record is not None
        self.assertIs(record.state, ExchangeState.HANDED_OFF)
        request.finish()
        self.assertEqual(observer.exchanges, [])


class HandOffLogTests(SynchronousTestCase):
    def test_a_failed_hand_off_logs_no_credentials(self) -> None:
        """
        A hits-only engine that cannot hand a request off logs it with the
        request's credentials masked (it logged the raw request target).
        """
        engine = Engine(
            None, NO_FETCHER, Clock(), None, TTL,  # type: ignore[arg-type]
            hits_only=True,
        )
        request = Request(DummyChannel())
        request.uri = b"http://user:s3cr3t@example.test/x"
        with capturedLogs() as events:
            engine.crashed(Failure(HandOff("x")), request)
        [event] = [e for e in events if e.get("event") == "hand_off_failed"]
        self.assertNotIn("s3cr3t", repr(event))
        self.assertEqual(request.code, 503)
