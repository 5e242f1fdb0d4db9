"""
Tests for :mod:`buildcache.store`: writing and publishing objects, LRU
eviction, batched access times, start-up reconciliation, refusal of
foreign or corrupt indexes, the directory lock, and survival of a writer
killed mid-body.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from buildcache import store as store_module
from buildcache.store import (
    APPLICATION_ID,
    INDEX_NAME,
    SPARE_TEMP_FILES,
    IntegrityError,
    Migration,
    Store,
    StoredObject,
    StoreError,
    StoreStats,
    core,
    object_name,
    objects,
    schema,
)
from tests import crashwriter
from tests.support import HeldRunner

KB = 1024
MB = 1024 * KB
#: The real migration steps, which the tests of the mechanism extend.
CURRENT = store_module.MIGRATIONS
CURRENT_VERSION = store_module.SCHEMA_VERSION
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def body_of(size: int, seed: str) -> bytes:
    """
    ``size`` bytes that differ from one seed to another.
    """
    pattern = hashlib.sha256(seed.encode()).digest()
    return (pattern * (size // len(pattern) + 1))[:size]


def as_clock(clock: Clock) -> IReactorTime:
    """
    ``clock`` typed as the interface it provides (mypy has no zope plugin
    here to see that by itself).
    """
    return cast(IReactorTime, clock)


def read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 64 * KB, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


class Evictions:
    """
    A :attr:`Store.on_evicted` listener that sums what it is told.
    """

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0

    def __call__(self, count: int, size: int) -> None:
        self.count += count
        self.bytes += size


def files_under(directory: str) -> dict[str, int]:
    """
    Every regular file below ``directory``, relative path to size.
    """
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, directory)] = os.path.getsize(path)
    return found


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class StoreTestMixin:
    """
    Opening stores in fresh directories and checking their bookkeeping.
    """

    mktemp: Callable[[], str]
    addCleanup: Callable[..., None]
    assertEqual: Callable[..., None]
    assertLessEqual: Callable[..., None]

    def make_directory(self) -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        return os.path.abspath(directory)

    def open_store(
        self, directory: str, max_size: int = 64 * MB, clock: Clock | None = None
    ) -> Store:
        store = Store.open(
            directory, max_size, as_clock(clock if clock is not None else Clock()),
            on_evicted=Evictions(),
        )
        self.addCleanup(self.close_store, store)
        return store

    def evictions(self, store: Store) -> int:
        """
        How many entries ``store`` told its listener it evicted.
        """
        assert isinstance(store.on_evicted, Evictions)
        return store.on_evicted.count

    def close_store(self, store: Store) -> None:
        """
        Close ``store`` unless that was already done: a second close would
        close whatever descriptor reused the lock's number.
        """
        closed: set[int] = self.__dict__.setdefault("_closed_stores", set())
        if id(store) not in closed:
            closed.add(id(store))
            store.close()

    def put(
        self, store: Store, key: str, body: bytes,
        headers: dict[str, str] | None = None,
    ) -> Any:
        writer = store.writer(key)
        writer.write(body)
        return writer.commit(headers if headers is not None else {})

    def db_rows(self, store: Store) -> dict[str, tuple[Any, ...]]:
        """
        The rows as another process would see them, by key.
        """
        db = sqlite3.connect(os.path.join(store.directory, INDEX_NAME))
        try:
            return {
                row[0]: row
                for row in db.execute(
                    "SELECT key, file, size, headers, sha256, fetched_at,"
                    " validated_at, last_access FROM entries"
                )
            }
        finally:
            db.close()

    def assert_consistent(self, store: Store) -> None:
        """
        Size and count agree with the rows and with the files on disk, the
        total is within the limit, and each row has its file.
        """
        objects = files_under(os.path.join(store.directory, "objects"))
        entries = list(store.keys())
        rows = {entry.key: entry.size for entry in entries}
        expected_files = {
            os.path.join(entry.file[:2], entry.file): entry.size for entry in entries
        }
        self.assertEqual(objects, expected_files)
        self.assertEqual(store.total_size, sum(rows.values()))
        self.assertEqual(store.total_size, sum(objects.values()))
        self.assertEqual(store.entry_count, len(rows))
        self.assertLessEqual(store.total_size, store.max_size)
        # Nothing in tmp/ but the temporary files kept ready for writers.
        spare = {os.path.basename(path) for path, _ in store._spare_temp}
        self.assertEqual(set(os.listdir(os.path.join(store.directory, "tmp"))), spare)


class WriteTests(StoreTestMixin, SynchronousTestCase):
    """
    Bodies stream into ``tmp/`` and appear only when committed intact.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.store = self.open_store(self.make_directory(), clock=self.clock)
        self.tmp = os.path.join(self.store.directory, "tmp")
        self.objects = os.path.join(self.store.directory, "objects")

    def test_body_invisible_until_commit(self) -> None:
        body = body_of(200 * KB, "a")
        writer = self.store.writer("k")
        writer.write(body[: 100 * KB])
        writer.write(body[100 * KB :])
        self.assertEqual(list(files_under(self.tmp).values()), [len(body)])
        self.assertEqual(files_under(self.objects), {})
        self.assertIsNone(self.store.peek("k"))
        self.assertIsNone(self.store.lookup("k"))
        self.assertEqual(self.db_rows(self.store), {})
        self.assertEqual((self.store.total_size, self.store.entry_count), (0, 0))

        self.clock.advance(5)
        entry = writer.commit({"Content-Type": "application/x-tar", "ETag": '"e1"'})
        assert entry is not None

        self.assertEqual(entry.key, "k")
        self.assertEqual(entry.size, len(body))
        self.assertEqual(entry.sha256, hashlib.sha256(body).hexdigest())
        self.assertEqual(
            (entry.fetched_at, entry.validated_at, entry.last_access),
            (1005, 1005, 1005),
        )
        self.assertEqual(os.listdir(self.tmp), [])
        name = entry.file
        self.assertTrue(name.startswith(hashlib.sha256(b"k").hexdigest() + "."))
        self.assertEqual(self.store.object_path("k"), os.path.join(self.objects, name[:2], name))
        self.assertEqual(file_bytes(self.store.object_path("k")), body)
        self.assertEqual(self.store.peek("k"), entry)
        stored = self.store.lookup("k")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(read_all(stored.fd), body)
        self.assertEqual(
            stored.entry.headers, {"Content-Type": "application/x-tar", "ETag": '"e1"'}
        )
        row = self.db_rows(self.store)["k"]
        self.assertEqual(row[1:3], (name, len(body)))
        self.assertEqual(json.loads(row[3]), {"Content-Type": "application/x-tar", "ETag": '"e1"'})
        self.assertEqual(row[4], hashlib.sha256(body).hexdigest())
        self.assertEqual((self.store.total_size, self.store.entry_count), (len(body), 1))
        self.assert_consistent(self.store)

    def test_expected_size_and_sha256_accepted(self) -> None:
        body = body_of(10 * KB, "b")
        writer = self.store.writer("k")
        writer.write(body)
        entry = writer.commit(
            {}, expected_size=len(body),
            expected_sha256=hashlib.sha256(body).hexdigest().upper(),
        )
        self.assertIsNotNone(entry)
        self.assertIsNotNone(self.store.peek("k"))
        self.assert_consistent(self.store)

    def assert_rejected(self, **expected: Any) -> None:
        body = body_of(10 * KB, "c")
        writer = self.store.writer("k")
        writer.write(body)
        reader = writer.reader_fd()
        self.addCleanup(os.close, reader)
        self.assertRaises(IntegrityError, writer.commit, {}, **expected)
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertEqual(files_under(self.objects), {})
        self.assertIsNone(self.store.peek("k"))
        self.assertEqual(self.db_rows(self.store), {})
        self.assertEqual((self.store.total_size, self.store.entry_count), (0, 0))
        self.assertEqual(read_all(reader), body)

    def test_size_mismatch(self) -> None:
        self.assert_rejected(expected_size=10 * KB + 1)

    def test_short_body(self) -> None:
        self.assert_rejected(expected_size=20 * KB)

    def test_sha256_mismatch(self) -> None:
        self.assert_rejected(expected_sha256=hashlib.sha256(b"other").hexdigest())

    def test_size_right_sha256_wrong(self) -> None:
        self.assert_rejected(
            expected_size=10 * KB, expected_sha256=hashlib.sha256(b"other").hexdigest()
        )

    def test_mismatch_keeps_previous_entry(self) -> None:
        old = body_of(3 * KB, "old")
        self.put(self.store, "k", old)
        writer = self.store.writer("k")
        writer.write(body_of(5 * KB, "new"))
        self.assertRaises(IntegrityError, writer.commit, {}, expected_size=1)
        stored = self.store.lookup("k")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(read_all(stored.fd), old)
        self.assert_consistent(self.store)

    def test_abort_leaves_nothing(self) -> None:
        body = body_of(50 * KB, "d")
        writer = self.store.writer("k")
        writer.write(body)
        reader = writer.reader_fd()
        self.addCleanup(os.close, reader)
        writer.abort()
        writer.abort()
        self.assertEqual(os.listdir(self.tmp), [])
        self.assertEqual(files_under(self.objects), {})
        self.assertIsNone(self.store.peek("k"))
        self.assertEqual(self.db_rows(self.store), {})
        self.assertEqual((self.store.total_size, self.store.entry_count), (0, 0))
        self.assertEqual(read_all(reader), body)

    def test_reader_follows_writer_then_reads_committed_body(self) -> None:
        body = body_of(300 * KB, "e")
        writer = self.store.writer("k")
        reader = writer.reader_fd()
        self.addCleanup(os.close, reader)
        writer.write(body[: 100 * KB])
        self.assertEqual(read_all(reader), body[: 100 * KB])
        writer.write(body[100 * KB :])
        writer.commit({})
        self.assertEqual(read_all(reader), body)

    def test_writers_for_one_key_use_distinct_temp_files(self) -> None:
        first = self.store.writer("k")
        second = self.store.writer("k")
        self.assertNotEqual(first.path, second.path)
        first.write(b"first")
        second.write(b"second body")
        first.abort()
        second.commit({})
        stored = self.store.lookup("k")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(read_all(stored.fd), b"second body")
        self.assert_consistent(self.store)

    def test_replace_existing_key(self) -> None:
        old = body_of(100 * KB, "old")
        new = body_of(40 * KB, "new")
        self.put(self.store, "k", old, {"ETag": '"1"'})
        self.put(self.store, "other", b"x" * 10)
        before = self.store.lookup("k")
        assert before is not None
        self.addCleanup(before.close)
        self.clock.advance(10)
        self.put(self.store, "k", new, {"ETag": '"2"'})
        self.assertEqual(read_all(before.fd), old)
        after = self.store.lookup("k")
        assert after is not None
        self.addCleanup(after.close)
        self.assertEqual(read_all(after.fd), new)
        self.assertEqual(after.entry.headers, {"ETag": '"2"'})
        self.assertEqual(after.entry.fetched_at, 1010)
        self.assertEqual((self.store.total_size, self.store.entry_count), (len(new) + 10, 2))
        self.assert_consistent(self.store)

    def test_empty_body(self) -> None:
        entry = self.put(self.store, "empty", b"")
        self.assertEqual(entry.size, 0)
        self.assertEqual(entry.sha256, hashlib.sha256(b"").hexdigest())
        stored = self.store.lookup("empty")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(read_all(stored.fd), b"")
        self.assertEqual(self.store.entry_count, 1)
        self.assert_consistent(self.store)

    def test_remove(self) -> None:
        self.put(self.store, "k", body_of(7 * KB, "f"))
        self.put(self.store, "keep", body_of(3 * KB, "g"))
        stored = self.store.lookup("k")
        assert stored is not None
        self.addCleanup(stored.close)
        path = self.store.object_path("k")
        assert path is not None
        self.assertTrue(self.store.remove("k"))
        self.assertFalse(self.store.remove("k"))
        self.assertFalse(os.path.exists(path))
        self.assertIsNone(self.store.object_path("k"))
        self.assertIsNone(self.store.peek("k"))
        self.assertNotIn("k", self.db_rows(self.store))
        self.assertEqual((self.store.total_size, self.store.entry_count), (3 * KB, 1))
        self.assertEqual(read_all(stored.fd), body_of(7 * KB, "f"))
        self.store.flush()
        self.assertNotIn("k", self.db_rows(self.store))
        self.assert_consistent(self.store)

    def test_lookup_of_row_without_file_drops_row(self) -> None:
        self.put(self.store, "k", body_of(7 * KB, "h"))
        os.unlink(self.store.object_path("k"))
        self.assertIsNone(self.store.lookup("k"))
        self.assertIsNone(self.store.peek("k"))
        self.assertEqual((self.store.total_size, self.store.entry_count), (0, 0))
        self.assert_consistent(self.store)

    def test_mark_validated(self) -> None:
        self.put(self.store, "k", b"body", {"ETag": '"1"', "Last-Modified": "then"})
        self.clock.advance(60)
        entry = self.store.mark_validated("k", {"Last-Modified": "now", "Age": "3"})
        assert entry is not None
        self.assertEqual(
            dict(entry.headers), {"ETag": '"1"', "Last-Modified": "now", "Age": "3"}
        )
        self.assertEqual((entry.fetched_at, entry.validated_at), (1000, 1060))
        self.assertEqual(self.store.peek("k"), entry)
        self.assertEqual(dict(self.store.peek("k").headers), dict(entry.headers))  # type: ignore[union-attr]
        self.clock.advance(1)
        unchanged_headers = self.store.mark_validated("k")
        assert unchanged_headers is not None
        self.assertEqual(dict(unchanged_headers.headers), dict(entry.headers))
        self.assertEqual(unchanged_headers.validated_at, 1061)
        self.assertIsNone(self.store.mark_validated("missing"))


