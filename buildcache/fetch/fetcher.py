"""
Fetching from upstream servers, one download per cache key.

:class:`Fetcher` owns single flight: concurrent requests for one key share
one upstream request, a :class:`buildcache.fetch.download.Download` that
the fetcher alone moves through its phases.  The body goes to a temporary
file in the store as it arrives; every client follows that file at its own
pace (see :mod:`buildcache.engine.body`), so clients get bytes as they
arrive while memory stays flat.  When the body is complete and checked it
is committed to the store; a failed, truncated or mismatching body is never
committed and every client reading it sees its response cut short.

Who may share a download is :meth:`UpstreamRequest.may_join`'s rule,
which includes the expected digest and size; a request that joins a
download checking less than it expects has the finished body checked for
it here (see :mod:`buildcache.fetch.request`), and ``Vary`` by the
request's :class:`VariantRule`.

A download's body is taken in (spooled, bounded, checked, stored) by
:mod:`buildcache.fetch.intake`; requests are sent by
:mod:`buildcache.fetch.send`; a shared tier, when there is one, is asked
first (:mod:`buildcache.fetch.shared`).

The names other packages use are importable from here: the request and
answer (:mod:`buildcache.fetch.request`), the download
(:mod:`buildcache.fetch.download`), the client (:mod:`buildcache.fetch.client`)
and the errors (:mod:`buildcache.fetch.errors`).
"""

from __future__ import annotations

from attrs import Factory, define, evolve
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from buildcache.credentials import redact
from buildcache.fetch.client import (
    HOP_BY_HOP,
    REPLAYED_HEADERS,
    UpstreamClient,
    end_to_end_headers,
    replayed,
    request_uri,
    upstream_client,
)
from buildcache.fetch.download import (
    MEMORY_BUFFER,
    STREAM_CHECKED_ABOVE,
    Download,
    spool_plan,
)
from buildcache.fetch.errors import (
    CacheWriteError,
    TargetRefused,
    UpstreamError,
    UpstreamTimeout,
)
from buildcache.fetch.events import FetchObserver
from buildcache.fetch.intake import Intake
from buildcache.fetch.phase import IllegalTransition, Phase
from buildcache.fetch.reader import WITHHELD_TAIL, DownloadBody, drained
from buildcache.fetch.request import (
    BodyVerifier,
    UpstreamAnswer,
    UpstreamRequest,
    VariantRule,
)
from buildcache.fetch.send import Sender
from buildcache.fetch.shared import CopyFault, SharedCopy, SharedTier
from buildcache.store import (
    Entry,
    IntegrityError,
    Store,
    mismatch,
)
from buildcache.turns import Waiters, deliver

__all__ = [
    "BodyVerifier",
    "CacheWriteError",
    "Download",
    "DownloadBody",
    "Fetcher",
    "HOP_BY_HOP",
    "IllegalTransition",
    "MEMORY_BUFFER",
    "Phase",
    "REPLAYED_HEADERS",
    "STREAM_CHECKED_ABOVE",
    "TargetRefused",
    "UpstreamAnswer",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamRequest",
    "UpstreamTimeout",
    "VariantRule",
    "WITHHELD_TAIL",
    "drained",
    "end_to_end_headers",
    "request_uri",
    "spool_plan",
    "upstream_client",
]


