"""
The one table that turns a failure into the status a client is answered
with, and the failure types a front end may need to name (re-exported
here, so that no front end imports the fetcher or the store for them).
"""

from __future__ import annotations

from typing import Any, cast

from buildcache.fetch.connect import TargetRefused
from buildcache.fetch.fetcher import (
    CacheWriteError,
    Fetcher,
    UpstreamError,
    UpstreamTimeout,
)
from buildcache.store import IntegrityError

__all__ = [
    "UpstreamError",
    "UpstreamTimeout",
    "TargetRefused",
    "IntegrityError",
    "CacheWriteError",
    "StaleForbidden",
    "HandOff",
    "NO_FETCHER",
    "ERROR_STATUS",
    "ANSWERED_ERRORS",
    "status_for",
    "message_for",
]


class StaleForbidden(Exception):
    """
    A private response could not be revalidated, and its directives forbid
    serving it stale (RFC 9111 sections 4.2.4 and 5.2.2).
    """


class HandOff(Exception):
    """
    A hits-only engine (a hit worker's, see
    :class:`buildcache.engine.core.Engine`) cannot answer this request as
    a fresh hit: it goes, untouched, to the process that fetches.  Raised
    before any I/O and before a byte of the answer is written; never in
    the error table (a front end lets it through to
    :meth:`buildcache.engine.core.Engine.crashed`, the one place that
    hands a request off).
    """


class _NoFetcher:
    """
    The fetcher of a hits-only engine: whatever reaches for it hands the
    request off (a path that would fetch is not a fresh hit).
    """

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            # Introspection (isinstance, pickling, test loaders), not a fetch.
            raise AttributeError(name)
        raise HandOff(f"a hit worker has no fetcher ({name})")

    def __repr__(self) -> str:
        return "NO_FETCHER"


#: Stands in for the fetcher of a hits-only engine (see :class:`_NoFetcher`).
NO_FETCHER: Fetcher = cast(Fetcher, _NoFetcher())


#: Failure type -> status, most specific first; :func:`status_for` takes
#: the first row the failure is an instance of.
ERROR_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (TargetRefused, 403),
    (UpstreamTimeout, 504),
    (CacheWriteError, 502),
    (UpstreamError, 502),
    (IntegrityError, 502),
    (StaleForbidden, 504),
)

#: Every failure the table answers: what a caller of
#: :meth:`buildcache.engine.core.Engine.resolve` catches.
ANSWERED_ERRORS: tuple[type[BaseException], ...] = tuple(
    kind for kind, _ in ERROR_STATUS
)


def status_for(error: BaseException) -> int:
    """
    The status a client gets for ``error``: its row of :data:`ERROR_STATUS`,
    else 500 (a bug).
    """
    for kind, status in ERROR_STATUS:
        if isinstance(error, kind):
            return status
    return 500


def message_for(error: BaseException) -> str:
    """
    The one-line explanation sent with :func:`status_for`'s status.
    """
    if isinstance(error, IntegrityError):
        return f"upstream sent a bad body: {error}"
    if isinstance(error, (UpstreamError, StaleForbidden)):
        return str(error)
    return "internal error"
