"""
Hand-off end to end, in one process over real sockets (issue 16): a main
:class:`~buildcache.service.Server` (writing store, real fetcher, a local
origin) with its relay listeners, and a hits-only server on the same
cache directory (read-only store) listening on its own port, as a hit
worker does.  Clients (curl, pip, Twisted's agent, a raw socket) talk to
the worker's port only: its misses are relayed to the main process and
served there byte for byte, its fresh hits are served by the worker.
"""

from __future__ import annotations

import os
import re
import socket
import stat
import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    UNIXClientEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource

from buildcache.config import Config, Mirror, Registry
from buildcache.frontends.channel import ProxyChannel
from buildcache.frontends.relay import (
    HANDOVER_MOST_BYTES,
    RelayListeners,
    handover_path,
)
from buildcache.service import BuildcacheService, Server
from buildcache.store import Store
from tests.oci_origin import ALL_MANIFESTS, OciOrigin, start_origin
from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    listen,
    pattern_bytes,
    reactor,
    url_of,
)
from tests.test_pip_e2e import clean_environment

FRESH = {"cache-control": "max-age=600"}


class RawClient(Protocol):
    """Sends its bytes at once, and keeps everything until the server closes."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.received: list[bytes] = []
        self.closed: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.data)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)
        waiting = self.waiting
        if waiting is not None and b"".join(self.received).endswith(waiting[0]):
            self.waiting = None
            waiting[1].callback(None)

    waiting: tuple[bytes, Deferred[None]] | None = None

    def until_ends_with(self, tail: bytes) -> Deferred[None]:
        """Fires once what was received ends with ``tail``."""
        arrived: Deferred[None] = Deferred()
        self.waiting = (tail, arrived)
        return arrived

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.closed.callback(b"".join(self.received))


def responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses (all with a Content-Length) in ``raw``, in order."""
    found = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        found.append((int(lines[0].split()[1]), headers, rest[:length]))
        raw = rest[length:]
    return found


