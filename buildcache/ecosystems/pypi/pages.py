"""
Project pages across the index's upstreams: which upstream owns a project,
and the parsed model a request is answered from.

One upstream's page is resolved by the cache engine under
:class:`~buildcache.ecosystems.pypi.policy.PagePolicy`
(:meth:`buildcache.engine.core.Engine.resolve`): freshness (``index_ttl``,
and the client-refresh floor the policy puts in the page target's
headers), revalidation, a 304 for a page evicted meanwhile, the page's
stale copy when its revalidation fails (an error status, an unreachable
upstream, a body that fails the page check), the failing-upstream backoff
(:mod:`buildcache.engine.backoff`), and error statuses are the engine's.
What spans upstreams is this module's (:class:`PageResolver`):

- **Which upstream serves a project**: the first, in priority order, that
  does not answer 404 serves all of it; files are never merged across
  upstreams, so a later index cannot slip a file into a project that an
  earlier one owns (dependency confusion).  An upstream 404 is remembered
  for :data:`NEGATIVE_TTL` seconds.  An upstream that fails (unreachable,
  an error status) is never skipped in favour of the next one: the engine
  serves its stored page stale; when it has none, a later upstream's
  stored page is served stale, else the client gets the failure's status
  (502/504, see :func:`~buildcache.ecosystems.pypi.policy.answer_status`).
- **Pages**: the upstream page body is stored under
  ``simple-page|<upstream>|<name>`` (fetched as JSON where the upstream
  offers it), parsed once into a
  :class:`~buildcache.ecosystems.pypi.model.ProjectPage` kept in a small
  in-memory LRU keyed by the stored body's sha256.
- **Rebuilt files**: when a page is fetched anew, the stored files it now
  gives another sha256 for (a file replaced upstream under the same name)
  are removed from the store, so neither port serves the old bytes again
  (see :func:`~buildcache.ecosystems.pypi.policy.disowned_files`).
- Pages are always fetched with buildcache's own headers (never a client's
  credentials), so an upstream's ``Vary`` cannot split them and nothing
  stored is private to a client; the page keys are the index's own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from urllib.parse import quote, urlsplit

import attrs
from attrs import Factory, define, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from buildcache.ecosystems.pypi.lru import LRU
from buildcache.ecosystems.pypi.model import (
    UPSTREAM_ACCEPT,
    ProjectFile,
    ProjectPage,
    SimplePageError,
)
from buildcache.ecosystems.pypi.parse import parse_page
from buildcache.ecosystems.pypi.policy import (
    USER_AGENT,
    PagePolicy,
    answer_status,
    disowned_files,
    drop_disowned_files,
    forget,
    open_entry,
    read_stored,
    read_whole,
)
from buildcache.engine.core import Engine, Resolved
from buildcache.engine.errors import ANSWERED_ERRORS, UpstreamError, status_for
from buildcache.engine.exchanges import CacheStatus
from buildcache.engine.freshness import GONE_STATUSES
from buildcache.engine.keys import cache_key
from buildcache.engine.policy import Target

__all__ = [
    "PageResolver",
    "ResolvedPage",
    "Refusal",
    "page_key",
    "page_digests",
    "disowned_files",
    "metadata_servable",
    "NEGATIVE_TTL",
]

#: Seconds an upstream's 404 for a project is believed without asking again.
NEGATIVE_TTL = 60.0

#: Parsed page models kept in memory: at most this many, and at most this
#: many bytes of upstream page bodies behind them (a model takes a few
#: times its body's size).
MODEL_CACHE_ENTRIES = 512
MODEL_CACHE_BYTES = 16 * 1024 * 1024

#: Projects whose 404 is remembered, before the expired ones are pruned.
_MISSING_KEPT = 4096


def page_key(upstream: str, name: str) -> str:
    """
    The store key of ``upstream``'s page for the normalised ``name``.
    """
    return f"simple-page|{upstream}|{name}"


def split_page_key(key: str) -> tuple[str, str]:
    """
    The upstream and normalised project name of a :func:`page_key`.
    """
    _, upstream, name = key.split("|", 2)
    return upstream, name


def page_url(upstream: str, name: str) -> str:
    """
    The URL of ``upstream``'s page for the normalised ``name``: what the
    resolver asks for, and what a stored page's relative links resolve
    against.
    """
    return f"{upstream}/{quote(name)}/"


def page_digests(page: ProjectPage) -> dict[str, str]:
    """
    The store key and sha256 of every file (and core metadata file) that
    ``page`` gives a sha256 for.
    """
    digests: dict[str, str] = {}
    for file in page.files:
        if file.sha256:
            digests.setdefault(cache_key(file.url), file.sha256.lower())
        metadata = file.core_metadata_hashes.get("sha256")
        if metadata and metadata_servable(file):
            digests.setdefault(cache_key(file.metadata_url), metadata.lower())
    return digests


def metadata_servable(file: ProjectFile) -> bool:
    """
    Whether the core metadata of ``file`` can be fetched: from
    ``<url>.metadata`` (PEP 658), which a URL with a query string does not
    have.
    """
    return not urlsplit(file.url).query


class Refusal(Exception):
    """
    The request ends with an error status; the message says why.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _UpstreamFailed(Exception):
    """
    An upstream could not give a page (unreachable, timed out, 5xx, or a
    body that broke off).
    """

    def __init__(self, url: str, message: str, status: int) -> None:
        super().__init__(message)
        self.url = url
        self.message = message
        #: What the client gets when no stored page answers instead.
        self.status = status


