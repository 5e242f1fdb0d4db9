"""
The status snapshot (:mod:`buildcache.ops.snapshot`): plain, JSON-ready
data read from the activity, the store's size figures and the work in
flight; and the snapshots of several processes added up
(:mod:`buildcache.ops.combine`), with the page and the metrics rendered
from the sum.
"""

from __future__ import annotations

import json
from typing import cast

from attrs import define
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from buildcache.config import Config
from buildcache.ops.activity import BUCKET_SECONDS, BUCKETS, Activity
from buildcache.ops.combine import combine
from buildcache.ops.metrics import render_metrics
from buildcache.ops.page import render_page
from buildcache.ops.snapshot import Snapshot, SnapshotSources
from buildcache.store import Store
from tests.test_status import NoDownloads, finished, parse_page, sample


@define
class ReadAheads:
    count: int = 0

    def running(self) -> int:
        return self.count


class Processes:
    """
    The activities of two server processes on one store and one clock.
    """

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.config = Config(cache_dir=testcase.mktemp(), max_size=10_000)
        self.store = Store.open(self.config.cache_dir, self.config.max_size, self.clock)
        testcase.addCleanup(self.store.close)
        self.main = Activity(self.clock)
        self.worker = Activity(self.clock)

    def sources(self, activity: Activity, downloads: int = 0) -> SnapshotSources:
        return SnapshotSources(
            self.config, self.store, NoDownloads(downloads), activity, self.clock,
            prefetcher=ReadAheads(downloads),
        )

    def snapshots(self) -> list[Snapshot]:
        return [self.sources(self.main, 2).snapshot(), self.sources(self.worker).snapshot()]


class SnapshotTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.processes = Processes(self)
        self.activity = self.processes.main

    def test_json_ready(self) -> None:
        """
        A snapshot goes through JSON unchanged: dicts, lists, strings and
        numbers only.
        """
        finished(self.activity, "proxy", "a.deb", "HIT", 10)
        self.activity.upstream_failed("http://127.0.0.1:4/x", "refused")
        self.activity.upstream_succeeded("http://127.0.0.1:4/x", 0.3)
        snapshot = self.processes.sources(self.activity).snapshot()
        self.assertEqual(json.loads(json.dumps(snapshot, allow_nan=False)), snapshot)

    def test_store_section_from_activity(self) -> None:
        """
        What the store used to count comes from the activity, under the
        old keys: hits (stale answers too), misses, revalidations,
        evictions and read-ahead; the sizes come from the store.
        """
        for status in ("HIT", "HIT", "STALE", "MISS", "REVALIDATED", None):
            finished(self.activity, "mirror", "a.apk", status, 1)
        self.activity.evicted(2, 700)
        self.activity.read_ahead_started()
        self.activity.read_ahead_started()
        self.activity.read_ahead_claimed()
        snapshot = self.processes.sources(self.activity, 3).snapshot()
        self.assertEqual(snapshot["store"], {
            "entries": 0, "bytes_stored": 0, "bytes_metadata": 0,
            "bytes_downloading": 0, "max_size": 10_000, "fill": 0.0,
            "evictions": 2, "bytes_evicted": 700,
            "hits": 3, "misses": 1, "revalidations": 1,
            "prefetches": 2, "prefetch_hits": 1,
        })
        self.assertEqual(snapshot["read_aheads_running"], 3)
        self.assertEqual(snapshot["downloads_in_flight"], 3)

    def test_without_fetcher(self) -> None:
        """
        A process that fetches nothing (a hit worker) has nothing in
        flight.
        """
        snapshot = SnapshotSources(
            self.processes.config, self.processes.store, None, self.activity,
            self.processes.clock,
        ).snapshot()
        self.assertEqual(
            (snapshot["downloads_in_flight"], snapshot["read_aheads_running"]), (0, 0)
        )

    def test_latency(self) -> None:
        """
        The upstream latency histogram is cumulative per bound, as
        Prometheus counts it.
        """
        for seconds in (0.001, 0.2, 0.2, 100.0):
            self.activity.upstream_succeeded("http://127.0.0.1:4/x", seconds)
        latency = self.processes.sources(self.activity).snapshot()["upstream_latency"]
        counts = {bucket["le"]: bucket["count"] for bucket in latency["buckets"]}
        self.assertEqual((counts[0.005], counts[0.1], counts[0.25], counts[60.0]),
                         (1, 1, 3, 3))
        self.assertEqual(latency["count"], 4)
        self.assertAlmostEqual(latency["sum"], 100.401)


