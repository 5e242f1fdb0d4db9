"""
The pip / uv simple index on ``--pypi-port``: a PEP 503/691 mirror served
from the shared store.  This module is its thin front end: the URL space,
content negotiation and rendering::

    /                                   a plain-text pointer to /simple/
    /simple/                            the upstream root (:mod:`.root`)
    /simple/<project>/                  project pages, JSON or HTML (:mod:`.pages`)
    /files/<project>/<filename>         distribution files (:mod:`.files`)
    /files/<project>/<filename>.metadata  their PEP 658 core metadata

A project page is rendered from the parsed model that
:class:`~buildcache.ecosystems.pypi.pages.PageResolver` finds, in the
representation the client negotiated (PEP 691, ``Vary: Accept``), with file
links rewritten to ``../../files/<project>/<filename>`` on this port, and an
ETag of the upstream body and the representation (``If-None-Match`` gets a
304).  Every request is accounted by the engine (``Engine.begin``); a page
records the outcome it was resolved with.  The index never forwards a
client's ``Authorization`` or cookies upstream, so nothing it stores is
private to a client.  Which upstream serves a project, and when a page is
fresh, stale or refetched, is :mod:`.pages`; how files are checked against
the page, :mod:`.files`.
"""

from __future__ import annotations

import hashlib
from urllib.parse import quote, unquote, urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.access import AccessPolicy
from buildcache.ecosystems.pypi.files import FileServer, credentialed
from buildcache.ecosystems.pypi.lru import LRU
from buildcache.ecosystems.pypi.model import (
    MEDIA_TYPES,
    is_valid_project_name,
    normalize_project_name,
)
from buildcache.ecosystems.pypi.pages import (
    PageResolver,
    Refusal,
    ResolvedPage,
    metadata_servable,
)
from buildcache.ecosystems.pypi.prefetch import Prefetcher
from buildcache.ecosystems.pypi.render import choose_media_type, render_page
from buildcache.ecosystems.pypi.root import RootServer
from buildcache.engine.body import send_bytes_now
from buildcache.engine.conditional import not_modified
from buildcache.engine.core import Engine
from buildcache.engine.events import StatusPages
from buildcache.engine.exchanges import CacheStatus, client_gone
from buildcache.engine.freshness import Kind, client_cache_control
from buildcache.engine.respond import (
    STALE_CACHE_CONTROL,
    request_headers,
    send_error,
    send_text,
    set_cache_status,
)

__all__ = ["IndexResource", "file_link"]

#: Rendered page bodies kept in memory.
RENDER_CACHE_ENTRIES = 1024
RENDER_CACHE_BYTES = 16 * 1024 * 1024

#: Bumped whenever rendering changes, so clients' ETags stop matching.
_RENDERING = "1"

# Characters a path segment may hold literally (RFC 3986 pchar): a file
# name like "x-1.0+local-py3-none-any.whl" stays readable in links.
_SEGMENT_SAFE = "!$&'()*+,;=:@~"


def file_link(name: str, filename: str) -> str:
    """
    The link to a file as written on the page of project ``name``: relative,
    so it works whatever host name or address the client used, and
    resolving from ``/simple/<name>/`` to ``/files/<name>/<filename>``.
    """
    return f"../../files/{name}/{quote(filename, safe=_SEGMENT_SAFE)}"


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

    The proxy port hands it absolute-URI requests addressed to the index
    port through :meth:`serve`.  With a ``policy``, clients outside its
    ``allow_from`` get 403 on this resource's own port.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        engine: Engine,
        pages: PageResolver,
        files: FileServer,
        root: RootServer | None,
        index_ttl: float,
        policy: AccessPolicy | None = None,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.pages = pages
        self.files = files
        #: None when no upstream is configured.
        self.root = root
        self.index_ttl = index_ttl
        self.policy = policy
        self.status: StatusPages | None = None
        self._rendered: LRU[tuple[str, str, str], tuple[bytes, str]] = LRU(
            RENDER_CACHE_ENTRIES, RENDER_CACHE_BYTES
        )

    @property
    def prefetcher(self) -> Prefetcher | None:
        return self.files.prefetcher

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
                # An access line and an error count, as the proxy port
                # gives its refusals.
                self.engine.begin(request, "index")
                self.engine.refuse(
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
        self.engine.begin(request, "index", _project_of(path))
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("allow", "GET, HEAD")
            send_error(
                request, 405,
                f"{request.method.decode('latin-1')} is not served: this"
                " index answers GET and HEAD",
            )
            return
        d = Deferred.fromCoroutine(self._route(request, path))
        d.addErrback(self.engine.crashed, request)

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
                await self.files.serve(request, project, filename)
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

    async def _root(self, request: Request) -> None:
        media_type = choose_media_type(request_headers(request).get("accept"))
        if media_type is None:
            self._not_acceptable(request)
            return
        if self.root is None:
            send_error(request, 502, "this index has no upstream configured")
            return
        await self.root.serve(request, media_type)

    def _not_acceptable(self, request: Request) -> None:
        request.setHeader("vary", "Accept")
        send_error(
            request, 406,
            "no acceptable representation; this index serves "
            + ", ".join(MEDIA_TYPES),
        )

    # -- project pages -----------------------------------------------------

    async def _project_path(self, request: Request, raw: str, slash: bool) -> None:
        if not is_valid_project_name(raw):
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
        if self.prefetcher is not None:
            self.prefetcher.page_asked(name)
        try:
            resolved = await self.pages.resolve(name, headers)
        except Refusal as refusal:
            send_error(request, refusal.code, refusal.message)
            return
        try:
            self._send_page(request, headers, resolved, media_type)
        finally:
            # After the response: the page first, then the read-ahead's
            # upstream request, in the same turn.
            if (
                self.prefetcher is not None
                and resolved.status is CacheStatus.MISS
                and not credentialed(request)
            ):
                self.prefetcher.page_fetched(
                    resolved.page, name, headers.get("user-agent")
                )

    def _send_page(
        self, request: Request, headers: dict[str, str], resolved: ResolvedPage,
        media_type: str,
    ) -> None:
        body, etag = self._render(resolved, media_type)
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
        set_cache_status(request, resolved.status)
        if not_modified(headers, {"etag": etag}):
            request.setResponseCode(304)
            request.finish()
            return
        request.setResponseCode(200)
        request.setHeader("content-length", str(len(body)))
        if request.method != b"HEAD" and not send_bytes_now(request, body):
            request.write(body)
        request.finish()

    def _render(self, resolved: ResolvedPage, media_type: str) -> tuple[bytes, str]:
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
            metadata_available=metadata_servable,
        )
        tag = hashlib.sha256(
            f"{_RENDERING}|{resolved.key}|{resolved.sha256}|{media_type}".encode("utf-8")
        ).hexdigest()[:40]
        result = (body, f'"{tag}"')
        self._rendered.put(cache_slot, result, len(body))
        return result

