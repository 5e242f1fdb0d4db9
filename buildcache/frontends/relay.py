"""
Handing a hit worker's connection to the main process (issue 16).

A hit worker answers fresh hits; any other request is *handed off*: from
that request on, the main process answers the client's connection as if
the client had connected to it.  Two ways, both owned here:

- *hand-over*, the usual one: the worker gives the connection itself to
  the main process (:class:`HandOver`: its socket passed over a UNIX
  socket, ``SCM_RIGHTS``, with the bytes already read of it), which adopts
  it (:meth:`RelayListeners.adopt`) and from then on talks to the client
  directly; the worker lets the socket go without shutting it down.  No
  byte of the answers crosses the worker;
- the *relay*, where a connection cannot be given (Twisted still holds
  bytes of an earlier answer for it, or it is no plain TCP connection):
  the connection is relayed byte for byte, as follows.

The relay's two ends:

- the worker's end, :class:`Relay`: it connects to the main process's
  relay socket for the port the client used (a UNIX socket), writes one
  PROXY protocol v1 line (:func:`proxy_line`: the client's real address
  and the public port, so that the main process's access rules, logs and
  per-client figures see the client, not the worker), then the raw bytes
  of the request from its first byte (kept by
  :class:`~buildcache.frontends.channel.ProxyChannel`), and pipes both ways
  until either side closes;
- the main process's end, :class:`RelayListeners`: one UNIX listener per
  public port, in a fresh private directory, wrapped in Twisted's PROXY
  protocol parser (:func:`twisted.protocols.haproxy.proxyEndpoint`), whose
  connections are served by that port's site as relayed channels (not
  admitted again: the worker admitted the client for the whole server;
  drained on stop as every connection is).

Flow control is end to end, as a tunnel's: each side's transport is the
other's streaming producer.  The request and send deadlines no longer
apply in the worker (the main process applies its own); the relay closes
when either end does.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Mapping
from typing import Any
from typing import Protocol as TypingProtocol

import attrs
from twisted.application.service import Service
from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IAddress,
    IFileDescriptorReceiver,
    IListeningPort,
    IProtocolFactory,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from buildcache.engine.body import writable_now
from buildcache.frontends.connections import ClientConnections, Drainable
from buildcache.frontends.sending import (
    SEND_STALL_TIMEOUT,
    SendCounters,
    send_counters,
    send_progressed,
)
from buildcache.turns import cancel_call

__all__ = [
    "HANDOVER_MOST_BYTES",
    "HandOffStatus",
    "HandOver",
    "Relay",
    "RelayClient",
    "RelayListeners",
    "RelayTarget",
    "hand_off_request",
    "proxy_line",
]

_log = Logger()

#: Seconds a worker waits for the main process to accept a relay.
RELAY_CONNECT_TIMEOUT = 10.0
#: The most bytes a hand-over brings with its connection (the main
#: process reads no more): a channel keeps less of one request
#: (``ProxyChannel.raw_limit``).
HANDOVER_MOST_BYTES = 1024 * 1024


def handover_path(relay_path: str) -> str:
    """The hand-over socket of the port whose relay socket is ``relay_path``."""
    return relay_path + ".fd"


def _address_text(address: IAddress) -> tuple[str, str, int] | None:
    """(PROXY family, host, port) of a TCP address; None for any other."""
    if isinstance(address, IPv4Address):
        return "TCP4", address.host, address.port
    if isinstance(address, IPv6Address):
        # A scope (fe80::1%eth0) has no place in a PROXY line.
        return "TCP6", address.host.split("%", 1)[0], address.port
    return None


def proxy_line(client: IAddress, local: IAddress) -> bytes:
    """
    The PROXY protocol v1 header for a connection from ``client`` to
    ``local`` (the public address and port it reached):
    ``PROXY TCP4 1.2.3.4 10.0.0.1 51234 3142\\r\\n``; ``PROXY UNKNOWN`` when
    either is not a TCP address of the same family.
    """
    source, destination = _address_text(client), _address_text(local)
    if source is None or destination is None or source[0] != destination[0]:
        return b"PROXY UNKNOWN\r\n"
    family, source_host, source_port = source
    _, destination_host, destination_port = destination
    return (
        f"PROXY {family} {source_host} {destination_host}"
        f" {source_port} {destination_port}\r\n"
    ).encode("ascii")


@attrs.frozen
class RelayTarget:
    """
    Where a worker's channel relays a handed-off connection: the main
    process's relay socket for the channel's port.
    """

    reactor: Any
    path: str
    connect_timeout: float = RELAY_CONNECT_TIMEOUT
    #: Seconds a client may take nothing of what the main process sent
    #: before it closed its side (then the connection is cut).
    send_stall_timeout: float = SEND_STALL_TIMEOUT
    #: Whether connections are given to the main process where they can
    #: be (:class:`HandOver`); relayed otherwise.
    hand_over: bool = True

    def connect(self, channel: RelayClient, path: str, factory: Any) -> Deferred[Any]:
        """
        Stop reading ``channel``'s client (its bytes wait in the kernel)
        and connect to the main process's socket ``path`` with ``factory``.
        """
        transport = channel.client_transport
        # Nothing is being sent: the channel stops being its producer.
        transport.unregisterProducer()
        transport.pauseProducing()
        endpoint = UNIXClientEndpoint(self.reactor, path, timeout=int(self.connect_timeout))
        connecting: Deferred[Any] = endpoint.connect(factory)
        return connecting

    def unreachable(
        self, channel: RelayClient, client: str, path: str, failure: Failure
    ) -> None:
        """The main process's socket ``path`` could not be reached: 503."""
        _log.error(
            "Could not hand {client}'s connection to the main process ({path}):"
            " {error}",
            event="relay_failed", client=client, path=path,
            error=failure.getErrorMessage(),
        )
        channel.answer_and_close(
            503, "this worker could not reach the main process; try again"
        )

    def can_hand_over(self, transport: Any, raw: bytes) -> bool:
        """
        Whether the connection of ``transport``, of which ``raw`` was read
        from the request handed off on, may be given whole: a plain TCP
        connection (given once Twisted has nothing left to write to it).
        """
        return (
            self.hand_over and bool(raw) and isinstance(transport, tcp.Connection)
            and not getattr(transport, "TLS", False)
        )


