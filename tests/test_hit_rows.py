"""
The row cache's answers on a hit (issue 16): one copy of a row with its
pending access time serves both look-ups of a hit, and never outlives a
newer access.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

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
