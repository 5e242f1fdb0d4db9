"""
Repeated hits answered from the bytes of their request alone.

Most hits a build server sees are the same small files asked for again and
again, in exactly the same words (the same client, the same request line
and headers).  Parsing each such request, routing it and deciding it costs
several times what sending the answer does.  This module owns the table
that skips that work: :class:`HotHits`, one per port.

A response is remembered when the ordinary path has just answered it as a
whole HIT of an immutable, unprivate entry (see
:func:`buildcache.engine.respond.serve_stored`), for a request whose head
came in one read with nothing the table cannot repeat (credentials, a
body, a range or a conditional, ``Connection: close``; see
:func:`repeatable_head`).  The same bytes from the same client address are
then answered with the same head (a fresh ``Date``) and the file's bytes,
with the access time, the shared tier's use and the accounting the
ordinary path records, as long as nothing the answer was derived from has
changed: no row written or committed by another process (the store's
:meth:`~buildcache.store.StoreReader.changes`) and, in the process that
fetches, no download started (a lookup hook may have waited for one).
Anything else, or any doubt, goes the ordinary way.

Bounded per port and process: :data:`HOT_KEPT` responses and
:data:`HOT_BYTES_KEPT` bytes of request and response heads and rows,
dropped all at once past either;
bodies of at most :data:`HOT_BODY_MAX` bytes, read from their file each
time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from weakref import WeakKeyDictionary

from attrs import Factory, define, evolve, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.web.http import datetimeToString
from twisted.web.server import Request

from buildcache.engine.events import CacheObserver, Exchange
from buildcache.engine.exchanges import finished_exchange
from buildcache.store import Entry, Store

__all__ = [
    "HOT_BODY_MAX", "HOT_BYTES_KEPT", "HOT_KEPT", "HotAnswer", "HotHits", "HotResponse",
    "remember", "repeat_with", "repeatable_head",
]

#: The largest body remembered: one read and one write with its head.
HOT_BODY_MAX = 64 * 1024
#: Responses kept per table, and bytes of their request and response heads
#: and rows.
HOT_KEPT = 4096
HOT_BYTES_KEPT = 4 * 1024 * 1024
#: The longest request head remembered.
HOT_REQUEST_MAX = 8 * 1024

#: Request header fields the table never answers: credentials (a response
#: to them is nobody else's), what shapes the answer differently from a
#: whole 200, and what frames a body or changes the connection.
_NEVER = frozenset({
    b"authorization", b"proxy-authorization", b"cookie",
    b"range", b"if-range", b"if-match", b"if-none-match", b"if-modified-since",
    b"if-unmodified-since", b"expect", b"content-length", b"transfer-encoding",
    b"upgrade", b"te", b"trailer",
})
#: Fields allowed only with ``keep-alive`` as their value.
_CONNECTION = frozenset({b"connection", b"proxy-connection", b"keep-alive"})

_DATE_FIELD = b"\r\nDate: "


def repeatable_head(raw: bytes) -> bool:
    """
    Whether ``raw``, the whole of what a client sent, is one ``GET`` head
    of HTTP/1.1 that the same bytes would always ask the same of: no body,
    no pipelined request after it, none of the fields in :data:`_NEVER`,
    no ``Connection`` but ``keep-alive``, no folded or malformed line.
    """
    if len(raw) > HOT_REQUEST_MAX or not raw.startswith(b"GET "):
        return False
    end = raw.find(b"\r\n\r\n")
    if end != len(raw) - 4:
        return False
    lines = raw[:end].split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3 or request_line[2] != b"HTTP/1.1":
        return False
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip() or b"\n" in line or b"\r" in line:
            return False
        name = name.lower()
        if name in _NEVER:
            return False
        if name in _CONNECTION and value.strip().lower() != b"keep-alive":
            return False
    return True


@frozen
class HotResponse:
    """
    A response remembered: its head split around the ``Date`` value, the
    stored body's file, and what answering it again records.
    """

    head_to_date: bytes
    head_after_date: bytes
    entry: Entry
    path: str
    #: The table's generation when its request was offered (see
    #: :class:`HotHits`): before anything of its answer was looked up.
    generation: int
    exchange: Exchange
    #: What its front end does after each answer (see :func:`repeat_with`).
    after: Callable[[], None] | None = None

    @property
    def weight(self) -> int:
        # The entry's row (its stored headers) is held too.
        return (
            len(self.head_to_date) + len(self.head_after_date) + len(self.path)
            + self.entry.meta_size
        )


@frozen
class HotAnswer:
    """
    An answer from the table: the bytes to send, and what to do once
    they are on their way (see :func:`repeat_with`).
    """

    data: bytes
    after: Callable[[], None] | None = None


@frozen
class _Offer:
    table: HotHits
    key: tuple[str, bytes]
    generation: int
    after: Callable[[], None] | None = None


#: The table, key and generation each request may be remembered under,
#: from when its front end offers it until its answer (see :func:`remember`).
_OFFERS: WeakKeyDictionary[Request, _Offer] = WeakKeyDictionary()


@define
class HotHits:
    """
    One port's remembered responses, by client address and request bytes;
    see the module docstring.

    ``generation`` moves whenever a remembered answer may no longer hold
    (:meth:`buildcache.engine.core.Engine.hot_hits`); ``used`` is told of
    every entry answered (the shared tier's record); ``observer`` gets
    each answer's :class:`~buildcache.engine.events.Exchange`.
    """

    store: Store
    clock: IReactorTime
    generation: Callable[[], int]
    observer: CacheObserver | None = None
    used: Callable[[Entry], None] | None = None
    _table: dict[tuple[str, bytes], HotResponse] = Factory(dict)
    _bytes: int = 0
    #: The ``Date`` value of the current second.
    _date: tuple[int, bytes] = (-1, b"")

    def __len__(self) -> int:
        return len(self._table)

    def offer(self, request: Request, client: str, raw: bytes) -> None:
        """
        ``request``, whose head is ``raw`` as ``client`` sent it in one
        read, may be remembered if it is answered as a whole hit.
        """
        if repeatable_head(raw):
            _OFFERS[request] = _Offer(self, (client, raw), self.generation())

    def answer(self, client: str, raw: bytes) -> HotAnswer | None:
        """
        The whole response (head and body) to ``raw`` from ``client``,
        accounted as sent, when one is remembered and still holds; else
        None, with nothing done.
        """
        key = (client, raw)
        response = self._table.get(key)
        if response is None:
            return None
        entry = response.entry
        if response.generation != self.generation():
            self._drop(key)
            return None
        try:
            fd = os.open(response.path, os.O_RDONLY)
        except OSError:
            self._drop(key)
            return None
        try:
            body = os.pread(fd, entry.size + 1, 0)
        except OSError:
            body = b""
        finally:
            os.close(fd)
        if len(body) != entry.size:
            # Not the stored body any more (a file removed and its name
            # reused would not be its size).
            self._drop(key)
            return None
        self.store.accessed(entry.key)
        if self.used is not None:
            self.used(entry)
        if self.observer is not None:
            self.observer.exchange_finished(response.exchange)
        return HotAnswer(
            b"".join((response.head_to_date, self._date_value(), response.head_after_date, body)),
            response.after,
        )

    def _date_value(self) -> bytes:
        now = self.clock.seconds()
        second = int(now)
        if self._date[0] != second:
            self._date = (second, datetimeToString(now))
        return self._date[1]

    def _drop(self, key: tuple[str, bytes]) -> None:
        response = self._table.pop(key, None)
        if response is not None:
            self._bytes -= response.weight + len(key[1])

    def keep(
        self, key: tuple[str, bytes], generation: int, request: Request, head: bytes,
        entry: Entry, exchange: Exchange, after: Callable[[], None] | None = None,
    ) -> None:
        """
        Remember ``request``'s answer, ``head`` (with the request's
        ``Date``) and ``entry``'s body, under ``key`` (see :func:`remember`).
        """
        date = request.responseHeaders.getRawHeaders(b"date")
        if not date:
            return
        marker = _DATE_FIELD + date[0] + b"\r\n"
        at = head.find(marker)
        if at < 0:
            return
        cut = at + len(_DATE_FIELD)
        path = self.store.object_path(entry.key)
        if path is None:
            return
        response = HotResponse(
            head[:cut], head[cut + len(date[0]):], entry, path, generation, exchange,
            after,
        )
        weight = response.weight + len(key[1])
        self._drop(key)
        if len(self._table) >= HOT_KEPT or self._bytes + weight > HOT_BYTES_KEPT:
            self._table.clear()
            self._bytes = 0
        self._table[key] = response
        self._bytes += weight


def repeat_with(request: Request, after: Callable[[], None]) -> None:
    """
    ``request``'s front end does more than send its answer (a wheel's
    core metadata reads the file and its dependencies' pages ahead):
    ``after`` runs again after every answer the table gives it, once the
    answer is on its way.
    """
    offer = _OFFERS.get(request)
    if offer is not None:
        _OFFERS[request] = evolve(offer, after=after)


def remember(request: Request, head: bytes, entry: Entry) -> None:
    """
    ``request`` was just answered with ``head`` and the whole body of
    ``entry`` in one write: a whole hit that may be answered again from
    its bytes, if its front end offered it (:meth:`HotHits.offer`).
    """
    offer = _OFFERS.pop(request, None)
    if offer is None or entry.size > HOT_BODY_MAX:
        return
    exchange = finished_exchange(request)
    if exchange is None:
        return
    offer.table.keep(offer.key, offer.generation, request, head, entry, exchange, offer.after)
