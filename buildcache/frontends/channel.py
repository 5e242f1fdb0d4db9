"""
The HTTP connection both ports serve their clients on.

This module owns :class:`ProxyChannel`, an ``HTTPChannel`` that takes the
request line and header lines before twisted.web sees them.  It refuses
what ``HTTPChannel`` would drop without an answer or accept silently: an
over-long request line (414) or header line (431), obsolete line folding
(400) and a request body larger than :data:`MAX_REQUEST_BODY` (413).  A
``CONNECT`` request is handed to :mod:`buildcache.frontends.tunnel`; every
other request goes the ordinary twisted.web way to the site's root
resource.

The channel also bounds what a client can hold on to (both ports use it):
the whole request (head, and the small body allowed) must arrive within
:data:`REQUEST_HEAD_TIMEOUT` of its first byte, however slowly it trickles;
a response whose bytes the client stops taking is cut after
:data:`SEND_STALL_TIMEOUT`; and the site's
:class:`~buildcache.frontends.connections.ClientConnections` caps the open
connections per client address (503 above it) and lets a stopping server
finish the responses under way.

In a hit worker (issue 16) the channel knows the main process's relay
socket for its port (:attr:`ProxyChannel.relay`) and keeps the raw bytes
of the request being read from its first byte (bounded by
:attr:`ProxyChannel.raw_limit`): :meth:`ProxyChannel.hand_off` stops
parsing HTTP and relays the connection from that request on
(:class:`buildcache.frontends.relay.Relay`).  A ``CONNECT`` is handed off
at its request line.  Admission may then be remote: an admission that
answers with a Deferred holds the connection's bytes until it fires.
"""

from __future__ import annotations

import enum
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request

from buildcache.engine.body import writable_now, write_now
from buildcache.engine.hot import HotHits
from buildcache.frontends.relay import HandOver, Relay, RelayTarget, proxy_line
from buildcache.frontends.sending import (
    SEND_STALL_TIMEOUT,
    SendCounters,
    send_counters,
    send_progressed,
)
from buildcache.frontends.tunnel import ConnectHead, Tunnel, TunnelSettings
from buildcache.turns import cancel_call

__all__ = [
    "MAX_REQUEST_BODY",
    "REQUEST_HEAD_TIMEOUT",
    "SEND_STALL_TIMEOUT",
    "ProxyChannel",
    "SendCounters",
    "send_counters",
    "send_progressed",
]

#: Neither port serves a method that takes a body (GET, HEAD, CONNECT): a
#: larger request body is refused when its headers arrive, before Twisted
#: would spool it to a temporary file.
MAX_REQUEST_BODY = 64 * 1024
#: Seconds from the first byte of a request (on a new connection or after
#: the previous response) until all of it has arrived; the idle timeout
#: restarts on every byte, so a client trickling a header line now and then
#: would otherwise hold its connection for ever.
REQUEST_HEAD_TIMEOUT = 30.0

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


#: The first byte of a TLS connection (a handshake record); no request
#: line starts with it.
_TLS_HANDSHAKE = b"\x16"


class _Phase(enum.Enum):
    """Where a connection's conversation is."""

    #: Waiting for a request line: a new connection, or a response done.
    REQUEST_LINE = "request-line"
    #: A request's head (and small body) arriving.
    REQUEST = "request"
    #: The whole request handed to the resource, until its response is
    #: done (``requestDone``); more bytes wait in ``HTTPChannel``.
    ANSWERING = "answering"
    #: The header lines of a ``CONNECT`` arriving.
    CONNECT_HEAD = "connect-head"
    #: Bytes go through the tunnel.
    TUNNEL = "tunnel"
    #: Handed off: bytes go through the relay to the main process.
    RELAY = "relay"
    #: An error answered, or the connection lost: bytes are dropped.
    CLOSED = "closed"


_HTTP_PHASES = frozenset({_Phase.REQUEST_LINE, _Phase.REQUEST, _Phase.ANSWERING})


