"""
The assembled service: make_service's parts, the real ``twistd buildcache``
process killed with SIGKILL mid-write and restarted into a consistent cache,
a refused corrupt index, and a clean stop with a download in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import sqlite3
import sys
from pathlib import Path

from attrs import define
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from buildcache.config import Config, Mirror
from buildcache.service import BuildcacheService, make_service
from buildcache.store import INDEX_NAME, Store
from tests.pyindex import DemoRelease, StaticSimpleIndex, build_index
from tests.support import (
    ChildProcess,
    Client,
    FakeUpstream,
    GatedBody,
    listen,
    pattern_bytes,
    reactor,
    url_of,
)

MB = 1024 * 1024
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@define(eq=False)
class ServerProcess(ChildProcess):
    """A ``twistd buildcache`` child whose log (on stdout) can be awaited."""

    name: str = "twistd buildcache"


def spawn_server(
    testcase: TestCase, *arguments: str,
    index_port: int | None = None,
    pypi_upstream: str = "http://127.0.0.1:9/simple",
) -> tuple[ServerProcess, int]:
    """
    A real ``twistd buildcache`` on a free proxy port (returned) and on
    ``index_port`` (a free one when not given), killed at the end of the
    test if still running.
    """
    if not os.access(TWISTD, os.X_OK):
        testcase.skipTest("twistd of this Python is not installed")
    proxy_port = free_port()
    process = ServerProcess()
    environ = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    environ["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    transport = reactor.spawnProcess(
        process, TWISTD,
        [TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "buildcache",
         "--port", f"tcp:{proxy_port}:interface=127.0.0.1",
         "--pypi-port", f"tcp:{index_port or free_port()}:interface=127.0.0.1",
         # Never the default 5000 on every interface: parallel tests
         # (and other processes) would collide on it.
         "--registry-port", f"tcp:{free_port()}:interface=127.0.0.1",
         # Never the real Docker Hub, even by mistake: nothing listens there.
         "--registry", "docker.io=http://127.0.0.1:1",
         "--pypi-upstream", pypi_upstream,
         *arguments],
        env=environ,
    )

    def end() -> Deferred[None] | None:
        if process.ended.called:
            return None
        transport.signalProcess("KILL")
        return process.ended

    testcase.addCleanup(end)
    process.transport = transport
    return process, proxy_port


async def committed_entries(cache_dir: str, count: int) -> None:
    """
    Until the index on disk holds ``count`` rows: committed, as another
    process reads them (rows of new bodies are committed in batches, and
    the server counts its own at once).
    """
    path = os.path.join(cache_dir, INDEX_NAME)
    for _ in range(200):
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            (found,) = db.execute("SELECT count(*) FROM entries").fetchone()
        if found >= count:
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"the index never held {count} committed entries")


class CrashTests(TestCase):
    async def test_sigkill_during_large_write(self) -> None:
        """
        A server killed with SIGKILL while a large body is being written
        restarts into a consistent cache: what was committed is intact,
        the interrupted body left nothing behind.
        """
        small = pattern_bytes(300_000, b"small")
        big = pattern_bytes(24 * MB, b"big")
        gate: Deferred[None] = Deferred()
        upstream = FakeUpstream()
        upstream.bodies["/pool/small.deb"] = GatedBody(small)
        upstream.bodies["/pool/big.deb"] = GatedBody(big, before_gate=8 * MB, gate=gate)
        up_port = listen(upstream)
        self.addCleanup(up_port.stopListening)
        cache_dir = os.path.abspath(self.mktemp())
        process, port = spawn_server(
            self, "--cache-dir", cache_dir,
            "--mirror", f"up={url_of(up_port).rstrip('/')}",
        )
        await process.wait_for(b"ProxySite starting on")
        client = Client()
        received = await client.get(f"http://127.0.0.1:{port}/up/pool/small.deb")
        self.assertEqual((received.status, received.body), (200, small))
        # A checked body is answered before its fsync and row (they run in
        # the store's threads, and rows are committed in batches): the kill
        # must come after it is committed.
        await committed_entries(cache_dir, 1)
        first: Deferred[None] = Deferred()
        streaming = Deferred.fromCoroutine(
            client.get(f"http://127.0.0.1:{port}/up/pool/big.deb", first_bytes=first)
        )
        await first  # the server is writing the big body now
        self.assertTrue(os.listdir(os.path.join(cache_dir, "tmp")))
        os.kill(process.transport.pid, signal.SIGKILL)
        await process.ended
        assert process.reason is not None
        self.assertIsInstance(process.reason.value, ProcessTerminated)
        cut = await streaming
        self.assertFalse(cut.complete)
        gate.callback(None)

        store = Store.open(cache_dir, 1 << 30, Clock())
        self.addCleanup(store.close)
        self.assertEqual(os.listdir(os.path.join(cache_dir, "tmp")), [])
        entries = {entry.key: entry for entry in store.keys()}
        self.assertEqual(list(entries), [f"http://127.0.0.1:{up_port.getHost().port}/pool/small.deb"])
        (entry,) = entries.values()
        stored = store.lookup(entry.key)
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(os.pread(stored.fd, len(small) + 1, 0), small)
        self.assertEqual(entry.sha256, hashlib.sha256(small).hexdigest())
        files = [f for _, _, names in os.walk(os.path.join(cache_dir, "objects")) for f in names]
        self.assertEqual(files, [entry.file])


class StartupTests(TestCase):
    async def test_corrupt_index_refused(self) -> None:
        """
        A corrupt index stops the server at start-up with a message naming
        the file, and the file is left as it was.
        """
        cache_dir = os.path.abspath(self.mktemp())
        os.makedirs(cache_dir)
        index = os.path.join(cache_dir, "index.sqlite")
        garbage = b"this is not a database at all" * 100
        with open(index, "wb") as f:
            f.write(garbage)
        process, _ = spawn_server(self, "--cache-dir", cache_dir)
        await process.ended
        assert process.reason is not None
        self.assertIsInstance(process.reason.value, ProcessTerminated)
        self.assertNotEqual(process.reason.value.exitCode, 0)
        self.assertIn(index.encode(), process.output)
        self.assertIn(b"is not a readable SQLite database", process.output)
        self.assertNotIn(b"starting on", process.output)
        # One line that says it, not a traceback that buries it.
        self.assertNotIn(b"Traceback", process.output)
        self.assertIn(b"buildcache: --cache-dir: ", process.output)
        with open(index, "rb") as f:
            self.assertEqual(f.read(), garbage)


class ServiceTests(TestCase):
    async def test_parts_and_graceful_stop(self) -> None:
        """
        make_service holds both ports; stopping it with a download in
        flight closes the ports, lets the download finish into the cache,
        then closes the store (its lock is free again).
        """
        data = pattern_bytes(3 * MB, b"grace")
        gate: Deferred[None] = Deferred()
        upstream = FakeUpstream()
        upstream.bodies["/pool/g.deb"] = GatedBody(data, before_gate=MB, gate=gate)
        up_port = listen(upstream)
        self.addCleanup(up_port.stopListening)
        proxy_port, index_port = free_port(), free_port()
        config = Config(
            cache_dir=self.mktemp(),
            proxy_endpoint=f"tcp:{proxy_port}:interface=127.0.0.1",
            index_endpoint=f"tcp:{index_port}:interface=127.0.0.1",
            mirrors=(Mirror("up", url_of(up_port).rstrip("/")),),
        )
        service = make_service(config, reactor)
        self.assertIsInstance(service, BuildcacheService)
        service.privilegedStartService()
        service.startService()
        client = Client(persistent=True)
        index_page = await client.get(f"http://127.0.0.1:{index_port}/")
        self.assertEqual(index_page.status, 200)
        first: Deferred[None] = Deferred()
        downloading = Deferred.fromCoroutine(
            client.get(f"http://127.0.0.1:{proxy_port}/up/pool/g.deb", first_bytes=first)
        )
        await first
        stopped = service.stopService()
        # The store waits for the download before closing.
        self.assertFalse(stopped.called)
        gate.callback(None)
        await stopped
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy_port), timeout=5).close()
        received = await downloading
        await client.close()
        self.assertEqual((received.complete, received.sha256),
                         (True, hashlib.sha256(data).hexdigest()))
        store = Store.open(config.cache_dir, config.max_size, Clock())
        self.addCleanup(store.close)
        self.assertEqual(store.entry_count, 1)

    async def test_stop_keeps_a_read_ahead(self) -> None:
        """
        Stopping right after a client read a wheel's metadata: the wheel
        read ahead (in the thread-pool store of make_service) is stored
        whole before the store closes.
        """
        index = build_index(Path(self.mktemp()), releases=(DemoRelease("six", "1.16.0"),))
        pypi_port = listen(StaticSimpleIndex(index))
        self.addCleanup(pypi_port.stopListening)
        index_port = free_port()
        config = Config(
            cache_dir=self.mktemp(),
            proxy_endpoint=f"tcp:{free_port()}:interface=127.0.0.1",
            index_endpoint=f"tcp:{index_port}:interface=127.0.0.1",
            pypi_upstreams=(url_of(pypi_port, "/simple"),),
        )
        service = make_service(config, reactor)
        service.privilegedStartService()
        service.startService()
        client = Client()
        page = await client.get(
            f"http://127.0.0.1:{index_port}/simple/six/",
            {"accept": "application/vnd.pypi.simple.v1+json"},
        )
        self.assertEqual(page.status, 200)
        wheel = "six-1.16.0-py3-none-any.whl"
        metadata = await client.get(f"http://127.0.0.1:{index_port}/files/six/{wheel}.metadata")
        self.assertEqual(metadata.status, 200)
        await client.close()
        await service.stopService()
        store = Store.open(config.cache_dir, config.max_size, Clock())
        self.addCleanup(store.close)
        stored = {entry.key.rsplit("/", 1)[-1]: entry for entry in store.keys()}
        self.assertIn(wheel, stored)
        self.assertEqual(stored[wheel].sha256, hashlib.sha256(index.content(wheel)).hexdigest())

    def test_port_in_use_is_one_line_naming_the_option(self) -> None:
        """
        A port another program holds (devpi on 3141, say) stops start-up
        with one line naming the option and the address, not a traceback.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = Config(
            cache_dir=self.mktemp(),
            proxy_endpoint=f"tcp:{port}:interface=127.0.0.1",
            index_endpoint=f"tcp:{free_port()}:interface=127.0.0.1",
        )
        service = make_service(config, reactor)
        self.addCleanup(service.server.store.close)  # type: ignore[attr-defined]
        error = self.assertRaises(SystemExit, service.privilegedStartService)
        message = str(error.code)
        self.assertTrue(message.startswith(f"buildcache: --port tcp:{port}:"), message)
        self.assertIn("Address already in use", message)

    def test_unix_path_too_long(self) -> None:
        """
        A UNIX socket path longer than the system allows stops start-up
        with one line, and leaves nothing running: the site, which Twisted
        starts before it binds, is stopped again (its timer was left
        behind, and the reactor unclean).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "x" * 120)
        config = Config(
            cache_dir=self.mktemp(),
            proxy_endpoint=f"unix:{path}",
            index_endpoint=f"tcp:{free_port()}:interface=127.0.0.1",
        )
        service = make_service(config, reactor)
        self.addCleanup(service.server.store.close)  # type: ignore[attr-defined]
        error = self.assertRaises(SystemExit, service.privilegedStartService)
        message = str(error.code)
        self.assertTrue(message.startswith(f"buildcache: --port unix:{path}: "), message)
        self.assertIn("AF_UNIX path too long", message)
        proxy_site = service.server.proxy_site  # type: ignore[attr-defined]
        self.assertEqual(proxy_site.numPorts, 0)


class StartupEvictionTests(TestCase):
    def test_evictions_at_start_are_counted(self) -> None:
        """
        Reopening a cache under a lower --max-size evicts at once, before
        any request: those evictions are in the server's figures (they
        happened before its accounting existed, and went uncounted).
        """
        cache_dir = self.mktemp()
        store = Store.open(cache_dir, 10_000, Clock())
        for name in ("a", "b", "c"):
            writer = store.writer(f"http://127.0.0.1:9/{name}.deb")
            writer.write(b"x" * 2000)
            writer.commit({})
        store.close()
        config = Config(
            cache_dir=cache_dir,
            max_size=3000,
            proxy_endpoint=f"tcp:{free_port()}:interface=127.0.0.1",
            index_endpoint=f"tcp:{free_port()}:interface=127.0.0.1",
            pypi_upstreams=("http://127.0.0.1:9/simple",),
        )
        service = make_service(config, reactor)
        assert isinstance(service, BuildcacheService)
        self.addCleanup(service.server.store.close)
        activity = service.server.activity
        self.assertEqual(activity.evictions, 2)
        self.assertGreaterEqual(activity.bytes_evicted, 4000)


class TacTests(TestCase):
    async def test_json_log_format_refused_with_a_reason(self) -> None:
        """
        A .tac cannot hand twistd a log observer: --log-format json in
        BUILDCACHE_ARGS stops start-up with a line saying what to do.
        """
        from twisted.internet.utils import getProcessOutputAndValue

        tac = os.path.join(os.path.dirname(os.path.dirname(__file__)), "buildcache.tac")
        environ = {
            **os.environ,
            "BUILDCACHE_ARGS": f"--log-format json --cache-dir {self.mktemp()}"
            " --pypi-upstream http://127.0.0.1:9/simple",
        }
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["--nodaemon", "--pidfile=", "--logfile=-", "-y", tac],
            env=environ, reactor=reactor,
        )
        self.assertNotEqual(code, 0)
        self.assertIn(b"--logger=buildcache.ops.logs.json_observer", out + err)


class NetrcPermissionTests(TestCase):
    def make(self, mode: int) -> list[dict[str, object]]:
        netrc = os.path.abspath(self.mktemp())
        with open(netrc, "w") as f:
            f.write("machine 127.0.0.1 login u password p\n")
        os.chmod(netrc, mode)
        config = Config(cache_dir=self.mktemp(), netrc_file=netrc)
        with capturedLogs() as events:
            service = make_service(config, reactor)
        # Never started: only the store to close.
        assert isinstance(service, BuildcacheService)
        service.server.store.close()
        return [e for e in events if e.get("event") == "netrc_readable_by_others"]

    def test_readable_by_others_warned(self) -> None:
        """
        A --netrc file others can read is named in a warning at start-up
        (curl and pip expect 0600); its content is not.
        """
        (warning,) = self.make(0o644)
        self.assertTrue(str(warning["path"]).endswith(os.sep + "temp"), warning["path"])
        self.assertNotIn("login u", repr(warning))
        self.assertEqual(self.make(0o600), [])
