"""
Tests for the shared tier's access log and evictor
(:mod:`buildcache.shared.access`, :mod:`buildcache.shared.evict`) against
an in-memory object store driven by a fake clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from attrs import frozen
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.testing import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool

from buildcache.fetch.client import upstream_client
from buildcache.shared import evict
from buildcache.shared.access import KEPT_BATCHES, AccessLog
from buildcache.shared.evict import EVICT_LEASE, STATE, EvictionReport, Evictor
from buildcache.shared.location import S3Location
from buildcache.shared.s3 import object_store
from tests.seaweed_parts import SeaweedCase
from tests.test_shared_s3 import with_credentials

_T = TypeVar("_T")
reactor: Any = _reactor

START = 1_800_000_000.0


class StoreDown(Exception):
    pass


@frozen
class Info:
    name: str
    size: int
    last_modified: float
    etag: str | None = None


class FakeObjects:
    """
    An object store in memory: names relative to the prefix, sorted
    listings in pages of ``page_size``, ``If-None-Match: *`` honoured
    unless ``conditional`` is False.  ``fail(op, name)`` says which calls
    raise; ``gates[op]`` holds a call of ``op`` until fired.
    """

    def __init__(self, clock: Clock, page_size: int = 3, conditional: bool = True) -> None:
        self.clock = clock
        self.page_size = page_size
        self.conditional = conditional
        self.data: dict[str, tuple[bytes, float]] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail: Callable[[str, str], bool] = lambda op, name: False
        self.gates: dict[str, Deferred[None]] = {}

    async def _enter(self, op: str, name: str) -> None:
        self.calls.append((op, name))
        gate = self.gates.pop(op, None)
        if gate is not None:
            await gate
        if self.fail(op, name):
            raise StoreDown(f"{op} {name}: 503")

    def put(self, name: str, data: bytes, when: float | None = None) -> None:
        self.data[name] = (data, self.clock.seconds() if when is None else when)

    def json(self, name: str) -> Any:
        return json.loads(self.data[name][0])

    async def get_small(self, name: str, limit: int) -> bytes | None:
        await self._enter("get", name)
        held = self.data.get(name)
        if held is None:
            return None
        if len(held[0]) > limit:
            raise StoreDown(f"{name} is over {limit} bytes")
        return held[0]

    async def put_small(self, name: str, data: bytes, *, if_absent: bool = False) -> bool:
        await self._enter("put", name)
        if if_absent and self.conditional and name in self.data:
            return False
        self.put(name, data)
        return True

    async def delete(self, name: str) -> None:
        await self._enter("delete", name)
        self.data.pop(name, None)

    async def list_page(
        self, prefix: str, token: str | None = None
    ) -> tuple[list[Info], str | None]:
        await self._enter("list", prefix)
        names = sorted(n for n in self.data if n.startswith(prefix) and (token is None or n > token))
        page = names[: self.page_size]
        infos = [Info(n, len(self.data[n][0]), self.data[n][1]) for n in page]
        return infos, (page[-1] if len(names) > self.page_size else None)


def run(coroutine: Coroutine[Any, Any, _T]) -> Deferred[_T]:
    return Deferred.fromCoroutine(coroutine)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record_name(key: str) -> str:
    return f"records/{sha(key)}.json"


def events(captured: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in captured if e.get("event") == name]


class AccessLogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = FakeObjects(self.clock)
        self.log = AccessLog(self.store, self.clock, "node-a", max_batch=3)

    def batches(self) -> list[str]:
        return sorted(n for n in self.store.data if n.startswith("access/"))

    def test_flush_writes_one_batch(self) -> None:
        """
        Pending uses are written as one object named by node, unix ms and
        sequence; repeated uses of a (blob, record) are one entry with the
        latest time.
        """
        self.log.touched(sha("x"), record_name("kx"), 10)
        self.clock.advance(1.5)
        self.log.touched(sha("y"), record_name("ky"), 20)
        self.clock.advance(1)
        self.log.touched(sha("x"), record_name("kx"), 10)
        self.successResultOf(run(self.log.flush()))
        self.assertEqual(self.batches(), [f"access/node-a/{int((START + 2.5) * 1000):013d}-1.json"])
        body = self.store.json(self.batches()[0])
        self.assertEqual(body["node"], "node-a")
        self.assertEqual(
            body["entries"],
            [[sha("y"), record_name("ky"), 20, START + 1.5], [sha("x"), record_name("kx"), 10, START + 2.5]],
        )
        self.assertEqual(self.log.pending, 0)
        self.successResultOf(run(self.log.flush()))
        self.assertEqual(len(self.batches()), 1)  # nothing pending: nothing written

    def test_full_batch_flushes_itself(self) -> None:
        """
        ``max_batch`` pending uses start a flush at once; a flush writes
        ``max_batch`` entries per object.
        """
        for i in range(3):
            self.log.touched(sha(str(i)), record_name(str(i)), i)
        self.assertEqual(len(self.batches()), 1)
        self.assertEqual(len(self.store.json(self.batches()[0])["entries"]), 3)
        self.store.fail = lambda op, name: True
        with capturedLogs():
            for i in range(3, 8):
                self.log.touched(sha(str(i)), record_name(str(i)), i)
        self.store.fail = lambda op, name: False
        self.successResultOf(run(self.log.flush()))
        sizes = sorted(len(self.store.json(n)["entries"]) for n in self.batches())
        self.assertEqual(sizes, [2, 3, 3])

    def test_failed_flush_keeps_the_batch(self) -> None:
        """
        A batch the store refuses is logged and written by the next flush;
        nothing is raised.
        """
        self.log.touched(sha("x"), record_name("kx"), 10)
        self.store.fail = lambda op, name: True
        with capturedLogs() as captured:
            self.successResultOf(run(self.log.flush()))
        [failed] = events(captured, "shared_access_flush_failed")
        self.assertEqual(failed["count"], 1)
        self.assertEqual(self.batches(), [])
        self.assertEqual(self.log.pending, 1)
        self.store.fail = lambda op, name: False
        self.clock.advance(1)
        self.log.touched(sha("y"), record_name("ky"), 20)
        self.successResultOf(run(self.log.flush()))
        [name] = self.batches()
        self.assertEqual(
            [e[0] for e in self.store.json(name)["entries"]], [sha("x"), sha("y")]
        )

    def test_a_failing_store_is_warned_of_once(self) -> None:
        """
        Flushes that keep failing while the store is down warn once, then
        log at debug level (the tier itself says the store is failing).
        """
        self.store.fail = lambda op, name: True
        with capturedLogs() as captured:
            for n in range(3):
                self.log.touched(sha(f"x{n}"), record_name(f"k{n}"), 10)
                self.successResultOf(run(self.log.flush()))
        failed = events(captured, "shared_access_flush_failed")
        levels = [e["log_level"].name for e in failed]
        self.assertEqual(levels[0], "warn")
        self.assertEqual(set(levels[1:]), {"debug"})
        self.store.fail = lambda op, name: False
        self.successResultOf(run(self.log.flush()))
        self.store.fail = lambda op, name: True
        with capturedLogs() as captured:
            self.log.touched(sha("z"), record_name("kz"), 10)
            self.successResultOf(run(self.log.flush()))
        [again] = events(captured, "shared_access_flush_failed")
        self.assertEqual(again["log_level"].name, "warn")

    def test_pending_is_bounded_while_the_store_fails(self) -> None:
        """
        While writes fail, at most ``KEPT_BATCHES × max_batch`` uses are
        kept, the oldest dropped and logged.
        """
        self.store.fail = lambda op, name: True
        bound = KEPT_BATCHES * 3
        with capturedLogs() as captured:
            for i in range(bound + 5):
                self.log.touched(sha(str(i)), record_name(str(i)), i)
        self.assertEqual(self.log.pending, bound)
        self.assertEqual(self.log.dropped, 5)
        self.assertTrue(events(captured, "shared_access_dropped"))
        self.store.fail = lambda op, name: False
        self.successResultOf(run(self.log.flush()))
        written = {e[0] for n in self.batches() for e in self.store.json(n)["entries"]}
        self.assertEqual(written, {sha(str(i)) for i in range(5, bound + 5)})

    def test_timer_and_stop(self) -> None:
        """
        A started log flushes every ``flush_every`` seconds; stopping
        flushes what is pending and stops the timer.
        """
        self.log.start()
        self.log.touched(sha("x"), record_name("kx"), 10)
        self.clock.advance(29)
        self.assertEqual(self.batches(), [])
        self.clock.advance(1)
        self.assertEqual(len(self.batches()), 1)
        self.log.touched(sha("y"), record_name("ky"), 10)
        self.successResultOf(self.log.stop())
        self.assertEqual(len(self.batches()), 2)
        self.log.touched(sha("z"), record_name("kz"), 10)
        self.clock.advance(300)
        self.assertEqual(len(self.batches()), 2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_node_names_fit_object_names(self) -> None:
        """
        A node name that could not be part of an object name is refused.
        """
        for bad in ["", "a/b", "../x", "a b", "-x"]:
            self.assertRaises(ValueError, AccessLog, self.store, self.clock, bad)


class Bucket:
    """
    Helpers to fill a :class:`FakeObjects` as the tier would.
    """

    def __init__(self, store: FakeObjects, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def blob(self, name: str, size: int, modified: float) -> str:
        digest = sha(name)
        self.store.put(f"blobs/sha256/{digest}", b"b" * size, modified)
        self.store.put(record_name(name), json.dumps({"sha256": digest}).encode(), modified)
        return digest

    def batch(self, node: str, seq: int, entries: list[Any]) -> str:
        name = f"access/{node}/{int(self.clock.seconds() * 1000):013d}-{seq}.json"
        self.store.put(name, json.dumps({"node": node, "entries": entries}).encode())
        return name

    def blobs(self) -> set[str]:
        return {n.rsplit("/", 1)[1] for n in self.store.data if n.startswith("blobs/")}

    def records(self) -> set[str]:
        return {n for n in self.store.data if n.startswith("records/")}


class EvictorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.store = FakeObjects(self.clock)
        self.bucket = Bucket(self.store, self.clock)

    def evictor(self, node: str = "node-a", **kwargs: Any) -> Evictor:
        kwargs.setdefault("max_size", 1000)
        return Evictor(self.store, self.clock, node, **kwargs)

    captured: Sequence[Mapping[str, Any]]

    def pass_(self, evictor: Evictor) -> EvictionReport | None:
        with capturedLogs() as self.captured:
            return self.successResultOf(run(evictor.run_once()))

    def three_blobs(self) -> tuple[str, str, str]:
        """
        Blobs old, middle, new (3000 bytes each, small records):
        ``old`` was used (access batch) after ``new`` was written.
        """
        old = self.bucket.blob("old", 3000, START - 3000)
        middle = self.bucket.blob("middle", 3000, START - 2000)
        new = self.bucket.blob("new", 3000, START - 1000)
        self.bucket.batch("node-b", 1, [[old, record_name("old"), 3000, START - 500]])
        return old, middle, new

    def test_under_the_bound_merges_only(self) -> None:
        """
        A prefix under ``max_size`` loses nothing; the batches are merged
        into the state object and deleted.
        """
        old, middle, new = self.three_blobs()
        total = sum(len(data) for data, _ in self.store.data.values())
        report = self.pass_(self.evictor(max_size=100_000))
        self.assertEqual(
            report,
            EvictionReport(blobs=3, total=total + len(self.store.data[EVICT_LEASE][0]), evicted=0, evicted_bytes=0,
                           records_deleted=0, batches_merged=1),
        )
        self.assertEqual(self.bucket.blobs(), {old, middle, new})
        self.assertEqual(len(self.bucket.records()), 3)
        self.assertEqual([n for n in self.store.data if n.startswith("access/")], [])
        state = self.store.json(STATE)["blobs"]
        self.assertEqual(state, {old: [START - 500, [record_name("old")]]})
        [done] = events(self.captured, "shared_evicted")
        self.assertEqual(done["evicted"], 0)

    def test_least_recently_used_go_first(self) -> None:
        """
        Over the bound, blobs go in order of last use -- the later of
        LastModified and the merged access time -- each with its known
        records, until the prefix is under ``low_water × max_size``.
        """
        old, middle, new = self.three_blobs()
        report = self.pass_(self.evictor(max_size=9000, low_water=0.9))
        assert report is not None
        # middle (last used START-2000) goes first, and is enough.
        self.assertEqual(self.bucket.blobs(), {old, new})
        self.assertEqual(report.evicted, 1)
        self.assertEqual(report.evicted_bytes, 3000)
        self.assertEqual(report.batches_merged, 1)
        self.assertEqual(report.blobs, 3)
        # middle's record was never named by an access batch: it stays,
        # dangling (readers treat it as absent).
        self.assertEqual(report.records_deleted, 0)
        self.assertIn(record_name("middle"), self.bucket.records())

        # Now new is the least recently used: old was used later.
        self.clock.advance(10)
        self.bucket.batch("node-b", 2, [[new, record_name("new"), 3000, START - 900]])
        report = self.pass_(self.evictor(max_size=5000, low_water=0.9))
        assert report is not None
        self.assertEqual(self.bucket.blobs(), {old})
        self.assertEqual(report.records_deleted, 1)
        self.assertNotIn(record_name("new"), self.bucket.records())
        self.assertEqual(set(self.store.json(STATE)["blobs"]), {old})

    def test_evicted_records_go_before_their_blob(self) -> None:
        """
        A blob's known records are deleted before the blob, so a pass that
        fails between leaves a blob without records, which a later pass
        evicts; the pass goes on with the next blob meanwhile.
        """
        old, middle, new = self.three_blobs()
        self.bucket.batch("node-b", 2, [[middle, record_name("middle"), 3000, START - 1900]])
        self.store.fail = lambda op, name: op == "delete" and name == f"blobs/sha256/{middle}"
        report = self.pass_(self.evictor(max_size=9000))
        assert report is not None
        # The pass goes on past the blob it cannot delete: another goes.
        self.assertEqual(report.evicted, 1)
        self.assertEqual(report.records_deleted, 1)
        self.assertIn(middle, self.bucket.blobs())
        self.assertEqual(len(self.bucket.blobs()), 2)
        self.assertNotIn(record_name("middle"), self.bucket.records())
        [failed] = events(self.captured, "shared_evict_failed")
        self.assertIn(middle, failed["step"])
        # The merged state was written, the batches deleted.
        self.assertIn(middle, self.store.json(STATE)["blobs"])
        self.assertEqual([n for n in self.store.data if n.startswith("access/")], [])

        self.store.fail = lambda op, name: False
        report = self.pass_(self.evictor(max_size=5000))
        assert report is not None
        self.assertNotIn(middle, self.bucket.blobs())

    def test_batches_survive_a_failed_state_write(self) -> None:
        """
        Batches are deleted only once a state holding them was written: a
        pass that cannot write it leaves them to be merged again.
        """
        old, middle, new = self.three_blobs()
        self.store.fail = lambda op, name: op == "put" and name == STATE
        report = self.pass_(self.evictor(max_size=10_000))
        self.assertIsNotNone(report)
        self.assertEqual(len([n for n in self.store.data if n.startswith("access/")]), 1)
        self.assertTrue(events(self.captured, "shared_evict_failed"))
        self.store.fail = lambda op, name: False
        report = self.pass_(self.evictor(max_size=10_000))
        self.assertEqual([n for n in self.store.data if n.startswith("access/")], [])
        self.assertEqual(self.store.json(STATE)["blobs"][old][0], START - 500)

    def test_store_down_is_logged_not_raised(self) -> None:
        """
        Any step failing ends the pass with a log event and None.
        """
        self.three_blobs()
        for op in ["list", "get", "put"]:
            def fail(o: str, name: str, op: str = op) -> bool:
                return o == op

            self.store.fail = fail
            self.assertIsNone(self.pass_(self.evictor(max_size=100)))
            self.assertTrue(events(self.captured, "shared_evict_failed"), op)
        self.assertEqual(len(self.bucket.blobs()), 3)

    def test_another_nodes_live_lease(self) -> None:
        """
        A live lease of another node: no pass.  An expired one is deleted
        and taken.
        """
        self.three_blobs()
        lease = {"node": "node-b", "expires": START + 10}
        self.store.put(EVICT_LEASE, json.dumps(lease).encode())
        self.assertIsNone(self.pass_(self.evictor(max_size=100)))
        self.assertEqual(len(self.bucket.blobs()), 3)
        self.assertEqual(self.store.json(EVICT_LEASE)["node"], "node-b")
        self.assertFalse([c for c in self.store.calls if c[0] in ("list", "delete")])

        self.clock.advance(11)
        report = self.pass_(self.evictor(max_size=100))
        assert report is not None
        self.assertEqual(report.evicted, 3)
        self.assertEqual(self.store.json(EVICT_LEASE),
                         {"node": "node-a", "expires": START + 11 + 600})

    def test_lease_is_kept_between_passes_and_released_at_stop(self) -> None:
        """
        The evicting node keeps its lease between passes (it retakes it),
        others do not run; stopping releases it.
        """
        self.three_blobs()
        a = self.evictor("node-a", max_size=10_000)
        b = self.evictor("node-b", max_size=10_000)
        a.start()
        b.start()
        self.clock.advance(300)
        self.assertEqual(self.store.json(EVICT_LEASE)["node"], "node-a")
        self.assertIsNotNone(a.last_report)
        self.assertIsNone(b.last_report)
        self.clock.advance(300)
        self.assertIsNone(b.last_report)
        self.assertEqual(self.store.json(EVICT_LEASE)["expires"], START + 600 + 600)
        self.successResultOf(a.stop())
        self.assertNotIn(EVICT_LEASE, self.store.data)
        self.clock.advance(300)
        self.assertIsNotNone(b.last_report)
        self.assertEqual(self.store.json(EVICT_LEASE)["node"], "node-b")
        self.successResultOf(b.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_ends_a_running_pass(self) -> None:
        """
        Stopping while a pass waits on the store ends the pass at its next
        step, with nothing deleted, and releases the lease.
        """
        self.three_blobs()
        gate: Deferred[None] = Deferred()
        self.store.gates["list"] = gate
        evictor = self.evictor(max_size=100)
        running = run(evictor.run_once())
        stopped = evictor.stop()
        self.assertNoResult(stopped)
        gate.callback(None)
        self.assertIsNone(self.successResultOf(running))
        self.successResultOf(stopped)
        self.assertEqual(len(self.bucket.blobs()), 3)
        self.assertNotIn(EVICT_LEASE, self.store.data)

    def test_a_pass_outliving_its_lease_ends(self) -> None:
        """
        A store so slow the lease expires mid-pass: the pass ends (another
        node may have taken over) and says so.
        """
        self.three_blobs()
        gate: Deferred[None] = Deferred()
        self.store.gates["list"] = gate
        evictor = self.evictor(max_size=100, lease_ttl=60)
        with capturedLogs() as captured:
            running = run(evictor.run_once())
            self.clock.advance(61)
            gate.callback(None)
        self.assertIsNone(self.successResultOf(running))
        self.assertEqual(len(self.bucket.blobs()), 3)
        self.assertTrue(events(captured, "shared_evict_failed"))

    def test_long_pass_renews_its_lease(self) -> None:
        """
        A pass past half its lease's time renews it.
        """
        self.three_blobs()
        gate: Deferred[None] = Deferred()
        self.store.gates["list"] = gate
        evictor = self.evictor(max_size=100, lease_ttl=60)
        running = run(evictor.run_once())
        self.clock.advance(40)
        gate.callback(None)
        self.assertIsNotNone(self.successResultOf(running))
        puts = [c for c in self.store.calls if c == ("put", EVICT_LEASE)]
        self.assertGreaterEqual(len(puts), 2)

    def test_without_conditional_put(self) -> None:
        """
        Without conditional PUTs the lease is read first: a live one of
        another node still stops the pass; otherwise it is written over.
        """
        store = FakeObjects(self.clock, conditional=False)
        self.store = store
        self.bucket = Bucket(store, self.clock)
        self.three_blobs()
        store.put(EVICT_LEASE, json.dumps({"node": "node-b", "expires": START + 10}).encode())
        evictor = Evictor(store, self.clock, "node-a", max_size=100, conditional=False)
        self.assertIsNone(self.pass_(evictor))
        self.clock.advance(11)
        report = self.pass_(evictor)
        assert report is not None
        self.assertEqual(report.evicted, 3)
        self.assertEqual(store.json(EVICT_LEASE)["node"], "node-a")

    def test_unusable_batches_are_deleted_and_never_obeyed(self) -> None:
        """
        Garbage batches are deleted (logged); entries naming anything but a
        record are ignored, so a batch cannot make the evictor delete other
        objects.
        """
        old, middle, new = self.three_blobs()
        self.store.put("access/node-c/0000000000001-1.json", b"not json")
        self.store.put("access/node-c/0000000000001-2.json", b"x" * (evict.BATCH_LIMIT + 1))
        self.bucket.batch("node-c", 3, [
            [middle, "state/access.json", 1, START],
            [middle, "blobs/sha256/" + old, 1, START],
            [middle, "records/../probe.json", 1, START],
            ["nothex", record_name("old"), 1, START],
            "junk",
        ])
        # The 1 MiB batch does not count: it is deleted as merged.
        report = self.pass_(self.evictor(max_size=9000))
        assert report is not None
        self.assertEqual(report.batches_merged, 4)
        self.assertEqual(len(events(self.captured, "shared_access_batch_invalid")), 2)
        self.assertEqual([n for n in self.store.data if n.startswith("access/")], [])
        # middle's junk entries still count as a use: new goes alone.
        self.assertEqual(report.evicted, 1)
        self.assertEqual(self.bucket.blobs(), {old, middle})
        deleted = {c[1] for c in self.store.calls if c[0] == "delete"}
        self.assertFalse({STATE, "blobs/sha256/" + old} & deleted)
        self.assertEqual(len(self.bucket.records()), 3)

    def test_batches_merged_per_pass_are_bounded(self) -> None:
        """
        At most ``MAX_BATCHES`` batches are merged per pass; the rest wait.
        """
        self.patch(evict, "MAX_BATCHES", 2)
        digests = [self.bucket.blob(str(i), 10, START - 100) for i in range(3)]
        for i, digest in enumerate(digests):
            self.bucket.batch("node-b", i, [[digest, record_name(str(i)), 10, START - i]])
        report = self.pass_(self.evictor(max_size=10_000))
        assert report is not None
        self.assertEqual(report.batches_merged, 2)
        self.assertEqual(len([n for n in self.store.data if n.startswith("access/")]), 1)
        report = self.pass_(self.evictor(max_size=10_000))
        assert report is not None
        self.assertEqual(report.batches_merged, 1)
        self.assertEqual(set(self.store.json(STATE)["blobs"]), set(digests))

    def test_listing_is_bounded(self) -> None:
        """
        A prefix of more than ``MAX_LISTED`` objects is listed only so far
        (logged); the pass works on what it saw.
        """
        self.patch(evict, "MAX_LISTED", 4)
        for i in range(5):
            self.bucket.blob(str(i), 10, START)
        report = self.pass_(self.evictor(max_size=10_000))
        assert report is not None
        self.assertTrue(events(self.captured, "shared_evict_truncated"))
        # Two pages: the blobs and the lease, not the records.
        self.assertEqual(report.total, 50 + len(self.store.data[EVICT_LEASE][0]))
        lists = [c for c in self.store.calls if c[0] == "list"]
        self.assertEqual(len(lists), 2)  # pages of 3

    def test_state_forgets_gone_blobs(self) -> None:
        """
        The merged state drops blobs no longer listed (evicted elsewhere,
        deleted by hand) unless used since shortly before the pass.
        """
        old, middle, new = self.three_blobs()
        self.pass_(self.evictor(max_size=10_000))
        del self.store.data[f"blobs/sha256/{old}"]
        self.clock.advance(601)  # old's use (START-500) is now over 2 intervals ago
        uploading = sha("uploading")
        self.bucket.batch("node-b", 9, [[uploading, record_name("uploading"), 5, START + 600]])
        self.pass_(self.evictor(max_size=10_000))
        self.assertEqual(set(self.store.json(STATE)["blobs"]), {uploading})

    def test_unreadable_state_starts_over(self) -> None:
        """
        A corrupt state object is logged and replaced.
        """
        old, middle, new = self.three_blobs()
        self.store.put(STATE, b"{broken")
        report = self.pass_(self.evictor(max_size=10_000))
        self.assertIsNotNone(report)
        self.assertTrue(events(self.captured, "shared_evict_state_invalid"))
        self.assertEqual(set(self.store.json(STATE)["blobs"]), {old})

    def test_a_record_published_again_stays(self) -> None:
        """
        A record that names another blob by now (its key was published
        again with another body) is not deleted with the old blob.
        """
        old, middle, new = self.three_blobs()
        self.bucket.batch("node-b", 2, [[middle, record_name("middle"), 3000, START - 1900]])
        self.store.put(record_name("middle"), json.dumps({"sha256": new}).encode(), START - 10)
        report = self.pass_(self.evictor(max_size=9000))
        assert report is not None
        self.assertEqual(report.evicted, 1)
        self.assertEqual(report.records_deleted, 0)
        self.assertEqual(self.bucket.blobs(), {old, new})
        self.assertIn(record_name("middle"), self.bucket.records())

    def test_access_times_ahead_of_the_clock_count_as_now(self) -> None:
        """
        A node whose clock runs ahead cannot make a blob look used in the
        future: its times count as the evicting node's now.
        """
        old, middle, new = self.three_blobs()
        self.bucket.batch("node-b", 2, [[middle, record_name("middle"), 3000, START + 86400]])
        self.pass_(self.evictor(max_size=100_000))
        self.assertEqual(self.store.json(STATE)["blobs"][middle][0], START)

    def test_a_lease_taken_over_mid_pass_ends_it(self) -> None:
        """
        Renewing, a node that finds another's lease in place of its own
        (both found the same expired lease) ends its pass.
        """
        self.three_blobs()
        gate: Deferred[None] = Deferred()
        self.store.gates["list"] = gate
        evictor = self.evictor(max_size=100, lease_ttl=60)
        with capturedLogs() as captured:
            running = run(evictor.run_once())
            self.store.put(EVICT_LEASE, json.dumps({"node": "node-b", "expires": START + 90}).encode())
            self.clock.advance(40)
            gate.callback(None)
        self.assertIsNone(self.successResultOf(running))
        self.assertEqual(len(self.bucket.blobs()), 3)
        [lost] = events(captured, "shared_evict_lease_lost")
        self.assertEqual(lost["holder"], "node-b")
        self.assertEqual(self.store.json(EVICT_LEASE)["node"], "node-b")
        self.successResultOf(evictor.stop())
        self.assertEqual(self.store.json(EVICT_LEASE)["node"], "node-b")

    def test_a_defect_is_logged_not_raised(self) -> None:
        """
        Even an unexpected error (here a listing of the wrong shape) ends
        the pass with a logged failure, not an exception to the caller.
        """
        async def broken(prefix: str, token: str | None = None) -> tuple[list[Info], str | None]:
            return [object()], None  # type: ignore[list-item]

        self.store.list_page = broken  # type: ignore[method-assign]
        self.assertIsNone(self.pass_(self.evictor()))
        failures = [e for e in self.captured if e.get("log_failure") is not None]
        self.assertEqual(len(failures), 1)
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_the_state_is_bounded(self) -> None:
        """
        A state too large to read is never read (a pass would fail on it
        forever) but replaced; one that would be too large is written with
        the more recently used half.
        """
        self.patch(evict, "STATE_LIMIT", 300)
        old, middle, new = self.three_blobs()
        self.store.put(STATE, b" " * 301)
        self.bucket.batch("node-b", 2, [
            [middle, record_name("middle"), 3000, START - 400],
            [new, record_name("new"), 3000, START - 300],
        ])
        report = self.pass_(self.evictor(max_size=100_000))
        self.assertIsNotNone(report)
        self.assertTrue(events(self.captured, "shared_evict_state_invalid"))
        self.assertNotIn(("get", STATE), self.store.calls)
        state = self.store.json(STATE)["blobs"]
        self.assertLessEqual(len(self.store.data[STATE][0]), 300)
        self.assertEqual(set(state), {new})


class EvictorSeaweedTests(SeaweedCase):
    """
    The access log and the evictor against a real S3 store (SeaweedFS):
    its listing, its LastModified, its conditional PUT.
    """

    def test_a_pass_on_a_real_store(self) -> Deferred[None]:
        """
        Two nodes: the one holding the lease (taken with a real
        ``If-None-Match: *``) merges the access batch and evicts the blob
        no node used, with its record; the other does nothing; objects
        outside the prefix are never touched; stopping releases the lease.
        """
        bucket = self.bucket()
        with_credentials(self)
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        http = upstream_client(Agent(reactor, pool=pool))
        objects = object_store(S3Location(bucket, "pre/", self.store.endpoint), http, reactor)
        self.store.put_object(bucket, "other/blobs/sha256/" + sha("x"), b"y" * 5000)

        async def go() -> None:
            digests = {}
            for name in ["old", "middle", "new"]:
                digest = digests[name] = sha(name)
                await objects.put_small(f"blobs/sha256/{digest}", b"b" * 3000)
                await objects.put_small(record_name(name), json.dumps({"sha256": digest}).encode())
            # middle was used an hour ago (its record is known); old and new now.
            clock = Clock()
            clock.advance(reactor.seconds() - 3600)
            access = AccessLog(objects, clock, "node-b")
            access.touched(digests["middle"], record_name("middle"), 3000)
            clock.advance(reactor.seconds() - clock.seconds())
            for name in ["old", "new"]:
                access.touched(digests[name], record_name(name), 3000)
            await access.stop()
            self.assertEqual(access.written, 1)
            a = Evictor(objects, reactor, "node-a", max_size=9000)
            b = Evictor(objects, reactor, "node-b", max_size=9000)
            with capturedLogs() as captured:
                report = await a.run_once()
                self.assertIsNone(await b.run_once())
            self.assertFalse(events(captured, "shared_evict_failed"))
            assert report is not None
            self.assertEqual((report.blobs, report.evicted, report.records_deleted,
                              report.batches_merged), (3, 1, 1, 1))
            keys = set(self.store.list_keys(bucket))
            self.assertEqual(keys, {
                "other/blobs/sha256/" + sha("x"),
                "pre/" + EVICT_LEASE, "pre/" + STATE,
                "pre/blobs/sha256/" + digests["old"], "pre/" + record_name("old"),
                "pre/blobs/sha256/" + digests["new"], "pre/" + record_name("new"),
            })
            state = json.loads(self.store.get_object(bucket, "pre/" + STATE) or b"")
            self.assertEqual(set(state["blobs"]), {digests["old"], digests["new"]})
            await a.stop()
            await b.stop()
            self.assertNotIn("pre/" + EVICT_LEASE, set(self.store.list_keys(bucket)))

        return Deferred.fromCoroutine(go())
