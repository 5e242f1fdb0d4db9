"""
What the engine resolves a request to (:class:`Resolved`: a stored entry
or an upstream answer, and how it was served), and the target as one
client may see it (:class:`ForClient`).
"""

from __future__ import annotations

from attrs import frozen

from buildcache.engine.exchanges import CacheStatus
from buildcache.engine.freshness import Kind
from buildcache.engine.policy import Target
from buildcache.fetch.fetcher import UpstreamAnswer
from buildcache.store import StoredObject

__all__ = ["Resolved"]


@frozen
class Resolved:
    """
    What the engine found for a target: a stored entry (HIT, REVALIDATED,
    STALE: ``stored`` is open, the caller sends or closes it) or an upstream
    answer (MISS: ``answer``, whose body is None when a HEAD was answered by
    a HEAD upstream).
    """

    cache: CacheStatus
    #: The kind that governed it (HTTP for a private request).
    kind: Kind
    stored: StoredObject | None = None
    answer: UpstreamAnswer | None = None
    #: For a client with credentials (see :class:`ForClient`).
    private: bool = False
    #: Read from the shared tier (a HIT: no byte crossed the upstream line).
    shared: bool = False

    def close(self) -> None:
        """Give up what was resolved without sending it."""
        if self.stored is not None:
            self.stored.close()
        elif self.answer is not None and self.answer.body is not None:
            self.answer.body.close()


@frozen
class ForClient:
    """
    A target as one client may see it: with the client's own credentials,
    its entries are keyed by them (an HMAC under the cache's secret) and
    only their own directives decide their life.
    """

    target: Target
    key: str
    kind: Kind
    private: bool