class ProxyChannel(HTTPChannel):
    """
    An ``HTTPChannel`` with strict request parsing, the request and send
    deadlines and the connection cap (see the module docstring), which
    hands ``CONNECT`` to a :class:`~buildcache.frontends.tunnel.Tunnel`.

    A ``CONNECT`` ends the HTTP conversation on its connection: it becomes
    a tunnel, or gets an error response and is closed.
    """

    log = Logger()

    #: Set by :class:`~buildcache.frontends.sites.ProxySite`; ``CONNECT``
    #: is refused with 405 without it.
    tunnel_settings: TunnelSettings | None = None
    max_connect_headers = 100
    #: Set by :class:`~buildcache.frontends.sites.StrictSite`: the
    #: connection cap and stop bookkeeping (an ``Admission`` of
    #: :mod:`buildcache.frontends.connections`, whose ``admit`` may answer
    #: with a ``Deferred[bool]``).
    connections: Any = None
    #: A hit worker's: where a handed-off connection goes.
    relay: RelayTarget | None = None
    #: Set on the main process's relayed connections (from a worker).
    relayed: bool = False
    #: The port's repeated hits, answered before HTTP parsing (see
    #: :mod:`buildcache.engine.hot`); set by the site.
    hot: HotHits | None = None
    request_head_timeout: float = REQUEST_HEAD_TIMEOUT
    send_stall_timeout: float = SEND_STALL_TIMEOUT

    def __init__(self) -> None:
        super().__init__()
        self._phase = _Phase.REQUEST_LINE
        self._head_call: Any = None
        self._stall_call: Any = None
        self._stall_counters = SendCounters(None, None)
        self._draining = False
        self._head: ConnectHead | None = None
        self._tunnel: Tunnel | None = None
        self._local_address: IAddress | None = None
        self._chunked_body_received = 0
        self._first_bytes = True
        #: The raw bytes from the current request's first byte on (a hit
        #: worker's channel only), None past :attr:`raw_limit` or between
        #: requests.
        self._raw: bytearray | None = None
        #: The raw bytes kept of one request: its head and the body
        #: allowed, and one read more.
        self.raw_limit = self.MAX_LENGTH + self.totalHeadersSize + MAX_REQUEST_BODY + 65536
        self._relay: Relay | HandOver | None = None
        self._relaying_tunnel = False
        #: The read that holds the whole head of the request being parsed,
        #: while it is offered to :attr:`hot`.
        self._hot_offer: bytes | None = None
        self._client: str | None = None
        #: A stray CRLF was skipped since the last request (see
        #: :meth:`lineReceived`).
        self._stray_line = False

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
        if self._phase is _Phase.TUNNEL:
            assert self._tunnel is not None
            self._tunnel.from_client(data)
            return True
        if self._phase is _Phase.RELAY:
            assert self._relay is not None
            self._relay.from_client(data)
            return True
        return self._phase is _Phase.CLOSED

    @property
    def in_tunnel(self) -> bool:
        return self._phase is _Phase.TUNNEL or self._relaying_tunnel

    @property
    def client_transport(self) -> Any:
        """The connection to the client (a TCP transport in service)."""
        return self.transport

    def connectionMade(self) -> None:
        super().connectionMade()
        connections = self.connections
        if connections is None:
            return
        admitted = connections.admit(self, self._client_host())
        if isinstance(admitted, Deferred):
            # Counted in another process: no byte is read until it answers.
            transport = self.client_transport
            transport.pauseProducing()
            admitted.addCallback(self._admission_answered, transport)
            admitted.addErrback(self._admission_failed, transport)
            return
        if not admitted:
            self._refuse_connection()

    def _admission_answered(self, admitted: bool, transport: Any) -> None:
        if self._phase is _Phase.CLOSED:
            return
        if admitted:
            transport.resumeProducing()
        else:
            self._refuse_connection()

    def _admission_failed(self, failure: Failure, transport: Any) -> None:
        self.log.failure("Admitting {client} failed", failure, client=self._peer_text())
        if self._phase is not _Phase.CLOSED:
            self.answer_and_close(503, "this server cannot take the connection now")

    def _refuse_connection(self) -> None:
        connections = self.connections
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

    # Reading a request.

    def dataReceived(self, data: bytes) -> None:
        if self._took(data):
            return
        if self.relay is not None and (
            self._phase is _Phase.REQUEST or self._phase is _Phase.ANSWERING
        ):
            # From a request line on, until its answer is done.
            self._keep_raw(data)
        if self._first_bytes and data:
            self._first_bytes = False
            if data[:1] == _TLS_HANDSHAKE:
                # A TLS client on this plain-HTTP port (skopeo and podman
                # try https first, even for an "insecure" registry): a
                # prompt answer makes it fall back to http now, not after
                # the request-head deadline.
                # Every skopeo or podman pull does it: not worth an info line.
                self.log.debug(
                    "TLS hello from {client} answered 400: this port speaks plain HTTP",
                    event="tls_hello", client=self._peer_text(),
                )
                self.answer_and_close(400, "this port speaks plain HTTP, not TLS")
                return
        if (
            self.hot is not None
            and self._phase is _Phase.REQUEST_LINE
            and data[-4:] == b"\r\n\r\n"
            and self.line_mode
            and not self._buffer
            and self.persistent
            and not self._draining
            # A whole request head in one read.
            and self._answered_hot(self.hot, data)
        ):
            return
        if (
            self._head_call is None
            and self._phase is _Phase.REQUEST_LINE
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
        try:
            super().dataReceived(data)
        finally:
            # Offered (see _answered_hot) to the request it began, if any.
            self._hot_offer = None

    def _answered_hot(self, hot: HotHits, data: bytes) -> bool:
        """
        Whether ``data`` was answered from ``hot``; else it is offered
        (:meth:`allContentReceived`) to be remembered if its answer is a
        whole hit.
        """
        transport = self.transport
        if not writable_now(transport):
            return False
        if self._client is None:
            self._client = self._client_host()
        answer = hot.answer(self._client, data)
        if answer is None:
            self._hot_offer = data
            return False
        self.resetTimeout()
        self._stray_line = False
        write_now(transport, answer.data)
        if answer.after is not None:
            answer.after()
        return True

    def lineReceived(self, line: bytes) -> None:
        if self._phase is _Phase.CLOSED:
            return
        if self._phase is _Phase.CONNECT_HEAD:
            assert self._head is not None
            self._connect_head_line(self._head, line)
            return
        if self._phase is _Phase.REQUEST_LINE:
            if not line and self.persistent:
                # The stray CRLF some clients send after a request or a
                # body (RFC 9112 2.2): one is skipped before a request
                # line, a second in a row refused, as HTTPChannel does.
                # Counted here: HTTPChannel never sees a request the table
                # of repeated hits answers, and would take the CRLF after
                # it for the second in a row.
                if self._stray_line:
                    self._refuse_request(400, "more than one empty line before a request line")
                else:
                    self._stray_line = True
                return
            if line and self.persistent:
                connect = line.startswith(b"CONNECT ")
                if self.relay is not None:
                    # The request's first byte: its raw bytes are kept
                    # from here (HTTPChannel's line buffer holds the rest
                    # of this read).
                    raw = bytearray(line)
                    raw += self.delimiter
                    raw += self._buffer
                    self._raw = raw if len(raw) <= self.raw_limit else None
                    if connect:
                        # A worker opens no tunnel: the main process does.
                        self._relay_from_here(tunnel=True)
                        return
                if connect:
                    self._phase = _Phase.CONNECT_HEAD
                    self._head = ConnectHead.begin(line)
                    return
                self._phase = _Phase.REQUEST
        elif line[:1] in (b" ", b"\t"):
            # Obsolete line folding: HTTPChannel would join it to the
            # previous header; refusing it (RFC 9112 5.2) leaves no header
            # that two parsers could read differently.
            self._refuse_request(400, "obsolete line folding in the request headers")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        # HTTPChannel would drop the connection without an answer.
        if self._head is not None:
            self._refuse(self._head.requested, 400, "request header line too long")
        elif self._phase is _Phase.REQUEST:
            self._refuse_request(
                431, f"request header line longer than {self.MAX_LENGTH} bytes"
            )
        else:
            self._refuse_request(
                414, f"request line longer than {self.MAX_LENGTH} bytes"
            )

    def allHeadersReceived(self) -> None:
        # HTTPChannel sets length to the Content-Length (0 without one), or
        # to None for a chunked body, whose size shows only as it arrives
        # (rawDataReceived).
        if self.length is not None and self.length > MAX_REQUEST_BODY:
            self._refuse_large_body(self.length)
            return
        self._chunked_body_received = 0
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        # Also reached with the bytes that followed the CONNECT head in the
        # same read (a TLS ClientHello, say): they belong to the tunnel.
        if self._took(data):
            return
        if self._phase is _Phase.REQUEST and self.length is None:
            # A chunked body on its way in (framing counted too).
            self._chunked_body_received += len(data)
            if self._chunked_body_received > MAX_REQUEST_BODY:
                self._refuse_large_body(self._chunked_body_received)
                return
        super().rawDataReceived(data)

    def _refuse_large_body(self, size: int) -> None:
        self._refuse_request(
            413, f"a request body of {size} bytes or more (this cache takes GET"
            f" and HEAD only, and bodies up to {MAX_REQUEST_BODY} bytes)",
        )

    def allContentReceived(self) -> None:
        self._stop_head_deadline()
        self._stray_line = False
        # Before HTTPChannel renders it: a response may be done at once.
        self._phase = _Phase.ANSWERING
        if self._draining:
            # A request that arrived while the server stops: this is the
            # connection's last response.
            self.persistent = False
        offer, self._hot_offer = self._hot_offer, None
        if offer is not None and self.hot is not None and self.requests:
            assert self._client is not None
            self.hot.offer(self.requests[-1], self._client, offer)
        super().allContentReceived()

    # Handing off (a hit worker's channel).

    def _keep_raw(self, data: bytes) -> None:
        raw = self._raw
        if raw is None:
            return
        raw += data
        if len(raw) > self.raw_limit:
            # Past any request this channel reads: it can no longer be
            # handed off whole (hand_off refuses it).
            self._raw = None

    def hand_off(self) -> None:
        """
        Relay this connection to the main process from the request being
        answered on (nothing of its answer written): see the module
        docstring.
        """
        if self._phase is _Phase.ANSWERING:
            self._relay_from_here(tunnel=False)
        elif self._phase is not _Phase.CLOSED:
            # A bug: nothing is being answered, so there is nothing to
            # hand off; the client must not wait for ever.
            self.log.error(
                "Hand-off from {client} outside an answer ({phase})",
                event="relay_failed", client=self._peer_text(), phase=self._phase.value,
            )
            self.client_transport.loseConnection()

    def _relay_from_here(self, tunnel: bool) -> None:
        raw, self._raw = self._raw, None
        target = self.relay
        if target is None or raw is None:
            self.log.error(
                "Cannot hand off the request of {client}: {why}",
                event="relay_failed", client=self._peer_text(),
                why="no relay" if target is None else "request too large to relay",
            )
            self.answer_and_close(503, "this worker cannot hand the request off")
            return
        self._phase = _Phase.RELAY
        self._relaying_tunnel = tunnel
        # The main process's deadlines apply from now on.
        self.setTimeout(None)
        self._stop_head_deadline()
        self._stop_stall_timer()
        # Already in raw: the line buffer's bytes were kept.
        self.clearLineBuffer()
        self.setRawMode()
        if self.connections is not None:
            self.connections.changed()
        read = bytes(raw)
        if target.can_hand_over(self.client_transport, read):
            self._relay = HandOver(self, target, read, self._peer_text(), self._relay_bytes)
            self._relay.start()
        else:
            self._relay_bytes(read)

    def _relay_bytes(self, raw: bytes) -> None:
        """Relay this connection, ``raw`` first (see :class:`Relay`)."""
        assert self.relay is not None
        header = proxy_line(self.client_transport.getPeer(), self.getHost()) + raw
        self._relay = Relay(self, self.relay, header, self._peer_text())
        self._relay.start()

    def requestDone(self, request: Request) -> None:
        # Before HTTPChannel replays the bytes that came meanwhile (the
        # next request) through dataReceived: those are kept again from
        # the next request line.
        if self._phase is _Phase.ANSWERING:
            self._phase = _Phase.REQUEST_LINE
            if self.relay is not None:
                self._raw = None
        super().requestDone(request)

    def _stop_head_deadline(self) -> None:
        cancel_call(self._head_call)
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

    # Sending a response.

    def pauseProducing(self) -> None:
        # Called by the transport when the client's socket stops taking the
        # response: from then on the client has send_stall_timeout to take
        # some of it.
        super().pauseProducing()
        if self._stall_call is None and self._phase in _HTTP_PHASES:
            self._stall_counters = send_counters(self.client_transport)
            self._stall_call = self.callLater(
                self.send_stall_timeout, self._send_stalled
            )

    def resumeProducing(self) -> None:
        self._stop_stall_timer()
        super().resumeProducing()

    def _stop_stall_timer(self) -> None:
        cancel_call(self._stall_call)
        self._stall_call = None

    def _send_stalled(self) -> None:
        self._stall_call = None
        counters = send_counters(self.client_transport)
        if send_progressed(self._stall_counters, counters):
            # Slow, but reading: Twisted resumes the response only once
            # its whole buffer has gone, which a slow reader takes a while
            # to empty.
            self._stall_counters = counters
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
        if self._phase is _Phase.ANSWERING:
            self.persistent = False
        elif self._phase in _HTTP_PHASES:
            self._stop_head_deadline()
            self.loseConnection()

    # CONNECT.

    def _connect_head_line(self, head: ConnectHead, line: bytes) -> None:
        if not line:
            self._head = None
            self._end_of_connect_head(head)
            return
        refusal = head.header_line(line, self.totalHeadersSize, self.max_connect_headers)
        if refusal is not None:
            self._refuse(head.requested, 400, refusal)

    def _end_of_connect_head(self, head: ConnectHead) -> None:
        # The HTTP idle timeout no longer applies: the tunnel has its own.
        self.setTimeout(None)
        self._stop_head_deadline()
        settings = self.tunnel_settings
        if settings is None:
            self._refuse(head.requested, 405, "CONNECT is not supported here")
            return
        client_verdict = settings.policy.client_allowed(self._client_host())
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
        self._phase = _Phase.TUNNEL
        self._stop_stall_timer()
        if self.connections is not None:
            self.connections.changed()
        # Bytes still in the line buffer go to rawDataReceived from here on.
        self.setRawMode()
        self._tunnel = Tunnel(self, settings, head.target, self._peer_text())
        self._tunnel.start()

    # Refusals and the end of the connection.

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
        self._phase = _Phase.CLOSED
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
        if self._relay is not None:
            self._relay.client_lost()
        self._phase = _Phase.CLOSED
        try:
            super().connectionLost(reason)
        finally:
            # Whatever went wrong above, the slot is free again.
            if self.connections is not None:
                self.connections.release(self)
