"""
The control channel between the main process and a hit worker
(:mod:`buildcache.workers.control`) and the admissions counted across
processes (:class:`buildcache.frontends.connections.ClientConnections`'s
remote counts, :class:`~buildcache.frontends.connections.RemoteConnections`).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from buildcache.frontends.connections import ClientConnections, RemoteConnections
from buildcache.workers.control import (
    LOG_BATCH_MAX,
    MAX_MESSAGE,
    ControlError,
    ControlProtocol,
    LogForwarder,
    MainLink,
    WorkerLink,
)
from tests.workers_parts import Joined


@define(eq=False)
class Channel:
    """A client connection as the connection tables see it."""

    in_tunnel: bool = False
    drained: int = 0

    def drain(self) -> None:
        self.drained += 1


@define
class Pair:
    """A main-side WorkerLink and a worker-side MainLink, joined."""

    connections: ClientConnections
    accesses: list[dict[str, float]] = field(factory=list)
    events: list[dict[str, Any]] = field(factory=list)
    drains: int = 0
    snapshot_answer: Any = None
    worker: WorkerLink = field(init=False)
    main: MainLink = field(init=False)
    joined: Joined = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.worker = WorkerLink(
            1, self.connections, lambda batch: self.accesses.append(dict(batch)),
            publisher=self.events.append,
        )
        self.main = MainLink(
            snapshot=lambda: self.snapshot_answer,
            drain=self._drained,
        )
        self.joined = Joined(self.worker.protocol, self.main.protocol)

    def _drained(self) -> None:
        self.drains += 1


class ControlProtocolTests(SynchronousTestCase):
    def test_call_and_answer(self) -> None:
        """A call is answered by the other side's handler, by its id."""
        a = ControlProtocol({})
        b = ControlProtocol({"add": lambda x, y: x + y})
        joined = Joined(a, b)
        first, second = a.call("add", x=1, y=2), a.call("add", x=10, y=20)
        joined.pump()
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (3, 30))

    def test_deferred_answer(self) -> None:
        """A handler may answer later, with a Deferred."""
        later: Deferred[str] = Deferred()
        a, b = ControlProtocol({}), ControlProtocol({"wait": lambda: later})
        joined = Joined(a, b)
        answer = a.call("wait")
        joined.pump()
        self.assertNoResult(answer)
        later.callback("done")
        joined.pump()
        self.assertEqual(self.successResultOf(answer), "done")

    def test_errors(self) -> None:
        """An unknown op and a failing handler fail the call on the caller's side."""
        def fails() -> None:
            raise ValueError("no")

        a, b = ControlProtocol({}), ControlProtocol({"fails": fails})
        joined = Joined(a, b)
        unknown, failing = a.call("nope"), a.call("fails")
        joined.pump()
        self.assertIn("unknown op", str(self.failureResultOf(unknown, ControlError).value))
        self.assertIn("no", str(self.failureResultOf(failing, ControlError).value))
        self.flushLoggedErrors(ValueError)

    def test_closed_channel_fails_pending_calls(self) -> None:
        """Calls unanswered when the channel closes fail, as do later ones."""
        lost: list[bool] = []
        a = ControlProtocol({}, on_lost=lambda: lost.append(True))
        b = ControlProtocol({"wait": lambda: Deferred()})
        joined = Joined(a, b)
        pending = a.call("wait")
        joined.pump()
        joined.close()
        self.failureResultOf(pending, ControlError)
        self.failureResultOf(a.call("wait"), ControlError)
        self.assertEqual(lost, [True])

    def test_message_longer_than_the_limit_closes(self) -> None:
        """A frame announcing more than MAX_MESSAGE bytes closes the channel."""
        a = ControlProtocol({})
        joined = Joined(a, ControlProtocol({}))
        a.dataReceived(struct.pack("!I", MAX_MESSAGE + 1))
        self.assertTrue(joined.a_transport.disconnecting)

    def test_snapshot_larger_than_amp_values(self) -> None:
        """A snapshot of more than 64 KiB goes through (AMP's limit does not hold)."""
        pair = Pair(ClientConnections(4))
        pair.snapshot_answer = {"top": ["x" * 100] * 1000}
        answer = pair.worker.snapshot()
        pair.joined.pump()
        self.assertEqual(self.successResultOf(answer), pair.snapshot_answer)