@define
class Fetcher:
    """
    Starts downloads, or joins the one already running for a key.
    """

    log = Logger()

    store: Store
    http: UpstreamClient
    clock: IReactorTime
    idle_timeout: float = 30.0
    activity: FetchObserver | None = None
    _downloads: dict[str, Download] = Factory(dict)
    #: Downloads still running that new requests may not join.
    _detached: list[Download] = Factory(list)
    _idle_waiters: Waiters = Factory(Waiters)
    #: HEADs being asked upstream, by key: a request sent alike joins one
    #: (a tag revalidated by many clients at once asks once).
    _heads: dict[str, _SharedHead] = Factory(dict)
    #: The tier several nodes share behind their disks, if any (see
    #: :mod:`buildcache.fetch.shared`).
    shared: SharedTier | None = None

    #: Downloads started, ever: an answer derived while it stood still
    #: waited for none (see :meth:`Engine.hot_hits`).
    started: int = 0

    def in_flight(self) -> int:
        return len(self._downloads) + len(self._detached)

    def running(self) -> list[Download]:
        """
        The downloads in flight: those new requests may join first, then
        those they may not.
        """
        return [*self._downloads.values(), *self._detached]

    def when_idle(self) -> Deferred[None]:
        """
        Fires once no download is running (at once if none is).
        """
        return self._idle_waiters.wait(not self.in_flight())

    def downloading(self, key: str) -> bool:
        """
        Whether a download of ``key`` is running (or being stored).
        """
        return key in self._downloads

    def stored(self, key: str) -> Deferred[None]:
        """
        Fires once the body of ``key`` that has just arrived is in the
        store (at once unless one is being stored): a lookup that must see
        the newest copy waits for this, not for a download still running.
        """
        download = self._downloads.get(key)
        if download is None or not download.finished:
            return succeed(None)
        return download.when_settled()

    def used(self, entry: Entry) -> None:
        """
        ``entry``, of a kind that is shared, answered a client from the
        disk (see :meth:`SharedTier.used`).
        """
        if self.shared is not None:
            self.shared.used(entry)

    # -- single flight ----------------------------------------------------

    def fetch(self, request: UpstreamRequest) -> Deferred[UpstreamAnswer]:
        """
        The answer for ``request.key``, from the running download for that
        key or from a new one.

        Fails with :class:`UpstreamError` when the upstream cannot be
        reached, and with :class:`IntegrityError` when a checked body does
        not match (also a body checked for this request alone, see
        :meth:`UpstreamRequest.checks_beyond`).
        """
        download = self._downloads.get(request.key)
        if download is None:
            return self._start(request, joinable=True)
        if not request.may_join(download.request):
            return self._own_download(request)
        return download.join().addCallback(self._share, request, download, download.whole)

    def _start(
        self, request: UpstreamRequest, joinable: bool
    ) -> Deferred[UpstreamAnswer]:
        """
        Start a download for ``request``, which later requests for its key
        join if it is ``joinable``; its answer.
        """
        activity = self.activity
        on_received = None
        if activity is not None:
            front_end = request.front_end
            on_received = lambda n: activity.upstream_received(front_end, n)  # noqa: E731
        self.started += 1
        download = Download(
            request, self.store, on_received, self._unjoinable, self._joinable_again
        )
        if joinable:
            self._downloads[request.key] = download
        else:
            self._detached.append(download)
        # Joined before it runs: an upstream that answers at once (in
        # memory) would otherwise have ended it, its spool file closed,
        # before the caller is given a reader of it.
        answer = download.join()
        Deferred.fromCoroutine(self._run(download))
        return answer

    def _own_download(self, request: UpstreamRequest) -> Deferred[UpstreamAnswer]:
        """
        A download for ``request`` alone, which later requests do not join.
        """
        return self._start(request, joinable=False)

    def _share(
        self, answer: UpstreamAnswer, request: UpstreamRequest, download: Download,
        whole: bool,
    ) -> UpstreamAnswer | Deferred[UpstreamAnswer]:
        """
        The answer of the download ``request`` joined, if it answers
        ``request`` too: the same ``Vary`` variant (else a download of its
        own), and, when ``request`` expects more than that download checks,
        a body that matches it once whole.  Marked
        :attr:`~UpstreamAnswer.already_whole` when the body was ``whole``
        as it was joined.
        """
        variants = request.variants
        if variants is not None and not variants.same_variant(
            answer.headers, request.headers, download.request.headers
        ):
            if answer.body is not None:
                answer.body.close()
            return self._own_download(request)
        if (
            answer.body is not None
            and answer.status == 200
            and request.checks_beyond(download.request)
        ):
            return Deferred.fromCoroutine(self._checked_for(request, answer))
        return evolve(answer, already_whole=True) if whole else answer

    async def _checked_for(
        self, request: UpstreamRequest, answer: UpstreamAnswer
    ) -> UpstreamAnswer:
        """
        ``answer``, once its whole body has been checked against what
        ``request`` (which joined a download that does not check it)
        expects; fails as :meth:`fetch` does, the body released.
        """
        body = answer.body
        assert body is not None
        download = body.download
        try:
            await download.when_settled()
            failure = download.failure
            if failure is not None:
                failure.raiseException()
            if download.sha256 is None:
                self.log.error(
                    "Cannot check {url} against the digest a request that"
                    " joined its download expects: the cache could not keep"
                    " its body ({error})",
                    url=redact(request.url), error=str(download.spool_error),
                )
                raise CacheWriteError(
                    f"{redact(request.url)} could not be checked against the"
                    " sha256 it is expected to have (the cache could not keep"
                    f" it: {download.spool_error})"
                )
            wrong = mismatch(
                download.received, download.sha256,
                request.expected_size, request.expected_sha256,
            )
            if wrong is not None:
                raise self._intake().refused(request, None, IntegrityError(wrong))
        except BaseException:
            body.close()
            raise
        return answer

    def _unjoinable(self, download: Download) -> None:
        """
        New requests for the download's key start a download of their own:
        this one no longer holds the bytes they would need from the start.
        """
        if self._downloads.get(download.request.key) is download:
            del self._downloads[download.request.key]
            self._detached.append(download)
        if download.lease is not None:
            # It will store, and so publish, nothing: the other nodes
            # (and this node's next download of the key) need not wait.
            download.lease.release()
            download.lease = None

    def _joinable_again(self, download: Download) -> None:
        """
        A failed shared copy was forgotten before anyone saw it: the
        download starts again from nothing, and new requests for its key
        join it again (unless another download took the key meanwhile).
        """
        key = download.request.key
        if download in self._detached and key not in self._downloads:
            self._detached.remove(download)
            self._downloads[key] = download

    async def _run(self, download: Download) -> None:
        request = download.request
        try:
            await self._download(download)
        except Exception:
            failure = Failure()
            if not failure.check(UpstreamError, IntegrityError):
                self.log.failure("Download of {url} failed", failure, url=redact(request.url))
            download.fail(failure)
        finally:
            if self._downloads.get(request.key) is download:
                del self._downloads[request.key]
            else:
                self._detached.remove(download)
            if download.finished:
                # (Not when its coroutine was closed with no outcome, at exit.)
                download.settle()
            if not self.in_flight():
                self._idle_waiters.fire()

    # -- upstream ---------------------------------------------------------

    def head(self, request: UpstreamRequest) -> Deferred[UpstreamAnswer]:
        """
        The upstream's answer to a HEAD for ``request``: its status and
        end-to-end headers (``content-length`` included), no body, nothing
        stored.  Fails as :meth:`fetch` does.  A HEAD for the same key, URL
        and headers already being asked is joined, not sent again.
        """
        waiter: Deferred[UpstreamAnswer] = Deferred()
        shared = self._heads.get(request.key)
        if shared is not None and shared.answers(request):
            shared.waiting.append(waiter)
            return waiter
        shared = _SharedHead(request, [waiter])
        if request.key not in self._heads:
            self._heads[request.key] = shared
        # May answer at once (a connection refused): the waiter is in place.
        asked = Deferred.fromCoroutine(self._head(request))
        asked.addBoth(self._head_answered, request.key, shared)
        return waiter

    def _head_answered(
        self, result: UpstreamAnswer | Failure, key: str, shared: _SharedHead
    ) -> None:
        if self._heads.get(key) is shared:
            del self._heads[key]
        waiting, shared.waiting = shared.waiting, []
        deliver(waiting, result)

    async def _head(self, request: UpstreamRequest) -> UpstreamAnswer:
        tier = self.shared
        if tier is not None and request.shared and tier.shares(request):
            copy = await tier.head_of(request)
            if copy is not None:
                # The tier's record answers it: no byte crosses the line.
                headers = {**copy.headers, "content-length": str(copy.size)}
                return UpstreamAnswer(200, headers, None, shared=True)
        response = await self._send("HEAD", request)
        response.deliverBody(Protocol())
        headers = end_to_end_headers(response.headers)
        return UpstreamAnswer(response.code, headers, None)

    def _sender(self) -> Sender:
        return Sender(self.http, self.clock, self.idle_timeout, self.activity)

    def _intake(self) -> Intake:
        return Intake(self.store, self.clock, self.idle_timeout, self._report_failure)

    def _report_failure(self, url: str, error: str) -> None:
        self._sender().report_failure(url, error)

    async def _send(self, method: str, request: UpstreamRequest) -> IResponse:
        return await self._sender().send(method, request)

    async def _download(self, download: Download) -> None:
        """
        Fetch the download's body: from the shared tier when it holds a
        copy (and the copy passes its checks), else upstream, under the
        tier's lease when one was taken; a body fetched upstream and stored
        is published to the tier.
        """
        request = download.request
        tier = self._tier_for(request)
        if tier is None:
            await self._from_upstream(download)
            return
        found = await tier.before_upstream(request)
        if isinstance(found, SharedCopy):
            if await self._from_shared(download, tier, found):
                return
        elif found is not None:
            download.lease = found
        try:
            entry = await self._from_upstream(download)
        except BaseException:
            if download.lease is not None:
                download.lease.release()
                download.lease = None
            raise
        lease, download.lease = download.lease, None
        if entry is not None:
            tier.publish(request, entry, lease)
        elif lease is not None:
            lease.release()

    def _tier_for(self, request: UpstreamRequest) -> SharedTier | None:
        """The shared tier ``request``'s body comes from and goes to, if any."""
        tier = self.shared
        return tier if tier is not None and request.shared and tier.shares(request) else None

    async def _from_shared(
        self, download: Download, tier: SharedTier, copy: SharedCopy
    ) -> bool:
        """
        Read ``copy`` into the download, checked against its size and
        digest (and the request's own checks), and store it; False, the
        download back where it started, when it cannot be read whole or
        fails a check (see :class:`CopyFault`).  A copy already streaming
        to clients (its tail withheld) that fails fails the download.
        """
        request = download.request
        download.read_shared()
        try:
            if request.expected_sha256 is not None and (
                request.expected_sha256.lower() != copy.sha256.lower()
            ):
                raise IntegrityError(
                    f"its record names sha256 {copy.sha256}, not {request.expected_sha256}"
                )
            response = await self._sender().send_copy(copy, SHARED_TIMEOUT)
            if response.code != 200:
                response.deliverBody(Protocol())
                if response.code == 404:
                    raise _CopyMissing("the object store has no such object")
                raise UpstreamError(f"the object store answered {response.code}")
            if isinstance(response.length, int) and response.length != copy.size:
                response.deliverBody(Protocol())
                raise IntegrityError(
                    f"the object store holds {response.length} bytes, its record"
                    f" says {copy.size}"
                )
            headers = dict(copy.headers)
            headers["content-length"] = str(copy.size)
            # Held from its clients, it must come whole in a bounded time
            # (they time out); streamed, each chunk must come in time.
            held = download.holds_until_checked
            await self._intake().receive(
                download, response, headers, copy.size if copy.size_vouched else None,
                expected_size=copy.size, expected_sha256=copy.sha256,
                idle_timeout=SHARED_TIMEOUT, most=copy.size,
                deadline=SHARED_TIMEOUT + copy.size / SHARED_MIN_RATE if held else None,
                # A size nothing vouches for takes no room from what is
                # stored until the body has passed its checks.
                beside_limit=not copy.size_vouched,
            )
        except Exception as e:
            why = str(e) or repr(e)
            fault = _fault_of(e)
            tier.copy_failed(request, copy, why, fault)
            if download.restartable:
                self._copy_failed_log(copy, request, fault, why, "fetching it upstream")
                download.restart()
                return False
            if fault is CopyFault.STORE and _resumable(download, copy):
                # Clients already have its first bytes: the rest comes
                # from upstream, and the whole is checked as one body.
                self._copy_failed_log(
                    copy, request, fault, why,
                    f"fetching the rest upstream from byte {download.received}",
                )
                await self._resume_upstream(download, copy)
                return True
            self._copy_failed_log(copy, request, fault, why, "its clients' responses end here")
            raise
        tier.copy_served(request, copy)
        return True

    def _copy_failed_log(
        self, copy: SharedCopy, request: UpstreamRequest, fault: CopyFault, why: str,
        then: str,
    ) -> None:
        self.log.warn(
            "Shared copy {name} of {url} not used ({fault}): {why}; {then}",
            name=copy.name, url=redact(request.url), why=why, fault=fault.value,
            then=then, event="shared_copy_failed",
        )

    async def _resume_upstream(self, download: Download, copy: SharedCopy) -> None:
        """
        Fetch the rest of a copy that failed part-way from upstream, with
        ``Range``, into the same download; the whole body is then checked
        against the copy's digest.  Fails as a download does when the
        upstream cannot resume it exactly there.
        """
        request = download.request
        offset = download.received
        ranged = evolve(request, headers={**request.headers, "range": f"bytes={offset}-"})
        response = await self._send("GET", ranged)
        content_range = response.headers.getRawHeaders(b"content-range", [b""])[0]
        if response.code == 206 and content_range.decode("latin-1") == (
            f"bytes {offset}-{copy.size - 1}/{copy.size}"
        ):
            skip = 0
        elif response.code == 200 and response.length == copy.size:
            # An upstream that ignores ranges sends it all again: the
            # bytes the download has are dropped.
            skip = offset
        else:
            response.deliverBody(Protocol())
            raise UpstreamError(
                f"{redact(request.url)} could not resume a shared copy at byte"
                f" {offset} (HTTP {response.code})"
            )
        download.resume_upstream()
        storable = request.storable(download.status, download.headers)
        await self._intake().finish(
            download, response, storable, copy.size,
            expected_size=copy.size, expected_sha256=copy.sha256, skip=skip,
        )

    async def _from_upstream(self, download: Download) -> Entry | None:
        """
        Fetch the download's body upstream; the entry stored, if any.
        """
        request = download.request
        response = await self._send("GET", request)
        headers = end_to_end_headers(response.headers)
        headers.pop("content-length", None)
        length = response.length if isinstance(response.length, int) else None
        if length is not None:
            headers["content-length"] = str(length)
        if response.code == 304:
            # Nothing to read; the caller serves its stored copy.
            response.deliverBody(Protocol())
            self.store.mark_validated(request.revalidates or request.key, replayed(headers))
            download.not_modified(headers)
            return None
        return await self._intake().receive(
            download, response, headers, length,
            expected_size=request.expected_size, expected_sha256=request.expected_sha256,
            whole_digest=request.needs_digest(shared=self._tier_for(request) is not None),
        )

