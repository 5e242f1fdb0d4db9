"""
Prometheus metrics of one buildcache server, served at ``/-/metrics``.

This module owns the server's private ``CollectorRegistry``.  Everything
except the upstream latency histogram is read at scrape time from the
objects that already count it (:class:`buildcache.ops.activity.Activity`,
:class:`buildcache.store.Store`, :class:`buildcache.fetch.fetcher.Fetcher`), so
there is one set of books; the histogram is a ``prometheus_client``
``Histogram`` fed through ``Activity.latency_observers``, because
observations cannot be rebuilt from totals.
"""

from __future__ import annotations

from collections.abc import Iterator

from attrs import define, field
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from buildcache.fetch.fetcher import Fetcher
from buildcache.ops.activity import CACHE_STATUSES, FRONT_ENDS, Activity
from buildcache.store import Store

#: Upper bounds (seconds) of the upstream latency histogram: from a nearby
#: mirror's few milliseconds to a registry that takes the whole timeout.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)


# Compared by identity: the registry keys its collectors in a dict.
@define(eq=False)
class ActivityCollector(Collector):
    """
    Reads the request, upstream and store figures when Prometheus scrapes.
    """

    activity: Activity
    store: Store
    fetcher: Fetcher

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._upstreams()
        yield from self._store()
        in_flight = GaugeMetricFamily(
            "buildcache_downloads_in_flight",
            "Upstream downloads running now (each may feed several clients).",
        )
        in_flight.add_metric([], self.fetcher.in_flight())
        yield in_flight

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
        fetched = CounterMetricFamily(
            "buildcache_upstream_bytes",
            "Body bytes received from upstreams, by the front end they were"
            " fetched for (each counted once, however many clients shared it).",
            labels=["front_end"],
        )
        for front_end in FRONT_ENDS:
            totals = self.activity.totals[front_end]
            statuses = list(CACHE_STATUSES) + sorted(
                set(totals.by_status) - set(CACHE_STATUSES)
            )
            for status in statuses:
                requests.add_metric([front_end, status], totals.by_status[status])
            errors.add_metric([front_end], totals.errors)
            served.add_metric([front_end, "cache"], totals.bytes_from_cache)
            served.add_metric([front_end, "upstream"], totals.bytes_sent_on_miss)
            fetched.add_metric([front_end], totals.bytes_from_upstream)
        yield requests
        yield errors
        yield served
        yield fetched

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
        for host, health in sorted(self.activity.upstreams.items()):
            successes.add_metric([host], health.successes)
            errors.add_metric([host], health.errors)
            stale.add_metric([host], health.stale_served)
            if health.last_success is not None:
                last_success.add_metric([host], health.last_success)
            if health.last_error is not None:
                last_error.add_metric([host], health.last_error)
        yield successes
        yield errors
        yield stale
        yield last_success
        yield last_error

    def _store(self) -> Iterator[Metric]:
        stats = self.store.stats()
        evictions = CounterMetricFamily(
            "buildcache_evictions",
            "Objects removed from the store to stay under its size limit.",
        )
        evictions.add_metric([], self.activity.evictions)
        yield evictions
        for name, documentation, value in (
            ("buildcache_prefetches",
             "Distribution files read ahead after a client read their metadata.",
             self.store.counters.prefetches),  # removed after merge
            ("buildcache_prefetch_hits",
             "Read-ahead files that a client asked for afterwards.",
             self.store.counters.prefetch_hits),  # removed after merge
        ):
            counter = CounterMetricFamily(name, documentation)
            counter.add_metric([], value)
            yield counter
        for name, documentation, value in (
            ("buildcache_store_size_bytes",
             "Bytes stored: bodies and their index rows (headers).",
             stats.bytes_stored),
            ("buildcache_store_metadata_bytes",
             "Of the bytes stored, the index rows' (headers, keys).",
             stats.bytes_metadata),
            ("buildcache_store_downloading_bytes",
             "Room held for bodies being downloaded into tmp/.",
             stats.bytes_downloading),
            ("buildcache_store_entries", "Objects in the store.", stats.entries),
            ("buildcache_store_max_size_bytes", "The store's size limit.",
             stats.max_size),
        ):
            gauge = GaugeMetricFamily(name, documentation)
            gauge.add_metric([], value)
            yield gauge


@define(eq=False)
class Metrics:
    """
    The registry of one server and its exposition.

    Creating it subscribes the latency histogram to ``activity``.
    """

    activity: Activity
    store: Store
    fetcher: Fetcher
    registry: CollectorRegistry = field(factory=lambda: CollectorRegistry(auto_describe=True))
    latency: Histogram = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.latency = Histogram(
            "buildcache_upstream_latency_seconds",
            "Seconds from sending an upstream request to its response headers.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(ActivityCollector(self.activity, self.store, self.fetcher))
        self.activity.latency_observers.append(self.latency.observe)

    def render_metrics(self) -> tuple[bytes, str]:
        """
        The Prometheus text exposition and its ``Content-Type``.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
