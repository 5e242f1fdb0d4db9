"""
A bound on the size of upstream response heads.

Twisted's HTTP client limits the length of one header line, but not how
many lines a head may have: an upstream could send megabytes of headers,
which the client keeps in memory and the store would replay.  Every
upstream connection is wrapped (:class:`HeadLimitedEndpointFactory`) in a
protocol that counts the bytes of each response head as they arrive,
through the public transport and protocol interfaces, and cuts the
connection once a head passes :data:`MAX_RESPONSE_HEAD`; the request then
fails with :class:`HeadTooLarge` among its reasons, which the fetcher
answers with a 502.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

#: The most bytes of one response head (status line, headers, and any
#: interim 1xx heads before it) read from an upstream.  Per response; a
#: connection holds at most one such head in memory at a time.
MAX_RESPONSE_HEAD = 256 * 1024

#: The end of a head as Twisted's client parser sees it: an empty line,
#: lines ending in LF with an optional CR before it.
_HEAD_END = re.compile(rb"\n\r?\n")
_INTERIM = re.compile(rb"HTTP/\d\.\d 1\d\d")


class HeadTooLarge(Exception):
    """
    An upstream response head was larger than :data:`MAX_RESPONSE_HEAD`.
    """


@attrs.define
class HeadMeter:
    """
    Counts the bytes of response heads in the bytes an HTTP client
    connection receives; body bytes are not counted.

    Call :meth:`request_sent` when a request goes out, then
    :meth:`received` with each chunk: it returns how many of the chunk's
    bytes are within the limit (all of them unless the head is too large).
    """

    limit: int = MAX_RESPONSE_HEAD
    counting: bool = False
    #: Bytes of the current head(s) seen so far.
    seen: int = 0
    #: The last bytes seen, for an end of head split between two chunks.
    _tail: bytes = b""
    #: The start of the current head, to tell an interim (1xx) one.
    _start: bytes = b""
    #: Where the final head ended in the chunk last passed to
    #: :meth:`received`, if it ended there.
    head_end: int | None = None

    def request_sent(self) -> None:
        if not self.counting:
            self.counting = True
            self.seen = 0
            self._tail = b""
            self._start = b""

    def received(self, data: bytes) -> int:
        self.head_end = None
        offset = 0
        while self.counting and offset < len(data):
            chunk = data[offset:]
            if len(self._start) < 12:
                self._start += chunk[: 12 - len(self._start)]
            found = _HEAD_END.search(self._tail + chunk)
            if found is None:
                if self.seen + len(chunk) > self.limit:
                    return offset + self.limit - self.seen
                self.seen += len(chunk)
                self._tail = (self._tail + chunk)[-2:]
                return len(data)
            used = found.end() - len(self._tail)
            if self.seen + used > self.limit:
                return offset + max(0, self.limit - self.seen)
            self.seen += used
            offset += used
            self._tail = b""
            if _INTERIM.match(self._start):
                # A 1xx head: the final one follows, within the same limit.
                self._start = b""
                continue
            self.counting = False
            self.head_end = offset
        return len(data)


class _HeadLimitedProtocol(ProtocolWrapper):
    log = Logger()

    def __init__(self, factory: Any, wrappedProtocol: IProtocol) -> None:
        super().__init__(factory, wrappedProtocol)
        self.meter = HeadMeter(limit=MAX_RESPONSE_HEAD)
        self.refused = False

    def write(self, data: bytes) -> None:
        self.meter.request_sent()
        super().write(data)

    def writeSequence(self, data: Any) -> None:
        self.meter.request_sent()
        super().writeSequence(data)

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        allowed = self.meter.received(data)
        if allowed < len(data):
            self.refused = True
            peer = self.getPeer()
            self.log.warn(
                "Refused an upstream response from {peer}: its head is larger"
                " than {limit} bytes",
                event="upstream_head_too_large",
                peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
                limit=self.meter.limit,
            )
            if allowed:
                super().dataReceived(data[:allowed])
            abort = getattr(self.transport, "abortConnection", None)
            if abort is not None:
                abort()
            elif self.transport is not None:
                self.transport.loseConnection()
            return
        end = self.meter.head_end
        if end is not None and 0 < end < len(data):
            # The head and the body's first bytes came in one read (of up
            # to 1 MiB, see connect.py): Twisted's parser copies what
            # follows each header line once per line, so it is given the
            # head alone, then the body.
            super().dataReceived(data[:end])
            if self.transport is not None and not self.disconnecting:
                super().dataReceived(data[end:])
            return
        super().dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self.refused:
            reason = Failure(
                HeadTooLarge(
                    f"the upstream's response head is larger than"
                    f" {self.meter.limit} bytes"
                )
            )
        super().connectionLost(reason)


class _HeadLimitedFactory(WrappingFactory):
    protocol = _HeadLimitedProtocol
    noisy = False

    def __init__(self, wrappedFactory: IProtocolFactory) -> None:
        super().__init__(wrappedFactory)
        # The agent's pool makes a client factory per connection, and
        # Twisted logs the start and stop of every noisy factory: upstream
        # connections come and go all day, so not one line for each.
        # ``noisy`` is a public attribute of Factory.
        if isinstance(wrappedFactory, Factory):
            wrappedFactory.noisy = False


@attrs.frozen
class _HeadLimitedEndpoint:
    endpoint: Any

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[Any] = self.endpoint.connect(_HeadLimitedFactory(protocolFactory))
        # The agent's pool talks to its own protocol; the wrapper stays in
        # between as that protocol's transport.
        return d.addCallback(lambda wrapper: wrapper.wrappedProtocol)


@implementer(IAgentEndpointFactory)
@attrs.frozen
class HeadLimitedEndpointFactory:
    """
    The endpoints of ``factory``, with every response head bounded.
    """

    factory: IAgentEndpointFactory

    def endpointForURI(self, uri: Any) -> Any:
        return _HeadLimitedEndpoint(self.factory.endpointForURI(uri))


def head_too_large(error: BaseException) -> bool:
    """
    Whether a failed upstream request failed because its head was too
    large (Twisted wraps the reason in ``ResponseFailed.reasons``).
    """
    if isinstance(error, HeadTooLarge):
        return True
    reasons = getattr(error, "reasons", None) or []
    return any(
        isinstance(reason, Failure) and reason.check(HeadTooLarge) is not None
        for reason in reasons
    )
