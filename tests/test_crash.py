"""
Crash consistency of the real service: a ``twistd buildcache`` child
serving parallel downloads is killed with SIGKILL at a moment chosen by a
seeded random generator ("after N bytes have reached the clients"), its
cache directory is checked file by file against its index, and the
restarted service must serve every stored entry as a HIT.

Each seed picks the file sizes, which downloads stall half-way (their
upstream holds the rest back, so their bodies are being written when the
kill comes) and the kill moment; nothing waits on a timer.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import sqlite3

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from buildcache.engine.keys import cache_key
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    listen,
    pattern_bytes,
    reactor,
    url_of,
)
from tests.test_service import MB, spawn_server

#: Parallel downloads per seed.
DOWNLOADS = 8
#: What the store logs once it has reconciled the directory at start-up.
_RECONCILED = re.compile(
    rb"Cache .*?: (\d+) entries, \d+ bytes; removed (\d+) interrupted writes,"
    rb" (\d+) orphan files, (\d+) rows without a good file"
)
_STARTED = b"ProxySite starting on"

log = Logger()


@frozen
class DiskState:
    """
    What a cache directory holds, read directly (no Store involved).

    :ivar rows: index rows by key: (object file name, size, sha256).
    :ivar corrupt: keys whose file is missing, or differs from its row's
        size or digest, or from the body the upstream served.
    :ivar orphans: object files no row names.
    :ivar temporary: files in ``tmp/``.
    """

    rows: dict[str, tuple[str, int, str]]
    corrupt: list[str]
    orphans: list[str]
    temporary: list[str]


def read_disk(cache_dir: str, served: dict[str, bytes]) -> DiskState:
    """
    Check every row of ``cache_dir``'s index against its object file
    (re-hashing it) and against ``served``, the bodies by cache key.
    """
    index = sqlite3.connect(
        f"file:{os.path.join(cache_dir, 'index.sqlite')}?mode=ro", uri=True
    )
    try:
        rows = {
            key: (name, size, digest)
            for key, name, size, digest in index.execute(
                "SELECT key, file, size, sha256 FROM entries"
            )
        }
    finally:
        index.close()
    corrupt = []
    for key, (name, size, digest) in rows.items():
        path = os.path.join(cache_dir, "objects", name[:2], name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            corrupt.append(key)
            continue
        if (
            len(data) != size
            or hashlib.sha256(data).hexdigest() != digest
            or served.get(key) != data
        ):
            corrupt.append(key)
    named = {name for name, _, _ in rows.values()}
    objects = os.path.join(cache_dir, "objects")
    orphans = [
        os.path.join(directory, name)
        for directory, _, names in os.walk(objects)
        for name in names
        if name not in named
    ]
    return DiskState(
        rows, sorted(corrupt), sorted(orphans), sorted(os.listdir(os.path.join(cache_dir, "tmp")))
    )


@define(eq=False)
class KillSwitch:
    """
    Counts the body bytes every client received and kills the server
    with SIGKILL once ``after`` bytes have arrived.
    """

    after: int
    pid: int = 0
    received: int = 0
    fired: bool = False

    def count(self, size: int) -> None:
        self.received += size
        if not self.fired and self.received >= self.after:
            self.fired = True
            os.kill(self.pid, signal.SIGKILL)


class _Counting(Protocol):
    def __init__(self, switch: KillSwitch, done: Deferred[tuple[bytes, Failure]]) -> None:
        self._switch = switch
        self._done = done
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)
        self._switch.count(len(data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._done.callback((b"".join(self._chunks), reason))


async def download(agent: Agent, url: str, switch: KillSwitch) -> bool:
    """
    GET ``url``, counting body bytes on ``switch``; whether the whole body
    arrived.
    """
    try:
        response = await agent.request(b"GET", url.encode("ascii"), Headers())
    except Exception:
        return False
    done: Deferred[tuple[bytes, Failure]] = Deferred()
    response.deliverBody(_Counting(switch, done))
    _, reason = await done
    return reason.check(ResponseDone) is not None


@define
class Scenario:
    """
    One seed's files: which stall half-way, and when the kill comes.
    """

    seed: int
    bodies: dict[str, GatedBody] = field(factory=dict)
    kill_after: int = 0

    @classmethod
    def make(cls, seed: int) -> Scenario:
        rng = random.Random(seed)
        scenario = cls(seed)
        stalled = set(rng.sample(range(DOWNLOADS), rng.randint(1, 3)))
        reachable = 0
        for number in range(DOWNLOADS):
            size = rng.randint(100_000, 3 * MB)
            data = pattern_bytes(size, f"{seed}-{number}".encode())
            path = f"/pool/s{seed}-{number}.deb"
            if number in stalled:
                before = rng.randint(64 * 1024, size - 1)
                scenario.bodies[path] = GatedBody(data, before_gate=before, gate=Deferred())
                reachable += before
            else:
                scenario.bodies[path] = GatedBody(data)
                reachable += size
        # Bytes that reach the clients whatever the timing: the kill always
        # comes, somewhere between the first responses and the stall.
        scenario.kill_after = rng.randint(reachable // 4, reachable - 1)
        return scenario

    def release(self) -> None:
        for body in self.bodies.values():
            if body.gate is not None and not body.gate.called:
                body.gate.callback(None)


class SigkillTests(TestCase):
    """
    SIGKILL at random points of parallel downloads, for three seeds.
    """

    timeout = 60

    async def crash_and_restart(self, seed: int) -> None:
        scenario = Scenario.make(seed)
        upstream = FakeUpstream(bodies=dict(scenario.bodies))
        up_port = listen(upstream)
        self.addCleanup(up_port.stopListening)
        self.addCleanup(scenario.release)
        mirror = url_of(up_port).rstrip("/")
        served = {cache_key(f"{mirror}{path}"): body.data for path, body in scenario.bodies.items()}
        cache_dir = os.path.abspath(self.mktemp())
        arguments = ("--cache-dir", cache_dir, "--mirror", f"up={mirror}")

        process, port = spawn_server(self, *arguments)
        await process.wait_for(_STARTED)
        assert process.transport is not None
        switch = KillSwitch(scenario.kill_after, process.transport.pid)
        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, pool=pool)
        outcomes = await gatherResults([
            Deferred.fromCoroutine(download(agent, f"http://127.0.0.1:{port}/up{path}", switch))
            for path in scenario.bodies
        ])
        await process.ended
        self.assertTrue(switch.fired)
        scenario.release()

        after_kill = read_disk(cache_dir, served)
        self.assertEqual(after_kill.corrupt, [])
        # A stalled body never reached its end: it cannot have been stored.
        stalled = {
            cache_key(f"{mirror}{path}")
            for path, body in scenario.bodies.items() if body.gate is not None
        }
        self.assertEqual(set(after_kill.rows) & stalled, set())
        whole = [ok for ok in outcomes if ok]

        restarted, port = spawn_server(self, *arguments)
        await restarted.wait_for(_STARTED)
        reconciled = _RECONCILED.search(restarted.output)
        assert reconciled is not None, restarted.output.decode(errors="replace")
        entries, temporary, orphans, dropped = map(int, reconciled.groups())
        self.assertEqual(
            (entries, temporary, orphans, dropped),
            (len(after_kill.rows), len(after_kill.temporary), len(after_kill.orphans), 0),
        )
        restart = read_disk(cache_dir, served)
        self.assertEqual(
            (restart.rows, restart.corrupt, restart.orphans, restart.temporary),
            (after_kill.rows, [], [], []),
        )

        asked_before = sum(upstream.requests.values())
        client = Client()
        statuses = {}
        for path, body in scenario.bodies.items():
            received = await client.get(f"http://127.0.0.1:{port}/up{path}")
            self.assertEqual((received.status, received.body), (200, body.data), path)
            statuses[cache_key(f"{mirror}{path}")] = received.header("x-cache")
        self.assertEqual(
            {key for key, status in statuses.items() if status == "HIT"}, set(after_kill.rows)
        )
        self.assertEqual(
            sum(upstream.requests.values()) - asked_before,
            DOWNLOADS - len(after_kill.rows),
        )
        log.info(
            "Crash seed {seed}: killed after {kill_after} bytes to clients"
            " ({whole} of {downloads} bodies whole); {entries} entries checked,"
            " {corrupt} corrupt, {orphans} orphans and {temporary} partial"
            " files before restart, 0 after; {hits} HITs after restart",
            seed=seed,
            kill_after=switch.received,
            whole=len(whole),
            downloads=DOWNLOADS,
            entries=len(after_kill.rows),
            corrupt=len(after_kill.corrupt),
            orphans=len(after_kill.orphans),
            temporary=len(after_kill.temporary),
            hits=len(after_kill.rows),
        )

    async def test_seed_1(self) -> None:
        await self.crash_and_restart(1)

    async def test_seed_2(self) -> None:
        await self.crash_and_restart(2)

    async def test_seed_3(self) -> None:
        await self.crash_and_restart(3)
