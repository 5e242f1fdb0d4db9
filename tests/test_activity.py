"""
:class:`buildcache.ops.activity.Activity` fed through its observer methods
on a test clock: finished requests (the access line, totals, the traffic
series, errors, the most-requested table), read-ahead, evictions and
upstream latencies; and the old ``track`` path, which builds the same
record from a ``twisted.web`` request.
"""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from buildcache.engine.events import Exchange
from buildcache.ops.activity import (
    BUCKET_SECONDS,
    BUCKETS,
    LATENCY_BUCKETS,
    TOP_NAMES_KEPT,
    Activity,
)

START = 1_700_000_100.0

EXCHANGE = Exchange(
    front_end="mirror", client="192.0.2.7", method="GET",
    url="/alpine/v3.20/main/x86_64/curl-8.5.0-r0.apk", status=200, cache="HIT",
    bytes_sent=1234, duration=0.25, completed=True, name="curl-8.5.0-r0.apk",
)


class ExchangeFinishedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.activity = Activity(self.clock)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def access_events(self) -> list[dict[str, object]]:
        # Lines are written after the turn's responses: two clock hops.
        self.clock.advance(0)
        self.clock.advance(0)
        return [dict(e) for e in self.events if e.get("log_system") == "access"]

    def test_access_line(self) -> None:
        """
        One access event per exchange, after this turn's responses, with
        the exchange's fields and a formatted text line; credentials in
        the URL are redacted.
        """
        self.activity.exchange_finished(EXCHANGE)
        self.activity.exchange_finished(attrs.evolve(
            EXCHANGE, url="http://alice:s3cret@127.0.0.1:9/x", status=502, cache=None,
            bytes_sent=0, completed=False, front_end="proxy",
        ))
        self.assertEqual([e for e in self.events if e.get("log_system") == "access"], [])
        first, second = self.access_events()
        self.assertEqual(
            {k: first[k] for k in ("client", "method", "url", "status", "bytes", "cache",
                                   "duration", "front_end")},
            {"client": "192.0.2.7", "method": "GET", "url": EXCHANGE.url,
             "status": 200, "bytes": 1234, "cache": "HIT", "duration": 0.25,
             "front_end": "mirror"},
        )
        self.assertEqual(
            formatEvent(first),
            f"192.0.2.7 GET {EXCHANGE.url} 200 1234 HIT 0.250s",
        )
        self.assertEqual(second["url"], "http://***@127.0.0.1:9/x")
        self.assertEqual(second["cache"], "none")
        self.assertEqual(
            formatEvent(second),
            "192.0.2.7 GET http://***@127.0.0.1:9/x 502 0 none 0.250s"
            " (client or upstream ended early)",
        )
        for event in self.events:
            self.assertNotIn("s3cret", repr(event))

    def test_totals(self) -> None:
        """
        Requests and statuses count per front end; bytes sent count as
        from the cache for HIT, REVALIDATED and STALE, as sent on a miss
        for MISS, and neither for a refusal.
        """
        for cache, size in (("HIT", 100), ("REVALIDATED", 20), ("STALE", 3),
                            ("MISS", 4000), (None, 50)):
            self.activity.exchange_finished(
                attrs.evolve(EXCHANGE, cache=cache, bytes_sent=size)
            )
        totals = self.activity.totals["mirror"]
        self.assertEqual(totals.requests, 5)
        self.assertEqual(
            dict(totals.by_status),
            {"HIT": 1, "REVALIDATED": 1, "STALE": 1, "MISS": 1, "none": 1},
        )
        self.assertEqual(totals.bytes_from_cache, 123)
        self.assertEqual(totals.bytes_sent_on_miss, 4000)
        # What crossed the line is told apart, by the fetcher.
        self.assertEqual(totals.bytes_from_upstream, 0)
        self.assertEqual(totals.hit_ratio, 3 / 4)
        self.assertEqual(self.activity.totals["proxy"].requests, 0)

    def test_errors(self) -> None:
        """
        An error status or an exchange ended early counts as an error, and
        neither puts its name in the most-requested table.
        """
        self.activity.exchange_finished(attrs.evolve(EXCHANGE, status=404, cache=None))
        self.activity.exchange_finished(attrs.evolve(EXCHANGE, status=503, cache="MISS"))
        self.activity.exchange_finished(attrs.evolve(EXCHANGE, completed=False))
        self.activity.exchange_finished(EXCHANGE)
        self.assertEqual(self.activity.totals["mirror"].errors, 3)
        self.assertEqual(self.activity.totals["mirror"].requests, 4)
        # The early end still sent a 200: the name counts.
        self.assertEqual(
            dict(self.activity.top_names), {("mirror", "curl-8.5.0-r0.apk"): 2}
        )

    def test_series_bucket(self) -> None:
        """
        Bytes from the cache land in the bucket of the time the exchange
        ended; bytes from upstream in the bucket they arrived in.
        """
        self.activity.exchange_finished(EXCHANGE)
        self.clock.advance(BUCKET_SECONDS)
        self.activity.upstream_received("mirror", 999)
        self.activity.exchange_finished(attrs.evolve(EXCHANGE, cache="MISS"))
        self.activity.exchange_finished(attrs.evolve(EXCHANGE, bytes_sent=6))
        series = list(self.activity.series())
        self.assertEqual(len(series), BUCKETS)
        now = self.clock.seconds()
        self.assertEqual(series[-1].start, now - now % BUCKET_SECONDS)
        self.assertEqual((series[-1].from_cache, series[-1].from_upstream), (6, 999))
        self.assertEqual((series[-2].from_cache, series[-2].from_upstream), (1234, 0))
        self.assertEqual(sum(b.from_cache for b in series[:-2]), 0)
        self.assertEqual(self.activity.totals["mirror"].bytes_from_upstream, 999)

    def test_top_names_bounded(self) -> None:
        """
        The most-requested table prunes its tail beyond twice the kept
        size, keeping the most requested.
        """
        self.activity.exchange_finished(attrs.evolve(EXCHANGE, name="popular"))
        self.activity.exchange_finished(attrs.evolve(EXCHANGE, name="popular"))
        for number in range(TOP_NAMES_KEPT * 2 + 1):
            self.activity.exchange_finished(attrs.evolve(EXCHANGE, name=f"n{number}"))
        self.assertLessEqual(len(self.activity.top_names), TOP_NAMES_KEPT * 2)
        self.assertEqual(self.activity.top_names[("mirror", "popular")], 2)

    def test_other_front_end(self) -> None:
        """
        A front end beyond the three known (the registry, next) gets totals
        of its own.
        """
        self.activity.exchange_finished(attrs.evolve(EXCHANGE, front_end="registry"))
        self.activity.upstream_received("registry", 10)
        self.assertEqual(self.activity.totals["registry"].requests, 1)
        self.assertEqual(self.activity.totals["registry"].bytes_from_upstream, 10)


class OtherEventsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.activity = Activity(Clock())

    def test_read_ahead(self) -> None:
        for _ in range(3):
            self.activity.read_ahead_started()
        self.activity.read_ahead_claimed()
        self.assertEqual((self.activity.read_ahead, self.activity.read_ahead_used), (3, 1))

    def test_evicted(self) -> None:
        self.activity.evicted(2, 3000)
        self.activity.evicted(1, 500)
        self.assertEqual((self.activity.evictions, self.activity.bytes_evicted), (3, 3500))

    def test_latency_buckets(self) -> None:
        """
        A latency counts in the first bucket whose bound it does not
        exceed; one above every bound in the last.
        """
        for seconds in (0.0, LATENCY_BUCKETS[0], 0.2, LATENCY_BUCKETS[-1] + 1):
            self.activity.upstream_succeeded("http://127.0.0.1:5/x", seconds)
        counts = self.activity.latency.counts
        self.assertEqual(len(counts), len(LATENCY_BUCKETS) + 1)
        self.assertEqual(counts[0], 2)
        self.assertEqual(counts[LATENCY_BUCKETS.index(0.25)], 1)
        self.assertEqual(counts[-1], 1)
        self.assertEqual(sum(counts), 4)
        self.assertAlmostEqual(
            self.activity.latency.sum, LATENCY_BUCKETS[0] + 0.2 + LATENCY_BUCKETS[-1] + 1
        )