@frozen
class ResolvedPage:
    """
    The page model that answers a request, and where it came from.
    """

    upstream: str
    name: str
    page: ProjectPage
    #: sha256 of the upstream body the model was parsed from.
    sha256: str
    status: CacheStatus

    @property
    def key(self) -> str:
        return page_key(self.upstream, self.name)


@define
class PageResolver:
    """
    Finds the page that answers a request for a project; see the module
    docstring.  ``upstreams`` are simple-index base URLs without trailing
    slash, in priority order.
    """

    log = Logger()

    engine: Engine
    upstreams: tuple[str, ...]
    index_ttl: float
    clock: IReactorTime
    _missing_until: dict[tuple[str, str], float] = Factory(dict)
    #: The upstream and body digest of the page last served per project:
    #: file requests follow the page the client saw.
    _served: dict[str, tuple[str, str]] = Factory(dict)
    _models: LRU[tuple[str, str], ProjectPage] = Factory(
        lambda: LRU(MODEL_CACHE_ENTRIES, MODEL_CACHE_BYTES)
    )
    _policy: PagePolicy = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._policy = PagePolicy(index_ttl=self.index_ttl, models=self._models)

    @classmethod
    def of(
        cls, engine: Engine, upstreams: Sequence[str], index_ttl: float,
    ) -> PageResolver:
        """
        A resolver for ``upstreams`` as configured (trailing slashes
        allowed).
        """
        return cls(
            engine, tuple(u.rstrip("/") for u in upstreams), index_ttl, engine.clock
        )

    async def resolve(self, name: str, headers: Mapping[str, str]) -> ResolvedPage:
        """
        The page of the normalised ``name`` from the first upstream that has
        the project, fetched or revalidated as ``headers`` (the client's)
        and the page's age require.  Raises :class:`Refusal`.
        """
        if not self.upstreams:
            raise Refusal(502, "this index has no upstream configured")
        for position, upstream in enumerate(self.upstreams):
            now = self.clock.seconds()
            if self._missing_until.get((upstream, name), 0.0) > now:
                continue
            try:
                resolved = await self._from_upstream(upstream, name, headers)
            except _UpstreamFailed as failed:
                return self._later_or_refuse(name, position, failed)
            if resolved is not None:
                return resolved
        self._saw(name, None)
        asked = ", ".join(self.upstreams)
        raise Refusal(
            answer_status(404),
            f"project {name!r} not found: no upstream index has it (asked"
            f" {asked}; a missing project is asked again after"
            f" {NEGATIVE_TTL:g}s)",
        )

    def _saw(self, name: str, served: tuple[str, str] | None) -> None:
        """
        Record the page of ``name`` last served (None: none); a change
        tells the engine (:attr:`Engine.held_changes`), since file answers
        follow that page (:meth:`known_page`) even when it is not stored.
        """
        if self._served.get(name) == served:
            return
        if served is None:
            del self._served[name]
        else:
            self._served[name] = served
        self.engine.held_changes += 1

    def has_fresh(self, name: str) -> bool:
        """
        Whether a request for the page of the normalised ``name`` would be
        answered without asking any upstream: the first upstream not known
        to lack the project has it stored and fresh (or every upstream is
        known to lack it).
        """
        now = self.clock.seconds()
        for upstream in self.upstreams:
            if self._missing_until.get((upstream, name), 0.0) > now:
                continue
            return self.engine.would_hit(self._target(upstream, name, {}), self._policy)
        return True

    def _target(self, upstream: str, name: str, headers: Mapping[str, str]) -> Target:
        return Target(
            url=page_url(upstream, name),
            front_end="index",
            # What the cache heeds of the client: a refresh, past the
            # floor (PagePolicy.judged).
            headers=self._policy.judged(headers),
            upstream_headers={"accept": UPSTREAM_ACCEPT, "user-agent": USER_AGENT},
            key=page_key(upstream, name),
            # An index may redirect to its own spelling of the page (same
            # depth, so relative file links still resolve from our URL).
            follow_redirects=True,
            operator_credentials=True,
            variants=False,
        )

    async def _from_upstream(
        self, upstream: str, name: str, headers: Mapping[str, str]
    ) -> ResolvedPage | None:
        """
        ``upstream``'s page of ``name``, or None when it does not have the
        project.  Raises :class:`_UpstreamFailed`.
        """
        key = page_key(upstream, name)
        url = page_url(upstream, name)
        try:
            resolved = await self.engine.resolve(
                self._target(upstream, name, headers), self._policy
            )
        except ANSWERED_ERRORS as e:
            raise _UpstreamFailed(url, str(e), status_for(e)) from e
        if resolved.stored is not None:
            # A hit, revalidated, or stale (the engine could not revalidate
            # it, or the upstream failed moments ago).
            return self._stored_page(upstream, name, resolved)
        answer = resolved.answer
        assert answer is not None and answer.body is not None
        body = answer.body
        if answer.status in GONE_STATUSES:
            body.close()
            if forget(self.engine, key):
                self.log.info(
                    "Upstream {upstream} no longer has {name}; dropping its page",
                    upstream=upstream, name=name,
                )
            self._remember_missing(upstream, name)
            return None
        if answer.status != 200:
            body.close()
            raise _UpstreamFailed(
                url, f"{url} answered {answer.status}", answer_status(answer.status)
            )
        download = body.download
        try:
            data = await read_whole(body)
        except UpstreamError as e:
            raise _UpstreamFailed(url, f"{url}: {e}", status_for(e)) from e
        digest = download.sha256 or hashlib.sha256(data).hexdigest()
        return self._fresh_page(
            upstream, name, data, answer.headers.get("content-type"), digest
        )

    def _remember_missing(self, upstream: str, name: str) -> None:
        now = self.clock.seconds()
        if len(self._missing_until) > _MISSING_KEPT:
            self._missing_until = {
                k: until for k, until in self._missing_until.items() if until > now
            }
        self._missing_until[(upstream, name)] = now + NEGATIVE_TTL

    def _parse(self, upstream: str, name: str, data: bytes, content_type: str | None) -> ProjectPage:
        url = page_url(upstream, name)
        try:
            return parse_page(data, content_type, url)
        except SimplePageError as e:
            self.log.error(
                "Upstream page {url} is not a simple-index page: {error}",
                url=url, error=str(e),
            )
            raise Refusal(
                502, f"the upstream page {url} is not a simple-index page: {e}"
            ) from e

    def _fresh_page(
        self, upstream: str, name: str, data: bytes, content_type: str | None,
        digest: str,
    ) -> ResolvedPage:
        """
        The page just fetched whole (``data``, whose sha256 is ``digest``):
        parsed, or as the page check parsed it.
        """
        slot = (page_key(upstream, name), digest)
        page = self._models.get(slot)
        if page is None:
            page = self._parse(upstream, name, data, content_type)
            self._models.put(slot, page, len(data))
        self._drop_disowned_files(name, page)
        self._saw(name, (upstream, digest))
        return ResolvedPage(upstream, name, page, digest, CacheStatus.MISS)

    def _drop_disowned_files(self, name: str, page: ProjectPage) -> None:
        """
        Remove the stored files the newly fetched ``page`` gives another
        sha256 for: once per page fetched, not on every file request.
        """
        for key, why in drop_disowned_files(self.engine, page_digests(page)):
            self.log.info(
                "Removed {key}: the page of {name} now gives another"
                " digest ({why}); the next request fetches it",
                key=key, name=name, why=why,
            )

    def _stored_page(
        self, upstream: str, name: str, resolved: Resolved | None,
    ) -> ResolvedPage:
        """
        The stored page of ``name`` from ``upstream`` (``resolved``: opened
        by the engine or by :func:`open_entry`), parsed or from memory.
        """
        key = page_key(upstream, name)
        if resolved is None or resolved.stored is None:
            raise Refusal(502, f"the stored page of {name!r} disappeared; try again")
        stored = resolved.stored
        try:
            entry = stored.entry
            page = self._models.get((key, entry.sha256)) if entry.sha256 else None
            if page is not None and entry.sha256 is not None:
                digest = entry.sha256
            else:
                # Not parsed since start-up (or pushed out of memory).
                data = read_stored(stored)
                digest = hashlib.sha256(data).hexdigest()
                page = self._parse(upstream, name, data, entry.headers.get("content-type"))
                self._models.put((key, digest), page, len(data))
        finally:
            stored.close()
        self._saw(name, (upstream, digest))
        return ResolvedPage(upstream, name, page, digest, resolved.cache)

    def _later_or_refuse(
        self, name: str, position: int, failed: _UpstreamFailed
    ) -> ResolvedPage:
        """
        When the upstream at ``position`` fails and has no stored page of
        ``name`` to serve stale (the engine serves its own), serve the
        first stored page of a later upstream stale, or refuse.
        """
        for upstream in self.upstreams[position + 1:]:
            stale = self.engine.stale(
                self._target(upstream, name, {}), self._policy,
                f"{failed.url} failed: {failed.message}",
            )
            if stale is not None:
                return self._stored_page(upstream, name, stale)
        raise Refusal(
            failed.status,
            f"upstream {failed.url} failed ({failed.message}) and no copy of"
            f" {name!r} is cached",
        )

    def known_page(self, name: str) -> ProjectPage | None:
        """
        The page of ``name`` a client could have seen: the one last served,
        else the stored page of the first upstream that has one.
        """
        served = self._served.get(name)
        candidates = list(self.upstreams)
        if served is not None:
            upstream, digest = served
            page = self._models.get((page_key(upstream, name), digest))
            if page is not None:
                return page
            candidates.insert(0, upstream)
        for upstream in candidates:
            stored = open_entry(self.engine, page_key(upstream, name), CacheStatus.HIT)
            if stored is not None:
                try:
                    return self._stored_page(upstream, name, stored).page
                except Refusal:
                    continue
        return None
