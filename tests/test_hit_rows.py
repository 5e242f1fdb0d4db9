"""
The row cache's answers on a hit (issue 16): one copy of a row with its
pending access time serves both look-ups of a hit, and never outlives a
newer access.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.engine import respond
from buildcache.store.reader import ROWS_BYTES_KEPT, ROWS_KEPT
from tests.test_store import StoreTestMixin


class PendingAccessTests(StoreTestMixin, SynchronousTestCase):
    def test_peek_and_lookup_see_each_access(self) -> None:
        """
        ``peek`` and ``lookup`` give the access time last recorded, before
        and after each new hit, and the same copy while it holds.
        """
        clock = Clock()
        store = self.open_store(self.make_directory(), clock=clock)
        self.put(store, "k", b"body")
        clock.advance(10)
        opened = store.lookup("k")
        assert opened is not None
        opened.close()
        first, second = store.peek("k"), store.peek("k")
        assert first is not None
        self.assertEqual(first.last_access, 10)
        self.assertIs(first, second)
        clock.advance(5)
        again = store.lookup("k")
        assert again is not None
        self.assertEqual(again.entry.last_access, 10)
        self.assertEqual(os.pread(again.fd, 4, 0), b"body")
        again.close()
        latest = store.peek("k")
        assert latest is not None
        self.assertEqual(latest.last_access, 15)
        self.assertEqual(store.peek("other"), None)

    def test_hit_opens_the_file_the_row_names(self) -> None:
        """
        The body a hit opens is the one at :func:`file_path` of its row,
        whatever way the store's directory was written.
        """
        from buildcache.store.layout import file_path

        for directory in (self.make_directory(), self.make_directory() + "/"):
            store = self.open_store(directory)
            entry = self.put(store, "k", b"body")
            opened = store.lookup("k")
            assert opened is not None
            self.addCleanup(opened.close)
            self.assertEqual(
                os.fstat(opened.fd).st_ino,
                os.stat(file_path(directory, entry.file)).st_ino,
            )



class SharedBoundsTests(StoreTestMixin, SynchronousTestCase):
    def test_row_cache_shared_out_among_the_processes(self) -> None:
        """
        ``--workers N``: each process keeps its share of the row cache's
        bounds, so the server holds at most ROWS_KEPT rows and
        ROWS_BYTES_KEPT bytes of them in all (it held N times that).
        """
        store = self.open_store(self.make_directory())
        store.share_row_cache(4)
        self.assertEqual(
            (store.rows_kept * 4, store.rows_bytes_kept * 4),
            (ROWS_KEPT, ROWS_BYTES_KEPT),
        )
        for n in range(store.rows_kept + 2):
            self.put(store, f"k{n}", b"x", {"etag": str(n)})
            found = store.lookup(f"k{n}")
            assert found is not None
            found.close()
            self.assertLessEqual(len(store._rows), store.rows_kept)

    def test_header_blocks_bounded_in_bytes(self) -> None:
        """
        An entry may store 64 KiB of headers: the precomputed header
        blocks are bounded in bytes, not only in count.
        """
        self.addCleanup(respond._BLOCKS.clear)
        kept = []
        for n in range(200):
            headers = {"etag": str(n), "content-type": "text/plain", "location": "v" * 60_000}
            kept.append(headers)
            respond._stored_block(headers)
            self.assertLessEqual(respond._blocks_bytes[0], respond.BLOCKS_BYTES_KEPT)
        self.assertGreater(respond._blocks_bytes[0], 60_000)
