"""
The status page's traffic chart: bytes served from the cache and from
upstream per bucket over the last 24 hours, as one inline SVG drawn from
the snapshot's ``traffic`` buckets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from buildcache.ops.human import BYTE_UNITS, human_bytes
from buildcache.ops.human import escape as _e
from buildcache.ops.snapshot import Traffic, TrafficBucket

# Scale maxima of the traffic chart, per unit: a quarter of each is a
# round number too, so every gridline label reads cleanly.
_NICE_STEPS = (1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 800, 1000)
# The chart's plot area: SVG user units of the outer element are CSS
# pixels, so text keeps its size whatever the width of the screen.
_CHART_HEIGHT = 250
_PLOT_TOP = 10
_PLOT_HEIGHT = 180
_PLOT_SCALE = 1000


def nice_maximum(largest: int) -> tuple[float, str]:
    """
    The chart's scale: a round number of bytes at least ``largest``, and
    the unit its gridlines are labelled in.
    """
    unit_index = 0
    value = float(max(largest, 1))
    while value > _NICE_STEPS[-1] and unit_index < len(BYTE_UNITS) - 1:
        value /= 1024
        unit_index += 1
    step = next((s for s in _NICE_STEPS if s >= value), _NICE_STEPS[-1])
    if unit_index == 0:
        # Whole bytes on every gridline.
        step = max(4, -(-step // 4) * 4)
    return step * 1024.0**unit_index, BYTE_UNITS[unit_index]


def _label(value: float, unit: str) -> str:
    if not value:
        return "0 B"
    scaled = value / 1024.0 ** BYTE_UNITS.index(unit)
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


def _traffic_chart(buckets: Sequence[TrafficBucket]) -> str:
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


def traffic_section(traffic: Traffic) -> str:
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

