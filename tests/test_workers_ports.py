"""
One listening socket per process (``buildcache.workers.ports``): the
``SO_REUSEPORT`` group the main process binds for each TCP port with
``--workers N``, how the kernel spreads a burst of connections over it,
and a real ``twistd --workers 2`` where 32 connections opened at once are
served by both processes, and a SIGKILLed worker's replacement serves on
its socket (no connection queued there meanwhile is lost).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import socket
import tempfile

from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site
from twisted.web.static import Data

from buildcache.config import Config
from buildcache.service import ListeningService
from buildcache.workers.pool import service_for_twistd
from buildcache.workers.ports import (
    DEFAULT_BACKLOG,
    PerProcessListening,
    TCPAddress,
    bind_group,
    tcp_address,
)
from tests.support import (
    FakeUpstream,
    GatedBody,
    listen,
    pattern_bytes,
    reactor,
    url_of,
)
from tests.test_service import ServerProcess, committed_entries, free_port, spawn_server

LOCAL = TCPAddress(socket.AF_INET, "127.0.0.1", 0)
#: Connections opened at once: wrk's ``-c32``.
BURST = 32
BODY = pattern_bytes(20_000, seed=b"ports")
_WORKER = re.compile(rb"Worker 1 serving \(pid (\d+)\)")


class AddressTests(SynchronousTestCase):
    def test_tcp(self) -> None:
        """A ``tcp:`` description: port, interface and backlog, by name or position."""
        self.assertEqual(
            tcp_address("tcp:8899:interface=127.0.0.1"),
            TCPAddress(socket.AF_INET, "127.0.0.1", 8899, DEFAULT_BACKLOG),
        )
        self.assertEqual(
            tcp_address("tcp:port=0:backlog=7"), TCPAddress(socket.AF_INET, "", 0, 7)
        )
        self.assertEqual(
            tcp_address("tcp:80:10.0.0.1:9"), TCPAddress(socket.AF_INET, "10.0.0.1", 80, 9)
        )

    def test_tcp6(self) -> None:
        """``tcp6:``, with Twisted's escaped colons; every interface by default."""
        self.assertEqual(
            tcp_address(r"tcp6:3141:interface=\:\:1"),
            TCPAddress(socket.AF_INET6, "::1", 3141),
        )
        self.assertEqual(tcp_address("tcp6:3141"), TCPAddress(socket.AF_INET6, "::", 3141))

    def test_other_kinds(self) -> None:
        """Anything else keeps the shared socket: no address."""
        for description in (
            "unix:/run/buildcache.sock", "systemd:domain=INET:index=0",
            "ssl:443:privateKey=k.pem", "tcp:80:reuse=1", "tcp:http", "tcp:1:a:2:3",
        ):
            self.assertIsNone(tcp_address(description), description)


def _option(sock: socket.socket, name: int) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, name)


