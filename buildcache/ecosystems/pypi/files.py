"""
Distribution files and their core metadata on the index port
(``/files/<project>/<filename>[.metadata]``).

Files are immutable: a stored file whose digest matches the page is a hit
and is never revalidated; a missing one is fetched through the fetcher
(single flight) with the page's sha256, so a mismatching body is never
stored nor served (502).  Their store keys are the proxy's keys for the
upstream URL (scheme included), so both ports share one copy, and follow
the same ``Vary`` rule (see :func:`buildcache.engine.keys.find_stored`).  A
file of an ``https://`` upstream that is stored only under its ``http://``
key (a cache upgraded from before keys named their scheme) is taken over
when its sha256 is the one the page gives (see
:func:`buildcache.engine.keys.adopt_verified_twin`).  A file is found
through the page the client last saw (see
:meth:`~buildcache.ecosystems.pypi.pages.PageResolver.known_page`): one not
listed there is a 404, whatever the upstream holds.
"""

from __future__ import annotations

from attrs import define
from twisted.logger import Logger
from twisted.web.server import Request

from buildcache.ecosystems.pypi.model import normalize_project_name
from buildcache.ecosystems.pypi.pages import (
    USER_AGENT,
    PageResolver,
    metadata_servable,
)
from buildcache.ecosystems.pypi.prefetch import Prefetcher, file_request
from buildcache.engine.freshness import Kind, client_cache_control
from buildcache.engine.keys import adopt_verified_twin, open_stored
from buildcache.engine.respond import (
    CacheStatus,
    client_gone,
    send_error,
    serve_answer,
    serve_head,
    serve_stored,
)
from buildcache.fetch.fetcher import (
    STREAM_CHECKED_ABOVE,
    Fetcher,
    UpstreamError,
    UpstreamRequest,
)
from buildcache.store import IntegrityError, Store

__all__ = ["FileServer"]

_FILE_CACHE_CONTROL = client_cache_control(Kind.IMMUTABLE, 0)
_METADATA_SUFFIX = ".metadata"


@define
class FileServer:
    """
    Answers file and metadata requests; see the module docstring.
    """

    log = Logger()

    store: Store
    fetcher: Fetcher
    pages: PageResolver
    prefetcher: Prefetcher | None = None

    async def serve(self, request: Request, project: str, filename: str) -> None:
        """
        Answer ``request`` for ``filename`` of ``project`` (both unquoted).
        """
        name = normalize_project_name(project)
        page = self.pages.known_page(name)
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
                wanted.has_core_metadata and metadata_servable(wanted)
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
            wanted.url, wanted.sha256.lower() if wanted.sha256 else None, USER_AGENT,
            may_be_large=wanted.size is None or wanted.size > STREAM_CHECKED_ABOVE,
        )
        if not is_metadata:
            await self._serve_file(request, name, distribution)
            return
        expected = wanted.core_metadata_hashes.get("sha256")
        metadata = file_request(
            wanted.metadata_url, expected.lower() if expected else None, USER_AGENT,
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
                    serve_stored(
                        request, stored, CacheStatus.MISS,
                        _FILE_CACHE_CONTROL,
                    )
                else:
                    serve_stored(
                        request, stored, CacheStatus.HIT,
                        _FILE_CACHE_CONTROL,
                    )
                return True
            # Stored by another route without this check, and different
            # from what the page promises: fetch the checked one.
            stored.close()
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
        serve_answer(request, answer, _FILE_CACHE_CONTROL)
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

