"""
Review of ``--workers N`` (issue 16): failing tests for the defects found.

Each test runs a real ``twistd buildcache --workers 2`` on loopback ports
against an origin in this process (as tests/test_workers_e2e.py does).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase as SyncTestCase
from twisted.trial.unittest import TestCase

from buildcache.store import INDEX_NAME, Store
from buildcache.workers.control import MAX_MESSAGE, LogForwarder, MainLink
from tests.apkrepo import (
    RepositoryResource,
    build_apk,
    build_apkindex,
    listen_on_loopback,
    write_repository,
)
from tests.support import FakeUpstream, GatedBody, listen, pattern_bytes, url_of
from tests.test_service import ServerProcess, spawn_server
from tests.test_store import StoreTestMixin, as_clock

_WORKER = re.compile(rb"Worker 1 started \(pid (\d+)\)")
FILES = {f"/m{n}.bin": pattern_bytes(5_000, seed=b"m%d" % n) for n in range(16)}
LARGE = pattern_bytes(24 * 1024 * 1024, seed=b"large")


def _request(sock: socket.socket, path: str, extra: str = "") -> tuple[int, bytes, bytes]:
    """Send one GET on ``sock``, read its whole response: status, head, body."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed mid-head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    length = int(found.group(1)) if found else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), head, body


_HOSTS = (f"127.0.{a}.{b}" for a in range(1, 250) for b in range(2, 250))


async def worker_connection(
    testcase: TestCase, process: ServerProcess, port: int, hit_path: str,
    small_window: bool = False,
) -> socket.socket:
    """
    A keep-alive connection the worker accepted: each try connects from
    another loopback address (127.0.0.N, so its access line is told
    apart) and asks ``hit_path`` (a fresh stored entry, which a worker
    answers itself), until the worker's log line shows for it.
    """
    for _ in range(120):
        # Never an address used before by this test process: its access
        # line must be this connection's.
        host = next(_HOSTS)
        sock = socket.socket()
        if small_window:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.bind((host, 0))
        sock.connect(("127.0.0.1", port))
        testcase.addCleanup(sock.close)
        status, head, _ = await deferToThread(_request, sock, hit_path)
        assert status == 200 and b"HIT" in head, head
        marker = f"] {host} GET {hit_path} 200".encode()
        await process.wait_for(marker)
        if f"[worker-1,access{marker.decode()}".encode() in process.output:
            return sock
        sock.close()
    raise AssertionError("the worker accepted none of the connections")


def committed_sha256(cache_dir: str, path: str) -> str | None:
    """
    The sha256 of the row committed for the URL ending with ``path``, as
    a hit worker reads the index (rows of new bodies are committed in
    batches); None without one.
    """
    index = os.path.join(cache_dir, INDEX_NAME)
    with contextlib.closing(sqlite3.connect(f"file:{index}?mode=ro", uri=True)) as db:
        found = db.execute(
            "SELECT sha256 FROM entries WHERE key LIKE ?", ("%" + path,)
        ).fetchone()
    return None if found is None else str(found[0])


async def until_committed(cache_dir: str, path: str, other_than: str | None = None) -> None:
    """Until the row committed for ``path`` is there, and not ``other_than``'s."""
    for _ in range(200):
        if committed_sha256(cache_dir, path) not in (None, other_than):
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"no new committed row for {path}")


class _TwoProcesses(TestCase):
    timeout = 120

    def setUp(self) -> None:
        fresh = {"cache-control": "max-age=3600"}
        self.upstream = FakeUpstream(
            bodies={p: GatedBody(d, headers=fresh) for p, d in FILES.items()}
        )
        self.upstream.bodies["/large.bin"] = GatedBody(LARGE, headers=fresh)
        port = listen(self.upstream)
        self.addCleanup(port.stopListening)
        self.mirror = url_of(port).rstrip("/")
        self.cache_dir = os.path.abspath(self.mktemp())

    async def start(self, *more: str) -> tuple[ServerProcess, int, int]:
        process, port = spawn_server(
            self, "--cache-dir", self.cache_dir, "--mirror", f"up={self.mirror}",
            "--workers", "2", *more,
        )
        await process.wait_for(b"Worker 1 serving")
        await process.wait_for(b"ProxySite starting on")
        found = _WORKER.search(process.output)
        assert found is not None
        return process, port, int(found.group(1))

    async def stored(self, port: int, path: str) -> None:
        """
        ``path`` asked once on a connection kept open until the test ends,
        and its row committed: a hit in the worker too.
        """
        connection = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(connection.close)
        status, _, _ = await deferToThread(_request, connection, path)
        self.assertEqual(status, 200)
        await until_committed(self.cache_dir, path[len("/up"):])


