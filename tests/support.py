"""
Shared test support: in-process upstreams that misbehave on cue, real
TCP listeners on 127.0.0.1, and HTTP clients that report exactly what they
received (status, headers, bytes, and whether the body ended cleanly).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from attrs import Factory, define, field
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ProxyAgent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from buildcache.store import BlockingRunner

reactor = _reactor


def pattern_bytes(size: int, seed: bytes = b"") -> bytes:
    """
    ``size`` deterministic, incompressible-looking bytes.
    """
    block = b"".join(
        hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048)
    )
    repeats, rest = divmod(size, len(block))
    return block * repeats + block[:rest]


def listen(resource: Resource, interface: str = "127.0.0.1") -> IListeningPort:
    port: IListeningPort = reactor.listenTCP(0, Site(resource), interface=interface)
    return port


def url_of(port: IListeningPort, path: str = "/") -> str:
    address = port.getHost()
    return f"http://{address.host}:{address.port}{path}"


@define
class GatedBody:
    """
    A body that an upstream sends in two parts: ``before_gate`` bytes, then
    the rest once ``gate`` fires.  ``cut_at`` closes the connection after
    that many bytes instead of sending the rest.
    """

    data: bytes
    before_gate: int = 0
    gate: Deferred[None] | None = None
    cut_at: int | None = None
    headers: Mapping[str, str] = Factory(dict)
    send_length: bool = True


@define
class FakeUpstream(Resource):
    """
    Serves :class:`GatedBody` objects by path and counts requests.
    """

    isLeaf = True
    bodies: dict[str, GatedBody] = Factory(dict)
    requests: Counter[str] = Factory(Counter)
    seen_headers: list[Headers] = Factory(list)
    status_override: int | None = None
    sent_everything: dict[str, int] = Factory(dict)
    active: list[IRequest] = Factory(list)

    def __attrs_post_init__(self) -> None:
        Resource.__init__(self)

    def render(self, request: IRequest) -> object:
        path = request.uri.decode()
        self.requests[path] += 1
        self.active.append(request)
        self.seen_headers.append(request.requestHeaders)
        if self.status_override is not None:
            request.setResponseCode(self.status_override)
            return b"upstream failure\n"
        body = self.bodies.get(path)
        if body is None:
            request.setResponseCode(404)
            return b"not here\n"
        for name, value in body.headers.items():
            request.setHeader(name, value)
        if body.send_length:
            request.setHeader("content-length", str(len(body.data)))
        first = body.data[: body.before_gate] if body.gate else body.data
        if body.cut_at is not None:
            request.write(body.data[: body.cut_at])
            request.loseConnection()
            return NOT_DONE_YET
        request.write(first)
        if body.gate is None:
            self.sent_everything[path] = self.sent_everything.get(path, 0) + 1
            request.finish()
            return NOT_DONE_YET

        lost: list[object] = []
        request.notifyFinish().addErrback(lost.append)

        def rest(_: object) -> None:
            if lost:
                return
            request.write(body.data[body.before_gate:])
            self.sent_everything[path] = self.sent_everything.get(path, 0) + 1
            request.finish()

        body.gate.addCallback(rest)
        return NOT_DONE_YET


@define
class Received:
    """
    What a client got: ``complete`` is False when the body ended in an
    error (short Content-Length, cut chunked body), which is how a client
    learns that a response was not whole.
    """

    status: int
    headers: Headers
    body: bytes
    complete: bool
    error: Failure | None = None

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


class _Collector(Protocol):
    def __init__(self, done: Deferred[tuple[bytes, Failure]], first: Deferred[None] | None):
        self._chunks: list[bytes] = []
        self._done = done
        self._first = first

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)
        if self._first is not None:
            first, self._first = self._first, None
            first.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._done.callback((b"".join(self._chunks), reason))


@define
class Client:
    """
    An HTTP client on the real reactor, direct or through a proxy port.
    """

    proxy_port: int | None = None
    persistent: bool = False
    pool: HTTPConnectionPool = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.pool = HTTPConnectionPool(reactor, persistent=self.persistent)

    def agent(self) -> Agent | ProxyAgent:
        if self.proxy_port is None:
            return Agent(reactor, pool=self.pool)
        return ProxyAgent(
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), pool=self.pool
        )

    async def get(
        self,
        url: str,
        headers: Mapping[str, str] | None = None,
        method: bytes = b"GET",
        first_bytes: Deferred[None] | None = None,
    ) -> Received:
        raw = Headers({k: [v] for k, v in (headers or {}).items()})
        response = await self.agent().request(method, url.encode(), raw)
        done: Deferred[tuple[bytes, Failure]] = Deferred()
        response.deliverBody(_Collector(done, first_bytes))
        body, reason = await done
        complete = reason.check(ResponseDone) is not None
        return Received(
            response.code, response.headers, body, complete,
            None if complete else reason,
        )

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


class HeldRunner:
    """
    A store's ``run_blocking`` that keeps every call until the test runs
    it: the window in which a checked body is served but not yet stored.
    """

    def __init__(self, holding: bool = True) -> None:
        self.calls: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        #: Whether calls are kept; if not, each runs at once.
        self.holding = holding

    def __call__(self, call: Callable[[], Any]) -> Deferred[Any]:
        done: Deferred[Any] = Deferred()
        self.calls.append((call, done))
        if not self.holding:
            self.run_all()
        return done

    def run_next(self) -> None:
        call, done = self.calls.pop(0)
        try:
            result = call()
        except BaseException:
            done.errback()
        else:
            done.callback(result)

    def run_all(self) -> None:
        while self.calls:
            self.run_next()


def stop_all(ports: Iterable[IListeningPort]) -> Deferred[object]:
    from twisted.internet.defer import gatherResults

    return gatherResults([Deferred.fromCoroutine(_stop(p)) for p in ports])


async def _stop(port: IListeningPort) -> None:
    await port.stopListening()


@define
class Running:
    """
    A buildcache server built from a Config, listening on 127.0.0.1.
    """

    server: Any
    store: Any
    proxy_port: int
    index_port: int
    upstream: FakeUpstream | None = None


def start_server(
    testcase: object, config_changes: Mapping[str, object] | None = None,
    upstream: Resource | None = None,
    run_blocking: BlockingRunner | None = None,
) -> Running:
    """
    Build a server on a fresh cache directory with the upstream (if any)
    behind a mirror route named ``up``, listen on port 0, and register
    clean-up on ``testcase`` (a trial TestCase).  The store runs its
    blocking calls with ``run_blocking`` (by default at once).
    """
    from buildcache.config import Config, Mirror
    from buildcache.service import Server
    from buildcache.store import Store

    changes = dict(config_changes or {})
    mirrors = list(changes.pop("mirrors", ()))
    up_port = None
    if upstream is not None:
        up_port = listen(upstream)
        testcase.addCleanup(up_port.stopListening)  # type: ignore[attr-defined]
        mirrors.append(Mirror("up", url_of(up_port).rstrip("/")))
    cache_dir = testcase.mktemp()  # type: ignore[attr-defined]
    config = Config(cache_dir=cache_dir, mirrors=tuple(mirrors), **changes)  # type: ignore[arg-type]
    store = Store.open(
        config.cache_dir, config.max_size, reactor, run_blocking,
        max_object_size=config.max_object_size,
    )
    server = Server.build(config, reactor, store)
    port = reactor.listenTCP(0, server.proxy_site, interface="127.0.0.1")
    index_port = reactor.listenTCP(0, server.index_site, interface="127.0.0.1")
    server.index_listening(index_port)

    async def shut() -> None:
        await port.stopListening()
        await index_port.stopListening()
        await server.pool.closeCachedConnections()
        store.close()

    testcase.addCleanup(lambda: Deferred.fromCoroutine(shut()))  # type: ignore[attr-defined]
    return Running(server, store, port.getHost().port, index_port.getHost().port,
                   upstream if isinstance(upstream, FakeUpstream) else None)


@define(eq=False)
class ChildProcess(ProcessProtocol):
    """A child process whose output can be awaited for a marker."""

    name: str = "child"
    output: bytearray = field(factory=bytearray)
    ended: Deferred[None] = field(factory=Deferred)
    #: Why it ended, once it has.
    reason: Failure | None = None
    _waiting: list[tuple[bytes, Deferred[None]]] = field(factory=list)

    def wait_for(self, text: bytes) -> Deferred[None]:
        found: Deferred[None] = Deferred()
        self._waiting.append((text, found))
        self._check()
        return found

    def _check(self) -> None:
        for item in list(self._waiting):
            if item[0] in self.output:
                self._waiting.remove(item)
                item[1].callback(None)

    def outReceived(self, data: bytes) -> None:
        # Bounded: keep the start and the last 256 KB.
        self.output += data
        if len(self.output) > 512 * 1024:
            del self.output[64 * 1024:len(self.output) - 256 * 1024]
        self._check()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        for text, found in self._waiting:
            found.errback(AssertionError(
                f"{self.name} ended before printing {text!r}:\n"
                + self.output.decode(errors="replace")[-3000:]
            ))
        self._waiting.clear()
        # A Failure given to callback() would become an errback.
        self.reason = reason
        self.ended.callback(None)

    def stop(self) -> Deferred[None]:
        """SIGTERM to this child (by its PID, through its transport)."""
        if self.ended.called:
            return succeed(None)
        assert self.transport is not None
        self.transport.signalProcess("TERM")
        return self.ended
