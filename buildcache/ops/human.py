"""
Figures written for people: sizes in binary units, durations, percentages,
times, and HTML escaping, shared by the status page and its chart.
"""

from __future__ import annotations

import html
import time

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def escape(value: object) -> str:
    """
    ``value`` as HTML text or attribute value.
    """
    return html.escape(str(value), quote=True)


def human_bytes(size: float) -> str:
    """
    ``size`` bytes in binary units for people: ``"0 B"``, ``"1.5 KiB"``,
    ``"10 GiB"``.
    """
    value = float(size)
    for unit in BYTE_UNITS:
        if abs(value) < 1024 or unit == BYTE_UNITS[-1]:
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