class SpareTempFileTests(StoreTestMixin, SynchronousTestCase):
    """
    With a threaded ``run_blocking``, :meth:`Store.writer` takes temporary
    files made ahead there, so a miss does not wait for a file creation.
    """

    def setUp(self) -> None:
        self.runner = HeldRunner()
        self.store = Store.open(
            self.make_directory(), 64 * MB, as_clock(Clock()), run_blocking=self.runner
        )
        self.addCleanup(self.close_store, self.store)
        self.temp = os.path.join(self.store.directory, "tmp")

    def test_writers_take_spares_made_by_the_runner(self) -> None:
        first = self.store.writer("a")
        # The first writer makes its own file and asks for the spares,
        # all in one call.
        self.assertEqual(len(self.runner.calls), 1)
        self.assertEqual(os.listdir(self.temp), [os.path.basename(first.path)])
        self.runner.run_all()
        spares = set(os.listdir(self.temp)) - {os.path.basename(first.path)}
        self.assertEqual(len(spares), SPARE_TEMP_FILES)
        second = self.store.writer("b")
        self.assertIn(os.path.basename(second.path), spares)
        # None asked for while more than half are ready.
        self.assertEqual(len(self.runner.calls), 0)
        body = body_of(10 * KB, "s")
        second.write(body)
        self.assertEqual(second.commit({}), self.store.peek("b"))
        self.assertEqual(file_bytes(self.store.object_path("b")), body)
        first.abort()
        self.assert_consistent(self.store)

    def test_close_removes_spares(self) -> None:
        self.store.writer("a").abort()
        self.runner.run_next()
        self.store.close()
        # A spare that is made after the store closed is removed too.
        self.runner.run_all()
        self.assertEqual(os.listdir(self.temp), [])

    def test_failed_spare_leaves_writers_working(self) -> None:
        self.store.writer("a").abort()
        os.rmdir(self.temp)
        self.runner.run_all()
        os.mkdir(self.temp)
        writer = self.store.writer("b")
        self.assertEqual(os.listdir(self.temp), [os.path.basename(writer.path)])
        writer.write(b"x")
        writer.commit({})
        self.assertEqual(file_bytes(self.store.object_path("b")), b"x")

    def test_no_spares_without_a_thread(self) -> None:
        store = self.open_store(self.make_directory())
        store.writer("a").abort()
        self.assertEqual(os.listdir(os.path.join(store.directory, "tmp")), [])


