"""
Tests for :mod:`buildcache.turns`: work put after the reactor's I/O pass
runs once what was written in the same turn has left the process.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from buildcache.turns import after_io
from tests.support import reactor


class AfterIOTests(TestCase):
    async def test_runs_after_the_turns_writes_have_gone_out(self) -> None:
        """
        Bytes written in the turn that scheduled the work are no longer in
        Twisted's buffer (they were handed to the kernel) when it runs: the
        transport has told its producer so.
        """
        server_side: Deferred[Protocol] = Deferred()
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: _Accepted(server_side))
        )
        self.addCleanup(port.stopListening)
        client = await TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port).connect(
            Factory.forProtocol(Protocol)
        )
        accepted = await server_side
        transport: Any = accepted.transport
        self.addCleanup(transport.loseConnection)
        self.addCleanup(client.transport.loseConnection)  # type: ignore[attr-defined]
        transport.write(b"x" * 1000)
        # A pull producer is asked for more at once when registered, then
        # each time the transport's buffer has emptied into the kernel.
        drained = _Drained()
        transport.registerProducer(drained, False)
        self.addCleanup(transport.unregisterProducer)
        # Still buffered in this turn: Twisted writes on its next poll.
        self.assertEqual(drained.asked, 1)
        asked_when_run: list[int] = []
        await after_io(reactor).addCallback(
            lambda _: asked_when_run.append(drained.asked)
        )
        self.assertEqual(asked_when_run, [2])


@implementer(IPullProducer)
class _Drained:
    """Counts the transport's requests for more bytes; gives none."""

    def __init__(self) -> None:
        self.asked = 0

    def resumeProducing(self) -> None:
        self.asked += 1

    def stopProducing(self) -> None:
        pass


class _Accepted(Protocol):
    def __init__(self, made: Deferred[Protocol]) -> None:
        self._made = made

    def connectionMade(self) -> None:
        self._made.callback(self)


class AfterIOClockTests(SynchronousTestCase):
    def test_two_hops(self) -> None:
        """
        With a clock, the work is two zero-delay calls away, not at once.
        """
        clock = Clock()
        fired: list[None] = []
        after_io(clock).addCallback(fired.append)
        self.assertEqual(fired, [])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual(fired, [None])
