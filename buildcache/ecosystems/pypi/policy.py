"""
The index's rules as cache-engine policies: what its pages, root and files
share (:class:`IndexPolicy`), a project page's (:class:`PagePolicy`, with
the :class:`PageCheck` every page body passes before it is stored), and
the headers the index sends upstream.  The root's and the files' policies
live with their servers (:mod:`.root`, :mod:`.files`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import ClassVar

from attrs import Factory, define, frozen

from buildcache import __version__
from buildcache.ecosystems.pypi.lru import LRU
from buildcache.ecosystems.pypi.model import ProjectPage
from buildcache.ecosystems.pypi.parse import parse_page
from buildcache.engine.core import Engine
from buildcache.engine.errors import ERROR_STATUS
from buildcache.engine.freshness import Kind
from buildcache.engine.policy import Expectation, GenericPolicy, Target

__all__ = ["USER_AGENT", "ANSWERED", "IndexPolicy", "PagePolicy", "PageCheck"]

#: Sent upstream with every page, file and root request of the index.
USER_AGENT = f"buildcache/{__version__}"

#: The failures the engine answers with a status: what a resolve may raise.
ANSWERED = tuple(kind for kind, _ in ERROR_STATUS)


@frozen
class IndexPolicy(GenericPolicy):
    """
    What the index's pages, root and files share as engine policies: their
    kind is the class's, whatever the URL looks like, and only a 200 is
    stored (an upstream's error page never replaces a good copy).
    """

    #: The kind of every target of this policy.
    KIND: ClassVar[Kind] = Kind.INDEX

    def kind(self, target: Target) -> Kind:
        return self.KIND

    def storable(
        self, kind: Kind, status: int, response_headers: Mapping[str, str],
        request_headers: Mapping[str, str],
    ) -> bool:
        return status == 200


@frozen
class PagePolicy(IndexPolicy):
    """
    How the engine treats a project page: an index file, fresh for
    ``index_ttl``, whose body is checked to be a simple page before it is
    stored (see :class:`PageCheck`), so a captive portal's 200 never
    replaces a good page.
    """

    index_ttl: float = 600.0
    models: LRU[tuple[str, str], ProjectPage] | None = None

    def ttl(self, kind: Kind, default: float) -> float:
        return self.index_ttl

    async def expect(self, target: Target, engine: Engine) -> Expectation:
        models = self.models
        assert models is not None
        return Expectation(verify=lambda headers: PageCheck(
            target.url, headers.get("content-type"), target.key, models
        ))


@define
class PageCheck:
    """
    Checks that an upstream page is a simple-index page before it is
    stored (so a captive portal's 200 never replaces a good page), and
    keeps the parsed model for the request that asked for it.
    """

    url: str
    content_type: str | None
    key: str
    models: LRU[tuple[str, str], ProjectPage]
    _data: bytearray = Factory(bytearray)

    def update(self, data: bytes) -> None:
        self._data += data

    def finish(self) -> None:
        data = bytes(self._data)
        page = parse_page(data, self.content_type, self.url)
        self.models.put((self.key, hashlib.sha256(data).hexdigest()), page, len(data))
