"""
What the engine and the front ends tell operations, and what operations
gives them back: the observer of client requests and their cache outcomes
(:class:`CacheObserver`, implemented by :mod:`buildcache.ops`), and the
status pages a front end serves on its port (:class:`StatusPages`).
Nothing here imports :mod:`buildcache.ops`.
"""

from __future__ import annotations

from typing import Protocol

from twisted.web.server import Request

from buildcache.fetch.events import FetchObserver


class CacheObserver(FetchObserver, Protocol):
    """
    Told of every client request and how it was served.
    """

    def track(self, request: Request, front_end: str, name: str | None = None) -> None:
        """
        Account for ``request`` when it ends; called once, when a front end
        starts answering it.  ``name`` is the package or project it is for.
        """

    def stale_served(self, url: str) -> None:
        """
        A stored copy was served stale because its upstream (at ``url``)
        failed.
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
