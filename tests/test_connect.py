"""
Tests for buildcache.fetch.connect: the upstream connection guard.

Real TCP only on 127.0.0.0/8 listeners; names are resolved by a fake
resolver, and anything that would leave this machine runs on a
MemoryReactor, which connects nowhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from attrs import Factory as AttrsFactory
from attrs import define
from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from buildcache.access import AccessPolicy
from buildcache.fetch.connect import (
    GuardedEndpointFactory,
    GuardedTCPEndpoint,
    TargetRefused,
    connect_tcp,
    make_http_client,
    upstream_pool,
)
from buildcache.fetch.fetcher import UpstreamError, UpstreamTimeout

#: The global reactor, typed loosely: its zope interfaces are opaque to mypy.
reactor: Any = _reactor


@define
class FakeResolver:
    """
    An IHostnameResolver answering from a table; ``hang`` names never
    complete.  Records every name asked for.
    """

    table: Mapping[str, Sequence[str]] = AttrsFactory(dict)
    hang: frozenset[str] = frozenset()
    asked: list[str] = AttrsFactory(list)

    def resolveHostName(
        self,
        resolutionReceiver: object,
        hostName: str,
        portNumber: int = 0,
        addressTypes: object = None,
        transportSemantics: str = "TCP",
    ) -> object:
        self.asked.append(hostName)
        receiver: Any = resolutionReceiver
        receiver.resolutionBegan(None)
        if hostName in self.hang:
            return None
        for address in self.table.get(hostName, ()):
            if ":" in address:
                resolved: object = IPv6Address("TCP", address, portNumber)
            else:
                resolved = IPv4Address("TCP", address, portNumber)
            receiver.addressResolved(resolved)
        receiver.resolutionComplete()
        return None


class Listener(WrappingFactory):
    """
    Wraps a server factory to count the connections it accepted and to
    close them all at the end of a test.
    """

    def __init__(self, wrapped: Any):
        super().__init__(wrapped)
        self.accepted = 0
        self._accept_waiters: list[tuple[int, Deferred[None]]] = []
        self._idle_waiters: list[Deferred[None]] = []

    def registerProtocol(self, p: object) -> None:
        super().registerProtocol(p)
        self.accepted += 1
        waiting, self._accept_waiters = self._accept_waiters, []
        for count, d in waiting:
            if self.accepted >= count:
                d.callback(None)
            else:
                self._accept_waiters.append((count, d))

    def unregisterProtocol(self, p: object) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._idle_waiters = self._idle_waiters, []
            for d in waiting:
                d.callback(None)

    def until_accepted(self, count: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.accepted >= count:
            d.callback(None)
        else:
            self._accept_waiters.append((count, d))
        return d

    def close_all(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if not self.protocols:
            d.callback(None)
            return d
        self._idle_waiters.append(d)
        for protocol in list(self.protocols):
            protocol.transport.abortConnection()
        return d


class Sink(Protocol):
    """Keeps whatever it receives; answers nothing."""

    def __init__(self) -> None:
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"hello from upstream"


class ConnectedClient(Protocol):
    """A client that notes when its connection ends."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    @property
    def tcp(self) -> Any:
        """The TCP transport."""
        return self.transport

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost.callback(None)


def client_factory() -> Factory[ConnectedClient]:
    return Factory.forProtocol(ConnectedClient)


async def close_client(protocol: ConnectedClient) -> None:
    if not protocol.lost.called:
        protocol.tcp.abortConnection()
    await protocol.lost


class GuardTestCase(TestCase):
    """Real TCP helpers: listeners that count, guarded client connections."""

    # A broken guard or tunnel would leave a test waiting for bytes.
    timeout = 15

    def listen(self, factory: Any, interface: str) -> tuple[Listener, Any]:
        listener = Listener(factory)
        port = reactor.listenTCP(0, listener, interface=interface)

        async def cleanup() -> None:
            await port.stopListening()
            await listener.close_all()

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        return listener, port

    def port_of(self, listening: Any) -> int:
        port: int = listening.getHost().port
        return port

    async def connect_guarded(
        self,
        policy: AccessPolicy,
        host: str,
        port: int,
        resolver: FakeResolver | None = None,
    ) -> ConnectedClient:
        protocol = await connect_tcp(
            reactor,
            policy,
            host,
            port,
            client_factory(),
            5.0,
            resolver if resolver is not None else FakeResolver(),
        )
        assert isinstance(protocol, ConnectedClient)
        self.addCleanup(lambda: Deferred.fromCoroutine(close_client(protocol)))
        return protocol

    async def settle(self, listener: Listener, port: Any, policy: AccessPolicy) -> None:
        """
        Open one allowed connection to the listener and wait until it was
        accepted: a connection attempted before it would have been
        accepted first, so a count of exactly one afterwards proves no
        refused connection got through.
        """
        before = listener.accepted
        host = port.getHost().host
        await self.connect_guarded(policy, host, self.port_of(port))
        await listener.until_accepted(before + 1)


