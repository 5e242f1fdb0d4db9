"""
The figures of a running server as one plain snapshot: what
``/-/stats.json`` serves, and all that the status page
(:mod:`buildcache.ops.page`) and the metrics (:mod:`buildcache.ops.metrics`)
are rendered from.

:class:`SnapshotSources` reads, at request time, the accounts of
:class:`buildcache.ops.activity.Activity` (requests, bytes, upstreams,
read-ahead, evictions), the store's size figures, the registry's images
stored by tag (:mod:`buildcache.ops.images`), the fetcher's and the
prefetcher's work in flight and the configuration; nothing is counted
here.  A :data:`Snapshot` is made of dicts, lists, strings and numbers
only, so that it goes through JSON unchanged, and the snapshots of several
processes add up into one with :func:`buildcache.ops.combine.combine`.

Which fields add up across processes:

- **summed**: every request, error, status and byte count (top level,
  per front end, per traffic bucket, per most-requested name, per
  upstream host), ``downloads_in_flight``, ``read_aheads_running``, the
  store's ``bytes_downloading`` (each process holds its own room),
  ``evictions``, ``bytes_evicted``, ``hits``, ``misses``,
  ``revalidations``, ``prefetches``, ``prefetch_hits``, the upstream
  latency histogram's counts and sum, and the shared tier's counts
  (``shared_hits``, ``bytes_from_shared``, and those of ``shared``);
- **recomputed** from the sums: every ``hit_ratio``, ``bytes_saved``, the
  store's ``fill``, ``uptime_seconds``;
- **shared**, not summed (one store, one configuration): the store's
  ``entries``, ``bytes_stored``, ``bytes_metadata`` and ``max_size``, the
  images stored by tag (``registry``), and ``config``, as the first
  snapshot (the main process's) has them;
- **latest**: ``generated_at``, the shared tier's ``last_eviction`` and
  health (unhealthy if any process finds it so), and each upstream's ``last_success``,
  ``last_error`` (the greatest) and ``last_error_message`` (the one of the
  latest error); ``started_at`` is the earliest.

URLs and upstream error messages are redacted here, once: nothing in a
snapshot carries credentials.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Protocol, TypedDict

from attrs import Factory, define, field
from twisted.internet.interfaces import IReactorTime

from buildcache.config import Config
from buildcache.credentials import hide_userinfo, redact, shown_url
from buildcache.ecosystems.pypi.prefetch import UNCLAIMED_BUDGET_FILES
from buildcache.ops.activity import (
    BUCKET_SECONDS,
    CACHE_STATUSES,
    LATENCY_BUCKETS,
    Activity,
    Totals,
)
from buildcache.ops.front_ends import FRONT_END_LABELS, FRONT_ENDS
from buildcache.ops.images import RegistryStored, StoredImages
from buildcache.ops.shared_tier import SharedFigures, SharedStatus, shared_figures
from buildcache.store import Store, StoreStats

#: Names listed per front end in the most-requested table.
TOP_NAMES_SHOWN = 15

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


class FrontEndFigures(TypedDict):
    """
    One front end's figures since start-up.
    """

    label: str
    requests: int
    #: By cache status (``X-Cache``; "none" for refusals and errors).
    by_status: dict[str, int]
    errors: int
    #: Sent to clients from entries already stored: the bytes saved.
    bytes_from_cache: int
    #: Crossed the line from upstreams for this front end.
    bytes_from_upstream: int
    bytes_saved: int
    #: Sent to clients on misses.
    bytes_sent_on_miss: int
    hit_ratio: float | None
    #: Of the HITs, those answered with a copy from the shared tier, and
    #: the bytes they sent (counted in ``bytes_from_cache`` too).
    shared_hits: int
    bytes_from_shared: int


class StoreFigures(TypedDict):
    """
    The store's fill, and what left it or was read ahead into it.
    """

    entries: int
    #: Bodies and rows together: what counts against ``max_size``.
    bytes_stored: int
    bytes_metadata: int
    bytes_downloading: int
    max_size: int
    fill: float | None
    evictions: int
    bytes_evicted: int
    #: The figures the store used to count, under their old keys: now
    #: from the request accounts (``hits`` counts stale answers too).
    hits: int
    misses: int
    revalidations: int
    prefetches: int
    prefetch_hits: int


class TrafficBucket(TypedDict):
    """
    Bytes served in one bucket of the traffic series.
    """

    start: float
    from_cache: int
    from_upstream: int


class Traffic(TypedDict):
    """
    The last 24 hours, oldest bucket first, empty ones included.
    """

    bucket_seconds: int
    buckets: list[TrafficBucket]


class TopName(TypedDict):
    """
    One row of the most-requested table.
    """

    name: str
    requests: int


class UpstreamFigures(TypedDict):
    """
    One upstream host's health (times are Unix seconds).
    """

    host: str
    successes: int
    errors: int
    stale_served: int
    last_success: float | None
    last_error: float | None
    last_error_message: str | None


class LatencyBucket(TypedDict):
    """
    One bound of the upstream latency histogram.
    """

    #: Upper bound, seconds.
    le: float
    #: Observations at most ``le`` (cumulative, as Prometheus counts).
    count: int


class Latency(TypedDict):
    """
    The upstream latency histogram.
    """

    buckets: list[LatencyBucket]
    #: All observations (the ``+Inf`` bucket).
    count: int
    sum: float


class MirrorShown(TypedDict):
    """
    A mirror route, its URL redacted.
    """

    name: str
    url: str


class ConfigShown(TypedDict):
    """
    The effective configuration, without secrets.
    """

    proxy_endpoint: str
    index_endpoint: str
    #: None when the registry port is off.
    registry_endpoint: str | None
    cache_dir: str
    max_size: int
    max_object_size: int
    index_ttl: float
    upstream_timeout: float
    mirrors: list[MirrorShown]
    pypi_upstreams: list[str]
    #: The registry port's upstreams, by NAME; ``***@`` marks one that
    #: ``--registry-auth`` gives credentials for.
    registries: list[MirrorShown]
    registry_auth_files: list[str]
    netrc_file: str | None
    allow_from: list[str]
    allow_upstream: list[str]
    log_format: str
    prefetch_max_size: int
    #: Bytes read ahead that may wait unasked for before read-ahead pauses.
    prefetch_unclaimed_budget: int
    max_connections_per_client: int
    #: ``--shared-store`` (its endpoint without user information), or
    #: None; the secret's file, never the secret.
    shared_store: str | None
    shared_secret_file: str | None
    shared_max_size: int | None
    shared_wait: float


class WorkersFigures(TypedDict):
    """
    The processes of a server of ``--workers N`` (the main one counted):
    how many are configured, running, answered for this snapshot (the
    figures are those of the ones that answered), and how many times a
    worker was restarted.
    """

    configured: int
    alive: int
    answered: int
    restarts: int


class Snapshot(TypedDict):
    """
    Everything the status page shows.  Times are Unix seconds, sizes
    bytes, ratios between 0 and 1 (``None`` before the first cacheable
    answer).
    """

    generated_at: float
    started_at: float
    uptime_seconds: float
    requests: int
    errors: int
    by_status: dict[str, int]
    hit_ratio: float | None
    bytes_from_cache: int
    bytes_from_upstream: int
    bytes_saved: int
    #: HITs answered from the shared tier, and their bytes (in the HITs
    #: and ``bytes_from_cache`` too).
    shared_hits: int
    bytes_from_shared: int
    front_ends: dict[str, FrontEndFigures]
    store: StoreFigures
    downloads_in_flight: int
    read_aheads_running: int
    traffic: Traffic
    #: Per front end, most requested first.
    top: dict[str, list[TopName]]
    #: By host.
    upstreams: list[UpstreamFigures]
    upstream_latency: Latency
    registry: RegistryStored
    #: None without a shared tier.
    shared: SharedFigures | None
    config: ConfigShown
    #: None for one process (``--workers 1``) and in each process's own.
    workers: WorkersFigures | None


class Downloads(Protocol):
    """
    The fetcher, as the snapshot reads it.
    """

    def in_flight(self) -> int:
        """
        Upstream downloads running now.
        """


class ReadAheads(Protocol):
    """
    The prefetcher, as the snapshot reads it.
    """

    def running(self) -> int:
        """
        Read-aheads scheduled or running now.
        """


def redact_text(text: str) -> str:
    """
    ``text`` with the credentials of every URL in it replaced by ``***``
    (upstream error messages quote the URL they failed on), and the
    signature and key of a presigned URL (see :func:`redact`).
    """
    return _URL_IN_TEXT.sub(lambda match: redact(match.group(0)), text)


def hit_ratio(by_status: Mapping[str, int]) -> float | None:
    """
    The share of cacheable answers served from the store (HIT,
    REVALIDATED, STALE), or ``None`` before the first.
    """
    return Totals(by_status=Counter(by_status)).hit_ratio


def statuses(by_status: Mapping[str, int]) -> dict[str, int]:
    """
    ``by_status`` with every status of :data:`CACHE_STATUSES` (0 when
    none), then any other in name order.
    """
    shown = {status: int(by_status.get(status, 0)) for status in CACHE_STATUSES}
    for status, count in sorted(by_status.items()):
        shown.setdefault(status, int(count))
    return shown


def sum_statuses(all_by_status: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """
    Several ``by_status`` tables added up (see :func:`statuses`).
    """
    total: Counter[str] = Counter()
    for by_status in all_by_status:
        total.update(by_status)
    return statuses(total)


def front_end_figures(name: str, totals: Totals) -> FrontEndFigures:
    return {
        "label": FRONT_END_LABELS.get(name, name),
        "requests": totals.requests,
        "by_status": statuses(totals.by_status),
        "errors": totals.errors,
        "bytes_from_cache": totals.bytes_from_cache,
        "bytes_from_upstream": totals.bytes_from_upstream,
        "bytes_saved": totals.bytes_from_cache,
        "bytes_sent_on_miss": totals.bytes_sent_on_miss,
        "hit_ratio": totals.hit_ratio,
        "shared_hits": totals.shared_hits,
        "bytes_from_shared": totals.bytes_from_shared,
    }


def assemble(
    *,
    generated_at: float,
    started_at: float,
    front_ends: dict[str, FrontEndFigures],
    store: StoreFigures,
    downloads_in_flight: int,
    read_aheads_running: int,
    traffic: Traffic,
    top: dict[str, list[TopName]],
    upstreams: list[UpstreamFigures],
    upstream_latency: Latency,
    registry: RegistryStored,
    shared: SharedFigures | None,
    config: ConfigShown,
    workers: WorkersFigures | None = None,
) -> Snapshot:
    """
    A snapshot of its parts, with the server-wide totals of the front
    ends' figures and the ratios worked out here, in one place.
    """
    figures = list(front_ends.values())
    by_status = sum_statuses(f["by_status"] for f in figures)
    from_cache = sum(f["bytes_from_cache"] for f in figures)
    return {
        "generated_at": generated_at,
        "started_at": started_at,
        "uptime_seconds": generated_at - started_at,
        "requests": sum(f["requests"] for f in figures),
        "errors": sum(f["errors"] for f in figures),
        "by_status": by_status,
        "hit_ratio": hit_ratio(by_status),
        "bytes_from_cache": from_cache,
        "bytes_from_upstream": sum(f["bytes_from_upstream"] for f in figures),
        "bytes_saved": from_cache,
        "shared_hits": sum(f["shared_hits"] for f in figures),
        "bytes_from_shared": sum(f["bytes_from_shared"] for f in figures),
        "front_ends": front_ends,
        "store": store,
        "downloads_in_flight": downloads_in_flight,
        "read_aheads_running": read_aheads_running,
        "traffic": traffic,
        "top": top,
        "upstreams": upstreams,
        "upstream_latency": upstream_latency,
        "registry": registry,
        "shared": shared,
        "config": config,
        "workers": workers,
    }


def top_names(counts: Iterable[tuple[tuple[str, str], int]]) -> dict[str, list[TopName]]:
    """
    The most requested table: per front end (every one of
    :data:`FRONT_ENDS`, empty or not), the :data:`TOP_NAMES_SHOWN` names
    asked for most, most first, ties by name.
    """
    per_front_end: dict[str, list[tuple[str, int]]] = {n: [] for n in FRONT_ENDS}
    for (front_end, name), count in counts:
        per_front_end.setdefault(front_end, []).append((name, count))
    return {
        front_end: [
            {"name": name, "requests": count}
            for name, count in sorted(names, key=lambda item: (-item[1], item[0]))[
                :TOP_NAMES_SHOWN
            ]
        ]
        for front_end, names in per_front_end.items()
    }


def _with_marker(url: str, credentials: bool) -> str:
    # As shown_url marks the other upstreams sent credentials.
    scheme, separator, rest = url.partition("://")
    return f"{scheme}{separator}***@{rest}" if credentials and separator else url


def fill(bytes_stored: int, max_size: int) -> float | None:
    return bytes_stored / max_size if max_size else None


@define
class SnapshotSources:
    """
    What a snapshot of one server process is read from.  A process that
    fetches nothing (a hit worker) has no ``fetcher`` nor ``prefetcher``;
    a server without a shared tier no ``shared_tier``.
    """

    config: Config
    store: Store
    fetcher: Downloads | None
    activity: Activity
    clock: IReactorTime
    prefetcher: ReadAheads | None = None
    shared_tier: SharedStatus | None = None
    started: float = field(
        default=Factory(lambda self: self.clock.seconds(), takes_self=True)
    )
    _images: StoredImages = field(
        default=Factory(lambda self: StoredImages(self.store, self.clock), takes_self=True),
        init=False,
    )

    def snapshot(self) -> Snapshot:
        """
        The figures now.
        """
        activity = self.activity
        front_ends = {
            name: front_end_figures(name, totals)
            for name, totals in activity.totals.items()
        }
        sizes = self.store.stats()
        return assemble(
            generated_at=self.clock.seconds(),
            started_at=self.started,
            front_ends=front_ends,
            store=self._store(
                sizes, sum_statuses(f["by_status"] for f in front_ends.values())
            ),
            downloads_in_flight=0 if self.fetcher is None else self.fetcher.in_flight(),
            read_aheads_running=(
                0 if self.prefetcher is None else self.prefetcher.running()
            ),
            traffic={
                "bucket_seconds": BUCKET_SECONDS,
                "buckets": [
                    {
                        "start": bucket.start,
                        "from_cache": bucket.from_cache,
                        "from_upstream": bucket.from_upstream,
                    }
                    for bucket in activity.series()
                ],
            },
            top=top_names(activity.top_names.items()),
            upstreams=[
                {
                    "host": health.host,
                    "successes": health.successes,
                    "errors": health.errors,
                    "stale_served": health.stale_served,
                    "last_success": health.last_success,
                    "last_error": health.last_error,
                    "last_error_message": (
                        None if health.last_error_message is None
                        else redact_text(health.last_error_message)
                    ),
                }
                for _, health in sorted(activity.upstreams.items())
            ],
            upstream_latency=self._latency(),
            registry=self._images.read(sizes),
            shared=(
                None if self.shared_tier is None
                else shared_figures(self.shared_tier.status(), redact_text)
            ),
            config=self._config(),
        )

    def _store(self, sizes: StoreStats, by_status: Mapping[str, int]) -> StoreFigures:
        # Only the store's size figures: what it served and evicted is in
        # the request accounts.
        activity = self.activity
        return {
            "entries": sizes.entries,
            "bytes_stored": sizes.bytes_stored,
            "bytes_metadata": sizes.bytes_metadata,
            "bytes_downloading": sizes.bytes_downloading,
            "max_size": sizes.max_size,
            "fill": fill(sizes.bytes_stored, sizes.max_size),
            "evictions": activity.evictions,
            "bytes_evicted": activity.bytes_evicted,
            "hits": by_status["HIT"] + by_status["STALE"],
            "misses": by_status["MISS"],
            "revalidations": by_status["REVALIDATED"],
            "prefetches": activity.read_ahead,
            "prefetch_hits": activity.read_ahead_used,
        }

    def _latency(self) -> Latency:
        histogram = self.activity.latency
        buckets: list[LatencyBucket] = []
        below = 0
        for bound, count in zip(LATENCY_BUCKETS, histogram.counts):
            below += count
            buckets.append({"le": bound, "count": below})
        return {"buckets": buckets, "count": sum(histogram.counts), "sum": histogram.sum}

    def _config(self) -> ConfigShown:
        config = self.config
        credentials = config.upstream_credentials
        return {
            "proxy_endpoint": config.proxy_endpoint,
            "index_endpoint": config.index_endpoint,
            "registry_endpoint": config.registry_endpoint,
            "cache_dir": config.cache_dir,
            "max_size": config.max_size,
            "max_object_size": config.max_object_size,
            "index_ttl": config.index_ttl,
            "upstream_timeout": config.upstream_timeout,
            # "***@" marks an upstream sent credentials; they never show.
            "mirrors": [
                {"name": mirror.name, "url": shown_url(redact(mirror.url), credentials)}
                for mirror in config.mirrors
            ],
            "pypi_upstreams": [
                shown_url(redact(url), credentials) for url in config.pypi_upstreams
            ],
            "registries": [
                {
                    "name": registry.name,
                    "url": _with_marker(redact(registry.url), registry.credentials is not None),
                }
                for registry in config.registries
            ],
            "registry_auth_files": list(config.registry_auth_files),
            "netrc_file": config.netrc_file,
            "allow_from": [str(network) for network in config.allow_from],
            "allow_upstream": list(config.allow_upstream),
            "log_format": config.log_format,
            "prefetch_max_size": config.prefetch_max_size,
            "prefetch_unclaimed_budget": UNCLAIMED_BUDGET_FILES * config.prefetch_max_size,
            "max_connections_per_client": config.max_connections_per_client,
            "shared_store": (
                None if config.shared_store is None
                else hide_userinfo(config.shared_store.url())
            ),
            "shared_secret_file": config.shared_secret_file,
            "shared_max_size": config.shared_max_size,
            "shared_wait": config.shared_wait,
        }
