"""
The status page: one self-contained HTML document (inline CSS and SVG,
nothing fetched) rendered from a :data:`buildcache.ops.snapshot.Snapshot`
and nothing else.  All text passes through ``html.escape``; the snapshot's
URLs are already redacted.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence

from buildcache.ops.chart import traffic_section
from buildcache.ops.human import escape as _e
from buildcache.ops.human import human_bytes, human_duration, percent, utc_time
from buildcache.ops.images import RegistryStored
from buildcache.ops.shared_tier import SharedFigures
from buildcache.ops.snapshot import (
    ConfigShown,
    FrontEndFigures,
    Snapshot,
    StoreFigures,
    TopName,
    UpstreamFigures,
    WorkersFigures,
)

#: The pages' paths, on either port (see :mod:`buildcache.ops.status`).
PAGE_PATH = "/"
STATS_PATH = "/-/stats.json"
METRICS_PATH = "/-/metrics"
#: Seconds between reloads of the page in a browser left open on it.
PAGE_REFRESH_SECONDS = 60


def render_page(snapshot: Snapshot) -> bytes:
    """
    The status page of ``snapshot``.
    """
    now = snapshot["generated_at"]
    parts = [
        "<!DOCTYPE html>\n",
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f'<meta http-equiv="refresh" content="{PAGE_REFRESH_SECONDS}">\n',
        "<title>buildcache status</title>\n",
        f"<style>{_CSS}</style>\n</head>\n<body>\n",
        "<header>\n<h1>buildcache</h1>\n",
        f'<p class="muted">Status at {_time(now, now)} · up'
        f" {_e(human_duration(snapshot['uptime_seconds']))}"
        f" · {snapshot['downloads_in_flight']} downloads in flight</p>\n",
        _workers_line(snapshot.get("workers")),
        "</header>\n<main>\n",
        _summary_section(snapshot),
        _fill_section(snapshot["store"]),
        _front_ends_section(snapshot["front_ends"], snapshot["shared"] is not None),
        traffic_section(snapshot["traffic"]),
        _top_section(snapshot["top"], snapshot["front_ends"]),
        _images_section(snapshot["registry"]),
        _upstreams_section(snapshot["upstreams"], now),
        _shared_section(snapshot["shared"], now),
        _config_section(snapshot["config"]),
        "</main>\n<footer>\n",
        f'<p class="muted">The same figures: <a href="{STATS_PATH}">{STATS_PATH}</a>'
        f' · Prometheus: <a href="{METRICS_PATH}">{METRICS_PATH}</a>'
        f" · reloads every {PAGE_REFRESH_SECONDS} s</p>\n",
        "</footer>\n</body>\n</html>\n",
    ]
    return "".join(parts).encode("utf-8")


def _workers_line(workers: WorkersFigures | None) -> str:
    # One process (--workers 1) has no line.
    if workers is None:
        return ""
    missing = (
        f"; figures of {workers['answered']} of {workers['alive']} (the others"
        " did not answer in time)"
        if workers["answered"] < workers["alive"] else ""
    )
    return (
        f'<p class="muted" id="workers">Processes: {workers["configured"]}'
        f" configured, {workers['alive']} running, {workers['restarts']}"
        f" restarts{_e(missing)}</p>\n"
    )


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


def _summary_section(stats: Snapshot) -> str:
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
            "From the cache / misses",
            f"{served - by_status['MISS']:,} / {by_status['MISS']:,}",
            note=f"{by_status['REVALIDATED']:,} revalidated,"
            f" {by_status['STALE']:,} stale"
            + (
                f", {stats['shared_hits']:,} hits from the shared tier"
                if stats["shared"] is not None else ""
            ),
        )
        + "</div>\n</section>\n"
    )


def _fill_section(store: StoreFigures) -> str:
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
        + _figure(
            "Evictions", f"{store['evictions']:,}", "evictions",
            note=f"{human_bytes(store['bytes_evicted'])} freed to stay under the limit",
        )
        + _figure(
            "Read ahead", f"{store['prefetches']:,}", "prefetches",
            note=f"{store['prefetch_hits']:,} asked for since",
        )
        + "</div>\n</section>\n"
    )


def _front_ends_section(
    front_ends: Mapping[str, FrontEndFigures], shared: bool = False
) -> str:
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
        if shared:
            rows.insert(5, (
                "From the shared tier",
                f"{figures['shared_hits']:,} ({human_bytes(figures['bytes_from_shared'])})",
            ))
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


def _top_section(
    top: Mapping[str, Sequence[TopName]],
    front_ends: Mapping[str, FrontEndFigures],
) -> str:
    columns = []
    for name, entries in top.items():
        label = front_ends[name]["label"] if name in front_ends else name
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


def _images_section(registry: RegistryStored) -> str:
    listed = registry["listed"]
    if not listed:
        return (
            '<section class="card wide" id="registry-images">\n'
            "<h2>Container images stored by tag</h2>\n"
            '<p class="muted">No image stored by tag yet.</p>\n</section>\n'
        )
    summary = f"{registry['repositories']:,} repositories, {registry['tags']:,} tags"
    if not registry["complete"]:
        summary = f"at least {summary} (more are stored than one reading lists)"
    more_repositories = registry["repositories"] - len(listed)
    rows = []
    for image in listed:
        more = (
            f' <span class="muted">and {image["more_tags"]:,} more</span>'
            if image["more_tags"] else ""
        )
        rows.append(
            f"<dt>{_e(image['name'])}</dt><dd>{_list(image['tags'])}{more}</dd>\n"
        )
    return (
        '<section class="card wide" id="registry-images">\n'
        "<h2>Container images stored by tag</h2>\n"
        f'<p class="muted" id="registry-summary">{_e(summary)}</p>\n'
        '<dl class="config">\n' + "".join(rows) + "</dl>\n"
        + (
            f'<p class="muted">and {more_repositories:,} more repositories</p>\n'
            if more_repositories > 0 else ""
        )
        + "</section>\n"
    )


def _upstreams_section(upstreams: Iterable[UpstreamFigures], now: float) -> str:
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


def _shared_section(shared: SharedFigures | None, now: float) -> str:
    if shared is None:
        return ""
    state = "healthy" if shared["healthy"] else "failing"
    health = "working" if shared["healthy"] else "failing: serving from disk and upstreams"
    since = (
        f" since {_time(shared['failing_since'], now)}"
        if not shared["healthy"] and shared["failing_since"] is not None else ""
    )
    error = shared["last_error"]
    conditional = {
        None: "not probed yet",
        True: "yes: one download across nodes",
        False: "no: each node downloads for itself",
    }[shared["conditional"]]
    rows = [
        ("Store", _e(f"s3://{shared['bucket']}/{shared['prefix']} at {shared['endpoint']}")),
        (
            "Health",
            f'<span class="dot {state}"></span>{_e(health)}{since}'
            # The error of a failure that is over is history, not health.
            + (
                f'<br><span class="message">{_e(error)}</span>'
                if error and not shared["healthy"] else ""
            ),
        ),
        ("Conditional PUT honoured", _e(conditional)),
        (
            "Records signed",
            _e(
                "yes (--shared-secret-file)" if shared["signed"]
                else "no: only files with an independent digest are shared"
            ),
        ),
        (
            "Hits from the shared tier",
            _e(f"{shared['hits']:,} ({human_bytes(shared['hit_bytes'])})"),
        ),
        (
            "Uploads",
            _e(
                f"{shared['uploads']:,} ({human_bytes(shared['upload_bytes'])}),"
                f" {shared['upload_failures']:,} failed or skipped (the store failing,"
                " or too many at once)"
            ),
        ),
        (
            "Lease waits",
            _e(
                f"{shared['lease_waits']:,} waited on another node,"
                f" {shared['lease_timeouts']:,} fetched upstream after all"
            ),
        ),
        ("Records or copies refused", _e(f"{shared['rejected']:,}")),
        (
            "Evictions",
            (
                _e(
                    f"{shared['evicted']:,} ({human_bytes(shared['evicted_bytes'])})"
                    f" under {human_bytes(shared['max_size'])}, last "
                )
                + _time(shared["last_eviction"], now)
            ) if shared["max_size"] is not None
            else '<span class="muted">no --shared-max-size</span>',
        ),
    ]
    return (
        f'<section class="card wide" id="shared-tier">\n<h2>Shared tier</h2>\n'
        f'<p class="headline {state}" id="shared-health">{_e(health)}</p>\n'
        '<dl class="config">\n'
        + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>\n" for k, v in rows)
        + "</dl>\n</section>\n"
    )


def _list(values: Sequence[str], empty: str = "none") -> str:
    if not values:
        return f'<span class="muted">{_e(empty)}</span>'
    return " ".join(f'<code class="item">{_e(v)}</code>' for v in values)


def _config_section(config: ConfigShown) -> str:
    rows = [
        ("Proxy and mirror port", f"<code>{_e(config['proxy_endpoint'])}</code>"),
        ("Pip index port", f"<code>{_e(config['index_endpoint'])}</code>"),
        (
            "Registry port",
            f"<code>{_e(config['registry_endpoint'])}</code>" if config["registry_endpoint"]
            else '<span class="muted">off</span>',
        ),
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
        (
            "Registries",
            _list([f"{r['name']} → {r['url']}" for r in config["registries"]]),
        ),
        ("Clients allowed from", _list(config["allow_from"])),
        (
            "Proxy upstreams allowed",
            _list(config["allow_upstream"], "any public host"),
        ),
        (
            "Upstream credentials file (--netrc)",
            f"<code>{_e(config['netrc_file'])}</code>" if config.get("netrc_file")
            else '<span class="muted">none</span>',
        ),
        (
            "Registry credentials files (--registry-auth)",
            _list(config["registry_auth_files"]),
        ),
        (
            "Read-ahead of distributions",
            _e(
                f"up to {human_bytes(config['prefetch_max_size'])} each, paused"
                f" while {human_bytes(config['prefetch_unclaimed_budget'])}"
                " wait unasked for"
                if config["prefetch_max_size"] else "off"
            ),
        ),
        (
            "Connections per client address",
            _e(f"at most {config['max_connections_per_client']:,}"),
        ),
        ("Log format", _e(config["log_format"])),
        (
            "Shared store",
            f"<code>{_e(config['shared_store'])}</code>" if config["shared_store"]
            else '<span class="muted">none</span>',
        ),
    ]
    if config["shared_store"]:
        rows += [
            (
                "Shared secret file",
                f"<code>{_e(config['shared_secret_file'])}</code>"
                if config["shared_secret_file"] else '<span class="muted">none</span>',
            ),
            (
                "Shared store size limit",
                _e(human_bytes(config["shared_max_size"]))
                if config["shared_max_size"] is not None
                else '<span class="muted">none</span>',
            ),
            ("Wait for another node's download", _e(f"up to {config['shared_wait']:g} s")),
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

