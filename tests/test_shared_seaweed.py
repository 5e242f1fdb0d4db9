"""
The test store itself (:mod:`tests.seaweed_parts`): it starts, makes
buckets, keeps objects across a restart, and ends by its PID.
"""

from __future__ import annotations

import os

from tests.seaweed_parts import SeaweedCase


class SeaweedPartsTests(SeaweedCase):
    async def test_objects_across_restart(self) -> None:
        bucket = self.bucket()
        self.store.put_object(bucket, "a/b", b"hello")
        self.assertEqual(self.store.get_object(bucket, "a/b"), b"hello")
        self.assertEqual(self.store.list_keys(bucket, "a/"), ["a/b"])
        self.assertIsNone(self.store.get_object(bucket, "a/missing"))
        await self.store.restart()
        self.assertEqual(self.store.get_object(bucket, "a/b"), b"hello")

    async def test_killed_by_pid(self) -> None:
        pid = self.store.pid
        assert pid is not None
        await self.store.kill()
        with self.assertRaises(ProcessLookupError):
            os.kill(pid, 0)
        await self.store.start()
        self.assertNotEqual(self.store.pid, pid)