class AdmissionTests(SynchronousTestCase):
    def test_one_table_for_every_process(self) -> None:
        """
        The main process's own connections and those a worker admitted
        count against one cap: with 4, two here and two there leave no
        room in either.
        """
        connections = ClientConnections(4)
        pair = Pair(connections)
        remote = RemoteConnections(pair.main, 4)
        self.assertTrue(connections.admit(Channel(), "10.0.0.1"))
        self.assertTrue(connections.admit(Channel(), "10.0.0.1"))
        answers = [remote.admit(Channel(), "10.0.0.1") for _ in range(3)]
        pair.joined.pump()
        self.assertEqual([self.successResultOf(a) for a in answers], [True, True, False])
        self.assertFalse(connections.admit(Channel(), "10.0.0.1"))
        self.assertEqual(connections.open_from("10.0.0.1"), 4)
        # Another address has its own room.
        other = remote.admit(Channel(), "10.0.0.2")
        pair.joined.pump()
        self.assertTrue(self.successResultOf(other))

    def test_release_frees_the_slot_in_the_main_process(self) -> None:
        connections = ClientConnections(1)
        pair = Pair(connections)
        remote = RemoteConnections(pair.main, 1)
        channel = Channel()
        admitted = remote.admit(channel, "10.0.0.1")
        pair.joined.pump()
        self.assertTrue(self.successResultOf(admitted))
        self.assertFalse(connections.admit(Channel(), "10.0.0.1"))
        remote.release(channel)
        pair.joined.pump()
        self.assertEqual(connections.open_from("10.0.0.1"), 0)
        self.assertTrue(connections.admit(Channel(), "10.0.0.1"))

    def test_closed_before_the_answer(self) -> None:
        """
        A connection that closes while the main process is asked is
        released there once it has answered: no slot leaks.
        """
        connections = ClientConnections(2)
        pair = Pair(connections)
        remote = RemoteConnections(pair.main, 2)
        channel = Channel()
        answer = remote.admit(channel, "10.0.0.1")
        remote.release(channel)
        self.assertEqual(remote.busy(), 0)
        pair.joined.pump()
        self.assertFalse(self.successResultOf(answer))
        self.assertEqual(connections.open_from("10.0.0.1"), 0)

    def test_dead_worker_forgotten(self) -> None:
        """The main process forgets a dead worker's connections."""
        connections = ClientConnections(2)
        pair = Pair(connections)
        remote = RemoteConnections(pair.main, 2)
        for _ in range(2):
            remote.admit(Channel(), "::ffff:10.0.0.1")
        pair.joined.pump()
        self.assertEqual(connections.open_from("10.0.0.1"), 2)
        self.assertEqual(connections.forget_remote(1), 2)
        self.assertEqual(connections.open_from("10.0.0.1"), 0)
        # A late release of the dead worker's counts nothing.
        connections.release_remote(1, "10.0.0.1")
        self.assertEqual(connections.open_from("10.0.0.1"), 0)

    def test_main_process_gone(self) -> None:
        """Without the main process, nothing is admitted."""
        pair = Pair(ClientConnections(2))
        pair.joined.close()
        remote = RemoteConnections(pair.main, 2)
        answer = remote.admit(Channel(), "10.0.0.1")
        self.assertFalse(self.successResultOf(answer))
        self.assertEqual(remote.busy(), 0)
        self.flushLoggedErrors()

    def test_drain(self) -> None:
        """
        Draining drains the admitted connections and fires once none is
        busy; one admitted while draining is drained at once.
        """
        pair = Pair(ClientConnections(4))
        remote = RemoteConnections(pair.main, 4)
        first, second = Channel(), Channel()
        remote.admit(first, "10.0.0.1")
        pair.joined.pump()
        drained = remote.drain()
        self.assertEqual(first.drained, 1)
        remote.admit(second, "10.0.0.1")
        pair.joined.pump()
        self.assertEqual(second.drained, 1)
        self.assertNoResult(drained)
        remote.release(first)
        remote.release(second)
        self.successResultOf(drained)


class AccessesAndLogTests(SynchronousTestCase):
    def test_accesses_reach_the_writing_store(self) -> None:
        pair = Pair(ClientConnections(4))
        pair.main.send_accesses({"k": 12.5})
        pair.main.send_accesses({})
        pair.joined.pump()
        self.assertEqual(pair.accesses, [{"k": 12.5}])

    def test_drain_command(self) -> None:
        pair = Pair(ClientConnections(4))
        pair.worker.drain()
        pair.joined.pump()
        self.assertEqual(pair.drains, 1)

    def test_log_events_emitted_again_with_the_worker(self) -> None:
        """
        A worker's log events reach the main process's log in one batch
        per turn, each with ``worker`` and the worker in its system, the
        text formatting as it did in the worker.
        """
        clock = Clock()
        pair = Pair(ClientConnections(4))
        forwarder = LogForwarder(clock, pair.main.send_log)
        log = Logger(observer=forwarder)
        log.info("{line}", line="127.0.0.1 GET /a 200", log_system="access", status=200)
        log.warn("second {n}", n=2)
        pair.joined.pump()
        self.assertEqual(pair.events, [])
        clock.advance(0)
        moved = pair.joined.pump()
        self.assertGreater(moved, 0)
        self.assertEqual(
            [(e["worker"], e["log_system"], formatEvent(e)) for e in pair.events],
            [(1, "worker-1,access", "127.0.0.1 GET /a 200"), (1, "worker-1,-", "second 2")],
        )
        self.assertEqual(pair.events[0]["status"], 200)
        self.assertEqual(pair.events[1]["log_level"], LogLevel.warn)

    def test_log_batch_bounded(self) -> None:
        """Past LOG_BATCH_MAX events in one turn, the rest are dropped and counted."""
        clock = Clock()
        sent: list[tuple[int, int]] = []
        forwarder = LogForwarder(clock, lambda events, dropped: sent.append((len(events), dropped)))
        log = Logger(observer=forwarder)
        for n in range(LOG_BATCH_MAX + 3):
            log.info("{n}", n=n)
        clock.advance(0)
        self.assertEqual(sent, [(LOG_BATCH_MAX, 3)])

    def test_no_secret_in_a_message(self) -> None:
        """
        What the channel carries is what the worker logs (redacted by the
        engine); the channel adds nothing: the admit and accesses messages
        carry keys and times only.
        """
        pair = Pair(ClientConnections(4))
        pair.main.admit("10.0.0.1")
        pair.main.send_accesses({"key": 1.0})
        sent = pair.joined.b_transport.value()
        messages = []
        while sent:
            (length,) = struct.unpack("!I", sent[:4])
            messages.append(json.loads(sent[4:4 + length]))
            sent = sent[4 + length:]
        self.assertEqual(
            messages,
            [{"op": "admit", "id": 1, "args": {"key": "10.0.0.1"}},
             {"op": "accesses", "args": {"accesses": {"key": 1.0}}}],
        )
