"""
The root page ``/simple/`` of the index port.

The upstream root (hundreds of thousands of names) is streamed from the
first upstream and stored per media type for :data:`ROOT_TTL`; nothing
here reads it, and no decision depends on it (a project's page is fetched
directly).  When the upstream fails or answers an error status (429, 403, 5xx...),
the stored copy is served stale.
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import define, frozen
from twisted.web.server import Request

from buildcache.ecosystems.pypi.policy import USER_AGENT, IndexPolicy, answer_status
from buildcache.engine.core import Engine
from buildcache.engine.freshness import Kind, client_cache_control
from buildcache.engine.policy import Target
from buildcache.engine.respond import send_error

__all__ = ["RootServer", "RootPolicy", "root_key", "ROOT_TTL"]

#: Seconds the stored upstream root stays fresh: it is huge, lags upstream
#: anyway, and nothing here depends on it.
ROOT_TTL = 24 * 3600.0


def root_key(upstream: str, media_type: str) -> str:
    """
    The store key of ``upstream``'s root page in ``media_type``.
    """
    return f"simple-root|{upstream}|{media_type}"


@frozen
class RootPolicy(IndexPolicy):
    """
    How the engine treats the root: an index file fresh for
    :data:`ROOT_TTL`, sent to clients with the pages' lifetime
    (``index_ttl``) and ``Vary: Accept``.
    """

    index_ttl: float = 600.0

    def ttl(self, kind: Kind, default: float) -> float:
        return ROOT_TTL

    def cache_control(
        self, kind: Kind, ttl: float, response_headers: Mapping[str, str] | None,
        status: int,
    ) -> str | None:
        return client_cache_control(Kind.INDEX, self.index_ttl)

    def extra_headers(self, target: Target) -> Mapping[str, str]:
        return {"vary": "Accept"}

    def stale_on(self, status: int) -> bool:
        # Any error serves the stored root (a rate limit's 429, a 403 from
        # a proxy in the way), not only a 5xx: nothing depends on the root
        # being current, and it lags upstream anyway.  (The engine never
        # hides a 404 or 410 behind a stored copy.)
        return status >= 400


@define
class RootServer:
    """
    Answers ``/simple/``; see the module docstring.
    """

    engine: Engine
    #: The first upstream's base URL, without trailing slash.
    upstream: str
    index_ttl: float

    async def serve(self, request: Request, media_type: str) -> None:
        """
        Answer ``request`` with the root in ``media_type`` (negotiated).
        """
        url = f"{self.upstream}/"
        target = Target(
            url=url,
            front_end="index",
            # The client's Cache-Control is not heeded: the root lags
            # upstream anyway, and is huge.
            headers={},
            upstream_headers={"accept": media_type, "user-agent": USER_AGENT},
            key=root_key(self.upstream, media_type),
            follow_redirects=True,
            operator_credentials=True,
            variants=False,
        )
        policy = RootPolicy(index_ttl=self.index_ttl)
        resolved = await self.engine.resolve_for(request, target, policy)
        if resolved is None:
            return
        answer = resolved.answer
        if answer is not None and answer.status != 200:
            resolved.close()
            send_error(request, answer_status(answer.status), f"{url} answered {answer.status}")
            return
        self.engine.respond(request, target, policy, resolved)