class PersistTests(StoreTestMixin, SynchronousTestCase):
    """
    :meth:`ObjectWriter.persist` hands the fsync and rename to the store's
    ``run_blocking`` and records the row only when they are done.
    """

    def setUp(self) -> None:
        self.runner = HeldRunner()
        directory = self.make_directory()
        self.store = Store.open(directory, 64 * MB, as_clock(Clock()), run_blocking=self.runner)
        # The runner holds only the blocking parts of persist() here (spare
        # temporary files have their own tests).
        self.store.spare_temp_files = 0
        self.addCleanup(self.close_store, self.store)
        self.fsyncs: list[int] = []

        def recording_fsync(fd: int) -> None:
            self.fsyncs.append(fd)
            os.fsync(fd)

        self.store.sync_file = recording_fsync

    def persist(self, key: str, body: bytes) -> tuple[Deferred[Any], Any]:
        writer = self.store.writer(key)
        writer.write(body)
        writer.check(expected_size=len(body), expected_sha256=hashlib.sha256(body).hexdigest())
        return Deferred.fromCoroutine(writer.persist({"etag": '"1"'})), writer

    def test_row_only_after_the_blocking_part(self) -> None:
        body = body_of(100 * KB, "p")
        persisted, writer = self.persist("k", body)
        # Nothing synced, renamed or recorded until the runner runs it.
        self.assertEqual(self.fsyncs, [])
        self.assertNoResult(persisted)
        self.assertIsNone(self.store.peek("k"))
        self.assertEqual(len(files_under(os.path.join(self.store.directory, "tmp"))), 1)
        # An abort now (a failing download) must leave the file alone.
        writer.abort()
        self.runner.run_next()
        entry = self.successResultOf(persisted)
        self.assertEqual(len(self.fsyncs), 1)
        self.assertEqual(self.store.peek("k"), entry)
        self.assertEqual(file_bytes(self.store.object_path("k")), body)
        self.assertEqual(os.listdir(os.path.join(self.store.directory, "tmp")), [])
        self.assert_consistent(self.store)

    def test_failed_fsync_leaves_nothing(self) -> None:
        def failing_fsync(fd: int) -> None:
            raise OSError(5, "Input/output error")

        self.store.sync_file = failing_fsync
        persisted, _ = self.persist("k", body_of(10 * KB, "f"))
        self.runner.run_next()
        self.failureResultOf(persisted, OSError)
        self.assertIsNone(self.store.peek("k"))
        self.assertEqual(files_under(self.store.directory + "/tmp"), {})
        self.assertEqual(files_under(self.store.directory + "/objects"), {})
        self.assert_consistent(self.store)

    def test_too_large_is_not_handed_over(self) -> None:
        writer = self.store.writer("k")
        writer.write(body_of(2 * KB, "big"))
        self.store.set_max_size(KB)
        persisted = Deferred.fromCoroutine(writer.persist({}))
        self.assertIsNone(self.successResultOf(persisted))
        self.assertEqual(self.store.reserved, 0)
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(files_under(self.store.directory + "/tmp"), {})

    def test_check_refuses_before_anything_is_handed_over(self) -> None:
        writer = self.store.writer("k")
        writer.write(b"abc")
        self.assertRaises(IntegrityError, writer.check, expected_sha256="00" * 32)
        self.assertRaises(IntegrityError, self.store.writer("j").check, expected_size=1)
        self.assertEqual(self.runner.calls, [])
        self.assertEqual(files_under(self.store.directory + "/tmp"), {})


class FanOutTests(StoreTestMixin, SynchronousTestCase):
    """
    The 256 fan-out directories exist from start-up, so publishing needs
    no ``mkdir``; one removed behind the server's back comes back.
    """

    def test_created_at_open_and_recreated_when_removed(self) -> None:
        store = self.open_store(self.make_directory())
        objects = os.path.join(store.directory, "objects")
        self.assertEqual(sorted(os.listdir(objects)), [f"{i:02x}" for i in range(256)])
        fanout = os.path.join(objects, object_name("k")[:2])
        os.rmdir(fanout)
        entry = self.put(store, "k", b"body")
        self.assertEqual(os.listdir(fanout), [entry.file])
        self.assert_consistent(store)


class EvictionTests(StoreTestMixin, SynchronousTestCase):
    """
    The least recently used objects go first once the total exceeds the
    limit, and only as many as needed.  Rows cost nothing here, so that
    the sizes are the bodies' (MetadataTests count the rows).
    """

    def setUp(self) -> None:
        self.patch(core, "metadata_size", lambda key, headers: 0)
        self.clock = Clock()
        self.store = self.open_store(self.make_directory(), max_size=MB, clock=self.clock)

    def put_at(self, key: str, size: int) -> Any:
        self.clock.advance(1)
        entry = self.put(self.store, key, body_of(size, key))
        self.assert_consistent(self.store)
        return entry

    def lookup_at(self, key: str) -> None:
        self.clock.advance(1)
        stored = self.store.lookup(key)
        assert stored is not None
        stored.close()

    def present(self) -> set[str]:
        return {entry.key for entry in self.store.keys()}

    def test_lru_order(self) -> None:
        with capturedLogs() as events:
            self.put_at("a", 100 * KB)  # t=1
            self.put_at("b", 300 * KB)  # t=2
            self.put_at("c", 50 * KB)  # t=3
            self.put_at("d", 400 * KB)  # t=4
            self.lookup_at("a")  # t=5: a is now more recent than b, c, d
            self.assertEqual(self.evictions(self.store), 0)
            self.put_at("e", 600 * KB)  # t=6: 1450 KB, b, c, d must go
            self.assertEqual(self.present(), {"a", "e"})
            self.assertEqual(self.evictions(self.store), 3)
            self.put_at("f", 50 * KB)  # t=7: 750 KB
            self.lookup_at("e")  # t=8
            self.put_at("g", 300 * KB)  # t=9: 1050 KB, a (t=5) goes
            self.assertEqual(self.present(), {"e", "f", "g"})
            self.lookup_at("f")  # t=10
            self.clock.advance(1)
            self.store.peek("e")  # a peek is not an access
            self.put_at("h", 200 * KB)  # t=12: 1150 KB, e (t=8) goes
            self.assertEqual(self.present(), {"f", "g", "h"})
        evicted = [e["key"] for e in events if e.get("log_format", "").startswith("Evicted")]
        self.assertEqual(evicted, ["b", "c", "d", "a", "e"])
        self.assertEqual(self.evictions(self.store), 5)
        self.assertEqual(self.store.total_size, 550 * KB)
        for key in ("b", "c", "d", "a", "e"):
            self.assertIsNone(self.store.peek(key))
            self.assertIsNone(self.store.object_path(key))
        self.assert_consistent(self.store)

    def test_touch_is_an_access_without_opening(self) -> None:
        """
        ``touch`` (a page hit served from memory) keeps an entry recent as
        ``lookup`` does, without opening its file.
        """
        self.put_at("a", 400 * KB)  # t=1
        self.put_at("b", 400 * KB)  # t=2
        descriptors = len(os.listdir("/proc/self/fd"))
        self.clock.advance(1)
        entry = self.store.touch("a")  # t=3: a is now more recent than b
        self.assertEqual(len(os.listdir("/proc/self/fd")), descriptors)
        assert entry is not None
        self.assertEqual(entry.key, "a")
        self.assertIsNone(self.store.touch("missing"))
        self.put_at("c", 400 * KB)  # b goes, not a
        self.assertEqual(self.present(), {"a", "c"})

    def test_only_as_many_as_needed(self) -> None:
        for key in "pqrst":
            self.put_at(key, 200 * KB)
        self.put_at("u", 150 * KB)  # 1150 KB: only p must go
        self.assertEqual(self.present(), set("qrstu"))
        self.assertEqual(self.evictions(self.store), 1)

    def test_pending_access_counts_before_eviction(self) -> None:
        self.put_at("old", 400 * KB)
        self.put_at("mid", 400 * KB)
        self.lookup_at("old")  # only in memory until a flush
        self.put_at("new", 400 * KB)
        self.assertEqual(self.present(), {"old", "new"})

    def test_object_of_exactly_max_size_is_kept(self) -> None:
        self.put_at("a", 100 * KB)
        self.put_at("b", 100 * KB)
        entry = self.put_at("whole", MB)
        self.assertIsNotNone(entry)
        self.assertEqual(self.present(), {"whole"})
        self.assertEqual(self.store.total_size, MB)
        self.assertEqual(self.evictions(self.store), 2)

    def test_object_larger_than_cache_not_stored(self) -> None:
        self.put_at("a", 100 * KB)
        writer = self.store.writer("huge")
        reader = writer.reader_fd()
        self.addCleanup(os.close, reader)
        body = body_of(MB + 1, "huge")
        # Refused as it outgrows the limit, not once all of it is in tmp/.
        writer.write(body[:MB])
        self.assertRaises(store_module.NoRoom, writer.write, body[MB:])
        self.assertEqual(self.store.reserved, MB)
        writer.abort()
        self.assertEqual(self.store.reserved, 0)
        body = body[:MB]
        self.assertIsNone(self.store.peek("huge"))
        # The room its first MB took in tmp/ was made by evicting.
        self.assertEqual(self.present(), set())
        self.assertEqual(self.evictions(self.store), 1)
        self.assertEqual(self.store.total_size, 0)
        self.assertEqual(read_all(reader), body)
        self.assert_consistent(self.store)

    def test_evicted_object_stays_readable(self) -> None:
        self.put_at("victim", 500 * KB)
        path = self.store.object_path("victim")
        assert path is not None
        stored = self.store.lookup("victim")
        assert stored is not None
        self.addCleanup(stored.close)
        self.put_at("newer", 400 * KB)
        self.lookup_at("newer")
        self.put_at("newest", 300 * KB)
        self.assertIsNone(self.store.peek("victim"))
        self.assertFalse(os.path.exists(path))
        self.assertEqual(read_all(stored.fd), body_of(500 * KB, "victim"))
        self.assertEqual(os.fstat(stored.fd).st_size, 500 * KB)

    def test_set_max_size(self) -> None:
        for key in "abcd":
            self.put_at(key, 200 * KB)
        self.lookup_at("a")
        self.store.set_max_size(450 * KB)
        self.assertEqual(self.present(), {"d", "a"})
        self.assertEqual(self.evictions(self.store), 2)
        self.assert_consistent(self.store)


