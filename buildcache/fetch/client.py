"""
The HTTP client every upstream request goes through, and what crosses
from an upstream response into the cache.

:func:`upstream_client` builds the :class:`UpstreamClient`: bodies streamed
as the upstream stores them (never decoded), redirects followed only when
asked, the operator's credentials added on their own origins only.
:func:`request_uri` encodes a URL as it goes on the wire; :func:`read_bounded`
reads a small body the client needs itself, bounded.
:data:`HOP_BY_HOP` and :data:`REPLAYED_HEADERS` say which response headers
describe the connection and which are kept with a stored body
(:func:`end_to_end_headers`, :func:`replayed`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, frozen
from hyperlink import EncodedURL
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import RedirectAgent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from buildcache.credentials import UpstreamCredentials
from buildcache.fetch.credentials import CredentialsAgent

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
        # A registry's: the digest a HEAD revalidation compares, a tag
        # list's next page, and which filters a referrers list applied.
        "docker-content-digest",
        "link",
        "oci-filters-applied",
    }
)


def end_to_end_headers(headers: Headers) -> dict[str, str]:
    result: dict[str, str] = {}
    for name, values in headers.getAllRawHeaders():
        lower = name.decode("latin-1").lower()
        if lower in HOP_BY_HOP:
            continue
        result[lower] = ", ".join(v.decode("latin-1") for v in values)
    return result


def replayed(headers: Mapping[str, str]) -> dict[str, str]:
    """
    The headers of ``headers`` kept with a stored body (see
    :data:`REPLAYED_HEADERS`).
    """
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

    :raises ValueError: ``url`` cannot be encoded (hyperlink's message).
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
        body: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """
        Send ``method`` for ``url``; bodies are always streamed
        (``unbuffered`` is accepted for treq's signature).  Without
        ``operator_credentials``, the credentials configured for upstreams
        are not added even on their origins.  ``body`` is the request's
        body, streamed from its producer (an upload to the shared tier);
        a request with a body follows no redirect (it could not be sent
        twice).

        :raises ValueError: ``url`` cannot be requested (see
            :func:`request_uri`), before any I/O.
        """
        uri = request_uri(url)
        agent: IAgent = self.agent
        if not operator_credentials and self.anonymous_agent is not None:
            agent = self.anonymous_agent
        if allow_redirects and body is None:
            # Twisted's RedirectAgent drops a client's Authorization and
            # Cookie headers when a redirect leaves the origin.
            agent = RedirectAgent(agent)
        return agent.request(
            method.encode("ascii").upper(), uri,
            headers.copy() if headers is not None else Headers(), body,
        )

    def get(self, url: str, **kwargs: Any) -> Deferred[IResponse]:
        return self.request("GET", url, **kwargs)


def upstream_client(
    agent: IAgent,
    credentials: UpstreamCredentials | None = None,
    authenticate: Callable[[IAgent], IAgent] | None = None,
) -> UpstreamClient:
    """
    The client every upstream request goes through: bodies as the upstream
    stores them (see :class:`_IdentityEncodingAgent`), and the operator's
    ``credentials`` added to requests for their own origins only.

    :param authenticate: wraps the agent that sends the operator's
        credentials in one that answers the upstream's authentication
        challenges, such as a registry's token flow.  It sits below the
        redirect handling, so it judges each hop of a redirect on its own
        URI.  Requests sent without the operator's credentials (a forward
        proxy client's own) never get its tokens either.
    """
    inner: IAgent = _IdentityEncodingAgent(agent)
    operator: IAgent = CredentialsAgent(inner, credentials) if credentials else inner
    if authenticate is not None:
        return UpstreamClient(authenticate(operator), inner)
    if credentials:
        return UpstreamClient(operator, inner)
    return UpstreamClient(inner)


class _Collect(Protocol):
    """
    Reads a response body up to ``limit`` bytes, then stops the transfer
    (the connection is closed rather than read on).
    """

    def __init__(self, limit: int, done: Deferred[tuple[bytes, bool]]) -> None:
        self.limit = limit
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0
        self.complete = True

    def dataReceived(self, data: bytes) -> None:
        if not self.complete:
            return
        if self.size + len(data) > self.limit:
            self.parts.append(data[: self.limit - self.size])
            self.size = self.limit
            self.complete = False
            if self.transport is not None:
                IPushProducer(self.transport).stopProducing()
            return
        self.parts.append(data)
        self.size += len(data)

    def connectionLost(self, reason: Failure = ResponseDone()) -> None:  # type: ignore[assignment]
        complete = self.complete and reason.check(ResponseDone, PotentialDataLoss) is not None
        if not self.done.called:
            self.done.callback((b"".join(self.parts), complete))


def read_bounded(response: IResponse, limit: int) -> Deferred[tuple[bytes, bool]]:
    """
    ``response``'s body, at most ``limit`` bytes, and whether it is all of
    it: for the small bodies the client reads itself (an authentication
    exchange), which would otherwise wait in memory, unbounded, until read.
    Cancelling stops the transfer.
    """
    collector: _Collect

    def cancel(_: Deferred[tuple[bytes, bool]]) -> None:
        if collector.transport is not None:
            IPushProducer(collector.transport).stopProducing()

    done: Deferred[tuple[bytes, bool]] = Deferred(cancel)
    collector = _Collect(limit, done)
    response.deliverBody(collector)
    return done


@implementer(IPushProducer)
class _Done:
    """
    The transport of a body delivered at once: nothing to pause or stop.
    """

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IResponse)
@define(eq=False)
class ReadResponse:
    """
    A response whose body was already read (see :func:`read_bounded`),
    passed on after all: a ``401`` an authenticating agent tried to answer,
    say.  A body cut at the limit ends with :class:`PotentialDataLoss`.
    """

    version: tuple[bytes, int, int]
    code: int
    phrase: bytes
    headers: Headers
    request: Any
    length: int | object
    body: bytes
    complete: bool
    previousResponse: IResponse | None = None

    @classmethod
    def of(cls, response: IResponse, body: bytes, complete: bool) -> ReadResponse:
        length = len(body) if complete else UNKNOWN_LENGTH
        return cls(
            response.version, response.code, response.phrase, response.headers,
            response.request, length, body, complete,
        )

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(_Done())
        if self.body:
            protocol.dataReceived(self.body)
        reason = ResponseDone() if self.complete else PotentialDataLoss()
        protocol.connectionLost(Failure(reason))