class ReviewTests(_TwoProcesses):
    async def test_sigterm_with_idle_relayed_keepalive_drains_worker(self) -> None:
        """
        Clients that had a miss answered through the worker (handed off,
        relayed) and keep their connection open idle, as apt and pip do:
        SIGTERM must drain the worker (exit status 0), not wait the whole
        grace and SIGKILL it.  The worker waits for its relays, which the
        main process only drains after its pool has stopped.
        """
        process, port, worker = await self.start()
        await self.stored(port, "/up/m0.bin")
        # A connection the worker holds; a miss on it is handed off and
        # answered by the main process; the connection then stays idle.
        sock = await worker_connection(self, process, port, "/up/m0.bin")
        status, _, body = await deferToThread(_request, sock, "/up/m1.bin")
        self.assertEqual((status, body), (200, FILES["/m1.bin"]))
        await process.stop()
        output = bytes(process.output)
        self.assertNotIn(b"worker_killed", output)
        self.assertNotIn(b"did not drain", output)
        self.assertIn(b"Worker 1 (pid %d) exited (status 0)" % worker, output)


_ARCH = "/alpine/v3.20/main/x86_64"
_OLD = 1_600_000_000.0


class ApkReviewTests(TestCase):
    timeout = 120

    async def test_worker_serves_package_its_new_index_disowns(self) -> None:
        """
        A package rebuilt under the same name (new bytes, new APKINDEX
        entry): once ``apk update`` has brought the new index (through the
        main process), the next ``apk add`` must get the new build, as
        with one process (tests/test_rebuilds.py).  A worker holds no
        APKINDEX and the main process drops disowned packages only in its
        own ``before_lookup``: the worker serves the old build as a HIT,
        which apk then refuses (checksum mismatch).
        """
        first = build_apk("hello", "1.0-r0", data_size_pad=2_000, pad_seed=1)
        rebuilt = build_apk("hello", "1.0-r0", data_size_pad=3_000, pad_seed=2)
        other = build_apk("world", "2.0-r0", data_size_pad=1_000, pad_seed=3)
        root = self.mktemp()
        write_repository(f"{root}/alpine/v3.20/main", [first, other], mtime=_OLD)
        origin_port, origin = listen_on_loopback(reactor, RepositoryResource(root))  # type: ignore[arg-type]
        self.addCleanup(origin_port.stopListening)
        cache_dir = os.path.abspath(self.mktemp())
        process, port = spawn_server(
            self, "--cache-dir", cache_dir,
            "--mirror", f"up={origin}", "--workers", "2",
        )
        await process.wait_for(b"Worker 1 serving")
        await process.wait_for(b"ProxySite starting on")
        main = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(main.close)
        index, hello, world = (
            f"/up{_ARCH}/APKINDEX.tar.gz", f"/up{_ARCH}/{first.filename}",
            f"/up{_ARCH}/{other.filename}",
        )
        for path, body in ((index, None), (hello, first.content), (world, other.content)):
            status, _, got = await deferToThread(_request, main, path)
            self.assertEqual(status, 200)
            if body is not None:
                self.assertEqual(got, body)
        # Rows of new bodies reach a worker once committed (<= 50 ms).
        await until_committed(cache_dir, world[len('/up'):])
        old_index = committed_sha256(cache_dir, 'APKINDEX.tar.gz')
        in_worker = await worker_connection(self, process, port, world)
        # The rebuild upstream, and `apk update` (whichever process: a
        # no-cache request is handed to the main process).
        write_repository(f"{root}/alpine/v3.20/main", [rebuilt, other], mtime=_OLD + 100)
        self.assertEqual(rebuilt.filename, first.filename)
        status, _, got = await deferToThread(_request, main, index, "Cache-Control: no-cache\r\n")
        self.assertEqual((status, got), (200, build_apkindex([rebuilt, other])))
        # The index's new version is committed at once; the worker then
        # hands the package off until the main process has checked it.
        await until_committed(cache_dir, 'APKINDEX.tar.gz', other_than=old_index)
        status, head, got = await deferToThread(_request, in_worker, hello)
        self.assertEqual(status, 200)
        self.assertTrue(got == rebuilt.content, f"old build served: {head!r}")


