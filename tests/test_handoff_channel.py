"""
A hit worker's channel hands a connection off (issue 16): the raw bytes
of the request from its first byte (and whatever followed it), after one
PROXY protocol v1 line, go to the main process's relay socket, then bytes
flow both ways until either side closes.  Units over memory transports
and a memory reactor; the real sockets are in
:mod:`tests.test_handoff_relay`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, globalLogPublisher
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.frontends.channel import ProxyChannel
from buildcache.frontends.relay import RelayTarget, hand_off_request, proxy_line
from buildcache.frontends.sending import SEND_STALL_TIMEOUT
from buildcache.frontends.sites import StrictSite

PEER = IPv4Address("TCP", "192.0.2.7", 40123)
HOST = IPv4Address("TCP", "10.0.0.1", 3142)


class Worker(Resource):
    """``/hit`` answers; ``/slow`` never does; anything else is handed off."""

    isLeaf = True

    def render(self, request: Request) -> object:
        if request.path == b"/hit":
            request.setHeader("content-length", "3")
            return b"hit"
        if request.path == b"/slow":
            self.slow = request
            return NOT_DONE_YET
        hand_off_request(request)
        return NOT_DONE_YET


class ProxyLineTests(SynchronousTestCase):
    def test_ipv4(self) -> None:
        self.assertEqual(
            proxy_line(PEER, HOST), b"PROXY TCP4 192.0.2.7 10.0.0.1 40123 3142\r\n"
        )

    def test_ipv6(self) -> None:
        self.assertEqual(
            proxy_line(
                IPv6Address("TCP", "2001:db8::7", 5000),
                IPv6Address("TCP", "2001:db8::1%eth0", 3142),
            ),
            b"PROXY TCP6 2001:db8::7 2001:db8::1 5000 3142\r\n",
        )

    def test_anything_else_is_unknown(self) -> None:
        self.assertEqual(
            proxy_line(UNIXAddress(b"/x"), HOST), b"PROXY UNKNOWN\r\n"
        )
        self.assertEqual(
            proxy_line(PEER, IPv6Address("TCP", "::1", 1)), b"PROXY UNKNOWN\r\n"
        )


class HandOffTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.resource = Worker()
        self.site = StrictSite(
            self.resource, reactor=self.reactor,
            relay=RelayTarget(self.reactor, "/run/relay/proxy.sock"),
        )
        self.client = StringTransport(hostAddress=HOST, peerAddress=PEER)
        self.channel: Any = self.site.buildProtocol(PEER)
        self.channel.makeConnection(self.client)
        self.events: list[LogEvent] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def main_side(self) -> tuple[Any, StringTransport]:
        """The relay connection the channel opened, connected now."""
        self.assertEqual(len(self.reactor.unixClients), 1)
        path, factory, _, _ = self.reactor.unixClients[0]
        self.assertEqual(path, "/run/relay/proxy.sock")
        protocol = factory.buildProtocol(UNIXAddress(path))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_miss_after_hit_goes_whole_with_what_followed(self) -> None:
        """
        Pipelined: a hit, a request handed off, and a later request; the
        hit is answered here, the other two go to the main process byte
        for byte after the PROXY line.
        """
        handed = b"GET /miss HTTP/1.1\r\nHost: a\r\nX-Odd:  spaced \r\n\r\n"
        later = b"GET /later HTTP/1.1\r\nHost: a\r\n\r\n"
        self.channel.dataReceived(
            b"GET /hit HTTP/1.1\r\nHost: a\r\n\r\n" + handed + later[:10]
        )
        self.channel.dataReceived(later[10:])
        self.assertIn(b"\r\n\r\nhit", self.client.value())
        answered = self.client.value()
        main, to_main = self.main_side()
        self.assertEqual(
            to_main.value(), proxy_line(PEER, HOST) + handed + later
        )
        self.channel.dataReceived(b"more")
        self.assertEqual(to_main.value()[-4:], b"more")
        main.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertEqual(self.client.value(), answered + b"HTTP/1.1 200 OK\r\n")
        main.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.client.disconnecting)

    def test_client_that_takes_nothing_after_the_main_side_closed_is_cut(self) -> None:
        """
        The main process answered and closed its side; the client takes
        none of what is buffered for it: it is cut after the send-stall
        timeout (its connection and its slot under the cap were held for
        ever, the graceful close never completing).
        """
        self.channel.dataReceived(b"GET /m HTTP/1.1\r\n\r\n")
        main, _ = self.main_side()
        main.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nunread...")
        main.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.client.disconnecting)
        self.assertFalse(self.client.disconnected)
        self.reactor.advance(SEND_STALL_TIMEOUT - 1)
        self.assertFalse(self.client.disconnected)
        self.reactor.advance(1)
        self.assertTrue(self.client.disconnected)
        self.assertIn("client_stalled", [e.get("event") for e in self.events])

    def test_client_that_stops_reading_a_relayed_response_is_cut(self) -> None:
        """
        The client stops taking a relayed response (its socket is full:
        the main side is paused): after the send-stall timeout with no
        progress it is cut, its slot freed, as the main process cuts the
        relay's side (the worker had stopped its own stall timer).
        """
        self.channel.dataReceived(b"GET /m HTTP/1.1\r\n\r\n")
        main, to_main = self.main_side()
        main.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 99999\r\n\r\npart")
        self.client.producer.pauseProducing()
        self.assertEqual(to_main.producerState, "paused")
        self.reactor.advance(SEND_STALL_TIMEOUT - 1)
        self.assertFalse(self.client.disconnected)
        self.reactor.advance(1)
        self.assertTrue(self.client.disconnected)

    def test_client_reading_again_is_not_cut(self) -> None:
        self.channel.dataReceived(b"GET /m HTTP/1.1\r\n\r\n")
        main, to_main = self.main_side()
        self.client.producer.pauseProducing()
        self.reactor.advance(SEND_STALL_TIMEOUT - 1)
        self.client.producer.resumeProducing()
        self.reactor.advance(SEND_STALL_TIMEOUT * 2)
        self.assertFalse(self.client.disconnected)
        self.assertEqual(to_main.producerState, "producing")

    def test_bytes_arriving_while_connecting_follow(self) -> None:
        self.channel.dataReceived(b"GET /m HTTP/1.1\r\n")
        self.channel.dataReceived(b"Host: a\r\n\r\n")
        self.channel.dataReceived(b"GET /n HTTP/1.1\r\n\r\n")
        main, to_main = self.main_side()
        self.assertEqual(
            to_main.value(),
            proxy_line(PEER, HOST)
            + b"GET /m HTTP/1.1\r\nHost: a\r\n\r\nGET /n HTTP/1.1\r\n\r\n",
        )

    def test_connect_is_handed_off_at_its_line(self) -> None:
        data = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03"
        self.channel.dataReceived(data)
        self.assertTrue(self.channel.in_tunnel)
        main, to_main = self.main_side()
        self.assertEqual(to_main.value(), proxy_line(PEER, HOST) + data)
        self.assertEqual(self.client.value(), b"")

    def test_client_leaving_closes_the_relay(self) -> None:
        self.channel.dataReceived(b"GET /m HTTP/1.1\r\n\r\n")
        main, to_main = self.main_side()
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(to_main.disconnecting)

    def test_relay_failure_answers_503(self) -> None:
        self.channel.dataReceived(b"GET /m HTTP/1.1\r\n\r\n")
        _, factory, _, _ = self.reactor.unixClients[0]
        factory.clientConnectionFailed(None, Failure(ConnectError("no main")))
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 503 "))
        self.assertTrue(self.client.disconnecting)
        self.assertIn("relay_failed", [e.get("event") for e in self.events])

    def test_credentials_of_a_handed_off_request_are_never_shown(self) -> None:
        """
        The relay's factory logs no start and stop lines, and neither it
        nor the relay shows the request (whose headers may carry
        credentials) in a repr: each did, once per hand-off.
        """
        self.channel.dataReceived(
            b"GET http://example.test/m HTTP/1.1\r\n"
            b"Proxy-Authorization: Basic c2VjcmV0OnNlY3JldA==\r\n\r\n"
        )
        _, endpoint_factory, _, _ = self.reactor.unixClients[0]
        # The endpoint's wrapper holds the relay's factory.
        factory = endpoint_factory._wrappedFactory
        factory.doStart()
        factory.doStop()
        shown = repr(factory) + repr(factory.relay) + repr(self.events)
        self.assertNotIn("c2VjcmV0", shown)
        self.assertFalse(factory.noisy)

    def test_raw_bytes_are_bounded(self) -> None:
        """
        A client that keeps sending while its request is answered: past
        the head limits and one read, nothing more is kept, and the
        request can no longer be handed off (503).
        """
        self.channel.dataReceived(b"GET /slow HTTP/1.1\r\n\r\n")
        limit = self.channel.raw_limit
        self.assertLess(limit, 256 * 1024)
        junk = b"x" * 65536
        for _ in range(limit // len(junk) + 1):
            self.channel.dataReceived(junk)
        self.assertIsNone(self.channel._raw)
        hand_off_request(self.resource.slow)
        self.assertTrue(self.client.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(self.reactor.unixClients, [])

    def test_hits_keep_no_bytes_between_requests(self) -> None:
        self.channel.dataReceived(b"GET /hit HTTP/1.1\r\n\r\n")
        self.assertIsNone(self.channel._raw)

    def test_no_relay_no_capture(self) -> None:
        """The main process's channels (no relay) keep nothing."""
        channel = ProxyChannel()
        self.assertIsNone(channel.relay)


