"""
The shared tier on the status page, in ``/-/stats.json`` and in
``/-/metrics``: the tier's own figures (health, conditional PUT, signed
records, copies read, uploads, lease waits, evictions), the HITs each
front end answered from it (counted as HITs and apart), the access line,
and what is never shown (credentials, the secret, a presigned URL's
signature).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.config import Config, Mirror
from buildcache.engine.events import Exchange
from buildcache.ops.activity import Activity
from buildcache.ops.combine import combine
from buildcache.ops.metrics import render_metrics
from buildcache.ops.page import render_page
from buildcache.ops.snapshot import Snapshot, SnapshotSources
from buildcache.shared.location import S3Location, parse_shared_store
from buildcache.shared.tier import SharedTierStatus
from buildcache.store import Store
from tests.seaweed_parts import ACCESS_KEY, SECRET_KEY, SeaweedCase, credentials_env
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    listen,
    pattern_bytes,
    reactor,
    start_server,
    url_of,
)
from tests.test_service import ServerProcess, spawn_server
from tests.test_status import NoDownloads, finished, parse_page, sample

SECRET = b"the-nodes-shared-secret-0123456789"
ENDPOINT = "http://127.0.0.1:8333"
#: What an error text of the tier could quote at worst: a presigned URL.
PRESIGNED = (
    f"{ENDPOINT}/bucket/ci/blobs/sha256/ab?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIDEXAMPLE%2F20261206%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Signature=0123abcdsignaturehex"
)


#: A working tier, signed, that has done nothing yet.
_NEW = SharedTierStatus(
    endpoint=ENDPOINT, bucket="bucket", prefix="ci/", healthy=True, last_error=None,
    failing_since=None, conditional=True, signed=True, hits=0, hit_bytes=0, uploads=0,
    upload_bytes=0, upload_failures=0, lease_waits=0, lease_timeouts=0, rejected=0,
    max_size=None, evicted=0, evicted_bytes=0, last_eviction=None,
)


def tier_status(**changes: Any) -> SharedTierStatus:
    """
    The status of a tier: a new one, with ``changes``.
    """
    return attrs.evolve(_NEW, **changes)


@attrs.define
class FakeTier:
    """
    The tier as the snapshot reads it: its status, set by the test.
    """

    now: SharedTierStatus = _NEW

    def status(self) -> SharedTierStatus:
        return self.now


def shared_hit(activity: Activity, front_end: str, name: str, size: int) -> None:
    """
    Report a HIT answered with a copy from the shared tier, as the engine
    does.
    """
    activity.exchange_finished(Exchange(
        front_end=front_end, client="127.0.0.1", method="GET", url=f"/{name}",
        status=200, cache="HIT", bytes_sent=size, duration=0.0, completed=True,
        name=name, shared=True,
    ))


class SharedFiguresTests(SynchronousTestCase):
    """
    The figures of a server with a shared tier, from an Activity fed
    directly and a tier whose status the test sets.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = Config(
            cache_dir=self.mktemp(), max_size=1024**3,
            shared_store=S3Location("bucket", "ci/", ENDPOINT),
            shared_secret=SECRET, shared_secret_file="/etc/buildcache/shared-secret",
            shared_max_size=50 * 1024**3, shared_wait=15.0,
        )
        self.store = Store.open(self.config.cache_dir, self.config.max_size, self.clock)
        self.addCleanup(self.store.close)
        self.activity = Activity(self.clock)
        self.tier = FakeTier()
        self.sources = SnapshotSources(
            self.config, self.store, NoDownloads(), self.activity, self.clock,
            shared_tier=self.tier,
        )

    def stats(self) -> Snapshot:
        snapshot = self.sources.snapshot()
        # What /-/stats.json serves.
        self.assertEqual(json.loads(json.dumps(snapshot, allow_nan=False)), snapshot)
        return snapshot

    def test_hit_from_the_shared_tier_counted_as_hit_and_apart(self) -> None:
        """
        A HIT answered from the shared tier is a HIT (in the hit ratio and
        the bytes saved), and counted apart per front end and in all.
        """
        finished(self.activity, "index", "numpy", "MISS", 100)
        finished(self.activity, "index", "numpy", "HIT", 100)
        shared_hit(self.activity, "index", "numpy", 700)
        shared_hit(self.activity, "registry", "docker.io/library/alpine", 3000)
        stats = self.stats()
        index = stats["front_ends"]["index"]
        self.assertEqual(index["by_status"]["HIT"], 2)
        self.assertEqual(index["shared_hits"], 1)
        self.assertEqual(index["bytes_from_shared"], 700)
        self.assertEqual(index["bytes_from_cache"], 800)
        self.assertEqual(index["hit_ratio"], 2 / 3)
        self.assertEqual(stats["front_ends"]["registry"]["shared_hits"], 1)
        self.assertEqual(stats["front_ends"]["proxy"]["shared_hits"], 0)
        self.assertEqual(stats["shared_hits"], 2)
        self.assertEqual(stats["bytes_from_shared"], 3700)
        self.assertEqual(stats["by_status"]["HIT"], 3)
        page = parse_page(self, render_page(stats))
        self.assertIn("From the shared tier 1 (700 B)", page.text("front-end-index"))
        self.assertIn("From the shared tier 0 (0 B)", page.text("front-end-proxy"))
        self.assertIn("HIT / MISS 2 / 1", page.text("front-end-index"))
        metrics, _ = render_metrics(stats)
        text = metrics.decode()
        self.assertEqual(
            sample(text, "buildcache_shared_tier_requests_total", front_end="index"), 1
        )
        self.assertEqual(
            sample(text, "buildcache_shared_tier_served_bytes_total", front_end="registry"),
            3000,
        )
        self.assertEqual(
            sample(text, "buildcache_requests_total", front_end="index", cache_status="HIT"),
            2,
        )

    def test_access_line_says_shared(self) -> None:
        """
        The access line of a HIT from the shared tier says so, and its
        event carries ``shared``; another HIT's does not.
        """
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        shared_hit(self.activity, "mirror", "a.apk", 10)
        finished(self.activity, "mirror", "b.apk", "HIT", 10)
        self.clock.advance(0)
        lines = [e for e in events if e.get("log_system") == "access"]
        self.assertEqual([e["shared"] for e in lines], [True, False])
        self.assertTrue(lines[0]["line"].endswith(" HIT 0.000s (from the shared tier)"))
        self.assertTrue(lines[1]["line"].endswith(" HIT 0.000s"))

    def test_tier_section(self) -> None:
        """
        The "Shared tier" section gives the store, its health, whether it
        honours a conditional PUT, whether records are signed, and the
        tier's counts; the stats and the metrics hold the same.
        """
        self.tier.now = tier_status(
            hits=4, hit_bytes=4 * 1024**2, uploads=7, upload_bytes=7 * 1024**2,
            upload_failures=1, lease_waits=3, lease_timeouts=1, rejected=2,
            max_size=50 * 1024**3, evicted=5, evicted_bytes=5 * 1024**2,
            last_eviction=self.clock.seconds() - 600,
        )
        stats = self.stats()
        shared = stats["shared"]
        assert shared is not None
        self.assertEqual(
            (shared["endpoint"], shared["bucket"], shared["prefix"]),
            (ENDPOINT, "bucket", "ci/"),
        )
        self.assertEqual((shared["hits"], shared["uploads"], shared["lease_waits"]), (4, 7, 3))
        page = parse_page(self, render_page(stats))
        text = page.text("shared-tier")
        for expected in (
            f"Store s3://bucket/ci/ at {ENDPOINT}",
            "Health working",
            "Conditional PUT honoured yes: one download across nodes",
            "Records signed yes (--shared-secret-file)",
            "Hits from the shared tier 4 (4 MiB)",
            "Uploads 7 (7 MiB), 1 failed",
            "Lease waits 3 waited on another node, 1 fetched upstream after all",
            "Records or copies refused 2",
            "Evictions 5 (5 MiB) under 50 GiB, last 10 min ago",
        ):
            self.assertIn(expected, text)
        self.assertEqual(page.text("shared-health"), "working")
        config = page.text("config")
        self.assertIn(f"Shared store s3://bucket/ci/?endpoint={ENDPOINT}", config)
        self.assertIn("Shared secret file /etc/buildcache/shared-secret", config)
        self.assertIn("Shared store size limit 50 GiB", config)
        self.assertIn("Wait for another node's download up to 15 s", config)
        metrics = render_metrics(stats)[0].decode()
        for name, value in (
            ("buildcache_shared_tier_hits_total", 4),
            ("buildcache_shared_tier_hit_bytes_total", 4 * 1024**2),
            ("buildcache_shared_tier_uploads_total", 7),
            ("buildcache_shared_tier_upload_failures_total", 1),
            ("buildcache_shared_tier_lease_waits_total", 3),
            ("buildcache_shared_tier_lease_timeouts_total", 1),
            ("buildcache_shared_tier_rejected_total", 2),
            ("buildcache_shared_tier_evictions_total", 5),
            ("buildcache_shared_tier_evicted_bytes_total", 5 * 1024**2),
            ("buildcache_shared_tier_healthy", 1),
            ("buildcache_shared_tier_signed", 1),
            ("buildcache_shared_tier_conditional_put", 1),
            ("buildcache_shared_tier_max_size_bytes", 50 * 1024**3),
        ):
            self.assertEqual(sample(metrics, name), value, name)

    def test_store_failing(self) -> None:
        """
        A failing store shows as failing, since when, with its error
        (redacted); a store without conditional PUT says each node
        downloads for itself; unsigned records say what is shared.
        """
        self.tier.now = tier_status(
            healthy=False, failing_since=self.clock.seconds() - 120,
            last_error=f"GET {PRESIGNED}: connection refused",
            conditional=False, signed=False,
        )
        stats = self.stats()
        page = parse_page(self, render_page(stats))
        text = page.text("shared-tier")
        self.assertEqual(
            page.text("shared-health"), "failing: serving from disk and upstreams"
        )
        self.assertIn("since 2 min ago", text)
        self.assertIn("connection refused", text)
        self.assertIn("no: each node downloads for itself", text)
        self.assertIn("no: only files with an independent digest are shared", text)
        metrics = render_metrics(stats)[0].decode()
        self.assertEqual(sample(metrics, "buildcache_shared_tier_healthy"), 0)
        self.assertEqual(sample(metrics, "buildcache_shared_tier_conditional_put"), 0)

    def test_error_of_a_failure_that_is_over(self) -> None:
        """
        Once the store works again, the page no longer shows the error of
        the failure that is over as if it were the store's health.
        """
        self.tier.now = tier_status(healthy=True, last_error="GET x: connection refused")
        text = parse_page(self, render_page(self.stats())).text("shared-tier")
        self.assertNotIn("connection refused", text)
        self.assertIn("or too many at once", text)

    def test_not_probed_yet(self) -> None:
        """
        Before the start-up probe, the page says so and the metrics leave
        the conditional PUT gauge without a sample.
        """
        self.tier.now = tier_status(conditional=None)
        stats = self.stats()
        self.assertIn(
            "Conditional PUT honoured not probed yet",
            parse_page(self, render_page(stats)).text("shared-tier"),
        )
        metrics = render_metrics(stats)[0].decode()
        self.assertNotIn("\nbuildcache_shared_tier_conditional_put ", metrics)
        self.assertIn("# TYPE buildcache_shared_tier_conditional_put gauge", metrics)

    def test_credentials_never_shown(self) -> None:
        """
        Neither the secret, nor the AWS key a presigned URL names, nor its
        signature, appear on the page, in the stats or in the metrics; the
        endpoint does, without user information.
        """
        self.tier.now = tier_status(
            healthy=False, failing_since=self.clock.seconds(),
            last_error=f"PUT {PRESIGNED} answered 403",
            endpoint="http://key:password@127.0.0.1:8333",
        )
        # A copy the fetcher failed to read: its upstream row.
        self.activity.upstream_failed(PRESIGNED, f"GET {PRESIGNED}: timed out")
        stats = self.stats()
        documents = (
            render_page(stats).decode(), json.dumps(stats), render_metrics(stats)[0].decode(),
            repr(self.config),
        )
        for document in documents:
            for secret in (
                SECRET.decode(), "AKIDEXAMPLE", "0123abcdsignaturehex", "password",
                "key:",
            ):
                self.assertNotIn(secret, document)
        shared = stats["shared"]
        assert shared is not None
        self.assertEqual(shared["endpoint"], "http://***@127.0.0.1:8333")
        self.assertIn("X-Amz-Signature=***", shared["last_error"] or "")
        (row,) = stats["upstreams"]
        self.assertIn("X-Amz-Credential=***&", row["last_error_message"] or "")
        self.assertIn(ENDPOINT, stats["config"]["shared_store"] or "")

    def test_without_a_tier(self) -> None:
        """
        A server without a shared tier has no section, no tier metrics,
        ``shared`` null in the stats, and says so in its configuration.
        """
        self.sources.shared_tier = None
        self.sources.config = Config(cache_dir=self.config.cache_dir)
        finished(self.activity, "proxy", "a.deb", "HIT", 10)
        stats = self.stats()
        self.assertIsNone(stats["shared"])
        self.assertIsNone(stats["config"]["shared_store"])
        self.assertEqual(stats["shared_hits"], 0)
        page = parse_page(self, render_page(stats))
        self.assertNotIn("shared-tier", page.by_id)
        self.assertNotIn("From the shared tier", page.text("front-end-proxy"))
        self.assertIn("Shared store none", page.text("config"))
        self.assertNotIn("buildcache_shared_tier", render_metrics(stats)[0].decode())

    def test_processes_combined(self) -> None:
        """
        The snapshots of several processes add up: the shared HITs, and
        the tier's counts (a hit worker has no tier of its own).
        """
        self.tier.now = tier_status(hits=2, uploads=3)
        worker = Activity(self.clock)
        shared_hit(self.activity, "index", "numpy", 10)
        shared_hit(worker, "index", "numpy", 20)
        worker_sources = SnapshotSources(
            self.config, self.store, None, worker, self.clock
        )
        other = SnapshotSources(
            self.config, self.store, NoDownloads(), Activity(self.clock), self.clock,
            shared_tier=FakeTier(tier_status(
                hits=1, uploads=1, healthy=False, failing_since=5.0, last_error="down",
                last_eviction=9.0,
            )),
        )
        combined = combine(
            [self.sources.snapshot(), worker_sources.snapshot(), other.snapshot()]
        )
        self.assertEqual(combined["front_ends"]["index"]["shared_hits"], 2)
        self.assertEqual(combined["front_ends"]["index"]["bytes_from_shared"], 30)
        self.assertEqual(combined["shared_hits"], 2)
        shared = combined["shared"]
        assert shared is not None
        self.assertEqual((shared["hits"], shared["uploads"]), (3, 4))
        self.assertEqual(
            (shared["healthy"], shared["last_error"], shared["failing_since"]),
            (False, "down", 5.0),
        )
        self.assertEqual(shared["last_eviction"], 9.0)
        self.assertIsNone(combine([worker_sources.snapshot()] * 2)["shared"])


