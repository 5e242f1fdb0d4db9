"""
The status page, its JSON twin and the metrics endpoint, served on both
ports at ``/``, ``/-/stats.json`` and ``/-/metrics``.

This module owns what people see of a running server: :class:`StatusPage`
gathers the figures (cache fill, hit ratio and bytes saved per front end,
the 24-hour traffic series, the most requested names, upstream health and
the effective configuration) into one JSON-able snapshot and renders it as
a single self-contained HTML page (inline CSS and SVG, nothing fetched);
:class:`StatusResource` answers the three paths.  Every figure is read at
request time from :class:`buildcache.ops.activity.Activity`, the store and the
fetcher; nothing is counted here.  URLs pass through
:func:`buildcache.ops.activity.redact` and all text through ``html.escape``.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from attrs import Factory, define, field
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.config import Config
from buildcache.credentials import redact, shown_url
from buildcache.ecosystems.pypi.prefetch import UNCLAIMED_BUDGET_FILES
from buildcache.engine.respond import send_error
from buildcache.fetch.fetcher import Fetcher
from buildcache.ops.activity import (
    BUCKET_SECONDS,
    CACHE_STATUSES,
    FRONT_ENDS,
    Activity,
    Totals,
)
from buildcache.ops.metrics import Metrics
from buildcache.store import Store

#: Paths this module answers, on either port.
PAGE_PATH = "/"
STATS_PATH = "/-/stats.json"
METRICS_PATH = "/-/metrics"
STATUS_PATHS = frozenset({PAGE_PATH, STATS_PATH, METRICS_PATH})

#: How each front end is named for people.
FRONT_END_LABELS = {
    "proxy": "apk/apt proxy",
    "mirror": "mirror routes",
    "index": "pip index",
}
#: Names listed per front end in the most-requested table.
TOP_NAMES_SHOWN = 15
#: Seconds between reloads of the page in a browser left open on it.
PAGE_REFRESH_SECONDS = 60

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
# Scale maxima of the traffic chart, per unit: a quarter of each is a
# round number too, so every gridline label reads cleanly.
_NICE_STEPS = (1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 800, 1000)
# The chart's plot area: SVG user units of the outer element are CSS
# pixels, so text keeps its size whatever the width of the screen.
_CHART_HEIGHT = 250
_PLOT_TOP = 10
_PLOT_HEIGHT = 180
_PLOT_SCALE = 1000


def redact_text(text: str) -> str:
    """
    ``text`` with the credentials of every URL in it replaced by ``***``
    (upstream error messages quote the URL they failed on).
    """
    return _URL_IN_TEXT.sub(lambda match: redact(match.group(0)), text)


def human_bytes(size: float) -> str:
    """
    ``size`` bytes in binary units for people: ``"0 B"``, ``"1.5 KiB"``,
    ``"10 GiB"``.
    """
    value = float(size)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            break
        value /= 1024
    if unit == "B":
        return f"{int(value)} B"
    text = f"{value:.1f}".removesuffix(".0")
    return f"{text} {unit}"


def percent(ratio: float | None) -> str:
    """
    A ratio as a percentage with one decimal, or ``"n/a"`` when unknown;
    a ratio too small to show is not rounded down to nothing.
    """
    if ratio is None:
        return "n/a"
    if 0 < ratio * 100 < 0.05:
        return "<0.1%"
    return f"{ratio * 100:.1f}%"


def human_duration(seconds: float) -> str:
    """
    A duration for people, to two units: ``"42 s"``, ``"5 min"``,
    ``"3 h 12 min"``, ``"2 d 4 h"``.
    """
    whole = max(0, int(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min"
    return f"{secs} s"


def utc_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _hit_ratio(by_status: Mapping[str, int]) -> float | None:
    return Totals(by_status=Counter(by_status)).hit_ratio


def _front_end_stats(name: str, totals: Totals) -> dict[str, Any]:
    return {
        "label": FRONT_END_LABELS.get(name, name),
        "requests": totals.requests,
        "by_status": _statuses(totals.by_status),
        "errors": totals.errors,
        "bytes_from_cache": totals.bytes_from_cache,
        "bytes_from_upstream": totals.bytes_from_upstream,
        "bytes_saved": totals.bytes_from_cache,
        "hit_ratio": totals.hit_ratio,
    }


def _statuses(by_status: Mapping[str, int]) -> dict[str, int]:
    statuses = {status: int(by_status.get(status, 0)) for status in CACHE_STATUSES}
    for status, count in sorted(by_status.items()):
        statuses.setdefault(status, int(count))
    return statuses


@define
class StatusPage:
    """
    The figures of one running server, as data (:meth:`stats`) and as a
    page (:meth:`render_html`).
    """

    config: Config
    store: Store
    fetcher: Fetcher
    activity: Activity
    clock: IReactorTime
    started: float = field(
        default=Factory(lambda self: self.clock.seconds(), takes_self=True)
    )

    # -- data --------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """
        Everything the page shows, as JSON-able data.  Times are Unix
        seconds, sizes bytes, ratios between 0 and 1 (``None`` before the
        first cacheable answer).
        """
        now = self.clock.seconds()
        store = self.store.stats()
        front_ends = {
            name: _front_end_stats(name, self.activity.totals[name])
            for name in FRONT_ENDS
        }
        by_status: dict[str, int] = {}
        for figures in front_ends.values():
            for status, count in figures["by_status"].items():
                by_status[status] = by_status.get(status, 0) + count
        bytes_from_cache = sum(f["bytes_from_cache"] for f in front_ends.values())
        return {
            "generated_at": now,
            "started_at": self.started,
            "uptime_seconds": now - self.started,
            "requests": sum(f["requests"] for f in front_ends.values()),
            "errors": sum(f["errors"] for f in front_ends.values()),
            "by_status": by_status,
            "hit_ratio": _hit_ratio(by_status),
            "bytes_from_cache": bytes_from_cache,
            "bytes_from_upstream": sum(
                f["bytes_from_upstream"] for f in front_ends.values()
            ),
            "bytes_saved": bytes_from_cache,
            "front_ends": front_ends,
            "store": {
                "entries": store.entries,
                "bytes_stored": store.bytes_stored,
                "bytes_metadata": store.bytes_metadata,
                "bytes_downloading": store.bytes_downloading,
                "max_size": store.max_size,
                "fill": store.bytes_stored / store.max_size if store.max_size else None,
                "evictions": self.activity.evictions,
                "hits": self.store.counters.hits,  # removed after merge
                "misses": self.store.counters.misses,  # removed after merge
                "revalidations": self.store.counters.revalidations,  # removed after merge
                "prefetches": self.store.counters.prefetches,  # removed after merge
                "prefetch_hits": self.store.counters.prefetch_hits,  # removed after merge
            },
            "downloads_in_flight": self.fetcher.in_flight(),
            "traffic": {
                "bucket_seconds": BUCKET_SECONDS,
                "buckets": [
                    {
                        "start": bucket.start,
                        "from_cache": bucket.from_cache,
                        "from_upstream": bucket.from_upstream,
                    }
                    for bucket in self.activity.series()
                ],
            },
            "top": self._top_names(),
            "upstreams": [
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
                for _, health in sorted(self.activity.upstreams.items())
            ],
            "config": self._config(),
        }

    def _top_names(self) -> dict[str, list[dict[str, Any]]]:
        per_front_end: dict[str, list[tuple[str, int]]] = {n: [] for n in FRONT_ENDS}
        for (front_end, name), count in self.activity.top_names.items():
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

    def _config(self) -> dict[str, Any]:
        config = self.config
        credentials = config.upstream_credentials
        return {
            "proxy_endpoint": config.proxy_endpoint,
            "index_endpoint": config.index_endpoint,
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
            "netrc_file": config.netrc_file,
            "allow_from": [str(network) for network in config.allow_from],
            "allow_upstream": list(config.allow_upstream),
            "log_format": config.log_format,
            "prefetch_max_size": config.prefetch_max_size,
            "max_connections_per_client": config.max_connections_per_client,
        }

    # -- page --------------------------------------------------------------

    def render_html(self) -> bytes:
        """
        The status page: one HTML document with everything inline.
        """
        stats = self.stats()
        now = stats["generated_at"]
        parts = [
            "<!DOCTYPE html>\n",
            '<html lang="en">\n<head>\n<meta charset="utf-8">\n',
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
            f'<meta http-equiv="refresh" content="{PAGE_REFRESH_SECONDS}">\n',
            "<title>buildcache status</title>\n",
            f"<style>{_CSS}</style>\n</head>\n<body>\n",
            "<header>\n<h1>buildcache</h1>\n",
            f'<p class="muted">Status at {_time(now, now)} · up'
            f" {_e(human_duration(stats['uptime_seconds']))}"
            f" · {stats['downloads_in_flight']} downloads in flight</p>\n",
            "</header>\n<main>\n",
            _summary_section(stats),
            _fill_section(stats["store"]),
            _front_ends_section(stats["front_ends"]),
            _traffic_section(stats["traffic"]),
            _top_section(stats["top"], stats["front_ends"]),
            _upstreams_section(stats["upstreams"], now),
            _config_section(stats["config"]),
            "</main>\n<footer>\n",
            f'<p class="muted">The same figures: <a href="{STATS_PATH}">{STATS_PATH}</a>'
            f' · Prometheus: <a href="{METRICS_PATH}">{METRICS_PATH}</a>'
            f" · reloads every {PAGE_REFRESH_SECONDS} s</p>\n",
            "</footer>\n</body>\n</html>\n",
        ]
        return "".join(parts).encode("utf-8")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _time(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return '<span class="muted">never</span>'
    ago = now - timestamp
    relative = "just now" if ago < 5 else f"{human_duration(ago)} ago"
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
    return (
        f'<time datetime="{_e(iso)}" title="{_e(utc_time(timestamp))}">'
        f"{_e(relative)}</time>"
    )


def _figure(label: str, value: str, element_id: str | None = None, note: str = "") -> str:
    id_attribute = f' id="{_e(element_id)}"' if element_id else ""
    note_html = f'<span class="note">{_e(note)}</span>' if note else ""
    return (
        f'<div class="figure"{id_attribute}><span class="label">{_e(label)}</span>'
        f'<span class="value">{_e(value)}</span>{note_html}</div>\n'
    )


def _summary_section(stats: Mapping[str, Any]) -> str:
    ratio = stats["hit_ratio"]
    by_status = stats["by_status"]
    served = sum(by_status[s] for s in ("HIT", "MISS", "REVALIDATED", "STALE"))
    ratio_text = (
        f"Hit ratio: {percent(ratio)}" if ratio is not None
        else "Hit ratio: n/a (nothing served yet)"
    )
    return (
        '<section class="card">\n<h2>Cache effect</h2>\n'
        f'<p class="headline" id="hit-ratio">{_e(ratio_text)}</p>\n'
        '<div class="figures">\n'
        + _figure(
            "Bytes saved", human_bytes(stats["bytes_saved"]), "bytes-saved",
            "served from the cache instead of upstream",
        )
        + _figure(
            "From upstream", human_bytes(stats["bytes_from_upstream"]),
            note="crossed the line, counted once per download",
        )
        + _figure("Requests", f"{stats['requests']:,}", "requests")
        + _figure(
            "Hits / misses",
            f"{served - by_status['MISS']:,} / {by_status['MISS']:,}",
            note=f"{by_status['REVALIDATED']:,} revalidated,"
            f" {by_status['STALE']:,} stale",
        )
        + "</div>\n</section>\n"
    )


def _fill_section(store: Mapping[str, Any]) -> str:
    fill = store["fill"] or 0.0
    shown = min(max(fill, 0.0), 1.0) * 100
    # A sliver, so that a cache that holds anything never looks empty.
    drawn = max(shown, 0.5) if fill > 0 else 0.0
    level = "full" if fill >= 0.9 else "ok"
    return (
        '<section class="card">\n<h2>Cache fill</h2>\n'
        f'<p class="headline" id="cache-fill">{_e(human_bytes(store["bytes_stored"]))}'
        f' of {_e(human_bytes(store["max_size"]))}'
        f' <span class="muted">({_e(percent(fill))})</span></p>\n'
        f'<div class="bar" role="meter" aria-valuemin="0" aria-valuemax="100"'
        f' aria-valuenow="{shown:.1f}" aria-label="cache fill">'
        f'<span class="{level}" style="width: {drawn:.1f}%"></span></div>\n'
        '<div class="figures">\n'
        + _figure("Objects", f"{store['entries']:,}", "entries")
        + _figure("Evictions", f"{store['evictions']:,}", note="to stay under the limit")
        + _figure(
            "Read ahead", f"{store['prefetches']:,}", "prefetches",
            note=f"{store['prefetch_hits']:,} asked for since",
        )
        + "</div>\n</section>\n"
    )


def _front_ends_section(front_ends: Mapping[str, Mapping[str, Any]]) -> str:
    cards = []
    for name, figures in front_ends.items():
        statuses = figures["by_status"]
        rows = [
            ("Hit ratio", percent(figures["hit_ratio"])),
            ("Bytes saved", human_bytes(figures["bytes_saved"])),
            ("From upstream", human_bytes(figures["bytes_from_upstream"])),
            ("Requests", f"{figures['requests']:,}"),
            (
                "HIT / MISS",
                f"{statuses['HIT']:,} / {statuses['MISS']:,}",
            ),
            (
                "Revalidated / stale",
                f"{statuses['REVALIDATED']:,} / {statuses['STALE']:,}",
            ),
            ("Errors", f"{figures['errors']:,}"),
        ]
        cards.append(
            f'<div class="front-end" id="front-end-{_e(name)}">\n'
            f"<h3>{_e(figures['label'])}</h3>\n<dl>\n"
            + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>\n" for k, v in rows)
            + "</dl>\n</div>\n"
        )
    return (
        '<section class="card wide">\n<h2>By front end</h2>\n'
        '<div class="columns">\n' + "".join(cards) + "</div>\n</section>\n"
    )


def nice_maximum(largest: int) -> tuple[float, str]:
    """
    The chart's scale: a round number of bytes at least ``largest``, and
    the unit its gridlines are labelled in.
    """
    unit_index = 0
    value = float(max(largest, 1))
    while value > _NICE_STEPS[-1] and unit_index < len(_BYTE_UNITS) - 1:
        value /= 1024
        unit_index += 1
    step = next((s for s in _NICE_STEPS if s >= value), _NICE_STEPS[-1])
    if unit_index == 0:
        # Whole bytes on every gridline.
        step = max(4, -(-step // 4) * 4)
    return step * 1024.0**unit_index, _BYTE_UNITS[unit_index]


def _label(value: float, unit: str) -> str:
    if not value:
        return "0 B"
    scaled = value / 1024.0 ** _BYTE_UNITS.index(unit)
    text = f"{scaled:.2f}".rstrip("0").rstrip(".")
    return f"{text} {unit}"


def _series_path(values: Sequence[int], maximum: float) -> tuple[str, str]:
    """
    The line and the filled area of one series, as SVG path data in the
    plot's own coordinates (one unit per bucket across, 0..1000 up).
    """
    heights = [
        _PLOT_SCALE - round(min(v / maximum, 1.0) * _PLOT_SCALE, 1) for v in values
    ]
    commands = [f"M0 {heights[0]:g}"]
    for index in range(1, len(heights)):
        if heights[index] != heights[index - 1]:
            commands.append(f"H{index} V{heights[index]:g}")
    commands.append(f"H{len(heights)}")
    line = " ".join(commands)
    area = f"{line} V{_PLOT_SCALE} H0 Z"
    return line, area


def _traffic_chart(buckets: Sequence[Mapping[str, Any]]) -> str:
    from_cache = [int(b["from_cache"]) for b in buckets]
    from_upstream = [int(b["from_upstream"]) for b in buckets]
    count = len(buckets)
    largest = max(from_cache + from_upstream, default=0)
    maximum, unit = nice_maximum(largest)
    cache_line, cache_area = _series_path(from_cache, maximum)
    upstream_line, upstream_area = _series_path(from_upstream, maximum)
    grid = []
    for quarter in range(5):
        y = _PLOT_TOP + _PLOT_HEIGHT - _PLOT_HEIGHT * quarter / 4
        grid.append(f'<line class="grid" x1="0" x2="100%" y1="{y:g}" y2="{y:g}"></line>')
        # An empty chart has no scale worth labelling beyond its baseline.
        if largest or not quarter:
            grid.append(
                f'<text class="axis" x="4" y="{y - 4:g}">'
                f"{_e(_label(maximum * quarter / 4, unit))}</text>"
            )
        grid.append("\n")
    if not largest:
        grid.append(
            f'<text id="traffic-empty" class="axis" x="50%" y="{_PLOT_TOP + _PLOT_HEIGHT / 2:g}"'
            ' text-anchor="middle">No traffic in the last 24 hours</text>\n'
        )
    ticks = []
    label_y = _PLOT_TOP + _PLOT_HEIGHT + 18
    for index in range(0, count + 1, max(count // 4, 1)):
        fraction = index / count if count else 0.0
        if index >= count:
            text, anchor = "now", "end"
        else:
            start = float(buckets[index]["start"])
            text = time.strftime("%H:%M", time.gmtime(start))
            anchor = "start" if index == 0 else "middle"
        ticks.append(
            f'<text class="axis" x="{fraction * 100:.2f}%" y="{label_y}"'
            f' text-anchor="{anchor}">{_e(text)}</text>\n'
        )
    legend_y = _CHART_HEIGHT - 8
    return (
        f'<svg id="traffic-chart" class="chart" width="100%" height="{_CHART_HEIGHT}"'
        ' role="img" aria-labelledby="traffic-chart-title"'
        ' xmlns="http://www.w3.org/2000/svg">\n'
        '<title id="traffic-chart-title">Bytes served per 5 minutes over the last'
        " 24 hours: from the cache and from upstream</title>\n"
        + "".join(grid)
        + f'<svg x="0" y="{_PLOT_TOP}" width="100%" height="{_PLOT_HEIGHT}"'
        f' viewBox="0 0 {max(count, 1)} {_PLOT_SCALE}" preserveAspectRatio="none">\n'
        f'<path class="area upstream" d="{upstream_area}"></path>\n'
        f'<path class="area cache" d="{cache_area}"></path>\n'
        f'<path id="chart-from-upstream" class="line upstream" d="{upstream_line}"'
        ' vector-effect="non-scaling-stroke"></path>\n'
        f'<path id="chart-from-cache" class="line cache" d="{cache_line}"'
        ' vector-effect="non-scaling-stroke"></path>\n'
        "</svg>\n"
        + "".join(ticks)
        + f'<g class="legend">'
        f'<rect class="swatch cache" x="0" y="{legend_y - 10}" width="12" height="12"></rect>'
        f'<text x="18" y="{legend_y}">From cache</text>'
        f'<rect class="swatch upstream" x="120" y="{legend_y - 10}" width="12"'
        ' height="12"></rect>'
        f'<text x="138" y="{legend_y}">From upstream</text>'
        "</g>\n</svg>\n"
    )


def _traffic_section(traffic: Mapping[str, Any]) -> str:
    buckets = traffic["buckets"]
    cached = sum(int(b["from_cache"]) for b in buckets)
    fetched = sum(int(b["from_upstream"]) for b in buckets)
    return (
        '<section class="card wide">\n<h2>Traffic, last 24 hours</h2>\n'
        f'<p class="muted">{_e(human_bytes(cached))} from the cache,'
        f" {_e(human_bytes(fetched))} from upstream; bytes per"
        f" {traffic['bucket_seconds'] // 60} minutes, times in UTC.</p>\n"
        + _traffic_chart(buckets)
        + "</section>\n"
    )


def _top_section(
    top: Mapping[str, Sequence[Mapping[str, Any]]],
    front_ends: Mapping[str, Mapping[str, Any]],
) -> str:
    columns = []
    for name, entries in top.items():
        label = front_ends.get(name, {}).get("label", name)
        if entries:
            body = (
                '<ol class="top">\n'
                + "".join(
                    f'<li><span class="name">{_e(entry["name"])}</span>'
                    f' <span class="count">{entry["requests"]:,}</span></li>\n'
                    for entry in entries
                )
                + "</ol>\n"
            )
        else:
            body = '<p class="muted">Nothing yet.</p>\n'
        columns.append(
            f'<div class="top-list" id="top-{_e(name)}">\n<h3>{_e(label)}</h3>\n'
            f"{body}</div>\n"
        )
    return (
        '<section class="card wide">\n<h2>Most requested</h2>\n'
        '<div class="columns">\n' + "".join(columns) + "</div>\n</section>\n"
    )


def _upstreams_section(upstreams: Iterable[Mapping[str, Any]], now: float) -> str:
    rows = []
    for health in upstreams:
        failing = health["last_error"] is not None and (
            health["last_success"] is None or health["last_error"] > health["last_success"]
        )
        state = "failing" if failing else "healthy"
        message = health["last_error_message"]
        message_html = f'<br><span class="message">{_e(message)}</span>' if message else ""
        rows.append(
            f'<tr class="{state}"><td class="host" data-label="Upstream">'
            f'<span class="dot {state}" title="{state}"></span>{_e(health["host"])}</td>'
            f'<td data-label="Last success">{_time(health["last_success"], now)}'
            f'<br><span class="muted">{health["successes"]:,} ok</span></td>'
            f'<td data-label="Last error">{_time(health["last_error"], now)}'
            f' <span class="muted">· {health["errors"]:,} failed</span>{message_html}</td>'
            f'<td class="number" data-label="Stale answers served">'
            f'{health["stale_served"]:,}</td></tr>\n'
        )
    if not rows:
        table = '<p class="muted">No upstream contacted yet.</p>\n'
    else:
        table = (
            '<div class="scroll">\n<table class="health">\n<thead><tr><th>Upstream</th>'
            "<th>Last success</th><th>Last error</th><th>Stale answers served</th>"
            "</tr></thead>\n<tbody>\n" + "".join(rows) + "</tbody>\n</table>\n</div>\n"
        )
    return (
        '<section class="card wide" id="upstreams">\n<h2>Upstream health</h2>\n'
        + table
        + "</section>\n"
    )


def _list(values: Sequence[str]) -> str:
    if not values:
        return '<span class="muted">none</span>'
    return " ".join(f'<code class="item">{_e(v)}</code>' for v in values)


def _config_section(config: Mapping[str, Any]) -> str:
    rows = [
        ("Proxy and mirror port", f"<code>{_e(config['proxy_endpoint'])}</code>"),
        ("Pip index port", f"<code>{_e(config['index_endpoint'])}</code>"),
        ("Cache directory", f"<code>{_e(config['cache_dir'])}</code>"),
        ("Size limit", _e(human_bytes(config["max_size"]))),
        (
            "Largest object stored",
            _e(human_bytes(config["max_object_size"] or config["max_size"])),
        ),
        ("Index freshness", _e(f"{config['index_ttl']:g} s")),
        ("Upstream timeout", _e(f"{config['upstream_timeout']:g} s")),
        (
            "Mirror routes",
            _list([f"/{m['name']}/ → {m['url']}" for m in config["mirrors"]]),
        ),
        ("Pip upstreams", _list(config["pypi_upstreams"])),
        ("Clients allowed from", _list(config["allow_from"])),
        ("Proxy upstreams allowed", _list(config["allow_upstream"])),
        (
            "Upstream credentials file (--netrc)",
            f"<code>{_e(config['netrc_file'])}</code>" if config.get("netrc_file")
            else '<span class="muted">none</span>',
        ),
        (
            "Read-ahead of distributions",
            _e(
                f"up to {human_bytes(config['prefetch_max_size'])} each, paused"
                f" while {human_bytes(UNCLAIMED_BUDGET_FILES * config['prefetch_max_size'])}"
                " wait unasked for"
                if config["prefetch_max_size"] else "off"
            ),
        ),
        (
            "Connections per client address",
            _e(f"at most {config['max_connections_per_client']:,}"),
        ),
        ("Log format", _e(config["log_format"])),
    ]
    return (
        '<section class="card wide" id="config">\n<h2>Configuration</h2>\n'
        '<dl class="config">\n'
        + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>\n" for k, v in rows)
        + "</dl>\n</section>\n"
    )


_CSS = """
:root {
  color-scheme: light dark;
  --bg: #f4f5f7; --card: #fff; --fg: #1d2330; --muted: #667085;
  --line: #d9dde5; --cache: #1a9e63; --upstream: #d9822b; --bad: #d14343;
  --link: #2459c9;
}
@media (prefers-color-scheme: dark) {
  :root { --bg: #12151b; --card: #1c2029; --fg: #e6e8ee; --muted: #98a0b3;
          --line: #343a48; --link: #8fb4ff; }
}
* { box-sizing: border-box; }
a { color: var(--link); }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header, main, footer { max-width: 1200px; margin: 0 auto; padding: 0 12px; }
header { padding-top: 12px; }
h1 { margin: 0; font-size: 1.6rem; }
h2 { margin: 0 0 8px; font-size: 1.1rem; }
h3 { margin: 0 0 6px; font-size: 1rem; }
main { display: grid; gap: 12px;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, 420px), 1fr)); }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 14px 16px; min-width: 0; }
.wide { grid-column: 1 / -1; }
.muted, .note, .axis { color: var(--muted); }
.headline { font-size: 1.5rem; font-weight: 600; margin: 0 0 10px; }
.figures { display: grid; gap: 8px 16px; grid-template-columns: repeat(2, minmax(0, 1fr)); }
.figure .label, .figure .note { display: block; font-size: .8rem; }
.figure .value { display: block; font-size: 1.15rem; font-weight: 600; }
.bar { height: 14px; border-radius: 7px; background: var(--line); overflow: hidden;
  margin-bottom: 12px; }
