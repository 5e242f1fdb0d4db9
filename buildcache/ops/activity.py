"""
What the server has been doing: one record per finished request (the
access log line, per-front-end totals, the 24-hour traffic series, the most
requested names), the health and latency of each upstream, read-ahead and
evictions.

:class:`Activity` implements the observer interfaces the layers below
report through (:class:`buildcache.engine.events.CacheObserver`, which
includes :class:`buildcache.fetch.events.FetchObserver`): its figures are
fed by those methods only, and read by :mod:`buildcache.ops.snapshot`,
from which the status page, the JSON stats and the metrics are made.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from attrs import Factory, define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from buildcache.access import upstream_host_key
from buildcache.engine.events import CacheObserver, Exchange
from buildcache.ops.access_lines import (
    ACCESS_SYSTEM,
    AccessRecord,
    access_event,
    access_record,
)
from buildcache.ops.front_ends import FRONT_ENDS
from buildcache.turns import after_io

#: Cache statuses (``X-Cache``), plus "none" for refusals and errors.
CACHE_STATUSES = ("HIT", "MISS", "REVALIDATED", "STALE", "none")
#: Width of one bucket of the traffic series, and how many are kept.
BUCKET_SECONDS = 300
BUCKETS = 24 * 3600 // BUCKET_SECONDS
#: Names kept in the most-requested table before the tail is pruned.
TOP_NAMES_KEPT = 2000
#: Rows of the upstream-health table kept besides the configured upstreams:
#: hosts that proxied requests reached, least recently updated out first.
#: Per process.
OTHER_UPSTREAMS_KEPT = 64
#: Longest upstream error message kept in a row.
ERROR_MESSAGE_KEPT = 500
#: Upper bounds (seconds) of the upstream latency histogram: from a nearby
#: mirror's few milliseconds to a registry that takes the whole timeout.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
_FROM_CACHE = frozenset({"HIT", "REVALIDATED", "STALE"})


@define
class Totals:
    """
    Counts for one front end since start-up.
    """

    requests: int = 0
    by_status: Counter[str] = Factory(Counter)
    #: Body bytes sent to clients from entries already stored (HIT,
    #: REVALIDATED, STALE): the bytes saved.
    bytes_from_cache: int = 0
    #: Body bytes that crossed the line from upstreams for this front end,
    #: however many clients (or none, or a range) they were sent to.
    bytes_from_upstream: int = 0
    #: Body bytes sent to clients on misses (X-Cache: MISS).
    bytes_sent_on_miss: int = 0
    errors: int = 0
    #: Of the HITs, those answered with a copy read from the shared tier
    #: (no byte crossed the line), and the body bytes they sent.
    shared_hits: int = 0
    bytes_from_shared: int = 0

    @property
    def hit_ratio(self) -> float | None:
        served = sum(self.by_status[s] for s in ("HIT", "MISS", "REVALIDATED", "STALE"))
        if not served:
            return None
        hits = sum(self.by_status[s] for s in _FROM_CACHE)
        return hits / served


@frozen
class Bucket:
    start: float
    from_cache: int
    from_upstream: int


@define
class LatencyHistogram:
    """
    Upstream latencies by :data:`LATENCY_BUCKETS`: plain counts, so that
    the histograms of several processes add up.
    """

    #: Observations per bucket (not cumulative); the last one is over the
    #: largest bound.
    counts: list[int] = Factory(lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    sum: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds


@define
class UpstreamHealth:
    """
    The last things one upstream (by host) did.
    """

    host: str
    successes: int = 0
    errors: int = 0
    stale_served: int = 0
    last_success: float | None = None
    last_error: float | None = None
    last_error_message: str | None = None


@define
class Activity:
    """
    The accounts of one server process.

    The attributes are read by :mod:`buildcache.ops.snapshot`; only the
    observer methods change them.
    """

    log = Logger()

    clock: IReactorTime
    #: Health-table keys (see :func:`buildcache.access.upstream_host_key`)
    #: of the configured mirrors and indexes: always kept.
    configured_upstreams: frozenset[str] = frozenset()
    totals: dict[str, Totals] = field(
        factory=lambda: {name: Totals() for name in FRONT_ENDS}
    )
    top_names: Counter[tuple[str, str]] = Factory(Counter)
    #: By host key: the configured upstreams, then at most
    #: :data:`OTHER_UPSTREAMS_KEPT` others in order of their last update.
    upstreams: dict[str, UpstreamHealth] = Factory(dict)
    _series: deque[list[float]] = Factory(lambda: deque(maxlen=BUCKETS))
    #: Files read ahead of clients, and how many of them were asked for.
    read_ahead: int = 0
    read_ahead_used: int = 0
    #: Entries (and their bytes) the store evicted to stay under its limit.
    evictions: int = 0
    bytes_evicted: int = 0
    #: Seconds from an upstream request to its response headers.
    latency: LatencyHistogram = Factory(LatencyHistogram)
    #: Requests of this turn whose access lines are written after its
    #: responses.
    _unwritten: list[Exchange] = Factory(list)
    #: Where this turn's access lines go, as records, instead of this
    #: process's log: a hit worker sends them to the main process (see
    #: :mod:`buildcache.ops.access_lines`).
    access_sink: Callable[[list[AccessRecord]], None] | None = None

    def exchange_finished(self, exchange: Exchange) -> None:
        """
        Account for one finished request (see :class:`Exchange`): its
        front end's totals, the traffic series, the most-requested table,
        and its access line (written after this turn's responses).
        """
        cache_status = exchange.cache or "none"
        sent = exchange.bytes_sent
        totals = self._totals(exchange.front_end)
        totals.requests += 1
        totals.by_status[cache_status] += 1
        if exchange.status >= 400 or not exchange.completed:
            totals.errors += 1
        bucket = self._bucket(self.clock.seconds())
        if cache_status in _FROM_CACHE:
            totals.bytes_from_cache += sent
            bucket[1] += sent
            if _from_shared(exchange):
                # A HIT like any other, and counted apart besides.
                totals.shared_hits += 1
                totals.bytes_from_shared += sent
        elif cache_status == "MISS":
            # What crossed the line is counted as it arrives (see
            # upstream_received): a HEAD or a range may start a whole
            # download, and several clients may share one.
            totals.bytes_sent_on_miss += sent
        if exchange.name is not None and exchange.status < 400:
            self.top_names[(exchange.front_end, exchange.name)] += 1
            if len(self.top_names) > TOP_NAMES_KEPT * 2:
                self.top_names = Counter(dict(self.top_names.most_common(TOP_NAMES_KEPT)))
        # The line is formatted and written once the response has gone out
        # (that work would hold it up), with the others of this turn.
        if not self._unwritten:
            after_io(self.clock).addCallback(self._write_lines)
        self._unwritten.append(exchange)

    def _write_lines(self, _: object) -> None:
        unwritten, self._unwritten = self._unwritten, []
        now = self.clock.seconds()
        records = [access_record(exchange, now) for exchange in unwritten]
        if self.access_sink is not None:
            self.access_sink(records)
            return
        # The events Logger.info would make, made directly (one Logger for
        # the turn, not one per line): their text is formatted once, in
        # access_event.
        log = self.log
        observer, source, namespace = log.observer, log.source, log.namespace
        for record in records:
            observer(access_event(record, ACCESS_SYSTEM, log, source, namespace))

    def _bucket(self, now: float) -> list[float]:
        start = now - now % BUCKET_SECONDS
        if not self._series or self._series[-1][0] != start:
            self._series.append([start, 0, 0])
        return self._series[-1]

    def series(self) -> Iterator[Bucket]:
        """
        Bytes served from cache and from upstream per bucket over the last
        24 hours, oldest first, empty buckets included.
        """
        now = self.clock.seconds()
        last = now - now % BUCKET_SECONDS
        recorded = {int(b[0]): b for b in self._series}
        for i in range(BUCKETS - 1, -1, -1):
            start = last - i * BUCKET_SECONDS
            b = recorded.get(int(start))
            yield Bucket(start, int(b[1]), int(b[2])) if b else Bucket(start, 0, 0)

    def upstream_received(self, front_end: str, count: int) -> None:
        """
        ``count`` body bytes arrived from an upstream for ``front_end``.
        """
        self._totals(front_end).bytes_from_upstream += count
        self._bucket(self.clock.seconds())[2] += count

    def _totals(self, front_end: str) -> Totals:
        totals = self.totals.get(front_end)
        if totals is None:
            # A front end not in FRONT_ENDS (the names come from the code,
            # not from clients: the table stays small).
            totals = self.totals[front_end] = Totals()
        return totals

    def _health(self, url: str) -> UpstreamHealth | None:
        host = upstream_host_key(url)
        if host is None:
            return None
        upstreams = self.upstreams
        health = upstreams.pop(host, None)
        if health is None:
            health = UpstreamHealth(host)
            if host not in self.configured_upstreams:
                others = [h for h in upstreams if h not in self.configured_upstreams]
                # Proxied requests can name any number of hosts: the table
                # (and the metrics labels read from it) keeps the latest.
                for evicted in others[: max(0, len(others) - OTHER_UPSTREAMS_KEPT + 1)]:
                    del upstreams[evicted]
        # Re-inserted: the dict's order is the order of last updates.
        upstreams[host] = health
        return health

    def upstream_succeeded(self, url: str, latency: float) -> None:
        health = self._health(url)
        if health is not None:
            health.successes += 1
            health.last_success = self.clock.seconds()
        self.latency.observe(latency)

    def upstream_failed(self, url: str, error: str) -> None:
        health = self._health(url)
        if health is None:
            return
        health.errors += 1
        health.last_error = self.clock.seconds()
        health.last_error_message = error[:ERROR_MESSAGE_KEPT]

    def read_ahead_started(self) -> None:
        self.read_ahead += 1

    def read_ahead_claimed(self) -> None:
        self.read_ahead_used += 1

    def evicted(self, count: int, size: int) -> None:
        self.evictions += count
        self.bytes_evicted += size

    def stale_served(self, url: str) -> None:
        health = self._health(url)
        if health is not None:
            health.stale_served += 1


def _from_shared(exchange: Exchange) -> bool:
    """
    Whether ``exchange`` was a HIT answered from the shared tier.
    """
    return exchange.shared and exchange.cache == "HIT"


if TYPE_CHECKING:
    # mypy checks here that Activity implements the whole observer
    # interface the engine, the fetcher and the store report through.
    _OBSERVER: type[CacheObserver] = Activity