def node_environment(testcase: TestCase, values: Mapping[str, str]) -> None:
    """
    ``values`` in this process's environment for the test (what a node it
    spawns inherits), the AWS variables it had taken out.
    """
    saved = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    for name in saved:
        del os.environ[name]
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)

    def restore() -> None:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        os.environ.update(saved)

    testcase.addCleanup(restore)


async def stats_until(
    client: Client, port: int, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """
    The node's ``/-/stats.json`` once ``ready`` says so (polled, up to
    30 s: the tier probes its store at start-up).
    """
    for _ in range(600):
        received = await client.get(f"http://127.0.0.1:{port}/-/stats.json")
        if received.status == 200:
            stats: dict[str, Any] = json.loads(received.body)
            if ready(stats):
                return stats
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError("the node's stats never got there")


def probed(stats: dict[str, Any]) -> bool:
    shared = stats["shared"]
    return shared is not None and (shared["conditional"] is not None or not shared["healthy"])


def secret_path(testcase: TestCase) -> str:
    path = os.path.abspath(testcase.mktemp())
    with open(path, "wb") as f:
        f.write(SECRET)
    os.chmod(path, 0o600)
    return path


async def node_pages(
    testcase: TestCase, store: str
) -> tuple[ServerProcess, dict[str, Any], str, str]:
    """
    Start a real ``twistd buildcache`` node on ``store`` (signed with
    :data:`SECRET`), and read its status page, stats and metrics once its
    tier has probed the store; the node is stopped before they are
    returned, with its log.
    """
    process, port = spawn_server(
        testcase, "--shared-store", store,
        "--shared-secret-file", secret_path(testcase),
    )
    await process.wait_for(b"Shared tier: ")
    await process.wait_for(b"ProxySite starting on %d" % port)
    client = Client()
    testcase.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
    stats = await stats_until(client, port, probed)
    page = await client.get(f"http://127.0.0.1:{port}/")
    metrics = await client.get(f"http://127.0.0.1:{port}/-/metrics")
    await process.stop()
    return process, stats, page.body.decode(), metrics.body.decode()


def assert_no_credentials(testcase: TestCase, *documents: str) -> None:
    for document in documents:
        for secret in (SECRET.decode(), SECRET_KEY, ACCESS_KEY, "X-Amz-Signature=0"):
            testcase.assertNotIn(secret, document)


class SeaweedNodeTests(SeaweedCase):
    """
    A real ``twistd buildcache`` node on SeaweedFS: what its status pages
    and its log say of the tier, and never say.
    """

    timeout = 120

    async def test_store_probed_and_shown(self) -> None:
        """
        The node probes the store (SeaweedFS honours a conditional PUT),
        shows it healthy and signed with its endpoint, and neither its
        pages nor its log carry a key or the secret.
        """
        node_environment(self, self.store.env)
        bucket = self.bucket()
        process, stats, page, metrics = await node_pages(
            self, f"s3://{bucket}/node/?endpoint={self.store.endpoint}"
        )
        shared = stats["shared"]
        self.assertEqual(
            (shared["endpoint"], shared["bucket"], shared["prefix"]),
            (self.store.endpoint, bucket, "node/"),
        )
        self.assertEqual(
            (shared["healthy"], shared["conditional"], shared["signed"]), (True, True, True)
        )
        self.assertIn('id="shared-tier"', page)
        self.assertEqual(sample(metrics, "buildcache_shared_tier_conditional_put"), 1)
        log = process.output.decode(errors="replace")
        self.assertIn(self.store.endpoint, log)
        assert_no_credentials(self, log, page, metrics, json.dumps(stats))


    async def test_hit_from_the_bucket_counted_apart(self) -> None:
        """
        Two nodes on one bucket: a package node A fetched is served by
        node B from the bucket, a HIT, with no upstream request; B counts
        it from the shared tier (its mirror card, its tier's copies read,
        its access line), A its upload.
        """
        node_environment(self, self.store.env)
        bucket = self.bucket()
        path = "/pool/main/h/hello/hello_2.12-1_amd64.deb"
        data = pattern_bytes(300_000, b"hello-deb")
        upstream = FakeUpstream()
        upstream.bodies[path] = GatedBody(data)
        origin = listen(upstream)
        self.addCleanup(origin.stopListening)
        changes = {
            "mirrors": (Mirror("up", url_of(origin).rstrip("/")),),
            "shared_store": parse_shared_store(
                f"s3://{bucket}/ops/?endpoint={self.store.endpoint}"
            ),
            "shared_secret": SECRET,
        }
        nodes = [start_server(self, changes), start_server(self, changes)]
        client = Client()
        self.addCleanup(lambda: Deferred.fromCoroutine(client.close()))
        for node in nodes:
            tier = node.server.shared
            tier.start()
            self.addCleanup(tier.stop)
        for _ in range(600):
            if all(node.server.shared.status().conditional is not None for node in nodes):
                break
            await deferLater(reactor, 0.05, lambda: None)
        a, b = nodes
        first = await client.get(f"http://127.0.0.1:{a.proxy_port}/up{path}")
        self.assertEqual((first.header("x-cache"), first.body), ("MISS", data))
        await a.server.shared.when_idle()
        events: list[LogEvent] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        second = await client.get(f"http://127.0.0.1:{b.proxy_port}/up{path}")
        self.assertEqual((second.header("x-cache"), second.body), ("HIT", data))
        self.assertEqual(upstream.requests[path], 1)
        await deferLater(reactor, 0, lambda: None)
        stats = b.server.status.snapshot()
        mirror = stats["front_ends"]["mirror"]
        self.assertEqual(
            (mirror["by_status"]["HIT"], mirror["shared_hits"], mirror["bytes_from_shared"]),
            (1, 1, len(data)),
        )
        self.assertEqual(mirror["bytes_from_upstream"], 0)
        self.assertEqual((stats["shared"]["hits"], stats["shared"]["hit_bytes"]), (1, len(data)))
        self.assertEqual(a.server.status.snapshot()["shared"]["uploads"], 1)
        self.assertIn(
            "From the shared tier 1 (293 KiB)",
            parse_page(self, render_page(stats)).text("front-end-mirror"),
        )
        (line,) = [e["line"] for e in events if e.get("log_system") == "access"]
        self.assertTrue(line.endswith("(from the shared tier)"), line)


class DeadStoreNodeTests(TestCase):
    timeout = 60

    async def test_dead_store_shown_failing(self) -> None:
        """
        A store nothing answers for: the node starts all the same, shows
        the tier failing with its error, and logs it, without a
        credential.
        """
        node_environment(self, credentials_env())
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{unused.getsockname()[1]}"
        process, stats, page, metrics = await node_pages(
            self, f"s3://dead/node/?endpoint={dead}"
        )
        shared = stats["shared"]
        self.assertFalse(shared["healthy"])
        self.assertIsNotNone(shared["last_error"])
        self.assertIn("failing: serving from disk and upstreams", page)
        self.assertEqual(sample(metrics, "buildcache_shared_tier_healthy"), 0)
        log = process.output.decode(errors="replace")
        self.assertIn(dead, log)
        assert_no_credentials(self, log, page, metrics, json.dumps(stats))