class RelayClient(TypingProtocol):
    """What a :class:`Relay` needs of the client's connection."""

    @property
    def client_transport(self) -> Any:
        """The connection to the client (a TCP transport in service)."""

    def answer_and_close(self, status: int, explanation: str) -> None:
        """Answer with an error and close the connection."""


class _MainSide(Protocol):
    """The relay's connection to the main process."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def dataReceived(self, data: bytes) -> None:
        self._relay.from_main(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._relay.main_lost()


@implementer(IPushProducer)
@attrs.define(eq=False, repr=False)
class _MainSideProducer:
    """
    The main side's connection as the producer of the client's: paused
    and resumed with the client's back-pressure, which the relay watches
    for a client that takes nothing.
    """

    relay: Relay
    main: Any

    def pauseProducing(self) -> None:
        self.main.pauseProducing()
        self.relay.client_paused()

    def resumeProducing(self) -> None:
        self.relay.client_resumed()
        self.main.resumeProducing()

    def stopProducing(self) -> None:
        self.main.stopProducing()


@attrs.define(eq=False, repr=False)
class _MainSideFactory(Factory):
    relay: Relay
    # One is made per hand-off: no start and stop lines for each.
    noisy = False

    def buildProtocol(self, addr: Any) -> _MainSide:
        return _MainSide(self.relay)


@attrs.define(eq=False, repr=False)
class Relay:
    """
    One handed-off client connection, from the request handed off on:
    :meth:`start` connects to ``target`` and sends ``header`` (the PROXY
    line and the raw bytes kept so far); the channel passes the client's
    later bytes (:meth:`from_client`) and its loss (:meth:`client_lost`).
    """

    log = Logger()

    channel: RelayClient
    target: RelayTarget
    #: The client's request, which may carry its credentials: never shown
    #: (no repr of this class).
    header: bytes
    #: The client, for logs.
    client: str
    _pending: list[bytes] = attrs.Factory(list)
    _connecting: Deferred[Any] | None = None
    _main: Any = None
    _client_closed: bool = False
    _main_closed: bool = False
    #: The check of a client that may take nothing after the main side
    #: closed (see :meth:`main_lost`).
    _stall_check: Any = None

    def start(self) -> None:
        # The main side's transport becomes the client's producer once
        # connected.
        self._connecting = self.target.connect(
            self.channel, self.target.path, _MainSideFactory(self)
        )
        self._connecting.addCallbacks(self._connected, self._failed)

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self._client_closed:
            self.target.unreachable(self.channel, self.client, self.target.path, failure)

    def _connected(self, main: _MainSide) -> None:
        self._connecting = None
        self._main = main.transport
        if self._client_closed:
            self._main.loseConnection()
            return
        client_transport = self.channel.client_transport
        pending, self._pending = [self.header, *self._pending], []
        self._main.writeSequence(pending)
        client_transport.registerProducer(_MainSideProducer(self, self._main), True)
        self._main.registerProducer(client_transport, True)
        client_transport.resumeProducing()

    def from_client(self, data: bytes) -> None:
        if self._main is None:
            # Only what arrived with the request: the client is paused
            # until the main process has accepted.
            self._pending.append(data)
        elif not self._main_closed:
            self._main.write(data)

    def from_main(self, data: bytes) -> None:
        if not self._client_closed:
            self.channel.client_transport.write(data)

    def client_lost(self) -> None:
        self._client_closed = True
        cancel_call(self._stall_check)
        self._stall_check = None
        if self._connecting is not None:
            self._connecting.cancel()
        elif self._main is not None and not self._main_closed:
            self._main.loseConnection()

    def main_lost(self) -> None:
        self._main_closed = True
        if not self._client_closed:
            transport = self.channel.client_transport
            transport.loseConnection()
            # What is still buffered for the client goes out first; a
            # client that takes none of it is cut, as the main process
            # cuts it (its connection, and its slot under the cap, would
            # be held for ever otherwise).
            self.client_paused()

    def client_paused(self) -> None:
        """
        The client stopped taking what the main process sends: it has
        the send-stall timeout to take some of it (as on a channel of the
        main process, which sees only the relay's socket fill up).
        """
        if self._stall_check is None and not self._client_closed:
            self._watch_stall(send_counters(self.channel.client_transport))

    def client_resumed(self) -> None:
        if not self._main_closed:
            cancel_call(self._stall_check)
            self._stall_check = None

    def _watch_stall(self, before: SendCounters) -> None:
        def check() -> None:
            self._stall_check = None
            if self._client_closed:
                return
            transport = self.channel.client_transport
            now = send_counters(transport)
            if send_progressed(before, now):
                self._watch_stall(now)
                return
            self.log.info(
                "Client {client} took nothing of its response (relayed) for"
                " {timeout}s: closing", client=self.client,
                timeout=self.target.send_stall_timeout, event="client_stalled",
            )
            transport.abortConnection()

        self._stall_check = self.target.reactor.callLater(
            self.target.send_stall_timeout, check
        )


class _Giver(Protocol):
    """
    A worker's connection to the main process's hand-over socket: sends
    one client socket and the bytes read of it, then closes; the worker's
    descriptor of the socket is closed once the message has gone.
    """

    _fd = -1

    def give(self, fd: int, raw: bytes) -> None:
        assert self.transport is not None
        self._fd = fd
        # Sent with the first byte of raw (sendmsg), so raw must not be empty.
        self.transport.sendFileDescriptor(fd)  # type: ignore[attr-defined]
        self.transport.write(raw)
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@attrs.define(eq=False, repr=False)
class HandOver:
    """
    One client connection given to the main process (see the module
    docstring): :meth:`start` pauses the client, connects to the port's
    hand-over socket and then passes the client's socket and ``raw`` (the
    bytes read from the request handed off on), and ends the worker's side
    of the connection without a shutdown: the socket is the main
    process's.  If Twisted still holds bytes of an earlier answer for the
    client by then (pipelined requests), the connection is relayed
    instead (``relay_instead``, given ``raw``).  If the main process
    cannot be reached, the client is answered 503 as by a failed relay.
    """

    channel: RelayClient
    target: RelayTarget
    #: The client's request, which may carry its credentials: never shown.
    raw: bytes
    client: str
    relay_instead: Callable[[bytes], None]
    _connecting: Deferred[Any] | None = None
    _client_closed: bool = False

    def start(self) -> None:
        self._connecting = self.target.connect(
            self.channel, handover_path(self.target.path), Factory.forProtocol(_Giver)
        )
        self._connecting.addCallbacks(self._connected, self._failed)

    def from_client(self, data: bytes) -> None:
        # Read before the pause took: it goes along.
        self.raw += data

    def client_lost(self) -> None:
        self._client_closed = True
        if self._connecting is not None:
            self._connecting.cancel()

    def _failed(self, failure: Failure) -> None:
        self._connecting = None
        if not self._client_closed:
            self.target.unreachable(
                self.channel, self.client, handover_path(self.target.path), failure
            )

    def _connected(self, giver: _Giver) -> None:
        self._connecting = None
        transport = self.channel.client_transport
        if not self._client_closed and not transport.disconnecting and not writable_now(transport):
            # An earlier answer still in Twisted's buffer: the write the
            # reactor would do on its next pass, now.
            transport.doWrite()
        if self._client_closed or not writable_now(transport):
            assert giver.transport is not None
            giver.transport.loseConnection()
            if not self._client_closed:
                self.relay_instead(self.raw)
            return
        # Out of the reactor, then the descriptor taken from Twisted's
        # socket object: closing the transport below then neither shuts
        # the connection down nor closes the descriptor, which goes to the
        # main process (and is closed here once sent).
        transport.stopReading()
        transport.stopWriting()
        fd = transport.getHandle().detach()
        giver.give(fd, self.raw)
        transport.connectionLost(Failure(ConnectionDone("handed to the main process")))


@implementer(IFileDescriptorReceiver)
class _Taker(Protocol):
    """
    The main process's end of one hand-over: a client socket and the bytes
    read of it, adopted once the worker has closed.
    """

    def __init__(self, listeners: RelayListeners, name: str) -> None:
        self._listeners = listeners
        self._name = name
        self._fds: list[int] = []
        self._raw: list[bytes] = []
        self._size = 0

    def fileDescriptorReceived(self, descriptor: int) -> None:
        self._fds.append(descriptor)

    def dataReceived(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > HANDOVER_MOST_BYTES:
            self._raw = []
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self._raw.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        fds, self._fds = self._fds, []
        raw = b"".join(self._raw) if self._size <= HANDOVER_MOST_BYTES else b""
        self._listeners.adopt(self._name, fds, raw)


@attrs.define(eq=False)
class _TakerFactory(Factory):
    listeners: RelayListeners
    name: str
    noisy = False

    def buildProtocol(self, addr: Any) -> _Taker:
        return _Taker(self.listeners, self.name)


@attrs.frozen
class _AdmittedByAWorker:
    """
    The main process's connection table as a handed-over connection sees
    it: counted whatever the count (a worker admitted it, and releases
    its own slot as it lets go), released and drained as any other.
    """

    table: ClientConnections

    def admit(self, channel: Drainable, host: str) -> bool:
        self.table.count(channel, host)
        return True

    def release(self, channel: Drainable) -> None:
        self.table.release(channel)

    def changed(self) -> None:
        self.table.changed()

    def busy(self) -> int:
        return self.table.busy()

    def drain(self) -> Deferred[None]:
        return self.table.drain()


@attrs.define(eq=False)
class _AdoptingFactory(Factory):
    """A port's site's channel for one adopted connection, kept."""

    site: Any
    built: Any = None

    def buildProtocol(self, addr: Any) -> Any:
        channel = self.site.buildProtocol(addr)
        channel.connections = _AdmittedByAWorker(self.site.connections)
        self.built = channel
        return channel


def _family(fd: int) -> int:
    """The address family of the socket ``fd`` (left open)."""
    probe = socket.socket(fileno=fd)
    try:
        return probe.family
    finally:
        probe.detach()


def hand_off_request(request: Request) -> None:
    """
    Relay ``request``'s connection (from ``request`` on) to the main
    process: what a worker's service gives a hits-only engine as its
    ``on_hand_off``.  A client already gone needs nothing.
    """
    # A ProxyChannel (the sites build no other); None once the client left.
    hand_off = getattr(request.channel, "hand_off", None)
    if hand_off is not None:
        hand_off()


@attrs.define
class HandOffStatus:
    """
    The status pages of a hit worker: handed off, since the main process
    holds the totals across workers.
    """

    paths: frozenset[str]

    def serve(self, request: Request, path: str) -> None:
        hand_off_request(request)


@attrs.define(eq=False)
class _RelayedFactory(Factory):
    """
    Builds a port's site's channels for relayed connections: marked
    ``relayed`` and counted by ``connections`` (drained on stop, never
    refused: the worker admitted the client).
    """

    site: Any
    connections: Any
    listeners: RelayListeners

    def doStart(self) -> None:
        self.site.doStart()

    def doStop(self) -> None:
        self.site.doStop()

    def buildProtocol(self, addr: Any) -> Any:
        channel = self.site.buildProtocol(addr)
        self.listeners.accepted += 1
        channel.relayed = True
        channel.connections = self.connections
        return channel


class RelayListeners(Service):
    """
    The main process's relay sockets, one per public port (by name:
    ``proxy``, ``index``, ``registry``), listened on from
    ``privilegedStartService`` (before workers start) in a fresh directory
    only this user can enter, removed on stop.  ``connections`` counts the
    relayed channels (never refusing one) so that a stopping server drains
    them (:meth:`drain`).
    """

    log = Logger()

    def __init__(
        self, reactor: Any, sites: Mapping[str, Any], connections: Any,
        directory: str | None = None,
    ) -> None:
        self._reactor = reactor
        self._sites = dict(sites)
        self.connections = connections
        #: A fresh directory (mkdtemp makes it 0700).
        self.directory = directory if directory is not None else tempfile.mkdtemp(
            prefix="buildcache-relay-"
        )
        #: The socket path of each port: what workers are told.
        self.paths: dict[str, str] = {
            name: os.path.join(self.directory, f"{name}.sock") for name in self._sites
        }
        self.ports: list[IListeningPort] = []
        #: Connections relayed so far (all ports).
        self.accepted = 0
        #: Connections handed over so far (all ports).
        self.adopted = 0

    def startService(self) -> None:
        # Not privilegedStartService: the sockets belong to the user the
        # server runs as, whom its workers run as too.
        super().startService()
        for name, site in self._sites.items():
            endpoint = proxyEndpoint(UNIXServerEndpoint(self._reactor, self.paths[name]))
            factory: IProtocolFactory = _RelayedFactory(site, self.connections, self)
            # A UNIX listen completes at once.
            endpoint.listen(factory).addCallbacks(self.ports.append, self._cannot_listen)
            UNIXServerEndpoint(self._reactor, handover_path(self.paths[name])).listen(
                _TakerFactory(self, name)
            ).addCallbacks(self.ports.append, self._cannot_listen)

    def adopt(self, name: str, fds: list[int], raw: bytes) -> None:
        """
        Serve the client connection a worker handed over on port ``name``
        (``fds``: the one socket it passed) with that port's site, first
        with ``raw``, the bytes the worker had read of it.
        """
        if len(fds) != 1 or not raw:
            for fd in fds:
                os.close(fd)
            self.log.error(
                "A hand-over on the {port} port came with {count} connections"
                " and {size} bytes: dropped",
                event="relay_failed", port=name, count=len(fds), size=len(raw),
            )
            return
        [fd] = fds
        factory = _AdoptingFactory(self._sites[name])
        try:
            self._reactor.adoptStreamConnection(fd, _family(fd), factory)
        except OSError as error:
            # The client's connection broke meanwhile.
            self.log.info(
                "A handed-over connection could not be adopted: {error}",
                event="relay_failed", error=str(error),
            )
            return
        finally:
            # The reactor holds its own descriptor of the socket.
            os.close(fd)
        channel = factory.built
        if channel is None:
            return
        self.adopted += 1
        channel.dataReceived(raw)

    def _cannot_listen(self, failure: Failure) -> None:
        raise SystemExit(
            f"buildcache: cannot listen on the workers' relay sockets in"
            f" {self.directory}: {failure.getErrorMessage()}"
        )

    def drain(self) -> Deferred[None]:
        """
        Close every relayed connection once its response under way has
        gone out; fires when none is busy.
        """
        result: Deferred[None] = self.connections.drain()
        return result

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stopped = DeferredList(
            [maybeDeferred(port.stopListening) for port in self.ports],
            consumeErrors=True,
        )
        self.ports = []

        def removed(result: Any) -> Any:
            shutil.rmtree(self.directory, ignore_errors=True)
            return result

        return stopped.addBoth(removed)
