"""
Tests for buildcache.frontends.tunnel: CONNECT on the proxy port.

End-to-end tests use real TCP on 127.0.0.0/8: a client speaks to a
ProxySite, which tunnels to a target listener.  Error paths that need a
connection to hang or time out run on a MemoryReactor with StringTransports.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.protocol import Factory, Protocol, ServerFactory
from twisted.internet.task import Clock
from twisted.internet.testing import (
    EventLoggingObserver,
    MemoryReactorClock,
    StringTransport,
)
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from buildcache.access import AccessPolicy
from buildcache.frontends.channel import MAX_REQUEST_BODY, ProxyChannel
from buildcache.frontends.sites import ProxySite
from buildcache.frontends.tunnel import ConnectTarget, parse_connect_target
from tests.test_connect import FakeResolver, GuardTestCase, Hello, Sink

#: The global reactor, typed loosely: its zope interfaces are opaque to mypy.
reactor: Any = _reactor

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
MEGABYTE = 1024 * 1024


def pattern(size: int, seed: bytes) -> bytes:
    block = b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(256))
    repeats, rest = divmod(size, len(block))
    return block * repeats + block[:rest]


class Receiver(Protocol):
    """
    Keeps what it receives, and fires waiters when enough has arrived or
    the connection ends.
    """

    def __init__(self) -> None:
        self.received = b""
        self.greeting = b""
        self.lost: Deferred[None] = Deferred()
        self._waiters: list[tuple[int, Deferred[bytes]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        waiting, self._waiters = self._waiters, []
        for size, d in waiting:
            if len(self.received) >= size:
                d.callback(self.received)
            else:
                self._waiters.append((size, d))

    def until_received(self, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if len(self.received) >= size:
            d.callback(self.received)
        else:
            self._waiters.append((size, d))
        return d

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        waiting, self._waiters = self._waiters, []
        for _, d in waiting:
            d.errback(reason)
        self.lost.callback(None)

    @property
    def tcp(self) -> Any:
        """The TCP transport."""
        return self.transport

    def send(self, data: bytes) -> None:
        self.tcp.write(data)


class Echo(Receiver):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.send(data)


class Source(Receiver):
    """Sends ``greeting`` as soon as it is connected, and keeps what it gets."""

    def connectionMade(self) -> None:
        self.send(self.greeting)


class TargetFactory(ServerFactory):
    """Builds ``protocol`` instances and remembers them."""

    def __init__(self, protocol_class: type[Receiver], greeting: bytes = b""):
        self.protocol_class = protocol_class
        self.greeting = greeting
        self.built: list[Receiver] = []
        self._waiters: list[Deferred[Receiver]] = []

    def buildProtocol(self, addr: Any) -> Receiver:
        protocol = self.protocol_class()
        protocol.greeting = self.greeting
        self.built.append(protocol)
        waiting, self._waiters = self._waiters, []
        for d in waiting:
            d.callback(protocol)
        return protocol

    def first(self) -> Deferred[Receiver]:
        d: Deferred[Receiver] = Deferred()
        if self.built:
            d.callback(self.built[0])
        else:
            self._waiters.append(d)
        return d


class TrackedChannel(ProxyChannel):
    def __init__(self) -> None:
        super().__init__()
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        super().connectionLost(reason)
        self.lost.callback(None)


class TrackedProxySite(ProxySite):
    """A ProxySite whose channels a test can wait for and close."""

    protocol = TrackedChannel  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels: list[TrackedChannel] = []

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        self.channels.append(channel)
        return channel


def connect_head(target: str) -> bytes:
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode("ascii")


def split_response(data: bytes) -> tuple[bytes, bytes]:
    head, _, rest = data.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


class TunnelOverTCPTests(GuardTestCase):
    """
    Client -> ProxySite -> target, all on 127.0.0.0/8.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def start_proxy(self, policy: AccessPolicy, **kwargs: Any) -> tuple[TrackedProxySite, int]:
        site = TrackedProxySite(
            Hello(), reactor=reactor, policy=policy, resolver=FakeResolver(), **kwargs
        )
        port = reactor.listenTCP(0, site, interface="127.0.0.1")

        async def cleanup() -> None:
            await port.stopListening()
            for channel in site.channels:
                if not channel.lost.called:
                    channel.client_transport.abortConnection()
                await channel.lost

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        return site, self.port_of(port)

    async def client(self, proxy_port: int) -> Receiver:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy_port)
        protocol = await endpoint.connect(Factory.forProtocol(Receiver))
        assert isinstance(protocol, Receiver)

        async def cleanup() -> None:
            if not protocol.lost.called:
                protocol.tcp.abortConnection()
            await protocol.lost

        self.addCleanup(lambda: Deferred.fromCoroutine(cleanup()))
        return protocol

    def target(self, factory: Any, interface: str = "127.0.0.1") -> tuple[Any, int]:
        listener, port = self.listen(factory, interface)
        self.target_port = port
        return listener, self.port_of(port)

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [dict(e) for e in self.events if e.get("event") == name]

    async def refused(self, client: Receiver) -> bytes:
        """The whole response to a refused CONNECT; the proxy closes."""
        await client.lost
        return client.received

    async def test_streams_a_megabyte_each_way(self) -> None:
        down, up = pattern(MEGABYTE, b"down"), pattern(MEGABYTE, b"up")
        targets = TargetFactory(Source, greeting=down)
        _, target_port = self.target(targets)
        site, proxy_port = self.start_proxy(
            AccessPolicy(allow_upstream=["127.0.0.1"]),
            connect_ports=frozenset({target_port}),
        )
        client = await self.client(proxy_port)
        client.send(connect_head(f"127.0.0.1:{target_port}"))
        await client.until_received(len(ESTABLISHED))
        self.assertEqual(client.received[: len(ESTABLISHED)], ESTABLISHED)
        client.send(up)
        target = await targets.first()
        self.assertEqual(await target.until_received(MEGABYTE), up)
        received = await client.until_received(len(ESTABLISHED) + MEGABYTE)
        self.assertEqual(received, ESTABLISHED + down)

        client.tcp.loseConnection()
        await target.lost
        await site.channels[0].lost
        [opened] = self.events_named("tunnel_open")
        self.assertEqual(opened["target"], f"127.0.0.1:{target_port}")
        self.assertEqual(opened["address"], "127.0.0.1")
        [closed] = self.events_named("tunnel_closed")
        self.assertEqual(closed["bytes_to_upstream"], MEGABYTE)
        self.assertEqual(closed["bytes_to_client"], MEGABYTE)
        self.assertTrue(closed["client"].startswith("127.0.0.1:"))

    async def test_pipelined_bytes_after_head_are_forwarded(self) -> None:
        targets = TargetFactory(Echo)
        _, target_port = self.target(targets)
        _, proxy_port = self.start_proxy(
            AccessPolicy(allow_upstream=["127.0.0.1"]),
            connect_ports=frozenset({target_port}),
        )
        client = await self.client(proxy_port)
        hello = b"\x16\x03\x01 pretend ClientHello"
        client.send(connect_head(f"127.0.0.1:{target_port}") + hello)
        received = await client.until_received(len(ESTABLISHED) + len(hello))
        self.assertEqual(received, ESTABLISHED + hello)
        target = await targets.first()
        self.assertEqual(target.received, hello)

    async def test_target_closing_closes_client(self) -> None:
        targets = TargetFactory(Source, greeting=b"bye")
        _, target_port = self.target(targets)
        _, proxy_port = self.start_proxy(
            AccessPolicy(allow_upstream=["127.0.0.1"]),
            connect_ports=frozenset({target_port}),
        )
        client = await self.client(proxy_port)
        client.send(connect_head(f"127.0.0.1:{target_port}"))
        await client.until_received(len(ESTABLISHED) + 3)
        target = await targets.first()
        target.tcp.loseConnection()
        await client.lost
        self.assertEqual(client.received, ESTABLISHED + b"bye")

    async def test_default_refuses_ports_other_than_443(self) -> None:
        listener, target_port = self.target(ServerFactory.forProtocol(Sink))
        _, proxy_port = self.start_proxy(AccessPolicy(allow_upstream=["127.0.0.1"]))
        client = await self.client(proxy_port)
        client.send(connect_head(f"127.0.0.1:{target_port}"))
        head, body = split_response(await self.refused(client))
        self.assertTrue(head.startswith(b"HTTP/1.1 403 Forbidden\r\n"))
        self.assertIn(b"443", body)
        self.assertIn(str(target_port).encode(), body)
        [event] = self.events_named("tunnel_refused")
        self.assertEqual(event["status"], 403)
        self.assertEqual(event["target"], f"127.0.0.1:{target_port}")
        await self.settle(listener, self.target_port, AccessPolicy(allow_upstream=["127.0.0.1"]))
        self.assertEqual(listener.accepted, 1)

    async def test_refused_address_gets_403_and_target_nothing(self) -> None:
        listener, target_port = self.target(ServerFactory.forProtocol(Sink), "127.0.0.2")
        _, proxy_port = self.start_proxy(
            AccessPolicy(), connect_ports=frozenset({target_port})
        )
        client = await self.client(proxy_port)
        client.send(connect_head(f"127.0.0.2:{target_port}"))
        head, body = split_response(await self.refused(client))
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "))
        self.assertIn(b"loopback", body)
        await self.settle(listener, self.target_port, AccessPolicy(allow_upstream=["127.0.0.2"]))
        self.assertEqual(listener.accepted, 1)

    async def test_client_outside_allow_from_gets_403(self) -> None:
        listener, target_port = self.target(ServerFactory.forProtocol(Sink))
        _, proxy_port = self.start_proxy(
            AccessPolicy(allow_from=["10.0.0.0/8"], allow_upstream=["127.0.0.1"]),
            connect_ports=frozenset({target_port}),
        )
        client = await self.client(proxy_port)
        client.send(connect_head(f"127.0.0.1:{target_port}"))
        head, body = split_response(await self.refused(client))
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "))
        self.assertIn(b"--allow-from", body)
        await self.settle(listener, self.target_port, AccessPolicy(allow_upstream=["127.0.0.1"]))
        self.assertEqual(listener.accepted, 1)

    async def test_connection_refused_by_target_is_502(self) -> None:
        closed = reactor.listenTCP(0, ServerFactory.forProtocol(Sink), interface="127.0.0.1")
        target_port = self.port_of(closed)
        await closed.stopListening()
        _, proxy_port = self.start_proxy(
            AccessPolicy(allow_upstream=["127.0.0.1"]),
            connect_ports=frozenset({target_port}),
        )
        client = await self.client(proxy_port)
        client.send(connect_head(f"127.0.0.1:{target_port}"))
        head, _ = split_response(await self.refused(client))
        self.assertTrue(head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"))
        [event] = self.events_named("tunnel_failed")
        self.assertEqual(event["status"], 502)

    async def test_idle_tunnel_is_closed(self) -> None:
        clock = Clock()
        targets = TargetFactory(Echo)
        _, target_port = self.target(targets)
        _, proxy_port = self.start_proxy(
            AccessPolicy(allow_upstream=["127.0.0.1"]),
            connect_ports=frozenset({target_port}),
            clock=clock,
            idle_timeout=300.0,
        )
        client = await self.client(proxy_port)
        client.send(connect_head(f"127.0.0.1:{target_port}") + b"a")
        await client.until_received(len(ESTABLISHED) + 1)
        clock.advance(299)
        client.send(b"b")
        await client.until_received(len(ESTABLISHED) + 2)
        # Activity at 299 moved the deadline to 599.
        clock.advance(299)
        client.send(b"c")
        await client.until_received(len(ESTABLISHED) + 3)
        target = await targets.first()
        self.assertFalse(target.lost.called)
        clock.advance(300)
        await client.lost
        await target.lost
        self.assertEqual(client.received, ESTABLISHED + b"abc")
        self.assertEqual(len(self.events_named("tunnel_idle")), 1)

    async def test_other_requests_reach_the_resource(self) -> None:
        """
        A GET goes to the site's resource; a CONNECT pipelined after it on
        the same connection is still tunnelled.
        """
        targets = TargetFactory(Echo)
        _, target_port = self.target(targets)
        _, proxy_port = self.start_proxy(
            AccessPolicy(allow_upstream=["127.0.0.1"]),
            connect_ports=frozenset({target_port}),
        )
        client = await self.client(proxy_port)
        client.send(
            b"GET /hello HTTP/1.1\r\nHost: box\r\n\r\n"
            + connect_head(f"127.0.0.1:{target_port}")
            + b"ping"
        )
        body = b"hello from upstream"
        await client.until_received(1)
        while not client.received.endswith(ESTABLISHED + b"ping"):
            await client.until_received(len(client.received) + 1)
        get_head, rest = split_response(client.received)
        self.assertTrue(get_head.startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(rest, body + ESTABLISHED + b"ping")


class ParseTargetTests(SynchronousTestCase):
    def test_valid(self) -> None:
        self.assertEqual(parse_connect_target(b"Mirror.Example:443"), ConnectTarget("mirror.example", 443))
        self.assertEqual(parse_connect_target(b"[::1]:8443"), ConnectTarget("::1", 8443))
        self.assertEqual(str(ConnectTarget("::1", 8443)), "[::1]:8443")

    def test_invalid(self) -> None:
        for bad in [
            b"mirror.example",
            b"mirror.example:",
            b":443",
            b"mirror.example:0",
            b"mirror.example:65536",
            b"mirror.example:443/path",
            b"http://mirror.example:443",
            b"user@mirror.example:443",
            b"::1:443",
            b"[mirror]:443",
            b"bad_label-.example:443",
            b"caf\xc3\xa9.example:443",
        ]:
            with self.assertRaises(ValueError, msg=repr(bad)):
                parse_connect_target(bad)


class ChannelInMemoryTests(SynchronousTestCase):
    """
    ProxyChannel over StringTransports and a MemoryReactor.
    """

    def channel(
        self, policy: AccessPolicy | None = None, peer: str = "127.0.0.1", **kwargs: Any
    ) -> tuple[MemoryReactorClock, ProxyChannel, StringTransport]:
        memory = MemoryReactorClock()
        site = ProxySite(
            Hello(),
            reactor=memory,
            policy=policy or AccessPolicy(allow_upstream=["mirror.example"]),
            resolver=FakeResolver({"mirror.example": ["203.0.113.9"]}),
            **kwargs,
        )
        address = IPv4Address("TCP", peer, 50000)
        channel = site.buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        channel.makeConnection(transport)
        return memory, channel, transport

    def assertStatus(self, transport: StringTransport, status: bytes) -> bytes:
        head, body = split_response(transport.value())
        self.assertTrue(head.startswith(b"HTTP/1.1 " + status + b" "), head)
        self.assertIn(b"Connection: close\r\n", head)
        self.assertTrue(transport.disconnecting)
        return body

    def test_local_address_asked_once_per_connection(self) -> None:
        """
        Every request learns the address it came in on (the proxy compares
        it with its own index port), from one question to the socket.
        """
        seen: list[object] = []

        class Where(Hello):
            def render_GET(self, request: Any) -> bytes:
                seen.append(request.getHost())
                return b"here"

        class CountingTransport(StringTransport):
            asked = 0

            def getHost(self) -> Any:
                self.asked += 1
                return super().getHost()

        local = IPv4Address("TCP", "192.0.2.7", 8899)
        site = ProxySite(Where(), reactor=MemoryReactorClock(), policy=AccessPolicy())
        peer = IPv4Address("TCP", "127.0.0.1", 50000)
        channel = site.buildProtocol(peer)
        transport = CountingTransport(hostAddress=local, peerAddress=peer)
        channel.makeConnection(transport)
        for _ in range(3):
            channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: box\r\n\r\n")
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 "), 3)
        self.assertEqual(seen, [local] * 3)
        self.assertEqual(transport.asked, 1)

    def test_request_bodies_refused_before_they_arrive(self) -> None:
        """
        A body over the limit is answered 413 as soon as the headers are
        in (nothing spooled, the connection closed), a chunked one as soon
        as it has grown past the limit; a small body on a GET is read and
        the GET answered.
        """
        memory, channel, transport = self.channel()
        channel.dataReceived(
            b"POST http://mirror.example/x HTTP/1.1\r\nHost: mirror.example\r\n"
            + b"Content-Length: %d\r\n\r\n" % (MAX_REQUEST_BODY + 1)
        )
        self.assertIn(b"GET and HEAD only", self.assertStatus(transport, b"413"))
        # What the client goes on sending is read and dropped.
        channel.dataReceived(b"x" * 100_000)
        self.assertNotIn(b"hello from upstream", transport.value())
        memory, channel, transport = self.channel()
        channel.dataReceived(
            b"POST /x HTTP/1.1\r\nHost: box\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"x" * 4096
        for _ in range(MAX_REQUEST_BODY // len(chunk) - 1):
            channel.dataReceived(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        self.assertStatus(transport, b"413")
        memory, channel, transport = self.channel()
        channel.dataReceived(
            b"GET /x HTTP/1.1\r\nHost: box\r\nContent-Length: 5\r\n\r\nhello"
        )
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))
        self.assertFalse(transport.disconnecting)

    def test_malformed_targets_are_400(self) -> None:
        for line in [
            b"CONNECT mirror.example HTTP/1.1",
            b"CONNECT mirror.example:443",
            b"CONNECT mirror.example:443 HTTP/2.0",
            b"CONNECT mirror.example:99999 HTTP/1.1",
            b"CONNECT  mirror.example:443 HTTP/1.1",
            b"CONNECT [zz]:443 HTTP/1.1",
        ]:
            memory, channel, transport = self.channel()
            channel.dataReceived(line + b"\r\nHost: x\r\n\r\n")
            self.assertStatus(transport, b"400")
            self.assertEqual(memory.tcpClients, [], line)

    def test_malformed_header_line_is_400(self) -> None:
        memory, channel, transport = self.channel()
        channel.dataReceived(b"CONNECT mirror.example:443 HTTP/1.1\r\nno colon here\r\n\r\n")
        self.assertStatus(transport, b"400")
        self.assertEqual(memory.tcpClients, [])

    def test_too_many_headers_is_400(self) -> None:
        memory, channel, transport = self.channel()
        channel.dataReceived(b"CONNECT mirror.example:443 HTTP/1.1\r\n")
        channel.dataReceived(b"X-Filler: 1\r\n" * (ProxyChannel.max_connect_headers + 1))
        self.assertStatus(transport, b"400")
        channel.dataReceived(b"\r\n")
        self.assertEqual(memory.tcpClients, [])

    def test_overlong_header_line_is_400(self) -> None:
        memory, channel, transport = self.channel()
        channel.dataReceived(b"CONNECT mirror.example:443 HTTP/1.1\r\n")
        channel.dataReceived(b"X-Long: " + b"a" * 20000)
        self.assertStatus(transport, b"400")
        self.assertEqual(memory.tcpClients, [])

    def test_disallowed_client_is_403_before_parsing_target(self) -> None:
        memory, channel, transport = self.channel(
            AccessPolicy(allow_from=["10.0.0.0/8"]), peer="192.0.2.1"
        )
        channel.dataReceived(b"CONNECT not a target\r\n\r\n")
        self.assertIn(b"--allow-from", self.assertStatus(transport, b"403"))

    def test_host_outside_allow_upstream_is_403(self) -> None:
        memory, channel, transport = self.channel()
        channel.dataReceived(connect_head("elsewhere.example:443"))
        self.assertIn(b"--allow-upstream", self.assertStatus(transport, b"403"))
        self.assertEqual(memory.tcpClients, [])

    def test_connect_to_443_wires_flow_control_both_ways(self) -> None:
        memory, channel, transport = self.channel()
        channel.dataReceived(connect_head("mirror.example:443") + b"early")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        [(host, port, factory, timeout, _)] = memory.tcpClients
        self.assertEqual((host, port, timeout), ("203.0.113.9", 443, 30.0))

        upstream = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol: Any = factory.buildProtocol(upstream.getPeer())
        protocol.makeConnection(upstream)
        self.assertEqual(transport.value(), ESTABLISHED)
        self.assertEqual(upstream.value(), b"early")
        self.assertIs(transport.producer, upstream)
        self.assertTrue(transport.streaming)
        self.assertIs(upstream.producer, transport)
        self.assertTrue(upstream.streaming)
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(upstream.producerState, "producing")

        channel.dataReceived(b"more")
        self.assertEqual(upstream.value(), b"earlymore")
        protocol.dataReceived(b"answer")
        self.assertEqual(transport.value(), ESTABLISHED + b"answer")

        channel.connectionLost(Failure(ConnectionError("client went away")))
        self.assertTrue(upstream.disconnecting)

    def test_connect_timeout_is_504(self) -> None:
        memory, channel, transport = self.channel(connect_timeout=5.0)
        channel.dataReceived(connect_head("mirror.example:443"))
        [(_, _, factory, timeout, _)] = memory.tcpClients
        self.assertEqual(timeout, 5.0)
        factory.clientConnectionFailed(memory.connectors[0], Failure(ConnectTimeoutError()))
        self.assertStatus(transport, b"504")

    def test_client_leaving_while_connecting_stops_the_attempt(self) -> None:
        memory, channel, transport = self.channel()
        channel.dataReceived(connect_head("mirror.example:443"))
        self.assertFalse(memory.connectors[0].stoppedConnecting)
        channel.connectionLost(Failure(ConnectionError("client went away")))
        self.assertTrue(memory.connectors[0].stoppedConnecting)
        self.assertEqual(transport.value(), b"")

    def test_without_settings_connect_is_405(self) -> None:
        channel = ProxyChannel()
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(connect_head("mirror.example:443"))
        self.assertStatus(transport, b"405")
        channel.connectionLost(Failure(ConnectionError("done")))
