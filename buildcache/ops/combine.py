"""
The snapshots of several server processes added up into one, by the rules
the module docstring of :mod:`buildcache.ops.snapshot` lists: counts are
summed, ratios recomputed, the shared store's figures and the
configuration taken from the first snapshot (the main process's).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from buildcache.ops.activity import Totals
from buildcache.ops.shared_tier import combine_shared
from buildcache.ops.snapshot import (
    FrontEndFigures,
    Latency,
    Snapshot,
    StoreFigures,
    TrafficBucket,
    UpstreamFigures,
    assemble,
    front_end_figures,
    sum_statuses,
    top_names,
)

_T = TypeVar("_T")
_Key = TypeVar("_Key")


def combine(snapshots: Sequence[Snapshot]) -> Snapshot:
    """
    One snapshot for the whole server, from those of its processes, the
    main process's first.  One snapshot comes back as it is.
    """
    if not snapshots:
        raise ValueError("no snapshot to combine")
    first = snapshots[0]
    if len(snapshots) == 1:
        return first
    # In order of first appearance, so the known front ends keep theirs.
    front_ends = {
        name: _front_end(name, [figures for _, figures in parts])
        for name, parts in _grouped(
            (part for s in snapshots for part in s["front_ends"].items()),
            lambda part: part[0],
        ).items()
    }
    top: Counter[tuple[str, str]] = Counter()
    for snapshot in snapshots:
        for front_end, entries in snapshot["top"].items():
            for entry in entries:
                top[(front_end, entry["name"])] += entry["requests"]
    return assemble(
        generated_at=max(s["generated_at"] for s in snapshots),
        started_at=min(s["started_at"] for s in snapshots),
        front_ends=front_ends,
        store=_store([s["store"] for s in snapshots]),
        downloads_in_flight=sum(s["downloads_in_flight"] for s in snapshots),
        read_aheads_running=sum(s["read_aheads_running"] for s in snapshots),
        traffic={
            "bucket_seconds": first["traffic"]["bucket_seconds"],
            "buckets": _traffic([s["traffic"]["buckets"] for s in snapshots]),
        },
        # Each process lists only its own most requested names: a name
        # just below the cut in every process can be missing here.
        top=top_names(top.items()),
        upstreams=[
            _upstream(rows)
            for _, rows in sorted(
                _grouped((row for s in snapshots for row in s["upstreams"]),
                         lambda row: row["host"]).items()
            )
        ],
        upstream_latency=_latency([s["upstream_latency"] for s in snapshots]),
        registry=first["registry"],
        shared=combine_shared([s["shared"] for s in snapshots]),
        config=first["config"],
    )


def _grouped(items: Iterable[_T], key: Callable[[_T], _Key]) -> dict[_Key, list[_T]]:
    groups: dict[_Key, list[_T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _front_end(name: str, parts: Sequence[FrontEndFigures]) -> FrontEndFigures:
    return front_end_figures(name, Totals(
        requests=sum(part["requests"] for part in parts),
        by_status=Counter(sum_statuses(part["by_status"] for part in parts)),
        bytes_from_cache=sum(part["bytes_from_cache"] for part in parts),
        bytes_from_upstream=sum(part["bytes_from_upstream"] for part in parts),
        bytes_sent_on_miss=sum(part["bytes_sent_on_miss"] for part in parts),
        errors=sum(part["errors"] for part in parts),
        shared_hits=sum(part["shared_hits"] for part in parts),
        bytes_from_shared=sum(part["bytes_from_shared"] for part in parts),
    ))


def _store(parts: Sequence[StoreFigures]) -> StoreFigures:
    # One store: its sizes as the first process reads them; the room held
    # for downloads is each process's own.
    first = parts[0]
    return {
        "entries": first["entries"],
        "bytes_stored": first["bytes_stored"],
        "bytes_metadata": first["bytes_metadata"],
        "bytes_downloading": sum(part["bytes_downloading"] for part in parts),
        "max_size": first["max_size"],
        "fill": first["fill"],
        "evictions": sum(part["evictions"] for part in parts),
        "bytes_evicted": sum(part["bytes_evicted"] for part in parts),
        "hits": sum(part["hits"] for part in parts),
        "misses": sum(part["misses"] for part in parts),
        "revalidations": sum(part["revalidations"] for part in parts),
        "prefetches": sum(part["prefetches"] for part in parts),
        "prefetch_hits": sum(part["prefetch_hits"] for part in parts),
    }


def _traffic(series: Sequence[list[TrafficBucket]]) -> list[TrafficBucket]:
    by_start: dict[float, TrafficBucket] = {}
    for buckets in series:
        for bucket in buckets:
            total = by_start.setdefault(
                bucket["start"],
                {"start": bucket["start"], "from_cache": 0, "from_upstream": 0},
            )
            total["from_cache"] += bucket["from_cache"]
            total["from_upstream"] += bucket["from_upstream"]
    # As long as one process's series, ending with the latest bucket (the
    # processes' clocks may straddle a bucket's start).
    length = max(len(buckets) for buckets in series)
    return [by_start[start] for start in sorted(by_start)][-length:] if length else []


def _upstream(rows: Sequence[UpstreamFigures]) -> UpstreamFigures:
    successes = [row["last_success"] for row in rows if row["last_success"] is not None]
    failed = [row for row in rows if row["last_error"] is not None]
    latest = max(failed, key=lambda row: row["last_error"] or 0.0, default=rows[0])
    return {
        "host": rows[0]["host"],
        "successes": sum(row["successes"] for row in rows),
        "errors": sum(row["errors"] for row in rows),
        "stale_served": sum(row["stale_served"] for row in rows),
        "last_success": max(successes, default=None),
        "last_error": latest["last_error"],
        "last_error_message": latest["last_error_message"],
    }


def _latency(parts: Sequence[Latency]) -> Latency:
    return {
        "buckets": [
            {"le": bucket["le"], "count": sum(p["buckets"][i]["count"] for p in parts)}
            for i, bucket in enumerate(parts[0]["buckets"])
        ],
        "count": sum(p["count"] for p in parts),
        "sum": sum(p["sum"] for p in parts),
    }
