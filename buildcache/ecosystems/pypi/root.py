"""
The root page ``/simple/`` of the index port.

The upstream root (hundreds of thousands of names) is streamed from the
first upstream and stored per media type for :data:`ROOT_TTL`; nothing
here reads it, and no decision depends on it (a project's page is fetched
directly).  When the upstream fails, the stored copy is served stale.
"""

from __future__ import annotations

from attrs import define
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from buildcache.ecosystems.pypi.pages import USER_AGENT
from buildcache.engine.events import CacheObserver
from buildcache.engine.freshness import Kind, client_cache_control, validators_of
from buildcache.engine.respond import (
    CacheStatus,
    client_gone,
    send_error,
    serve_answer,
    serve_stored,
)
from buildcache.fetch.fetcher import (
    Fetcher,
    UpstreamError,
    UpstreamRequest,
    UpstreamTimeout,
)
from buildcache.store import Store, StoredObject

__all__ = ["RootServer", "root_key", "ROOT_TTL"]

#: Seconds the stored upstream root stays fresh: it is huge, lags upstream
#: anyway, and nothing here depends on it.
ROOT_TTL = 24 * 3600.0


def root_key(upstream: str, media_type: str) -> str:
    """
    The store key of ``upstream``'s root page in ``media_type``.
    """
    return f"simple-root|{upstream}|{media_type}"


@define
class RootServer:
    """
    Answers ``/simple/``; see the module docstring.
    """

    log = Logger()

    store: Store
    fetcher: Fetcher
    #: The first upstream's base URL, without trailing slash.
    upstream: str
    index_ttl: float
    clock: IReactorTime
    observer: CacheObserver | None = None

    async def serve(self, request: Request, media_type: str) -> None:
        """
        Answer ``request`` with the root in ``media_type`` (negotiated).
        """
        upstream = self.upstream
        key = root_key(upstream, media_type)
        cache_control = client_cache_control(Kind.INDEX, self.index_ttl)
        extra = {"vary": "Accept"}
        stored = self.store.lookup(key)
        if stored is not None and (
            self.clock.seconds() - stored.entry.validated_at < ROOT_TTL
        ):
            serve_stored(request, stored, CacheStatus.HIT, cache_control, extra)
            return
        url = f"{upstream}/"
        conditional = validators_of(stored.entry.headers) if stored is not None else {}
        try:
            answer = await self.fetcher.fetch(
                UpstreamRequest(
                    key=key,
                    url=url,
                    headers={"accept": media_type, "user-agent": USER_AGENT, **conditional},
                    follow_redirects=True,
                    front_end="index",
                )
            )
        except UpstreamError as e:
            self._root_failed(request, stored, url, str(e), isinstance(e, UpstreamTimeout))
            return
        if client_gone(request):
            if answer.body is not None:
                answer.body.close()
            if stored is not None:
                stored.close()
            return
        if answer.status == 304:
            if stored is not None:
                stored.close()
            fresh = self.store.lookup(key)
            if fresh is None:
                send_error(request, 502, f"{url} answered 304 but nothing is stored; try again")
                return
            serve_stored(request, fresh, CacheStatus.REVALIDATED, cache_control, extra)
            return
        assert answer.body is not None
        if answer.status != 200:
            answer.body.close()
            self._root_failed(request, stored, url, f"{url} answered {answer.status}", False)
            return
        if stored is not None:
            stored.close()
        serve_answer(request, answer, cache_control, extra)

    def _root_failed(
        self, request: Request, stored: StoredObject | None, url: str,
        why: str, timed_out: bool,
    ) -> None:
        if client_gone(request):
            if stored is not None:
                stored.close()
            return
        if stored is None:
            send_error(
                request, 504 if timed_out else 502,
                f"upstream {url} failed ({why}) and no copy of the root is cached",
            )
            return
        self.log.warn("Serving stale root index: {why}", why=why)
        if self.observer is not None:
            self.observer.stale_served(url)
        serve_stored(
            request, stored, CacheStatus.STALE,
            client_cache_control(Kind.INDEX, self.index_ttl), {"vary": "Accept"},
        )

