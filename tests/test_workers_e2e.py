"""
``twistd buildcache --workers 2`` for real: the main process and one hit
worker on the same loopback ports, against an origin in this process.

The cache is warmed first by a one-process server (``--workers 1``) on
the same directory, so that what the worker is asked is a hit (until the
hand-off lands, a worker cannot answer a miss).  Which process accepts a
connection is the kernel's choice; the worker's access lines reach the
main process's log as ``[worker-1,access]``, which is how these tests
tell that the worker served a request.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from buildcache.engine.keys import cache_key
from buildcache.store import INDEX_NAME
from tests.support import Client, FakeUpstream, GatedBody, listen, pattern_bytes, url_of
from tests.test_service import ServerProcess, spawn_server

_STARTED = b"ProxySite starting on"
_WORKER = re.compile(rb"Worker 1 started \(pid (\d+)\)")
#: Requests made, at most, for the kernel to give one to the worker.
TRIES = 200

FILES = {f"/f{n}.bin": pattern_bytes(20_000, seed=b"%d" % n) for n in range(30)}


class WorkersTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        # Fresh for an hour: a stored file is a fresh hit (a worker serves
        # nothing else).
        fresh = {"cache-control": "max-age=3600"}
        self.upstream = FakeUpstream(
            bodies={p: GatedBody(d, headers=fresh) for p, d in FILES.items()}
        )
        port = listen(self.upstream)
        self.addCleanup(port.stopListening)
        self.mirror = url_of(port).rstrip("/")
        self.cache_dir = os.path.abspath(self.mktemp())
        self.client = Client()
        self.addCleanup(self.client.close)

    def arguments(self, *more: str) -> tuple[str, ...]:
        return ("--cache-dir", self.cache_dir, "--mirror", f"up={self.mirror}", *more)

    async def warm(self, paths: list[str]) -> None:
        """Store ``paths`` with a one-process server, then stop it."""
        process, port = spawn_server(self, *self.arguments("--workers", "1"))
        await process.wait_for(_STARTED)
        self.assertNotIn(b"Worker 1 started", process.output)
        for path in paths:
            received = await self.client.get(f"http://127.0.0.1:{port}/up{path}")
            self.assertEqual((received.status, received.body), (200, FILES[path]))
        await process.stop()

    async def start(self, *more: str) -> tuple[ServerProcess, int, int]:
        process, port = spawn_server(self, *self.arguments("--workers", "2", *more))
        await process.wait_for(b"Worker 1 serving")
        await process.wait_for(_STARTED)
        found = _WORKER.search(process.output)
        assert found is not None
        return process, port, int(found.group(1))

    def worker_lines(self, process: ServerProcess, path: str) -> int:
        return len(re.findall(
            rb"\[worker-1,access\] 127\.0\.0\.1 GET /up" + re.escape(path.encode()) + rb" 200 ",
            process.output,
        ))

    async def until_worker_serves(self, process: ServerProcess, port: int, paths: list[str]) -> str:
        """
        Ask for ``paths`` in turn (new connections), until the worker has
        served one; that path.  Every answer is the file, a HIT.
        """
        for n in range(TRIES):
            path = paths[n % len(paths)]
            before = self.worker_lines(process, path)
            received = await self.client.get(f"http://127.0.0.1:{port}/up{path}")
            self.assertEqual((received.status, received.body), (200, FILES[path]))
            self.assertEqual(received.header("x-cache"), "HIT")
            # The worker's access line reaches the main process's log one
            # turn after its response: wait for it or for another line.
            await deferLater(reactor, 0.05, lambda: None)
            if self.worker_lines(process, path) > before:
                return path
        self.fail(f"the worker served none of {TRIES} requests")

    async def stats(self, port: int) -> dict:
        # The status page is the main process's (a worker hands it over
        # once the hand-off lands; until then, ask until main answers).
        for _ in range(TRIES):
            received = await self.client.get(f"http://127.0.0.1:{port}/-/stats.json")
            stats = json.loads(received.body)
            if stats["workers"] is not None:
                return stats
        self.fail("the main process never answered the status page")

    async def test_worker_serves_hits_and_is_restarted(self) -> None:
        """
        The worker is another process; it serves hits; SIGKILLed, it is
        replaced by a new one and the server keeps serving; the status
        figures add up both processes and count the restart.
        """
        await self.warm(list(FILES))
        process, port, worker = await self.start()
        assert process.transport is not None
        self.assertNotEqual(worker, process.transport.pid)
        await self.until_worker_serves(process, port, list(FILES))
        stats = await self.stats(port)
        self.assertEqual(stats["workers"]["configured"], 2)
        self.assertEqual(stats["workers"]["alive"], 2)
        # Every hit, whichever process served it, is in the totals.
        served = len(re.findall(rb"\] 127\.0\.0\.1 GET /up/f\d+\.bin 200 20000 HIT", process.output))
        self.assertEqual(stats["by_status"]["HIT"], served)
        self.assertEqual(sum(self.upstream.requests.values()), len(FILES))

        os.kill(worker, signal.SIGKILL)
        await process.wait_for(b"Worker 1 (pid %d) exited (signal 9)" % worker)
        await process.wait_for(b"Restarting worker 1 in 1.0s")
        for _ in range(400):
            replaced = [int(pid) for pid in _WORKER.findall(process.output)]
            if len(replaced) == 2 and b"Worker 1 serving (pid %d)" % replaced[1] in process.output:
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("no new worker")
        self.assertNotIn(replaced[1], (worker, process.transport.pid))
        await self.until_worker_serves(process, port, list(FILES))
        stats = await self.stats(port)
        self.assertEqual(stats["workers"]["restarts"], 1)
        self.assertEqual(sum(self.upstream.requests.values()), len(FILES))

    async def test_sigterm_drains_every_process(self) -> None:
        """SIGTERM to the main process: the worker drains and exits, no orphan."""
        await self.warm(["/f0.bin"])
        process, port, worker = await self.start()
        received = await self.client.get(f"http://127.0.0.1:{port}/up/f0.bin")
        self.assertEqual(received.status, 200)
        await process.stop()
        self.assertIn(b"Worker 1 drained", process.output)
        self.assertIn(b"Worker 1 (pid %d) exited (status 0)" % worker, process.output)
        self.assertIn(b"Cache closed cleanly", process.output)
        self.assertRaises(ProcessLookupError, os.kill, worker, 0)

    async def test_worker_exits_with_its_main_process(self) -> None:
        """SIGKILL to the main process: the worker sees its channel close and exits."""
        process, port, worker = await self.start()
        assert process.transport is not None
        exited: Deferred[None] = Deferred()
        process.transport.signalProcess("KILL")
        await process.ended
        # Not our child: poll its existence (bounded) until it is gone.
        for _ in range(200):
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                exited.callback(None)
                break
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(exited.called, "the worker outlived its main process")

    async def test_worker_hits_move_access_times(self) -> None:
        """
        A hit in the worker moves the entry's access time in the main
        process's store: eviction follows it.  The files are stored
        oldest first, ``/f29.bin`` last; the one the worker serves is then
        more recent than ``/f29.bin``, which nobody asked for since.
        """
        reference = "/f29.bin"
        candidates = [p for p in FILES if p != reference]
        await self.warm([*candidates, reference])
        process, port, _ = await self.start()
        # Each candidate asked once: the one the worker served was asked
        # of no other process.
        for n, path in enumerate(candidates):
            before = self.worker_lines(process, path)
            received = await self.client.get(f"http://127.0.0.1:{port}/up{path}")
            self.assertEqual(received.status, 200)
            await deferLater(reactor, 0.05, lambda: None)
            if self.worker_lines(process, path) > before:
                served = path
                break
        else:
            self.skipTest("the kernel gave the worker none of the requests")
        await process.stop()
        with sqlite3.connect(os.path.join(self.cache_dir, INDEX_NAME)) as db:
            times = dict(db.execute("SELECT key, last_access FROM entries"))
        key = cache_key(f"{self.mirror}{served}")
        reference_key = cache_key(f"{self.mirror}{reference}")
        self.assertGreater(times[key], times[reference_key])

    async def test_cap_per_client_across_processes(self) -> None:
        """
        ``--max-connections-per-client 4`` holds for the whole server: of
        six connections open at once from one address, exactly two are
        refused with 503, whichever process accepted them.
        """
        await self.warm(["/f0.bin"])
        process, port, _ = await self.start("--max-connections-per-client", "4")
        statuses = []
        sockets = []
        for _ in range(6):
            sock = socket.create_connection(("127.0.0.1", port))
            sockets.append(sock)
            self.addCleanup(sock.close)
            sock.sendall(b"GET /up/f0.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            statuses.append(await _status_line(sock))
        self.assertEqual(sorted(statuses), [200, 200, 200, 200, 503, 503])


async def _status_line(sock: socket.socket) -> int:
    """The status of the response on ``sock`` (read in a thread)."""
    from twisted.internet.threads import deferToThread

    def read() -> int:
        sock.settimeout(30)
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        return int(head.split(b" ", 2)[1])

    return await deferToThread(read)