class GroupTests(SynchronousTestCase):
    def group(self, count: int, address: TCPAddress = LOCAL) -> list[socket.socket]:
        sockets = bind_group(address, count)
        for sock in sockets:
            self.addCleanup(sock.close)
        return sockets

    def test_sockets(self) -> None:
        """N listening sockets, SO_REUSEPORT set, one port, port 0 resolved."""
        sockets = self.group(3)
        self.assertEqual(len(sockets), 3)
        ports = {sock.getsockname() for sock in sockets}
        self.assertEqual(len(ports), 1)
        (host, port), = ports
        self.assertEqual(host, "127.0.0.1")
        self.assertNotEqual(port, 0)
        for sock in sockets:
            self.assertEqual(_option(sock, socket.SO_REUSEPORT), 1)
            self.assertEqual(_option(sock, socket.SO_ACCEPTCONN), 1)
            self.assertFalse(sock.getblocking())
        self.assertEqual(len({sock.fileno() for sock in sockets}), 3)

    def test_given_port(self) -> None:
        """A port given is the group's."""
        port = free_port()
        sockets = self.group(2, TCPAddress(socket.AF_INET, "127.0.0.1", port))
        self.assertEqual({s.getsockname()[1] for s in sockets}, {port})

    def test_port_in_use(self) -> None:
        """A port another socket listens on: Twisted's CannotListenError, nothing left bound."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        error = self.assertRaises(
            CannotListenError, bind_group, TCPAddress(socket.AF_INET, "127.0.0.1", port), 2
        )
        self.assertEqual(error.socketError.errno, errno.EADDRINUSE)
        self.assertIn("Address already in use", str(error))

    def test_no_joining_another_group(self) -> None:
        """
        A port the same user's other server holds with SO_REUSEPORT is in
        use too: a second server is refused, not given half the
        connections of the first.
        """
        first = self.group(2)
        port = first[0].getsockname()[1]
        error = self.assertRaises(
            CannotListenError, bind_group, TCPAddress(socket.AF_INET, "127.0.0.1", port), 2
        )
        self.assertEqual(error.socketError.errno, errno.EADDRINUSE)

    def test_burst_spread(self) -> None:
        """
        32 connections opened at once over a group of 2: the kernel puts
        them on both sockets (by a hash of each connection's addresses and
        ports: all on one has a chance of 2 in 2**32), and every one is
        queued on exactly one.
        """
        sockets = self.group(2)
        port = sockets[0].getsockname()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(BURST)]
        for client in clients:
            self.addCleanup(client.close)
        accepted = []
        for sock in sockets:
            sock.setblocking(True)
            sock.settimeout(0.5)
            count = 0
            while True:
                try:
                    conn, _ = sock.accept()
                except TimeoutError:
                    break
                conn.close()
                count += 1
            accepted.append(count)
        self.assertEqual(sum(accepted), BURST)
        self.assertNotIn(0, accepted, accepted)


class ListeningTests(TestCase):
    def site(self) -> Site:
        hello = Data(b"hello", "text/plain")
        hello.isLeaf = True
        return Site(hello)

    async def test_per_process(self) -> None:
        """
        On a TCP description with 3 processes: the main process listens
        on the group's first socket (the port's real number known), each
        worker is given its own socket of the group, the same at every
        call; stopping closes them all.
        """
        service = PerProcessListening(
            reactor, "tcp:0:interface=127.0.0.1", self.site(), processes=3
        )
        service.privilegedStartService()
        service.startService()
        assert service.port is not None
        port = service.port.getHost().port  # type: ignore[attr-defined]
        sockets = list(service.sockets)
        self.assertEqual(len(sockets), 3)
        self.assertEqual({s.getsockname()[1] for s in sockets}, {port})
        self.assertEqual(
            [service.fileno_for(n) for n in (1, 2)], [sockets[1].fileno(), sockets[2].fileno()]
        )
        self.assertEqual(service.fileno_for(1), sockets[1].fileno())
        # The main process's port is the group's first socket (a copy of it).
        self.assertEqual(
            os.fstat(service.port.fileno()).st_ino,  # type: ignore[attr-defined]
            os.fstat(sockets[0].fileno()).st_ino,
        )
        await _done(service.stopService())
        self.assertEqual(service.sockets, ())
        self.assertEqual([s.fileno() for s in sockets], [-1, -1, -1])

    async def test_cover_worker_down(self) -> None:
        """
        While worker 1 is down, the main process accepts on its socket
        too: every connection is answered, whichever socket the kernel
        gave it to; back up, the worker's socket is its own again (still
        open, no longer accepted on here).
        """
        service = PerProcessListening(
            reactor, "tcp:0:interface=127.0.0.1", self.site(), processes=2
        )
        service.privilegedStartService()
        assert service.port is not None
        port = service.port.getHost().port  # type: ignore[attr-defined]
        service.cover(1)
        service.cover(1)
        self.assertEqual(list(service.covering), [1])
        for _ in range(8):
            received = await deferToThread(_get, port)
            self.assertTrue(received.endswith(b"hello"), received)
        worker_socket = service.sockets[1]
        await _done(service.uncover(1))
        self.assertEqual(service.covering, {})
        self.assertNotEqual(worker_socket.fileno(), -1)
        self.assertEqual(_option(worker_socket, socket.SO_ACCEPTCONN), 1)
        service.cover(1)
        await _done(service.stopService())
        self.assertEqual(service.covering, {})
        self.assertEqual(worker_socket.fileno(), -1)

    async def test_shared_for_other_kinds(self) -> None:
        """A ``unix:`` description keeps one socket, shared: every worker gets it."""
        # The system's temp directory, not the test's: a checkout's own path can
        # be longer than AF_UNIX allows.
        directory = tempfile.mkdtemp(prefix="bc-ports-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = os.path.join(directory, "s")
        service = PerProcessListening(reactor, f"unix:{path}", self.site(), processes=3)
        service.privilegedStartService()
        assert service.port is not None
        self.assertEqual(service.sockets, ())
        shared = service.port.fileno()  # type: ignore[attr-defined]
        self.assertEqual([service.fileno_for(n) for n in (1, 2)], [shared, shared])
        await _done(service.stopService())

    async def test_one_process(self) -> None:
        """One process: the endpoint's own port, no group."""
        service = PerProcessListening(
            reactor, "tcp:0:interface=127.0.0.1", self.site(), processes=1
        )
        service.privilegedStartService()
        assert service.port is not None
        self.assertEqual(service.sockets, ())
        self.assertEqual(
            _option(_dup(service.port.fileno()), socket.SO_REUSEPORT), 0  # type: ignore[attr-defined]
        )
        await _done(service.stopService())

    def test_assembly(self) -> None:
        """``--workers 2`` listens per process; ``--workers 1`` is today's ListeningService."""
        for workers, kind in ((1, ListeningService), (2, PerProcessListening)):
            config = Config(
                cache_dir=self.mktemp(), workers=workers,
                proxy_endpoint="tcp:0:interface=127.0.0.1",
                index_endpoint="tcp:0:interface=127.0.0.1",
            )
            top = service_for_twistd(config, reactor)
            self.addCleanup(top.server.store.close)  # type: ignore[attr-defined]
            ports = [s for s in top if isinstance(s, ListeningService)]
            self.assertEqual(len(ports), 2)
            self.assertEqual({type(s) for s in ports}, {kind})

    def test_port_in_use_message(self) -> None:
        """A port in use stops twistd with one line naming the option and the cause."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = Config(
            cache_dir=self.mktemp(), workers=2,
            proxy_endpoint=f"tcp:{port}:interface=127.0.0.1",
            index_endpoint=f"tcp:{free_port()}:interface=127.0.0.1",
        )
        top = service_for_twistd(config, reactor)
        self.addCleanup(top.server.store.close)  # type: ignore[attr-defined]
        error = self.assertRaises(SystemExit, top.privilegedStartService)
        message = str(error.code)
        self.assertTrue(message.startswith(f"buildcache: --port tcp:{port}:"), message)
        self.assertIn("cannot listen", message)
        self.assertIn("Address already in use", message)
        for service in top:
            if isinstance(service, PerProcessListening):
                self.assertEqual(service.sockets, ())
                if service.port is not None:
                    self.addCleanup(service.port.stopListening)


async def _done(stopped: Deferred[None] | None) -> None:
    if stopped is not None:
        await stopped


def _dup(fd: int) -> socket.socket:
    sock = socket.socket(fileno=os.dup(fd))
    return sock


def _get(port: int, path: str = "/") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    received = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return received
        received += chunk


def _burst(port: int, path: str) -> list[int]:
    """
    Open :data:`BURST` connections at once (every one connected before
    any request), then one request on each; their statuses.
    """
    clients = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(BURST)]
    try:
        for client in clients:
            client.sendall(
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            )
        statuses = []
        for client in clients:
            response = _read_all(client)
            statuses.append(int(response.split(b" ", 2)[1]) if response else 0)
        return statuses
    finally:
        for client in clients:
            client.close()


class SpreadTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        fresh = {"cache-control": "max-age=3600"}
        self.upstream = FakeUpstream(bodies={"/f.bin": GatedBody(BODY, headers=fresh)})
        port = listen(self.upstream)
        self.addCleanup(port.stopListening)
        self.mirror = url_of(port).rstrip("/")

    def lines(self, process: ServerProcess, system: bytes) -> int:
        return len(re.findall(
            rb"\[" + system + rb"\] 127\.0\.0\.1 GET /up/f\.bin 200 20000 ", process.output
        ))

    async def until_logged(self, process: ServerProcess, total: int) -> tuple[int, int]:
        """The hits logged by (main, worker 1), once ``total`` are."""
        for _ in range(400):
            counts = (self.lines(process, b"access"), self.lines(process, b"worker-1,access"))
            if sum(counts) >= total:
                return counts
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"{total} hits never logged: {counts}")

    async def test_burst_served_by_both_and_restart(self) -> None:
        """
        ``twistd --workers 2``: 32 connections opened at once are served
        by both processes (a shared socket gave all of them to whichever
        woke first).  The worker SIGKILLed, a burst opened at once is all
        answered (the connections queued on its socket meanwhile wait for
        its replacement, not reset), and the replacement serves on the
        same port.
        """
        cache_dir = os.path.abspath(self.mktemp())
        process, port = spawn_server(
            self, "--workers", "2", "--cache-dir", cache_dir,
            "--mirror", f"up={self.mirror}",
        )
        await process.wait_for(b"Worker 1 serving")
        await process.wait_for(b"ProxySite starting on")
        # Stored first (a miss: the main process's, relayed or not), and
        # committed: until then the worker does not see it, and hands off.
        received = await deferToThread(_get, port, "/up/f.bin")
        self.assertTrue(received.startswith(b"HTTP/1.1 200 "), received[:100])
        self.assertTrue(received.endswith(BODY))
        await committed_entries(cache_dir, 1)
        main, worker = await self.until_logged(process, 1)
        statuses = await deferToThread(_burst, port, "/up/f.bin")
        self.assertEqual(statuses, [200] * BURST)
        main2, worker2 = await self.until_logged(process, main + worker + BURST)
        self.assertGreater(main2 - main, 0, (main2 - main, worker2 - worker))
        self.assertGreater(worker2 - worker, 0, (main2 - main, worker2 - worker))

        first = _WORKER.search(process.output)
        assert first is not None
        pid = int(first.group(1))
        os.kill(pid, signal.SIGKILL)
        await process.wait_for(b"Worker 1 (pid %d) exited (signal 9)" % pid)
        before = sum(await self.until_logged(process, 0))
        # Opened while no worker runs (its restart waits a second): those
        # the kernel gives the worker's socket are answered all the same
        # (by the main process meanwhile, or by the replacement).
        statuses = await deferToThread(_burst, port, "/up/f.bin")
        self.assertEqual(statuses, [200] * BURST)
        await self.until_logged(process, before + BURST)
        for _ in range(400):
            replacements = [int(p) for p in _WORKER.findall(process.output)]
            if len(replacements) == 2:
                break
            await deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("no new worker")
        self.assertNotEqual(replacements[1], pid)
        _, worker3 = await self.until_logged(process, 0)
        statuses = await deferToThread(_burst, port, "/up/f.bin")
        self.assertEqual(statuses, [200] * BURST)
        _, worker4 = await self.until_logged(process, before + 2 * BURST)
        self.assertGreater(worker4 - worker3, 0)
        self.assertEqual(self.upstream.requests["/f.bin"], 1)
