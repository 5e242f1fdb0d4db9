"""
Putting the index together: the page resolver, the file and root servers
and the front end that routes to them, over one store and fetcher.  The
front end (:mod:`.index`) is given its parts, so that it names neither the
store nor the fetcher.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from buildcache.access import AccessPolicy
from buildcache.ecosystems.pypi.files import FileServer
from buildcache.ecosystems.pypi.index import IndexResource
from buildcache.ecosystems.pypi.pages import PageResolver
from buildcache.ecosystems.pypi.prefetch import Prefetcher
from buildcache.ecosystems.pypi.root import RootServer
from buildcache.engine.events import CacheObserver
from buildcache.fetch.fetcher import Fetcher
from buildcache.store import Store

__all__ = ["index_resource"]


def index_resource(
    store: Store,
    fetcher: Fetcher,
    upstreams: Sequence[str],
    index_ttl: float,
    clock: IReactorTime,
    policy: AccessPolicy | None = None,
    activity: CacheObserver | None = None,
    prefetcher: Prefetcher | None = None,
) -> IndexResource:
    """
    The index over ``upstreams`` (simple-index base URLs such as
    ``http://host/simple``, in priority order).  ``activity`` is told of
    every request and stale answer (the ``prefetcher`` has its own
    observer).
    """
    pages = PageResolver.of(store, fetcher, upstreams, index_ttl, clock, activity)
    root = None
    if pages.upstreams:
        root = RootServer(store, fetcher, pages.upstreams[0], index_ttl, clock, activity)
    return IndexResource(
        pages, FileServer(store, fetcher, pages, prefetcher), root, index_ttl,
        policy=policy, activity=activity,
    )
