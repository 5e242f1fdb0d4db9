"""
The test store itself (:mod:`tests.seaweed_parts`): it starts, makes
buckets, keeps objects across a restart, and ends by its PID.
"""

from __future__ import annotations

import os
import socket

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

    async def test_port_taken_while_stopped(self) -> None:
        """
        A port of the store taken by someone else while it was stopped (a
        parallel test's connection, say): it starts again on other ports
        rather than fail the test.
        """
        await self.store.kill()
        old = self.store.ports["s3.port"]
        taken = socket.socket()
        self.addCleanup(taken.close)
        # Its connections may linger in TIME_WAIT.
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", old))
        taken.listen()
        await self.store.start()
        self.assertNotEqual(self.store.ports["s3.port"], old)
        bucket = self.bucket()
        self.store.put_object(bucket, "k", b"v")
        self.assertEqual(self.store.get_object(bucket, "k"), b"v")
