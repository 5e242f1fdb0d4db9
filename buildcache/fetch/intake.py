"""
Receiving one response body into its download (:class:`Intake`): the
spool file and the room it holds (:func:`buildcache.fetch.download.spool_plan`),
the idle timeout, a bound on the bytes and the time a body may take, the
checks (the request's verifier, the expected size and digest), and
storing what passed.  The fetcher (:mod:`buildcache.fetch.fetcher`) decides
where a body comes from; this module takes it in.
"""

from __future__ import annotations

from collections.abc import Callable

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IResponse

from buildcache.credentials import redact
from buildcache.fetch.client import replayed
from buildcache.fetch.download import Download, spool_plan
from buildcache.fetch.errors import CacheWriteError, UpstreamError, UpstreamTimeout
from buildcache.fetch.receiver import BodyReceiver
from buildcache.fetch.request import UpstreamRequest
from buildcache.store import (
    Entry,
    IntegrityError,
    NoRoom,
    ObjectWriter,
    Store,
    uncounted_limit,
)

__all__ = ["Intake"]


@frozen
class Intake:
    """
    Takes response bodies into downloads for the store ``store``.
    """

    log = Logger()

    store: Store
    clock: IReactorTime
    idle_timeout: float
    #: Tells the upstream health table that ``url`` failed (and why).
    report_failure: Callable[[str, str], None]

    def refused(
        self, request: UpstreamRequest, writer: ObjectWriter | None, error: Exception,
        shared: bool = False,
    ) -> IntegrityError:
        """
        Forget a body that failed its check, and say so (a ``shared``
        copy's failure is the tier's to log: the upstream sent nothing).
        """
        if writer is not None:
            writer.abort()
        if not shared:
            self.log.error(
                "Upstream {url} sent a body that fails its check; not stored: {error}",
                url=redact(request.url),
                error=str(error),
            )
        if isinstance(error, IntegrityError):
            return error
        refused = IntegrityError(str(error))
        refused.__cause__ = error
        return refused

    async def receive(
        self, download: Download, response: IResponse, headers: dict[str, str],
        length: int | None, expected_size: int | None, expected_sha256: str | None,
        idle_timeout: float | None = None, most: int | None = None,
        deadline: float | None = None, beside_limit: bool = False,
        whole_digest: bool = True,
    ) -> Entry | None:
        """
        Receive ``response``'s body into the download (``length`` bytes
        reserved, when known; beside the size limit until it is checked,
        if ``beside_limit``), check it against the request's verifier and
        ``expected_size``/``expected_sha256``, and store it when it may be
        kept; the entry stored, if any.  See :meth:`finish` for ``most``
        and ``deadline``; ``whole_digest``: take the body's sha256 (see
        :meth:`UpstreamRequest.needs_digest`).
        """
        request = download.request
        status = response.code
        storable = request.storable(status, headers)
        stored_key: str | None = request.key
        if request.variants is not None:
            stored_key = request.variants.stored_key(
                request.key, self.store.secret, headers, request.headers
            )
        if stored_key is None:
            # Vary: *, which no later request matches.
            storable = False
            stored_key = request.key
        download.start_body(status, headers, self._spool_for(
            request, stored_key, storable, length, download.holds_until_checked,
            beside_limit, whole_digest or expected_sha256 is not None,
        ))
        return await self.finish(
            download, response, storable, length, expected_size, expected_sha256,
            idle_timeout, most, deadline,
        )

    async def finish(
        self, download: Download, response: IResponse, storable: bool,
        length: int | None, expected_size: int | None, expected_sha256: str | None,
        idle_timeout: float | None = None, most: int | None = None,
        deadline: float | None = None, skip: int = 0,
    ) -> Entry | None:
        """
        Read the rest of the download's body from ``response`` (silent for
        ``idle_timeout`` at most, all of it within ``deadline`` seconds if
        given, stopped past ``most`` bytes, its first ``skip`` bytes
        dropped), check it and store it; see :meth:`receive`.
        """
        request = download.request
        idle = self.idle_timeout if idle_timeout is None else idle_timeout
        done: Deferred[None] = Deferred()
        receiver = BodyReceiver(download, self.clock, idle, done, most, deadline, skip)
        response.deliverBody(receiver)
        await done
        reason = receiver.reason
        assert reason is not None
        if receiver.overran:
            raise IntegrityError(f"longer than the {most} bytes it should have")
        if download.abandoned:
            why = (
                "it must be checked before it is served"
                if download.holds_until_checked
                else "no client is reading it"
            )
            raise CacheWriteError(
                f"cannot write {redact(request.url)} to the cache"
                f" ({download.spool_error}), and {why}"
            )
        complete = reason.check(ResponseDone) is not None
        if reason.check(PotentialDataLoss) and length is None:
            # A body delimited by closing the connection: it may be whole,
            # but nothing proves it, so it is served and not stored unless
            # a size or digest check below vouches for it.
            complete = True
            storable = storable and (
                expected_size is not None
                or expected_sha256 is not None
                or request.verify is not None
            )
        if receiver.timed_out:
            if not download.shared:
                self.report_failure(request.url, "stalled mid-body")
            raise UpstreamTimeout(
                f"{redact(request.url)} stalled for {idle:g}s after"
                f" {download.received} bytes"
            )
        if not complete:
            if not download.shared:
                self.report_failure(request.url, "body cut short")
            raise UpstreamError(
                f"{redact(request.url)} ended after {download.received} bytes:"
                f" {reason.getErrorMessage()}"
            )
        self._check(download, receiver, length, expected_size, expected_sha256)
        writer = download.spool
        kept = writer if storable else None
        if kept is None and writer is not None:
            writer.abort()
        # Whole and checked: clients get it now, from the spool file,
        # while the fsync and rename run (in a thread, in the server).
        download.complete()
        if kept is None:
            return None
        try:
            entry = await kept.persist(replayed(download.headers), request.source_digest)
            if entry is not None and request.variants is not None:
                request.variants.stored(self.store, request.key, entry.key)
        except Exception as e:
            # Whatever keeps it from the store (a full disk, the thread
            # pool stopping at shutdown), its clients have it all.
            self.log.error(
                "Cannot store {url}: {error}; served, not stored",
                url=redact(request.url),
                error=str(e),
            )
            return None
        return entry

    def _check(
        self, download: Download, receiver: BodyReceiver, length: int | None,
        expected_size: int | None, expected_sha256: str | None,
    ) -> None:
        """
        Raise :class:`IntegrityError`, forgetting the body, when a whole 200
        body fails its checks: the request's verifier; then, for a body
        kept in memory, its request's size and digest, and for one in its
        spool file (stored or not), the size (the declared length when no
        size is expected) and digest of that file.
        """
        request = download.request
        if download.status != 200:
            return
        writer = download.spool
        if request.verify is not None:
            try:
                receiver.verify()
            except Exception as e:
                raise self.refused(request, writer, e, download.shared)
        if writer is None:
            wrong = download.memory_mismatch()
            if wrong is not None:
                raise self.refused(request, None, IntegrityError(wrong), download.shared)
            return
        # Checked whether or not it is to be stored: a body nobody keeps is
        # still served, and must be what its request expects.
        try:
            writer.check(
                expected_size=expected_size if expected_size is not None else length,
                expected_sha256=expected_sha256,
            )
        except IntegrityError as e:
            raise self.refused(request, writer, e, download.shared)

    def _spool_for(
        self, request: UpstreamRequest, stored_key: str, storable: bool,
        length: int | None, held: bool, beside_limit: bool = False,
        whole_digest: bool = True,
    ) -> ObjectWriter | OSError:
        """
        The spool file for the body of ``request``, with room held for it
        (see :func:`spool_plan`; ``held``: nobody sees it before its check;
        ``beside_limit``: outside the size limit, evicting nothing, until
        it is stored), or why it goes on in memory.
        """
        try:
            spool = self.store.writer(stored_key, whole_digest)
        except OSError as e:
            return e
        try:
            # A body that will not be stored takes only room already free.
            spool.evicts = storable and not beside_limit
            if beside_limit:
                if spool.uncount(quiet=True):
                    return spool
                spool.abort()
                return NoRoom(
                    "the cache holds no more bodies beside its limit while"
                    " they are checked"
                )
            counted = length is None or spool.reserve(length)
            plan = spool_plan(counted, held)
            if plan == "uncounted":
                if spool.uncount() and spool.reserve(length or 0):
                    return spool
                plan = "refuse"
            if plan == "spool":
                return spool
        except BaseException:
            # Whatever failed (the index, say), the body is not left
            # holding room or a file.
            spool.abort()
            raise
        spool.abort()
        if plan == "refuse":
            return NoRoom(
                f"its {length} bytes are more than the"
                f" {uncounted_limit(self.store.max_object_size)} the cache holds"
                " of bodies being checked beside its limit"
            )
        return NoRoom(
            f"its {length} bytes are more than the cache keeps"
            " beside the downloads in progress"
            if length is not None and self.store.fits(length)
            else f"its {length} bytes are more than the cache keeps of"
            " one object"
        )
