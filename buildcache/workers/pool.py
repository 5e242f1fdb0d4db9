"""
The hit workers of ``--workers N``, seen from the main process.

:class:`WorkerPool` is a twistd service in the main process: started
after the ports listen, it spawns N-1 workers (``python -m
buildcache.workers.child``), each given the listening sockets, the write
end of nothing but its own control socket (:mod:`buildcache.workers.control`)
and, on its standard input, the pickled :class:`~buildcache.config.Config`
(never on the command line: it may hold credentials).  It restarts a
worker that dies (after :data:`FIRST_BACKOFF` seconds, doubling up to
:data:`MAX_BACKOFF`, back to the first once a worker has run
:data:`STEADY_AFTER` seconds), forgets the dead worker's admitted
connections, and on stop asks every worker to drain, waits up to the
grace, then SIGKILLs what is left, by PID.

It also answers the status page with the whole server's figures
(:meth:`WorkerPool.snapshot`): the main process's and every worker's that
answers within :data:`SNAPSHOT_TIMEOUT`, combined.

:func:`service_for_twistd` is the whole server for ``twistd``: today's
service, plus the pool when ``config.workers`` is above 1.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, cast

import attrs
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from buildcache.config import Config
from buildcache.frontends.connections import ClientConnections
from buildcache.ops.combine import combine
from buildcache.ops.snapshot import Snapshot, WorkersFigures
from buildcache.service import (
    STOP_GRACE,
    BuildcacheService,
    ListeningService,
)
from buildcache.service import service_for_twistd as one_process_service
from buildcache.workers.control import WorkerLink, protocol_factory
from buildcache.workers.ports import PerProcessListening

__all__ = [
    "FIRST_BACKOFF",
    "MAX_BACKOFF",
    "SNAPSHOT_TIMEOUT",
    "STEADY_AFTER",
    "WorkerPool",
    "child_arguments",
    "service_for_twistd",
]

#: Seconds before a dead worker's first restart.
FIRST_BACKOFF = 1.0
#: Most seconds between restarts of a worker that keeps dying.
MAX_BACKOFF = 30.0
#: Seconds a worker must have run for its next restart to wait
#: :data:`FIRST_BACKOFF` again.
STEADY_AFTER = 60.0
#: Seconds the status page waits for a worker's figures.
SNAPSHOT_TIMEOUT = 1.0
#: The child's file descriptor of its control socket; the listening
#: sockets follow it.
CONTROL_FD = 3


def child_arguments(
    number: int, count: int, ports: Sequence[tuple[str, int]],
    relays: Mapping[str, str],
) -> list[str]:
    """
    The command line of worker ``number`` of ``count`` processes: its
    control fd, each listening port's name and the child's fd for it, and
    each port's relay socket path (for hand-offs).
    """
    arguments = [
        sys.executable, "-m", "buildcache.workers.child",
        "--worker", str(number), "--workers", str(count),
        "--control-fd", str(CONTROL_FD),
    ]
    for name, child_fd in ports:
        arguments += ["--listen", f"{name}={child_fd}"]
    for name, path in sorted(relays.items()):
        arguments += ["--relay", f"{name}={path}"]
    return arguments


@attrs.define(eq=False)
class _Worker:
    """One worker slot: its current process (if any) and its history."""

    number: int
    process: _WorkerProcess | None = None
    link: WorkerLink | None = None
    started_at: float = 0.0
    backoff: float = FIRST_BACKOFF
    restart: IDelayedCall | None = None
    #: The figures its current process last gave (they stand in for it
    #: while it does not answer, and join the retired ones when it ends).
    last_snapshot: Snapshot | None = None


class _WorkerProcess(ProcessProtocol):
    def __init__(self, pool: WorkerPool, worker: _Worker, config_bytes: bytes) -> None:
        self.pool = pool
        self.worker = worker
        self.config_bytes = config_bytes
        self.pid: int | None = None
        self.ended: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.write(self.config_bytes)
        self.transport.closeStdin()

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self.worker, self, reason)
        self.ended.callback(None)


def _all_ended(processes: Sequence[_WorkerProcess]) -> Deferred[None]:
    # A Deferred of its own: cancelling it on a timeout must not cancel
    # the processes' own.
    ended: Deferred[None] = Deferred()
    left = [p for p in processes if not p.ended.called]

    def one_ended(_: object, process: _WorkerProcess) -> None:
        if process in left:
            left.remove(process)
        if not left and not ended.called:
            ended.callback(None)

    if not left:
        ended.callback(None)
    for process in list(left):
        process.ended.addCallback(one_ended, process)
    return ended


class WorkerPool(Service):
    """
    The N-1 hit workers beside the main process (see the module
    docstring).

    :param ports: each listening port's name and service, read when the
        pool starts (they listen by then).
    :param relays: each port's relay socket path, read when a worker
        starts (the hand-off to the main process).
    :param spawn: ``reactor.spawnProcess`` (tests pass a fake).
    :param kill: sends a signal to a PID (``os.kill``).
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        reactor: Any,
        top: BuildcacheService,
        ports: Sequence[tuple[str, ListeningService]],
        relays: Callable[[], Mapping[str, str]] = dict,
        spawn: Callable[..., Any] | None = None,
        kill: Callable[[int, int], None] = os.kill,
        grace: float = STOP_GRACE,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.top = top
        self.ports = ports
        self.relays = relays
        self.spawn = spawn if spawn is not None else reactor.spawnProcess
        self.kill = kill
        self.grace = grace
        self.count = config.workers
        self.workers = [_Worker(n) for n in range(1, config.workers)]
        self.restarts = 0
        #: The figures of worker processes that ended, added up: the totals
        #: are counts since the server started, and must not go back when
        #: a worker is restarted.
        self._retired: Snapshot | None = None
        self._stopping = False
        self._config_bytes = pickle.dumps(config)

    # -- starting and restarting ------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._stopping = False
        for worker in self.workers:
            self._start(worker)

    def _listening_fds(self, worker: _Worker) -> list[tuple[str, int]]:
        # Each port's socket for this worker: its own (the same at every
        # restart) on a TCP port, else the one every process shares.
        return [
            (name, service.fileno_for(worker.number))
            for name, service in self.ports if service.port is not None
        ]

    def _cover(self, worker: _Worker, down: bool) -> None:
        # While a worker is down, the main process accepts on its sockets.
        for _, service in self.ports:
            if isinstance(service, PerProcessListening):
                if down:
                    service.cover(worker.number)
                else:
                    service.uncover(worker.number)

    def _start(self, worker: _Worker) -> None:
        worker.restart = None
        if self._stopping:
            return
        # Until it serves, the main process accepts on the worker's
        # sockets: connections the kernel gives them would otherwise wait
        # for the worker's start (half a second of imports).
        self._cover(worker, down=True)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2, CONTROL_FD: theirs.fileno()}
        ports = []
        for offset, (name, fd) in enumerate(self._listening_fds(worker), start=CONTROL_FD + 1):
            child_fds[offset] = fd
            ports.append((name, offset))
        process = _WorkerProcess(self, worker, self._config_bytes)
        try:
            self.spawn(
                process, sys.executable,
                child_arguments(worker.number, self.count, ports, self.relays()),
                env=dict(os.environ), childFDs=child_fds,
            )
        except OSError as e:
            ours.close()
            theirs.close()
            self.log.error(
                "Cannot start worker {worker}: {error}", worker=worker.number,
                error=str(e), event="worker_start_failed",
            )
            self._cover(worker, down=True)
            self._schedule_restart(worker)
            return
        finally:
            # The child has its copy now (or none): ours would keep the
            # channel open after the child died.
            if theirs.fileno() != -1:
                theirs.close()
        link = WorkerLink(
            worker.number, self._admissions(),
            self.top.server.store.record_accesses,
            on_lost=lambda: self._channel_lost(worker, process),
            on_serving=lambda: self._serving(worker, process),
        )
        self.reactor.adoptStreamConnection(
            ours.fileno(), socket.AF_UNIX, protocol_factory(link.protocol)
        )
        ours.close()
        worker.process, worker.link = process, link
        worker.started_at = self.reactor.seconds()
        self.log.info(
            "Worker {worker} started (pid {pid})", worker=worker.number,
            pid=process.pid, event="worker_started",
        )

    def _serving(self, worker: _Worker, process: _WorkerProcess) -> None:
        if worker.process is process and not self._stopping:
            self._cover(worker, down=False)

    def _admissions(self) -> ClientConnections:
        # The main process's own table (it admits its own connections too).
        return cast(ClientConnections, self.top.server.connections)

    def _channel_lost(self, worker: _Worker, process: _WorkerProcess) -> None:
        # A worker whose channel closed cannot be admitted, snapshot nor
        # drained: it must not go on serving.  (A draining worker closes
        # its channel itself before it exits: stopping waits for it.)
        if self._stopping:
            return
        if not process.ended.called and process.pid is not None:
            self._signal(process.pid, signal.SIGKILL)

    def _ended(self, worker: _Worker, process: _WorkerProcess, reason: Failure) -> None:
        if worker.process is process:
            worker.process = None
        if worker.link is not None:
            transport = worker.link.protocol.transport
            if transport is not None:
                transport.loseConnection()
            worker.link = None
        forgotten = self._admissions().forget_remote(worker.number)
        if worker.last_snapshot is not None:
            retired = worker.last_snapshot
            self._retired = (
                retired if self._retired is None else combine([self._retired, retired])
            )
            worker.last_snapshot = None
        status = getattr(reason.value, "exitCode", None)
        signalled = getattr(reason.value, "signal", None)
        self.log.info(
            "Worker {worker} (pid {pid}) exited ({how}); {connections}"
            " connections it held forgotten",
            worker=worker.number, pid=process.pid, how=(
                f"signal {signalled}" if signalled else f"status {status}"
            ),
            status=status, signal=signalled, connections=forgotten,
            event="worker_exited",
        )
        if self._stopping:
            return
        self._cover(worker, down=True)
        if self.reactor.seconds() - worker.started_at >= STEADY_AFTER:
            worker.backoff = FIRST_BACKOFF
        self._schedule_restart(worker)

    def _schedule_restart(self, worker: _Worker) -> None:
        delay = worker.backoff
        worker.backoff = min(worker.backoff * 2, MAX_BACKOFF)
        self.restarts += 1
        self.log.info(
            "Restarting worker {worker} in {delay}s", worker=worker.number,
            delay=delay, event="worker_restart_scheduled",
        )
        worker.restart = self.reactor.callLater(delay, self._start, worker)

    # -- stopping ---------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        running = []
        for worker in self.workers:
            if worker.restart is not None and worker.restart.active():
                worker.restart.cancel()
            worker.restart = None
            if worker.process is not None and not worker.process.ended.called:
                running.append(worker.process)
                if worker.link is not None:
                    worker.link.drain()
        if not running:
            return
        ended = _all_ended(running)
        ended.addTimeout(self.grace, self.reactor)
        try:
            await ended
            return
        except defer.TimeoutError:
            pass
        for process in running:
            if not process.ended.called and process.pid is not None:
                self.log.warn(
                    "Worker pid {pid} did not drain within {grace}s: killed",
                    pid=process.pid, grace=self.grace, event="worker_killed",
                )
                self._signal(process.pid, signal.SIGKILL)
        await _all_ended(running)

    def _signal(self, pid: int, signalnum: int) -> None:
        try:
            self.kill(pid, signalnum)
        except (ProcessLookupError, ProcessExitedAlready):
            pass

    # -- figures ------------------------------------------------------------

    def alive(self) -> list[int]:
        """The PIDs of the workers running now."""
        return [
            w.process.pid for w in self.workers
            if w.process is not None and w.process.pid is not None
            and not w.process.ended.called
        ]

    async def _snapshots(self) -> tuple[list[Snapshot], int]:
        """
        Every worker's figures: those it gives within
        :data:`SNAPSHOT_TIMEOUT`, else the last it gave; and those of the
        workers that ended.  With the count of those that answered.
        """
        asked = []
        for worker in self.workers:
            if worker.link is not None:
                answer = worker.link.snapshot()
                answer.addTimeout(SNAPSHOT_TIMEOUT, self.reactor)
                asked.append((worker, answer))
        results = await DeferredList([answer for _, answer in asked], consumeErrors=True)
        answered = 0
        for (worker, _), (ok, result) in zip(asked, results):
            if ok and isinstance(result, dict):
                answered += 1
                worker.last_snapshot = result  # type: ignore[assignment]
        figures = [w.last_snapshot for w in self.workers if w.last_snapshot is not None]
        if self._retired is not None:
            figures.append(self._retired)
        return figures, answered

    def snapshot(self, own: Callable[[], Snapshot]) -> Deferred[Snapshot]:
        """
        The whole server's figures: the main process's (``own``) and
        those of every worker that answers within
        :data:`SNAPSHOT_TIMEOUT`, with a ``workers`` line.
        """
        async def taken() -> Snapshot:
            mine = own()
            theirs, answered = await self._snapshots()
            combined = combine([mine, *theirs])
            figures: WorkersFigures = {
                "configured": self.count,
                "alive": 1 + len(self.alive()),
                "answered": 1 + answered,
                "restarts": self.restarts,
            }
            return {**combined, "workers": figures}

        return Deferred.fromCoroutine(taken())


_PORT_NAMES = {"--port": "proxy", "--pypi-port": "index", "--registry-port": "registry"}


def service_for_twistd(config: Config, reactor: Any) -> MultiService:
    """
    The whole server for ``twistd``: :func:`buildcache.service.service_for_twistd`,
    plus the hit workers when ``config.workers`` is above 1.
    """
    if config.workers <= 1:
        return one_process_service(config, reactor)
    top = one_process_service(
        config, reactor, partial(PerProcessListening, processes=config.workers)
    )
    if not isinstance(top, BuildcacheService):
        return top
    ports = [
        (_PORT_NAMES.get(service.option, service.option), service)
        for service in top if isinstance(service, ListeningService)
    ]
    relays: Callable[[], Mapping[str, str]] = getattr(top, "relay_paths", dict)
    pool = WorkerPool(config, reactor, top, ports, relays=relays)
    status = top.server.status
    # The main process's own figures, taken at once.
    own = cast(Callable[[], Snapshot], status.snapshot)
    status.snapshot = lambda: pool.snapshot(own)
    pool.setServiceParent(top)
    return top

