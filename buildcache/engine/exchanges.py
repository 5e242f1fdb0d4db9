"""
Accounting of client requests: the one place cache outcomes and byte
counts are recorded.  A front end begins an :class:`ClientExchange` when it
starts answering a request (refusals included); the engine records how it
served it (:meth:`ClientExchange.served`); when the request ends the
observer gets one :class:`buildcache.engine.events.Exchange`.

The record also knows, through ``notifyFinish``, whether the client has
gone (:func:`client_gone`), which an answer prepared at length (a checked
download, a revalidation) must ask before it writes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from weakref import WeakKeyDictionary

from attrs import define
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request

from buildcache.engine.events import CacheObserver, Exchange

__all__ = [
    "CacheStatus", "ExchangeState", "ClientExchange", "Exchanges", "client_gone",
    "exchange_of", "ErrorFormat", "finished_exchange", "from_shared_tier",
    "hand_off_exchange",
]

#: How a front end writes its errors: (status, one-line message) ->
#: (content type, body).  The registry answers in the distribution spec's
#: JSON; the others in plain text (see
#: :func:`buildcache.engine.respond.send_error`).
ErrorFormat = Callable[[int, str], tuple[str, bytes]]


class ExchangeState(enum.Enum):
    """Where a client request is."""

    ANSWERING = "answering"
    #: The response went out whole.
    FINISHED = "finished"
    #: The connection was lost before the response ended.
    GONE = "gone"
    #: Handed to another process, which logs and counts it (a hit
    #: worker's miss).
    HANDED_OFF = "handed-off"


class CacheStatus(enum.Enum):
    """How a response was served, sent as ``X-Cache``."""

    HIT = "HIT"
    MISS = "MISS"
    REVALIDATED = "REVALIDATED"
    STALE = "STALE"


#: The record of each request begun, for as long as the request lives.  A
#: record never refers to its request: that would keep both alive for good.
_RECORDS: WeakKeyDictionary[Request, ClientExchange] = WeakKeyDictionary()


@define
class ClientExchange:
    """
    One client request being answered.
    """

    front_end: str
    started: float
    name: str | None = None
    #: How the engine served it; None for a refusal or an error.
    cache: CacheStatus | None = None
    state: ExchangeState = ExchangeState.ANSWERING
    #: How errors for this request are written; None for plain text.
    errors: ErrorFormat | None = None
    #: Its body was read from the shared tier.
    shared: bool = False

    def served(self, cache: CacheStatus) -> None:
        """The engine answered with ``cache``."""
        self.cache = cache

    def failed(self) -> None:
        """The answer is an error: no cache outcome (a later one is replaced)."""
        self.cache = None

    def end(self, state: ExchangeState) -> None:
        """The request ended (once: the first ending counts)."""
        if self.state is ExchangeState.ANSWERING:
            self.state = state

    @property
    def gone(self) -> bool:
        return self.state is ExchangeState.GONE


def exchange_of(request: Request) -> ClientExchange | None:
    """The record of ``request``, if one was begun."""
    return _RECORDS.get(request)


def from_shared_tier(request: Request) -> None:
    """
    ``request`` is answered with a body read from the shared tier (a HIT
    that accounting also counts apart).
    """
    record = _RECORDS.get(request)
    if record is not None:
        record.shared = True


def hand_off_exchange(request: Request) -> None:
    """
    ``request`` leaves this process unanswered (see
    :meth:`buildcache.engine.core.Engine.hand_off`): it is not reported.
    """
    record = _RECORDS.get(request)
    if record is not None:
        record.end(ExchangeState.HANDED_OFF)


def client_gone(request: Request) -> bool:
    """
    Whether the client left while its answer was being prepared: nothing
    can be sent to it, and ``finish`` would raise.  A request nobody began
    (a test double) is not gone.
    """
    record = _RECORDS.get(request)
    return record is not None and record.gone


@define
class Exchanges:
    """
    Begins the record of each client request, and reports each one that
    ends to ``observer``.
    """

    clock: IReactorTime
    observer: CacheObserver | None = None

    def begin(
        self, request: Request, front_end: str, name: str | None = None,
        errors: ErrorFormat | None = None,
    ) -> ClientExchange:
        """
        Start accounting for ``request`` (once, when a front end starts
        answering it); ``name`` is the package or project it is for, and
        ``errors`` how its error answers are written.
        """
        record = _RECORDS.get(request)
        if record is not None:
            return record
        record = ClientExchange(front_end, self.clock.seconds(), name, errors=errors)
        _RECORDS[request] = record

        def ended(result: object) -> None:
            record.end(
                ExchangeState.FINISHED if not isinstance(result, Failure)
                else ExchangeState.GONE
            )
            self._report(request, record)

        request.notifyFinish().addBoth(ended)
        return record

    def _report(self, request: Request, record: ClientExchange) -> None:
        if self.observer is None or record.state is ExchangeState.HANDED_OFF:
            return
        self.observer.exchange_finished(_exchange(request, record, self.clock.seconds()))


def finished_exchange(request: Request) -> Exchange | None:
    """
    What accounting will record of ``request`` if it ends now, complete
    (None for a request no front end began).
    """
    record = _RECORDS.get(request)
    if record is None:
        return None
    return _exchange(request, record, record.started, completed=True)


def _exchange(
    request: Request, record: ClientExchange, now: float, completed: bool | None = None
) -> Exchange:
    if completed is None:
        completed = record.state is ExchangeState.FINISHED
    return Exchange(
        front_end=record.front_end,
        client=getattr(request.getClientAddress(), "host", "-"),
        method=request.method.decode("latin-1"),
        url=request.uri.decode("latin-1"),
        status=request.code,
        cache=None if record.cache is None else record.cache.value,
        bytes_sent=int(getattr(request, "sentLength", 0)),
        duration=now - record.started,
        completed=completed,
        name=record.name,
        shared=record.shared,
    )
