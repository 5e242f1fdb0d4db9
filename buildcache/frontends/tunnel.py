"""
``CONNECT`` tunnels on the proxy port.

This module owns what happens to a ``CONNECT host:port`` request on the
proxy port: :class:`ProxyChannel` (an ``HTTPChannel``) takes the request
line and header lines before twisted.web sees them, checks the client and
the target against the :class:`~buildcache.access.AccessPolicy`, opens the
upstream connection through the connection guard
(:func:`buildcache.fetch.connect.connect_tcp`, so the address connected to is the
address checked) and then splices bytes both ways until either side
closes or the tunnel stays idle too long.  Every other request goes the
ordinary twisted.web way to the site's root resource, once the channel
has refused what ``HTTPChannel`` would drop without an answer or accept
silently: an over-long request line (414) or header line (431), and
obsolete line folding (400).

The channel also bounds what a client can hold on to (both ports use it):
the whole request (head, and the small body allowed) must arrive within
:data:`REQUEST_HEAD_TIMEOUT` of its first byte, however slowly it trickles;
a response whose bytes the client's socket stops taking is cut after
:data:`SEND_STALL_TIMEOUT`; and :class:`ClientConnections` caps the open
connections per client address (503 above it) and lets a stopping server
finish the responses under way.

A tunnel carries opaque (TLS) bytes: nothing in it is inspected or cached.
Flow control is end to end: each side's transport is the other's streaming
producer, so a slow reader pauses the fast writer and nothing buffers
without bound.
"""

from __future__ import annotations

import enum
import fcntl
import ipaddress
import re
import struct
import termios
from collections import Counter
from typing import Any, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IAddress, IProtocolFactory, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Site

from buildcache.access import AccessPolicy, InvalidHost, Verdict, normalize_host
from buildcache.engine.errors import UpstreamError, status_for
from buildcache.fetch.connect import HostnameResolver, TargetRefused, connect_tcp
from buildcache.turns import Waiters

__all__ = [
    "DEFAULT_CONNECT_PORTS",
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "REQUEST_HEAD_TIMEOUT",
    "SEND_STALL_TIMEOUT",
    "ClientConnections",
    "ConnectTarget",
    "ProxyChannel",
    "ProxySite",
    "TunnelSettings",
    "client_key",
    "connection_admitted",
    "parse_connect_target",
    "send_progressed",
]

#: ``CONNECT`` is for HTTPS; any other port would make the cache a generic
#: TCP relay.
DEFAULT_CONNECT_PORTS: frozenset[int] = frozenset({443})
#: Neither port serves a method that takes a body (GET, HEAD, CONNECT): a
#: larger request body is refused when its headers arrive, before Twisted
#: would spool it to a temporary file.
MAX_REQUEST_BODY = 64 * 1024
#: Seconds from the first byte of a request (on a new connection or after
#: the previous response) until all of it has arrived; the idle timeout
#: restarts on every byte, so a client trickling a header line now and then
#: would otherwise hold its connection for ever.
REQUEST_HEAD_TIMEOUT = 30.0
#: Seconds a response may wait while the client's socket takes none of the
#: bytes queued for it; a client that stops reading is then disconnected.
SEND_STALL_TIMEOUT = 60.0

_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

