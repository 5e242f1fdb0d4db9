"""
A cheaper miss (issue 16): rows of new bodies committed together
(:mod:`buildcache.store.batch`).  Rows wait in the index's open
transaction for ``commit_delay``; this process sees them at once, another
connection only once they are committed; a crash before the commit loses
the rows and leaves no orphan file once the store is reopened; any other
write commits them first; a commit the index refuses rolls back to the
store as it was.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.store import COMMIT_DELAY, INDEX_NAME, Store
from buildcache.store.batch import COMMIT_MOST

MB = 1024 * 1024


def files_in(directory: str) -> list[str]:
    return sorted(
        name for _, _, names in os.walk(directory) for name in names
    )


class BatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.directory = os.path.abspath(self.mktemp())
        self.store = Store.open(
            self.directory, 64 * MB, self.clock, commit_delay=COMMIT_DELAY
        )
        self.addCleanup(self.store.close)
        # Another process's view of the index (a read-only worker's).
        self.other = sqlite3.connect(os.path.join(self.directory, INDEX_NAME))
        self.addCleanup(self.other.close)

    def keys_others_see(self) -> list[str]:
        return sorted(row[0] for row in self.other.execute("SELECT key FROM entries"))

    def store_body(self, key: str, body: bytes) -> Any:
        writer = self.store.writer(key)
        writer.write(body)
        return writer.commit(
            {"etag": '"1"'}, expected_sha256=hashlib.sha256(body).hexdigest()
        )

    def assert_consistent(self) -> None:
        rows = {e.key: e for e in self.store.keys()}
        on_disk = files_in(os.path.join(self.directory, "objects"))
        self.assertEqual(on_disk, sorted(e.file for e in rows.values()))
        self.assertEqual(self.store.entry_count, len(rows))
        self.assertEqual(self.store.total_size, sum(e.size for e in rows.values()))

    def test_rows_committed_together(self) -> None:
        for n in range(3):
            self.store_body(f"k{n}", bytes([n]) * 1000)
        # Seen here at once (lookups share the transaction) ...
        for n in range(3):
            stored = self.store.lookup(f"k{n}")
            assert stored is not None
            self.assertEqual(os.pread(stored.fd, 2000, 0), bytes([n]) * 1000)
            stored.close()
        # ... by another connection only once committed, all together.
        self.assertEqual(self.keys_others_see(), [])
        self.clock.advance(COMMIT_DELAY)
        self.assertEqual(self.keys_others_see(), ["k0", "k1", "k2"])
        self.assert_consistent()

    def test_full_batch_committed_at_once(self) -> None:
        for n in range(COMMIT_MOST):
            self.store_body(f"k{n}", b"x")
        self.assertEqual(len(self.keys_others_see()), COMMIT_MOST)

    def test_a_new_version_is_committed_at_once(self) -> None:
        """
        A row that replaces a stored entry (an index that changed) is
        committed at once, with the batch waiting: hit workers, which see
        only committed rows, would serve the old version meanwhile.  The
        replaced file goes with that commit.
        """
        first = self.store_body("k", b"one")
        self.store_body("n", b"new key")
        self.assertEqual(self.keys_others_see(), [])
        self.clock.advance(COMMIT_DELAY)
        self.store_body("m", b"waits")
        second = self.store_body("k", b"two")
        self.assertEqual(self.keys_others_see(), ["k", "m", "n"])
        objects = os.path.join(self.directory, "objects")
        self.assertNotIn(first.file, files_in(objects))
        self.assertIn(second.file, files_in(objects))
        self.assertEqual(self.store.total_size, 3 + 7 + 5)
        self.assert_consistent()

    def test_other_writes_commit_first(self) -> None:
        self.store_body("a", b"a")
        self.clock.advance(COMMIT_DELAY)
        self.store_body("b", b"b")
        self.store.remove("a")
        self.assertEqual(self.keys_others_see(), ["b"])
        self.store_body("c", b"c")
        self.store.flush()
        self.assertEqual(self.keys_others_see(), ["b", "c"])
        self.store_body("d", b"d")
        entry = self.store.peek("b")
        assert entry is not None
        self.store.set_source_digest(entry, "Q1x")
        self.assertEqual(self.keys_others_see(), ["b", "c", "d"])
        self.assert_consistent()

    def test_crash_before_the_commit(self) -> None:
        """
        The process dies after its clients had the bodies and before the
        commit: the rows are gone, and so are their files once the store
        is reopened; the committed entry stays.
        """
        self.store_body("kept", b"kept")
        self.clock.advance(COMMIT_DELAY)
        self.store_body("lost1", b"lost one")
        self.store_body("lost2", b"lost two")
        self.assertEqual(len(files_in(os.path.join(self.directory, "objects"))), 3)
        # What a crash leaves: the transaction never committed, the lock
        # released by the kernel.
        self.store._db.close()
        os.close(self.store._lock_fd)
        self.store._closed = True
        reopened = Store.open(self.directory, 64 * MB, Clock())
        self.addCleanup(reopened.close)
        self.assertEqual([e.key for e in reopened.keys()], ["kept"])
        stored = reopened.lookup("kept")
        assert stored is not None
        self.assertEqual(os.pread(stored.fd, 100, 0), b"kept")
        stored.close()
        objects = files_in(os.path.join(self.directory, "objects"))
        self.assertEqual(objects, [stored.entry.file])
        self.assertEqual(os.listdir(os.path.join(self.directory, "tmp")), [])
        self.assertEqual((reopened.entry_count, reopened.total_size), (1, 4))

    def test_refused_commit_rolls_back(self) -> None:
        self.store_body("kept", b"kept")
        self.clock.advance(COMMIT_DELAY)
        self.store_body("new", b"new body")
        real = self.store._db

        class RefusingCommit:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def commit(self) -> None:
                raise sqlite3.OperationalError("database or disk is full")

        self.store._db = RefusingCommit()  # type: ignore[assignment]
        # A new version of "kept" is committed at once, with "new": refused.
        self.store_body("kept", b"replacement")
        self.store._db = real
        self.assertIsNone(self.store.peek("new"))
        kept = self.store.lookup("kept")
        assert kept is not None
        self.assertEqual(os.pread(kept.fd, 100, 0), b"kept")
        kept.close()
        self.assertEqual((self.store.entry_count, self.store.total_size), (1, 4))
        self.assert_consistent()
        self.assertEqual(self.keys_others_see(), ["kept"])

    def test_close_commits(self) -> None:
        self.store_body("a", b"a")
        self.store.close()
        self.assertEqual(self.keys_others_see(), ["a"])


class UnbatchedTests(SynchronousTestCase):
    def test_commit_delay_zero_commits_each_row(self) -> None:
        directory = os.path.abspath(self.mktemp())
        store = Store.open(directory, 64 * MB, Clock())
        self.addCleanup(store.close)
        writer = store.writer("k")
        writer.write(b"x")
        writer.commit({})
        with sqlite3.connect(os.path.join(directory, INDEX_NAME)) as other:
            self.assertEqual(other.execute("SELECT key FROM entries").fetchall(), [("k",)])