def sink_factory() -> Factory[Sink]:
    return ServerFactory.forProtocol(Sink)


class GuardOverRealTCPTests(GuardTestCase):
    """
    The guard against listeners on 127.0.0.1 and 127.0.0.2.
    """

    async def test_loopback_refused_by_default(self) -> None:
        """
        With the default policy, 127.0.0.2 is refused and the listener
        there never sees a connection.
        """
        listener, port = self.listen(sink_factory(), "127.0.0.2")
        with self.assertRaises(TargetRefused) as caught:
            await self.connect_guarded(AccessPolicy(), "127.0.0.2", self.port_of(port))
        self.assertEqual(caught.exception.address, "127.0.0.2")
        self.assertIn("loopback", caught.exception.reason)
        self.assertIn("127.0.0.2", str(caught.exception))
        self.assertIsInstance(caught.exception, UpstreamError)
        await self.settle(listener, port, AccessPolicy(allow_upstream=["127.0.0.2"]))
        self.assertEqual(listener.accepted, 1)

    async def test_loopback_allowed_by_pattern(self) -> None:
        listener, port = self.listen(sink_factory(), "127.0.0.1")
        protocol = await self.connect_guarded(
            AccessPolicy(allow_upstream=["127.0.0.0/8"]), "127.0.0.1", self.port_of(port)
        )
        peer = protocol.tcp.getPeer()
        self.assertEqual((peer.host, peer.port), ("127.0.0.1", self.port_of(port)))
        await listener.until_accepted(1)

    async def test_pattern_for_another_port_does_not_allow(self) -> None:
        listener, port = self.listen(sink_factory(), "127.0.0.1")
        with self.assertRaises(TargetRefused):
            await self.connect_guarded(
                AccessPolicy(allow_upstream=[f"127.0.0.1:{self.port_of(port) + 1}"]),
                "127.0.0.1",
                self.port_of(port),
            )
        await self.settle(listener, port, AccessPolicy(allow_upstream=["127.0.0.1"]))
        self.assertEqual(listener.accepted, 1)

    async def test_ip_literal_needs_no_lookup(self) -> None:
        listener, port = self.listen(sink_factory(), "127.0.0.1")
        resolver = FakeResolver()
        await self.connect_guarded(
            AccessPolicy(allow_upstream=["127.0.0.1"]), "127.0.0.1", self.port_of(port), resolver
        )
        self.assertEqual(resolver.asked, [])

    async def test_name_resolving_to_loopback_refused(self) -> None:
        """
        A name that resolves to a loopback address is refused: the address
        is judged, not the name.
        """
        listener, port = self.listen(sink_factory(), "127.0.0.2")
        resolver = FakeResolver({"mirror.example": ["127.0.0.2"]})
        with self.assertRaises(TargetRefused) as caught:
            await self.connect_guarded(
                AccessPolicy(), "mirror.example", self.port_of(port), resolver
            )
        self.assertEqual(resolver.asked, ["mirror.example"])
        self.assertEqual(caught.exception.host, "mirror.example")
        self.assertEqual(caught.exception.address, "127.0.0.2")
        await self.settle(listener, port, AccessPolicy(allow_upstream=["127.0.0.2"]))
        self.assertEqual(listener.accepted, 1)

    async def test_name_allowed_by_pattern_connects_to_resolved_address(self) -> None:
        listener, port = self.listen(sink_factory(), "127.0.0.2")
        resolver = FakeResolver({"mirror.example": ["127.0.0.2"]})
        protocol = await self.connect_guarded(
            AccessPolicy(allow_upstream=["mirror.example"]),
            "mirror.example",
            self.port_of(port),
            resolver,
        )
        self.assertEqual(protocol.tcp.getPeer().host, "127.0.0.2")
        await listener.until_accepted(1)

    async def test_name_outside_allow_upstream_is_never_resolved(self) -> None:
        resolver = FakeResolver({"other.example": ["127.0.0.1"]})
        with self.assertRaises(TargetRefused) as caught:
            await self.connect_guarded(
                AccessPolicy(allow_upstream=["mirror.example"]), "other.example", 80, resolver
            )
        self.assertIsNone(caught.exception.address)
        self.assertIn("--allow-upstream", caught.exception.reason)
        self.assertEqual(resolver.asked, [])

    async def test_refused_connection_is_upstream_error(self) -> None:
        closed = reactor.listenTCP(0, sink_factory(), interface="127.0.0.1")
        number = self.port_of(closed)
        await closed.stopListening()
        with self.assertRaises(UpstreamError) as caught:
            await self.connect_guarded(
                AccessPolicy(allow_upstream=["127.0.0.1"]), "127.0.0.1", number
            )
        self.assertNotIsInstance(caught.exception, TargetRefused)
        self.assertIn(f"127.0.0.1:{number}", str(caught.exception))

    async def test_unresolvable_name(self) -> None:
        with self.assertRaises(UpstreamError) as caught:
            await self.connect_guarded(AccessPolicy(), "nowhere.example", 80, FakeResolver())
        self.assertNotIsInstance(caught.exception, TargetRefused)
        self.assertIn("nowhere.example", str(caught.exception))