class LineBufferPinTests(SynchronousTestCase):
    """
    The one private attribute the hand-off reads, pinned:
    ``LineReceiver._buffer`` holds, while ``lineReceived`` runs, the bytes
    received after that line (the rest of the request, kept raw).
    """

    def test_buffer_holds_the_rest_during_line_received(self) -> None:
        seen: list[tuple[bytes, bytes]] = []

        class Lines(LineReceiver):
            def lineReceived(self, line: bytes) -> None:
                seen.append((line, self._buffer))

        lines = Lines()
        lines.makeConnection(StringTransport())
        lines.dataReceived(b"one\r\ntwo\r\nthr")
        self.assertEqual(seen, [(b"one", b"two\r\nthr"), (b"two", b"thr")])


class RemoteAdmission:
    """An admission counted elsewhere: ``admit`` answers later."""

    max_per_client = 3

    def __init__(self) -> None:
        self.asked: list[tuple[object, str]] = []
        self.answers: list[Deferred[bool]] = []
        self.released: list[object] = []

    def admit(self, channel: object, host: str) -> Deferred[bool]:
        self.asked.append((channel, host))
        answer: Deferred[bool] = Deferred()
        self.answers.append(answer)
        return answer

    def release(self, channel: object) -> None:
        self.released.append(channel)

    def changed(self) -> None:
        pass


