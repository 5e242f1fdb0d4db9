"""
Tests for :mod:`buildcache.ecosystems.pypi.prefetch`: when a read-ahead starts, and how it
is counted (each read-ahead at most one hit, never more hits than
read-aheads).  The end-to-end behaviour through the index is in
``tests/test_simple_index.py`` (``ReadAheadTests``).
"""

from __future__ import annotations

import hashlib
from typing import Any, cast

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from buildcache.ecosystems.pypi.policy import file_request
from buildcache.ecosystems.pypi.prefetch import (
    MAX_RUNNING,
    UNCLAIMED_BUDGET_FILES,
    UNCLAIMED_TTL,
    Prefetcher,
)
from buildcache.engine.core import Engine
from buildcache.fetch.fetcher import UpstreamAnswer
from buildcache.ops.activity import Activity
from buildcache.store import Store

BODY = b"wheel bytes"
DIGEST = hashlib.sha256(BODY).hexdigest()


@define
class _Download:
    settled: Deferred[None] = field(factory=Deferred)

    def when_settled(self) -> Deferred[None]:
        return self.settled


@define
class _Body:
    download: _Download
    closed: bool = False

    def close(self) -> None:
        self.closed = True


@define
class _Fetcher:
    """Records fetches; the test decides when and how each one ends."""

    answers: dict[str, Deferred[UpstreamAnswer]] = field(factory=dict)
    busy: set[str] = field(factory=set)

    def fetch(self, request: Any) -> Deferred[UpstreamAnswer]:
        answer: Deferred[UpstreamAnswer] = Deferred()
        self.answers[request.key] = answer
        return answer

    def downloading(self, key: str) -> bool:
        return key in self.busy

    def used(self, entry: Any) -> None:
        pass


class PrefetcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.store = Store.open(self.mktemp(), 1 << 20, cast(Any, self.clock))
        self.addCleanup(self.store.close)
        self.fetcher = _Fetcher()
        self.activity = Activity(self.clock)
        self.engine = Engine(self.store, cast(Any, self.fetcher), cast(Any, self.clock))
        self.prefetcher = Prefetcher(
            self.engine, cast(Any, self.clock), 1024, observer=self.activity,
        )

    def request(self, name: str = "a.whl", digest: str | None = DIGEST) -> Any:
        return file_request(f"http://127.0.0.1:1/files/{name}", digest, "test", 0)

    def start(
        self, request: Any, size: int | None = len(BODY), project: str | None = None
    ) -> None:
        self.prefetcher.after_metadata(
            request, size, project if project is not None else request.key
        )
        self.clock.advance(0)

    def finish(self, request: Any) -> _Body:
        """The read-ahead's download ends with the body stored."""
        writer = self.store.writer(request.key)
        writer.write(BODY)
        writer.commit({})
        body = _Body(_Download())
        self.fetcher.answers[request.key].callback(
            UpstreamAnswer(200, {}, cast(Any, body))
        )
        body.download.settled.callback(None)
        return body

    def counts(self) -> tuple[int, int]:
        return self.activity.read_ahead, self.activity.read_ahead_used

    def test_claimed_while_running_counts_once(self) -> None:
        request = self.request()
        self.start(request)
        self.assertEqual(list(self.fetcher.answers), [request.key])
        self.assertTrue(self.prefetcher.claim(request.key, stored=False))
        self.assertFalse(self.prefetcher.claim(request.key, stored=False))
        body = self.finish(request)
        self.assertTrue(body.closed)
        self.assertFalse(self.prefetcher.claim(request.key, stored=True))
        self.assertEqual(self.counts(), (1, 1))
        self.assertEqual(self.prefetcher.running(), 0)

    def test_claimed_after_it_was_stored_counts_once(self) -> None:
        request = self.request()
        self.start(request)
        self.finish(request)
        self.assertEqual(self.counts(), (1, 0))
        self.assertTrue(self.prefetcher.claim(request.key, stored=True))
        self.assertFalse(self.prefetcher.claim(request.key, stored=True))
        self.assertEqual(self.counts(), (1, 1))

    def test_evicted_before_anyone_asked_is_no_hit(self) -> None:
        request = self.request()
        self.start(request)
        self.finish(request)
        self.store.remove(request.key)
        self.assertFalse(self.prefetcher.claim(request.key, stored=False))
        self.assertFalse(self.prefetcher.claim(request.key, stored=True))
        self.assertEqual(self.counts(), (1, 0))

    def test_not_started(self) -> None:
        """
        Off, unknown or too large a size, no digest, already stored, already
        being downloaded (by the client itself), or stopping: no upstream
        request and nothing counted.
        """
        self.start(self.request("nosize.whl"), size=None)
        self.start(self.request("big.whl"), size=1025)
        self.start(self.request("nodigest.whl", digest=None))
        stored = self.request("stored.whl")
        self.put(stored.key)
        self.start(stored)
        busy = self.request("busy.whl")
        self.fetcher.busy.add(busy.key)
        self.start(busy)
        # A client asking while it was only scheduled started the download
        # itself: no hit either.
        self.assertFalse(self.prefetcher.claim(busy.key, stored=False))
        self.prefetcher.stop()
        self.start(self.request("late.whl"))
        self.assertEqual(self.fetcher.answers, {})
        self.assertEqual(self.counts(), (0, 0))
        self.assertEqual(self.prefetcher.running(), 0)
        self.successResultOf(self.prefetcher.when_done())

    def test_at_most_max_running(self) -> None:
        requests = [self.request(f"w{i}.whl") for i in range(MAX_RUNNING + 2)]
        for request in requests:
            self.start(request)
        self.assertEqual(len(self.fetcher.answers), MAX_RUNNING)
        done = self.prefetcher.when_done()
        self.assertNoResult(done)
        for request in requests[:MAX_RUNNING]:
            self.finish(request)
        self.successResultOf(done)

    def put(self, key: str) -> None:
        writer = self.store.writer(key)
        writer.write(BODY)
        writer.commit({})

    def test_one_per_project_until_asked_for(self) -> None:
        """
        A resolver backtracking over versions reads several metadata files
        of one project: only the first starts a read-ahead, until a client
        asks for that file.
        """
        newest, older = self.request("p-2.whl"), self.request("p-1.whl")
        self.start(newest, project="p")
        self.start(older, project="p")
        self.assertEqual(list(self.fetcher.answers), [newest.key])
        self.finish(newest)
        self.start(older, project="p")
        self.assertEqual(list(self.fetcher.answers), [newest.key])
        self.assertTrue(self.prefetcher.claim(newest.key, stored=True))
        self.start(older, project="p")
        self.assertEqual(list(self.fetcher.answers), [newest.key, older.key])

    def test_budget_of_unclaimed_bytes(self) -> None:
        """
        Read-ahead pauses (and says so once) when the files nobody asked
        for reach the budget; a claim, or the write-off after the TTL,
        lets it go on.  A written-off file is no hit.
        """
        size = self.prefetcher.max_size
        requests = [self.request(f"w{i}.whl") for i in range(UNCLAIMED_BUDGET_FILES + 2)]
        with capturedLogs() as events:
            for request in requests[:UNCLAIMED_BUDGET_FILES]:
                self.start(request, size=size)
                self.finish(request)
            self.assertEqual(self.prefetcher.unclaimed_bytes(), UNCLAIMED_BUDGET_FILES * size)
            over = requests[UNCLAIMED_BUDGET_FILES]
            self.start(over, size=size)
            self.start(over, size=size)
        self.assertNotIn(over.key, self.fetcher.answers)
        paused = [e for e in events if "Read-ahead paused" in e.get("log_format", "")]
        self.assertEqual(len(paused), 1)
        self.assertTrue(self.prefetcher.claim(requests[0].key, stored=True))
        self.start(over, size=size)
        self.assertIn(over.key, self.fetcher.answers)
        self.finish(over)
        last = requests[-1]
        self.start(last, size=size)
        self.assertNotIn(last.key, self.fetcher.answers)
        self.clock.advance(UNCLAIMED_TTL)
        self.assertEqual(self.prefetcher.unclaimed_bytes(), 0)
        self.start(last, size=size)
        self.assertIn(last.key, self.fetcher.answers)
        self.assertFalse(self.prefetcher.claim(requests[1].key, stored=True))
        self.assertEqual(self.counts(), (UNCLAIMED_BUDGET_FILES + 2, 1))

    def test_asked_for_while_running_frees_project_and_budget(self) -> None:
        """
        A client asking for a file still being read ahead makes it the
        client's download: it no longer counts against the budget, and
        another file of its project may be read ahead.
        """
        size = self.prefetcher.max_size
        newest, older = self.request("p-2.whl"), self.request("p-1.whl")
        self.start(newest, size=size, project="p")
        self.assertEqual(self.prefetcher.unclaimed_bytes(), size)
        self.assertTrue(self.prefetcher.claim(newest.key, stored=False))
        self.assertEqual(self.prefetcher.unclaimed_bytes(), 0)
        self.start(older, size=size, project="p")
        self.assertEqual(list(self.fetcher.answers), [newest.key, older.key])
        self.finish(newest)
        self.finish(older)
        # The claimed one is not counted twice; the other waits, unasked.
        self.assertEqual(self.prefetcher.unclaimed_bytes(), size)

    def test_project_freed_by_write_off(self) -> None:
        """
        A read-ahead nobody asked for holds its project back only until it
        is written off, with no other request in between.
        """
        newest, older = self.request("p-2.whl"), self.request("p-1.whl")
        self.start(newest, project="p")
        self.finish(newest)
        self.clock.advance(UNCLAIMED_TTL - 1)
        self.start(older, project="p")
        self.assertNotIn(older.key, self.fetcher.answers)
        self.clock.advance(1)
        self.start(older, project="p")
        self.assertIn(older.key, self.fetcher.answers)
