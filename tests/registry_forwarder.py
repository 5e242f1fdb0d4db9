"""
A counting HTTP forwarder in front of one loopback origin (the tests'
``docker-registry``): every request it receives is counted by method and
path before it goes on, so the tests can say how many upstream GETs each
blob cost; bodies stream with back-pressure, optionally at a fixed rate
(a slow line).
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

reactor: Any = _reactor


def require_loopback(location: str) -> None:
    """Refuse a URL or ``host[:port][/path]`` that is not on loopback."""
    if "://" not in location:
        location = "//" + location
    host = urlsplit(location).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"not a loopback location: {location!r}")

#: Hop-by-hop headers, not forwarded either way.
_HOP_BY_HOP = {
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"host", b"content-length",
}


@frozen
class Seen:
    """One request a :class:`CountingForwarder` received."""

    method: str
    uri: str
    headers: dict[str, str]

    @property
    def path(self) -> str:
        return self.uri.split("?", 1)[0]


class _Throttled:
    """
    Pauses the upstream body while the client's transport is full and while
    more than ``rate`` bytes per second have been sent (``rate`` None: no
    limit).
    """

    def __init__(self, upstream: IPushProducer, rate: int | None) -> None:
        self.upstream = upstream
        self.rate = rate
        self.client_paused = False
        self.throttle: IDelayedCall | None = None
        self.started = reactor.seconds()
        self.sent = 0

    def _update(self) -> None:
        if self.client_paused or self.throttle is not None:
            self.upstream.pauseProducing()
        else:
            self.upstream.resumeProducing()

    def pauseProducing(self) -> None:
        self.client_paused = True
        self._update()

    def resumeProducing(self) -> None:
        self.client_paused = False
        self._update()

    def stopProducing(self) -> None:
        if self.throttle is not None and self.throttle.active():
            self.throttle.cancel()
        self.upstream.stopProducing()

    def count(self, n: int) -> None:
        if self.rate is None:
            return
        self.sent += n
        ahead = self.sent / self.rate - (reactor.seconds() - self.started)
        if ahead > 0.01 and self.throttle is None:
            self.throttle = reactor.callLater(ahead, self._release)
            self._update()

    def _release(self) -> None:
        self.throttle = None
        self._update()


class _Relay(Protocol):
    def __init__(self, request: Request, rate: int | None, done: Deferred[None]) -> None:
        self.request = request
        self.rate = rate
        self.done = done
        self.producer: _Throttled | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.producer = _Throttled(self.transport, self.rate)  # type: ignore[arg-type]
        self.request.registerProducer(self.producer, True)

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)
        assert self.producer is not None
        self.producer.count(len(data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self.producer is not None and self.producer.throttle is not None:
            if self.producer.throttle.active():
                self.producer.throttle.cancel()
        self.request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            self.request.finish()
        else:
            # The origin's body broke: so does the client's.
            self.request.loseConnection()
        self.done.callback(None)


@define(eq=False)
class CountingForwarder(Resource):
    """
    An HTTP forwarder in front of one origin (``docker-registry``) that
    counts what it received: every request is recorded (``seen``, bounded)
    and counted by ``(method, path)`` before it goes on, so a count read
    after a client finished is final.  Streams bodies with back-pressure;
    ``rate`` (bytes per second, per response) stands for a slow line.
    When the origin cannot be reached it answers 502.
    """

    isLeaf = True
    origin: str
    rate: int | None = None
    limit: int = 10_000
    counts: Counter[tuple[str, str]] = field(factory=Counter)
    seen: list[Seen] = field(factory=list)
    pool: HTTPConnectionPool = field(init=False)
    port: IListeningPort | None = None

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)
        require_loopback(self.origin)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 16

    def listen(self, testcase: Any | None = None) -> str:
        """Listen on a free loopback port; return its ``host:port``."""
        self.port = reactor.listenTCP(0, Site(self), interface="127.0.0.1")
        if testcase is not None:
            testcase.addCleanup(self.close)
        return self.authority

    @property
    def authority(self) -> str:
        assert self.port is not None
        return f"127.0.0.1:{self.port.getHost().port}"  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        return f"http://{self.authority}"

    async def close(self) -> None:
        if self.port is not None:
            stopped = self.port.stopListening()
            if stopped is not None:
                await stopped
        await self.pool.closeCachedConnections()

    def gets(self, suffix: str, method: str = "GET") -> int:
        """Requests with ``method`` whose path ends with ``suffix``."""
        return sum(n for (m, p), n in self.counts.items() if m == method and p.endswith(suffix))

    def blob_gets(self) -> Counter[str]:
        """Upstream GETs per blob digest."""
        found: Counter[str] = Counter()
        for (method, path), n in self.counts.items():
            if method == "GET" and "/blobs/" in path:
                found[path.rsplit("/", 1)[1]] += n
        return found

    def render(self, request: Request) -> object:  # type: ignore[override]
        method = request.method.decode()
        uri = request.uri.decode()
        headers = {
            name.decode().lower(): b", ".join(values).decode()
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        seen = Seen(method, uri, headers)
        self.counts[(method, seen.path)] += 1
        if len(self.seen) < self.limit:
            self.seen.append(seen)
        Deferred.fromCoroutine(self._forward(request))
        return NOT_DONE_YET

    async def _forward(self, request: Request) -> None:
        outgoing = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _HOP_BY_HOP:
                outgoing.setRawHeaders(name, values)
        body = None
        if request.method not in (b"GET", b"HEAD"):

            assert request.content is not None
            body = FileBodyProducer(request.content)
        agent = Agent(reactor, pool=self.pool)
        try:
            response: IResponse = await agent.request(
                request.method, self.origin.encode() + request.uri, outgoing, body
            )
        except Exception as error:
            request.setResponseCode(502)
            request.setHeader(b"content-type", b"text/plain")
            request.write(f"forwarder: origin unreachable: {error}\n".encode())
            request.finish()
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _HOP_BY_HOP:
                request.responseHeaders.setRawHeaders(name, values)
        if request.method == b"HEAD":
            # A HEAD's length is the one the origin declared.
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                request.setHeader(b"content-length", length[0])
        elif isinstance(response.length, int):
            request.setHeader(b"content-length", str(response.length).encode())
        done: Deferred[None] = Deferred()
        response.deliverBody(_Relay(request, self.rate, done))
        await done

