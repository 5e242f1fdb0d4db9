"""
The download state machine (:mod:`buildcache.fetch.download`) and the
fetcher's single flight over it, without sockets: a fake clock, a real
store in a temporary directory, and in-memory upstreams (a scripted agent
whose responses the test feeds byte by byte, and treq's
``RequestTraversalAgent`` over a ``twisted.web`` resource).
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Mapping
from typing import Any

from attrs import define, field
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from buildcache.fetch.download import MEMORY_BUFFER, Download
from buildcache.fetch.errors import CacheWriteError, UpstreamError, UpstreamTimeout
from buildcache.fetch.fetcher import Fetcher, upstream_client
from buildcache.fetch.phase import IllegalTransition, Phase
from buildcache.fetch.reader import WITHHELD_TAIL, DownloadBody
from buildcache.fetch.request import UpstreamAnswer, UpstreamRequest
from buildcache.store import IntegrityError, NoRoom, Store
from tests.test_faults import failing_disk

URL = "http://upstream.test/pkg.bin"
KEY = "http://upstream.test/pkg.bin"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@implementer(IResponse)
class FakeResponse:
    """
    A response whose body the test delivers: :meth:`send` bytes, then
    :meth:`finish` or :meth:`cut`.  Its transport is a ``StringTransport``,
    whose ``producerState`` shows whether the download paused it.
    """

    version = (b"HTTP", 1, 1)
    phrase = b"OK"
    request = None
    previousResponse = None

    def __init__(self, code: int, headers: Mapping[str, str], length: int | None):
        self.code = code
        self.headers = Headers({k: [v] for k, v in headers.items()})
        self.length = UNKNOWN_LENGTH if length is None else length
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def setPreviousResponse(self, response: Any) -> None:
        pass

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def finish(self) -> None:
        self.protocol.connectionLost(Failure(ResponseDone()))

    def cut(self) -> None:
        self.protocol.connectionLost(Failure(ResponseFailed([Failure(ConnectionError())])))


@define
class Sent:
    method: bytes
    uri: bytes
    headers: Headers
    response: Deferred[IResponse]

    def answer(
        self, code: int = 200, headers: Mapping[str, str] | None = None,
        length: int | None = None,
    ) -> FakeResponse:
        response = FakeResponse(code, headers or {}, length)
        self.response.callback(response)
        return response


@implementer(IAgent)
@define
class ScriptedAgent:
    """
    Records each request; the test answers it (:meth:`Sent.answer`).
    """

    sent: list[Sent] = field(factory=list)

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        d: Deferred[IResponse] = Deferred()
        self.sent.append(Sent(method, uri, headers or Headers(), d))
        return d


@define
class Observer:
    """A FetchObserver that remembers what it was told."""

    received: list[tuple[str, int]] = field(factory=list)
    failed: list[tuple[str, str]] = field(factory=list)
    succeeded: list[str] = field(factory=list)

    def upstream_received(self, front_end: str, count: int) -> None:
        self.received.append((front_end, count))

    def upstream_succeeded(self, url: str, latency: float) -> None:
        self.succeeded.append(url)

    def upstream_failed(self, url: str, error: str) -> None:
        self.failed.append((url, error))


def read_all(body: DownloadBody) -> bytes:
    return body.read(0, body.available())


class StoreCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = Store.open(self.mktemp(), 1 << 30, self.clock)
        self.addCleanup(self.store.close)

    def download(self, **kwargs: Any) -> Download:
        return Download(UpstreamRequest(key=KEY, url=URL, **kwargs), self.store)

    def answer_of(self, download: Download) -> UpstreamAnswer:
        answer: UpstreamAnswer = self.successResultOf(download.join())
        if answer.body is not None:
            self.addCleanup(answer.body.close)
        return answer


class TransitionTests(StoreCase):
    """
    Every legal transition of a :class:`Download`, and illegal ones raising.
    """

    def in_memory(self, readers: int = 1) -> tuple[Download, StringTransport, list[DownloadBody]]:
        """
        A download the disk refused, with ``readers`` readers at offset 0
        and its upstream's transport.
        """
        download = self.download()
        producer = StringTransport()
        download.start_body(200, {}, OSError(errno.ENOSPC, "full"))
        bodies = []
        for _ in range(readers):
            body = self.answer_of(download).body
            assert body is not None
            body.advance(0)
            bodies.append(body)
        download.upstream_connected(producer)
        return download, producer, bodies

    def test_spooled_to_settled(self) -> None:
        download = self.download()
        self.assertIs(download.phase, Phase.CONNECTING)
        joined = download.join()
        self.assertNoResult(joined)
        download.start_body(200, {"content-type": "x/y"}, self.store.writer(KEY))
        self.assertIs(download.phase, Phase.SPOOLING)
        answer = self.successResultOf(joined)
        assert answer.body is not None
        self.addCleanup(answer.body.close)
        self.assertEqual(answer.status, 200)
        self.assertTrue(download.take(b"hello "))
        self.assertTrue(download.take(b"world"))
        self.assertEqual((download.received, download.spooled), (11, 11))
        self.assertEqual(read_all(answer.body), b"hello world")
        self.assertFalse(answer.body.finished())
        download.complete()
        self.assertIs(download.phase, Phase.COMPLETE)
        self.assertTrue(answer.body.finished())
        self.assertEqual(download.sha256, sha256(b"hello world"))
        self.assertEqual(answer.body.digest(), sha256(b"hello world"))
        # Joined from now on: the whole length, and so ranges.
        self.assertEqual(self.answer_of(download).headers["content-length"], "11")
        settled = download.when_settled()
        self.assertNoResult(settled)
        download.settle()
        self.assertIs(download.phase, Phase.SETTLED)
        self.successResultOf(settled)
        self.successResultOf(download.when_settled())

    def test_not_modified(self) -> None:
        download = self.download(revalidates=KEY)
        joined = download.join()
        download.not_modified({"etag": '"1"'})
        self.assertIs(download.phase, Phase.NOT_MODIFIED)
        answer = self.successResultOf(joined)
        self.assertEqual((answer.status, answer.body), (304, None))
        self.assertTrue(download.finished)
        download.settle()
        self.assertEqual(self.answer_of(download).status, 304)

    def test_no_room_goes_on_in_memory(self) -> None:
        unjoinable: list[Download] = []
        download = self.download()
        download.on_unspooled = unjoinable.append
        download.start_body(200, {}, NoRoom("too big"))
        self.assertIs(download.phase, Phase.IN_MEMORY)
        self.assertEqual(unjoinable, [download])
        self.assertIsInstance(download.spool_error, NoRoom)
        self.assertIsNone(download.spool)
        answer = self.answer_of(download)
        assert answer.body is not None
        # A reader holds the bytes in memory from the offset it reports.
        answer.body.advance(0)
        download.take(b"abc")
        self.assertEqual(answer.body.read(0, 10), b"abc")
        download.complete()
        # Never whole on disk: no digest to vouch for it.
        self.assertIsNone(download.sha256)
        self.assertEqual(download.memory_mismatch(), None)

    def test_disk_failing_mid_body(self) -> None:
        """
        SPOOLING → IN_MEMORY when a write fails: readers read the bytes
        written from the file and the rest from memory.
        """
        self.store.write_file = failing_disk(errno.EIO, after=4)
        download = self.download()
        download.start_body(200, {}, self.store.writer(KEY))
        answer = self.answer_of(download)
        assert answer.body is not None
        answer.body.advance(0)
        download.take(b"1234")
        self.assertIs(download.phase, Phase.SPOOLING)
        download.take(b"5678")
        self.assertIs(download.phase, Phase.IN_MEMORY)
        self.assertEqual((download.spooled, download.received), (4, 8))
        self.assertEqual(answer.body.read(0, 4), b"1234")
        self.assertEqual(answer.body.read(4, 4), b"5678")
        download.complete()
        # The digest still covers the whole body, the spooled part included.
        self.assertIsNone(download.memory_mismatch())
        self.assertIsNone(
            Download(
                UpstreamRequest(key=KEY, url=URL, expected_sha256=sha256(b"12345678")),
                self.store,
            ).memory_mismatch()
        )

    def test_memory_digest_checked(self) -> None:
        download = self.download(expected_sha256=sha256(b"right"), stream_before_check=True)
        download.start_body(200, {}, OSError(errno.ENOSPC, "full"))
        self.answer_of(download)
        download.take(b"wrong")
        self.assertIn("expected sha256", download.memory_mismatch() or "")

    def test_failure_before_the_answer(self) -> None:
        download = self.download()
        joined = download.join()
        download.fail(Failure(UpstreamError("unreachable")))
        self.assertIs(download.phase, Phase.FAILED)
        self.failureResultOf(joined, UpstreamError)
        self.failureResultOf(download.join(), UpstreamError)
        download.settle()
        self.failureResultOf(download.join(), UpstreamError)

    def test_failure_after_the_answer(self) -> None:
        """
        Clients answered before the failure see their body fail; so do
        those joining afterwards.
        """
        download = self.download()
        download.start_body(200, {}, self.store.writer(KEY))
        answer = self.answer_of(download)
        assert answer.body is not None
        download.take(b"part")
        more: list[bool] = []
        answer.body.when_more(lambda: more.append(True))
        download.fail(Failure(UpstreamError("cut")))
        self.assertEqual(more, [True])
        self.assertTrue(answer.body.finished())
        failure = answer.body.failure()
        assert failure is not None
        self.assertTrue(failure.check(UpstreamError))
        late = self.answer_of(download)
        assert late.body is not None
        self.assertIsNotNone(late.body.failure())

    def test_held_until_checked(self) -> None:
        """
        A checked request is answered at COMPLETE, not when its body starts.
        """
        download = self.download(expected_sha256=sha256(b"ok"))
        joined = download.join()
        download.start_body(200, {}, self.store.writer(KEY))
        download.take(b"ok")
        self.assertNoResult(joined)
        download.complete()
        answer = self.successResultOf(joined)
        assert answer.body is not None
        self.addCleanup(answer.body.close)
        self.assertEqual(read_all(answer.body), b"ok")

    def test_withheld_tail(self) -> None:
        download = self.download(expected_sha256=sha256(b"x"), stream_before_check=True)
        download.start_body(200, {}, self.store.writer(KEY))
        answer = self.answer_of(download)
        assert answer.body is not None
        download.take(b"x" * (WITHHELD_TAIL + 10))
        self.assertEqual(answer.body.available(), 10)
        download.complete()
        self.assertEqual(answer.body.available(), WITHHELD_TAIL + 10)

    def test_held_back_and_resumed(self) -> None:
        """
        IN_MEMORY ⇄ HELD_BACK: the upstream pauses while the slowest
        reader is more than MEMORY_BUFFER behind, and resumes once it has
        caught up.
        """
        download, producer, (body,) = self.in_memory()
        download.take(b"a" * MEMORY_BUFFER)
        self.assertIs(download.phase, Phase.IN_MEMORY)
        download.take(b"b")
        self.assertIs(download.phase, Phase.HELD_BACK)
        self.assertEqual(producer.producerState, "paused")
        self.assertEqual(download.memory_held, MEMORY_BUFFER + 1)
        body.advance(MEMORY_BUFFER)
        self.assertIs(download.phase, Phase.IN_MEMORY)
        self.assertEqual(producer.producerState, "producing")
        self.assertEqual(download.memory_held, 1)
        self.assertEqual(body.read(MEMORY_BUFFER, 10), b"b")

    def test_held_back_until_the_end(self) -> None:
        """
        HELD_BACK → COMPLETE (the last bytes came with the pause) and
        HELD_BACK → FAILED.
        """
        for end in ("complete", "fail"):
            download, producer, (body,) = self.in_memory()
            download.take(b"a" * (MEMORY_BUFFER + 1))
            self.assertIs(download.phase, Phase.HELD_BACK)
            if end == "complete":
                download.complete()
                self.assertIs(download.phase, Phase.COMPLETE)
                self.assertEqual(body.read(0, 2), b"aa")
            else:
                download.fail(Failure(UpstreamError("cut")))
                self.assertIs(download.phase, Phase.FAILED)
            self.assertTrue(body.finished())
            download.settle()

    def test_laggards_dropped(self) -> None:
        download, producer, (slow, quick) = self.in_memory(readers=2)
        self.assertFalse(download.drop_laggards())
        download.take(b"a" * (MEMORY_BUFFER + 1))
        quick.advance(MEMORY_BUFFER + 1)
        self.assertIs(download.phase, Phase.HELD_BACK)
        self.assertTrue(download.drop_laggards())
        self.assertTrue(slow.dropped)
        self.assertEqual(slow.read(0, 1), b"")
        self.assertFalse(quick.dropped)
        self.assertIs(download.phase, Phase.IN_MEMORY)
        self.assertEqual(producer.producerState, "producing")

    def test_abandoned_when_the_last_reader_leaves(self) -> None:
        download, producer, (body,) = self.in_memory()
        self.assertIs(download.phase, Phase.IN_MEMORY)
        download.take(b"abc")
        body.close()
        self.assertIs(download.phase, Phase.ABANDONED)
        self.assertTrue(download.abandoned)
        self.assertEqual(producer.producerState, "stopped")
        self.assertFalse(download.take(b"more"))
        self.assertEqual(download.received, 3)
        download.fail(Failure(CacheWriteError("abandoned")))
        self.assertIs(download.phase, Phase.FAILED)

    def test_abandoned_at_once_when_it_must_be_checked(self) -> None:
        download = self.download(expected_sha256=sha256(b"x"))
        joined = download.join()
        download.start_body(200, {}, OSError(errno.ENOSPC, "full"))
        download.upstream_connected(StringTransport())
        self.assertIs(download.phase, Phase.ABANDONED)
        download.fail(Failure(CacheWriteError("cannot be checked")))
        self.failureResultOf(joined, CacheWriteError)

    def test_spooled_download_not_abandoned(self) -> None:
        download = self.download()
        download.start_body(200, {}, self.store.writer(KEY))
        answer = self.answer_of(download)
        assert answer.body is not None
        download.upstream_connected(StringTransport())
        answer.body.close()
        self.assertIs(download.phase, Phase.SPOOLING)

    def test_illegal_transitions(self) -> None:
        download = self.download()
        for attempt in (download.complete, download.settle, download.abandon):
            self.assertRaises(IllegalTransition, attempt)
        self.assertRaises(IllegalTransition, download.take, b"x")
        download.start_body(200, {}, self.store.writer(KEY))
        self.assertRaises(IllegalTransition, download.not_modified, {})
        self.assertRaises(
            IllegalTransition, download.start_body, 200, {}, OSError("again")
        )
        self.assertRaises(IllegalTransition, download.abandon)
        self.assertRaises(IllegalTransition, download.settle)
        download.complete()
        self.assertRaises(IllegalTransition, download.fail, Failure(UpstreamError()))
        self.assertRaises(IllegalTransition, download.take, b"late")
        self.assertRaises(IllegalTransition, download.complete)
        download.settle()
        error = self.assertRaises(IllegalTransition, download.settle)
        self.assertEqual((error.current, error.wanted), (Phase.SETTLED, Phase.SETTLED))
        self.assertIn("SETTLED", str(error))
        self.assertEqual(download.phase, Phase.SETTLED)

    def test_not_modified_has_no_body_to_complete(self) -> None:
        download = self.download()
        download.not_modified({})
        self.assertRaises(IllegalTransition, download.complete)
        self.assertRaises(IllegalTransition, download.fail, Failure(UpstreamError()))


class JoinRuleTests(SynchronousTestCase):
    """
    Who may share a download: credentials, conditions, checks and digests.
    """

    def request(self, **kwargs: Any) -> UpstreamRequest:
        return UpstreamRequest(key=KEY, url=URL, **kwargs)

    def test_digests(self) -> None:
        plain = self.request()
        digest = self.request(expected_sha256="AB" * 32)
        same = self.request(expected_sha256="ab" * 32)
        other = self.request(expected_sha256="cd" * 32)
        self.assertTrue(digest.may_join(plain))
        self.assertTrue(digest.checks_beyond(plain))
        self.assertTrue(same.may_join(digest))
        self.assertFalse(same.checks_beyond(digest))
        self.assertTrue(plain.may_join(digest))
        self.assertFalse(plain.checks_beyond(digest))
        self.assertFalse(other.may_join(digest))

    def test_sizes(self) -> None:
        plain, ten, eleven = (
            self.request(), self.request(expected_size=10), self.request(expected_size=11)
        )
        self.assertTrue(ten.may_join(plain))
        self.assertTrue(ten.checks_beyond(plain))
        self.assertFalse(eleven.may_join(ten))
        self.assertTrue(ten.may_join(self.request(expected_size=10)))

    def test_credentials_conditions_and_verifiers(self) -> None:
        plain = self.request()
        self.assertFalse(self.request(headers={"authorization": "a"}).may_join(plain))
        self.assertFalse(self.request(headers={"if-none-match": '"1"'}).may_join(plain))
        self.assertFalse(self.request(revalidates=KEY).may_join(plain))
        self.assertFalse(self.request(operator_credentials=False).may_join(plain))
        verified = self.request(verify=lambda headers: Any)
        self.assertFalse(verified.may_join(plain))
        self.assertTrue(plain.may_join(verified))

    def test_source_digest(self) -> None:
        """
        A request checked against one version of an index entry does not
        join a download checked against another (its verifier was built
        from the old entry), nor one checked against none; it joins one of
        the same version.  A request without a source digest joins either.
        """
        def verify(headers: Any) -> Any:
            return None

        old = self.request(verify=verify, source_digest="Q1old")
        new = self.request(verify=verify, source_digest="Q1new")
        self.assertFalse(new.may_join(old))
        self.assertFalse(old.may_join(new))
        self.assertTrue(new.may_join(self.request(verify=verify, source_digest="Q1new")))
        self.assertFalse(new.may_join(self.request(verify=verify)))
        self.assertTrue(self.request(verify=verify).may_join(old))
        self.assertTrue(self.request().may_join(old))

    def test_variants_flag_refused(self) -> None:
        """
        ``variants`` takes a rule: the old ``variants=True`` fails loudly.
        """
        self.assertRaises(TypeError, UpstreamRequest, key=KEY, url=URL, variants=True)


@define
class SplitOnAccept:
    """A VariantRule: responses vary on ``accept``."""

    stored_keys: list[str] = field(factory=list)

    def stored_key(
        self, family: str, secret: bytes, response_headers: Mapping[str, str],
        sent: Mapping[str, str],
    ) -> str | None:
        return f"{family}#v={sent.get('accept')}"

    def same_variant(
        self, response_headers: Mapping[str, str], sent: Mapping[str, str],
        other_sent: Mapping[str, str],
    ) -> bool:
        return sent.get("accept") == other_sent.get("accept")

    def stored(self, store: Store, family: str, stored_key: str) -> None:
        self.stored_keys.append(stored_key)


class FetcherTests(StoreCase):
    """
    Single flight over scripted upstream responses.
    """

    def setUp(self) -> None:
        super().setUp()
        self.agent = ScriptedAgent()
        self.observer = Observer()
        self.fetcher = Fetcher(
            self.store, upstream_client(self.agent), self.clock, idle_timeout=10.0,
            activity=self.observer,
        )

    def fetched(self, request: UpstreamRequest) -> Deferred[UpstreamAnswer]:
        return self.fetcher.fetch(request)

    def body_of(self, d: Deferred[UpstreamAnswer]) -> DownloadBody:
        answer = self.successResultOf(d)
        assert answer.body is not None
        self.addCleanup(answer.body.close)
        return answer.body

    def test_upstream_answering_at_once(self) -> None:
        """
        A download that ends inside :meth:`Fetcher.fetch` (an upstream in
        memory answers at once) still gives its caller the whole body: the
        caller got a reader of a spool file already closed before.
        """
        body = b"at once"

        class AtOnce(FakeResponse):
            def deliverBody(self, protocol: Any) -> None:
                super().deliverBody(protocol)
                self.send(body)
                self.finish()

        @implementer(IAgent)
        class Immediate:
            def request(
                self, method: bytes, uri: bytes, headers: Headers | None = None,
                bodyProducer: Any = None,
            ) -> Deferred[IResponse]:
                return succeed(AtOnce(200, {}, len(body)))

        fetcher = Fetcher(self.store, upstream_client(Immediate()), self.clock)
        answer = self.successResultOf(fetcher.fetch(UpstreamRequest(key=KEY, url=URL)))
        assert answer.body is not None
        self.addCleanup(answer.body.close)
        self.assertEqual(read_all(answer.body), body)

    def test_joiners_share_one_request(self) -> None:
        request = UpstreamRequest(key=KEY, url=URL, front_end="mirror")
        first, second = self.fetched(request), self.fetched(request)
        (sent,) = self.agent.sent
        self.assertEqual(sent.uri, URL.encode())
        self.assertTrue(self.fetcher.downloading(KEY))
        response = sent.answer(200, {"content-type": "x/y"}, length=5)
        a, b = self.body_of(first), self.body_of(second)
        response.send(b"hello")
        response.finish()
        self.assertEqual((read_all(a), read_all(b)), (b"hello", b"hello"))
        self.successResultOf(self.fetcher.when_idle())
        stored = self.store.lookup(KEY)
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(stored.entry.sha256, sha256(b"hello"))
        self.assertEqual(self.observer.received, [("mirror", 5)])

    def test_other_credentials_get_their_own_download(self) -> None:
        self.fetched(UpstreamRequest(key=KEY, url=URL))
        self.fetched(UpstreamRequest(key=KEY, url=URL, headers={"authorization": "x"}))
        self.assertEqual(len(self.agent.sent), 2)
        self.assertEqual(self.fetcher.in_flight(), 2)

    def test_other_variant_gets_its_own_download(self) -> None:
        rule = SplitOnAccept()
        json = UpstreamRequest(key=KEY, url=URL, headers={"accept": "json"}, variants=rule)
        html = UpstreamRequest(key=KEY, url=URL, headers={"accept": "html"}, variants=rule)
        first, second = self.fetched(json), self.fetched(html)
        self.assertEqual(len(self.agent.sent), 1)
        response = self.agent.sent[0].answer(200, {"vary": "accept"}, length=1)
        self.body_of(first)
        # The answer said it varies: the html request asked on its own.
        self.assertEqual(len(self.agent.sent), 2)
        self.assertNoResult(second)
        other = self.agent.sent[1].answer(200, {"vary": "accept"}, length=1)
        self.body_of(second)
        for r in (response, other):
            r.send(b"x")
            r.finish()
        self.successResultOf(self.fetcher.when_idle())
        self.assertEqual(sorted(rule.stored_keys), [f"{KEY}#v=html", f"{KEY}#v=json"])

    def test_not_modified(self) -> None:
        d = self.fetched(UpstreamRequest(key=KEY, url=URL, revalidates=KEY))
        self.agent.sent[0].answer(304, {"etag": '"2"'})
        answer = self.successResultOf(d)
        self.assertEqual((answer.status, answer.body), (304, None))
        self.successResultOf(self.fetcher.when_idle())

    def test_memory_fallback_is_not_joined(self) -> None:
        """
        A download the disk refused streams from memory, is not stored,
        and later requests for its key start their own.
        """
        def refuse(store: Store, key: str, whole_digest: bool = True) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(Store, "writer", refuse)
        request = UpstreamRequest(key=KEY, url=URL)
        first = self.fetched(request)
        response = self.agent.sent[0].answer(200, {}, length=3)
        body = self.body_of(first)
        (download,) = self.fetcher.running()
        self.assertIs(download.phase, Phase.IN_MEMORY)
        self.assertFalse(self.fetcher.downloading(KEY))
        self.fetched(request)
        self.assertEqual(len(self.agent.sent), 2)
        body.advance(0)
        response.send(b"abc")
        self.assertEqual(body.read(0, 3), b"abc")
        response.finish()
        self.assertIs(download.phase, Phase.SETTLED)
        self.assertIsNone(download.failure)
        self.assertIsNone(self.store.peek(KEY))

    def test_abandoned_when_nobody_reads(self) -> None:
        def refuse(store: Store, key: str, whole_digest: bool = True) -> Any:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(Store, "writer", refuse)
        first = self.fetched(UpstreamRequest(key=KEY, url=URL))
        response = self.agent.sent[0].answer(200, {}, length=10)
        (download,) = self.fetcher.running()
        self.body_of(first).close()
        self.assertIs(download.phase, Phase.ABANDONED)
        self.assertEqual(response.transport.producerState, "stopped")
        response.cut()
        self.assertIs(download.phase, Phase.SETTLED)
        failure = download.failure
        assert failure is not None
        self.assertTrue(failure.check(CacheWriteError))
        self.assertEqual(self.fetcher.in_flight(), 0)

    def test_idle_timeout_fails_the_body(self) -> None:
        first = self.fetched(UpstreamRequest(key=KEY, url=URL))
        response = self.agent.sent[0].answer(200, {}, length=10)
        body = self.body_of(first)
        response.send(b"12345")
        self.clock.advance(9)
        response.send(b"6")
        self.clock.advance(10)
        self.assertEqual(response.transport.producerState, "stopped")
        response.cut()
        failure = body.failure()
        assert failure is not None
        self.assertTrue(failure.check(UpstreamTimeout))
        self.assertEqual(self.observer.failed, [(URL, "stalled mid-body")])

    def test_head_timeout(self) -> None:
        d = self.fetched(UpstreamRequest(key=KEY, url=URL))
        self.clock.advance(10)
        self.failureResultOf(d, UpstreamTimeout)

    def test_mismatch_fails_the_checked_request(self) -> None:
        d = self.fetched(UpstreamRequest(key=KEY, url=URL, expected_sha256=sha256(b"good")))
        response = self.agent.sent[0].answer(200, {}, length=3)
        self.assertNoResult(d)
        response.send(b"bad")
        response.finish()
        self.failureResultOf(d, IntegrityError)
        self.assertIsNone(self.store.peek(KEY))

    def test_mismatch_fails_a_body_that_will_not_be_stored(self) -> None:
        """
        A body the cache will not keep (its policy says so, or ``Vary: *``
        matches no later request) is still checked against the digest its
        request expects before anyone sees it: it was served unchecked
        before.
        """
        d = self.fetched(UpstreamRequest(
            key=KEY, url=URL, expected_sha256=sha256(b"good"),
            storable=lambda status, headers: False,
        ))
        response = self.agent.sent[0].answer(200, {}, length=3)
        response.send(b"bad")
        response.finish()
        self.failureResultOf(d, IntegrityError)
        self.assertIsNone(self.store.peek(KEY))

    def joined_unchecked(self, data: bytes, expected: bytes) -> tuple[
        Deferred[UpstreamAnswer], Deferred[UpstreamAnswer], FakeResponse
    ]:
        """
        A download nobody checks, joined by a request that expects the
        digest of ``expected``; ``data`` arrives.
        """
        unchecked = self.fetched(UpstreamRequest(key=KEY, url=URL))
        checked = self.fetched(
            UpstreamRequest(key=KEY, url=URL, expected_sha256=sha256(expected))
        )
        self.assertEqual(len(self.agent.sent), 1)
        response = self.agent.sent[0].answer(200, {}, length=len(data))
        response.send(data)
        self.assertNoResult(checked)
        return unchecked, checked, response

    def test_joiner_with_a_digest_served_once_it_matches(self) -> None:
        unchecked, checked, response = self.joined_unchecked(b"wheel", b"wheel")
        self.assertEqual(read_all(self.body_of(unchecked)), b"wheel")
        response.finish()
        self.assertEqual(read_all(self.body_of(checked)), b"wheel")

    def test_joiner_with_a_digest_refused_on_mismatch(self) -> None:
        unchecked, checked, response = self.joined_unchecked(b"other", b"wheel")
        response.finish()
        failure = self.failureResultOf(checked, IntegrityError)
        self.assertIn(sha256(b"other"), failure.getErrorMessage())
        # The download itself, unchecked, is fine for its own client.
        body = self.body_of(unchecked)
        self.assertEqual((read_all(body), body.failure()), (b"other", None))

    def test_joiner_with_a_digest_of_a_body_not_kept(self) -> None:
        self.store.write_file = failing_disk(errno.ENOSPC, after=0)
        unchecked, checked, response = self.joined_unchecked(b"wheel", b"wheel")
        response.finish()
        failure = self.failureResultOf(checked, CacheWriteError)
        self.assertIn("could not be checked", failure.getErrorMessage())
        self.assertIn("No space left", failure.getErrorMessage())

    def test_joiner_with_another_digest_gets_its_own_download(self) -> None:
        self.fetched(UpstreamRequest(key=KEY, url=URL, expected_sha256=sha256(b"a")))
        self.fetched(UpstreamRequest(key=KEY, url=URL, expected_sha256=sha256(b"b")))
        self.assertEqual(len(self.agent.sent), 2)

    def test_stored_waits_for_the_store(self) -> None:
        d = self.fetched(UpstreamRequest(key=KEY, url=URL))
        self.successResultOf(self.fetcher.stored(KEY))
        response = self.agent.sent[0].answer(200, {}, length=1)
        self.body_of(d)
        response.send(b"x")
        response.finish()
        self.successResultOf(self.fetcher.stored(KEY))
        self.assertIsNotNone(self.store.peek(KEY))


class Files(Resource):
    """
    Holds every request until the test releases them (:meth:`release`).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> object:
        self.held.append(request)
        return NOT_DONE_YET

    def release(self) -> None:
        for request in self.held:
            request.setHeader(b"content-type", b"application/octet-stream")
            body = b"served " + request.path
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()


class TraversalTests(SynchronousTestCase):
    """
    The fetcher over treq's in-memory agent and a ``twisted.web`` resource.
    """

    def test_fetch_and_store(self) -> None:
        clock = Clock()
        store = Store.open(self.mktemp(), 1 << 30, clock)
        self.addCleanup(store.close)
        resource = Files()
        agent = RequestTraversalAgent(resource)
        fetcher = Fetcher(store, upstream_client(agent), clock)
        url = "http://files.test/a.bin"
        request = UpstreamRequest(key=url, url=url)
        answers = [fetcher.fetch(request), fetcher.fetch(request)]
        agent.flush()
        self.assertEqual(len(resource.held), 1)
        resource.release()
        agent.flush()
        self.successResultOf(fetcher.when_idle())
        for d in answers:
            answer = self.successResultOf(d)
            assert answer.body is not None
            self.assertEqual(read_all(answer.body), b"served /a.bin")
            self.assertEqual(answer.headers["content-length"], "13")
            answer.body.close()
        entry = store.peek(url)
        assert entry is not None
        self.assertEqual(entry.headers["content-type"], "application/octet-stream")