class AccessBatchingTests(StoreTestMixin, SynchronousTestCase):
    """
    A hit writes nothing to disk: access times wait in memory for a flush.
    """

    def test_hit_costs_no_fsync_and_no_write(self) -> None:
        clock = Clock()
        clock.advance(100)
        store = self.open_store(self.make_directory(), clock=clock)
        fsyncs: list[int] = []
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            fsyncs.append(fd)
            real_fsync(fd)

        self.patch(os, "fsync", counting_fsync)
        store.sync_file = counting_fsync
        body = body_of(20 * KB, "hit")
        self.put(store, "k", body)
        self.put(store, "other", b"o")
        self.assertGreater(len(fsyncs), 0, "commit should fsync the body")
        index = os.path.join(store.directory, INDEX_NAME)
        wal = index + "-wal"
        on_disk = (file_bytes(index), file_bytes(wal))
        fsyncs.clear()

        for _ in range(3):
            clock.advance(7)
            stored = store.lookup("k")
            assert stored is not None
            self.assertEqual(read_all(stored.fd), body)
            stored.close()
        self.assertIsNone(store.lookup("missing"))
        store.peek("k")

        self.assertEqual(fsyncs, [])
        self.assertEqual((file_bytes(index), file_bytes(wal)), on_disk)
        self.assertEqual(self.db_rows(store)["k"][7], 100)
        self.assertEqual(store.peek("k").last_access, 121)  # type: ignore[union-attr]

        store.flush()
        self.assertEqual(fsyncs, [])
        self.assertEqual(self.db_rows(store)["k"][7], 121)
        self.assertEqual(self.db_rows(store)["other"][7], 100)

    def test_close_flushes_access_times(self) -> None:
        clock = Clock()
        directory = self.make_directory()
        store = self.open_store(directory, clock=clock)
        self.put(store, "k", b"body")
        clock.advance(42)
        store.lookup("k").close()  # type: ignore[union-attr]
        self.close_store(store)
        reopened = self.open_store(directory)
        self.assertEqual(reopened.peek("k").last_access, 42)  # type: ignore[union-attr]


class RestartTests(StoreTestMixin, SynchronousTestCase):
    """
    Closing and reopening keeps every entry; start-up reconciliation
    brings files and rows back into agreement.
    """

    def setUp(self) -> None:
        # Rows cost nothing here (see EvictionTests).
        self.patch(core, "metadata_size", lambda key, headers: 0)
        self.directory = self.make_directory()
        self.clock = Clock()
        self.bodies = {
            f"key-{index}": body_of(index * 10 * KB + 1, f"key-{index}")
            for index in range(6)
        }
        store = self.open_store(self.directory, clock=self.clock)
        for key, body in self.bodies.items():
            self.clock.advance(1)
            self.put(store, key, body, {"X-Key": key, "Content-Length": str(len(body))})
        self.before = {entry.key: entry for entry in store.keys()}
        self.close_store(store)

    def test_reopen_keeps_everything(self) -> None:
        store = self.open_store(self.directory)
        after = {entry.key: entry for entry in store.keys()}
        self.assertEqual(after, self.before)
        for key, body in self.bodies.items():
            self.assertEqual(dict(after[key].headers), {"X-Key": key, "Content-Length": str(len(body))})
            self.assertEqual(after[key].sha256, hashlib.sha256(body).hexdigest())
            stored = store.lookup(key)
            assert stored is not None
            self.assertEqual(read_all(stored.fd), body)
            stored.close()
        self.assertEqual(store.entry_count, len(self.bodies))
        self.assertEqual(store.total_size, sum(map(len, self.bodies.values())))
        self.assertEqual(self.evictions(store), 0)
        self.assert_consistent(store)

    def test_reconciliation(self) -> None:
        tmp = os.path.join(self.directory, "tmp")
        for name in ("1234-1.part", "1234-2.part", "stray"):
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(b"partial body")
        orphan_name = object_name("never-committed")
        orphan_dir = os.path.join(self.directory, "objects", orphan_name[:2])
        os.makedirs(orphan_dir, exist_ok=True)
        orphan = os.path.join(orphan_dir, orphan_name)
        with open(orphan, "wb") as f:
            f.write(b"renamed but no row")
        probe = self.open_store(self.directory)
        missing = probe.object_path("key-1")
        grown = probe.object_path("key-2")
        shrunk = probe.object_path("key-3")
        self.close_store(probe)
        os.unlink(missing)
        with open(grown, "ab") as f:
            f.write(b"extra")
        os.truncate(shrunk, 5)
        # The probe's own reconciliation already ran on a clean tree; the
        # damage above is seen by the next open.
        store = self.open_store(self.directory)
        self.assertEqual(os.listdir(tmp), [])
        self.assertFalse(os.path.exists(orphan))
        self.assertFalse(os.path.exists(grown))
        self.assertFalse(os.path.exists(shrunk))
        kept = {"key-0", "key-4", "key-5"}
        self.assertEqual({entry.key for entry in store.keys()}, kept)
        self.assertEqual(set(self.db_rows(store)), kept)
        self.assertEqual(store.entry_count, 3)
        self.assertEqual(store.total_size, sum(len(self.bodies[key]) for key in kept))
        for key in ("key-1", "key-2", "key-3"):
            self.assertIsNone(store.peek(key))
            self.assertIsNone(store.lookup(key))
        for key in kept:
            stored = store.lookup(key)
            assert stored is not None
            self.assertEqual(read_all(stored.fd), self.bodies[key])
            stored.close()
        self.assertEqual(self.evictions(store), 0)
        self.assert_consistent(store)

    def test_lower_max_size_on_reopen_evicts_lru(self) -> None:
        store = self.open_store(self.directory, clock=self.clock)
        # Recency now: key-1..key-5 as written, then key-0 and key-2.
        for key in ("key-0", "key-2"):
            self.clock.advance(1)
            store.lookup(key).close()  # type: ignore[union-attr]
        self.close_store(store)
        total = sum(map(len, self.bodies.values()))
        limit = total - len(self.bodies["key-1"]) - len(self.bodies["key-3"])
        with capturedLogs() as events:
            smaller = self.open_store(self.directory, max_size=limit)
        evicted = [e["key"] for e in events if e.get("log_format", "").startswith("Evicted")]
        self.assertEqual(evicted, ["key-1", "key-3"])
        self.assertEqual(
            {entry.key for entry in smaller.keys()},
            {"key-0", "key-2", "key-4", "key-5"},
        )
        self.assertEqual(self.evictions(smaller), 2)
        self.assertEqual(smaller.total_size, limit)
        self.assert_consistent(smaller)