.bar span { display: block; height: 100%; background: var(--cache); }
.bar span.full { background: var(--bad); }
.columns { display: grid; gap: 12px 20px;
  grid-template-columns: repeat(auto-fit, minmax(min(100%, 250px), 1fr)); }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
.front-end dd { text-align: right; font-variant-numeric: tabular-nums; }
ol.top { margin: 0; padding-left: 1.6em; }
ol.top li { padding: 1px 0; }
.top .name { overflow-wrap: anywhere; }
.top .count { float: right; color: var(--muted); font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
td.host { white-space: nowrap; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
@media (max-width: 640px) {
  table.health thead { display: none; }
  table.health tr, table.health td { display: block; }
  table.health tr { border-bottom: 1px solid var(--line); padding: 6px 0; }
  table.health td { border: 0; padding: 2px 0; text-align: left; }
  table.health td::before { content: attr(data-label); display: block;
    font-size: .8rem; color: var(--muted); }
  table.health td.host::before { display: none; }
  dl.config { grid-template-columns: 1fr; }
  dl.config dd { margin-bottom: 6px; }
}
.message { color: var(--bad); font-size: .85rem; overflow-wrap: anywhere; }
.dot { display: inline-block; width: 9px; height: 9px; border-radius: 50%;
  margin-right: 6px; background: var(--cache); }
.dot.failing { background: var(--bad); }
code { font-size: .9em; overflow-wrap: anywhere; }
code.item { display: inline-block; margin-right: 1.2em; }
footer { padding-bottom: 16px; }
.chart { display: block; font-size: 12px; overflow: visible; }
.chart .grid { stroke: var(--line); stroke-width: 1; }
.chart .axis { fill: var(--muted); }
.chart .line { fill: none; stroke-width: 2; }
.chart .line.cache { stroke: var(--cache); }
.chart .line.upstream { stroke: var(--upstream); }
.chart .area.cache { fill: var(--cache); fill-opacity: .18; }
.chart .area.upstream { fill: var(--upstream); fill-opacity: .18; }
.chart .swatch.cache { fill: var(--cache); }
.chart .swatch.upstream { fill: var(--upstream); }
.chart .legend text { fill: var(--fg); }
"""


class StatusResource(Resource):
    """
    Answers ``/`` (the page), ``/-/stats.json`` and ``/-/metrics``.

    The front ends hand it requests through :meth:`serve` after their own
    client checks; as a leaf it also serves a ``Site`` of its own.
    """

    isLeaf = True
    paths = STATUS_PATHS

    def __init__(self, page: StatusPage, metrics: Metrics) -> None:
        super().__init__()
        self.page = page
        self.metrics = metrics

    def render(self, request: Request) -> object:
        self.serve(request, request.path.decode("latin-1"))
        return NOT_DONE_YET

    def serve(self, request: Request, path: str) -> None:
        """
        Answer and finish ``request`` for ``path`` (without query).
        """
        if path not in STATUS_PATHS:
            send_error(
                request, 404,
                f"no such status path (there are {', '.join(sorted(STATUS_PATHS))})",
            )
            return
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("allow", "GET, HEAD")
            send_error(request, 405, "the status pages answer GET and HEAD")
            return
        if path == PAGE_PATH:
            body, content_type = self.page.render_html(), "text/html; charset=utf-8"
            request.setHeader(
                "content-security-policy",
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
            )
        elif path == STATS_PATH:
            body = json.dumps(self.page.stats(), indent=1).encode("utf-8")
            content_type = "application/json"
        else:
            body, content_type = self.metrics.render_metrics()
        request.setResponseCode(200)
        request.setHeader("content-type", content_type)
        request.setHeader("content-length", str(len(body)))
        request.setHeader("cache-control", "no-store")
        request.setHeader("x-content-type-options", "nosniff")
        if request.method != b"HEAD":
            request.write(body)
        request.finish()
