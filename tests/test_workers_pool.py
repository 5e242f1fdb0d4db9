"""
The pool of hit workers in the main process
(:class:`buildcache.workers.pool.WorkerPool`), on a MemoryReactorClock
with a fake ``spawnProcess``: what a worker is started with, restarts and
their backoff, what a dead worker leaves behind, the drain on stop, and
the whole server's figures.
"""

from __future__ import annotations

import pickle
import signal
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from buildcache.config import Config, default_workers
from buildcache.frontends.connections import ClientConnections
from buildcache.ops.activity import Activity
from buildcache.ops.snapshot import SnapshotSources
from buildcache.options import Options
from buildcache.store import Store
from buildcache.workers.control import ControlProtocol, MainLink, WorkerLink
from buildcache.workers.pool import (
    CONTROL_FD,
    FIRST_BACKOFF,
    MAX_BACKOFF,
    SNAPSHOT_TIMEOUT,
    STEADY_AFTER,
    WorkerPool,
    child_arguments,
)
from buildcache.workers.ports import PerProcessListening
from tests.test_status import NoDownloads, finished
from tests.workers_parts import Joined


@define(eq=False)
class FakeProcessTransport:
    pid: int
    written: bytearray = field(factory=bytearray)
    stdin_closed: bool = False

    def write(self, data: bytes) -> None:
        self.written += data

    def closeStdin(self) -> None:
        self.stdin_closed = True


@define(eq=False)
class Spawned:
    protocol: ProcessProtocol
    executable: str
    args: list[str]
    child_fds: dict[int, Any]
    transport: FakeProcessTransport

    def end(self, code: int = 0, signal_number: int | None = None) -> None:
        reason = (
            ProcessDone(0) if code == 0 and signal_number is None
            else ProcessTerminated(code, signal_number)
        )
        self.protocol.processEnded(Failure(reason))


@define
class FakeStore:
    recorded: list[dict[str, float]] = field(factory=list)

    def record_accesses(self, accesses: dict[str, float]) -> None:
        self.recorded.append(dict(accesses))


@define
class FakeServer:
    connections: ClientConnections
    store: FakeStore


@define
class FakeTop:
    server: FakeServer


