"""
Streaming object bodies to HTTP clients.

A body comes either from a stored file or from a download still arriving
(its temporary file, read at the client's own pace).  :class:`BodySender`
writes a byte range of it to a ``twisted.web`` request as a push producer,
so a slow client only delays its own reads, never the download, and
memory stays at one chunk per client.  A download that fails part-way ends
the client's connection without completing the response, so the client's
HTTP library reports an error instead of a short body.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Protocol, TypeGuard, cast

from attrs import define, frozen
from twisted.internet import tcp
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import Request
from zope.interface import implementer

from buildcache.engine.exchanges import client_gone
from buildcache.store import StoredObject

CHUNK_SIZE = 256 * 1024
#: Bodies up to this size are written through Twisted, not sendfile.
SENDFILE_ABOVE = CHUNK_SIZE
#: Bodies up to this size are sent with their head in one ``send`` when
#: they can go straight to the socket (see :func:`send_now`).
SEND_WITH_HEAD = 64 * 1024
#: Most bytes one sendfile call, or one turn of sending, may move (keeps
#: the reactor responsive).
SENDFILE_MAX = 4 * 1024 * 1024


class BodySource(Protocol):
    """
    Bytes ``[0, available())`` of a body, readable with :meth:`read`; the
    first ``in_file()`` of them are also in ``fd`` (for ``sendfile``).
    """

    @property
    def fd(self) -> int: ...

    def available(self) -> int: ...

    def in_file(self) -> int: ...

    def read(self, offset: int, count: int) -> bytes:
        """
        Up to ``count`` bytes at ``offset``; empty if they are gone.
        """

    def advance(self, offset: int) -> None:
        """
        The reader needs no byte before ``offset`` any more.
        """

    def finished(self) -> bool:
        """
        True once no more bytes will arrive (successfully or not).
        """

    def failure(self) -> Failure | None: ...

    def when_more(self, callback: Callable[[], None]) -> None:
        """
        Call ``callback`` once, when more bytes arrive or the body ends.
        """

    def close(self) -> None: ...


@define
class StoredBody:
    """
    The body of a stored object: complete from the start.
    """

    stored: StoredObject

    @property
    def fd(self) -> int:
        return self.stored.fd

    def available(self) -> int:
        return self.stored.entry.size

    def in_file(self) -> int:
        return self.stored.entry.size

    def read(self, offset: int, count: int) -> bytes:
        return os.pread(self.stored.fd, count, offset)

    def advance(self, offset: int) -> None:
        pass

    def finished(self) -> bool:
        return True

    def failure(self) -> Failure | None:
        return None

    def when_more(self, callback: Callable[[], None]) -> None:
        callback()

    def close(self) -> None:
        self.stored.close()


@implementer(IPushProducer)
class BodySender:
    """
    Writes bytes ``[start, end)`` of a body to a request, then finishes it.

    ``end`` is ``None`` for "until the body ends" (a download of unknown
    length).
    ``refuse`` answers instead, with the reason, when the body fails before
    anything (the status line included) has gone out.
    """

    log = Logger()

    def __init__(
        self,
        request: Request,
        source: BodySource,
        start: int = 0,
        end: int | None = None,
        refuse: Callable[[str], None] | None = None,
    ) -> None:
        self._request = request
        self._refuse = refuse
        self._source = source
        self._offset = start
        self._end = end
        self._paused = False
        self._waiting = False
        self._done = False
        self._pumping = False
        self._direct: DirectSender | None = None

    def start(self) -> None:
        self._request.notifyFinish().addErrback(self._client_gone)
        self._request.registerProducer(self, True)
        # A small body goes out with the headers in one ordinary write;
        # sendfile pays off above that.
        if self._end is not None and self._end - self._offset > SENDFILE_ABOVE:
            self._direct = DirectSender.of(self._request)
        self._source.advance(self._offset)
        self._pump()

    def _client_gone(self, reason: Failure) -> None:
        self._stop()

    def _stop(self) -> None:
        if not self._done:
            self._done = True
            self._source.close()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stop()

    def _more_arrived(self) -> None:
        self._waiting = False
        self._pump()

    def _pump(self) -> None:
        # Writing can synchronously pause us (transport buffer full); the
        # flag keeps a resume from re-entering the loop below.
        if self._pumping:
            return
        self._pumping = True
        try:
            self._pump_loop()
        finally:
            self._pumping = False

    def _pump_loop(self) -> None:
        source = self._source
        # After this many sendfile bytes in one go, the other clients get
        # their turn of the reactor.
        burst = 0
        while not (self._done or self._paused or self._waiting):
            limit = source.available()
            if self._end is not None:
                limit = min(limit, self._end)
            if self._offset < limit:
                in_file = min(limit, source.in_file())
                if self._direct is not None and self._offset < in_file:
                    sent = (
                        self._direct.send(source.fd, self._offset, in_file - self._offset)
                        if burst < SENDFILE_MAX
                        else WAIT_FOR_ROOM
                    )
                    if sent > 0:
                        burst += sent
                        self._sent(sent)
                        continue
                    # After a burst (the other clients' turn) or on a full
                    # socket: the channel pauses this sender until the
                    # socket takes more, with no byte copied through
                    # Python to get there.
                    if sent == WAIT_FOR_ROOM and self._direct.wait_for_room() and self._paused:
                        continue
                chunk = source.read(self._offset, min(CHUNK_SIZE, limit - self._offset))
                if not chunk:
                    self._fail("the body is no longer available")
                    return
                self._sent(len(chunk))
                self._request.write(chunk)
                continue
            if self._end is not None and self._offset >= self._end:
                self._finish()
                return
            if source.finished():
                failure = source.failure()
                if failure is None and self._end is None:
                    self._finish()
                else:
                    self._fail(
                        failure.getErrorMessage() if failure else "body ended early"
                    )
                return
            self._waiting = True
            source.when_more(self._more_arrived)

    def _sent(self, count: int) -> None:
        self._offset += count
        self._source.advance(self._offset)

    def _finish(self) -> None:
        self._stop()
        self._request.unregisterProducer()
        self._request.finish()

    def _fail(self, why: str) -> None:
        self.log.warn(
            "Ending response to {uri} incomplete after {sent} bytes: {why}",
            uri=self._request.uri,
            sent=self._offset,
            why=why,
        )
        self._stop()
        self._request.unregisterProducer()
        if self._refuse is not None and not self._request.startedWriting:
            self._refuse(why)
            return
        # Closing without finishing the response leaves a short
        # Content-Length or a chunked body without its last chunk: every
        # HTTP client treats that as an error, never as a complete file.
        self._request.loseConnection()


#: What :meth:`DirectSender.send` gives when the socket is full.
WAIT_FOR_ROOM = -1


@frozen
class DirectSender:
    """
    Copies file bytes straight to a client's socket with ``sendfile`` (no
    copy through Python), while Twisted's own write buffer is empty, so
    bytes stay in order.
    """

    request: Request
    transport: tcp.Connection

    @classmethod
    def of(cls, request: Request) -> DirectSender | None:
        """
        The sender for ``request``'s body, its status line and headers
        written through Twisted; None where sendfile cannot be used: a
        non-TCP transport, a HEAD, or a chunked response.
        """
        transport = getattr(request.channel, "transport", None)
        if not isinstance(transport, tcp.Connection) or request.method == b"HEAD":
            return None
        request.write(b"")  # the status line and headers, through Twisted
        if request.chunked or client_gone(request):
            return None
        return cls(request, transport)

    def send(self, file_fd: int, offset: int, count: int) -> int:
        """
        Bytes sent; :data:`WAIT_FOR_ROOM` when the socket takes no more
        now; 0 where the caller must write the ordinary way (Twisted still
        holds bytes the socket does not take, or the connection failed:
        the transport reports that itself).
        """
        transport = self.transport
        if _buffered(transport):
            # Usually just the headers: push them out now if the socket
            # takes them.
            transport.doWrite()
            if _buffered(transport):
                return 0
        try:
            sent = os.sendfile(
                transport.fileno(), file_fd, offset, min(count, SENDFILE_MAX)
            )
        except BlockingIOError:
            return WAIT_FOR_ROOM
        except OSError:
            return 0
        self.request.sentLength += sent
        self.request.channel.resetTimeout()
        return sent

    def wait_for_room(self) -> bool:
        """
        Pause the transport's producer (the channel, and through it the
        body's sender, with its send-stall deadline) until the socket
        takes more bytes: what Twisted does when its own buffer fills,
        with nothing buffered.  False where the transport has no
        streaming producer to pause.
        """
        transport = self.transport
        producer = transport.producer
        if producer is None or not transport.streamingProducer:
            return False
        # With an empty buffer, the transport's next write turn stops
        # writing and resumes its paused producer (FileDescriptor.doWrite).
        transport.producerPaused = True
        cast(IPushProducer, producer).pauseProducing()
        transport.startWriting()
        return True


_MORE = getattr(socket, "MSG_MORE", 0)


def _buffered(transport: tcp.Connection) -> int:
    # Bytes Twisted holds for the socket and has not written yet.
    return transport._tempDataLen + len(transport.dataBuffer) - transport.offset


def writable_now(transport: object) -> TypeGuard[tcp.Connection]:
    """
    Whether a response may be written to ``transport`` straight away: a
    plain TCP connection (no TLS, not closing) with nothing of Twisted's
    still waiting to go out before it.
    """
    return (
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and not transport.disconnecting
        and not _buffered(transport)
    )


def response_head(request: Request) -> bytes:
    """
    The status line and headers of ``request``'s response, byte for byte
    what ``HTTPChannel.writeHeaders`` writes (one bytes object instead of a
    sequence of some fifty pieces).
    """
    parts = [
        request.clientproto, b" ", b"%d" % (request.code,), b" ",
        request.code_message, b"\r\n",
    ]
    for name, values in request.responseHeaders.getAllRawHeaders():
        for value in values:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def send_bytes_now(request: Request, body: bytes) -> bool:
    """
    Send the response's head and ``body`` (small, in memory: a rendered
    index page) in one ``send``, as :func:`send_now` does a small stored
    body; False, with nothing sent, where that cannot be done (the caller
    writes through Twisted).
    """
    transport = getattr(request.channel, "transport", None)
    if not _may_send_now(transport, request, False):
        return False
    _send_at_once(request, transport, response_head(request), body)
    return True


def _may_send_now(
    transport: object, request: Request, head_given: bool
) -> TypeGuard[tcp.Connection]:
    """
    Whether the response to ``request`` may be sent straight to
    ``transport`` (see :func:`send_now`); ``head_given``: the caller made
    the head, with its length.
    """
    return not (
        not writable_now(transport)
        or request.method != b"GET"
        or request.startedWriting
        or request.code in NO_BODY_CODES
        or request.lastModified is not None
        or request.etag is not None
        or request.cookies
        or (not head_given and not request.responseHeaders.hasHeader(b"content-length"))
        or client_gone(request)
    )


def _send_at_once(
    request: Request, transport: tcp.Connection, head: bytes, body: bytes
) -> None:
    """
    ``head`` and ``body`` in one ``send`` now, what the socket does not
    take to Twisted's buffer.  At once, not at the end of the reactor's
    turn: the work that follows an answer in the same turn (its
    accounting, a read-ahead) does not hold it back, and a client that
    waits for each answer before its next request (pip) waits less;
    measured, a first 20 KB hit also costs less CPU than through the
    buffer (``bench/hitcost.py``, "new").
    """
    request.startedWriting = 1
    write_now(transport, head + body)
    request.sentLength += len(body)


def write_now(transport: tcp.Connection, data: bytes) -> None:
    """
    ``data`` to ``transport``'s socket in one ``send`` now, what the socket
    does not take to Twisted's buffer; for a transport that holds nothing
    unsent (:func:`writable_now`).
    """
    try:
        sent = transport.getHandle().send(data)
    except OSError:
        # EAGAIN, or an error the transport finds and reports itself.
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)


def send_now(
    request: Request, source: StoredBody, start: int, end: int, head: bytes | None = None,
) -> int | None:
    """
    Send the response's head and as much of bytes ``[start, end)`` of a
    stored body as can go now, and give the offset reached: the caller
    streams the rest (if any) with :class:`BodySender`, the ordinary way,
    which keeps flow control and the send-stall timeout.  A small body
    (up to :data:`SEND_WITH_HEAD`) goes with its head in one ``send``
    (:func:`_send_at_once`); a larger one straight to the socket (``send``
    with ``MSG_MORE``, then ``sendfile``: no copy through Python) for as
    much as the socket takes.

    None, with nothing sent, where this cannot be done (see
    :func:`_may_send_now`): a transport that is not a plain TCP connection
    (TLS, a UNIX socket, a test double), bytes already buffered by Twisted
    (they must go first), a response Twisted would alter on its first
    write (chunked, Last-Modified, ETag, cookies), a HEAD or a status
    without a body.

    ``head`` is the status line and headers to send, when the caller made
    them (see :func:`buildcache.engine.respond.serve_stored`); by default
    they are the request's own (:func:`response_head`).
    """
    transport = getattr(request.channel, "transport", None)
    if not _may_send_now(transport, request, head is not None):
        return None
    if head is None:
        head = response_head(request)
    if end - start <= SEND_WITH_HEAD:
        # Small: one copy through Python and one system call beat
        # sendfile's setting up.
        body = os.pread(source.fd, end - start, start)
        _send_at_once(request, transport, head, body)
        return start + len(body)
    sock = transport.getHandle()
    try:
        # MSG_MORE: the kernel holds the head for the body's first bytes,
        # so both leave in one segment (one wake-up of the client, not two).
        head_sent = sock.send(head, _MORE)
    except OSError:
        # EAGAIN, or an error the transport finds and reports itself.
        head_sent = 0
    request.startedWriting = 1
    if head_sent < len(head):
        transport.write(head[head_sent:])
        return start
    socket_fd = sock.fileno()
    offset = start
    while offset < end:
        try:
            sent = os.sendfile(socket_fd, source.fd, offset, min(end - offset, SENDFILE_MAX))
        except OSError:
            break
        if not sent:
            # The file is shorter than its row: BodySender reads it and
            # ends the response as incomplete.
            break
        offset += sent
        if offset - start >= SENDFILE_MAX:
            break
    request.sentLength += offset - start
    return offset
