"""
``CONNECT`` tunnels on the proxy port.

This module owns a ``CONNECT host:port`` request from the moment its
request line is read: its head (:class:`ConnectHead`: the target and a
bounded, strictly parsed set of header lines), the decision on it
(:class:`TunnelSettings`: the ports allowed, and the
:class:`~buildcache.access.AccessPolicy` for the client and the target),
and the :class:`Tunnel` itself.  The tunnel opens the upstream connection
through the connection guard (:func:`buildcache.fetch.connect.connect_tcp`,
so the address connected to is the address checked) and then splices
bytes both ways until either side closes or the tunnel stays idle too
long.  :class:`buildcache.frontends.channel.ProxyChannel` reads the bytes
and hands a ``CONNECT`` here; what a tunnel needs of it is
:class:`TunnelClient`.

A tunnel carries opaque (TLS) bytes: nothing in it is inspected or cached.
Flow control is end to end: each side's transport is the other's streaming
producer, so a slow reader pauses the fast writer and nothing buffers
without bound.
"""

from __future__ import annotations

import re
from typing import Any, cast
from typing import Protocol as TypingProtocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from buildcache.access import AccessPolicy, InvalidHost, Verdict, normalize_host
from buildcache.engine.errors import TargetRefused, UpstreamError, status_for
from buildcache.fetch.connect import HostnameResolver, connect_tcp
from buildcache.turns import cancel_call

__all__ = [
    "DEFAULT_CONNECT_PORTS",
    "ConnectHead",
    "ConnectTarget",
    "Tunnel",
    "TunnelClient",
    "TunnelSettings",
    "parse_connect_target",
]

#: ``CONNECT`` is for HTTPS; any other port would make the cache a generic
#: TCP relay.
DEFAULT_CONNECT_PORTS: frozenset[int] = frozenset({443})

_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

_AUTHORITY = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/@?#\s]+):([0-9]{1,5})")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@attrs.frozen
class ConnectTarget:
    """Where a ``CONNECT`` wants to go: a normalised host and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_connect_target(authority: bytes) -> ConnectTarget:
    """
    Parse the authority-form target of ``CONNECT`` (``host:port``,
    ``[v6]:port``); the port is required.

    :raise ValueError: anything else, with a reason fit for a 400 body.
    """
    match = _AUTHORITY.fullmatch(authority)
    if match is None:
        raise ValueError("CONNECT target must be host:port")
    host_bytes, port_bytes = match.groups()
    port = int(port_bytes)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}")
    try:
        host = normalize_host(host_bytes.decode("ascii"))
    except (UnicodeDecodeError, InvalidHost) as error:
        raise ValueError(f"invalid host: {error}") from None
    return ConnectTarget(host, port)


@attrs.define
class ConnectHead:
    """
    A ``CONNECT`` request being read: its target (or why it has none) and
    what its header lines have used of their budget.  The header lines are
    only checked, never kept: a tunnel forwards none of them.
    """

    target: ConnectTarget | None
    error: str | None
    #: The target as sent, for logs (shortened: it may be garbage).
    requested: str
    size: int
    header_count: int = 0

    @classmethod
    def begin(cls, line: bytes) -> ConnectHead:
        """The head whose request line is ``line`` (``CONNECT ...``)."""
        parts = line.split(b" ")
        target: ConnectTarget | None = None
        error: str | None = None
        if len(parts) != 3 or _VERSION.fullmatch(parts[2]) is None:
            error = "malformed CONNECT request line"
        else:
            try:
                target = parse_connect_target(parts[1])
            except ValueError as e:
                error = str(e)
        words = line.split()
        requested = (words[1] if len(words) > 1 else b"")[:200].decode(
            "ascii", "backslashreplace"
        )
        return cls(target, error, requested, len(line))

    def header_line(self, line: bytes, max_size: int, max_headers: int) -> str | None:
        """
        Take one header line (not the empty line that ends the head): why
        the request is refused with 400, or None while it is acceptable.
        """
        self.size += len(line)
        if line[:1] in (b" ", b"\t"):
            return "obsolete line folding in the request headers"
        name, colon, _ = line.partition(b":")
        self.header_count += 1
        if not colon or _HEADER_NAME.fullmatch(name) is None:
            return "malformed header line"
        if self.size > max_size or self.header_count > max_headers:
            return "request headers too large"
        return None


@attrs.frozen
class TunnelSettings:
    """
    What a channel needs to open tunnels.

    :ivar reactor: for TCP connections (and DNS, unless ``resolver``).
    :ivar policy: decides which clients may tunnel, and to where.
    :ivar connect_timeout: seconds for DNS plus the TCP connect.
    :ivar idle_timeout: seconds without a byte either way before both
        sides are closed.
    :ivar connect_ports: ports ``CONNECT`` may reach; ports other than 443
        are judged by ``policy.host_allowed`` (``connect_allowed`` is
        443-only by design), so widening this is for tests.
    :ivar clock: runs the idle timer; the reactor when ``None``.
    :ivar resolver: an ``IHostnameResolver``; the reactor's when ``None``.
    """

    reactor: Any
    policy: AccessPolicy
    connect_timeout: float = 30.0
    idle_timeout: float = 300.0
    connect_ports: frozenset[int] = DEFAULT_CONNECT_PORTS
    clock: IReactorTime | None = None
    resolver: HostnameResolver | None = None

    @property
    def timer(self) -> Any:
        return self.clock if self.clock is not None else self.reactor

    def target_verdict(self, target: ConnectTarget) -> Verdict:
        if target.port not in self.connect_ports:
            allowed = ", ".join(str(port) for port in sorted(self.connect_ports))
            return Verdict.refuse(
                f"CONNECT is only allowed to port {allowed}, not {target.port}"
            )
        if target.port == 443:
            return self.policy.connect_allowed(target.host, target.port)
        return self.policy.host_allowed(target.host, target.port)


class TunnelClient(TypingProtocol):
    """What a :class:`Tunnel` needs of the client's connection."""

    @property
    def client_transport(self) -> Any:
        """The connection to the client (a TCP transport in service)."""

    def answer_and_close(self, status: int, explanation: str) -> None:
        """Answer with an error and close the connection."""


