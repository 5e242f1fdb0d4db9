"""
Sending one request upstream, or to the shared tier, and waiting (up to
the idle timeout) for its response head: :class:`Sender`, which also tells
the activity how each upstream answered.  The fetcher
(:mod:`buildcache.fetch.fetcher`) reads the bodies.
"""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from buildcache.credentials import redact
from buildcache.fetch.client import UpstreamClient
from buildcache.fetch.errors import UpstreamError, UpstreamTimeout
from buildcache.fetch.events import FetchObserver
from buildcache.fetch.headlimit import head_too_large
from buildcache.fetch.request import UpstreamRequest
from buildcache.fetch.shared import SharedCopy

__all__ = ["Sender"]


@frozen
class Sender:
    """
    Sends requests with ``http`` and waits for their response heads.
    """

    log = Logger()

    http: UpstreamClient
    clock: IReactorTime
    idle_timeout: float
    activity: FetchObserver | None = None

    def report_failure(self, url: str, error: str) -> None:
        if self.activity is not None:
            self.activity.upstream_failed(url, error)

    async def send(self, method: str, request: UpstreamRequest) -> IResponse:
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
            self.report_failure(request.url, str(e) or repr(e))
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
                self.report_failure(request.url, str(e))
            raise
        except Exception as e:
            if head_too_large(e):
                self.report_failure(request.url, "response head too large")
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
                self.report_failure(request.url, str(e) or repr(e))
                raise UpstreamError(f"{redact(request.url)}: {e}") from e
            self.log.warn("Upstream {url} did not answer in time", url=redact(request.url))
            self.report_failure(request.url, "timeout")
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
                " credentials configured for it (in its URL, --netrc or --registry-auth)",
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

    async def send_copy(self, copy: SharedCopy, timeout: float) -> IResponse:
        """
        GET ``copy`` from the object store, waiting up to ``timeout``
        seconds for the response head; fails with :class:`UpstreamError`, which
        names the object, never its (signed) URL.
        """
        requested = self.http.request(
            "GET", copy.url, headers=Headers(), unbuffered=True,
            allow_redirects=False, operator_credentials=False,
        )
        timer = self.clock.callLater(timeout, requested.cancel)
        try:
            return await requested
        except Exception as e:
            raise UpstreamError(
                f"cannot read {copy.name} from the shared tier: {type(e).__name__}"
            ) from None
        finally:
            if timer.active():
                timer.cancel()
