"""
Pieces shared by the workers' unit tests: two control-channel ends joined
through StringTransports, pumped by hand.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.testing import StringTransport

from buildcache.workers.control import ControlProtocol


@define
class Joined:
    """Two ends of a control channel, each with a StringTransport."""

    a: ControlProtocol
    b: ControlProtocol
    a_transport: StringTransport = field(factory=StringTransport)
    b_transport: StringTransport = field(factory=StringTransport)

    def __attrs_post_init__(self) -> None:
        self.a.makeConnection(self.a_transport)
        self.b.makeConnection(self.b_transport)

    def pump(self) -> int:
        """Deliver what each side wrote to the other, until both are quiet."""
        moved = 0
        while True:
            to_b = self.a_transport.value()
            to_a = self.b_transport.value()
            if not to_a and not to_b:
                return moved
            self.a_transport.clear()
            self.b_transport.clear()
            if to_b:
                self.b.dataReceived(to_b)
            if to_a:
                self.a.dataReceived(to_a)
            moved += len(to_a) + len(to_b)

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.a.connectionLost(Failure(ConnectionDone()))
        self.b.connectionLost(Failure(ConnectionDone()))
