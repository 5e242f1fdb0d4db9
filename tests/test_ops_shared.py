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

import attrs
from attrs import frozen
from twisted.internet.task import Clock
from twisted.logger import LogEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from buildcache.config import Config
from buildcache.engine.events import Exchange
from buildcache.ops.activity import Activity
from buildcache.ops.combine import combine
from buildcache.ops.metrics import render_metrics
from buildcache.ops.page import render_page
from buildcache.ops.snapshot import Snapshot, SnapshotSources
from buildcache.store import Store
from tests.test_status import NoDownloads, finished, parse_page, sample

SECRET = b"the-nodes-shared-secret-0123456789"
ENDPOINT = "http://127.0.0.1:8333"
#: What an error text of the tier could quote at worst: a presigned URL.
PRESIGNED = (
    f"{ENDPOINT}/bucket/ci/blobs/sha256/ab?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIDEXAMPLE%2F20261206%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Signature=0123abcdsignaturehex"
)


# TODO(issue 15, H3): buildcache.shared.location.S3Location once H1's
# package is on main.
@frozen
class Location:
    bucket: str
    prefix: str
    endpoint: str
    region: str = "us-east-1"


# TODO(issue 15, H3): buildcache.shared.tier.SharedTierStatus once H1's
# package is on main.
@frozen
class Status:
    endpoint: str = ENDPOINT
    bucket: str = "bucket"
    prefix: str = "ci/"
    healthy: bool = True
    last_error: str | None = None
    failing_since: float | None = None
    conditional: bool | None = True
    signed: bool = True
    hits: int = 0
    hit_bytes: int = 0
    uploads: int = 0
    upload_bytes: int = 0
    upload_failures: int = 0
    lease_waits: int = 0
    lease_timeouts: int = 0
    rejected: int = 0
    max_size: int | None = None
    evicted: int = 0
    evicted_bytes: int = 0
    last_eviction: float | None = None


@attrs.define
class FakeTier:
    """
    The tier as the snapshot reads it: its status, set by the test.
    """

    now: Status = attrs.Factory(Status)

    def status(self) -> Status:
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
            shared_store=Location("bucket", "ci/", ENDPOINT),
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
        self.tier.now = Status(
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
        self.tier.now = Status(
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

    def test_not_probed_yet(self) -> None:
        """
        Before the start-up probe, the page says so and the metrics leave
        the conditional PUT gauge without a sample.
        """
        self.tier.now = Status(conditional=None)
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
        self.tier.now = Status(
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
        self.tier.now = Status(hits=2, uploads=3)
        worker = Activity(self.clock)
        shared_hit(self.activity, "index", "numpy", 10)
        shared_hit(worker, "index", "numpy", 20)
        worker_sources = SnapshotSources(
            self.config, self.store, None, worker, self.clock
        )
        other = SnapshotSources(
            self.config, self.store, NoDownloads(), Activity(self.clock), self.clock,
            shared_tier=FakeTier(Status(
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
