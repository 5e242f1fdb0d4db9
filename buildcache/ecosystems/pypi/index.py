"""
The pip / uv simple index on ``--pypi-port``: a PEP 503/691 mirror served
from the shared store.

This module owns the URL space of the index port::

    /                                   a plain-text pointer to /simple/
    /simple/                            the upstream root, streamed through
    /simple/<project>/                  project pages (JSON or HTML)
    /files/<project>/<filename>         distribution files
    /files/<project>/<filename>.metadata  their PEP 658 core metadata

and the policy behind it:

- **Which upstream serves a project**: the first, in priority order, that
  does not answer 404 serves all of it; files are never merged across
  upstreams, so a later index cannot slip a file into a project that an
  earlier one owns (dependency confusion).  An upstream 404 is remembered
  for :data:`NEGATIVE_TTL` seconds.  An upstream that fails (unreachable,
  5xx) is never skipped in favour of the next one: its stored page, or a
  later upstream's stored page, is served stale, else the client gets a
  502/504.
- **Pages**: the upstream page body is stored under
  ``simple-page|<upstream>|<name>`` (fetched as JSON where the upstream
  offers it), parsed once into a :class:`~buildcache.ecosystems.pypi.model.ProjectPage`
  kept in a small in-memory LRU keyed by the stored body's sha256, and
  rendered from that model in the representation the client negotiated, with
  file links rewritten to ``../../files/<project>/<filename>`` on this port.
  A page is revalidated upstream (conditionally) when it is ``index_ttl``
  old.  pip sends ``Cache-Control: max-age=0`` on every page request,
  whatever the user wants, so a request's ``max-age`` is not heeded: obeying
  it would cost every warm install one upstream round trip per project, on
  the slow line this cache exists to spare (devpi-server and proxpi ignore
  it too).  A client that asks for fresh data on purpose (``Cache-Control:
  no-cache`` or ``Pragma: no-cache``, as ``uv --refresh`` and ``curl -H``
  send) gets a revalidation, but only of a page validated more than
  :data:`CLIENT_REVALIDATION_FLOOR` seconds ago, so a burst of parallel
  builds never fetches a page twice.  After an
  upstream failure, stored pages from that upstream are served stale without
  asking it again for :data:`UPSTREAM_FAILURE_BACKOFF` seconds, so an
  install on a box that lost its network does not wait for a timeout per
  page.
- **Files** are immutable: a stored file whose digest matches the page is a
  hit and is never revalidated; a missing one is fetched through the
  fetcher (single flight) with the page's sha256, so a mismatching body is
  never stored nor served (502).  Their store keys are the proxy's keys for
  the upstream URL (scheme included), so both ports share one copy, and
  follow the same ``Vary`` rule (see :func:`buildcache.fetch.fetcher.find_stored`).
  A file of an ``https://`` upstream that is stored only under its
  ``http://`` key (a cache upgraded from before keys named their scheme)
  is taken over when its sha256 is the one the page gives (see
  :func:`buildcache.fetch.fetcher.adopt_verified_twin`).
- **Credentials**: the index never forwards a client's ``Authorization``
  or cookies upstream (pages and files are fetched with buildcache's own
  headers), so nothing it stores is private to a client.  Pages are always
  fetched with the same headers, so an upstream's ``Vary`` cannot split
  them; the page keys are the index's own.
- **Rebuilt files**: when a page is fetched anew, the stored files it now
  gives another sha256 for (a file replaced upstream under the same name)
  are removed from the store, so neither port serves the old bytes again
  (see :func:`disowned_files`).
- **The root** ``/simple/`` (hundreds of thousands of names upstream) is
  streamed from the first upstream and stored per media type for
  :data:`ROOT_TTL`; nothing here reads it, and no decision depends on it.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar
from urllib.parse import quote, unquote, urlsplit

from attrs import Factory, define, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache import __version__
from buildcache.access import AccessPolicy
from buildcache.ecosystems.pypi.model import (
    MEDIA_TYPES,
    UPSTREAM_ACCEPT,
    ProjectFile,
    ProjectPage,
    SimplePageError,
    is_valid_project_name,
    normalize_project_name,
)
from buildcache.ecosystems.pypi.parse import (
    parse_page,
)
from buildcache.ecosystems.pypi.prefetch import Prefetcher, file_request
from buildcache.ecosystems.pypi.render import (
    choose_media_type,
    render_page,
)
from buildcache.engine.events import CacheObserver, StatusPages
from buildcache.engine.freshness import (
    Kind,
    client_asks_refresh,
    client_cache_control,
    not_modified,
    validators_of,
)
from buildcache.engine.keys import adopt_verified_twin, cache_key, open_stored
from buildcache.engine.respond import (
    STALE_CACHE_CONTROL,
    CacheStatus,
    client_gone,
    request_headers,
    send_error,
    send_text,
    serve_answer,
    serve_head,
    serve_stored,
)
from buildcache.fetch.fetcher import (
    STREAM_CHECKED_ABOVE,
    DownloadBody,
    Fetcher,
    UpstreamError,
    UpstreamRequest,
    UpstreamTimeout,
)
from buildcache.store import Counters, Entry, IntegrityError, Store, StoredObject

__all__ = [
    "IndexResource",
    "disowned_files",
    "page_digests",
    "page_key",
    "root_key",
    "file_link",
    "NEGATIVE_TTL",
    "ROOT_TTL",
    "CLIENT_REVALIDATION_FLOOR",
    "UPSTREAM_FAILURE_BACKOFF",
]

#: Seconds an upstream's 404 for a project is believed without asking again.
NEGATIVE_TTL = 60.0

#: Seconds the stored upstream root stays fresh: it is huge, lags upstream
#: anyway, and nothing here depends on it.
ROOT_TTL = 24 * 3600.0

#: A client's ``no-cache`` revalidates a page upstream only when the page
#: was validated longer ago than this (see the module docstring).
CLIENT_REVALIDATION_FLOOR = 30.0

#: Seconds during which an upstream that just failed is not asked to
#: revalidate pages it has stored here; they are served stale instead.
UPSTREAM_FAILURE_BACKOFF = 30.0

#: Parsed page models kept in memory: at most this many, and at most this
#: many bytes of upstream page bodies behind them (a model takes a few
#: times its body's size).
MODEL_CACHE_ENTRIES = 512
MODEL_CACHE_BYTES = 16 * 1024 * 1024

#: Rendered page bodies kept in memory.
RENDER_CACHE_ENTRIES = 1024
RENDER_CACHE_BYTES = 16 * 1024 * 1024

#: Bumped whenever rendering changes, so clients' ETags stop matching.
_RENDERING = "1"

_FILE_CACHE_CONTROL = client_cache_control(Kind.IMMUTABLE, 0)
_USER_AGENT = f"buildcache/{__version__}"
# Characters a path segment may hold literally (RFC 3986 pchar): a file
# name like "x-1.0+local-py3-none-any.whl" stays readable in links.
_SEGMENT_SAFE = "!$&'()*+,;=:@~"
_METADATA_SUFFIX = ".metadata"
_NO_COUNTERS = Counters()

_K = TypeVar("_K")
_V = TypeVar("_V")


def page_key(upstream: str, name: str) -> str:
    """
    The store key of ``upstream``'s page for the normalised ``name``.
    """
    return f"simple-page|{upstream}|{name}"


def root_key(upstream: str, media_type: str) -> str:
    """
    The store key of ``upstream``'s root page in ``media_type``.
    """
    return f"simple-root|{upstream}|{media_type}"


def file_link(name: str, filename: str) -> str:
    """
    The link to a file as written on the page of project ``name``: relative,
    so it works whatever host name or address the client used, and
    resolving from ``/simple/<name>/`` to ``/files/<name>/<filename>``.
    """
    return f"../../files/{name}/{quote(filename, safe=_SEGMENT_SAFE)}"


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
        if metadata and _metadata_servable(file):
            digests.setdefault(cache_key(file.metadata_url), metadata.lower())
    return digests


def disowned_files(
    digests: Mapping[str, str], stored: Mapping[str, Entry]
) -> list[tuple[Entry, str]]:
    """
    The stored entries whose sha256 differs from the one a page now gives
    for their key (``digests``, from :func:`page_digests`), and why.
    """
    return [
        (entry, f"sha256 {entry.sha256} stored, the page gives {digests[key]}")
        for key, entry in stored.items()
        if key in digests and entry.sha256 is not None
        and entry.sha256.lower() != digests[key]
    ]


def _metadata_servable(file: ProjectFile) -> bool:
    # Metadata is fetched from "<url>.metadata" (PEP 658), which a URL with
    # a query string does not have.
    return not urlsplit(file.url).query


class _LRU(Generic[_K, _V]):
    """
    A least-recently-used map bounded by entry count and by the byte sizes
    its users declare for the values.
    """

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: OrderedDict[_K, tuple[_V, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: _K) -> _V | None:
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: _K, value: _V, size: int) -> None:
        if size > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._items[key] = (value, size)
        self._bytes += size
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            _, (_, dropped) = self._items.popitem(last=False)
            self._bytes -= dropped


class _Refusal(Exception):
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

    def __init__(
        self, url: str, message: str, timed_out: bool = False,
        remembered: bool = False,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.message = message
        self.timed_out = timed_out
        #: True when the upstream was not asked, having failed moments ago.
        self.remembered = remembered


@frozen
class _Fetched:
    """
    A 200 page from upstream: the whole body, read back from the download.
    """

    data: bytes
    content_type: str | None
    #: sha256 of ``data``.
    digest: str


@define
class _PageCheck:
    """
    Checks that an upstream page is a simple-index page before it is
    stored (so a captive portal's 200 never replaces a good page), and
    keeps the parsed model for the request that asked for it.
    """

    url: str
    content_type: str | None
    key: str
    models: _LRU[tuple[str, str], ProjectPage]
    _data: bytearray = Factory(bytearray)

    def update(self, data: bytes) -> None:
        self._data += data

    def finish(self) -> None:
        data = bytes(self._data)
        page = parse_page(data, self.content_type, self.url)
        self.models.put((self.key, hashlib.sha256(data).hexdigest()), page, len(data))


_NOT_MODIFIED = "not-modified"
_MISSING = "missing"


@frozen
class _Resolved:
    """
    The page model that answers a request, and where it came from.
    """

    upstream: str
    name: str
    page: ProjectPage
    sha256: str
    status: CacheStatus

    @property
    def key(self) -> str:
        return page_key(self.upstream, self.name)


async def _read_whole(body: DownloadBody) -> bytes:
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


def _project_of(path: str) -> str | None:
    """
    The normalised project a request path is about, for the
    most-requested table: ``/simple/<name>/`` and ``/files/<name>/...``.
    """
    segments = path.split("/")
    if len(segments) >= 3 and segments[1] in ("simple", "files") and segments[2]:
        return normalize_project_name(unquote(segments[2]))
    return None


class IndexResource(Resource):
    """
    The simple index; see the module docstring.

    ``upstreams`` are simple-index base URLs (``http://host/simple``), in
    priority order.  The proxy port hands it absolute-URI requests addressed
    to the index port through :meth:`serve`.  With a ``policy``, clients
    outside its ``allow_from`` get 403 on this resource's own port.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        store: Store,
        fetcher: Fetcher,
        upstreams: Sequence[str],
        index_ttl: float,
        clock: IReactorTime,
        policy: AccessPolicy | None = None,
        activity: CacheObserver | None = None,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        super().__init__()
        self.prefetcher = prefetcher
        self.policy = policy
        self.activity = activity
        self.status: StatusPages | None = None
        self.store = store
        self.fetcher = fetcher
        self.upstreams = tuple(u.rstrip("/") for u in upstreams)
        self.index_ttl = index_ttl
        self.clock = clock
        self._missing_until: dict[tuple[str, str], float] = {}
        self._failing_until: dict[str, float] = {}
        # The upstream and body digest of the page last served per project:
        # file requests follow the page the client saw.
        self._served: dict[str, tuple[str, str]] = {}
        self._models: _LRU[tuple[str, str], ProjectPage] = _LRU(
            MODEL_CACHE_ENTRIES, MODEL_CACHE_BYTES
        )
        self._rendered: _LRU[tuple[str, str, str], tuple[bytes, str]] = _LRU(
            RENDER_CACHE_ENTRIES, RENDER_CACHE_BYTES
        )

    # -- entry points ------------------------------------------------------

    def render(self, request: Request) -> object:
        if self.policy is not None:
            client_ip = getattr(request.getClientAddress(), "host", "")
            verdict = self.policy.client_allowed(client_ip)
            if not verdict:
                self.log.warn(
                    "Refused client {client}: {reason}",
                    client=client_ip, reason=verdict.reason,
                )
                if self.activity is not None:
                    # An access line and an error count, as the proxy port
                    # gives its refusals.
                    self.activity.track(request, "index")
                send_error(
                    request, 403,
                    f"client {client_ip} is not allowed to use this index",
                )
                return NOT_DONE_YET
        raw = request.path.decode("latin-1")
        if "://" in raw:
            # An absolute-form request target (RFC 9112 3.2.2).
            raw = urlsplit(raw).path or "/"
        self.serve(request, raw)
        return NOT_DONE_YET

    def serve(self, request: Request, path: str) -> None:
        """
        Answer ``request`` for ``path`` (the percent-encoded path of the
        request target, without query), finishing it asynchronously: a
        ``render`` calling this returns ``NOT_DONE_YET``.
        """
        if self.status is not None and path in self.status.paths:
            self.status.serve(request, path)
            return
        if self.activity is not None:
            self.activity.track(request, "index", _project_of(path))
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("allow", "GET, HEAD")
            send_error(
                request, 405,
                f"{request.method.decode('latin-1')} is not served: this"
                " index answers GET and HEAD",
            )
            return
        d = Deferred.fromCoroutine(self._route(request, path))
        d.addErrback(self._crashed, request)

    def _crashed(self, failure: Failure, request: Request) -> None:
        self.log.failure("Index failed on {uri}", failure, uri=request.uri)
        if client_gone(request):
            return
        if not request.startedWriting:
            send_error(request, 500, "internal error")
        else:
            request.loseConnection()

    async def _route(self, request: Request, path: str) -> None:
        segments = path.split("/")
        if path == "/" or path == "":
            self._front_page(request)
            return
        if len(segments) >= 2 and segments[0] == "" and segments[1] == "simple":
            if len(segments) == 2:
                self._redirect(request, "/simple/")
                return
            if len(segments) == 3:
                if segments[2] == "":
                    await self._root(request)
                    return
                await self._project_path(request, unquote(segments[2]), slash=False)
                return
            if len(segments) == 4 and segments[3] == "":
                await self._project_path(request, unquote(segments[2]), slash=True)
                return
        if len(segments) == 4 and segments[0] == "" and segments[1] == "files":
            project = unquote(segments[2])
            filename = unquote(segments[3])
            if project and filename:
                await self._file(request, project, filename)
                return
        send_error(
            request, 404,
            f"no such page on this index: {path}; project pages are at"
            " /simple/<project>/",
        )

    # -- small pages -------------------------------------------------------

    def _front_page(self, request: Request) -> None:
        host = (request.getHeader(b"host") or b"").decode("latin-1", "replace")
        base = f"http://{host}" if host else ""
        body = (
            "buildcache: a caching PyPI simple index (PEP 503/691).\n\n"
            f"Use it with:  pip install --index-url {base}/simple/ NAME\n"
            f"         or:  uv pip install --index-url {base}/simple/ NAME\n"
        ).encode("utf-8", "replace")
        send_text(request, 200, body, "no-cache")

    def _redirect(self, request: Request, location: str) -> None:
        request.setResponseCode(301)
        request.setHeader("location", location)
        request.setHeader("content-type", "text/plain; charset=utf-8")
        body = f"moved to {location}\n".encode("utf-8")
        request.setHeader("content-length", str(len(body)))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _not_acceptable(self, request: Request) -> None:
        request.setHeader("vary", "Accept")
        send_error(
            request, 406,
            "no acceptable representation; this index serves "
            + ", ".join(MEDIA_TYPES),
        )

    # -- project pages -----------------------------------------------------

    async def _project_path(self, request: Request, raw: str, slash: bool) -> None:
        # is_valid_project_name alone lets a trailing newline through, and
        # the four non-ASCII letters that match [A-Z] case-insensitively.
        if not (raw.isascii() and raw.isprintable() and is_valid_project_name(raw)):
            send_error(
                request, 404,
                f"{raw!r} is not a valid project name: a name has ASCII"
                " letters, digits, '.', '-' and '_', and starts and ends with"
                " a letter or digit (PEP 508)",
            )
            return
        name = normalize_project_name(raw)
        if not slash or raw != name:
            # PEP 503: the normalised, slash-terminated URL is the page.
            self._redirect(request, f"/simple/{quote(name)}/")
            return
        headers = request_headers(request)
        media_type = choose_media_type(headers.get("accept"))
        if media_type is None:
            self._not_acceptable(request)
            return
        try:
            resolved = await self._resolve(name, headers)
        except _Refusal as refusal:
            send_error(request, refusal.code, refusal.message)
            return
        body, etag = self._render(resolved, media_type)
        counters = self.store.counters
        if resolved.status is CacheStatus.MISS:
            counters.misses += 1
        elif resolved.status is CacheStatus.REVALIDATED:
            counters.revalidations += 1
        else:
            counters.hits += 1
        if client_gone(request):
            return
        request.setHeader("content-type", media_type)
        request.setHeader("vary", "Accept")
        request.setHeader("etag", etag)
        request.setHeader(
            "cache-control",
            STALE_CACHE_CONTROL if resolved.status is CacheStatus.STALE
            else client_cache_control(Kind.INDEX, self.index_ttl),
        )
        request.setHeader("x-cache", resolved.status.value)
        if not_modified(headers, {"etag": etag}):
            request.setResponseCode(304)
            request.finish()
            return
        request.setResponseCode(200)
        request.setHeader("content-length", str(len(body)))
        if request.method != b"HEAD":
            request.write(body)
            if resolved.status is not CacheStatus.MISS:
                counters.bytes_from_cache += len(body)
        request.finish()

    def _render(self, resolved: _Resolved, media_type: str) -> tuple[bytes, str]:
        """
        The page in ``media_type`` and its ETag, from memory when rendered
        before.
        """
        cache_slot = (resolved.key, resolved.sha256, media_type)
        cached = self._rendered.get(cache_slot)
        if cached is not None:
            return cached
        name = resolved.name
        body = render_page(
            resolved.page, media_type,
            lambda file: file_link(name, file.filename),
            metadata_available=_metadata_servable,
        )
        tag = hashlib.sha256(
            f"{_RENDERING}|{resolved.key}|{resolved.sha256}|{media_type}".encode("utf-8")
        ).hexdigest()[:40]
        result = (body, f'"{tag}"')
        self._rendered.put(cache_slot, result, len(body))
        return result

    async def _resolve(self, name: str, headers: Mapping[str, str]) -> _Resolved:
        """
        The page of ``name`` from the first upstream that has the project,
        fetched or revalidated as needed.
        """
        if not self.upstreams:
            raise _Refusal(502, "this index has no upstream configured")
        for position, upstream in enumerate(self.upstreams):
            now = self.clock.seconds()
            if self._missing_until.get((upstream, name), 0.0) > now:
                continue
            try:
                resolved = await self._from_upstream(upstream, name, headers)
            except _UpstreamFailed as failed:
                if not failed.remembered:
                    self._failing_until[upstream] = (
                        self.clock.seconds() + UPSTREAM_FAILURE_BACKOFF
                    )
                return self._stale_or_refuse(name, position, failed)
            if resolved is not None:
                return resolved
        self._served.pop(name, None)
        asked = ", ".join(self.upstreams)
        raise _Refusal(
            404,
            f"project {name!r} not found: no upstream index has it (asked"
            f" {asked}; a missing project is asked again after"
            f" {NEGATIVE_TTL:g}s)",
        )

    def _needs_revalidation(
        self, entry: Entry, headers: Mapping[str, str], now: float
    ) -> bool:
        age = max(0.0, now - entry.validated_at)
        if age >= self.index_ttl:
            return True
        return age >= CLIENT_REVALIDATION_FLOOR and client_asks_refresh(headers)

    async def _from_upstream(
        self, upstream: str, name: str, headers: Mapping[str, str]
    ) -> _Resolved | None:
        """
        ``upstream``'s page of ``name``, or None when it does not have the
        project.  Raises :class:`_UpstreamFailed`.
        """
        key = page_key(upstream, name)
        entry = self.store.peek(key)
        now = self.clock.seconds()
        if entry is not None:
            if not self._needs_revalidation(entry, headers, now):
                return self._stored_page(upstream, name, CacheStatus.HIT)
            if self._failing_until.get(upstream, 0.0) > now:
                raise _UpstreamFailed(
                    self._page_url(upstream, name),
                    "the upstream failed moments ago",
                    remembered=True,
                )
        conditional = validators_of(entry.headers) if entry is not None else {}
        outcome = await self._fetch_page(upstream, name, conditional)
        if outcome == _NOT_MODIFIED:
            self._failing_until.pop(upstream, None)
            if self.store.peek(key) is None:
                # Evicted while revalidating: fetch it whole.
                outcome = await self._fetch_page(upstream, name, {})
            else:
                return self._stored_page(upstream, name, CacheStatus.REVALIDATED)
        self._failing_until.pop(upstream, None)
        if outcome == _MISSING:
            if entry is not None:
                self.log.info(
                    "Upstream {upstream} no longer has {name}; dropping its page",
                    upstream=upstream, name=name,
                )
                self.store.remove(key)
            self._remember_missing(upstream, name)
            return None
        if not isinstance(outcome, _Fetched):
            raise _UpstreamFailed(
                self._page_url(upstream, name),
                "the upstream answered 304 to an unconditional request",
            )
        return self._fresh_page(upstream, name, outcome)

    def _remember_missing(self, upstream: str, name: str) -> None:
        now = self.clock.seconds()
        if len(self._missing_until) > 4096:
            self._missing_until = {
                k: until for k, until in self._missing_until.items() if until > now
            }
        self._missing_until[(upstream, name)] = now + NEGATIVE_TTL

    def _page_url(self, upstream: str, name: str) -> str:
        return f"{upstream}/{quote(name)}/"

    async def _fetch_page(
        self, upstream: str, name: str, conditional: Mapping[str, str]
    ) -> _Fetched | str:
        """
        Ask ``upstream`` for the page: the body, :data:`_NOT_MODIFIED` or
        :data:`_MISSING`.  Raises :class:`_UpstreamFailed`.
        """
        url = self._page_url(upstream, name)
        key = page_key(upstream, name)
        upstream_request = UpstreamRequest(
            key=key,
            url=url,
            headers={"accept": UPSTREAM_ACCEPT, "user-agent": _USER_AGENT, **conditional},
            # An index may redirect to its own spelling of the page (same
            # depth, so relative file links still resolve from our URL).
            follow_redirects=True,
            verify=lambda headers: _PageCheck(
                url, headers.get("content-type"), key, self._models
            ),
            front_end="index",
        )
        try:
            answer = await self.fetcher.fetch(upstream_request)
        except UpstreamTimeout as e:
            raise _UpstreamFailed(url, str(e), timed_out=True) from e
        except (UpstreamError, IntegrityError) as e:
            raise _UpstreamFailed(url, str(e)) from e
        if answer.status == 304:
            if answer.body is not None:
                answer.body.close()
            return _NOT_MODIFIED
        body = answer.body
        assert body is not None
        if answer.status in (404, 410):
            body.close()
            return _MISSING
        if answer.status != 200:
            body.close()
            raise _UpstreamFailed(url, f"{url} answered {answer.status}")
        download = body.download
        try:
            data = await _read_whole(body)
        except UpstreamError as e:
            raise _UpstreamFailed(url, f"{url}: {e}") from e
        digest = download.sha256 or hashlib.sha256(data).hexdigest()
        return _Fetched(data, answer.headers.get("content-type"), digest)

    def _parse(self, upstream: str, name: str, data: bytes, content_type: str | None) -> ProjectPage:
        url = self._page_url(upstream, name)
        try:
            return parse_page(data, content_type, url)
        except SimplePageError as e:
            self.log.error(
                "Upstream page {url} is not a simple-index page: {error}",
                url=url, error=str(e),
            )
            raise _Refusal(
                502, f"the upstream page {url} is not a simple-index page: {e}"
            ) from e

    def _fresh_page(self, upstream: str, name: str, fetched: _Fetched) -> _Resolved:
        digest = fetched.digest
        slot = (page_key(upstream, name), digest)
        page = self._models.get(slot)
        if page is None:
            page = self._parse(upstream, name, fetched.data, fetched.content_type)
            self._models.put(slot, page, len(fetched.data))
        self._drop_disowned_files(name, page)
        self._served[name] = (upstream, digest)
        return _Resolved(upstream, name, page, digest, CacheStatus.MISS)

    def _drop_disowned_files(self, name: str, page: ProjectPage) -> None:
        """
        Remove the stored files the newly fetched ``page`` gives another
        sha256 for: once per page fetched, not on every file request.
        """
        digests = page_digests(page)
        stored = self.store.peek_many(digests)
        for entry, why in disowned_files(digests, stored):
            if self.store.remove_entry(entry):
                self.log.info(
                    "Removed {key}: the page of {name} now gives another"
                    " digest ({why}); the next request fetches it",
                    key=entry.key, name=name, why=why,
                )

    def _stored_page(self, upstream: str, name: str, status: CacheStatus) -> _Resolved:
        """
        The stored page of ``name`` from ``upstream`` (recording the access
        for the store's LRU), parsed or from memory.
        """
        key = page_key(upstream, name)
        entry = self.store.touch(key)
        if entry is None:
            raise _Refusal(502, f"the stored page of {name!r} disappeared; try again")
        page = self._models.get((key, entry.sha256)) if entry.sha256 else None
        if page is not None and entry.sha256 is not None:
            digest = entry.sha256
        else:
            # Not parsed since start-up (or pushed out of memory): read it.
            stored = self.store.lookup(key)
            if stored is None:
                raise _Refusal(502, f"the stored page of {name!r} disappeared; try again")
            try:
                data = _read_stored(stored)
            finally:
                stored.close()
            digest = hashlib.sha256(data).hexdigest()
            page = self._parse(upstream, name, data, stored.entry.headers.get("content-type"))
            self._models.put((key, digest), page, len(data))
        self._served[name] = (upstream, digest)
        return _Resolved(upstream, name, page, digest, status)

    def _stale_or_refuse(
        self, name: str, position: int, failed: _UpstreamFailed
    ) -> _Resolved:
        """
        Serve the first stored page of ``name`` from the failing upstream or
        one after it, or refuse with 502/504.
        """
        for upstream in self.upstreams[position:]:
            if self.store.peek(page_key(upstream, name)) is None:
                continue
            self.log.warn(
                "Serving stale page of {name} from {upstream}: {why}",
                name=name, upstream=upstream, why=failed.message,
            )
            if self.activity is not None:
                self.activity.stale_served(upstream)
            return self._stored_page(upstream, name, CacheStatus.STALE)
        raise _Refusal(
            504 if failed.timed_out else 502,
            f"upstream {failed.url} failed ({failed.message}) and no copy of"
            f" {name!r} is cached",
        )

    # -- the root ----------------------------------------------------------

    async def _root(self, request: Request) -> None:
        headers = request_headers(request)
        media_type = choose_media_type(headers.get("accept"))
        if media_type is None:
            self._not_acceptable(request)
            return
        if not self.upstreams:
            send_error(request, 502, "this index has no upstream configured")
            return
        upstream = self.upstreams[0]
        key = root_key(upstream, media_type)
        cache_control = client_cache_control(Kind.INDEX, self.index_ttl)
        extra = {"vary": "Accept"}
        stored = self.store.lookup(key)
        counters = self.store.counters
        if stored is not None and (
            self.clock.seconds() - stored.entry.validated_at < ROOT_TTL
        ):
            counters.hits += 1
            serve_stored(request, stored, CacheStatus.HIT, counters, cache_control, extra)
            return
        url = f"{upstream}/"
        conditional = validators_of(stored.entry.headers) if stored is not None else {}
        try:
            answer = await self.fetcher.fetch(
                UpstreamRequest(
                    key=key,
                    url=url,
                    headers={"accept": media_type, "user-agent": _USER_AGENT, **conditional},
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
            counters.revalidations += 1
            serve_stored(request, fresh, CacheStatus.REVALIDATED, counters, cache_control, extra)
            return
        assert answer.body is not None
        if answer.status != 200:
            answer.body.close()
            self._root_failed(request, stored, url, f"{url} answered {answer.status}", False)
            return
        if stored is not None:
            stored.close()
        counters.misses += 1
        serve_answer(request, answer, counters, cache_control, extra)

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
        if self.activity is not None:
            self.activity.stale_served(url)
        self.store.counters.hits += 1
        serve_stored(
            request, stored, CacheStatus.STALE, self.store.counters,
            client_cache_control(Kind.INDEX, self.index_ttl), {"vary": "Accept"},
        )

    # -- files -------------------------------------------------------------

    def _known_page(self, name: str) -> ProjectPage | None:
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
            if self.store.peek(page_key(upstream, name)) is not None:
                try:
                    return self._stored_page(upstream, name, CacheStatus.HIT).page
                except _Refusal:
                    continue
        return None

    async def _file(self, request: Request, project: str, filename: str) -> None:
        name = normalize_project_name(project)
        page = self._known_page(name)
        if page is None:
            send_error(
                request, 404,
                f"no page of project {name!r} has been served by this index;"
                f" files are found through /simple/{name}/",
            )
            return
        wanted = page.file_named(filename)
        is_metadata = False
        if wanted is None and filename.endswith(_METADATA_SUFFIX):
            wanted = page.file_named(filename[: -len(_METADATA_SUFFIX)])
            is_metadata = True
            if wanted is not None and not (
                wanted.has_core_metadata and _metadata_servable(wanted)
            ):
                send_error(
                    request, 404,
                    f"the page of {name!r} offers no core metadata for"
                    f" {wanted.filename}",
                )
                return
        if wanted is None:
            send_error(
                request, 404, f"{filename} is not listed on the page of {name!r}"
            )
            return
        distribution = file_request(
            wanted.url, wanted.sha256.lower() if wanted.sha256 else None, _USER_AGENT,
            may_be_large=wanted.size is None or wanted.size > STREAM_CHECKED_ABOVE,
        )
        if not is_metadata:
            await self._serve_file(request, name, distribution)
            return
        expected = wanted.core_metadata_hashes.get("sha256")
        metadata = file_request(
            wanted.metadata_url, expected.lower() if expected else None, _USER_AGENT,
            may_be_large=False,
        )
        if await self._serve_file(request, name, metadata) and self.prefetcher:
            self.prefetcher.after_metadata(distribution, wanted.size, name)

    def _claimed_read_ahead(self, key: str, stored: bool) -> bool:
        return self.prefetcher is not None and self.prefetcher.claim(key, stored)

    async def _serve_file(
        self, request: Request, name: str, upstream_request: UpstreamRequest
    ) -> bool:
        """
        Answer with a file or its metadata; whether it was sent (200).
        """
        key, url = upstream_request.key, upstream_request.url
        expected = upstream_request.expected_sha256
        counters = self.store.counters
        stored = open_stored(self.store, key, upstream_request.headers)
        if stored is None and adopt_verified_twin(
            self.store, key, upstream_request.headers, expected
        ):
            # Stored over plain http (by a version whose keys had no
            # scheme, or by the proxy), and the page fetched from this
            # https upstream vouches for its bytes.
            stored = open_stored(self.store, key, upstream_request.headers)
        if stored is not None:
            if expected is None or stored.entry.sha256 == expected:
                if self._claimed_read_ahead(key, stored=True):
                    # Read ahead for this request: its bytes crossed the
                    # line for it, only earlier.
                    counters.misses += 1
                    serve_stored(
                        request, stored, CacheStatus.MISS, _NO_COUNTERS,
                        _FILE_CACHE_CONTROL,
                    )
                else:
                    counters.hits += 1
                    serve_stored(
                        request, stored, CacheStatus.HIT, counters, _FILE_CACHE_CONTROL
                    )
                return True
            # Stored by another route without this check, and different
            # from what the page promises: fetch the checked one.
            stored.close()
        counters.misses += 1
        if request.method == b"HEAD" and not self.fetcher.downloading(key):
            # uv sends HEAD, then ranges: the HEAD alone fetches nothing.
            answered = await self._head_file(request, url, upstream_request)
            if answered is not None:
                return answered
        self._claimed_read_ahead(key, stored=False)
        try:
            answer = await self.fetcher.fetch(upstream_request)
        except IntegrityError as e:
            self._refuse_mismatch(request, name, url, str(e))
            return False
        except UpstreamError as e:
            send_error(request, e.status, f"upstream {url} failed: {e}")
            return False
        body = answer.body
        assert body is not None
        if answer.status != 200:
            body.close()
            send_error(
                request, 404 if answer.status in (404, 410) else 502,
                f"upstream answered {answer.status} for {url}",
            )
            return False
        download = body.download
        if download.request.expected_sha256 != expected:
            # Joined a download started without this digest (the proxy
            # port's): judge the whole body once it has ended.
            await download.when_settled()
            if download.failure is not None:
                body.close()
                send_error(
                    request, 502,
                    f"upstream {url} failed: {download.failure.getErrorMessage()}",
                )
                return False
            if download.sha256 is None:
                # Not kept on disk, so never hashed whole: unchecked bytes
                # are not served from the index.
                body.close()
                self.log.error(
                    "Cannot check {url} for project {name} against its page's"
                    " sha256: the cache could not keep its body ({error})",
                    url=url, name=name, error=str(download.spool_error),
                )
                send_error(
                    request, 502,
                    f"{url} could not be checked against the sha256 its index page"
                    f" gives (the cache could not keep it: {download.spool_error})",
                )
                return False
            if download.sha256 != expected:
                body.close()
                self._refuse_mismatch(
                    request, name, url, f"received sha256 {download.sha256}"
                )
                return False
        # Checked (the answer waited for the whole body to match the page,
        # or streams all but its tail until it does), or nothing to check
        # against: sent from the download while it is being stored.
        serve_answer(request, answer, counters, _FILE_CACHE_CONTROL)
        return not client_gone(request)

    async def _head_file(
        self, request: Request, url: str, upstream_request: UpstreamRequest
    ) -> bool | None:
        """
        Answer a HEAD for a file that is not stored with the upstream's
        answer to a HEAD; nothing is fetched or stored.  None, answering
        nothing, when the upstream does not do HEAD (405, 501): a GET must.
        """
        try:
            answer = await self.fetcher.head(upstream_request)
        except UpstreamError as e:
            send_error(request, e.status, f"upstream {url} failed: {e}")
            return False
        if answer.status in (405, 501):
            return None
        if answer.status != 200:
            send_error(
                request, 404 if answer.status in (404, 410) else 502,
                f"upstream answered {answer.status} for {url}",
            )
            return False
        serve_head(request, answer, _FILE_CACHE_CONTROL)
        return True

    def _refuse_mismatch(self, request: Request, name: str, url: str, why: str) -> None:
        self.log.error(
            "Refused {url} for project {name}: it does not match the sha256"
            " its index page gives ({why}); not stored",
            url=url, name=name, why=why,
        )
        send_error(
            request, 502,
            f"{url} does not match the sha256 its index page gives ({why});"
            " it was neither stored nor served",
        )


def _read_stored(stored: StoredObject) -> bytes:
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