class Harness:
    def __init__(self, testcase: SynchronousTestCase, workers: int = 3) -> None:
        self.reactor = MemoryReactorClock()
        self.spawned: list[Spawned] = []
        self.killed: list[tuple[int, int]] = []
        self.next_pid = 1000
        self.config = Config(cache_dir=testcase.mktemp(), workers=workers)
        self.connections = ClientConnections(4)
        self.store = FakeStore()
        self.pool = WorkerPool(
            self.config, self.reactor,
            FakeTop(FakeServer(self.connections, self.store)),  # type: ignore[arg-type]
            ports=[], spawn=self.spawn, kill=lambda pid, sig: self.killed.append((pid, sig)),
            grace=10.0,
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def spawn(
        self, protocol: ProcessProtocol, executable: str, args: list[str],
        env: dict[str, str], childFDs: dict[int, Any],
    ) -> FakeProcessTransport:
        self.next_pid += 1
        transport = FakeProcessTransport(self.next_pid)
        self.spawned.append(Spawned(protocol, executable, args, childFDs, transport))
        protocol.makeConnection(transport)  # type: ignore[arg-type]
        return transport

    def worker_end(self, index: int = -1) -> Joined:
        """Join the worker side of the last (or given) control channel."""
        _, _, factory = self.reactor.adoptedStreamConnections[index]
        main_side = factory.buildProtocol(None)
        worker_side = MainLink(snapshot=lambda: None, drain=lambda: None)
        return Joined(main_side, worker_side.protocol)

    def of(self, event_name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event_name]


class StartTests(SynchronousTestCase):
    def test_spawns_n_minus_one(self) -> None:
        """
        ``--workers 3`` starts two workers, each with its number, its
        control socket as fd 3, and the configuration on its standard
        input (never on its command line).
        """
        h = Harness(self, workers=3)
        h.pool.startService()
        self.assertEqual(len(h.spawned), 2)
        for number, spawned in enumerate(h.spawned, start=1):
            self.assertEqual(
                spawned.args[1:7],
                ["-m", "buildcache.workers.child", "--worker", str(number), "--workers", "3"],
            )
            self.assertIn(CONTROL_FD, spawned.child_fds)
            self.assertEqual(spawned.child_fds[0], "w")
            self.assertEqual(pickle.loads(bytes(spawned.transport.written)), h.config)
            self.assertTrue(spawned.transport.stdin_closed)
        self.assertEqual(
            [(e["worker"], e["pid"]) for e in h.of("worker_started")], [(1, 1001), (2, 1002)]
        )
        self.assertEqual(len(h.reactor.adoptedStreamConnections), 2)

    def test_no_secret_on_the_command_line(self) -> None:
        """
        The configuration, credentials and all, goes through the child's
        standard input: its command line (which ``ps`` shows) carries none.
        """
        h = Harness(self, workers=2)
        secret = b"s3cr3t-shared-key-0123456789"
        h.pool._config_bytes = pickle.dumps(
            Config(cache_dir=self.mktemp(), shared_secret=secret, workers=2)
        )
        h.pool.startService()
        self.assertIn(secret, bytes(h.spawned[0].transport.written))
        self.assertNotIn(secret.decode(), " ".join(h.spawned[0].args))

    def test_child_arguments(self) -> None:
        self.assertEqual(
            child_arguments(2, 4, [("proxy", 4), ("index", 5)], {"proxy": "/r/p"})[3:],
            ["--worker", "2", "--workers", "4", "--control-fd", "3",
             "--listen", "proxy=4", "--listen", "index=5", "--relay", "proxy=/r/p"],
        )

    def test_workers_option(self) -> None:
        """``--workers`` takes a whole number of at least 1; its default is per CPU, at most 8."""
        options = Options(environ={})
        base = ["--cache-dir", self.mktemp(), "--pypi-upstream", "http://127.0.0.1:9/simple"]
        options.parseOptions([*base, "--workers", "3"])
        self.assertEqual(options.config.workers, 3)
        for bad in ("0", "-1", "two"):
            from twisted.python.usage import UsageError
            self.assertRaises(UsageError, Options(environ={}).parseOptions, [*base, "--workers", bad])
        self.assertEqual([default_workers(n) for n in (0, 1, 2, 8, 64)], [1, 1, 2, 8, 8])
        self.assertEqual(Config(cache_dir=self.mktemp()).workers, 1)


class RestartTests(SynchronousTestCase):
    def test_dead_worker_restarted_with_backoff(self) -> None:
        """
        A worker that dies is restarted after 1 s, then 2, 4, ... at most
        30 s while it keeps dying young; each exit is logged with its pid
        and status.
        """
        h = Harness(self, workers=2)
        h.pool.startService()
        delays = []
        for _ in range(7):
            h.spawned[-1].end(1)
            before = len(h.spawned)
            waited = 0.0
            while len(h.spawned) == before:
                h.reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0])
        self.assertEqual(MAX_BACKOFF, 30.0)
        exited = h.of("worker_exited")
        self.assertEqual((exited[0]["worker"], exited[0]["pid"], exited[0]["status"]), (1, 1001, 1))
        self.assertEqual(h.pool.restarts, 7)

    def test_backoff_reset_after_a_steady_run(self) -> None:
        h = Harness(self, workers=2)
        h.pool.startService()
        h.spawned[-1].end(1)
        h.reactor.advance(FIRST_BACKOFF)
        h.spawned[-1].end(1)
        h.reactor.advance(2 * FIRST_BACKOFF)
        self.assertEqual(len(h.spawned), 3)
        h.reactor.advance(STEADY_AFTER)
        h.spawned[-1].end(None, signal.SIGKILL)  # type: ignore[arg-type]
        self.assertEqual(h.of("worker_exited")[-1]["signal"], signal.SIGKILL)
        h.reactor.advance(FIRST_BACKOFF)
        self.assertEqual(len(h.spawned), 4)

    def test_dead_workers_admissions_forgotten(self) -> None:
        """The connections a worker had admitted are freed when it dies."""
        h = Harness(self, workers=2)
        h.pool.startService()
        joined = h.worker_end()
        worker_side: ControlProtocol = joined.b
        for _ in range(4):
            worker_side.call("admit", key="10.0.0.1")
        joined.pump()
        self.assertEqual(h.connections.open_from("10.0.0.1"), 4)
        self.assertFalse(h.connections.admit(object(), "10.0.0.1"))  # type: ignore[arg-type]
        h.spawned[-1].end(None, signal.SIGKILL)  # type: ignore[arg-type]
        self.assertEqual(h.connections.open_from("10.0.0.1"), 0)
        self.assertEqual(h.of("worker_exited")[-1]["connections"], 4)

    def test_accesses_recorded(self) -> None:
        h = Harness(self, workers=2)
        h.pool.startService()
        joined = h.worker_end()
        joined.b.notify("accesses", accesses={"k": 5.0})
        joined.pump()
        self.assertEqual(h.store.recorded, [{"k": 5.0}])

    def test_channel_lost_kills_the_worker(self) -> None:
        """A running worker whose channel closed is killed (then restarted)."""
        h = Harness(self, workers=2)
        h.pool.startService()
        joined = h.worker_end()
        joined.close()
        self.assertEqual(h.killed, [(1001, signal.SIGKILL)])


