"""
Prometheus metrics of a buildcache server, served at ``/-/metrics``.

This module owns the metric names, labels and help texts.  Every metric,
the upstream latency histogram included, is rendered from one
:data:`buildcache.ops.snapshot.Snapshot`, the same figures the status
page shows: there is one set of books, and the combined snapshot of
several processes gives their totals.  Each scrape renders through a
``CollectorRegistry`` of its own, so servers in one process never share
metrics and the global registry holds none.
"""

from __future__ import annotations

from collections.abc import Iterator

from attrs import frozen
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from buildcache.ops.snapshot import Snapshot


def render_metrics(snapshot: Snapshot) -> tuple[bytes, str]:
    """
    The Prometheus text exposition of ``snapshot`` and its ``Content-Type``.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry), CONTENT_TYPE_LATEST


# Compared by identity: the registry keys its collectors in a dict.
@frozen(eq=False)
class SnapshotCollector(Collector):
    """
    The metrics of one snapshot.
    """

    snapshot: Snapshot

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._upstreams()
        yield self._latency()
        yield from self._store()
        yield from self._shared()
        in_flight = GaugeMetricFamily(
            "buildcache_downloads_in_flight",
            "Upstream downloads running now (each may feed several clients).",
        )
        in_flight.add_metric([], self.snapshot["downloads_in_flight"])
        yield in_flight
        yield from self._workers()

    def _workers(self) -> Iterator[Metric]:
        # Only with --workers above 1 (the figures are then every
        # process's that answered, added up).
        workers = self.snapshot.get("workers")
        if workers is None:
            return
        for name, documentation, value in (
            ("buildcache_workers_configured",
             "Processes serving hits (--workers), the main one included.",
             workers["configured"]),
            ("buildcache_workers_alive", "Of those, the processes running now.",
             workers["alive"]),
            ("buildcache_workers_answered",
             "Processes whose figures these metrics add up (the others did"
             " not answer in time).", workers["answered"]),
        ):
            gauge = GaugeMetricFamily(name, documentation)
            gauge.add_metric([], value)
            yield gauge
        restarts = CounterMetricFamily(
            "buildcache_worker_restarts", "Hit workers restarted after they died."
        )
        restarts.add_metric([], workers["restarts"])
        yield restarts

    def _requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "buildcache_requests",
            "Finished requests by front end and cache status (X-Cache; none"
            " for refusals and errors).",
            labels=["front_end", "cache_status"],
        )
        errors = CounterMetricFamily(
            "buildcache_request_errors",
            "Requests answered with a 4xx/5xx status or ended early.",
            labels=["front_end"],
        )
        served = CounterMetricFamily(
            "buildcache_bytes_served",
            "Body bytes sent to clients, by where they came from.",
            labels=["front_end", "source"],
        )
        from_shared = CounterMetricFamily(
            "buildcache_shared_tier_requests",
            "Of the HIT requests, those answered with a copy read from the"
            " shared tier (no byte crossed the line), by front end.",
            labels=["front_end"],
        )
        from_shared_bytes = CounterMetricFamily(
            "buildcache_shared_tier_served_bytes",
            "Body bytes those requests sent (counted in"
            ' buildcache_bytes_served{source="cache"} too).',
            labels=["front_end"],
        )
        fetched = CounterMetricFamily(
            "buildcache_upstream_bytes",
            "Body bytes received from upstreams, by the front end they were"
            " fetched for (each counted once, however many clients shared it).",
            labels=["front_end"],
        )
        for front_end, figures in self.snapshot["front_ends"].items():
            for status, count in figures["by_status"].items():
                requests.add_metric([front_end, status], count)
            errors.add_metric([front_end], figures["errors"])
            served.add_metric([front_end, "cache"], figures["bytes_from_cache"])
            served.add_metric([front_end, "upstream"], figures["bytes_sent_on_miss"])
            fetched.add_metric([front_end], figures["bytes_from_upstream"])
            from_shared.add_metric([front_end], figures["shared_hits"])
            from_shared_bytes.add_metric([front_end], figures["bytes_from_shared"])
        yield requests
        yield errors
        yield served
        yield fetched
        if self.snapshot["shared"] is not None:
            yield from_shared
            yield from_shared_bytes

    def _upstreams(self) -> Iterator[Metric]:
        successes = CounterMetricFamily(
            "buildcache_upstream_successes",
            "Upstream requests answered without a 5xx, by upstream host.",
            labels=["host"],
        )
        errors = CounterMetricFamily(
            "buildcache_upstream_errors",
            "Upstream requests that failed (connection, timeout, 5xx), by host.",
            labels=["host"],
        )
        stale = CounterMetricFamily(
            "buildcache_stale_served",
            "Stale copies served because the upstream could not be reached.",
            labels=["host"],
        )
        last_success = GaugeMetricFamily(
            "buildcache_upstream_last_success_timestamp_seconds",
            "When the upstream last answered (Unix time).",
            labels=["host"],
        )
        last_error = GaugeMetricFamily(
            "buildcache_upstream_last_error_timestamp_seconds",
            "When the upstream last failed (Unix time).",
            labels=["host"],
        )
        for health in self.snapshot["upstreams"]:
            host = health["host"]
            successes.add_metric([host], health["successes"])
            errors.add_metric([host], health["errors"])
            stale.add_metric([host], health["stale_served"])
            if health["last_success"] is not None:
                last_success.add_metric([host], health["last_success"])
            if health["last_error"] is not None:
                last_error.add_metric([host], health["last_error"])
        yield successes
        yield errors
        yield stale
        yield last_success
        yield last_error

    def _latency(self) -> Metric:
        latency = self.snapshot["upstream_latency"]
        return HistogramMetricFamily(
            "buildcache_upstream_latency_seconds",
            "Seconds from sending an upstream request to its response headers.",
            buckets=[
                (floatToGoString(bucket["le"]), bucket["count"])
                for bucket in latency["buckets"]
            ] + [("+Inf", latency["count"])],
            sum_value=latency["sum"],
        )

    def _shared(self) -> Iterator[Metric]:
        shared = self.snapshot["shared"]
        if shared is None:
            return
        for name, documentation, value in (
            ("buildcache_shared_tier_hits",
             "Copies read whole from the shared tier, checked and stored.",
             shared["hits"]),
            ("buildcache_shared_tier_hit_bytes", "Bytes of those copies.",
             shared["hit_bytes"]),
            ("buildcache_shared_tier_uploads",
             "Bodies fetched upstream and uploaded to the shared tier.",
             shared["uploads"]),
            ("buildcache_shared_tier_upload_bytes", "Bytes of those uploads.",
             shared["upload_bytes"]),
            ("buildcache_shared_tier_upload_failures",
             "Uploads that failed or were skipped while the store failed.",
             shared["upload_failures"]),
            ("buildcache_shared_tier_lease_waits",
             "Downloads that waited for another node's copy of the same file.",
             shared["lease_waits"]),
            ("buildcache_shared_tier_lease_timeouts",
             "Of those, the ones that fetched upstream after all.",
             shared["lease_timeouts"]),
            ("buildcache_shared_tier_rejected",
             "Records or copies refused (bad signature, digest mismatch, stale).",
             shared["rejected"]),
            ("buildcache_shared_tier_evictions",
             "Objects removed from the bucket to stay under --shared-max-size.",
             shared["evicted"]),
            ("buildcache_shared_tier_evicted_bytes", "Bytes those evictions freed.",
             shared["evicted_bytes"]),
        ):
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], value)
            yield counter
        healthy = GaugeMetricFamily(
            "buildcache_shared_tier_healthy",
            "1 while the shared tier's store answers, 0 while it fails (the"
            " node then serves from its disk and the upstreams).",
        )
        healthy.add_metric([], 1 if shared["healthy"] else 0)
        yield healthy
        signed = GaugeMetricFamily(
            "buildcache_shared_tier_signed",
            "1 when records are signed with --shared-secret-file.",
        )
        signed.add_metric([], 1 if shared["signed"] else 0)
        yield signed
        conditional = GaugeMetricFamily(
            "buildcache_shared_tier_conditional_put",
            "1 when the store honours If-None-Match: * (one download across"
            " nodes), 0 when not; absent until probed.",
        )
        if shared["conditional"] is not None:
            conditional.add_metric([], 1 if shared["conditional"] else 0)
        yield conditional
        if shared["max_size"] is not None:
            limit = GaugeMetricFamily(
                "buildcache_shared_tier_max_size_bytes", "--shared-max-size."
            )
            limit.add_metric([], shared["max_size"])
            yield limit

    def _store(self) -> Iterator[Metric]:
        store = self.snapshot["store"]
        registry = self.snapshot["registry"]
        for name, documentation, value in (
            ("buildcache_evictions",
             "Objects removed from the store to stay under its size limit.",
             store["evictions"]),
            ("buildcache_evicted_bytes",
             "Bytes (bodies and rows) those evictions freed.",
             store["bytes_evicted"]),
            ("buildcache_prefetches",
             "Distribution files read ahead after a client read their metadata.",
             store["prefetches"]),
            ("buildcache_prefetch_hits",
             "Read-ahead files that a client asked for afterwards.",
             store["prefetch_hits"]),
        ):
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], value)
            yield counter
        for name, documentation, value in (
            ("buildcache_store_size_bytes",
             "Bytes stored: bodies and their index rows (headers).",
             store["bytes_stored"]),
            ("buildcache_store_metadata_bytes",
             "Of the bytes stored, the index rows' (headers, keys).",
             store["bytes_metadata"]),
            ("buildcache_store_downloading_bytes",
             "Room held for bodies being downloaded into tmp/.",
             store["bytes_downloading"]),
            ("buildcache_store_entries", "Objects in the store.", store["entries"]),
            ("buildcache_store_max_size_bytes", "The store's size limit.",
             store["max_size"]),
            ("buildcache_registry_repositories",
             "Repositories of which the registry front end stores manifests by tag.",
             registry["repositories"]),
            ("buildcache_registry_tags",
             "Tags of which the registry front end stores manifests.",
             registry["tags"]),
        ):
            gauge = GaugeMetricFamily(name, documentation)
            gauge.add_metric([], value)
            yield gauge