class IndexRefusalTests(StoreTestMixin, SynchronousTestCase):
    """
    An index that is not a healthy buildcache index is refused, named, and
    left as it was; one directory serves one store at a time.
    """

    def assert_refused(self, directory: str, *words: str) -> StoreError:
        index = os.path.join(directory, INDEX_NAME)
        before = file_bytes(index)
        error = self.assertRaises(StoreError, Store.open, directory, MB, as_clock(Clock()))
        self.assertIn(index, str(error))
        for word in words:
            self.assertIn(word, str(error))
        self.assertEqual(file_bytes(index), before)
        # The refusal released the lock: once the index is moved aside, the
        # directory opens.
        os.rename(index, index + ".aside")
        self.close_store(self.open_store(directory))
        self.assertEqual(file_bytes(index + ".aside"), before)
        return error

    def test_garbage_index(self) -> None:
        directory = self.make_directory()
        with open(os.path.join(directory, INDEX_NAME), "wb") as f:
            f.write(body_of(8192, "garbage"))
        self.assert_refused(directory, "not a readable SQLite database")

    def test_short_garbage_index(self) -> None:
        directory = self.make_directory()
        with open(os.path.join(directory, INDEX_NAME), "wb") as f:
            f.write(b"definitely not sqlite, just a short text file\n" * 3)
        self.assert_refused(directory)

    def test_damaged_index(self) -> None:
        directory = self.make_directory()
        store = self.open_store(directory)
        for index in range(200):
            self.put(store, f"key-{index}" + "x" * 200, b"b")
        self.close_store(store)
        index_path = os.path.join(directory, INDEX_NAME)
        size = os.path.getsize(index_path)
        self.assertGreater(size, 3 * 4096)
        with open(index_path, "r+b") as f:
            f.seek(2 * 4096)
            f.write(b"\xff" * (size - 2 * 4096))
        self.assert_refused(directory, "corrupt")

    def make_foreign(self, directory: str, application_id: int, tables: bool) -> None:
        db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
        try:
            db.execute(f"PRAGMA application_id = {application_id}")
            if tables:
                with db:
                    db.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT)")
                    db.execute("INSERT INTO accounts (name) VALUES ('alice')")
        finally:
            db.close()

    def test_foreign_schema(self) -> None:
        directory = self.make_directory()
        self.make_foreign(directory, 0, tables=True)
        self.assert_refused(directory, "not a buildcache index")

    def test_foreign_application_id(self) -> None:
        directory = self.make_directory()
        self.make_foreign(directory, 0x12345678, tables=False)
        self.assert_refused(directory, "not a buildcache index")

    def test_foreign_application_id_with_entries_table(self) -> None:
        directory = self.make_directory()
        db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
        db.execute("PRAGMA application_id = 7")
        db.execute("CREATE TABLE entries (key TEXT)")
        db.commit()
        db.close()
        self.assert_refused(directory, "not a buildcache index")

    def test_other_schema_version(self) -> None:
        directory = self.make_directory()
        db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA user_version = 99")
        db.execute("CREATE TABLE entries (key TEXT)")
        db.commit()
        db.close()
        self.assert_refused(directory, "version 99")

    def test_new_index_is_identified(self) -> None:
        directory = self.make_directory()
        self.close_store(self.open_store(directory))
        db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA application_id").fetchone()[0], APPLICATION_ID)
        self.assertEqual(db.execute("PRAGMA journal_mode").fetchone()[0], "wal")

    def test_directory_locked(self) -> None:
        directory = self.make_directory()
        first = self.open_store(directory)
        self.put(first, "k", b"body")
        error = self.assertRaises(StoreError, Store.open, directory, MB, as_clock(Clock()))
        self.assertIn(directory, str(error))
        self.assertIn("in use", str(error))
        # The refused open changed nothing for the holder.
        stored = first.lookup("k")
        assert stored is not None
        self.assertEqual(read_all(stored.fd), b"body")
        stored.close()
        self.close_store(first)
        second = self.open_store(directory)
        self.assertIsNotNone(second.peek("k"))

    def test_unusable_directory(self) -> None:
        parent = self.make_directory()
        blocker = os.path.join(parent, "file")
        with open(blocker, "wb") as f:
            f.write(b"not a directory")
        error = self.assertRaises(StoreError, Store.open, blocker, MB, as_clock(Clock()))
        self.assertIn(blocker, str(error))


