"""
A gate in front of the object store's S3 port, for the shared-tier
end-to-end tests: a TCP forwarder on 127.0.0.1 that records the request
line of every request it forwards, and can hold an upload after its first
chunk, so that a test can kill the store while a node is uploading
(:meth:`StoreGate.hold_upload`), or stall every request (a store that
accepts connections and never answers: :meth:`StoreGate.stall`).  Bytes pass through unchanged (a SigV4
signature covers the ``Host`` the node sent, which is the gate's), with
back-pressure both ways.
"""

from __future__ import annotations

import re
from typing import Any

from attrs import define, field, frozen
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol, ServerFactory
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["StoreGate", "StoreRequest"]

reactor: Any = _reactor

#: A request line at the start of a chunk (or after a CRLF): what the gate
#: records.  A body could contain one by chance; pattern bytes do not.
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(GET|HEAD|PUT|POST|DELETE) (/[^ \r\n]*) HTTP/1\.[01]\r\n")


@frozen
class StoreRequest:
    """One request the gate forwarded to the store (its query left off)."""

    method: str
    path: str


class _ToStore(Protocol):
    def __init__(self, peer: _FromNode) -> None:
        self.peer = peer

    def connectionMade(self) -> None:
        assert self.transport is not None and self.peer.transport is not None
        self.peer.store = self
        # Back-pressure both ways: neither side fills the gate's memory.
        # The node's side is paused through the peer, which keeps a held
        # upload paused whatever the store's side asks.
        self.transport.registerProducer(self.peer, True)  # type: ignore[attr-defined]
        self.peer.transport.registerProducer(self.transport, True)  # type: ignore[attr-defined]
        self.peer.store_ready = True
        self.peer.update()

    def dataReceived(self, data: bytes) -> None:
        assert self.peer.transport is not None
        self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        assert self.peer.transport is not None
        self.peer.transport.loseConnection()


class _StoreConnector(ClientFactory):
    def __init__(self, peer: _FromNode) -> None:
        self.peer = peer

    def buildProtocol(self, addr: object) -> _ToStore:
        return _ToStore(self.peer)

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        assert self.peer.transport is not None
        self.peer.transport.loseConnection()


@implementer(IPushProducer)
class _FromNode(Protocol):
    """
    The node's side of one forwarded connection; also the producer the
    store's side pauses, so that a held upload stays held.
    """

    def __init__(self, gate: StoreGate) -> None:
        self.gate = gate
        self.store: _ToStore | None = None
        self.store_ready = False
        self.held = False
        self.paused_by_store = False

    def connectionMade(self) -> None:
        self.gate.connections.append(self)
        # Nothing is read until the store's side is connected.
        self.update()
        reactor.connectTCP("127.0.0.1", self.gate.store_port, _StoreConnector(self))

    def update(self) -> None:
        if self.transport is None:
            return
        paused = self.held or self.paused_by_store or self.gate.stalled
        if self.store_ready and not paused:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
        else:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def pauseProducing(self) -> None:
        self.paused_by_store = True
        self.update()

    def resumeProducing(self) -> None:
        self.paused_by_store = False
        self.update()

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        hold = self.gate.saw(data)
        if self.store is None or self.store.transport is None:
            # The store's side is gone (the store was killed): this side
            # is closing too.
            return
        self.store.transport.write(data)
        if hold:
            self.held = True
            self.update()

    def release(self) -> None:
        self.held = False
        self.update()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self in self.gate.connections:
            self.gate.connections.remove(self)
        if self.store is not None and self.store.transport is not None:
            self.store.transport.loseConnection()


@define(eq=False)
class StoreGate:
    """
    A TCP forwarder from a loopback port to the store's S3 port.  It
    records the request line of every request it forwards
    (:attr:`requests`), and :meth:`hold_upload` stops the next upload
    whose request line matches after its first chunk: the node is then
    uploading, the store has part of the body, and the test acts (kills
    the store) before :meth:`release`.
    """

    store_port: int
    requests: list[StoreRequest] = field(factory=list)
    connections: list[_FromNode] = field(factory=list)
    port: IListeningPort | None = None
    #: While set, nothing more is read from any node (see :meth:`stall`).
    stalled: bool = False
    _holds: list[tuple[re.Pattern[bytes], Deferred[StoreRequest]]] = field(factory=list)

    def listen(self, testcase: Any) -> int:
        factory = ServerFactory.forProtocol(lambda: _FromNode(self))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        testcase.addCleanup(self.close)
        return self.port_number

    @property
    def port_number(self) -> int:
        assert self.port is not None
        address: Any = self.port.getHost()
        return int(address.port)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port_number}"

    def saw(self, data: bytes) -> bool:
        """Record the request lines in ``data``; whether to hold its connection."""
        hold = False
        for method, target in _REQUEST_LINE.findall(data):
            seen = StoreRequest(method.decode(), target.split(b"?", 1)[0].decode("latin-1"))
            self.requests.append(seen)
            line = method + b" " + target
            for item in list(self._holds):
                if item[0].search(line):
                    self._holds.remove(item)
                    item[1].callback(seen)
                    hold = True
        return hold

    def hold_upload(self, path_pattern: str) -> Deferred[StoreRequest]:
        """
        Hold the next ``PUT`` whose path matches ``path_pattern`` (a
        regular expression) after its first chunk; fires with it then.
        """
        held: Deferred[StoreRequest] = Deferred()
        self._holds.append((re.compile(b"^PUT /[^ ]*" + path_pattern.encode()), held))
        return held

    def release(self) -> None:
        for connection in list(self.connections):
            connection.release()

    def stall(self) -> None:
        """
        A slow store: from now on the gate reads nothing more from any
        node, so no request that was not already forwarded is answered
        (until :meth:`unstall`).
        """
        self.stalled = True
        for connection in list(self.connections):
            connection.update()

    def unstall(self) -> None:
        self.stalled = False
        for connection in list(self.connections):
            connection.update()

    async def close(self) -> None:
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.loseConnection()
        if self.port is not None:
            stopped = self.port.stopListening()
            if stopped is not None:
                await stopped
