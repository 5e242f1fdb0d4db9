"""
What a client can hold on to, on both ports: the deadline for a whole
request, the timeout for a response the client stops reading, the cap on
connections per client address; the responses a stopping server still
sends; refusals by ``--allow-from`` on the index port.

Timing rules run on a test clock over in-memory transports; each rule is
also checked over real TCP on 127.0.0.1 with short configured limits.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.access import AccessPolicy
from buildcache.frontends.channel import (
    ProxyChannel,
    SendCounters,
    send_counters,
    send_progressed,
)
from buildcache.frontends.connections import (
    ClientConnections,
    client_key,
    connection_admitted,
)
from buildcache.frontends.sites import ProxySite, StrictSite
from buildcache.service import BuildcacheService
from buildcache.turns import after_io
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    Running,
    pattern_bytes,
    reactor,
    start_server,
)
from tests.test_faults import raw_client, record_channels, transport_of
from tests.test_proxy import RawConnection, raw_connection, raw_request, until

PACKAGE = "/files/curl-8.5.0-r0.apk"
MB = 1024 * 1024


class Hello(Resource):
    """
    Answers at once, except ``/wait``, whose response stays under way
    (the request is kept in ``held``).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> object:
        if request.path == b"/wait":
            request.write(b"started\n")
            self.held.append(request)
            return NOT_DONE_YET
        return b"hello\n"


class RulesTests(SynchronousTestCase):
    """
    The pure rules.
    """

    def test_client_key(self) -> None:
        self.assertEqual(client_key("127.0.0.1"), "127.0.0.1")
        self.assertEqual(client_key("::ffff:127.0.0.1"), "127.0.0.1")
        self.assertEqual(client_key("0:0::1"), "::1")
        # One host's privacy addresses share its /64's cap.
        self.assertEqual(client_key("fd00:1:2:3:aaaa::1"), "fd00:1:2:3::/64")
        self.assertEqual(client_key("fd00:1:2:3:bbbb::9"), "fd00:1:2:3::/64")
        self.assertNotEqual(client_key("fd00:1:2:4::1"), client_key("fd00:1:2:3::1"))
        self.assertEqual(client_key("/run/buildcache.sock"), "/run/buildcache.sock")

    def test_connection_admitted(self) -> None:
        self.assertTrue(connection_admitted(0, 1))
        self.assertTrue(connection_admitted(255, 256))
        self.assertFalse(connection_admitted(256, 256))
        self.assertFalse(connection_admitted(300, 256))

    def test_send_progressed(self) -> None:
        def counters(acknowledged: int | None, queued: int | None) -> SendCounters:
            return SendCounters(acknowledged=acknowledged, queued=queued)

        # The client's TCP acknowledged bytes: progress, whatever the queue.
        self.assertTrue(send_progressed(counters(1000, None), counters(1001, None)))
        self.assertTrue(send_progressed(counters(1000, 900), counters(2000, 2000)))
        self.assertFalse(send_progressed(counters(1000, None), counters(1000, None)))
        self.assertFalse(send_progressed(counters(None, None), counters(10, None)))
        self.assertFalse(send_progressed(counters(10, None), counters(None, None)))
        # The send queue shrank (the one count a UNIX socket gives).
        self.assertTrue(send_progressed(counters(None, 2_500_000), counters(None, 2_490_000)))
        self.assertFalse(send_progressed(counters(None, 2_500_000), counters(None, 2_500_000)))
        self.assertFalse(send_progressed(counters(None, 100), counters(None, 200)))
        self.assertFalse(send_progressed(counters(None, None), counters(None, 10)))

    def test_send_counters(self) -> None:
        """
        A TCP socket gives both counts, a UNIX socket its queue only, a
        transport without a socket neither.
        """
        served, _ = tcp_connection(self)
        self.assertEqual(send_counters(StringTransport()), SendCounters(None, None))
        self.assertEqual(send_counters_of(served), SendCounters(0, 0))
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        left.send(b"x" * 100)
        counters = send_counters_of(left)
        self.assertIsNone(counters.acknowledged)
        self.assertIsNotNone(counters.queued)


def connect(
    site: StrictSite, host: str = "127.0.0.1", port: int = 40000
) -> tuple[ProxyChannel, StringTransport]:
    """
    A channel of ``site`` on an in-memory transport from ``host``.
    """
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8899),
        peerAddress=IPv4Address("TCP", host, port),
    )
    channel = site.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    return channel, transport