class CrashTests(StoreTestMixin, SynchronousTestCase):
    """
    A writer killed in the middle of a body loses only that body.
    """

    def test_sigkill_during_large_write(self) -> None:
        directory = self.make_directory()
        env = dict(os.environ, PYTHONPATH=REPO_ROOT)
        process = subprocess.Popen(
            [sys.executable, os.path.join(REPO_ROOT, "tests", "crashwriter.py"), directory],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

        def reap() -> None:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
            process.wait()
            for pipe in (process.stdin, process.stdout):
                assert pipe is not None
                pipe.close()

        self.addCleanup(reap)
        assert process.stdout is not None
        self.assertEqual(process.stdout.readline(), b"writing\n")
        os.kill(process.pid, signal.SIGKILL)
        self.assertEqual(process.wait(), -signal.SIGKILL)

        tmp = os.path.join(directory, "tmp")
        partial = files_under(tmp)
        self.assertEqual(len(partial), 1)
        self.assertGreaterEqual(list(partial.values())[0], crashwriter.ANNOUNCE_AFTER)

        store = self.open_store(directory, max_size=crashwriter.MAX_SIZE)
        small = crashwriter.small_objects()
        self.assertEqual({entry.key for entry in store.keys()}, set(small))
        for key, body in small.items():
            stored = store.lookup(key)
            assert stored is not None
            data = read_all(stored.fd)
            stored.close()
            self.assertEqual(hashlib.sha256(data).hexdigest(), hashlib.sha256(body).hexdigest())
            self.assertEqual(stored.entry.sha256, hashlib.sha256(body).hexdigest())
            self.assertEqual(stored.entry.size, len(body))
        self.assertIsNone(store.peek(crashwriter.LARGE_KEY))
        self.assertEqual(os.listdir(tmp), [])
        self.assertEqual(store.entry_count, len(small))
        self.assertEqual(store.total_size, sum(map(len, small.values())))
        self.assert_consistent(store)


class SimulatedCrash(Exception):
    """
    Stands for the process dying at the point where it is raised.
    """


class CrashWindowTests(StoreTestMixin, SynchronousTestCase):
    """
    Whatever instant a writer dies at, the next start-up finds rows that
    describe their files.
    """

    def crash_after_publishing_rename(self, store: Store, key: str, body: bytes) -> None:
        """
        Commit ``body`` under ``key``, dying right after its file was
        renamed into ``objects/``, then close the store as the kernel would
        (the lock goes, nothing else is written).
        """
        real_rename = os.rename
        objects = os.path.join(store.directory, "objects")

        def rename_then_die(source: str, destination: str) -> None:
            real_rename(source, destination)
            if os.path.abspath(destination).startswith(objects + os.sep):
                raise SimulatedCrash()

        writer = store.writer(key)
        writer.write(body)
        self.patch(os, "rename", rename_then_die)
        self.assertRaises(SimulatedCrash, writer.commit, {"ETag": '"new"'})
        self.patch(os, "rename", real_rename)
        self.close_store(store)

    def test_crash_before_row_of_new_key(self) -> None:
        directory = self.make_directory()
        store = self.open_store(directory)
        self.put(store, "kept", b"kept body")
        self.crash_after_publishing_rename(store, "new", body_of(10 * KB, "new"))
        reopened = self.open_store(directory)
        self.assertEqual({entry.key for entry in reopened.keys()}, {"kept"})
        self.assert_consistent(reopened)

    def test_crash_while_replacing_with_same_size_body(self) -> None:
        # A refreshed index file often keeps its length; the old row must
        # not end up describing (size, sha256, ETag) the new body.
        directory = self.make_directory()
        store = self.open_store(directory)
        old = body_of(10 * KB, "old")
        new = body_of(10 * KB, "new")
        self.put(store, "index", old, {"ETag": '"old"'})
        self.crash_after_publishing_rename(store, "index", new)
        reopened = self.open_store(directory)
        stored = reopened.lookup("index")
        if stored is not None:
            self.addCleanup(stored.close)
            body = read_all(stored.fd)
            self.assertEqual(
                (stored.entry.sha256, dict(stored.entry.headers)),
                (hashlib.sha256(body).hexdigest(),
                 {"ETag": '"old"' if body == old else '"new"'}),
            )
        self.assert_consistent(reopened)

    def test_crash_while_creating_index(self) -> None:
        directory = self.make_directory()
        process = subprocess.run(
            [sys.executable, os.path.join(REPO_ROOT, "tests", "crashwriter.py"),
             directory, "--die-at-sql", r"(?i)PRAGMA\s+application_id\s*="],
            env=dict(os.environ, PYTHONPATH=REPO_ROOT),
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
        self.assertEqual(process.returncode, crashwriter.DIED_AT_SQL)
        store = self.open_store(directory)
        self.put(store, "k", b"body")
        self.assert_consistent(store)


class StatsTests(StoreTestMixin, SynchronousTestCase):
    """
    :meth:`Store.stats` is a snapshot of the size; evictions are told to
    the store's listener, which the store itself does not count.
    """

    def test_snapshot(self) -> None:
        store = self.open_store(self.make_directory(), max_size=MB)
        self.assertEqual(
            store.stats(), StoreStats(entries=0, bytes_stored=0, max_size=MB)
        )
        self.put(store, "a", body_of(600 * KB, "a"))
        self.put(store, "b", body_of(300 * KB, "b"))
        self.put(store, "c", body_of(200 * KB, "c"))  # evicts a
        rows = sum(store_module.metadata_size(key, "{}") for key in "bc")
        snapshot = store.stats()
        self.assertEqual(
            snapshot,
            StoreStats(
                entries=2, bytes_stored=500 * KB + rows, max_size=MB,
                bytes_metadata=rows,
            ),
        )
        assert isinstance(store.on_evicted, Evictions)
        self.assertEqual(
            (store.on_evicted.count, store.on_evicted.bytes),
            (1, 600 * KB + store_module.metadata_size("a", "{}")),
        )
        self.assertFalse(hasattr(snapshot, "hits"))
        store.remove("b")
        self.assertEqual(snapshot.entries, 2)
        later = store.stats()
        self.assertEqual(
            (later.entries, later.bytes_stored),
            (1, 200 * KB + store_module.metadata_size("c", "{}")),
        )

    def test_stored_object_close_is_idempotent(self) -> None:
        store = self.open_store(self.make_directory())
        self.put(store, "k", b"body")
        stored = store.lookup("k")
        assert isinstance(stored, StoredObject)
        stored.close()
        stored.close()
        self.assertEqual(stored.fd, -1)



def _add_note_column(db: sqlite3.Connection) -> int:
    db.execute("ALTER TABLE entries ADD COLUMN note TEXT")
    return 0


def _drop_everything(db: sqlite3.Connection) -> int:
    return db.execute("DELETE FROM entries").rowcount


def _fail_half_way(db: sqlite3.Connection) -> int:
    db.execute("ALTER TABLE entries ADD COLUMN half TEXT")
    raise sqlite3.OperationalError("disk I/O error")


#: The key of :meth:`MigrationTests.stored_directory`'s entry once the
#: shipped steps have given it its scheme.
MIGRATED_KEY = "http://mirror.test/k"


class MigrationTests(StoreTestMixin, SynchronousTestCase):
    """
    An index of an older schema is brought up to date in place at start-up,
    one transaction a step, and keeps the entries each step carries over.
    """

    def stored_directory(self) -> str:
        """
        A cache at schema version 1 (before every real step) with one entry.
        """
        directory = self.make_directory()
        make_version_1_cache(directory, {"mirror.test/k": b"body"})
        return directory

    def version(self, directory: str) -> int:
        db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
        self.addCleanup(db.close)
        return int(db.execute("PRAGMA user_version").fetchone()[0])

    def columns(self, directory: str) -> list[str]:
        db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
        self.addCleanup(db.close)
        return [row[1] for row in db.execute("PRAGMA table_info(entries)")]

    def test_older_index_migrated_and_served(self) -> None:
        directory = self.stored_directory()
        self.patch(schema, "MIGRATIONS", CURRENT + (Migration("add a note", _add_note_column),))
        with capturedLogs() as events:
            store = self.open_store(directory)
        stored = store.lookup(MIGRATED_KEY)
        assert stored is not None
        self.assertEqual(os.read(stored.fd, 10), b"body")
        stored.close()
        self.close_store(store)
        self.assertEqual(self.version(directory), CURRENT_VERSION + 1)
        self.assertIn("note", self.columns(directory))
        migrated = [e for e in events if e.get("step") == "add a note"]
        self.assertEqual(
            [(e["old"], e["new"], e["dropped"]) for e in migrated],
            [(CURRENT_VERSION, CURRENT_VERSION + 1, 0)],
        )

    def test_version_1_keys_get_their_scheme(self) -> None:
        """
        Keys written before keys named their scheme become ``http://``
        keys (an https route fetches its copy once more); the index's page
        keys stay; every entry is still served.
        """
        directory = self.make_directory()
        old_keys = {
            "mirror.test/alpine/v3.20/main/x86_64/curl-8.9.0-r0.apk": b"apk",
            "127.0.0.1:8080/pool/a_1_amd64.deb": b"deb",
            "mirror.test:443/x?y=1": b"odd port",
            "simple-page|http://127.0.0.1:9000/simple|bcdemo-a": b"page",
            "simple-root|https://index.test/simple|text/html": b"root",
        }
        make_version_1_cache(directory, old_keys)
        self.assertEqual(self.version(directory), 1)
        with capturedLogs() as events:
            store = self.open_store(directory)
        self.assertEqual(self.version(directory), 1 + len(schema.MIGRATIONS))
        expected = {
            "http://mirror.test/alpine/v3.20/main/x86_64/curl-8.9.0-r0.apk": b"apk",
            "http://127.0.0.1:8080/pool/a_1_amd64.deb": b"deb",
            "http://mirror.test:443/x?y=1": b"odd port",
            "simple-page|http://127.0.0.1:9000/simple|bcdemo-a": b"page",
            "simple-root|https://index.test/simple|text/html": b"root",
        }
        self.assertEqual({entry.key for entry in store.keys()}, set(expected))
        for key, body in expected.items():
            stored = store.lookup(key)
            assert stored is not None, key
            self.assertEqual(os.read(stored.fd, 100), body)
            stored.close()
        self.assertIsNone(store.peek("https://mirror.test/alpine/v3.20/main/x86_64/curl-8.9.0-r0.apk"))
        self.assertEqual(store.stats().entries, len(expected))
        self.close_store(store)
        migrated = [e for e in events if e.get("step") == "cache keys name their scheme"]
        self.assertEqual([(e["old"], e["new"], e["dropped"]) for e in migrated], [(1, 2, 0)])

    def test_new_index_goes_through_every_step(self) -> None:
        self.patch(schema, "MIGRATIONS", CURRENT + (Migration("add a note", _add_note_column),))
        directory = self.make_directory()
        with capturedLogs() as events:
            self.close_store(self.open_store(directory))
        # Nothing to report for a cache that did not exist.
        self.assertEqual([e for e in events if "step" in e], [])
        self.assertEqual(self.version(directory), CURRENT_VERSION + 1)
        self.assertIn("note", self.columns(directory))

    def test_dropped_rows_lose_their_files(self) -> None:
        directory = self.stored_directory()
        self.patch(schema, "MIGRATIONS", CURRENT + (Migration("start over", _drop_everything),))
        with capturedLogs() as events:
            store = self.open_store(directory)
        self.assertIsNone(store.lookup(MIGRATED_KEY))
        self.assertEqual(store.stats().entries, 0)
        self.close_store(store)
        objects = [
            name for sub in os.listdir(os.path.join(directory, "objects"))
            for name in os.listdir(os.path.join(directory, "objects", sub))
        ]
        self.assertEqual(objects, [])
        self.assertEqual([e["dropped"] for e in events if e.get("step") == "start over"], [1])

    def test_version_1_gains_source_digest(self) -> None:
        """
        The real step: an index written before source digests were kept is
        migrated at start-up; its entry is still served, with an unknown
        source digest, and a new entry records one.
        """
        directory = self.stored_directory()
        self.patch(schema, "MIGRATIONS", CURRENT)
        store = self.open_store(directory)
        stored = store.lookup(MIGRATED_KEY)
        assert stored is not None
        self.assertEqual(os.read(stored.fd, 10), b"body")
        self.assertIsNone(stored.entry.source_digest)
        stored.close()
        writer = store.writer("new")
        writer.write(b"new body")
        entry = writer.commit({}, source_digest="Q1abc")
        assert entry is not None
        self.assertEqual(entry.source_digest, "Q1abc")
        self.close_store(store)
        self.assertEqual(
            self.version(directory), 1 + len(CURRENT)
        )
        store = self.open_store(directory)
        new = store.peek("new")
        assert new is not None
        self.assertEqual(new.source_digest, "Q1abc")
        self.close_store(store)

    def test_failed_step_leaves_the_old_version(self) -> None:
        directory = self.stored_directory()
        self.patch(schema, "MIGRATIONS", CURRENT + (Migration("fails", _fail_half_way),))
        error = self.assertRaises(StoreError, self.open_store, directory)
        self.assertIn(f"left at version {CURRENT_VERSION}", str(error))
        self.assertEqual(self.version(directory), CURRENT_VERSION)
        self.assertNotIn("half", self.columns(directory))
        self.patch(schema, "MIGRATIONS", CURRENT)
        store = self.open_store(directory)
        self.assertIsNotNone(store.peek(MIGRATED_KEY))
        self.close_store(store)


class MetadataRulesTests(SynchronousTestCase):
    """
    The pure rules of what an entry costs and may keep.
    """

    def test_metadata_size(self) -> None:
        self.assertEqual(
            store_module.metadata_size("host/k", '{"etag": "1"}'),
            store_module.ROW_OVERHEAD + 6 + 13,
        )
        # Every row costs at least its overhead.
        self.assertGreaterEqual(store_module.metadata_size("", ""), store_module.ROW_OVERHEAD)

    def test_headers_storable(self) -> None:
        limit = store_module.MAX_STORED_HEADERS
        self.assertTrue(store_module.headers_storable("x" * limit))
        self.assertFalse(store_module.headers_storable("x" * (limit + 1)))

    def test_object_limit(self) -> None:
        self.assertEqual(store_module.object_limit(10 * MB, 0), 10 * MB)
        self.assertEqual(store_module.object_limit(10 * MB, MB), MB)
        self.assertEqual(store_module.object_limit(MB, 10 * MB), MB)

    def test_mismatch(self) -> None:
        digest = hashlib.sha256(b"abc").hexdigest()
        self.assertIsNone(store_module.mismatch(3, digest, 3, digest.upper()))
        self.assertIsNone(store_module.mismatch(3, digest, None, None))
        self.assertEqual(
            store_module.mismatch(2, digest, 3, None), "expected 3 bytes, received 2"
        )
        self.assertIn("expected sha256", store_module.mismatch(3, digest, None, "00") or "")

    def test_uncounted_limit(self) -> None:
        floor = store_module.UNCOUNTED_LIMIT
        self.assertEqual(floor, 64 * MB)
        self.assertEqual(store_module.uncounted_limit(0), floor)
        self.assertEqual(store_module.uncounted_limit(MB), floor)
        self.assertEqual(store_module.uncounted_limit(200 * MB), 200 * MB)


class MetadataTests(StoreTestMixin, SynchronousTestCase):
    """
    Stored headers and rows count against the size limit; an entry keeps
    at most MAX_STORED_HEADERS of them; the rows kept in memory are
    bounded in bytes; bodies being written hold room.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = self.open_store(
            self.make_directory(), max_size=400 * KB, clock=self.clock
        )

    def big_headers(self, seed: str, size: int = 60 * KB) -> dict[str, str]:
        return {"etag": '"' + seed * (size // len(seed)) + '"'}

    def test_headers_count_and_evict(self) -> None:
        for index in range(12):
            self.clock.advance(1)
            self.put(self.store, f"k{index}", b"", self.big_headers(f"{index:02d}"))
            stats = self.store.stats()
            self.assertLessEqual(stats.bytes_stored, 400 * KB)
        # Six 60 KB rows fit in 400 KB: the older ones were evicted.
        self.assertEqual(self.store.stats().entries, 6)
        self.assertEqual(self.evictions(self.store), 6)
        self.assertEqual(self.store.total_size, 0)
        stats = self.store.stats()
        self.assertGreater(stats.bytes_metadata, 6 * 60 * KB)
        self.assertEqual(stats.bytes_stored, stats.bytes_metadata)
        self.assertEqual(
            {entry.key for entry in self.store.keys()}, {f"k{i}" for i in range(6, 12)}
        )
        self.assert_consistent(self.store)

    def test_zero_byte_bodies_cost_their_rows(self) -> None:
        self.put(self.store, "empty", b"")
        self.assertEqual(
            self.store.stats().bytes_stored, store_module.metadata_size("empty", "{}")
        )

    def test_too_many_headers_not_stored(self) -> None:
        writer = self.store.writer("k")
        writer.write(b"body")
        with capturedLogs() as events:
            self.assertIsNone(writer.commit(self.big_headers("x", 65 * KB)))
        self.assertIsNone(self.store.peek("k"))
        self.assertEqual(
            [e["key"] for e in events if e.get("event") == "headers_not_stored"], ["k"]
        )
        self.assertEqual(files_under(self.store.directory + "/tmp"), {})
        self.assertEqual(self.store.stats().bytes_stored, 0)

    def test_refreshed_headers_bounded(self) -> None:
        self.put(self.store, "k", b"body", {"etag": '"1"'})
        before = self.store.stats().bytes_stored
        self.clock.advance(5)
        entry = self.store.mark_validated("k", self.big_headers("y", 65 * KB))
        assert entry is not None
        self.assertEqual(entry.headers, {"etag": '"1"'})
        self.assertEqual(entry.validated_at, 5)
        self.assertEqual(self.store.stats().bytes_stored, before)
        # A refresh that fits is counted.
        self.store.mark_validated("k", {"etag": '"22"'})
        self.assertEqual(self.store.stats().bytes_stored, before + 1)
        self.assert_consistent(self.store)

    def test_rows_kept_bounded_in_bytes(self) -> None:
        self.store.set_max_size(64 * MB)
        self.store.rows_bytes_kept = 200 * KB
        for index in range(8):
            self.put(self.store, f"k{index}", b"", self.big_headers(f"{index:02d}"))
        for index in range(8):
            self.assertIsNotNone(self.store.peek(f"k{index}"))
            self.assertLessEqual(self.store._rows_bytes, 200 * KB)
            self.assertEqual(
                self.store._rows_bytes,
                sum(entry.meta_size for entry in self.store._rows.values()),
            )
        self.assertLess(len(self.store._rows), 8)

    def test_writing_holds_room(self) -> None:
        self.put(self.store, "old", body_of(300 * KB, "old"))
        writer = self.store.writer("new")
        self.assertTrue(writer.reserve(200 * KB))
        # Room for the new body was made before a byte of it arrived.
        self.assertIsNone(self.store.peek("old"))
        self.assertEqual(self.store.stats().bytes_downloading, 200 * KB)
        other = self.store.writer("other")
        self.assertFalse(other.reserve(250 * KB))
        self.assertTrue(other.reserve(150 * KB))
        self.assertRaises(store_module.NoRoom, other.write, body_of(210 * KB, "o"))
        other.abort()
        writer.write(body_of(200 * KB, "new"))
        self.assertIsNotNone(writer.commit({}))
        self.assertEqual(self.store.reserved, 0)
        self.assert_consistent(self.store)

    def test_max_object_size(self) -> None:
        self.store.max_object_size = 100 * KB
        self.assertTrue(self.store.fits(100 * KB))
        self.assertFalse(self.store.fits(100 * KB + 1))
        writer = self.store.writer("big")
        self.assertFalse(writer.reserve(101 * KB))
        self.assertEqual(self.store.reserved, 0)
        writer.write(body_of(100 * KB, "b"))
        self.assertRaises(store_module.NoRoom, writer.write, b"x")
        writer.abort()
        self.assertEqual(self.store.reserved, 0)

    def test_reserve_without_evicting(self) -> None:
        self.put(self.store, "old", body_of(300 * KB, "old"))
        writer = self.store.writer("new")
        writer.evicts = False
        # Only room already free: the stored entry stays.
        self.assertFalse(writer.reserve(200 * KB))
        self.assertTrue(writer.reserve(90 * KB))
        self.assertIsNotNone(self.store.peek("old"))
        self.assertEqual(self.evictions(self.store), 0)
        writer.abort()
        self.assertEqual(self.store.reserved, 0)

    def test_reserve_keeps_the_entry_it_replaces(self) -> None:
        self.put(self.store, "k", body_of(300 * KB, "old"))
        self.put(self.store, "other", body_of(50 * KB, "other"))
        writer = self.store.writer("k")
        self.assertTrue(writer.reserve(300 * KB))
        # The other entry made way; k's current copy stays until replaced.
        self.assertIsNotNone(self.store.peek("k"))
        self.assertIsNone(self.store.peek("other"))
        writer.write(body_of(300 * KB, "new"))
        entry = writer.commit({})
        assert entry is not None
        self.assertEqual(self.store.stats().entries, 1)
        self.assertEqual(self.store.reserved, 0)
        self.assert_consistent(self.store)

    def test_index_error_while_reserving_holds_nothing(self) -> None:
        self.put(self.store, "old", body_of(300 * KB, "old"))

        def locked(store: Store, victims: object) -> None:
            raise sqlite3.OperationalError("database is locked")

        self.patch(Store, "_delete_rows", locked)
        writer = self.store.writer("new")
        with capturedLogs() as events:
            self.assertFalse(writer.reserve(200 * KB))
        self.assertEqual((self.store.reserved, writer.reserved), (0, 0))
        self.assertEqual(
            [e["error"] for e in events if e.get("event") == "reserve_failed"],
            ["database is locked"],
        )
        writer.abort()

    def test_uncounted_room_is_bounded_in_total(self) -> None:
        """
        Bodies held outside the limit hold room against
        uncounted_limit(), together: past it, NoRoom.
        """
        self.patch(objects, "UNCOUNTED_LIMIT", 300 * KB)
        first = self.store.writer("a")
        second = self.store.writer("b")
        self.assertFalse(first.reserve(500 * KB))
        self.assertTrue(first.uncount())
        self.assertTrue(first.reserve(200 * KB))
        self.assertEqual((self.store.uncounted, self.store.reserved), (200 * KB, 0))
        self.assertTrue(second.uncount())
        second.write(body_of(100 * KB, "b"))
        self.assertRaises(store_module.NoRoom, second.write, b"x")
        first.abort()
        second.write(b"x")
        second.abort()
        self.assertEqual(self.store.uncounted, 0)


def make_version_1_cache(
    directory: str, rows: Mapping[str, bytes | tuple[bytes, str]] | None = None
) -> None:
    """
    A cache directory as buildcache wrote it before the hardening issue:
    index schema version 1, with ``rows`` (key to body, or to body and
    headers JSON).
    """
    for prefix in range(256):
        os.makedirs(os.path.join(directory, "objects", f"{prefix:02x}"), exist_ok=True)
    os.makedirs(os.path.join(directory, "tmp"), exist_ok=True)
    db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
    try:
        db.executescript(
            "BEGIN;" + schema._SCHEMA
            + f"PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = 1; COMMIT;"
        )
    finally:
        db.close()
    for key, row in (rows or {}).items():
        body, headers = row if isinstance(row, tuple) else (row, "{}")
        write_version_1_entry(directory, key, body, headers)


def write_version_1_entry(
    directory: str, key: str, body: bytes, headers: str = "{}"
) -> None:
    """
    Store ``body`` under ``key`` in a version-1 cache as the code of that
    version did: the file, then its row.
    """
    name = object_name(key)
    with open(os.path.join(directory, "objects", name[:2], name), "wb") as f:
        f.write(body)
    db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
    try:
        with db:
            db.execute(
                "INSERT INTO entries (key, file, size, headers, sha256, fetched_at,"
                " validated_at, last_access) VALUES (?, ?, ?, ?, ?, 1, 1, 1)",
                (key, name, len(body), headers, hashlib.sha256(body).hexdigest()),
            )
    finally:
        db.close()


class MetadataMigrationTests(StoreTestMixin, SynchronousTestCase):
    """
    An index from before rows had a metadata size is migrated: every row
    gets its size, rows with more headers than allowed are dropped.
    """

    def test_version_1_index_migrated_and_served(self) -> None:
        directory = self.make_directory()
        # The code before this step kept headers of any size.
        make_version_1_cache(directory, {
            "small": (b"body", json.dumps({"etag": '"1"'})),
            "bloated": (b"", json.dumps({"etag": "z" * 70 * KB})),
        })
        with capturedLogs() as events:
            store = self.open_store(directory)
        steps = [e for e in events if e.get("step") == "metadata size"]
        step = [m.name for m in CURRENT].index("metadata size") + 1
        self.assertEqual(
            [(e["old"], e["new"], e["dropped"]) for e in steps], [(step, step + 1, 1)]
        )
        stored = store.lookup("http://small")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(read_all(stored.fd), b"body")
        self.assertEqual(
            stored.entry.meta_size,
            store_module.metadata_size("http://small", json.dumps({"etag": '"1"'})),
        )
        self.assertIsNone(store.peek("http://bloated"))
        self.assertEqual(
            store.stats().bytes_stored, 4 + stored.entry.meta_size
        )