class RecordingListening(PerProcessListening):
    """A port's socket group that only records what the pool asks of it."""

    def __init__(self) -> None:
        self.port = None
        self.calls: list[tuple[str, int]] = []

    def cover(self, worker: int) -> None:
        self.calls.append(("cover", worker))

    def uncover(self, worker: int) -> None:  # type: ignore[override]
        self.calls.append(("uncover", worker))


class CoverTests(SynchronousTestCase):
    def test_main_accepts_for_a_worker_until_it_serves(self) -> None:
        """
        The main process accepts on a worker's sockets from its start
        until it says it serves (the first connections after a start
        waited half a second for the worker's imports), and again once it
        is gone.
        """
        h = Harness(self, workers=2)
        listening = RecordingListening()
        h.pool.ports = [("proxy", listening)]
        h.pool.startService()
        self.assertEqual(listening.calls, [("cover", 1)])
        joined = h.worker_end()
        joined.b.notify("serving")
        joined.pump()
        self.assertEqual(listening.calls, [("cover", 1), ("uncover", 1)])
        h.spawned[0].protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertEqual(listening.calls[-1], ("cover", 1))


class StopTests(SynchronousTestCase):
    def test_drain_then_wait(self) -> None:
        """
        Stopping asks every worker to drain, and ends when they have
        exited; nothing is killed, nothing restarted.
        """
        h = Harness(self, workers=3)
        h.pool.startService()
        ends = [h.worker_end(0), h.worker_end(1)]
        drains: list[int] = []
        for n, joined in enumerate(ends):
            joined.b.handlers = {"drain": lambda n=n: drains.append(n)}
        stopped = h.pool.stopService()
        for joined in ends:
            joined.pump()
        self.assertEqual(sorted(drains), [0, 1])
        self.assertNoResult(stopped)
        h.spawned[0].end(0)
        self.assertNoResult(stopped)
        h.spawned[1].end(0)
        self.successResultOf(stopped)
        h.reactor.advance(MAX_BACKOFF * 2)
        self.assertEqual((len(h.spawned), h.killed), (2, []))

    def test_sigkill_after_the_grace(self) -> None:
        """A worker still running after the grace is SIGKILLed by its PID."""
        h = Harness(self, workers=3)
        h.pool.startService()
        stopped = h.pool.stopService()
        h.spawned[0].end(0)
        h.reactor.advance(9.9)
        self.assertEqual(h.killed, [])
        h.reactor.advance(0.2)
        self.assertEqual(h.killed, [(1002, signal.SIGKILL)])
        self.assertNoResult(stopped)
        h.spawned[1].end(None, signal.SIGKILL)  # type: ignore[arg-type]
        self.successResultOf(stopped)
        self.assertEqual(h.of("worker_killed")[0]["pid"], 1002)

    def test_pending_restart_cancelled(self) -> None:
        h = Harness(self, workers=2)
        h.pool.startService()
        h.spawned[-1].end(1)
        self.successResultOf(h.pool.stopService())
        h.reactor.advance(MAX_BACKOFF)
        self.assertEqual(len(h.spawned), 1)