class RemoteAdmissionTests(SynchronousTestCase):
    """
    A worker's admission answers with a Deferred: the connection reads
    nothing until it fires, and is refused with the 503 of the cap when
    it says no.
    """

    def connect(self) -> tuple[RemoteAdmission, Any, StringTransport]:
        reactor = MemoryReactorClock()
        admission = RemoteAdmission()
        site = StrictSite(Worker(), reactor=reactor, connections=admission)
        client = StringTransport(hostAddress=HOST, peerAddress=PEER)
        channel: Any = site.buildProtocol(PEER)
        channel.makeConnection(client)
        return admission, channel, client

    def test_paused_until_admitted(self) -> None:
        admission, channel, client = self.connect()
        self.assertEqual(admission.asked, [(channel, "192.0.2.7")])
        self.assertEqual(client.producerState, "paused")
        admission.answers[0].callback(True)
        self.assertEqual(client.producerState, "producing")
        channel.dataReceived(b"GET /hit HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b"\r\n\r\nhit", client.value())

    def test_refused_with_503(self) -> None:
        admission, channel, client = self.connect()
        admission.answers[0].callback(False)
        self.assertTrue(client.value().startswith(b"HTTP/1.1 503 "))
        self.assertIn(b"--max-connections-per-client", client.value())
        self.assertTrue(client.disconnecting)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(admission.released, [channel])

    def test_client_gone_before_the_answer(self) -> None:
        admission, channel, client = self.connect()
        channel.connectionLost(Failure(ConnectionDone()))
        admission.answers[0].callback(True)
        self.assertEqual(client.value(), b"")