class _UpstreamSide(Protocol):
    """The tunnel's connection to the target."""

    def __init__(self, tunnel: Tunnel):
        self._tunnel = tunnel

    @property
    def upstream_transport(self) -> Any:
        """The connection to the target (a TCP transport in service)."""
        return self.transport

    def connectionMade(self) -> None:
        # Hold the target's bytes until the client has its 200 answer.
        self.upstream_transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self._tunnel.from_upstream(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._tunnel.upstream_lost()


@attrs.define(eq=False)
class _UpstreamFactory(Factory):
    tunnel: Tunnel

    def buildProtocol(self, addr: Any) -> _UpstreamSide:
        return _UpstreamSide(self.tunnel)


@attrs.define(eq=False)
class Tunnel:
    """
    One ``CONNECT`` tunnel from the moment its head was accepted: the
    client's connection is ``channel``'s, the target's is opened by
    :meth:`start`.  The channel hands it the client's bytes
    (:meth:`from_client`) and tells it when the client has gone
    (:meth:`client_lost`).
    """

    log = Logger()

    channel: TunnelClient
    settings: TunnelSettings
    target: ConnectTarget
    client: str
    bytes_to_upstream: int = 0
    bytes_to_client: int = 0
    _pending: list[bytes] = attrs.Factory(list)
    _connecting: Deferred[Any] | None = None
    _upstream: _UpstreamSide | None = None
    _upstream_address: str | None = None
    _opened_at: float | None = None
    _last_activity: float = 0.0
    _idle_call: Any = None
    _client_closed: bool = False
    _upstream_closed: bool = False
    _finished: bool = False

    def start(self) -> None:
        transport = self.channel.client_transport
        # The channel stops being the client's producer: from now on the
        # target's transport is, once connected.
        transport.unregisterProducer()
        transport.pauseProducing()
        opening = Deferred.fromCoroutine(self._open())
        if not opening.called:
            self._connecting = opening

    async def _open(self) -> None:
        settings = self.settings
        try:
            upstream = await connect_tcp(
                settings.reactor,
                settings.policy,
                self.target.host,
                self.target.port,
                cast(IProtocolFactory, _UpstreamFactory(self)),
                settings.connect_timeout,
                settings.resolver,
            )
        except (CancelledError, ConnectingCancelledError):
            # The client left while we were connecting.
            return
        except TargetRefused as error:
            self._fail(status_for(error), error.reason)
            return
        except UpstreamError as error:
            self._fail(status_for(error), str(error))
            return
        except Exception as error:
            # A bug, not a network condition: log it with its traceback.
            self.log.failure(
                "CONNECT {target}: unexpected connection failure",
                target=str(self.target),
            )
            self._fail(502, f"cannot connect to {self.target}: {error}")
            return
        finally:
            self._connecting = None
        assert isinstance(upstream, _UpstreamSide)
        self._established(upstream)

    def _fail(self, status: int, reason: str) -> None:
        self.log.warn(
            "CONNECT {target} from {client} failed ({status}): {reason}",
            event="tunnel_refused" if status == 403 else "tunnel_failed",
            client=self.client,
            target=str(self.target),
            status=status,
            reason=reason,
        )
        self._finished = True
        if not self._client_closed:
            self.channel.answer_and_close(status, reason)

    def _established(self, upstream: _UpstreamSide) -> None:
        self._upstream = upstream
        upstream_transport = upstream.upstream_transport
        if self._client_closed:
            upstream_transport.loseConnection()
            return
        client_transport = self.channel.client_transport
        peer = upstream_transport.getPeer()
        self._upstream_address = getattr(peer, "host", str(peer))
        client_transport.write(_ESTABLISHED)
        client_transport.registerProducer(upstream_transport, True)
        upstream_transport.registerProducer(client_transport, True)
        clock = self.settings.timer
        self._opened_at = self._last_activity = clock.seconds()
        self._idle_call = clock.callLater(self.settings.idle_timeout, self._idle)
        self.log.info(
            "CONNECT tunnel {client} -> {target} ({address}) open",
            event="tunnel_open",
            client=self.client,
            target=str(self.target),
            address=self._upstream_address,
        )
        pending, self._pending = self._pending, []
        if pending:
            self._to_upstream(b"".join(pending))
        client_transport.resumeProducing()
        upstream_transport.resumeProducing()

    def from_client(self, data: bytes) -> None:
        if self._upstream is None:
            # Only what arrived with the head: the client transport is
            # paused until the target is connected.
            self._pending.append(data)
        elif not self._upstream_closed:
            self._to_upstream(data)

    def _to_upstream(self, data: bytes) -> None:
        assert self._upstream is not None
        self._upstream.upstream_transport.write(data)
        self.bytes_to_upstream += len(data)
        self._touch()

    def from_upstream(self, data: bytes) -> None:
        if self._client_closed:
            return
        self.channel.client_transport.write(data)
        self.bytes_to_client += len(data)
        self._touch()

    def _touch(self) -> None:
        self._last_activity = self.settings.timer.seconds()

    def _idle(self) -> None:
        clock = self.settings.timer
        quiet = clock.seconds() - self._last_activity
        remaining = self.settings.idle_timeout - quiet
        if remaining > 0:
            self._idle_call = clock.callLater(remaining, self._idle)
            return
        self._idle_call = None
        self.log.info(
            "CONNECT tunnel {client} -> {target} idle for {idle_timeout}s: closing",
            event="tunnel_idle",
            client=self.client,
            target=str(self.target),
            idle_timeout=self.settings.idle_timeout,
        )
        # Abort rather than close: an idle tunnel may be idle because a
        # side stopped reading, and a graceful close would wait for it.
        if not self._client_closed:
            self.channel.client_transport.abortConnection()
        if self._upstream is not None and not self._upstream_closed:
            self._upstream.upstream_transport.abortConnection()

    def client_lost(self) -> None:
        self._client_closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._upstream is not None and not self._upstream_closed:
            self._upstream.upstream_transport.loseConnection()
        self._maybe_finished()

    def upstream_lost(self) -> None:
        self._upstream_closed = True
        if not self._client_closed:
            self.channel.client_transport.loseConnection()
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self._finished or self._opened_at is None:
            return
        if not (self._client_closed and self._upstream_closed):
            return
        self._finished = True
        cancel_call(self._idle_call)
        self._idle_call = None
        self.log.info(
            "CONNECT tunnel {client} -> {target} closed after {duration:.1f}s:"
            " {bytes_to_upstream} bytes up, {bytes_to_client} bytes down",
            event="tunnel_closed",
            client=self.client,
            target=str(self.target),
            address=self._upstream_address,
            duration=self.settings.timer.seconds() - self._opened_at,
            bytes_to_upstream=self.bytes_to_upstream,
            bytes_to_client=self.bytes_to_client,
        )