class AcknowledgingSocket:
    """
    The socket handle of a client connection whose TCP has acknowledged
    ``acknowledged`` bytes: what ``TCP_INFO`` tells on Linux (its
    ``tcpi_bytes_acked`` field), and no send queue.
    """

    def __init__(self) -> None:
        self.acknowledged = 0

    def fileno(self) -> int:
        return -1

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        assert (level, option) == (socket.IPPROTO_TCP, socket.TCP_INFO)
        return bytes(120) + struct.pack("=Q", self.acknowledged)


def tcp_connection(case: SynchronousTestCase) -> tuple[socket.socket, socket.socket]:
    """
    Both ends of a TCP connection on 127.0.0.1, closed after ``case``:
    the server's and the client's.
    """
    listener = socket.socket()
    case.addCleanup(listener.close)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    case.addCleanup(client.close)
    served, _ = listener.accept()
    case.addCleanup(served.close)
    return served, client


def send_counters_of(handle: socket.socket) -> SendCounters:
    """The :class:`SendCounters` of a transport whose socket is ``handle``."""
    transport = StringTransport()
    transport.getHandle = lambda: handle  # type: ignore[attr-defined]
    return send_counters(transport)


def stall_response(channel: ProxyChannel) -> None:
    """
    A response under way that the transport has paused (its buffer is
    full): the send-stall timer runs.
    """
    channel.dataReceived(b"GET /wait HTTP/1.1\r\nHost: box\r\n\r\n")
    channel.pauseProducing()