class HTTPClientTests(GuardTestCase):
    """
    make_http_client: a client whose connections are guarded.
    """

    async def test_refusal_reaches_caller_as_target_refused(self) -> None:
        listener, port = self.listen(Site(Hello()), "127.0.0.1")
        client = make_http_client(reactor, AccessPolicy(), 5.0, persistent=False)
        with self.assertRaises(TargetRefused):
            await client.get(f"http://127.0.0.1:{self.port_of(port)}/")
        await self.settle(listener, port, AccessPolicy(allow_upstream=["127.0.0.1"]))
        self.assertEqual(listener.accepted, 1)

    async def test_allowed_fetch_reuses_connection(self) -> None:
        listener, port = self.listen(Site(Hello()), "127.0.0.1")
        pool = upstream_pool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        client = make_http_client(
            reactor, AccessPolicy(allow_upstream=["127.0.0.1"]), 5.0, pool=pool
        )
        url = f"http://127.0.0.1:{self.port_of(port)}/"
        for _ in range(2):
            response = await client.get(url)
            self.assertEqual(await readBody(response), b"hello from upstream")
        self.assertEqual(listener.accepted, 1)
        self.assertEqual(pool.maxPersistentPerHost, 8)

    async def test_upstream_connections_are_not_logged(self) -> None:
        """
        The pool's per-connection client factories are quiet: no "Starting
        factory" line for each upstream connection.
        """
        listener, port = self.listen(Site(Hello()), "127.0.0.1")
        client = make_http_client(
            reactor, AccessPolicy(allow_upstream=["127.0.0.1"]), 5.0, persistent=False
        )
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        response = await client.get(f"http://127.0.0.1:{self.port_of(port)}/")
        self.assertEqual(await readBody(response), b"hello from upstream")
        self.assertEqual(listener.accepted, 1)
        self.assertEqual(
            [e for e in events if "factory" in str(e.get("log_format", "")).lower()], []
        )

    async def test_configured_upstream_allowed_implicitly(self) -> None:
        listener, port = self.listen(Site(Hello()), "127.0.0.1")
        url = f"http://127.0.0.1:{self.port_of(port)}/"
        policy = AccessPolicy.from_config(
            allow_from=["127.0.0.0/8"], allow_upstream=[], upstream_urls=[url]
        )
        client = make_http_client(reactor, policy, 5.0, persistent=False)
        response = await client.get(url)
        self.assertEqual(await readBody(response), b"hello from upstream")
        self.assertEqual(listener.accepted, 1)


@define
class RecordingTLSPolicy:
    calls: list[tuple[bytes, int]] = AttrsFactory(list)

    def creatorForNetloc(self, hostname: bytes, port: int) -> object:
        self.calls.append((hostname, port))
        return optionsForClientTLS(hostname.decode("ascii"))


