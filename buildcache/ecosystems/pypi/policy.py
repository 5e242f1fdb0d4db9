"""
The index's rules as cache-engine policies: what its pages, root and files
share (:class:`IndexPolicy`), a project page's (:class:`PagePolicy`, with
the :class:`PageCheck` every page body passes before it is stored), and
the headers the index sends upstream.  A file's policy
(:class:`FilePolicy`) is built per request from the page that lists it
(:func:`file_request`); the root's lives with its server (:mod:`.root`).

It also holds the index's one status rule for an upstream that answered
other than 200 (:func:`answer_status`), and the few store operations its
front end needs (reading a page body whole, dropping a page or the files a
page disowns): the front end (:mod:`.index`, :mod:`.pages`, :mod:`.files`,
:mod:`.root`) imports neither the store nor the fetcher.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from typing import ClassVar

from attrs import Factory, define, frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from buildcache import __version__
from buildcache.ecosystems.pypi.lru import LRU
from buildcache.ecosystems.pypi.model import ProjectPage
from buildcache.ecosystems.pypi.parse import parse_page
from buildcache.engine.core import Engine, Resolved
from buildcache.engine.errors import UpstreamError
from buildcache.engine.exchanges import CacheStatus
from buildcache.engine.freshness import (
    GONE_STATUSES,
    Kind,
    client_asks_refresh,
    client_cache_control,
)
from buildcache.engine.keys import twin_matches_digest
from buildcache.engine.policy import Expectation, GenericPolicy, Target
from buildcache.fetch.fetcher import STREAM_CHECKED_ABOVE, DownloadBody
from buildcache.store import Entry, StoredObject

_log = Logger()

__all__ = [
    "USER_AGENT",
    "IndexPolicy",
    "PagePolicy",
    "PageCheck",
    "FilePolicy",
    "FileRequest",
    "file_request",
    "answer_status",
    "disowned_files",
    "drop_disowned_files",
    "read_whole",
    "read_stored",
    "forget",
    "open_entry",
    "CLIENT_REVALIDATION_FLOOR",
]

#: A client's refresh (``no-cache``) revalidates a page upstream only when
#: the page was validated longer ago than this: a burst of parallel builds
#: never fetches a page twice (see :meth:`PagePolicy.judged`).
CLIENT_REVALIDATION_FLOOR = 30.0

#: What clients are told of a file: it never changes.
_FILE_CACHE_CONTROL = client_cache_control(Kind.IMMUTABLE, 0)

#: Sent upstream with every page, file and root request of the index.
USER_AGENT = f"buildcache/{__version__}"

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

    def judged(self, client_headers: Mapping[str, str]) -> Mapping[str, str]:
        """
        The request headers the engine judges a page's freshness by, for a
        client that sent ``client_headers``.  pip sends ``Cache-Control:
        max-age=0`` on every page request, whatever the user wants, so a
        client's ``max-age`` is dropped: obeying it would cost every warm
        install one upstream round trip per project, on the slow line this
        cache exists to spare (devpi-server and proxpi ignore it too).  A
        client that asks for fresh data on purpose (``no-cache`` or
        ``Pragma: no-cache``, as ``uv --refresh`` and ``curl -H`` send) is
        judged as asking ``max-age=`` :data:`CLIENT_REVALIDATION_FLOOR`: a
        page validated longer ago than the floor is revalidated, a younger
        one is not.
        """
        if client_asks_refresh(client_headers):
            return {"cache-control": f"max-age={CLIENT_REVALIDATION_FLOOR:g}"}
        return {}

    def stale_on(self, status: int) -> bool:
        # Any error but "not found" serves the stored page (a 403 or 429
        # from a proxy or rate limit in the way); a 404 or 410 says the
        # project is gone, and the resolver drops its page.
        return status >= 400 and status not in GONE_STATUSES

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


@frozen
class FilePolicy(IndexPolicy):
    """
    How the engine treats one distribution or metadata file the index
    serves: immutable, checked against the digest its page gives
    (``expected``), a hit only when the stored copy has that digest, and
    taken over from its ``http://`` twin when the digest vouches for it.
    """

    KIND = Kind.IMMUTABLE

    expected: Expectation = Expectation()

    def cache_control(
        self, kind: Kind, ttl: float, response_headers: Mapping[str, str] | None,
        status: int,
    ) -> str | None:
        return _FILE_CACHE_CONTROL

    async def before_lookup(self, target: Target, engine: Engine) -> None:
        # Stored by another route without this check (the proxy port), and
        # different from what the page promises: it answers nobody here,
        # and the checked download replaces it.
        wanted = self.expected.sha256
        entry = engine.find(target)
        if wanted is not None and entry is not None and entry.sha256 != wanted:
            engine.store.remove_entry(entry)

    async def expect(self, target: Target, engine: Engine) -> Expectation:
        return self.expected

    def answers(self, target: Target, entry: Entry) -> bool:
        # Only the bytes the page vouches for are a hit (a wheel replaced
        # upstream, or stored by the proxy port unchecked, is not), also
        # on a worker's read-only hit path, which runs no before_lookup.
        wanted = self.expected.sha256
        return wanted is None or (entry.sha256 or "").lower() == wanted

    async def vouches_for(
        self, target: Target, engine: Engine, twin: Entry, expected: Expectation
    ) -> bool:
        # Stored over plain http (by a version whose keys had no scheme,
        # or by the proxy), and the page fetched from this https upstream
        # vouches for its bytes.
        return twin_matches_digest(twin.sha256, expected.sha256)


@frozen
class FileRequest:
    """
    A distribution or metadata file as the engine is asked for it: the
    target (its upstream URL, keyed as the proxy keys it) and the policy
    that checks it against its page.
    """

    target: Target
    policy: FilePolicy

    @property
    def key(self) -> str:
        return self.target.key

    @property
    def expected_sha256(self) -> str | None:
        return self.policy.expected.sha256


def file_request(
    url: str, expected_sha256: str | None, user_agent: str, size: int | None,
) -> FileRequest:
    """
    The request of a distribution or metadata file, checked against the
    digest its page gives.  One that may be large (``size``, as the page
    gives it, is None or above
    :data:`buildcache.fetch.fetcher.STREAM_CHECKED_ABOVE`) streams before
    its check ends; a small one is answered once checked, so that a
    mismatch is a clean 502.
    """
    return FileRequest(
        Target(
            url=url,
            front_end="index",
            upstream_headers={"user-agent": user_agent},
            follow_redirects=True,
            operator_credentials=True,
        ),
        FilePolicy(expected=Expectation(
            sha256=expected_sha256,
            stream_before_check=size is None or size > STREAM_CHECKED_ABOVE,
        )),
    )


def answer_status(upstream_status: int) -> int:
    """
    The status the index answers with when its upstream answered
    ``upstream_status`` instead of 200 and no stored copy answers in its
    place: the one rule for pages, files and the root.  The upstream's
    "not found" (404, 410) is a 404 for the client, which then looks
    elsewhere; any other status is the upstream's failure, a 502.  (A
    failure to get any answer is mapped by the engine's table,
    :data:`buildcache.engine.errors.ERROR_STATUS`: 504 for a timeout, 502
    otherwise.)
    """
    return 404 if upstream_status in GONE_STATUSES else 502


def disowned_files(
    digests: Mapping[str, str], stored: Mapping[str, Entry]
) -> list[tuple[Entry, str]]:
    """
    The stored entries whose sha256 differs from the one a page now gives
    for their key (``digests``, from
    :func:`~buildcache.ecosystems.pypi.pages.page_digests`), and why.
    """
    return [
        (entry, f"sha256 {entry.sha256} stored, the page gives {digests[key]}")
        for key, entry in stored.items()
        if key in digests and entry.sha256 is not None
        and entry.sha256.lower() != digests[key]
    ]


def drop_disowned_files(
    engine: Engine, digests: Mapping[str, str]
) -> list[tuple[str, str]]:
    """
    Remove the stored files whose sha256 differs from the one a page now
    gives (``digests``: store key to sha256); the keys removed, and why.
    """
    removed = []
    for entry, why in disowned_files(digests, engine.store.peek_many(digests)):
        if engine.store.remove_entry(entry):
            removed.append((entry.key, why))
    return removed


async def read_whole(body: DownloadBody) -> bytes:
    """
    Wait for a download to end, then return its body (a page: small enough
    to parse, and parsing needs all of it).  Raises :class:`UpstreamError`
    when the download failed.
    """
    try:
        # Keep every byte for this reader should the disk refuse the spool.
        body.advance(0)
        while not body.finished():
            more: Deferred[None] = Deferred()
            body.when_more(lambda: more.callback(None))
            await more
        failure = body.failure()
        if failure is not None:
            raise UpstreamError(failure.getErrorMessage())
        size = body.available()
        chunks = []
        offset = 0
        while offset < size:
            # From the spool file, or from memory when the disk refused it.
            chunk = body.read(offset, min(1024 * 1024, size - offset))
            if not chunk:
                raise UpstreamError("the page body ended early")
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)
    finally:
        body.close()


def read_stored(stored: StoredObject) -> bytes:
    """The whole body of a stored page (opened; the caller closes it)."""
    size = stored.entry.size
    chunks = []
    offset = 0
    while offset < size:
        chunk = os.pread(stored.fd, min(1024 * 1024, size - offset), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def forget(engine: Engine, key: str) -> bool:
    """Remove the entry under the index's own ``key``; whether one was."""
    return engine.store.remove(key)


def open_entry(engine: Engine, key: str, cache: CacheStatus) -> Resolved | None:
    """
    The entry under the index's own ``key`` (a page), opened, as an
    answer of ``cache`` status; None when nothing is stored.
    """
    stored = engine.store.lookup(key)
    if stored is None:
        return None
    return Resolved(cache, Kind.INDEX, stored=stored)