_AUTHORITY = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[^\[\]:/@?#\s]+):([0-9]{1,5})")
_VERSION = re.compile(rb"HTTP/1\.[01]")
_HEADER_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    414: "URI Too Long",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

#: Open connections per client address (both ports together, per process).
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 256


def client_key(host: str) -> str:
    """
    The address a client connection counts against: an IPv4 address (an
    IPv4-mapped IPv6 address as the IPv4 address it is); for other IPv6
    addresses their /64, which one host holds whole (privacy addresses
    would otherwise give it a cap each), but loopback as itself.
    Anything else (a UNIX socket's path) as given.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if not address.is_loopback:
            return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def connection_admitted(open_from_client: int, limit: int) -> bool:
    """
    Whether one more connection may be served from a client address that
    already holds ``open_from_client`` open connections.
    """
    return open_from_client < limit


#: What is waiting to reach a client: the bytes the transport holds, and
#: the bytes the kernel's send queue holds (sent, not yet acknowledged);
#: each None when it cannot be told.
Unsent = tuple[int | None, int | None]


def send_progressed(before: Unsent, now: Unsent) -> bool:
    """
    Whether a client took some of a response over a stall period: either
    count of bytes waiting for it went down.  The kernel's queue shrinks as
    soon as the client acknowledges any bytes; the transport's buffer only
    once the socket takes a large piece of it, which a slow reader may
    take longer than a period to make room for.  Unknown counts show no
    progress.
    """
    return any(
        was is not None and is_now is not None and is_now < was
        for was, is_now in zip(before, now)
    )


def _unsent(transport: Any) -> Unsent:
    """
    The :data:`Unsent` counts of ``transport``: its buffer (the same figure
    as ``buildcache.engine.body.direct_sender``'s), and the kernel's send queue of
    its socket (``SIOCOUTQ``, Linux).
    """
    try:
        buffered: int | None = int(
            transport._tempDataLen + len(transport.dataBuffer) - transport.offset
        )
    except (AttributeError, TypeError):
        buffered = None
    try:
        queued = fcntl.ioctl(
            transport.getHandle().fileno(), termios.TIOCOUTQ, b"\0" * 4
        )
        in_kernel: int | None = struct.unpack("i", queued)[0]
    except (AttributeError, OSError, TypeError, ValueError):
        in_kernel = None
    return buffered, in_kernel


def _cancel(call: Any) -> None:
    """
    Cancel the delayed ``call`` (a timer, or None) if it is still to run.
    """
    if call is not None and call.active():
        call.cancel()


@attrs.define(eq=False)
class ClientConnections:
    """
    The open client connections of one server (both ports share one), by
    client address.

    Admits a connection only while its address holds fewer than
    ``max_per_client`` (a limit per process: worker processes each count
    their own), and lets a stopping server close them once their responses
    have gone out (:meth:`drain`).
    """

    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    _by_client: Counter[str] = attrs.Factory(Counter)
    _channels: dict[ProxyChannel, str] = attrs.Factory(dict)
    _draining: bool = False
    _drained: Waiters = attrs.Factory(Waiters)

    def open_from(self, host: str) -> int:
        """Open connections admitted from ``host``."""
        return self._by_client[client_key(host)]

    def admit(self, channel: ProxyChannel, host: str) -> bool:
        key = client_key(host)
        if not connection_admitted(self._by_client[key], self.max_per_client):
            return False
        self._by_client[key] += 1
        self._channels[channel] = key
        if self._draining:
            channel.drain()
        return True

    def release(self, channel: ProxyChannel) -> None:
        key = self._channels.pop(channel, None)
        if key is None:
            return
        self._by_client[key] -= 1
        if not self._by_client[key]:
            del self._by_client[key]
        self.changed()

    def busy(self) -> int:
        """Connections with a request or response under way (tunnels aside)."""
        return sum(1 for channel in self._channels if not channel.in_tunnel)

    def changed(self) -> None:
        if self._draining and not self.busy():
            self._drained.fire()

    def drain(self) -> Deferred[None]:
        """
        Close every connection once its response (if any) has gone out to
        the client, and fire when no connection but ``CONNECT`` tunnels is
        left.  Idle keep-alive connections close at once.
        """
        self._draining = True
        for channel in list(self._channels):
            channel.drain()
        return self._drained.wait(not self.busy())


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

    @raise ValueError: anything else, with a reason fit for a 400 body.
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


@attrs.frozen
class TunnelSettings:
    """
    What a :class:`ProxyChannel` needs to open tunnels.

    @ivar reactor: for TCP connections (and DNS, unless ``resolver``).
    @ivar connect_timeout: seconds for DNS plus the TCP connect.
    @ivar idle_timeout: seconds without a byte either way before both
        sides are closed.
    @ivar connect_ports: ports ``CONNECT`` may reach; ports other than 443
        are judged by ``policy.host_allowed`` (``connect_allowed`` is
        443-only by design), so widening this is for tests.
    @ivar clock: runs the idle timer; the reactor when ``None``.
    @ivar resolver: an ``IHostnameResolver``; the reactor's when ``None``.
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


def _response(status: int, explanation: str) -> bytes:
    body = (explanation.replace("\r", " ").replace("\n", " ") + "\n").encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    )
    return head.encode("ascii") + body


class _Mode(enum.Enum):
    HTTP = "http"
    CONNECT_HEAD = "connect-head"
    TUNNEL = "tunnel"
    CLOSED = "closed"


@attrs.define
class _ConnectHead:
    """A ``CONNECT`` request being read: its target and header budget."""

    target: ConnectTarget | None
    error: str | None
    #: The target as sent, for logs (shortened: it may be garbage).
    requested: str
    size: int
    header_count: int = 0


class ProxyChannel(HTTPChannel):
    """
    An ``HTTPChannel`` that handles ``CONNECT`` itself (see the module
    docstring) and everything else as usual.

    A ``CONNECT`` ends the HTTP conversation on its connection: it becomes
    a tunnel, or gets an error response and is closed.
    """

    log = Logger()

    #: Set by :class:`ProxySite`; ``CONNECT`` is refused with 405 without it.
    tunnel_settings: TunnelSettings | None = None
    max_connect_headers = 100
    #: Set by :class:`StrictSite`: the connection cap and stop bookkeeping.
    connections: ClientConnections | None = None
    request_head_timeout: float = REQUEST_HEAD_TIMEOUT
    send_stall_timeout: float = SEND_STALL_TIMEOUT

    def __init__(self) -> None:
        super().__init__()
        self._head_call: Any = None
        self._stall_call: Any = None
        self._stall_unsent: Unsent = (None, None)
        self._draining = False
        self._mode = _Mode.HTTP
        self._awaiting_request_line = True
        self._head: _ConnectHead | None = None
        self._tunnel: _Tunnel | None = None
        self._local_address: IAddress | None = None
        self._chunked_body_received = 0

    def getHost(self) -> IAddress:
        # Every request asks (Request.requestReceived), each time with a
        # getsockname call; a connection's own address never changes.
        if self._local_address is None:
            self._local_address = super().getHost()
        return self._local_address

    def _took(self, data: bytes) -> bool:
        """
        Whether ``data`` belongs to an open tunnel (or a closed channel)
        rather than to HTTP parsing.
        """
        if self._mode is _Mode.TUNNEL:
            assert self._tunnel is not None
            self._tunnel.from_client(data)
            return True
        return self._mode is _Mode.CLOSED

    @property
    def in_tunnel(self) -> bool:
        return self._mode is _Mode.TUNNEL

    def connectionMade(self) -> None:
        super().connectionMade()
        connections = self.connections
        if connections is None or connections.admit(self, self._client_host()):
            return
        limit = connections.max_per_client
        self.log.warn(
            "Refused a connection from {client}: it already has {limit}"
            " connections open",
            event="client_connection_limit",
            client=self._peer_text(),
            limit=limit,
        )
        self.answer_and_close(
            503, f"too many connections from {self._client_host()} (at most"
            f" {limit} per client address: --max-connections-per-client);"
            " close some or try again later",
        )

    def dataReceived(self, data: bytes) -> None:
        if not self._took(data):
            if (
                self._head_call is None
                and not self._handlingRequest
                and self.line_mode
                # A stray CRLF after a response (some clients send one) is
                # no request: the idle timeout still covers the connection.
                and data.strip(b"\r\n")
            ):
                # The first byte of a request: the whole of it must follow
                # within the deadline.
                self._head_call = self.callLater(
                    self.request_head_timeout, self._request_too_slow
                )
            super().dataReceived(data)

    def _stop_head_deadline(self) -> None:
        _cancel(self._head_call)
        self._head_call = None

    def _request_too_slow(self) -> None:
        self._head_call = None
        self.log.info(
            "Request from {client} not received within {timeout}s: closing",
            event="request_timeout",
            client=self._peer_text(),
            timeout=self.request_head_timeout,
        )
        self.answer_and_close(
            408, f"the request did not arrive within {self.request_head_timeout:g}s"
        )

    def pauseProducing(self) -> None:
        # Called by the transport when the client's socket stops taking the
        # response: from then on the client has send_stall_timeout to take
        # some of it.
        super().pauseProducing()
        if self._stall_call is None and self._mode is _Mode.HTTP:
            self._stall_unsent = _unsent(self.client_transport)
            self._stall_call = self.callLater(
                self.send_stall_timeout, self._send_stalled
            )

    def resumeProducing(self) -> None:
        self._stop_stall_timer()
        super().resumeProducing()

    def _stop_stall_timer(self) -> None:
        _cancel(self._stall_call)
        self._stall_call = None

    def _send_stalled(self) -> None:
        self._stall_call = None
        unsent = _unsent(self.client_transport)
        if send_progressed(self._stall_unsent, unsent):
            # Slow, but reading: Twisted resumes the response only once
            # its whole buffer has gone, which a slow reader takes a while
            # to empty.
            self._stall_unsent = unsent
            self._stall_call = self.callLater(
                self.send_stall_timeout, self._send_stalled
            )
            return
        self.log.info(
            "Client {client} took nothing of its response for {timeout}s:"
            " closing",
            event="client_stalled",
            client=self._peer_text(),
            timeout=self.send_stall_timeout,
        )
        # A graceful close would wait for the client to read.
        self.client_transport.abortConnection()

    def drain(self) -> None:
        """
        Close this connection once the response under way has gone out (at
        once when idle); a tunnel is left as it is.
        """
        self._draining = True
        if self._mode is not _Mode.HTTP:
            return
        if self._handlingRequest:
            self.persistent = False
        else:
            self._stop_head_deadline()
            self.loseConnection()

    def rawDataReceived(self, data: bytes) -> None:
        # Also reached with the bytes that followed the CONNECT head in the
        # same read (a TLS ClientHello, say): they belong to the tunnel.
        if self._took(data):
            return
        if self.length is None and not self._handlingRequest:
            # A chunked body on its way in (framing counted too).
            self._chunked_body_received += len(data)
            if self._chunked_body_received > MAX_REQUEST_BODY:
                self._refuse_large_body(self._chunked_body_received)
                return
        super().rawDataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._mode is _Mode.CLOSED:
            return
        if self._head is not None:
            self._connect_head_line(self._head, line)
            return
        if self._awaiting_request_line:
            # An empty line here is the stray CRLF some clients send after
            # a body; HTTPChannel skips it, and the request line still
            # follows.
            if line and self.persistent:
                self._awaiting_request_line = False
                if line.startswith(b"CONNECT "):
                    self._begin_connect(line)
                    return
        elif line[:1] in (b" ", b"\t"):
            # Obsolete line folding: HTTPChannel would join it to the
            # previous header; refusing it (RFC 9112 5.2) leaves no header
            # that two parsers could read differently.
            self._refuse_request(400, "obsolete line folding in the request headers")
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        # HTTPChannel sets length to the Content-Length (0 without one), or
        # to None for a chunked body, whose size shows only as it arrives
        # (rawDataReceived).
        if self.length is not None and self.length > MAX_REQUEST_BODY:
            self._refuse_large_body(self.length)
            return
        self._chunked_body_received = 0
        super().allHeadersReceived()

    def _refuse_large_body(self, size: int) -> None:
        self._refuse_request(
            413, f"a request body of {size} bytes or more (this cache takes GET"
            f" and HEAD only, and bodies up to {MAX_REQUEST_BODY} bytes)",
        )

    def allContentReceived(self) -> None:
        self._stop_head_deadline()
        self._awaiting_request_line = True
        if self._draining:
            # A request that arrived while the server stops: this is the
            # connection's last response.
            self.persistent = False
        super().allContentReceived()

    def lineLengthExceeded(self, line: bytes) -> None:
        # HTTPChannel would drop the connection without an answer.
        if self._head is not None:
            self._refuse(self._head.requested, 400, "request header line too long")
        elif self._awaiting_request_line:
            self._refuse_request(
                414, f"request line longer than {self.MAX_LENGTH} bytes"
            )
        else:
            self._refuse_request(
                431, f"request header line longer than {self.MAX_LENGTH} bytes"
            )

    def _begin_connect(self, line: bytes) -> None:
        self._mode = _Mode.CONNECT_HEAD
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
        self._head = _ConnectHead(target, error, requested, len(line))

    def _connect_head_line(self, head: _ConnectHead, line: bytes) -> None:
        if not line:
            self._head = None
            self._end_of_connect_head(head)
            return
        head.size += len(line)
        if line[:1] in (b" ", b"\t"):
            self._refuse(head.requested, 400, "obsolete line folding in the request headers")
            return
        name, colon, _ = line.partition(b":")
        valid = bool(colon) and _HEADER_NAME.fullmatch(name) is not None
        head.header_count += 1
        if not valid:
            self._refuse(head.requested, 400, "malformed header line")
        elif (
            head.size > self.totalHeadersSize
            or head.header_count > self.max_connect_headers
        ):
            self._refuse(head.requested, 400, "request headers too large")

    def _end_of_connect_head(self, head: _ConnectHead) -> None:
        # The HTTP idle timeout no longer applies: the tunnel has its own.
        self.setTimeout(None)
        self._stop_head_deadline()
        settings = self.tunnel_settings
        if settings is None:
            self._refuse(head.requested, 405, "CONNECT is not supported here")
            return
        client = self._client_host()
        client_verdict = settings.policy.client_allowed(client)
        if not client_verdict:
            self._refuse(head.requested, 403, client_verdict.reason)
            return
        if head.target is None:
            self._refuse(head.requested, 400, head.error or "malformed CONNECT request")
            return
        target_verdict = settings.target_verdict(head.target)
        if not target_verdict:
            self._refuse(str(head.target), 403, target_verdict.reason)
            return
        self._mode = _Mode.TUNNEL
        self._stop_stall_timer()
        if self.connections is not None:
            self.connections.changed()
        # Bytes still in the line buffer go to rawDataReceived from here on.
        self.setRawMode()
        self._tunnel = _Tunnel(self, settings, head.target, self._peer_text())
        self._tunnel.start()

    @property
    def client_transport(self) -> Any:
        """The connection to the client (a TCP transport in service)."""
        return self.transport

    def _client_host(self) -> str:
        host = getattr(self.client_transport.getPeer(), "host", None)
        return host if isinstance(host, str) else ""

    def _peer_text(self) -> str:
        peer = self.client_transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        if host is None:
            return str(peer)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _refuse(self, target: str, status: int, reason: str) -> None:
        self._head = None
        self.log.warn(
            "CONNECT {target} from {client} refused ({status}): {reason}",
            event="tunnel_refused",
            client=self._peer_text(),
            target=target,
            status=status,
            reason=reason,
        )
        self.answer_and_close(status, reason)

    def _refuse_request(self, status: int, reason: str) -> None:
        """
        Answer a request that is not well-formed HTTP, or that this cache
        will not read (a large body), and close.
        """
        self.log.info(
            "Request from {client} refused ({status}): {reason}",
            event="bad_request",
            client=self._peer_text(),
            status=status,
            reason=reason,
        )
        self.answer_and_close(status, reason)

    def answer_and_close(self, status: int, explanation: str) -> None:
        """
        Answer with an error and close the connection.
        """
        self._mode = _Mode.CLOSED
        self.setTimeout(None)
        self._stop_head_deadline()
        transport = self.client_transport
        transport.write(_response(status, explanation))
        # Keep reading (and discarding) what the client already sent, so
        # closing with unread bytes does not reset the connection before
        # the client has read the answer.
        transport.resumeProducing()
        transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._stop_head_deadline()
        self._stop_stall_timer()
        if self._tunnel is not None:
            self._tunnel.client_lost()
        self._mode = _Mode.CLOSED
        try:
            super().connectionLost(reason)
        finally:
            # Whatever went wrong above, the slot is free again.
            if self.connections is not None:
                self.connections.release(self)


class _UpstreamSide(Protocol):
    """The tunnel's connection to the target."""

    def __init__(self, tunnel: _Tunnel):
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
    tunnel: _Tunnel

    def buildProtocol(self, addr: Any) -> _UpstreamSide:
        return _UpstreamSide(self.tunnel)


@attrs.define(eq=False)
class _Tunnel:
    """
    One ``CONNECT`` tunnel from the moment its head was accepted.
    """

    log = Logger()

    channel: ProxyChannel
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
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.cancel()
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


class QuietSite(Site):
    """
    A ``twisted.web`` site that leaves the access log to :class:`Activity`
    (one structured line per request, with the cache status) instead of
    writing its own.
    """

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


class StrictSite(QuietSite):
    """
    A site whose connections get :class:`ProxyChannel`'s request-line and
    header limits and strict parsing, the request and send deadlines and
    the per-client connection cap; without tunnel settings a ``CONNECT``
    is answered 405 (the index port).

    ``connections`` is shared with the server's other port (a cap of its
    own with the default limit when not given).  Other keyword arguments
    go to ``Site``; its ``reactor`` runs the deadlines.
    """

    protocol = ProxyChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        connections: ClientConnections | None = None,
        request_head_timeout: float = REQUEST_HEAD_TIMEOUT,
        send_stall_timeout: float = SEND_STALL_TIMEOUT,
        **site_kwargs: Any,
    ) -> None:
        super().__init__(resource, **site_kwargs)
        self.connections = connections if connections is not None else ClientConnections()
        self.request_head_timeout = request_head_timeout
        self.send_stall_timeout = send_stall_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.connections = self.connections
        channel.request_head_timeout = self.request_head_timeout
        channel.send_stall_timeout = self.send_stall_timeout
        return channel


class ProxySite(StrictSite):
    """
    The proxy port's factory: ``resource`` answers every request except
    ``CONNECT``, which :class:`ProxyChannel` tunnels.

    Keyword arguments other than the tunnel's go to :class:`StrictSite`.
    """

    def __init__(
        self,
        resource: IResource,
        *,
        reactor: Any,
        policy: AccessPolicy,
        connect_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        connect_ports: frozenset[int] = DEFAULT_CONNECT_PORTS,
        clock: IReactorTime | None = None,
        resolver: HostnameResolver | None = None,
        **site_kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=reactor, **site_kwargs)
        self.tunnel_settings = TunnelSettings(
            reactor=reactor,
            policy=policy,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            connect_ports=frozenset(connect_ports),
            clock=clock,
            resolver=resolver,
        )

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.tunnel_settings = self.tunnel_settings
        return channel