class FiguresReviewTests(_TwoProcesses):
    async def stats(self, port: int) -> dict:
        sock = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(sock.close)
        status, _, body = await deferToThread(_request, sock, "/-/stats.json")
        self.assertEqual(status, 200)
        sock.close()
        return json.loads(body)

    async def test_totals_never_go_back_when_a_worker_restarts(self) -> None:
        """
        The status page's and ``/-/metrics``' counts are totals since the
        server started (Prometheus counters): a worker killed and
        restarted must not take its hits out of them.  The pool adds up
        only the live workers' own counters, so the worker's hits vanish
        (a counter going backwards reads as a reset to Prometheus).
        """
        process, port, worker = await self.start()
        path = "/up/m0.bin"
        await self.stored(port, path)
        await worker_connection(self, process, port, path)
        before = await self.stats(port)
        self.assertEqual(before["workers"]["answered"], 2)
        os.kill(worker, signal.SIGKILL)
        await process.wait_for(b"Worker 1 (pid %d) exited (signal 9)" % worker)
        for _ in range(400):
            pids = [int(pid) for pid in _WORKER.findall(process.output)]
            if len(pids) == 2 and b"Worker 1 serving (pid %d)" % pids[1] in process.output:
                break
            await deferLater(reactor, 0.05, lambda: None)
        after = await self.stats(port)
        self.assertEqual(after["workers"]["answered"], 2)
        self.assertGreaterEqual(after["by_status"]["HIT"], before["by_status"]["HIT"])
        self.assertGreaterEqual(after["requests"], before["requests"])

    async def test_request_counts_add_up_across_processes(self) -> None:
        """
        Requests split over both processes (new connections each, so the
        kernel spreads them): the totals count each exactly once.
        """
        process, port, _ = await self.start()
        first = await self.stats(port)
        second = await self.stats(port)
        per_page = second["requests"] - first["requests"]
        paths = [f"/up{path}" for path in FILES]
        for path in paths:
            sock = socket.create_connection(("127.0.0.1", port))
            status, _, _ = await deferToThread(_request, sock, path)
            sock.close()
            self.assertEqual(status, 200)
        for path in paths:
            await until_committed(self.cache_dir, path[len('/up'):])
        for path in paths:
            sock = socket.create_connection(("127.0.0.1", port))
            status, head, _ = await deferToThread(_request, sock, path)
            sock.close()
            self.assertIn(b"X-Cache: HIT", head)
        after = await self.stats(port)
        self.assertEqual(after["workers"]["answered"], 2)
        self.assertEqual(after["requests"] - second["requests"], 2 * len(paths) + per_page)
        self.assertEqual(after["by_status"].get("HIT", 0) - second["by_status"].get("HIT", 0), len(paths))
        self.assertEqual(after["by_status"].get("MISS", 0) - second["by_status"].get("MISS", 0), len(paths))
        self.assertIn(b"[worker-1,access]", process.output)