class EndpointFactoryTests(SynchronousTestCase):
    """
    The endpoint factory on a MemoryReactor: nothing leaves the process.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resolver = FakeResolver(
            {
                "mirror.example": ["203.0.113.7"],
                "mixed.example": ["127.0.0.1", "::1", "10.1.2.3", "44.0.0.1"],
                "slow.example": [],
            },
            hang=frozenset({"slow.example"}),
        )

    def factory(self, policy: AccessPolicy, tls: RecordingTLSPolicy | None = None) -> GuardedEndpointFactory:
        return GuardedEndpointFactory(
            self.reactor,
            policy,
            7.0,
            tls if tls is not None else RecordingTLSPolicy(),
            self.resolver,
        )

    def test_http_uri_gives_guarded_endpoint(self) -> None:
        endpoint = self.factory(AccessPolicy()).endpointForURI(
            URI.fromBytes(b"http://mirror.example:8080/x")
        )
        self.assertIsInstance(endpoint, GuardedTCPEndpoint)
        self.assertEqual((endpoint.host, endpoint.port, endpoint.timeout), ("mirror.example", 8080, 7.0))

    def test_ipv6_literal_uri(self) -> None:
        endpoint = self.factory(AccessPolicy()).endpointForURI(
            URI.fromBytes(b"http://[::1]:8080/x")
        )
        self.assertEqual((endpoint.host, endpoint.port), ("::1", 8080))
        failure = self.failureResultOf(endpoint.connect(client_factory()), TargetRefused)
        self.assertEqual(failure.value.address, "::1")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_https_uri_speaks_tls_from_the_policy_over_the_guard(self) -> None:
        """
        https goes through the guarded TCP endpoint (so the address is
        checked) and then TLS with the creator the TLS policy gave for the
        host: the first bytes on the wire are a ClientHello naming it.
        """
        tls = RecordingTLSPolicy()
        endpoint = self.factory(
            AccessPolicy(allow_upstream=["mirror.example"]), tls
        ).endpointForURI(URI.fromBytes(b"https://mirror.example/simple/"))
        self.assertEqual(tls.calls, [(b"mirror.example", 443)])
        connecting = endpoint.connect(client_factory())
        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("203.0.113.7", 443, 7.0))
        wire = StringTransport()
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        assert protocol is not None
        protocol.makeConnection(wire)
        hello = wire.value()
        self.assertEqual(hello[:1], b"\x16")  # TLS handshake record
        self.assertIn(b"mirror.example", hello)  # SNI
        self.assertIsInstance(self.successResultOf(connecting), ConnectedClient)

    def test_https_refused_address_never_connects(self) -> None:
        endpoint = self.factory(AccessPolicy()).endpointForURI(
            URI.fromBytes(b"https://mirror.example/")
        )
        failure = self.failureResultOf(endpoint.connect(client_factory()), TargetRefused)
        self.assertEqual(failure.value.address, "203.0.113.7")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_unsupported_scheme(self) -> None:
        from twisted.web.error import SchemeNotSupported

        with self.assertRaises(SchemeNotSupported):
            self.factory(AccessPolicy()).endpointForURI(URI.fromBytes(b"ftp://mirror.example/"))

    def test_connects_only_to_allowed_addresses(self) -> None:
        """
        Of loopback, private and public answers, only the public one is
        connected to under the default policy.
        """
        endpoint = self.factory(AccessPolicy()).endpointForURI(
            URI.fromBytes(b"http://mixed.example/")
        )
        connecting = endpoint.connect(client_factory())
        self.assertEqual(
            [(host, port) for host, port, *_ in self.reactor.tcpClients],
            [("44.0.0.1", 80)],
        )
        connecting.cancel()
        self.failureResultOf(connecting)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_all_addresses_refused_names_them(self) -> None:
        policy = AccessPolicy()
        endpoint = GuardedTCPEndpoint(
            self.reactor,
            FakeResolver({"inside.example": ["127.0.0.1", "10.0.0.1"]}),
            policy,
            "inside.example",
            80,
            7.0,
        )
        failure = self.failureResultOf(endpoint.connect(client_factory()), TargetRefused)
        self.assertIn("127.0.0.1", str(failure.value))
        self.assertIn("10.0.0.1", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_falls_back_to_next_allowed_address(self) -> None:
        policy = AccessPolicy(allow_upstream=["mixed.example"])
        endpoint = self.factory(policy).endpointForURI(URI.fromBytes(b"http://mixed.example/"))
        connecting = endpoint.connect(client_factory())
        self.assertEqual(self.reactor.tcpClients[0][0], "127.0.0.1")
        from twisted.internet.error import ConnectionRefusedError

        self.reactor.tcpClients[0][2].clientConnectionFailed(
            self.reactor.connectors[0], Failure(ConnectionRefusedError())
        )
        self.assertEqual(self.reactor.tcpClients[1][0], "::1")
        self.assertNoResult(connecting)
        connecting.cancel()
        self.failureResultOf(connecting)
        self.assertTrue(self.reactor.connectors[1].stoppedConnecting)

    def test_connect_timeout(self) -> None:
        from twisted.internet.error import TimeoutError

        endpoint = self.factory(AccessPolicy(allow_upstream=["mirror.example"])).endpointForURI(
            URI.fromBytes(b"http://mirror.example/")
        )
        connecting = endpoint.connect(client_factory())
        self.reactor.tcpClients[0][2].clientConnectionFailed(
            self.reactor.connectors[0], Failure(TimeoutError())
        )
        failure = self.failureResultOf(connecting, UpstreamTimeout)
        self.assertIn("203.0.113.7", str(failure.value))

    def test_resolution_timeout(self) -> None:
        endpoint = self.factory(AccessPolicy()).endpointForURI(
            URI.fromBytes(b"http://slow.example/")
        )
        connecting = endpoint.connect(client_factory())
        self.reactor.advance(6.9)
        self.assertNoResult(connecting)
        self.reactor.advance(0.2)
        failure = self.failureResultOf(connecting, UpstreamTimeout)
        self.assertIn("slow.example", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])