class CombineTests(SynchronousTestCase):
    """
    Two processes' snapshots added up.
    """

    def setUp(self) -> None:
        self.processes = Processes(self)
        main, worker = self.processes.main, self.processes.worker
        finished(main, "mirror", "a.apk", "MISS", 100)
        main.upstream_received("mirror", 100)
        finished(worker, "mirror", "a.apk", "HIT", 100)
        finished(worker, "mirror", "a.apk", "HIT", 100)
        finished(worker, "index", "numpy", "STALE", 5)
        finished(worker, "proxy", None, None, 0, code=403)
        main.evicted(1, 50)
        main.read_ahead_started()
        worker.read_ahead_claimed()
        main.upstream_succeeded("http://127.0.0.1:4/a", 0.01)
        self.processes.clock.advance(10)
        worker.upstream_failed("http://127.0.0.1:4/a", "refused")
        worker.stale_served("http://127.0.0.1:4/a")
        worker.upstream_succeeded("http://127.0.0.1:9/b", 2.0)

    def test_sums(self) -> None:
        main, worker = self.processes.snapshots()
        total = combine([main, worker])
        self.assertEqual(total["requests"], 5)
        self.assertEqual(total["errors"], 1)
        self.assertEqual(total["by_status"]["HIT"], 2)
        self.assertEqual(total["hit_ratio"], 3 / 4)
        self.assertEqual(total["bytes_from_cache"], 205)
        self.assertEqual(total["bytes_saved"], 205)
        self.assertEqual(total["bytes_from_upstream"], 100)
        mirror = total["front_ends"]["mirror"]
        self.assertEqual((mirror["requests"], mirror["hit_ratio"]), (3, 2 / 3))
        self.assertEqual(mirror["bytes_sent_on_miss"], 100)
        self.assertEqual(mirror["label"], "mirror routes")
        self.assertEqual(total["downloads_in_flight"], 2)
        self.assertEqual(total["read_aheads_running"], 2)
        self.assertEqual(
            (total["store"]["evictions"], total["store"]["bytes_evicted"]), (1, 50)
        )
        self.assertEqual(
            (total["store"]["prefetches"], total["store"]["prefetch_hits"]), (1, 1)
        )
        self.assertEqual(
            (total["store"]["hits"], total["store"]["misses"]), (3, 1)
        )
        self.assertEqual(total["top"]["mirror"], [{"name": "a.apk", "requests": 3}])
        self.assertEqual(total["top"]["index"], [{"name": "numpy", "requests": 1}])
        self.assertEqual(total["upstream_latency"]["count"], 2)
        self.assertAlmostEqual(total["upstream_latency"]["sum"], 2.01)
        buckets = total["traffic"]["buckets"]
        self.assertEqual(len(buckets), BUCKETS)
        self.assertEqual(buckets[-1]["from_cache"], 205)
        self.assertEqual(buckets[-1]["from_upstream"], 100)

    def test_upstreams_merged_by_host(self) -> None:
        """
        One row per host: counts summed, the latest success and error, and
        the message of the latest error.
        """
        total = combine(self.processes.snapshots())
        rows = {row["host"]: row for row in total["upstreams"]}
        self.assertEqual(list(rows), ["127.0.0.1:4", "127.0.0.1:9"])
        first = rows["127.0.0.1:4"]
        self.assertEqual(
            (first["successes"], first["errors"], first["stale_served"]), (1, 1, 1)
        )
        now = self.processes.clock.seconds()
        self.assertEqual((first["last_success"], first["last_error"]), (now - 10, now))
        self.assertEqual(first["last_error_message"], "refused")
        self.assertEqual(rows["127.0.0.1:9"]["last_error"], None)

    def test_shared_figures_from_the_first(self) -> None:
        """
        The store's sizes and the configuration are the main process's;
        the room held for downloads and the start add up per process.
        """
        main, worker = self.processes.snapshots()
        main["store"]["bytes_stored"] = 5000
        main["store"]["bytes_downloading"] = 300
        worker["store"]["bytes_stored"] = 4000
        worker["store"]["bytes_downloading"] = 200
        worker["config"]["cache_dir"] = "/elsewhere"
        worker["started_at"] -= 60
        total = combine([main, worker])
        self.assertEqual(total["store"]["bytes_stored"], 5000)
        self.assertEqual(total["store"]["fill"], main["store"]["fill"])
        self.assertEqual(total["store"]["bytes_downloading"], 500)
        self.assertEqual(total["config"], main["config"])
        self.assertEqual(total["started_at"], worker["started_at"])
        self.assertEqual(total["uptime_seconds"], main["uptime_seconds"] + 60)

    def test_traffic_straddling_a_bucket(self) -> None:
        """
        Processes whose series end in different buckets add up by bucket
        start, over the latest 24 hours.
        """
        main = self.processes.sources(self.processes.main).snapshot()
        self.processes.clock.advance(BUCKET_SECONDS)
        finished(self.processes.worker, "mirror", "b.apk", "HIT", 7)
        worker = self.processes.sources(self.processes.worker).snapshot()
        buckets = combine([main, worker])["traffic"]["buckets"]
        self.assertEqual(len(buckets), BUCKETS)
        self.assertEqual(buckets[-1]["start"], worker["traffic"]["buckets"][-1]["start"])
        self.assertEqual(buckets[-1]["from_cache"], 7)
        self.assertEqual(buckets[-2]["from_cache"], 205)

    def test_one_and_none(self) -> None:
        [main, _] = self.processes.snapshots()
        self.assertIs(combine([main]), main)
        self.assertRaises(ValueError, combine, [])

    def test_through_json_rendered(self) -> None:
        """
        Snapshots sent as JSON (as worker processes would) combine, and
        the page and the metrics render the totals.
        """
        received = [
            cast(Snapshot, json.loads(json.dumps(s))) for s in self.processes.snapshots()
        ]
        total = combine(received)
        page = parse_page(self, render_page(total))
        self.assertEqual(page.text("hit-ratio"), "Hit ratio: 75.0%")
        self.assertEqual(page.text("requests"), "Requests 5")
        text = render_metrics(total)[0].decode()
        self.assertEqual(
            sample(text, "buildcache_requests_total", front_end="mirror",
                   cache_status="HIT"), 2,
        )
        self.assertEqual(
            sample(text, "buildcache_upstream_errors_total", host="127.0.0.1:4"), 1
        )
        self.assertEqual(sample(text, "buildcache_upstream_latency_seconds_count"), 2)
        self.assertEqual(sample(text, "buildcache_prefetch_hits_total"), 1)