#: How long a shared copy's read may wait for the object store's response
#: head, or for its next bytes, before the download goes upstream: well
#: under the clients' own timeouts (pip's 15 s), for bytes that cross no
#: slow line.
SHARED_TIMEOUT = 5.0
#: Bytes per second a copy held from its clients must come at, at least,
#: besides SHARED_TIMEOUT: a 4 MiB copy has 5.4 s in all.
SHARED_MIN_RATE = 10 * 1024 * 1024


def _resumable(download: Download, copy: SharedCopy) -> bool:
    """
    Whether the rest of a copy that failed part-way may come from
    upstream into the same download: its bytes so far are in its spool
    file, and it is checked by its digest alone (a verifier would see
    only the rest).
    """
    return (
        download.spool is not None
        and download.phase is Phase.SPOOLING
        and download.request.verify is None
        and 0 < download.received < copy.size
    )


class _CopyMissing(UpstreamError):
    """The object store has no object under a record's digest."""


def _fault_of(error: Exception) -> CopyFault:
    """Whose fault a copy's failure is (see :class:`CopyFault`)."""
    if isinstance(error, IntegrityError):
        return CopyFault.CORRUPT
    if isinstance(error, _CopyMissing):
        return CopyFault.MISSING
    if isinstance(error, CacheWriteError):
        return CopyFault.LOCAL
    return CopyFault.STORE


@define
class _SharedHead:
    """One HEAD being asked upstream, and who waits for its answer."""

    request: UpstreamRequest
    waiting: list[Deferred[UpstreamAnswer]] = Factory(list)

    def answers(self, request: UpstreamRequest) -> bool:
        """Whether ``request`` would be sent exactly as this one was."""
        mine = self.request
        return (
            request.url == mine.url
            and dict(request.headers) == dict(mine.headers)
            and request.operator_credentials == mine.operator_credentials
            and request.follow_redirects == mine.follow_redirects
        )