class HandOffTests(TestCase):
    """
    Hand-off by hand-over: the worker gives each connection it hands off
    to the main process (its socket), which answers the client directly.
    """

    timeout = 120
    #: Whether the worker relays connections instead (see RelayFallbackTests).
    relay_only = False

    def handed(self) -> int:
        """Connections the worker handed off so far, the way this class hands off."""
        handed_over, relayed = self.listeners.adopted, self.listeners.accepted
        if self.relay_only:
            self.assertEqual(handed_over, 0)
            return relayed
        self.assertEqual(relayed, 0)
        return handed_over

    def setUp(self) -> None:
        self.access: list[LogEvent] = []
        self.events: list[LogEvent] = []

        def observe(event: LogEvent) -> None:
            self.events.append(event)
            if event.get("log_system") == "access":
                self.access.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def start(self, upstream: Resource, **changes: Any) -> None:
        """The main server, its relay listeners, and a worker on its own port."""
        up = listen(upstream)
        self.addCleanup(up.stopListening)
        cache_dir = self.mktemp()
        config = Config(
            cache_dir=cache_dir, mirrors=(Mirror("up", url_of(up).rstrip("/")),),
            **changes,
        )
        store = Store.open(config.cache_dir, config.max_size, reactor)
        self.main = main = Server.build(config, reactor, store)
        main_proxy = reactor.listenTCP(0, main.proxy_site, interface="127.0.0.1")
        main_index = reactor.listenTCP(0, main.index_site, interface="127.0.0.1")
        main.index_listening(main_index)
        self.main_port = main_proxy.getHost().port
        self.listeners: RelayListeners = main.relay_listeners(reactor)
        self.listeners.privilegedStartService()
        self.listeners.startService()
        self.assertEqual(
            {name: os.path.dirname(p) for name, p in self.listeners.paths.items()},
            {name: self.listeners.directory for name in main.sites()},
        )
        self.assertEqual(os.stat(self.listeners.directory).st_mode & 0o777, 0o700)
        reader = Store.open(config.cache_dir, config.max_size, reactor, read_only=True)
        self.worker = worker = Server.build(
            config, reactor, reader, hits_only=True, relays=self.listeners.paths,
        )
        worker_proxy = reactor.listenTCP(0, worker.proxy_site, interface="127.0.0.1")
        worker_index = reactor.listenTCP(0, worker.index_site, interface="127.0.0.1")
        worker.index_listening(worker_index)
        self.port = worker_proxy.getHost().port
        self.index_port = worker_index.getHost().port
        if self.relay_only:
            for site in worker.sites().values():
                site.relay = attrs.evolve(site.relay, hand_over=False)
        worker_ports = [worker_proxy, worker_index]
        if config.registry_endpoint is not None:
            worker_registry = reactor.listenTCP(
                0, worker.registry_site, interface="127.0.0.1"
            )
            worker_ports.append(worker_registry)
            self.registry_port = worker_registry.getHost().port

        async def stop() -> None:
            for port in worker_ports:
                await port.stopListening()
            await worker.connections.drain()
            await main.relayed.drain()
            await self.listeners.stopService()
            self.assertFalse(os.path.exists(self.listeners.directory))
            await main_proxy.stopListening()
            await main_index.stopListening()
            await main.connections.drain()
            assert main.pool is not None
            await main.pool.closeCachedConnections()
            reader.close()
            store.close()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))

    async def curl(self, url: str, *options: str) -> tuple[dict[str, str], bytes]:
        out, err, code = await getProcessOutputAndValue(
            "curl", ["-s", "-S", "-D", "-", *options, url], reactor=reactor,
            env={"PATH": os.environ.get("PATH", "/usr/bin")},
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        [(status, headers, body)] = responses(out)
        headers[":status"] = str(status)
        return headers, body

    async def raw(self, data: bytes) -> bytes:
        client = RawClient(data)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        return await client.closed

    def access_lines(self, url_part: str) -> list[tuple[str, str | None]]:
        return [
            (event["client"], event.get("cache"))
            for event in self.access if url_part in event.get("url", "")
        ]

    async def test_miss_relayed_then_hit_in_the_worker(self) -> None:
        """
        A miss is relayed and answered by the main process, byte for
        byte, one upstream request; the next request is a hit the worker
        serves without a relay.  The main process logs the real client.
        """
        data = pattern_bytes(300_000, b"miss")
        upstream = FakeUpstream(bodies={"/f.bin": GatedBody(data, headers=FRESH)})
        self.start(upstream)
        url = f"http://127.0.0.1:{self.port}/up/f.bin"
        headers, body = await self.curl(url)
        self.assertEqual((headers[":status"], headers["x-cache"]), ("200", "MISS"))
        self.assertEqual(body, data)
        self.assertEqual(self.handed(), 1)
        headers, body = await self.curl(url)
        self.assertEqual((headers[":status"], headers["x-cache"]), ("200", "HIT"))
        self.assertEqual(body, data)
        self.assertEqual(self.handed(), 1)
        self.assertEqual(upstream.requests["/f.bin"], 1)
        # One line each: the relayed miss by the main process (with the
        # client's own address, not the relay socket's), the hit by the
        # worker; the hand-off itself is not a line.
        self.assertEqual(
            self.access_lines("/up/f.bin"), [("127.0.0.1", "MISS"), ("127.0.0.1", "HIT")]
        )

    async def test_keep_alive_connection_keeps_working(self) -> None:
        """
        The requests after a hand-off on the same connection are the main
        process's: answered there, hits and misses alike.
        """
        upstream = FakeUpstream(bodies={
            "/a.bin": GatedBody(b"a" * 1000, headers=FRESH),
            "/b.bin": GatedBody(b"b" * 2000, headers=FRESH),
        })
        self.start(upstream)
        client = Client(persistent=True)
        self.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
        base = f"http://127.0.0.1:{self.port}/up"
        got = [await client.get(f"{base}/{name}") for name in ("a.bin", "a.bin", "b.bin", "b.bin")]
        self.assertEqual(
            [(r.status, r.header("x-cache"), r.body[:1], len(r.body)) for r in got],
            [(200, "MISS", b"a", 1000), (200, "HIT", b"a", 1000),
             (200, "MISS", b"b", 2000), (200, "HIT", b"b", 2000)],
        )
        self.assertEqual(self.handed(), 1)
        self.assertEqual(dict(upstream.requests), {"/a.bin": 1, "/b.bin": 1})

    async def test_pipelined_requests_survive(self) -> None:
        upstream = FakeUpstream(bodies={
            "/hit.bin": GatedBody(b"h" * 500, headers=FRESH),
            "/miss.bin": GatedBody(b"m" * 700, headers=FRESH),
        })
        self.start(upstream)
        stored = await Client().get(f"http://127.0.0.1:{self.main_port}/up/hit.bin")
        self.assertEqual(stored.header("x-cache"), "MISS")

        def get(path: str, close: bool = False) -> bytes:
            last = "Connection: close\r\n" if close else ""
            return f"GET /up/{path} HTTP/1.1\r\nHost: box\r\n{last}\r\n".encode()

        raw = await self.raw(get("hit.bin") + get("miss.bin") + get("hit.bin", close=True))
        self.assertEqual(
            [(status, h["x-cache"], body) for status, h, body in responses(raw)],
            [(200, "HIT", b"h" * 500), (200, "MISS", b"m" * 700), (200, "HIT", b"h" * 500)],
        )
        self.assertEqual(self.handed(), 1)
        self.assertEqual(dict(upstream.requests), {"/hit.bin": 1, "/miss.bin": 1})

    async def test_connect_is_judged_by_the_main_process_with_the_real_client(self) -> None:
        """
        ``--allow-from`` that leaves the client out: its CONNECT, handed
        off at once, is refused by the main process, which saw the
        client's own address through the PROXY line.
        """
        self.start(FakeUpstream(), allow_from=("10.0.0.0/8",))
        raw = await self.raw(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
        )
        [(status, _, body)] = responses(raw)
        self.assertEqual(status, 403)
        self.assertIn(b"127.0.0.1", body)
        self.assertEqual(self.handed(), 1)
        refused = [e for e in self.events if e.get("event") == "tunnel_refused"]
        self.assertEqual(len(refused), 1)
        self.assertTrue(refused[0]["client"].startswith("127.0.0.1:"))

    async def test_main_side_closing_closes_the_client(self) -> None:
        """
        A response the main process cuts (its upstream broke off) ends
        the relay, and the client's connection with it.
        """
        upstream = FakeUpstream(bodies={
            "/cut.bin": GatedBody(b"c" * 100_000, cut_at=1000, headers=FRESH),
        })
        self.start(upstream)
        got = await Client(persistent=True).get(f"http://127.0.0.1:{self.port}/up/cut.bin")
        self.assertFalse(got.complete)
        self.assertEqual(self.handed(), 1)

    async def test_stopping_main_drains_relayed_connections(self) -> None:
        """
        An idle keep-alive connection relayed to the main process is
        closed when the main process drains (on stop), and the worker
        closes the client with it.
        """
        upstream = FakeUpstream(bodies={"/k.bin": GatedBody(b"k" * 5000, headers=FRESH)})
        self.start(upstream)
        client = RawClient(b"GET /up/k.bin HTTP/1.1\r\nHost: box\r\n\r\n")
        answered = client.until_ends_with(b"k" * 5000)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        await answered
        self.assertFalse(client.closed.called)
        # Relayed, the main process holds the relay's connection; handed
        # over, the client's own, in the port's table.
        await (self.main.relayed if self.relay_only else self.main.connections).drain()
        [(status, headers, body)] = responses(await client.closed)
        self.assertEqual((status, headers["x-cache"], body), (200, "MISS", b"k" * 5000))

    async def test_status_page_is_the_main_processs(self) -> None:
        self.start(FakeUpstream())
        headers, body = await self.curl(f"http://127.0.0.1:{self.port}/-/stats.json")
        self.assertEqual(headers[":status"], "200")
        self.assertEqual(self.handed(), 1)
        self.assertEqual(self.access_lines("/-/"), [])

    async def test_registry_through_the_worker(self) -> None:
        """
        The registry port: a manifest and a blob are relayed when missed,
        then served by the worker (tag within its TTL, blob by digest).
        """
        origin = OciOrigin()
        image = origin.push_image("team/app", "t1", [pattern_bytes(100_000, b"l1")])
        origin_url = start_origin(self, origin)
        self.start(
            FakeUpstream(), registry_endpoint="tcp:0:interface=127.0.0.1",
            registries=(Registry("127.0.0.1:5001", origin_url, None),),
        )
        base = f"http://127.0.0.1:{self.registry_port}/v2/team/app"
        manifest = f"{base}/manifests/t1?ns=127.0.0.1:5001"
        blob = f"{base}/blobs/{image.layers[0]}?ns=127.0.0.1:5001"
        client = Client()
        rounds = []
        for _ in range(2):
            got_manifest = await client.get(manifest, {"accept": ALL_MANIFESTS})
            got_blob = await client.get(blob)
            rounds.append((
                got_manifest.status, got_manifest.header("x-cache"),
                got_manifest.body == image.manifest,
                got_blob.status, got_blob.header("x-cache"),
                got_blob.body == pattern_bytes(100_000, b"l1"),
                self.handed(),
            ))
        self.assertEqual(rounds, [
            (200, "MISS", True, 200, "MISS", True, 2),
            (200, "HIT", True, 200, "HIT", True, 2),
        ])
        self.assertEqual(origin.count("/v2/team/app/manifests/t1"), 1)

    async def test_pip_through_the_worker(self) -> None:
        """
        pip installs through the worker's index port: cold, everything
        is relayed; warm, every page and file is a hit the worker serves
        (no relay, no upstream request).
        """
        fixture = build_index(Path(self.mktemp()))
        origin = StaticSimpleIndex(fixture)
        origin_port = listen(origin)
        self.addCleanup(origin_port.stopListening)
        self.start(FakeUpstream(), pypi_upstreams=(url_of(origin_port, "/simple"),))
        work = Path(self.mktemp()).resolve()
        work.mkdir()

        async def pip(target: str) -> None:
            out, err, code = await getProcessOutputAndValue(
                sys.executable,
                ["-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                 "--no-input", "--index-url", f"http://127.0.0.1:{self.index_port}/simple/",
                 "--target", str(work / target), "bcdemo-a"],
                env=clean_environment({"PIP_CONFIG_FILE": os.devnull}), path=str(work),
                reactor=reactor,
            )
            self.assertEqual(code, 0, (out + err).decode(errors="replace"))
            self.assertEqual(
                (work / target / "bcdemo_b" / "__init__.py").read_text(),
                '__version__ = "1.0"\n',
            )

        self.assertIsNone(self.worker.index.prefetcher)
        await pip("cold")
        relayed, asked = self.handed(), sum(origin.requests.values())
        self.assertGreater(relayed, 0)
        await pip("warm")
        self.assertEqual(sum(origin.requests.values()), asked)
        self.assertEqual(self.handed(), relayed)


    async def test_core_metadata_of_a_file_not_stored_goes_to_the_main_process(self) -> None:
        """
        A worker hands off a file's core metadata while the file itself
        is not stored, stored metadata or not: the main process reads the
        file ahead when it serves the metadata, and would never see the
        request otherwise.  Once the file is stored, the worker answers.
        """
        fixture = build_index(Path(self.mktemp()))
        origin = StaticSimpleIndex(fixture)
        origin_port = listen(origin)
        self.addCleanup(origin_port.stopListening)
        # No read-ahead of files: the file is stored only when asked for.
        self.start(
            FakeUpstream(), pypi_upstreams=(url_of(origin_port, "/simple"),),
            prefetch_max_size=0,
        )
        main_index = self.main.index_site
        main_port = reactor.listenTCP(0, main_index, interface="127.0.0.1")
        self.addCleanup(main_port.stopListening)
        main = f"http://127.0.0.1:{main_port.getHost().port}"
        worker = f"http://127.0.0.1:{self.index_port}"
        _, page = await self.curl(f"{main}/simple/bcdemo-a/")
        wheel = re.findall(rb'href="[^"]*?/(bcdemo_a-[^"#/]*?\.whl)', page)[0]
        files = f"/files/bcdemo-a/{wheel.decode()}"
        headers, _ = await self.curl(f"{main}{files}.metadata")
        self.assertEqual(headers[":status"], "200")
        relayed = self.handed()
        headers, _ = await self.curl(f"{worker}{files}.metadata")
        self.assertEqual((headers[":status"], headers["x-cache"]), ("200", "HIT"))
        self.assertEqual(self.handed(), relayed + 1)
        headers, _ = await self.curl(f"{main}{files}")
        self.assertEqual(headers[":status"], "200")
        headers, _ = await self.curl(f"{worker}{files}.metadata")
        self.assertEqual((headers[":status"], headers["x-cache"]), ("200", "HIT"))
        self.assertEqual(self.handed(), relayed + 1)


class HandOverTests(HandOffTests):
    """What only a hand-over does: counting, and what the main process refuses."""

    async def test_counted_by_the_main_process_even_at_the_cap(self) -> None:
        """
        With one connection per client allowed and one already open to
        the main process, a connection the worker admitted and hands over
        is still served: the worker admitted it, and the main process
        counts it (2 from this client) until it closes; the worker's slot
        is free at once.
        """
        upstream = FakeUpstream(bodies={"/c.bin": GatedBody(b"c" * 3000, headers=FRESH)})
        self.start(upstream, max_connections_per_client=1)
        direct = Client(persistent=True)
        self.addCleanup(lambda: Deferred.fromCoroutine(direct.close()))
        await direct.get(f"http://127.0.0.1:{self.main_port}/-/stats.json")
        self.assertEqual(self.main.connections.open_from("127.0.0.1"), 1)
        client = RawClient(b"GET /up/c.bin HTTP/1.1\r\nHost: box\r\n\r\n")
        answered = client.until_ends_with(b"c" * 3000)
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        await answered
        self.assertEqual(self.handed(), 1)
        self.assertEqual(self.main.connections.open_from("127.0.0.1"), 2)
        self.assertEqual(self.worker.connections.open_from("127.0.0.1"), 0)
        assert client.transport is not None
        client.transport.loseConnection()
        await client.closed
        while self.main.connections.open_from("127.0.0.1") != 1:
            await deferLater(reactor, 0.01, lambda: None)

    def test_a_hand_over_without_one_connection_is_dropped(self) -> None:
        """
        A hand-over message that brings no socket (or several) is dropped
        with an error event, and every descriptor it brought is closed.
        """
        self.start(FakeUpstream())
        left, right = socket.socketpair()
        self.addCleanup(right.close)
        fds = [left.detach(), os.dup(right.fileno())]
        self.listeners.adopt("proxy", fds, b"GET / HTTP/1.1\r\n\r\n")
        self.listeners.adopt("proxy", [], b"GET / HTTP/1.1\r\n\r\n")
        for fd in fds:
            self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(self.listeners.adopted, 0)
        self.assertEqual(
            [e["count"] for e in self.events if e.get("event") == "relay_failed"], [2, 0]
        )

    async def test_an_oversized_hand_over_is_cut(self) -> None:
        """
        More than HANDOVER_MOST_BYTES on a hand-over socket: the main
        process cuts it and adopts nothing.
        """
        self.start(FakeUpstream())
        client = RawClient(b"x" * (HANDOVER_MOST_BYTES + 65536))
        await connectProtocol(
            UNIXClientEndpoint(reactor, handover_path(self.listeners.paths["proxy"])), client
        )
        await client.closed
        self.assertEqual(self.listeners.adopted, 0)
        self.assertEqual(
            [e["size"] for e in self.events if e.get("event") == "relay_failed"], [0]
        )

    def test_a_channel_keeps_less_than_a_hand_over_brings(self) -> None:
        self.assertLess(ProxyChannel().raw_limit, HANDOVER_MOST_BYTES)

    async def test_main_process_unreachable(self) -> None:
        """
        The hand-over socket gone: the client is answered 503, and the
        error is logged.
        """
        self.start(FakeUpstream())
        os.unlink(handover_path(self.listeners.paths["proxy"]))
        raw = await self.raw(b"GET /up/x.bin HTTP/1.1\r\nHost: box\r\n\r\n")
        [(status, _, body)] = responses(raw)
        self.assertEqual(status, 503)
        self.assertIn(b"could not reach the main process", body)
        self.assertEqual(len([e for e in self.events if e.get("event") == "relay_failed"]), 1)


class RelayFallbackTests(HandOffTests):
    """
    The same, by the relay a worker falls back to when it cannot give a
    connection away: every byte through the worker, to and fro.
    """

    relay_only = True


# Run through its two subclasses only.
del HandOffTests


class MainServiceTests(TestCase):
    async def test_relay_paths_of_the_running_service(self) -> None:
        """
        ``BuildcacheService.relay_paths`` (what the worker pool asks):
        relay sockets listening in a private directory from the first
        call, stopped after the service's other children (a pool draining
        its workers still relays), the directory removed.
        """
        config = Config(cache_dir=self.mktemp())
        store = Store.open(config.cache_dir, config.max_size, reactor)
        top = BuildcacheService(Server.build(config, reactor, store), reactor)
        seen_at_stop: list[bool] = []

        class Pool(Service):
            def stopService(self) -> None:
                super().stopService()
                seen_at_stop.append(all(os.path.exists(p) for p in paths.values()))

        Pool().setServiceParent(top)
        top.startService()
        paths = top.relay_paths()
        self.assertEqual(sorted(paths), ["index", "proxy"])
        self.assertIs(top.relay_paths(), paths)
        directory = os.path.dirname(paths["proxy"])
        self.assertEqual(os.stat(directory).st_mode & 0o777, 0o700)
        self.assertTrue(all(stat.S_ISSOCK(os.stat(p).st_mode) for p in paths.values()))
        await top.stopService()
        self.assertEqual(seen_at_stop, [True])
        self.assertFalse(os.path.exists(directory))
