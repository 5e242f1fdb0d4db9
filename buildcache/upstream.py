"""
Fetching from upstream servers with treq, one download per cache key.

:class:`Fetcher` owns single flight: concurrent requests for one key share
one upstream request.  The body goes to a temporary file in the store as
it arrives; every client follows that file at its own pace (see
:mod:`buildcache.body`), so clients get bytes as they arrive while memory
stays flat.  When the body is complete and checked it is committed to the
store; a failed, truncated or mismatching body is never committed and every
client reading it sees its response cut short.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit
from http.cookiejar import CookieJar, DefaultCookiePolicy
from collections.abc import Callable, Mapping
from typing import Any, Protocol as TypingProtocol, cast

from attrs import Factory, define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer
import treq.client

from buildcache.activity import Activity
from buildcache.store import Entry, IntegrityError, ObjectWriter, Store

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


class UpstreamTimeout(UpstreamError):
    pass


class BodyVerifier(TypingProtocol):
    """
    Checks a body while it streams; ``finish`` raises on a mismatch.
    """

    def update(self, data: bytes) -> None: ...

    def finish(self) -> None: ...


def _default_storable(status: int, headers: Mapping[str, str]) -> bool:
    return status == 200


@frozen
class UpstreamRequest:
    """
    What to fetch for a cache key, and how to judge the answer.

    ``verify`` builds a checker for the body (an apk index entry, say);
    ``expected_sha256``/``expected_size`` come from an index page.  When
    either is given, clients get the response only once the body is
    complete and checked, so a mismatch is a clean 502, never wrong bytes.
    """

    key: str
    url: str
    headers: Mapping[str, str] = Factory(dict)
    expected_size: int | None = None
    expected_sha256: str | None = None
    verify: Callable[[], BodyVerifier] | None = None
    storable: Callable[[int, Mapping[str, str]], bool] = _default_storable
    follow_redirects: bool = False

    @property
    def holds_until_checked(self) -> bool:
        return self.verify is not None or self.expected_sha256 is not None


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


def cache_key(url: str) -> str:
    """
    The store key of an upstream URL: host, non-default port, path and
    query.  The scheme is left out so that ``http://host/x`` fetched
    through the proxy and ``https://host/x`` behind a mirror route share
    one entry (package repositories serve the same files on both).
    """
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{host}{parts.path or '/'}{query}"


def end_to_end_headers(headers: Headers) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, values in headers.getAllRawHeaders():
        lower = name.decode("latin-1").lower()
        if lower in HOP_BY_HOP:
            continue
        result[lower] = ", ".join(v.decode("latin-1") for v in values)
    return result


@define
class DownloadBody:
    """
    One client's view of a download in progress (a :class:`BodySource`).
    """

    download: Download
    fd: int

    def available(self) -> int:
        return self.download.received

    def finished(self) -> bool:
        return self.download.finished

    def failure(self) -> Failure | None:
        return self.download.failure

    def when_more(self, callback: Callable[[], None]) -> None:
        self.download.when_more(callback)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@define(eq=False)
class Download:
    """
    One upstream request in flight, shared by every client of its key.
    """

    log = Logger()

    request: UpstreamRequest
    store: Store
    received: int = 0
    finished: bool = False
    failure: Failure | None = None
    entry: Entry | None = None
    status: int = 0
    headers: dict[str, str] = Factory(dict)
    _writer: ObjectWriter | None = None
    _read_fd: int = -1
    _answered: bool = False
    _answer_waiters: list[Deferred[UpstreamAnswer]] = Factory(list)
    _more_waiters: list[Callable[[], None]] = Factory(list)
    _answer_failure: Failure | None = None

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
        if self._read_fd >= 0:
            body = DownloadBody(self, os.dup(self._read_fd))
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


class _BodyReceiver(Protocol):
    """
    Writes an upstream body to the download's file, resetting the idle
    timer on every chunk.
    """

    def __init__(self, fetcher: Fetcher, download: Download, done: Deferred[None]):
        self._fetcher = fetcher
        self._download = download
        self._done = done
        self._timer: IDelayedCall | None = None
        self._verifier = download.request.verify() if download.request.verify else None
        self.timed_out = False
        self.write_error: OSError | None = None
        self.verify_error: Exception | None = None
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self._arm()

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._fetcher.idle_timeout)
        else:
            self._timer = self._fetcher.clock.callLater(
                self._fetcher.idle_timeout, self._idle
            )

    def _idle(self) -> None:
        self.timed_out = True
        self._stop()

    def _stop(self) -> None:
        # The transport of a response body is a producer proxy.
        IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        download = self._download
        self._arm()
        writer = download._writer
        assert writer is not None
        if self.write_error is not None:
            return
        try:
            writer.write(data)
        except OSError as e:
            self.write_error = e
            self._stop()
            return
        if self._verifier is not None and self.verify_error is None:
            try:
                self._verifier.update(data)
            except Exception as e:
                self.verify_error = e
        download.received += len(data)
        download.store.counters.bytes_from_upstream += len(data)
        download._notify()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
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
    http: treq.client.HTTPClient
    clock: IReactorTime
    idle_timeout: float = 30.0
    activity: Activity | None = None
    _downloads: dict[str, Download] = Factory(dict)
    _idle_waiters: list[Deferred[None]] = Factory(list)

    def in_flight(self) -> int:
        return len(self._downloads)

    def when_idle(self) -> Deferred[None]:
        """
        Fires once no download is running (at once if none is).
        """
        idle: Deferred[None] = Deferred()
        if not self._downloads:
            idle.callback(None)
        else:
            self._idle_waiters.append(idle)
        return idle

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
        if download is None:
            download = Download(request, self.store)
            self._downloads[request.key] = download
            Deferred.fromCoroutine(self._run(download))
        return download.join()

    async def _run(self, download: Download) -> None:
        request = download.request
        try:
            await self._download(download)
        except Exception:
            failure = Failure()
            if not failure.check(UpstreamError, IntegrityError):
                self.log.failure("Download of {url} failed", failure, url=request.url)
            self._fail(download, failure)
        finally:
            del self._downloads[request.key]
            if download._read_fd >= 0:
                os.close(download._read_fd)
                download._read_fd = -1
            if not self._downloads:
                waiters, self._idle_waiters = self._idle_waiters, []
                for idle in waiters:
                    idle.callback(None)

    def _fail(self, download: Download, failure: Failure) -> None:
        if download._writer is not None:
            download._writer.abort()
        download.failure = failure
        download.finished = True
        if not download._answered:
            download._answer_failure = failure
            download._answer()
        download._notify()

    async def _download(self, download: Download) -> None:
        request = download.request
        requested = self.http.request(
            "GET",
            request.url,
            headers=Headers({k: [v] for k, v in request.headers.items()}),
            unbuffered=True,
            allow_redirects=request.follow_redirects,
        )
        timer = self.clock.callLater(self.idle_timeout, requested.cancel)
        started = self.clock.seconds()
        try:
            response = await requested
        except UpstreamError as e:
            self._report_failure(request.url, str(e))
            raise
        except CancelledError:
            self.log.warn("Upstream {url} did not answer in time", url=request.url)
            self._report_failure(request.url, "timeout")
            raise UpstreamTimeout(
                f"{request.url} did not answer within {self.idle_timeout:g}s"
            )
        except Exception as e:
            self.log.warn(
                "Upstream {url} failed: {error}", url=request.url, error=repr(e)
            )
            self._report_failure(request.url, str(e) or repr(e))
            raise UpstreamError(f"{request.url}: {e}") from e
        finally:
            if timer.active():
                timer.cancel()
        if self.activity is not None:
            if response.code >= 500:
                self.activity.upstream_failed(request.url, f"HTTP {response.code}")
            else:
                self.activity.upstream_succeeded(
                    request.url, self.clock.seconds() - started
                )
        download.status = response.code
        download.headers = end_to_end_headers(response.headers)
        download.headers.pop("content-length", None)
        if isinstance(response.length, int):
            download.headers["content-length"] = str(response.length)
        if response.code == 304:
            # Nothing to read; the caller serves its stored copy.
            response.deliverBody(Protocol())
            download.entry = self.store.mark_validated(
                request.key, _replayed(download.headers)
            )
            download.finished = True
            download._answer()
            return
        storable = request.storable(download.status, download.headers)
        download._writer = self.store.writer(request.key)
        download._read_fd = download._writer.reader_fd()
        if not request.holds_until_checked:
            download._answer()
        done: Deferred[None] = Deferred()
        receiver = _BodyReceiver(self, download, done)
        response.deliverBody(receiver)
        await done
        reason = receiver.reason
        assert reason is not None
        complete = reason.check(ResponseDone) is not None
        length = response.length if isinstance(response.length, int) else None
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
                f"{request.url} stalled for {self.idle_timeout:g}s after"
                f" {download.received} bytes"
            )
        if receiver.write_error is not None:
            raise receiver.write_error
        if not complete:
            self._report_failure(request.url, "body cut short")
            raise UpstreamError(
                f"{request.url} ended after {download.received} bytes:"
                f" {reason.getErrorMessage()}"
            )
        writer = download._writer
        if storable:
            try:
                receiver.verify()
                download.entry = writer.commit(
                    _replayed(download.headers),
                    expected_size=(
                        request.expected_size
                        if request.expected_size is not None
                        else length
                    ),
                    expected_sha256=request.expected_sha256,
                )
            except OSError:
                raise
            except Exception as e:
                writer.abort()
                self.log.error(
                    "Upstream {url} sent a body that fails its check;"
                    " not stored: {error}",
                    url=request.url,
                    error=str(e),
                )
                if isinstance(e, IntegrityError):
                    raise
                raise IntegrityError(str(e)) from e
        else:
            writer.abort()
        download.finished = True
        if request.holds_until_checked:
            download._answer()
        download._notify()


def _replayed(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k in REPLAYED_HEADERS}


class _NoCookies(DefaultCookiePolicy):
    """
    A shared cache must not carry one client's cookies into another's
    requests: accept none, send none.
    """

    def set_ok(self, cookie: Any, request: Any) -> bool:
        return False

    def return_ok(self, cookie: Any, request: Any) -> bool:
        return False


@implementer(IAgent)
@frozen
class _IdentityEncodingAgent:
    """
    Asks for bodies as stored on the upstream, and keeps treq's gzip
    decoder from unpacking one that comes encoded anyway: a ``.tar.gz``
    served with ``Content-Encoding: gzip`` is the archive itself, and
    unpacking it would break its digest.
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


def treq_client(agent: IAgent) -> treq.client.HTTPClient:
    """
    The treq client every upstream request goes through: bodies as the
    upstream stores them, and no cookie jar shared between clients.
    """
    return treq.client.HTTPClient(
        _IdentityEncodingAgent(agent),
        cookiejar=cast(Any, CookieJar(policy=_NoCookies())),
    )
