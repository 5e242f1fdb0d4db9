"""
Putting the index together: the page resolver, the file and root servers
and the front end that routes to them, all over one cache engine.
"""

from __future__ import annotations

from collections.abc import Sequence

from buildcache.access import AccessPolicy
from buildcache.ecosystems.pypi.files import FileServer
from buildcache.ecosystems.pypi.index import IndexResource
from buildcache.ecosystems.pypi.pagereads import PageReadAhead
from buildcache.ecosystems.pypi.pages import PageResolver
from buildcache.ecosystems.pypi.prefetch import Prefetcher
from buildcache.ecosystems.pypi.root import RootServer
from buildcache.engine.core import Engine

__all__ = ["index_resource"]


def index_resource(
    engine: Engine,
    upstreams: Sequence[str],
    index_ttl: float,
    policy: AccessPolicy | None = None,
    prefetcher: Prefetcher | None = None,
) -> IndexResource:
    """
    The index over ``upstreams`` (simple-index base URLs such as
    ``http://host/simple``, in priority order), answering through
    ``engine``, whose observer is told of every request and stale answer
    (the ``prefetcher`` has its own; it is given the read-ahead of
    dependencies' pages over this index's upstreams).  With ``policy``,
    clients outside its ``allow_from`` are refused.
    """
    pages = PageResolver.of(engine, upstreams, index_ttl)
    if prefetcher is not None and prefetcher.pages is None:
        prefetcher.pages = PageReadAhead(
            engine, pages, prefetcher.reactor, prefetcher.observer,
            on_candidate=prefetcher.metadata_ahead,
        )
    root = None
    if pages.upstreams:
        root = RootServer(engine, pages.upstreams[0], index_ttl)
    return IndexResource(
        engine, pages, FileServer(engine, pages, prefetcher), root, index_ttl,
        policy=policy,
    )