class TimedRulesTests(SynchronousTestCase):
    """
    The deadlines on a test clock, over in-memory transports.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.resource = Hello()
        self.site = ProxySite(
            self.resource, reactor=self.clock, policy=AccessPolicy(), timeout=60,
            connections=ClientConnections(1000),
        )

    def test_slow_header_crowd_closed_on_time(self) -> None:
        """
        300 connections that send a header line every 25 s (each resetting
        the idle timer) are all answered 408 and closed 30 s after their
        first byte; a normal client sending whole requests meanwhile is
        answered every time.
        """
        crowd = [
            connect(self.site, f"127.0.0.{2 + n % 200}", 30000 + n) for n in range(300)
        ]
        for channel, _ in crowd:
            channel.dataReceived(b"GET / HTTP/1.1\r\n")
        normal, normal_transport = connect(self.site)
        answers = 0
        for second in range(1, 31):
            self.clock.advance(1 if second < 30 else 0.9)
            if second % 25 == 0:
                for channel, _ in crowd:
                    channel.dataReceived(b"X-Slow: 1\r\n")
            if second % 10 == 0:
                normal.dataReceived(b"GET /x HTTP/1.1\r\nHost: box\r\n\r\n")
                answers += 1
        # 29.9 s after the first byte.
        self.assertEqual([t for _, t in crowd if t.disconnecting], [])
        self.clock.advance(0.1)
        self.assertEqual([t for _, t in crowd if not t.disconnecting], [])
        for _, transport in crowd:
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout"))
        normal.dataReceived(b"GET /x HTTP/1.1\r\nHost: box\r\n\r\n")
        answers += 1
        self.assertEqual(normal_transport.value().count(b"HTTP/1.1 200 OK"), answers)
        self.assertEqual(normal_transport.value().count(b"hello\n"), answers)
        self.assertFalse(normal_transport.disconnecting)

    def test_deadline_restarts_for_each_request(self) -> None:
        """
        A keep-alive connection gets a new 30 s for each request, counted
        from its first byte, not from the connection.
        """
        channel, transport = connect(self.site)
        self.clock.advance(50)
        channel.dataReceived(b"GET /x HTTP/1.1\r\n")
        self.clock.advance(20)
        channel.dataReceived(b"Host: box\r\n\r\n")
        self.clock.advance(50)
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: box\r\n")
        self.clock.advance(29.9)
        self.assertEqual(transport.value().count(b"200 OK"), 1)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"408 Request Timeout", transport.value())

    def test_pipelined_request_timed_from_the_response_before(self) -> None:
        """
        A request sent while the one before is being answered waits in
        the channel without a deadline; its 30 s start when that response
        is done and it is read.
        """
        channel, transport = connect(self.site)
        channel.dataReceived(
            b"GET /wait HTTP/1.1\r\nHost: box\r\n\r\nGET /x HTTP/1.1\r\n"
        )
        self.clock.advance(100)
        self.assertFalse(transport.disconnecting)
        (waiting,) = self.resource.held
        waiting.finish()
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"408 Request Timeout", transport.value())

    def test_drain(self) -> None:
        """
        Draining closes an idle connection and one whose request is still
        arriving at once, and one whose response is under way once that
        response is done.
        """
        idle, idle_transport = connect(self.site)
        arriving, arriving_transport = connect(self.site, port=40001)
        arriving.dataReceived(b"GET /x HTTP/1.1\r\n")
        answering, answering_transport = connect(self.site, port=40002)
        answering.dataReceived(b"GET /wait HTTP/1.1\r\nHost: box\r\n\r\n")
        for channel in (idle, arriving, answering):
            channel.drain()
        self.assertTrue(idle_transport.disconnecting)
        self.assertTrue(arriving_transport.disconnecting)
        self.assertFalse(answering_transport.disconnecting)
        (waiting,) = self.resource.held
        waiting.finish()
        self.assertTrue(answering_transport.disconnecting)
        self.assertTrue(answering_transport.value().endswith(b"0\r\n\r\n"))

    def test_stalled_reader_cut_after_send_timeout(self) -> None:
        """
        A response the client's socket stops taking (the transport pauses
        the channel) is cut 60 s later; one that drains in time is not.
        """
        channel, transport = connect(self.site)
        channel.dataReceived(b"GET /wait HTTP/1.1\r\nHost: box\r\n\r\n")
        # As the transport does when its buffer fills, and when it drains.
        channel.pauseProducing()
        self.clock.advance(59)
        channel.resumeProducing()
        self.clock.advance(59)
        channel.pauseProducing()
        self.clock.advance(59.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_slow_but_reading_client_kept(self) -> None:
        """
        A client that keeps taking bytes, too slowly for the buffer to
        empty, keeps its connection; once it stops it is cut.
        """
        channel, transport = connect(self.site)
        handle = AcknowledgingSocket()
        transport.getHandle = lambda: handle  # type: ignore[attr-defined]
        stall_response(channel)
        for _ in range(5):
            handle.acknowledged += 1000
            self.clock.advance(60)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(60)
        self.assertTrue(transport.disconnecting)

    def test_stray_crlf_starts_no_deadline(self) -> None:
        """
        A bare CRLF on an idle keep-alive connection is no request: no 408
        30 s later (before: an unsolicited 408 cut the idle connection);
        a request that follows is served.
        """
        channel, transport = connect(self.site)
        channel.dataReceived(b"\r\n")
        self.clock.advance(31)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: box\r\n\r\n")
        self.assertIn(b"200 OK", transport.value())

    def reader_kept_while_reading(
        self, served: socket.socket, reader: socket.socket, piece: int
    ) -> None:
        """
        A response whose client's socket is ``served`` (its send queue
        filled, as for a slow reader) is kept while ``reader`` takes bytes
        until the kernel shows progress, three periods running, and cut one
        period after it stops.
        """
        served.setblocking(False)
        try:
            while True:
                served.send(b"x" * 65536)
        except BlockingIOError:
            pass  # the kernel's queue is full, as for a slow reader
        channel, transport = connect(self.site)
        transport.getHandle = lambda: served  # type: ignore[attr-defined]
        stall_response(channel)
        for _ in range(3):
            # Progress comes in steps (TCP window updates, whole buffers
            # freed): the reader takes bytes until one shows, and no more.
            before = send_counters(transport)
            for _ in range(64):
                reader.recv(piece)
                if send_progressed(before, send_counters(transport)):
                    break
            self.clock.advance(60)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(60)
        self.assertTrue(transport.disconnecting)

    def test_reader_acknowledging_bytes_kept(self) -> None:
        """
        A client that reads so slowly that Twisted's buffer does not shrink
        within a period, but whose TCP keeps acknowledging some bytes,
        keeps its connection; once it stops reading it is cut.
        (Regression: a 64 kbit/s reader of a large file was cut after
        75 s.)  Real sockets on 127.0.0.1; the clock is the test's.
        """
        served, reader = tcp_connection(self)
        self.assertIsNotNone(send_counters_of(served).acknowledged)
        self.reader_kept_while_reading(served, reader, 65536)

    def test_unix_socket_reader_kept(self) -> None:
        """
        Over a UNIX socket, which has no TCP counts, a client that takes
        bytes (the send queue shrinks) keeps its connection; once it stops
        reading it is cut.
        """
        served, reader = socket.socketpair()
        self.addCleanup(served.close)
        self.addCleanup(reader.close)
        self.assertIsNone(send_counters_of(served).acknowledged)
        self.reader_kept_while_reading(served, reader, 4096)

    def test_connection_cap(self) -> None:
        """
        The connection over the cap is answered 503 and closed; other
        addresses, and the same address once one closed, are served.
        """
        site = StrictSite(
            Hello(), reactor=self.clock, connections=ClientConnections(2)
        )
        first, _ = connect(site)
        connect(site)
        _, over = connect(site)
        self.assertTrue(over.disconnecting)
        self.assertTrue(over.value().startswith(b"HTTP/1.1 503 Service Unavailable"))
        self.assertIn(b"--max-connections-per-client", over.value())
        other, other_transport = connect(site, "127.0.0.2")
        other.dataReceived(b"GET /x HTTP/1.1\r\nHost: box\r\n\r\n")
        self.assertIn(b"200 OK", other_transport.value())
        first.connectionLost(Failure(ConnectionDone()))
        again, again_transport = connect(site)
        self.assertFalse(again_transport.disconnecting)


def log_events(testcase: TestCase) -> EventLoggingObserver:
    return EventLoggingObserver.createWithCleanup(testcase, globalLogPublisher)


class OverHTTPTests(TestCase):
    """
    The same rules on a running server over TCP.
    """

    timeout = 30

    def start(self, size: int = 4 * MB, **config: object) -> Running:
        upstream = FakeUpstream()
        upstream.bodies[PACKAGE] = GatedBody(pattern_bytes(size, b"limits"))
        return start_server(self, config, upstream=upstream)

    async def test_slow_header_crowd(self) -> None:
        """
        300 connections (from ten loopback addresses, so the cap is not
        what stops them) send a request line and one header line and stop,
        on each port; with a 0.5 s request deadline all get 408 and are
        closed, well before the 60 s idle timeout; a normal client gets its
        answers on both ports meanwhile and after.
        """
        events = log_events(self)
        running = self.start()
        for site in (running.server.proxy_site, running.server.index_site):
            site.request_head_timeout = 0.5
        crowd: list[RawConnection] = []
        for batch in range(6):
            port = running.proxy_port if batch % 2 else running.index_port
            crowd += await gatherResults([
                Deferred.fromCoroutine(raw_connection(self, port, f"127.0.0.{2 + n % 10}"))
                for n in range(50)
            ])
        for connection in crowd:
            connection.send(b"GET / HTTP/1.1\r\nX-Slow: 1\r\n")
        client = Client()
        during = await client.get(f"http://127.0.0.1:{running.proxy_port}/up{PACKAGE}")
        page = await client.get(f"http://127.0.0.1:{running.index_port}/-/stats.json")
        await gatherResults([c.lost for c in crowd])
        for connection in crowd:
            self.assertTrue(connection.buffer.startswith(b"HTTP/1.1 408 Request Timeout"))
        after = await client.get(f"http://127.0.0.1:{running.proxy_port}/up{PACKAGE}")
        self.assertEqual((during.status, page.status, after.status), (200, 200, 200))
        self.assertEqual(after.header("x-cache"), "HIT")
        timeouts = [e for e in events if e.get("event") == "request_timeout"]
        self.assertEqual(len(timeouts), 300)

    async def test_stalled_reader_cut(self) -> None:
        """
        A client that stops reading a stored 32 MB body (more than the
        sockets' buffers hold) is disconnected once its socket has taken
        nothing for the send timeout (0.5 s here), with a log event; the
        body stays stored and is served again.
        """
        events = log_events(self)
        running = self.start(32 * MB)
        client = Client()
        url = f"http://127.0.0.1:{running.proxy_port}/up{PACKAGE}"
        self.assertEqual((await client.get(url)).status, 200)
        running.server.proxy_site.send_stall_timeout = 0.5
        reader = await raw_client(self, running.proxy_port, f"/up{PACKAGE}")
        reader.stall()
        await until(lambda: any(e.get("event") == "client_stalled" for e in events))
        # A client that does not read does not see the connection go
        # either: it finds out once it reads again.
        reader.read_again()
        await reader.lost
        self.assertLess(reader.body_received, 32 * MB)
        self.assertEqual(
            [e["event"] for e in events if e.get("event") == "client_stalled"],
            ["client_stalled"],
        )
        again = await client.get(url)
        self.assertEqual((again.status, again.header("x-cache")), (200, "HIT"))
        self.assertEqual(len(again.body), 32 * MB)

    async def test_connection_cap(self) -> None:
        """
        With ``max_connections_per_client=3``, a fourth connection from
        127.0.0.1 (on either port: they share the count) is answered 503
        with a log event; 127.0.0.2 is served; once one of the three
        closes, 127.0.0.1 is served again.
        """
        events = log_events(self)
        running = self.start(max_connections_per_client=3)
        held = [
            await raw_connection(self, port)
            for port in (running.proxy_port, running.index_port, running.proxy_port)
        ]
        first = await held[0].request(
            raw_request("GET", f"/up{PACKAGE}", "box")
        )
        self.assertEqual(first.status, 200)
        for port in (running.index_port, running.proxy_port):
            over = await raw_connection(self, port)
            refused = await over.response()
            self.assertEqual(refused.status, 503)
            self.assertIn(b"--max-connections-per-client", refused.body)
            await over.lost
        other = await raw_connection(self, running.proxy_port, "127.0.0.2")
        served = await other.request(raw_request("GET", f"/up{PACKAGE}", "box"))
        self.assertEqual((served.status, served.headers["x-cache"]), (200, ["HIT"]))
        await held[1].close()
        await until(lambda: running.server.connections.open_from("127.0.0.1") == 2)
        again = await raw_connection(self, running.index_port)
        answer = await again.request(raw_request("GET", "/-/stats.json", "box"))
        self.assertEqual(answer.status, 200)
        self.assertEqual(json.loads(answer.body)["config"]["max_connections_per_client"], 3)
        page = await again.request(raw_request("GET", "/", "box"))
        self.assertIn(b"<dt>Connections per client address</dt><dd>at most 3</dd>", page.body)
        limited = [e for e in events if e.get("event") == "client_connection_limit"]
        self.assertEqual([e["limit"] for e in limited], [3, 3])

    async def test_stop_lets_a_slow_reader_finish(self) -> None:
        """
        stopService while a client that has stopped reading is being sent
        a stored 4 MB file: the service does not finish stopping until the
        response has gone out (the client reads again meanwhile), so the
        process exiting then (every connection still open is cut, as the
        reactor's shutdown does) leaves the client with the whole body.
        """
        running = self.start()
        data = pattern_bytes(4 * MB, b"limits")
        url = f"http://127.0.0.1:{running.proxy_port}/up{PACKAGE}"
        self.assertEqual((await Client().get(url)).status, 200)
        await running.server.fetcher.when_idle()
        channels = record_channels(running.server.proxy_site)
        reader = await raw_client(self, running.proxy_port, f"/up{PACKAGE}")
        await reader.first_bytes
        reader.stall()
        service = BuildcacheService(running.server, reactor, grace=20)
        service.startService()
        stopping = service.stopService()
        await after_io(reactor)
        await after_io(reactor)
        self.assertFalse(stopping.called)
        reader.read_again()
        await stopping
        # The process would exit now: whatever is still open is cut.
        for channel in channels:
            transport = transport_of(channel)
            if transport.connected:
                transport.abortConnection()
        await reader.lost
        self.assertEqual(reader.status, 200)
        self.assertEqual(reader.body_received, len(data))
        self.assertEqual(reader.digest.hexdigest(), hashlib.sha256(data).hexdigest())

    async def test_stop_closes_idle_connections(self) -> None:
        """
        An idle keep-alive connection does not hold up stopping: it is
        closed at once.
        """
        running = self.start()
        idle = await raw_connection(self, running.index_port)
        answer = await idle.request(raw_request("GET", "/-/stats.json", "box"))
        self.assertEqual(answer.status, 200)
        service = BuildcacheService(running.server, reactor, grace=20)
        service.startService()
        await service.stopService()
        await idle.lost

    async def test_index_port_refusal_logged_and_counted(self) -> None:
        """
        A client outside ``--allow-from`` on the index port gets 403, an
        access line and an error count, as on the proxy port.
        """
        events = log_events(self)
        running = self.start(allow_from=("10.0.0.0/8",))
        for port in (running.index_port, running.proxy_port):
            refused = await Client().get(f"http://127.0.0.1:{port}/simple/numpy/")
            self.assertEqual(refused.status, 403)
        await until(
            lambda: len([e for e in events if e.get("log_system") == "access"]) == 2
        )
        access = [e for e in events if e.get("log_system") == "access"]
        self.assertEqual(
            sorted((e["front_end"], e["status"], e["client"]) for e in access),
            [("index", 403, "127.0.0.1"), ("mirror", 403, "127.0.0.1")],
        )
        totals = running.server.activity.totals
        self.assertEqual((totals["index"].requests, totals["index"].errors), (1, 1))
