"""
The hit worker's own parts (:mod:`buildcache.workers.child`): its command
line, the server it builds (against the hits-only build's interface,
stubbed here), and how it stops: drained (SIGTERM, ``drain``) or at once
(its main process has gone).
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.config import Config
from buildcache.frontends.connections import RemoteConnections
from buildcache.service import Server
from buildcache.workers.child import HitWorker, hits_only_server, parse_arguments
from buildcache.workers.control import LogForwarder, MainLink
from buildcache.workers.pool import child_arguments
from tests.workers_parts import Joined


@define
class FakePort:
    stopped: int = 0

    def stopListening(self) -> Deferred[None]:
        self.stopped += 1
        return succeed(None)


@define
class FakeConnections:
    drained: Deferred[None] = field(factory=Deferred)
    asked: int = 0

    def drain(self) -> Deferred[None]:
        self.asked += 1
        return self.drained


@define
class FakeStore:
    pending: dict[str, float] = field(factory=dict)
    closed: bool = False

    def take_accesses(self) -> dict[str, float]:
        taken, self.pending = self.pending, {}
        return taken

    def close(self) -> None:
        self.closed = True


@define
class FakeServer:
    connections: FakeConnections = field(factory=FakeConnections)


class Worker:
    """A HitWorker on a memory reactor, its channel joined to a main side."""

    def __init__(self) -> None:
        from buildcache.workers.control import ControlProtocol

        self.reactor = MemoryReactorClock()
        self.store = FakeStore()
        self.server = FakeServer()
        self.received: list[dict[str, Any]] = []
        self.main = ControlProtocol({
            "accesses": lambda accesses: self.received.append(accesses),
            "log": lambda events, dropped: None,
        })
        self.link = MainLink(snapshot=dict, drain=lambda: None)
        self.forwarder = LogForwarder(self.reactor, self.link.send_log)
        self.worker = HitWorker(
            self.reactor, 1, self.store, self.server, self.link,  # type: ignore[arg-type]
            self.forwarder, grace=10.0,
        )
        self.link.on_lost = self.worker.lost
        self.ports = [FakePort(), FakePort()]
        self.worker.ports.extend(self.ports)  # type: ignore[arg-type]
        self.joined = Joined(self.main, self.link.protocol)


class CommandLineTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        """The worker reads the command line the pool writes."""
        arguments = parse_arguments(
            child_arguments(1, 2, [("proxy", 4), ("index", 5)], {"proxy": "/r/p.sock"})[3:]
        )
        self.assertEqual(
            (arguments.worker, arguments.workers, arguments.control_fd,
             arguments.listen, arguments.relay),
            (1, 2, 3, [("proxy", "4"), ("index", "5")], [("proxy", "/r/p.sock")]),
        )

    def test_hits_only_build(self) -> None:
        """
        With the hits-only build, the worker asks for it with its
        admission and the relay sockets.
        """
        calls: list[dict[str, Any]] = []

        def build(
            config: Config, reactor: Any, store: Any, activity: Any = None,
            connections: Any = None, hits_only: bool = False,
            relays: Any = None,
        ) -> Any:
            calls.append({"connections": connections, "hits_only": hits_only, "relays": relays})
            return "server"

        self.patch(Server, "build", build)
        admission = RemoteConnections(MainLink(snapshot=dict, drain=lambda: None))
        built = hits_only_server(
            Config(cache_dir=self.mktemp()), None, None, None,  # type: ignore[arg-type]
            admission, {"proxy": "/r/p.sock"},
        )
        self.assertEqual(built, "server")
        self.assertEqual(
            calls, [{"connections": admission, "hits_only": True, "relays": {"proxy": "/r/p.sock"}}]
        )


class StopTests(SynchronousTestCase):
    def test_drained_stop(self) -> None:
        """
        Draining stops accepting, waits for the responses, sends the last
        access times and the log, closes the channel, then the store.
        """
        w = Worker()
        w.store.pending["k"] = 3.0
        stopping = Deferred.fromCoroutine(w.worker.drain())
        self.assertEqual([p.stopped for p in w.ports], [1, 1])
        self.assertEqual(w.server.connections.asked, 1)
        self.assertNoResult(stopping)
        w.server.connections.drained.callback(None)
        w.joined.pump()
        self.assertEqual(w.received, [{"k": 3.0}])
        self.assertTrue(w.joined.b_transport.disconnecting)
        self.assertFalse(w.store.closed)
        # The main process closes its end: the worker ends.
        w.joined.close()
        self.successResultOf(stopping)
        self.assertTrue(w.store.closed)

    def test_responses_cut_after_the_grace(self) -> None:
        w = Worker()
        stopping = Deferred.fromCoroutine(w.worker.drain())
        w.reactor.advance(10.0)
        w.joined.close()
        self.successResultOf(stopping)
        self.assertTrue(w.store.closed)

    def test_main_process_gone(self) -> None:
        """
        When the channel closes, the worker stops at once: the reactor is
        stopped, and its drain waits for no response.
        """
        w = Worker()
        stops: list[bool] = []
        w.reactor.stop = lambda: stops.append(True)  # type: ignore[method-assign]
        w.joined.close()
        self.assertEqual(stops, [True])
        stopping = Deferred.fromCoroutine(w.worker.drain())
        self.successResultOf(stopping)
        self.assertEqual(w.server.connections.asked, 0)
        self.assertTrue(w.store.closed)

    def test_drain_command_stops_the_reactor_once(self) -> None:
        w = Worker()
        stops: list[bool] = []
        w.reactor.stop = lambda: stops.append(True)  # type: ignore[method-assign]
        w.worker.stop()
        w.worker.stop()
        self.assertEqual(stops, [True])
