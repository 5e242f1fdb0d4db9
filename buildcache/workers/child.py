"""
A hit worker: ``python -m buildcache.workers.child``, started by
:class:`buildcache.workers.pool.WorkerPool` in the main process.

It reads its :class:`~buildcache.config.Config` (pickled) from standard
input, opens the store read-only (no lock, no cleaning of ``tmp/``, no
writes), builds the same front ends over an engine in hits-only mode
(:meth:`buildcache.service.Server.build` with ``hits_only``: what is not a
fresh hit is handed off to the main process through the relay sockets
named on its command line), adopts the listening sockets it inherited,
and serves.  Its connections are admitted by the main process
(:class:`buildcache.frontends.connections.RemoteConnections`), its access
times and log events go there (:mod:`buildcache.workers.control`).

It stops on SIGTERM or a ``drain`` command once its responses have gone
out (at most :data:`buildcache.service.STOP_GRACE` seconds), and at once
when its control channel closes: the main process has gone.
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, globalLogBeginner

from buildcache.config import Config
from buildcache.frontends.connections import RemoteConnections
from buildcache.ops.snapshot import SnapshotSources
from buildcache.service import STOP_GRACE, Server, new_activity
from buildcache.store import Store
from buildcache.workers.control import LogForwarder, MainLink, protocol_factory

__all__ = ["ACCESS_SEND_INTERVAL", "HitWorker", "hits_only_server", "main", "parse_arguments"]

#: Seconds between two sends of the access times to the main process:
#: the read-only store holds at most ``ROWS_KEPT`` keys between two (it
#: drops the next ones), a bound no box reaches in a second.
ACCESS_SEND_INTERVAL = 1.0


def _named(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """The command line :func:`buildcache.workers.pool.child_arguments` writes."""
    parser = argparse.ArgumentParser(prog="python -m buildcache.workers.child")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--listen", type=_named, action="append", default=[])
    parser.add_argument("--relay", type=_named, action="append", default=[])
    return parser.parse_args(argv)


def hits_only_server(
    config: Config, reactor: Any, store: Store, activity: Any,
    admission: RemoteConnections, relays: Mapping[str, str],
) -> Server:
    """
    The worker's server: the front ends over an engine in hits-only mode
    that hands everything else to the main process through ``relays``
    (each port's relay socket), admitted by ``admission``.
    """
    return Server.build(
        config, reactor, store, activity, connections=admission,
        hits_only=True, relays=relays,
    )


@attrs.define(eq=False)
class HitWorker:
    """One running worker (see the module docstring)."""

    log = Logger()

    reactor: Any
    number: int
    store: Store
    server: Server
    link: MainLink
    forwarder: LogForwarder | None = None
    ports: list[IListeningPort] = attrs.Factory(list)
    grace: float = STOP_GRACE
    _at_once: bool = False
    _stopping: bool = False
    _channel_lost: Deferred[None] = attrs.Factory(Deferred)

    def stop(self, at_once: bool = False) -> None:
        """Stop the reactor: draining first, unless ``at_once``."""
        self._at_once = self._at_once or at_once
        if not self._stopping:
            self._stopping = True
            self.reactor.stop()

    def lost(self) -> None:
        """The control channel closed."""
        if not self._channel_lost.called:
            self._channel_lost.callback(None)
        if not self._stopping:
            self.log.warn(
                "Worker {worker}: the main process has gone; exiting",
                worker=self.number, event="worker_orphaned",
            )
        self.stop(at_once=True)

    def send_accesses(self) -> None:
        if self.link.backed_up:
            # Kept by the store (within its bound) for the next send.
            return
        self.link.send_accesses(self.store.take_accesses())

    async def drain(self) -> None:
        """Before the reactor stops: stop accepting, finish the responses."""
        for port in self.ports:
            stopped = port.stopListening()
            if stopped is not None:
                await stopped
        if not self._at_once:
            drained = self.server.connections.drain()
            drained.addTimeout(self.grace, self.reactor)
            try:
                await drained
            except defer.TimeoutError:
                self.log.warn(
                    "Worker {worker}: responses cut short after {grace}s",
                    worker=self.number, grace=self.grace,
                )
        self.send_accesses()
        self.log.info("Worker {worker} drained", worker=self.number, event="worker_drained")
        if self.forwarder is not None:
            self.forwarder.flush()
        transport = self.link.protocol.transport
        if transport is not None and not self._channel_lost.called:
            # What was sent goes out before the process ends.
            transport.loseConnection()
            self._channel_lost.addTimeout(1.0, self.reactor)
            try:
                await self._channel_lost
            except defer.TimeoutError:
                pass
        self.store.close()


def _family(fd: int) -> socket.AddressFamily:
    probe = socket.socket(fileno=os.dup(fd))
    try:
        return probe.family
    finally:
        probe.close()


def start(reactor: Any, config: Config, arguments: argparse.Namespace) -> HitWorker:
    """Build and start worker ``arguments.worker`` on ``reactor``."""
    holder: list[HitWorker] = []

    def snapshot() -> Any:
        return sources.snapshot()

    link = MainLink(
        snapshot=snapshot, drain=lambda: holder[0].stop() if holder else None,
        on_lost=lambda: holder[0].lost() if holder else os._exit(1),
    )
    reactor.adoptStreamConnection(
        arguments.control_fd, socket.AF_UNIX, protocol_factory(link.protocol)
    )
    os.close(arguments.control_fd)
    forwarder = LogForwarder(reactor, link.send_log)
    globalLogBeginner.beginLoggingTo([forwarder], redirectStandardIO=False)
    store = Store.open(
        config.cache_dir, config.max_size, reactor,
        max_object_size=config.max_object_size, read_only=True,
    )
    store.share_row_cache(config.workers)
    activity = new_activity(config, reactor)
    # Its access lines go to the main process as records, not log events.
    activity.access_sink = forwarder.access
    admission = RemoteConnections(link, config.max_connections_per_client)
    server = hits_only_server(
        config, reactor, store, activity, admission, dict(arguments.relay)
    )
    sources = SnapshotSources(config, store, None, activity, reactor)
    worker = HitWorker(reactor, arguments.worker, store, server, link, forwarder)
    holder.append(worker)
    sites = {
        "proxy": server.proxy_site, "index": server.index_site,
        "registry": server.registry_site,
    }
    for name, fd_text in arguments.listen:
        fd = int(fd_text)
        port = reactor.adoptStreamPort(fd, _family(fd), sites[name])
        os.close(fd)
        if name == "index":
            server.index_listening(port)
        worker.ports.append(port)
    LoopingCall(worker.send_accesses).start(ACCESS_SEND_INTERVAL, now=False).addErrback(
        lambda reason: worker.log.failure("Sending access times failed", reason)
    )
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromCoroutine(worker.drain())
    )
    worker.log.info(
        "Worker {worker} serving (pid {pid})", worker=arguments.worker,
        pid=os.getpid(), event="worker_serving",
    )
    # Until now the main process accepted on this worker's sockets too.
    link.serving()
    return worker


def main(argv: Sequence[str] | None = None) -> None:
    """The worker's entry point."""
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    config = pickle.loads(sys.stdin.buffer.read())
    if not isinstance(config, Config):
        raise SystemExit("buildcache worker: no configuration on standard input")
    from twisted.internet import reactor

    start(reactor, config, arguments)
    reactor.run()


if __name__ == "__main__":
    main()
