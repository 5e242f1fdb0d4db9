"""
Tests for the read-only store (:meth:`buildcache.store.Store.open` with
``read_only=True``), the view a worker process or an offline reader has
of a cache directory while the writing store goes on beside it.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.store import INDEX_NAME, ReadOnlyStore, Store, StoreError
from tests.test_store import StoreTestMixin, as_clock, read_all

MB = 1024 * 1024


class ReadOnlyTests(StoreTestMixin, SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = self.make_directory()
        self.writer = self.open_store(self.directory)
        self.reader = self.open_read_only()

    def open_read_only(self) -> Store:
        store = Store.open(self.directory, 64 * MB, as_clock(Clock()), read_only=True)
        self.addCleanup(store.close)
        return store

    def test_beside_the_writer_without_its_lock(self) -> None:
        """
        A read-only store opens while the writing store holds the lock
        (taking it would fail), and holds none itself: a writing store
        opens beside it once the first has closed.
        """
        self.assertTrue(self.reader.read_only)
        self.close_store(self.writer)
        again = self.open_store(self.directory)
        self.assertFalse(again.read_only)

    def test_sees_what_the_writer_commits(self) -> None:
        self.assertIsNone(self.reader.peek("k"))
        self.put(self.writer, "k", b"first", {"etag": "1"})
        entry = self.reader.peek("k")
        assert entry is not None
        self.assertEqual(dict(entry.headers), {"etag": "1"})
        stored = self.reader.lookup("k")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(read_all(stored.fd), b"first")
        # A new version replaces the one it read, and a removal shows.
        self.put(self.writer, "k", b"second", {"etag": "2"})
        again = self.reader.lookup("k")
        assert again is not None
        self.addCleanup(again.close)
        self.assertEqual(read_all(again.fd), b"second")
        self.assertEqual(self.reader.peek_many(["k", "x"]).keys(), {"k"})
        self.assertEqual([e.key for e in self.reader.entries_under("k")], ["k"])
        self.assertEqual(self.reader.stats().entries, 1)
        self.writer.remove("k")
        self.assertIsNone(self.reader.peek("k"))
        self.assertIsNone(self.reader.lookup("k"))
        self.assertEqual(self.reader.stats().entries, 0)

    def test_leaves_writes_in_progress_alone(self) -> None:
        """
        Opening a read-only store neither empties ``tmp/`` nor reconciles:
        a body being written stays, and is published afterwards.
        """
        writing = self.writer.writer("k")
        writing.write(b"half of it")
        another = self.open_read_only()
        self.assertTrue(os.path.exists(writing.path))
        writing.write(b", and the rest")
        writing.commit({})
        stored = another.lookup("k")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(read_all(stored.fd), b"half of it, and the rest")

    def test_missing_file_left_to_the_writer(self) -> None:
        """
        A row whose file is gone is not a hit, and the read-only store
        leaves the row for the writing store to drop.
        """
        self.put(self.writer, "k", b"body")
        path = self.writer.object_path("k")
        assert path is not None
        os.unlink(path)
        self.assertIsNone(self.reader.lookup("k"))
        self.assertIn("k", self.db_rows(self.writer))

    def test_writes_refused(self) -> None:
        entry = self.put(self.writer, "k", b"body")
        writes = [
            lambda: self.reader.writer("new"),
            lambda: self.reader.reserve(10),
            lambda: self.reader.mark_validated("k", {"etag": "2"}),
            lambda: self.reader.remove("k"),
            lambda: self.reader.remove_entry(entry),
            lambda: self.reader.rename_entry(entry, "other"),
            lambda: self.reader.set_source_digest(entry, "Q1abc"),
        ]
        for write in writes:
            error = self.assertRaises(ReadOnlyStore, write)
            self.assertIn("read-only", str(error))
        self.assertIsInstance(ReadOnlyStore("x"), StoreError)
        # SQLite refuses too: the index is open read-only underneath.
        self.assertRaises(
            sqlite3.OperationalError,
            self.reader._db.execute, "DELETE FROM entries",
        )
        self.assertEqual(self.writer.peek("k"), entry)

    def test_accesses_handed_to_the_writer(self) -> None:
        """
        A read-only store writes no access times (its flush writes
        nothing); it hands them over with ``take_accesses``, and the
        writing store's ``record_accesses`` makes eviction follow them.
        """
        clock = Clock()
        self.writer.clock = as_clock(clock)
        self.reader.clock = as_clock(clock)
        self.writer.set_max_size(MB)
        half = b"x" * (MB // 2 - 4096)
        clock.advance(1)
        self.put(self.writer, "old", half)
        clock.advance(1)
        self.put(self.writer, "new", half)
        before = self.db_rows(self.writer)["old"]
        clock.advance(1)
        stored = self.reader.lookup("old")
        assert stored is not None
        stored.close()
        self.reader.flush()
        self.assertEqual(self.db_rows(self.writer)["old"], before)
        accesses = self.reader.take_accesses()
        self.assertEqual(accesses, {"old": 3})
        self.assertEqual(self.reader.take_accesses(), {})
        self.assertRaises(ReadOnlyStore, self.reader.record_accesses, accesses)
        self.writer.record_accesses(accesses)
        # "new" is now the least recently used, and makes room.
        clock.advance(1)
        self.put(self.writer, "newest", half)
        self.assertEqual(
            {entry.key for entry in self.writer.keys()}, {"old", "newest"}
        )


class ReadOnlyOpenTests(StoreTestMixin, SynchronousTestCase):
    def test_nothing_created(self) -> None:
        """
        A read-only store of a directory no writing store has made is
        refused, and leaves nothing behind.
        """
        directory = self.make_directory()
        error = self.assertRaises(
            StoreError, Store.open, directory, MB, as_clock(Clock()), read_only=True
        )
        self.assertIn("secret", str(error))
        self.assertEqual(os.listdir(directory), [])

    def test_no_reconciling(self) -> None:
        """
        Files without rows stay: removing them is the writing store's job.
        """
        directory = self.make_directory()
        self.close_store(self.open_store(directory))
        stray = os.path.join(directory, "objects", "ab", "stray")
        with open(stray, "wb") as f:
            f.write(b"x")
        in_tmp = os.path.join(directory, "tmp", "1-1.part")
        with open(in_tmp, "wb") as f:
            f.write(b"y")
        store = Store.open(directory, MB, as_clock(Clock()), read_only=True)
        self.addCleanup(store.close)
        self.assertTrue(os.path.exists(stray))
        self.assertTrue(os.path.exists(in_tmp))

    def test_older_schema_refused(self) -> None:
        """
        An index of an older schema is refused, not migrated: migrating is
        the writing store's job.
        """
        directory = self.make_directory()
        self.close_store(self.open_store(directory))
        db = sqlite3.connect(os.path.join(directory, INDEX_NAME))
        db.execute("PRAGMA user_version = 1")
        db.commit()
        db.close()
        error = self.assertRaises(
            StoreError, Store.open, directory, MB, as_clock(Clock()), read_only=True
        )
        self.assertIn("schema version 1", str(error))
