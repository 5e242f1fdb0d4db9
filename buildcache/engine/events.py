"""
What the engine and the front ends tell operations, and what operations
gives them back: the observer of client requests and their cache outcomes
(:class:`CacheObserver`, implemented by :mod:`buildcache.ops`), and the
status pages a front end serves on its port (:class:`StatusPages`).
Nothing here imports :mod:`buildcache.ops`.
"""

from __future__ import annotations

from typing import Protocol

from attrs import frozen
from twisted.web.server import Request

from buildcache.fetch.events import FetchObserver


@frozen
class Exchange:
    """
    One finished client request, as the engine (or, for a refusal, the
    front end) answered it: what the access log, the totals, the traffic
    series and the most-requested table are made of.
    """

    #: "proxy", "mirror" or "index" (the registry's later).
    front_end: str
    client: str
    method: str
    #: The request target as sent (the access log redacts it, see
    #: :func:`buildcache.credentials.redact`).
    url: str
    #: The HTTP status sent.
    status: int
    #: How it was served: "HIT", "MISS", "REVALIDATED", "STALE", or None
    #: for a refusal or an error answered before any cache decision.
    cache: str | None
    #: Body bytes sent to the client.
    bytes_sent: int
    #: Seconds from the start of the answer to its end.
    duration: float
    #: False when the client or the upstream ended it early.
    completed: bool
    #: The package or project it was for, if any.
    name: str | None = None
    #: Its body came from the shared tier (``cache`` is "HIT": no byte of
    #: it crossed the upstream line).
    shared: bool = False


class CacheObserver(FetchObserver, Protocol):
    """
    Told of every client request and how it was served.
    """

    def exchange_finished(self, exchange: Exchange) -> None:
        """
        A client request ended (see :class:`Exchange`).
        """

    def stale_served(self, url: str) -> None:
        """
        A stored copy was served stale because its upstream (at ``url``)
        failed.
        """

    def read_ahead_started(self) -> None:
        """
        A file was fetched ahead of any client asking for it.
        """

    def read_ahead_claimed(self) -> None:
        """
        A client asked for a file read ahead for it.
        """

    def evicted(self, count: int, size: int) -> None:
        """
        The store evicted ``count`` entries of ``size`` bytes in all to stay
        under its limit.
        """


class StatusPages(Protocol):
    """
    The status page, its JSON and the metrics, served on every port.
    """

    #: The request paths the pages answer.
    paths: frozenset[str]

    def serve(self, request: Request, path: str) -> None:
        """
        Answer ``request`` for ``path`` (one of :attr:`paths`).
        """
