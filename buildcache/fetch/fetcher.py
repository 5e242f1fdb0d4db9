"""
Fetching from upstream servers, one download per cache key.

:class:`Fetcher` owns single flight: concurrent requests for one key share
one upstream request.  The body goes to a temporary file in the store as
it arrives; every client follows that file at its own pace (see
:mod:`buildcache.engine.body`), so clients get bytes as they arrive while memory
stays flat.  When the body is complete and checked it is committed to the
store; a failed, truncated or mismatching body is never committed and every
client reading it sees its response cut short.

It also owns the store keys of upstream URLs and who may be answered from
them: :func:`cache_key` (scheme, host, port, path, query), the entries of
one client's credentials (:func:`private_family`), the ``Vary``
variants of a URL (:func:`variant_key`, :func:`find_stored`,
:func:`variants_to_drop`), and when an ``https://`` key may take over the
entry its plain-http twin holds (:func:`http_twin`, :func:`adopt_twin`);
the HTTP rules behind them are in :mod:`buildcache.engine.freshness`.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable, Mapping
from typing import Any
from typing import Protocol as TypingProtocol

from attrs import Factory, define, field, frozen
from hyperlink import EncodedURL
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RedirectAgent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from buildcache.credentials import CredentialsAgent, UpstreamCredentials, redact
from buildcache.engine.freshness import (
    same_variant,
    sent_headers,
)
from buildcache.engine.keys import VARIANT_MARK, stored_key_for, variants_to_drop
from buildcache.fetch.events import FetchObserver
from buildcache.fetch.headlimit import head_too_large
from buildcache.store import (
    IntegrityError,
    NoRoom,
    ObjectWriter,
    Store,
    mismatch,
    uncounted_limit,
)
from buildcache.turns import Waiters

_log = Logger()

_DEFAULT_PORTS = {"http": 80, "https": 443}

#: Response headers that describe the connection, not the object.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

#: Response headers kept with a stored object and replayed to clients.
REPLAYED_HEADERS = frozenset(
    {
        "content-type",
        "etag",
        "last-modified",
        "cache-control",
        "expires",
        "date",
        "content-disposition",
        "content-language",
        "vary",
    }
)


class UpstreamError(Exception):
    """
    The upstream could not be reached or did not answer in time.
    """

    #: Whether the failure says something about the upstream's health; a
    #: target the access policy refused was never contacted.
    counts_against_upstream = True
    #: The status a client is answered with: the one place that maps
    #: upstream failures to statuses (subclasses say theirs).
    status = 502


class UpstreamTimeout(UpstreamError):
    status = 504


class CacheWriteError(UpstreamError):
    """
    The cache disk refused a body that had to be checked before anyone
    could see it (or that nobody was reading any more), so it was neither
    stored nor served.  An :class:`UpstreamError` so that front ends answer
    it like a failed fetch (502, or a stale copy).
    """


class BodyVerifier(TypingProtocol):
    """
    Checks a body while it streams; ``finish`` raises on a mismatch.
    """

    def update(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


#: Request headers that make an answer belong to that request alone.
_IDENTIFYING_HEADERS = (
    "authorization", "cookie", "if-none-match", "if-modified-since"
)


def _default_storable(status: int, headers: Mapping[str, str]) -> bool:
    return status == 200


@frozen
class UpstreamRequest:
    """
    What to fetch for a cache key, and how to judge the answer.

    ``verify`` builds a checker for the body from the response headers
    (one against an apk index entry, say; it checks 200 responses only);
    ``expected_sha256``/``expected_size`` come from an index page.  When
    either is given, clients get the response only once the body is
    complete and checked, so a mismatch is a clean 502, never wrong bytes.

    ``stream_before_check`` trades that for speed on large files: clients
    are streamed the body as it arrives except its last
    :data:`WITHHELD_TAIL` bytes, which are released only once the check
    passes; on a mismatch the response ends incomplete, which no client
    takes for a whole file.
    """

    key: str
    url: str
    headers: Mapping[str, str] = Factory(dict)
    expected_size: int | None = None
    expected_sha256: str | None = None
    verify: Callable[[Mapping[str, str]], BodyVerifier] | None = None
    storable: Callable[[int, Mapping[str, str]], bool] = _default_storable
    follow_redirects: bool = False
    stream_before_check: bool = False
    #: ``key`` names a family of entries, one per ``Vary`` variant: the
    #: response is stored under :func:`stored_key_for`, and a request that
    #: joins a download whose response varies on headers it sends with
    #: other values gets a download of its own.  For URL keys; the index's
    #: own pages are always fetched with the same headers.
    variants: bool = False
    #: The stored entry a conditional request revalidates (a variant of
    #: ``key``): a 304 refreshes that one.
    revalidates: str | None = None
    #: Recorded with the stored body (:attr:`buildcache.store.Entry.source_digest`):
    #: how the index that vouched for it identifies it, so that a later
    #: version of that index can tell whether it still describes it.
    source_digest: str | None = None
    #: Whether the credentials the operator configured for this URL's
    #: origin go with it: for the mirror routes and the index, not for the
    #: forward proxy, where any allowed client names any path of the host.
    operator_credentials: bool = True
    #: The front end the bytes fetched are counted for (see
    #: :meth:`buildcache.fetch.events.FetchObserver.upstream_received`).
    front_end: str = "proxy"

    def may_join(self, running: UpstreamRequest) -> bool:
        """
        Whether this request may share the answer of ``running`` (same key):
        not when they carry different credentials (one client's would
        reach another) or conditions (a 304 answers only the conditional
        one), nor a checked request a download nobody checks.  (Whether the
        answer's ``Vary`` lets them share is known only once it arrives; see
        :meth:`Fetcher.fetch`.)
        """
        return (
            all(
                self.headers.get(name) == running.headers.get(name)
                for name in _IDENTIFYING_HEADERS
            )
            and self.revalidates == running.revalidates
            and self.operator_credentials == running.operator_credentials
            and (self.verify is None or running.verify is not None)
        )

    @property
    def checked(self) -> bool:
        return self.verify is not None or self.expected_sha256 is not None

    @property
    def holds_until_checked(self) -> bool:
        return self.checked and not self.stream_before_check

    @property
    def withholds_tail(self) -> bool:
        return self.checked and self.stream_before_check


@frozen
class UpstreamAnswer:
    """
    What one client of a download receives: the upstream status and
    end-to-end headers (lowercase names), and the body to stream.

    ``body`` is ``None`` for a 304 to a revalidation: the stored copy is
    current, and the caller serves it.
    """

    status: int
    headers: Mapping[str, str] = field(eq=False)
    body: DownloadBody | None


def end_to_end_headers(headers: Headers) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, values in headers.getAllRawHeaders():
        lower = name.decode("latin-1").lower()
        if lower in HOP_BY_HOP:
            continue
        result[lower] = ", ".join(v.decode("latin-1") for v in values)
    return result


@define(eq=False)
class DownloadBody:
    """
    One client's view of a download in progress (a :class:`BodySource`).

    ``fd`` reads the download's spool file (-1 when it has none).  A
    streaming reader reports its progress with :meth:`advance`; that is
    what a download kept in memory waits for (see :class:`Download`).
    """

    download: Download
    fd: int
    #: The offset this reader has reached, -1 until it first reports one.
    position: int = -1
    #: Set when the reader fell too far behind a download kept in memory:
    #: the bytes it needs next are gone.
    dropped: bool = False
    closed: bool = False

    def available(self) -> int:
        download = self.download
        if download.request.withholds_tail and (
            not download.finished or download.failure is not None
        ):
            return max(0, download.received - WITHHELD_TAIL)
        return download.received

    def in_file(self) -> int:
        return self.download.spooled

    def read(self, offset: int, count: int) -> bytes:
        """
        Up to ``count`` bytes at ``offset``, from the spool file or from
        memory; empty when they are no longer (or not yet) there.
        """
        download = self.download
        if offset < download.spooled:
            return os.pread(self.fd, min(count, download.spooled - offset), offset)
        if self.dropped:
            return b""
        return download.from_memory(offset, count)

    def advance(self, offset: int) -> None:
        """
        This reader needs no byte before ``offset`` any more.
        """
        if not self.dropped:
            self.position = offset
            self.download.reader_moved()

    def finished(self) -> bool:
        return self.download.finished

    def failure(self) -> Failure | None:
        return self.download.failure

    def when_more(self, callback: Callable[[], None]) -> None:
        self.download.when_more(callback)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.download.reader_closed(self)


#: Checked files larger than this (or of unknown size) are streamed before
#: their check ends (see :attr:`UpstreamRequest.stream_before_check`):
#: holding a large file back until it has all arrived would leave its
#: clients without a byte for longer than they wait (pip: 15 s).
STREAM_CHECKED_ABOVE = 4 * 1024 * 1024

#: Bytes of a body streamed before its check that are held back until the
#: check has passed (see :attr:`UpstreamRequest.stream_before_check`).
WITHHELD_TAIL = 64 * 1024

#: Most bytes a download that cannot be spooled to disk keeps in memory for
#: its slowest reader before it pauses the upstream.
MEMORY_BUFFER = 1024 * 1024


@define(eq=False)
class Download:
    """
    One upstream request in flight, shared by every client of its key.

    The body goes to a spool file in the store.  If the disk refuses it
    (full, failing), the bytes from there on are kept in memory for the
    readers already attached, and nothing is stored: the upstream is
    paused whenever the slowest streaming reader is more than
    :data:`MEMORY_BUFFER` bytes behind, so memory stays bounded and the
    download goes at the pace of its slowest reader.
    """

    log = Logger()

    request: UpstreamRequest
    store: Store
    received: int = 0
    #: Bytes of the body in the spool file: all of them unless writing
    #: failed (see :attr:`spool_error`).
    spooled: int = 0
    spool_error: OSError | None = None
    finished: bool = False
    failure: Failure | None = None
    status: int = 0
    headers: dict[str, str] = Factory(dict)
    #: Every reader lost interest in a download that cannot be stored.
    abandoned: bool = False
    #: Ended, and stored if it was to be (see :meth:`when_settled`).
    settled: bool = False
    #: The digest of the whole body, once it has ended whole in its spool
    #: file: what a request with a digest of its own checks when it joined
    #: a download started without one.
    sha256: str | None = None
    _settled_waiters: Waiters = Factory(Waiters)
    _writer: ObjectWriter | None = None
    _read_fd: int = -1
    _has_body: bool = False
    _answered: bool = False
    _answer_waiters: list[Deferred[UpstreamAnswer]] = Factory(list)
    _more_waiters: list[Callable[[], None]] = Factory(list)
    _answer_failure: Failure | None = None
    _bodies: list[DownloadBody] = Factory(list)
    _memory: bytearray = Factory(bytearray)
    _memory_start: int = 0
    _upstream: IPushProducer | None = None
    _held_back: bool = False
    #: The digest of the body, carried on from the spool file's once the
    #: body goes on in memory, so that a digest can still be checked.
    _memory_hash: Any = None
    #: Told of every body byte received (the activity's upstream count).
    on_received: Callable[[int], None] | None = None

    def when_settled(self) -> Deferred[None]:
        """
        Fires once the download has ended and what it stores (if anything)
        is in the store: later lookups of its key see it.
        """
        return self._settled_waiters.wait(self.settled)

    def _settle(self) -> None:
        self.settled = True
        self._settled_waiters.fire()

    def join(self) -> Deferred[UpstreamAnswer]:
        """
        Wait for the answer; see :class:`UpstreamAnswer`.
        """
        if self._answered:
            return self._make_answer()
        d: Deferred[UpstreamAnswer] = Deferred()
        self._answer_waiters.append(d)
        return d

    def _make_answer(self) -> Deferred[UpstreamAnswer]:
        if self._answer_failure is not None:
            failed: Deferred[UpstreamAnswer] = Deferred()
            failed.errback(self._answer_failure)
            return failed
        body = None
        if self._has_body:
            fd = os.dup(self._read_fd) if self._read_fd >= 0 else -1
            body = DownloadBody(self, fd)
            self._bodies.append(body)
        return succeed(UpstreamAnswer(self.status, dict(self.headers), body))

    def _answer(self) -> None:
        self._answered = True
        waiters, self._answer_waiters = self._answer_waiters, []
        for d in waiters:
            self._make_answer().chainDeferred(d)

    def when_more(self, callback: Callable[[], None]) -> None:
        if self.finished:
            callback()
        else:
            self._more_waiters.append(callback)

    def _notify(self) -> None:
        waiters, self._more_waiters = self._more_waiters, []
        for callback in waiters:
            callback()

    # -- the body ---------------------------------------------------------

    def _spool(self, writer: ObjectWriter) -> None:
        self._has_body = True
        self._writer = writer
        try:
            self._read_fd = writer.reader_fd()
        except OSError as e:
            self._spool_failed(e)

    def _unspooled(self, error: OSError) -> None:
        self._has_body = True
        self._spool_failed(error)

    def _spool_failed(self, error: OSError) -> None:
        self.spool_error = error
        self._memory_start = self.spooled
        if self._writer is not None:
            self._memory_hash = self._writer.hash_state()
            # Readers' descriptors keep the bytes already written.
            self._writer.abort()
        else:
            self._memory_hash = hashlib.sha256()
        if isinstance(error, NoRoom):
            self.log.info(
                "Not storing {url} ({error}); streaming it to its clients"
                " after {size} bytes in tmp/",
                event="streamed_not_stored",
                url=redact(self.request.url),
                size=self.spooled,
                error=str(error),
            )
            return
        self.log.error(
            "Cannot write {url} to the cache after {size} bytes: {error};"
            " streaming it to its clients from memory, not storing it",
            url=redact(self.request.url),
            size=self.spooled,
            error=str(error),
        )

    def memory_mismatch(self) -> str | None:
        """
        For a body that went on in memory: why it is not the one its
        request expects, or None.
        """
        if self._memory_hash is None:
            return None
        return mismatch(
            self.received, self._memory_hash.hexdigest(),
            self.request.expected_size, self.request.expected_sha256,
        )

    def _take(self, data: bytes) -> None:
        if self.spool_error is None:
            writer = self._writer
            assert writer is not None
            try:
                self._write(writer, data)
            except OSError as e:
                self._spool_failed(e)
            except sqlite3.Error as e:
                # Making room failed in the index: as a failing disk.
                self._spool_failed(OSError(f"cache index: {e}"))
            else:
                self.spooled += len(data)
        self.received += len(data)
        self.store.counters.bytes_from_upstream += len(data)
        if self.on_received is not None:
            self.on_received(len(data))
        if self.spool_error is not None:
            if self._memory_hash is not None:
                self._memory_hash.update(data)
            self._memory += data
            # Keep only what a streaming reader still needs.
            self.reader_moved()
        self._notify()
        if (
            self._upstream is not None
            and not self._held_back
            and len(self._memory) > MEMORY_BUFFER
        ):
            self._held_back = True
            self._upstream.pauseProducing()

    def _write(self, writer: ObjectWriter, data: bytes) -> None:
        try:
            writer.write(data)
        except NoRoom:
            # Out of room under the limit as it grew (a chunked body): one
            # that must be checked whole goes on outside it.
            if not (
                writer.counted
                and spool_plan(False, self.request.holds_until_checked) == "uncounted"
                and writer.uncount()
            ):
                raise
            writer.write(data)

    def from_memory(self, offset: int, count: int) -> bytes:
        start = offset - self._memory_start
        if start < 0:
            return b""
        return bytes(self._memory[start:start + count])

    def reader_moved(self) -> None:
        """
        Forget the bytes every streaming reader has passed, and let the
        upstream go on once the slowest has caught up.
        """
        if self.spool_error is None:
            return
        positions = [b.position for b in self._bodies if b.position >= 0]
        # A reader of a range may wait at an offset not yet received: the
        # bytes kept start where the body has got to, at most.
        floor = min(min(positions) if positions else self.received, self.received)
        if floor > self._memory_start:
            del self._memory[: floor - self._memory_start]
            self._memory_start = floor
        if (
            self._held_back
            and self._upstream is not None
            and len(self._memory) <= MEMORY_BUFFER // 2
        ):
            self._held_back = False
            self._upstream.resumeProducing()

    def reader_closed(self, body: DownloadBody) -> None:
        self._bodies.remove(body)
        if self.spool_error is None:
            return
        length = self.headers.get("content-length")
        whole = length is not None and self.received >= int(length)
        if not (self._bodies or self.finished or whole) and self._upstream is not None:
            # Nothing will be stored and nobody is reading.
            self.abandoned = True
            self._upstream.stopProducing()
            return
        self.reader_moved()

    def drop_laggards(self) -> bool:
        """
        The upstream has been held back for a whole idle timeout: give up
        on the readers holding it (their responses end incomplete) so the
        others go on.  False when it was not held back.
        """
        if not self._held_back:
            return False
        limit = self.received - MEMORY_BUFFER // 2
        laggards = [b for b in self._bodies if 0 <= b.position < limit]
        for body in laggards:
            body.dropped = True
            body.position = -1
        self.log.warn(
            "Dropped {count} clients of {url}: they kept it from being"
            " fetched for the upstream timeout while it could not be spooled",
            count=len(laggards),
            url=redact(self.request.url),
        )
        self.reader_moved()
        return True


def spool_plan(counted: bool, held: bool) -> str:
    """
    Where a body goes (or its bytes from now on), given whether room for
    it is held under the size limit (``counted``: a declared length
    reserved, or the room of a body of unknown length still growing), and
    whether nobody may see it before its check (``held``):

    - ``"spool"``: to its spool file, counted against ``--max-size``;
    - ``"uncounted"``: to its spool file, holding room outside the limit
      (see :func:`buildcache.store.uncounted_limit`): its check needs it
      whole, so memory will not do, and refusing it would fail a request
      the cache used to serve (an index page beside a large download);
    - ``"memory"``: streamed to its readers from memory, not stored.
    """
    if counted:
        return "spool"
    if held:
        return "uncounted"
    return "memory"


class _BodyReceiver(Protocol):
    """
    Passes an upstream body to its download, resetting the idle timer on
    every chunk.
    """

    def __init__(self, fetcher: Fetcher, download: Download, done: Deferred[None]):
        self._fetcher = fetcher
        self._download = download
        self._done = done
        self._timer: IDelayedCall | None = None
        verify = download.request.verify
        self._verifier = verify(download.headers) if verify is not None else None
        self.timed_out = False
        self.verify_error: Exception | None = None
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        # The transport of a response body is a producer proxy.
        self._download._upstream = IPushProducer(self.transport)
        self._arm()
        self._abandon_if_unspoolable()

    def _abandon_if_unspoolable(self) -> bool:
        """
        Stop a download that cannot be spooled when nobody may see it
        before it is checked, or nobody is reading it: it cannot be kept,
        so it is not worth fetching.  (One streamed before its check is
        checked in memory, see :meth:`Download.memory_mismatch`.)
        """
        download = self._download
        if download.spool_error is None or not (
            download.request.holds_until_checked or not download._bodies
        ):
            return False
        download.abandoned = True
        self._stop()
        return True

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._fetcher.idle_timeout)
        else:
            self._timer = self._fetcher.clock.callLater(
                self._fetcher.idle_timeout, self._idle
            )

    def _idle(self) -> None:
        if self._download.drop_laggards():
            # Held back by its readers, not silent on its own.
            self._arm()
            return
        self.timed_out = True
        self._stop()

    def _stop(self) -> None:
        IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        download = self._download
        self._arm()
        if download.abandoned:
            return
        spooling = download.spool_error is None
        download._take(data)
        if spooling and download.spool_error is not None:
            self._fetcher._unjoinable(download)
            if self._abandon_if_unspoolable():
                return
        if self._verifier is not None and self.verify_error is None:
            try:
                self._verifier.update(data)
            except Exception as e:
                self.verify_error = e

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._download._upstream = None
        # A Failure passed to callback() would turn into an errback.
        self.reason = reason
        self._done.callback(None)

    def verify(self) -> None:
        if self.verify_error is not None:
            raise self.verify_error
        if self._verifier is not None:
            self._verifier.finish()


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

    def in_flight(self) -> int:
        return len(self._downloads) + len(self._detached)

    def when_idle(self) -> Deferred[None]:
        """
        Fires once no download is running (at once if none is).
        """
        return self._idle_waiters.wait(not self.in_flight())

    def _refused(
        self, request: UpstreamRequest, writer: ObjectWriter | None, error: Exception
    ) -> IntegrityError:
        """
        Forget a body that failed its check, and say so.
        """
        if writer is not None:
            writer.abort()
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

    def _report_failure(self, url: str, error: str) -> None:
        if self.activity is not None:
            self.activity.upstream_failed(url, error)

    def fetch(self, request: UpstreamRequest) -> Deferred[UpstreamAnswer]:
        """
        The answer for ``request.key``, from the running download for that
        key or from a new one.

        Fails with :class:`UpstreamError` when the upstream cannot be
        reached, and with :class:`IntegrityError` when a checked body does
        not match.
        """
        download = self._downloads.get(request.key)
        if download is not None and not request.may_join(download.request):
            return self._own_download(request)
        elif download is None:
            download = self._new_download(request)
            self._downloads[request.key] = download
            Deferred.fromCoroutine(self._run(download))
            return download.join()
        joined = download.join()
        if request.variants:
            joined.addCallback(self._same_variant, request, download)
        return joined

    def _own_download(self, request: UpstreamRequest) -> Deferred[UpstreamAnswer]:
        """
        A download for ``request`` alone, which later requests do not join.
        """
        download = self._new_download(request)
        self._detached.append(download)
        Deferred.fromCoroutine(self._run(download))
        return download.join()

    def _same_variant(
        self, answer: UpstreamAnswer, request: UpstreamRequest, download: Download
    ) -> UpstreamAnswer | Deferred[UpstreamAnswer]:
        """
        The answer of the download ``request`` joined, if its ``Vary``
        lets it answer ``request`` too; else a download of its own.
        """
        if same_variant(
            answer.headers, sent_headers(request.headers),
            sent_headers(download.request.headers),
        ):
            return answer
        if answer.body is not None:
            answer.body.close()
        return self._own_download(request)

    def _new_download(self, request: UpstreamRequest) -> Download:
        download = Download(request, self.store)
        activity = self.activity
        if activity is not None:
            front_end = request.front_end
            download.on_received = lambda n: activity.upstream_received(front_end, n)
        return download

    def head(self, request: UpstreamRequest) -> Deferred[UpstreamAnswer]:
        """
        The upstream's answer to a HEAD for ``request``: its status and
        end-to-end headers (``content-length`` included), no body, nothing
        stored.  Fails as :meth:`fetch` does.
        """
        return Deferred.fromCoroutine(self._head(request))

    async def _head(self, request: UpstreamRequest) -> UpstreamAnswer:
        response = await self._send("HEAD", request)
        response.deliverBody(Protocol())
        headers = end_to_end_headers(response.headers)
        return UpstreamAnswer(response.code, headers, None)

    async def _run(self, download: Download) -> None:
        request = download.request
        try:
            await self._download(download)
        except Exception:
            failure = Failure()
            if not failure.check(UpstreamError, IntegrityError):
                self.log.failure("Download of {url} failed", failure, url=redact(request.url))
            self._fail(download, failure)
        finally:
            if self._downloads.get(request.key) is download:
                del self._downloads[request.key]
            else:
                self._detached.remove(download)
            if download._read_fd >= 0:
                os.close(download._read_fd)
                download._read_fd = -1
            download._settle()
            if not self.in_flight():
                self._idle_waiters.fire()

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

    def _unjoinable(self, download: Download) -> None:
        """
        New requests for the download's key start a download of their own:
        this one no longer holds the bytes they would need from the start.
        """
        if self._downloads.get(download.request.key) is download:
            del self._downloads[download.request.key]
            self._detached.append(download)

    def _fail(self, download: Download, failure: Failure) -> None:
        if download._writer is not None:
            download._writer.abort()
        download.failure = failure
        download.finished = True
        if not download._answered:
            download._answer_failure = failure
            download._answer()
        download._notify()

    async def _send(self, method: str, request: UpstreamRequest) -> IResponse:
        """
        Send ``request`` upstream and wait, up to the idle timeout, for the
        response head; fails with :class:`UpstreamError`.
        """
        try:
            requested = self.http.request(
                method,
                request.url,
                headers=Headers({k: [v] for k, v in request.headers.items()}),
                unbuffered=True,
                allow_redirects=request.follow_redirects,
                operator_credentials=request.operator_credentials,
            )
        except Exception as e:
            # Some URLs cannot be requested at all, before any I/O (an
            # IPv6 literal with a zone, say).
            self._report_failure(request.url, str(e) or repr(e))
            raise UpstreamError(f"cannot request {redact(request.url)}: {e}") from e
        given_up: list[bool] = []

        def give_up() -> None:
            given_up.append(True)
            requested.cancel()

        timer = self.clock.callLater(self.idle_timeout, give_up)
        started = self.clock.seconds()
        try:
            response = await requested
        except UpstreamError as e:
            if e.counts_against_upstream:
                self._report_failure(request.url, str(e))
            raise
        except Exception as e:
            if head_too_large(e):
                self._report_failure(request.url, "response head too large")
                raise UpstreamError(
                    f"{redact(request.url)} answered with a response head larger"
                    " than this cache accepts"
                ) from e
            # Cancelled once the request has gone out, the agent fails with
            # ResponseNeverReceived (wrapping the CancelledError), not with
            # CancelledError itself: the timer says which it was.
            if not (given_up or isinstance(e, CancelledError)):
                self.log.warn(
                    "Upstream {url} failed: {error}", url=redact(request.url), error=repr(e)
                )
                self._report_failure(request.url, str(e) or repr(e))
                raise UpstreamError(f"{redact(request.url)}: {e}") from e
            self.log.warn("Upstream {url} did not answer in time", url=redact(request.url))
            self._report_failure(request.url, "timeout")
            raise UpstreamTimeout(
                f"{redact(request.url)} did not answer within {self.idle_timeout:g}s"
            )
        finally:
            if timer.active():
                timer.cancel()
        if response.code in (401, 403) and request.operator_credentials:
            # Credentials the operator configured for it that it refuses
            # (or none configured for one that needs them): what an ops
            # person must hear of, not a healthy upstream.
            self.log.warn(
                "Upstream {url} refused the request with {status}: check the"
                " credentials configured for it (in its URL or --netrc)",
                url=redact(request.url), status=response.code,
                event="upstream_refused_credentials",
            )
        if self.activity is not None:
            if response.code >= 500 or (
                response.code in (401, 403) and request.operator_credentials
            ):
                self.activity.upstream_failed(request.url, f"HTTP {response.code}")
            else:
                self.activity.upstream_succeeded(
                    request.url, self.clock.seconds() - started
                )
        return response

    async def _download(self, download: Download) -> None:
        request = download.request
        response = await self._send("GET", request)
        download.status = response.code
        download.headers = end_to_end_headers(response.headers)
        download.headers.pop("content-length", None)
        if isinstance(response.length, int):
            download.headers["content-length"] = str(response.length)
        if response.code == 304:
            # Nothing to read; the caller serves its stored copy.
            response.deliverBody(Protocol())
            self.store.mark_validated(
                request.revalidates or request.key, _replayed(download.headers)
            )
            download.finished = True
            download._answer()
            return
        storable = request.storable(download.status, download.headers)
        stored_key: str | None = request.key
        if request.variants:
            stored_key = stored_key_for(
                request.key, self.store.secret, download.headers, request.headers
            )
        if stored_key is None:
            # Vary: *, which no later request matches.
            storable = False
            stored_key = request.key
        length = response.length if isinstance(response.length, int) else None
        try:
            spool = self.store.writer(stored_key)
        except OSError as e:
            download._unspooled(e)
        else:
            try:
                self._hold_room(download, spool, storable, length)
            except BaseException:
                # Whatever failed (the index, say), the body is not left
                # holding room or a file.
                spool.abort()
                raise
        if download.spool_error is not None:
            self._unjoinable(download)
        if not request.holds_until_checked:
            download._answer()
        done: Deferred[None] = Deferred()
        receiver = _BodyReceiver(self, download, done)
        response.deliverBody(receiver)
        await done
        reason = receiver.reason
        assert reason is not None
        if download.abandoned:
            why = (
                "it must be checked before it is served"
                if request.holds_until_checked
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
                request.expected_size is not None
                or request.expected_sha256 is not None
                or request.verify is not None
            )
        if receiver.timed_out:
            self._report_failure(request.url, "stalled mid-body")
            raise UpstreamTimeout(
                f"{redact(request.url)} stalled for {self.idle_timeout:g}s after"
                f" {download.received} bytes"
            )
        if not complete:
            self._report_failure(request.url, "body cut short")
            raise UpstreamError(
                f"{redact(request.url)} ended after {download.received} bytes:"
                f" {reason.getErrorMessage()}"
            )
        writer = download._writer
        if request.verify is not None and download.status == 200:
            try:
                receiver.verify()
            except Exception as e:
                raise self._refused(request, writer, e)
        if download.spool_error is not None and download.status == 200:
            wrong = download.memory_mismatch()
            if wrong is not None:
                raise self._refused(request, None, IntegrityError(wrong))
        kept = writer if storable and download.spool_error is None else None
        if kept is not None:
            try:
                kept.check(
                    expected_size=(
                        request.expected_size
                        if request.expected_size is not None
                        else length
                    ),
                    expected_sha256=request.expected_sha256,
                )
            except IntegrityError as e:
                raise self._refused(request, writer, e)
        elif writer is not None:
            writer.abort()
        if writer is not None and download.spool_error is None:
            download.sha256 = writer.sha256
        # Whole and checked: clients get it now, from the spool file,
        # while the fsync and rename run (in a thread, in the server).
        download.finished = True
        if download._has_body:
            # Whole: clients joining from now on (also while it is being
            # stored) get its length, and so ranges.
            download.headers["content-length"] = str(download.received)
        if request.holds_until_checked:
            download._answer()
        download._notify()
        if kept is not None:
            try:
                entry = await kept.persist(
                    _replayed(download.headers), request.source_digest
                )
                if entry is not None and request.variants:
                    self._drop_other_variants(request.key, entry.key)
            except Exception as e:
                # Whatever keeps it from the store (a full disk, the thread
                # pool stopping at shutdown), its clients have it all.
                self.log.error(
                    "Cannot store {url}: {error}; served, not stored",
                    url=redact(request.url),
                    error=str(e),
                )


    def _hold_room(
        self, download: Download, spool: ObjectWriter, storable: bool,
        length: int | None,
    ) -> None:
        """
        Spool the body of ``download`` to ``spool`` if room is held for it
        (see :func:`spool_plan`), else go on in memory.
        """
        request = download.request
        # A body that will not be stored takes only room already free.
        spool.evicts = storable
        counted = length is None or spool.reserve(length)
        plan = spool_plan(counted, request.holds_until_checked)
        if plan == "uncounted":
            if spool.uncount() and spool.reserve(length or 0):
                download._spool(spool)
                return
            plan = "refuse"
        if plan == "spool":
            download._spool(spool)
            return
        spool.abort()
        if plan == "refuse":
            download._unspooled(NoRoom(
                f"its {length} bytes are more than the"
                f" {uncounted_limit(self.store.max_object_size)} the cache holds"
                " of bodies being checked beside its limit"
            ))
        else:
            download._unspooled(NoRoom(
                f"its {length} bytes are more than the cache keeps"
                " beside the downloads in progress"
                if length is not None and self.store.fits(length)
                else f"its {length} bytes are more than the cache keeps of"
                " one object"
            ))

    def _drop_other_variants(self, family: str, stored_key: str) -> None:
        """
        Keep the variants of ``family`` to what may still answer someone
        (see :func:`variants_to_drop`).
        """
        siblings = [
            (entry.key, entry.last_access)
            for entry in self.store.entries_under(family + VARIANT_MARK, limit=64)
        ]
        base = self.store.peek(family)
        if base is not None:
            siblings.append((base.key, base.last_access))
        for key in variants_to_drop(family, stored_key, siblings):
            self.log.info("Dropping variant {key} of {family}", key=key, family=family)
            self.store.remove(key)


async def drained(body: DownloadBody) -> None:
    """
    Wait until the download behind ``body`` has settled (ended and, if it
    was storable, been stored); releases ``body``.
    """
    try:
        await body.download.when_settled()
    finally:
        body.close()


def _replayed(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in REPLAYED_HEADERS}


@implementer(IAgent)
@frozen
class _IdentityEncodingAgent:
    """
    Asks for bodies as stored on the upstream, and hides the encoding of
    one that comes encoded anyway from whatever would unpack it: a
    ``.tar.gz`` served with ``Content-Encoding: gzip`` is the archive
    itself, and unpacking it would break its digest.
    """

    agent: IAgent

    async def _request(
        self, method: bytes, uri: bytes, headers: Headers | None, body: Any
    ) -> IResponse:
        headers = headers.copy() if headers is not None else Headers()
        headers.setRawHeaders(b"accept-encoding", [b"identity"])
        response = await self.agent.request(method, uri, headers, body)
        encoding = response.headers.getRawHeaders(b"content-encoding")
        if encoding:
            response.headers.removeHeader(b"content-encoding")
            response.headers.setRawHeaders(b"x-upstream-content-encoding", encoding)
        return response

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        return Deferred.fromCoroutine(self._request(method, uri, headers, bodyProducer))


def request_uri(url: str) -> bytes:
    """
    The URI bytes an upstream request for ``url`` is sent with: non-ASCII
    characters percent-encoded and the host IDNA-encoded, as treq sends
    them, except that an IPv6 literal host is kept as it is (bracketed):
    hyperlink would try to IDNA-encode it, and fail.

    @raise ValueError: ``url`` cannot be encoded (hyperlink's message).
    """
    parsed = EncodedURL.from_text(url)
    host = parsed.host
    if ":" in host:
        # hyperlink accepts the literal, then refuses it in to_uri().
        parsed = parsed.replace(host=_IPV6_STAND_IN).to_uri().replace(host=host)
    else:
        parsed = parsed.to_uri()
    return parsed.to_text().encode("ascii")


#: A name hyperlink can encode, standing in for an IPv6 literal while the
#: rest of the URL is encoded (see request_uri); never sent.
_IPV6_STAND_IN = "ipv6-literal.invalid"


@frozen
class UpstreamClient:
    """
    How every upstream request is sent: streamed bodies, redirects followed
    only when asked (each hop through ``agent``, so what ``agent`` adds,
    such as configured credentials, is judged hop by hop), and no cookies
    kept between clients.

    The same ``request`` keywords as treq's ``HTTPClient`` (which this
    replaces because it cannot request an IPv6 literal host).
    """

    agent: IAgent
    #: The same without the operator's credentials (see ``request``).
    anonymous_agent: IAgent | None = None

    def request(
        self,
        method: str,
        url: str,
        headers: Headers | None = None,
        unbuffered: bool = True,
        allow_redirects: bool = True,
        operator_credentials: bool = True,
    ) -> Deferred[IResponse]:
        """
        Send ``method`` for ``url``; bodies are always streamed
        (``unbuffered`` is accepted for treq's signature).  Without
        ``operator_credentials``, the credentials configured for upstreams
        are not added even on their origins.

        @raise ValueError: ``url`` cannot be requested (see
            :func:`request_uri`), before any I/O.
        """
        uri = request_uri(url)
        agent: IAgent = self.agent
        if not operator_credentials and self.anonymous_agent is not None:
            agent = self.anonymous_agent
        if allow_redirects:
            # Twisted's RedirectAgent drops a client's Authorization and
            # Cookie headers when a redirect leaves the origin.
            agent = RedirectAgent(agent)
        return agent.request(
            method.encode("ascii").upper(), uri,
            headers.copy() if headers is not None else Headers(), None,
        )

    def get(self, url: str, **kwargs: Any) -> Deferred[IResponse]:
        return self.request("GET", url, **kwargs)


def upstream_client(
    agent: IAgent, credentials: UpstreamCredentials | None = None
) -> UpstreamClient:
    """
    The client every upstream request goes through: bodies as the upstream
    stores them (see :class:`_IdentityEncodingAgent`), and the operator's
    ``credentials`` added to requests for their own origins only.
    """
    inner: IAgent = _IdentityEncodingAgent(agent)
    if credentials:
        return UpstreamClient(CredentialsAgent(inner, credentials), inner)
    return UpstreamClient(inner)