class SnapshotTests(SynchronousTestCase):
    def sources(self, store: Store, activity: Activity, config: Config) -> SnapshotSources:
        return SnapshotSources(config, store, NoDownloads(), activity, activity.clock)

    def test_totals_and_the_missing(self) -> None:
        """
        The whole server's figures add up the main process's and the
        workers' that answer within a second; the others are left out,
        and the workers line says how many answered.
        """
        h = Harness(self, workers=3)
        h.pool.startService()
        store = Store.open(h.config.cache_dir, h.config.max_size, h.reactor)
        self.addCleanup(store.close)
        main, worker = Activity(h.reactor), Activity(h.reactor)
        finished(main, "proxy", "a.deb", "MISS", 10)
        finished(worker, "proxy", "a.deb", "HIT", 10)
        finished(worker, "proxy", "a.deb", "HIT", 10)
        answering, silent = h.worker_end(0), h.worker_end(1)
        answering.b.handlers = {"snapshot": self.sources(store, worker, h.config).snapshot}
        silent.b.handlers = {"snapshot": Deferred}
        taken = h.pool.snapshot(self.sources(store, main, h.config).snapshot)
        answering.pump()
        silent.pump()
        self.assertNoResult(taken)
        h.reactor.advance(SNAPSHOT_TIMEOUT)
        snapshot = self.successResultOf(taken)
        self.assertEqual(snapshot["requests"], 3)
        self.assertEqual(snapshot["by_status"]["HIT"], 2)
        self.assertEqual(
            snapshot["workers"], {"configured": 3, "alive": 3, "answered": 2, "restarts": 0}
        )
        from buildcache.ops.metrics import render_metrics
        from buildcache.ops.page import render_page

        page = render_page(snapshot).decode()
        self.assertIn("3 configured, 3 running, 0 restarts; figures of 2 of 3", page)
        metrics = render_metrics(snapshot)[0].decode()
        self.assertIn("buildcache_workers_answered 2.0", metrics)
        self.assertIn("buildcache_worker_restarts_total 0.0", metrics)

    def test_log_level_kept(self) -> None:
        """A worker's warning is a warning in the main process's log."""
        events: list[dict[str, Any]] = []
        link = WorkerLink(1, ClientConnections(), lambda a: None, publisher=events.append)
        from twisted.logger import Logger

        from buildcache.workers.control import LogForwarder
        clock = MemoryReactorClock()
        forwarder = LogForwarder(clock, lambda batch, dropped: link._log(batch, dropped))
        Logger(observer=forwarder).warn("careful")
        clock.advance(0)
        self.assertEqual(events[0]["log_level"], LogLevel.warn)


class AssemblyTests(SynchronousTestCase):
    def build(self, workers: int) -> Any:
        from twisted.internet import reactor

        from buildcache.workers.pool import service_for_twistd

        config = Config(
            cache_dir=self.mktemp(), workers=workers,
            proxy_endpoint="tcp:0:interface=127.0.0.1",
            index_endpoint="tcp:0:interface=127.0.0.1",
        )
        top = service_for_twistd(config, reactor)
        self.addCleanup(top.server.store.close)  # type: ignore[attr-defined]
        return top

    def test_one_process(self) -> None:
        """``--workers 1`` is the one-process service: no pool, the status page its own."""
        top = self.build(1)
        self.assertEqual([s for s in top if isinstance(s, WorkerPool)], [])
        own = top.server.status.snapshot
        self.assertIsInstance(own(), dict)
        self.assertIsNone(own()["workers"])

    def test_two_processes(self) -> None:
        """``--workers 2``: the pool is a child of the service, named ports, one worker."""
        top = self.build(2)
        pools = [s for s in top if isinstance(s, WorkerPool)]
        self.assertEqual(len(pools), 1)
        self.assertEqual([name for name, _ in pools[0].ports], ["proxy", "index"])
        self.assertEqual(len(pools[0].workers), 1)
        # Unstarted, the pool's figures are the main process's alone.
        snapshot = self.successResultOf(top.server.status.snapshot())
        self.assertEqual(
            snapshot["workers"], {"configured": 2, "alive": 1, "answered": 1, "restarts": 0}
        )
