"""
A cheaper miss (issue 16): temporary files made ahead come several per
blocking call (one hand-off to a thread for every two writers, not one
for each), and files made after the store closed are removed.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.store import SPARE_TEMP_FILES, Store
from buildcache.store.spare import create_temps
from tests.support import HeldRunner

MB = 1024 * 1024


class SpareBatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.runner = HeldRunner()
        self.store = Store.open(self.mktemp(), 64 * MB, Clock(), run_blocking=self.runner)
        self.temp = os.path.join(self.store.directory, "tmp")

    def tearDown(self) -> None:
        self.store.close()

    def test_calls_per_writer(self) -> None:
        writers = []
        calls = 0
        for n in range(12):
            writers.append(self.store.writer(f"k{n}"))
            calls += len(self.runner.calls)
            self.runner.run_all()
        self.assertEqual(SPARE_TEMP_FILES, 4)
        # The first call makes 4; then one call per two writers.
        self.assertEqual(calls, 6)
        for writer in writers:
            writer.abort()
        self.assertEqual(len(os.listdir(self.temp)), len(self.store._spare_temp))

    def test_made_after_close_removed(self) -> None:
        self.store.writer("a").abort()
        self.store.close()
        self.runner.run_all()
        self.assertEqual(os.listdir(self.temp), [])

    def test_partly_full_disk(self) -> None:
        made = create_temps([os.path.join(self.temp, "x"), "/nonexistent/dir/y"])
        self.assertEqual([path for path, _ in made], [os.path.join(self.temp, "x")])
        for _, fd in made:
            os.close(fd)
        self.assertRaises(OSError, create_temps, ["/nonexistent/dir/y"])
