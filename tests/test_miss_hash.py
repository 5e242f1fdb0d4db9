"""
A cheaper miss (issue 16): a store with a threaded ``run_blocking`` hashes
the bodies being written beside the reactor (:class:`BackgroundHashes`),
in order, and a writer's digest is whole whenever it is asked for.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.store import BackgroundHashes, Store, objects, run_here
from tests.support import HeldRunner

MB = 1024 * 1024


class RecordingHash:
    """A sha256 that notes which thread fed it."""

    def __init__(self) -> None:
        self.inner = hashlib.sha256()
        self.threads: list[str] = []

    def update(self, data: bytes) -> None:
        self.threads.append(threading.current_thread().name)
        self.inner.update(data)

    def copy(self) -> Any:
        return self.inner.copy()

    def hexdigest(self) -> str:
        return self.inner.hexdigest()


class BackgroundHashTests(SynchronousTestCase):
    def open(self, run_blocking: Any) -> Store:
        store = Store.open(self.mktemp(), 64 * MB, Clock(), run_blocking=run_blocking)
        self.addCleanup(store.close)
        return store

    def test_hashed_in_its_thread_and_whole_when_asked(self) -> None:
        store = self.open(HeldRunner())
        self.assertIsInstance(store.hashes, BackgroundHashes)
        writer = store.writer("k")
        recording = RecordingHash()
        writer._hash = objects.DigestBeside(recording, store.hashes)
        chunks = [bytes([n]) * (300_000 + n) for n in range(5)]
        for chunk in chunks:
            writer.write(chunk)
        self.assertEqual(writer.sha256, hashlib.sha256(b"".join(chunks)).hexdigest())
        self.assertEqual(recording.threads, ["buildcache-hash"] * 5)
        # A copy taken part-way (a disk that fails: the body goes on in
        # memory) holds every byte written before it.
        writer.write(b"tail")
        state = writer.hash_state()
        self.assertEqual(
            state.hexdigest(), hashlib.sha256(b"".join(chunks) + b"tail").hexdigest()
        )
        writer.abort()

    def test_several_writers_interleaved(self) -> None:
        store = self.open(HeldRunner())
        writers = [store.writer(f"k{n}") for n in range(3)]
        bodies: list[list[bytes]] = [[], [], []]
        for round_ in range(4):
            for n, writer in enumerate(writers):
                # Large and small, so some go through the thread.
                chunk = bytes([round_ * 3 + n]) * (70_000 if n else 270_000)
                writer.write(chunk)
                bodies[n].append(chunk)
        for writer, body in zip(writers, bodies):
            self.assertEqual(writer.sha256, hashlib.sha256(b"".join(body)).hexdigest())
            writer.abort()

    def test_small_chunks_hashed_in_the_writer(self) -> None:
        """
        A chunk under HASH_BESIDE_FROM is hashed at once, in the writer,
        unless a larger one before it is still queued (order is kept).
        """
        store = self.open(HeldRunner())
        writer = store.writer("k")
        recording = RecordingHash()
        writer._hash = objects.DigestBeside(recording, store.hashes)
        writer.write(b"a" * 1000)
        self.assertEqual(recording.threads, [threading.current_thread().name])
        writer.write(b"b" * 300_000)
        writer.write(b"c" * 1000)
        self.assertEqual(
            writer.sha256,
            hashlib.sha256(b"a" * 1000 + b"b" * 300_000 + b"c" * 1000).hexdigest(),
        )
        self.assertEqual(recording.threads[1], "buildcache-hash")
        writer.abort()

    def test_bytes_waiting_are_bounded(self) -> None:
        """
        With the hash thread stalled, a writer holds at most
        HASH_QUEUE_MOST bytes in its queue: past that it waits for its own
        and hashes the chunk itself; the digest stays right.
        """
        store = self.open(HeldRunner())
        hashes = store.hashes
        assert hashes is not None
        stalled = threading.Event()
        release = threading.Event()

        class Stalling:
            def update(self, data: bytes) -> None:
                stalled.set()
                release.wait(10)

        # The thread takes the stalling update first and waits there.
        hashes.update(Stalling(), b"")
        stalled.wait(10)
        writer = store.writer("k")
        recording = RecordingHash()
        writer._hash = objects.DigestBeside(recording, store.hashes)
        chunk = b"z" * (1024 * 1024)
        peak = 0
        real_wait = hashes.wait
        waited: list[int] = []

        def releasing_wait(ticket: int) -> None:
            # The writer is past the bound and waits: let the thread go.
            waited.append(hashes.waiting_bytes)
            release.set()
            real_wait(ticket)

        hashes.wait = releasing_wait  # type: ignore[method-assign]
        for _ in range(12):
            writer.write(chunk)
            peak = max(peak, hashes.waiting_bytes)
        self.assertLessEqual(peak, objects.HASH_QUEUE_MOST)
        # It waited once the next chunk would have passed the bound.
        self.assertGreater(waited[0] + len(chunk), objects.HASH_QUEUE_MOST)
        self.assertIn(threading.current_thread().name, recording.threads)
        self.assertEqual(writer.sha256, hashlib.sha256(chunk * 12).hexdigest())
        writer.abort()

    def test_run_here_hashes_in_the_writer(self) -> None:
        store = self.open(run_here)
        self.assertIsNone(store.hashes)
        writer = store.writer("k")
        recording = RecordingHash()
        writer._hash = objects.DigestBeside(recording, store.hashes)
        writer.write(b"abc")
        self.assertEqual(recording.threads, [threading.current_thread().name])
        writer.abort()

    def test_close_ends_the_thread(self) -> None:
        store = Store.open(self.mktemp(), 64 * MB, Clock(), run_blocking=HeldRunner())
        writer = store.writer("k")
        writer.write(b"x" * 300_000)
        hashes = store.hashes
        assert hashes is not None
        thread = hashes._thread
        assert thread is not None
        writer.abort()
        store.close()
        self.assertFalse(thread.is_alive())
