"""
Distribution files and their core metadata on the index port
(``/files/<project>/<filename>[.metadata]``).

Each file is served by the cache engine under a :class:`FilePolicy` built
from the page that lists it.  Files are immutable: a stored file whose
digest matches the page is a hit and is never revalidated; a missing one is
fetched once (single flight) with the page's sha256, so a mismatching body
is never stored nor served (502).  Reading a wheel's core metadata starts a
read-ahead of the wheel (:mod:`.prefetch`); the first request for a file
read ahead is a MISS, its bytes having crossed the line for it; the pages
of the dependencies it names are read ahead too (:mod:`.pagereads`),
unless the request carries credentials.  Their store keys are the proxy's keys for the
upstream URL (scheme included), so both ports share one copy, and follow
the same ``Vary`` rule (see :func:`buildcache.engine.keys.find_stored`).  A
file of an ``https://`` upstream that is stored only under its ``http://``
key (a cache upgraded from before keys named their scheme) is taken over
when its sha256 is the one the page gives (see
:meth:`buildcache.engine.core.Engine.adopt`).  A file is found
through the page the client last saw (see
:meth:`~buildcache.ecosystems.pypi.pages.PageResolver.known_page`): one not
listed there is a 404, whatever the upstream holds.
"""

from __future__ import annotations

from attrs import define, evolve
from twisted.logger import Logger
from twisted.web.server import Request

from buildcache.ecosystems.pypi.model import normalize_project_name
from buildcache.ecosystems.pypi.pages import PageResolver, metadata_servable
from buildcache.ecosystems.pypi.policy import (
    USER_AGENT,
    FileRequest,
    answer_status,
    file_request,
)
from buildcache.ecosystems.pypi.prefetch import Prefetcher
from buildcache.engine.core import Engine
from buildcache.engine.errors import (
    ANSWERED_ERRORS,
    HandOff,
    IntegrityError,
    status_for,
)
from buildcache.engine.exchanges import CacheStatus, client_gone
from buildcache.engine.hot import repeat_with
from buildcache.engine.respond import send_error

__all__ = ["FileServer"]

_METADATA_SUFFIX = ".metadata"

#: Request headers that make a request credentialed: no read-ahead for it.
_CREDENTIAL_HEADERS = (b"authorization", b"proxy-authorization", b"cookie")


def credentialed(request: Request) -> bool:
    """
    Whether ``request`` carries credentials of its client.
    """
    headers = request.requestHeaders
    return any(headers.hasHeader(name) for name in _CREDENTIAL_HEADERS)


@define
class FileServer:
    """
    Answers file and metadata requests; see the module docstring.
    """

    log = Logger()

    engine: Engine
    pages: PageResolver
    prefetcher: Prefetcher | None = None

    async def serve(self, request: Request, project: str, filename: str) -> None:
        """
        Answer ``request`` for ``filename`` of ``project`` (both unquoted).
        """
        name = normalize_project_name(project)
        page = self.pages.known_page(name)
        if page is None and self.engine.hits_only:
            # A hit worker knows the stored pages only; the main process
            # also the ones it served without storing them.
            raise HandOff(f"no page of {name} in this worker")
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
        if wanted is None and self.engine.hits_only:
            raise HandOff(f"{filename} not on this worker's page of {name}")
        if wanted is None:
            send_error(
                request, 404, f"{filename} is not listed on the page of {name!r}"
            )
            return
        distribution = file_request(
            wanted.url, wanted.sha256.lower() if wanted.sha256 else None, USER_AGENT,
            wanted.size,
        )
        if not is_metadata:
            await self._serve_file(request, name, distribution)
            return
        if self.engine.hits_only and self.engine.find(distribution.target) is None:
            # The main process reads a file ahead when it serves the file's
            # core metadata (pip asks for the file next): it must see this
            # request, or no file would be read ahead behind a worker.
            raise HandOff(f"{filename}: its file is not stored yet")
        expected = wanted.core_metadata_hashes.get("sha256")
        metadata = file_request(
            # A file's core metadata is small: held until checked.
            wanted.metadata_url, expected.lower() if expected else None, USER_AGENT, 0,
        )
        prefetcher = self.prefetcher
        if prefetcher is None:
            await self._serve_file(request, name, metadata)
            return
        user_agent = request.getHeader(b"user-agent")
        is_credentialed = credentialed(request)
        size = wanted.size

        def read_ahead() -> None:
            prefetcher.after_metadata(distribution, size, name)
            prefetcher.after_core_metadata(
                metadata.key,
                None if user_agent is None else user_agent.decode("latin-1"),
                is_credentialed,
            )

        # Each answer reads ahead, also one from the table of repeated hits.
        repeat_with(request, read_ahead)
        if await self._serve_file(request, name, metadata):
            read_ahead()

    def _claimed_read_ahead(self, key: str, stored: bool) -> bool:
        return self.prefetcher is not None and self.prefetcher.claim(key, stored)

    async def _serve_file(
        self, request: Request, name: str, wanted: FileRequest
    ) -> bool:
        """
        Answer with a file or its metadata; whether it was sent (200).
        """
        target, policy = wanted.target, wanted.policy
        url = target.url
        # Fetched for this client, or joining the read-ahead fetching it.
        claimed = self.engine.find(target) is None and self._claimed_read_ahead(
            target.key, stored=False
        )
        try:
            resolved = await self.engine.resolve(target, policy, request.method)
        except IntegrityError as e:
            self._refuse_mismatch(request, name, url, e)
            return False
        except ANSWERED_ERRORS as e:
            self.engine.answer_error(request, e)
            return False
        if resolved.stored is not None and self._claimed_read_ahead(target.key, stored=True):
            claimed = True
        if claimed and resolved.cache is CacheStatus.HIT:
            # Read ahead for this request: its bytes crossed the line for
            # it, only earlier (also when it joined the read-ahead's
            # download once whole).
            resolved = evolve(resolved, cache=CacheStatus.MISS)
        if resolved.stored is not None:
            self.engine.respond(request, target, policy, resolved)
            return True
        answer = resolved.answer
        assert answer is not None
        if answer.status != 200:
            resolved.close()
            send_error(
                request, answer_status(answer.status),
                f"upstream answered {answer.status} for {url}",
            )
            return False
        # Checked (the answer waited for the whole body to match the page,
        # or streams all but its tail until it does; a download started
        # without this digest is checked for this request by the fetcher),
        # or nothing to check against: sent from the download while it is
        # being stored.
        self.engine.respond(request, target, policy, resolved)
        return not client_gone(request)

    def _refuse_mismatch(
        self, request: Request, name: str, url: str, error: IntegrityError
    ) -> None:
        why = str(error)
        self.log.error(
            "Refused {url} for project {name}: it does not match the sha256"
            " its index page gives ({why}); not stored",
            url=url, name=name, why=why,
        )
        send_error(
            request, status_for(error),
            f"{url} does not match the sha256 its index page gives ({why});"
            " it was neither stored nor served",
        )