class StallReviewTests(_TwoProcesses):
    timeout = 180

    async def test_stalled_reader_after_hand_off_is_closed(self) -> None:
        """
        A client that stops reading a response handed off to the main
        process: the main process cuts its side after the send deadline
        (``client_stalled``), and the client's connection must then be
        closed and its slot freed, as with one process.  The worker
        stopped its own stall timer at the hand-off and, when the main
        side closes, only ``loseConnection``s the client, which never
        completes while the client reads nothing: the connection (and
        its slot under ``--max-connections-per-client``) is held for ever.
        """
        process, port, _ = await self.start("--max-connections-per-client", "1")
        path = "/up/m0.bin"
        main = socket.create_connection(("127.0.0.1", port))
        status, _, _ = await deferToThread(_request, main, path)
        main.close()
        self.assertEqual(status, 200)
        await until_committed(self.cache_dir, path[len('/up'):])
        stalled = await worker_connection(self, process, port, path, small_window=True)
        host = stalled.getsockname()[0]
        # Asked, never read: a miss, handed off to the main process.
        stalled.sendall(b"GET /up/large.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        # The worker (watching the client) or the main process (watching
        # the relay) cuts it first, whichever timer fires first.
        await process.wait_for(b"took nothing of its response")
        statuses = []
        for _ in range(50):
            sock = socket.socket()
            sock.bind((host, 0))
            sock.connect(("127.0.0.1", port))
            self.addCleanup(sock.close)
            status, _, _ = await deferToThread(_request, sock, path)
            sock.close()
            statuses.append(status)
            if status == 200:
                return
            await deferLater(reactor, 0.1, lambda: None)
        lines = [line for line in bytes(process.output).splitlines() if host.encode() in line]
        self.fail(f"the stalled client's connection still holds its slot: {statuses[:3]} {lines[-6:]}")


class LogForwardingBoundTests(SyncTestCase):
    def test_log_bytes_held_for_a_main_process_that_does_not_read(self) -> None:
        """
        A worker's log lines go to the main process through the control
        channel.  When the main process falls behind (busy at N workers'
        lines, each 24 us to parse), what the worker holds for it must
        stay bounded: every access line is client-driven.  The forwarder
        bounds one turn's batch (5000) but never looks at the channel's
        transport: with the main process not reading, every batch is
        written on and buffered (here about 140 MB for 300,000 lines).
        """
        transport = StringTransport()
        link = MainLink(snapshot=dict, drain=lambda: None)
        link.protocol.makeConnection(transport)
        clock = Clock()
        forwarder = LogForwarder(clock, link.send_log)
        # The main process stops reading: the channel's transport is full.
        if transport.producer is not None:
            transport.producer.pauseProducing()
        event = {
            "log_format": "{client} GET {uri} 200 20000 HIT 0.001s",
            "log_level": LogLevel.info, "log_namespace": "access", "log_time": 0.0,
            "client": "127.0.0.1", "uri": "/up/some/path/file-1.2.3.tar.gz",
        }
        for _ in range(300):
            for _ in range(1000):
                forwarder(dict(event))
            clock.advance(0)
        self.assertLessEqual(len(transport.value()), 2 * MAX_MESSAGE)


class RevalidationReviewTests(_TwoProcesses):
    async def test_worker_hands_off_what_the_client_asks_revalidated(self) -> None:
        """
        On a connection the worker holds, ``Cache-Control: max-age=0`` /
        ``no-cache`` / ``Pragma: no-cache`` reach the upstream (handed
        off), and a request with credentials is not answered from the
        anonymous entry.
        """
        process, port, _ = await self.start()
        path = "/up/m0.bin"
        await self.stored(port, path)
        for extra in (
            "Cache-Control: max-age=0\r\n", "Cache-Control: no-cache\r\n",
            "Pragma: no-cache\r\n", "Authorization: Basic dXNlcjpzZWNyZXQ=\r\n",
        ):
            sock = await worker_connection(self, process, port, path)
            before = self.upstream.requests["/m0.bin"]
            status, head, body = await deferToThread(_request, sock, path, extra)
            self.assertEqual((status, body), (200, FILES["/m0.bin"]))
            self.assertEqual(self.upstream.requests["/m0.bin"], before + 1, extra)
        self.assertNotIn(b"dXNlcjpzZWNyZXQ", process.output)
        self.assertNotIn(b"secret", process.output)


    async def test_worker_answers_head_range_and_conditionals_as_main(self) -> None:
        """
        HEAD, Range and If-None-Match on a fresh entry, in the worker: the
        same status, headers of interest and bytes as the main process.
        """
        self.upstream.bodies["/m1.bin"] = GatedBody(
            FILES["/m1.bin"], headers={"cache-control": "max-age=3600", "etag": '"m1"'}
        )
        process, port, _ = await self.start()
        path = "/up/m1.bin"
        main = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(main.close)
        status, head, _ = await deferToThread(_request, main, path)
        self.assertEqual(status, 200)
        etag = re.search(rb"(?i)\r\netag: *([^\r]+)", head)
        assert etag is not None
        await until_committed(self.cache_dir, path[len('/up'):])
        sock = await worker_connection(self, process, port, path)
        status, head, body = await deferToThread(_request, sock, path, "Range: bytes=10-19\r\n")
        self.assertEqual((status, body), (206, FILES["/m1.bin"][10:20]))
        status, head, body = await deferToThread(
            _request, sock, path, f"If-None-Match: {etag.group(1).decode()}\r\n"
        )
        self.assertEqual((status, body), (304, b""))
        self.assertEqual(self.upstream.requests["/m1.bin"], 1)
        await process.wait_for(b"m1.bin 304")
        worker_lines = re.findall(rb"\[worker-1,access\][^\n]*m1\.bin (\d+)", process.output)
        lines = [line for line in bytes(process.output).splitlines() if b"m1.bin" in line]
        self.assertIn(b"206", worker_lines, lines)
        self.assertIn(b"304", worker_lines, lines)

class ReadOnlyHitCostTests(StoreTestMixin, SyncTestCase):
    def test_hit_after_a_commit_scans_no_whole_index(self) -> None:
        """
        A worker's hit after the main process committed anything (every
        50 ms under misses: batched commits) must cost what a hit costs,
        not a pass over the whole index.  ``_follow_other_writers`` runs
        ``SELECT count(*), sum(size), sum(meta_size) FROM entries`` on the
        hit path (``_row``) at each new ``data_version``: O(entries) per
        commit, per worker (measured: 33 ms of CPU at 100,000 entries, so
        up to 0.66 s of each worker's CPU a second under 20 commits/s).
        """
        directory = self.make_directory()
        writer = self.open_store(directory)
        reader = Store.open(directory, 64 * 1024 * 1024, as_clock(Clock()), read_only=True)
        self.addCleanup(reader.close)
        self.put(writer, "a", b"first", {"etag": "1"})
        stored = reader.lookup("a")
        assert stored is not None
        stored.close()
        self.put(writer, "b", b"second", {"etag": "2"})
        statements: list[str] = []
        reader._db.set_trace_callback(statements.append)  # type: ignore[attr-defined]
        stored = reader.lookup("a")
        assert stored is not None
        stored.close()
        reader._db.set_trace_callback(None)  # type: ignore[attr-defined]
        scans = [s for s in statements if "count(" in s.lower() or "sum(" in s.lower()]
        self.assertEqual(scans, [])



class SlowHeadReviewTests(_TwoProcesses):
    async def test_slow_head_in_worker_and_after_hand_off_answered_408(self) -> None:
        """
        A request head that never ends gets 408 after 30 s, on a
        connection the worker holds and on one already handed off to the
        main process (its next request).
        """
        process, port, _ = await self.start()
        await self.stored(port, "/up/m0.bin")
        in_worker = await worker_connection(self, process, port, "/up/m0.bin")
        relayed = await worker_connection(self, process, port, "/up/m0.bin")
        status, _, _ = await deferToThread(_request, relayed, "/up/m2.bin")
        self.assertEqual(status, 200)
        for sock in (in_worker, relayed):
            sock.sendall(b"GET /up/m0.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n")

        def status_of(sock: socket.socket) -> bytes:
            sock.settimeout(60)
            return sock.recv(4096)

        answers = await gatherResults([
            deferToThread(status_of, in_worker), deferToThread(status_of, relayed)
        ])
        for answer in answers:
            self.assertTrue(answer.startswith(b"HTTP/1.1 408 "), answer)
