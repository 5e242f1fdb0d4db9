"""
HTTP field values the cache reads: ``Cache-Control`` directives,
delta-seconds and HTTP dates (RFC 9110, RFC 9111).  Pure functions, shared
by the freshness decision (:mod:`buildcache.engine.freshness`) and the
conditional requests (:mod:`buildcache.engine.conditional`).
"""

from __future__ import annotations

import email.utils
import functools
import re
from collections.abc import Iterator, Mapping
from datetime import timezone

__all__ = [
    "lowered",
    "list_items",
    "parse_cache_control",
    "delta_seconds",
    "parse_http_date",
    "format_http_date",
]


def lowered(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with lowercase names."""
    return {name.lower(): value for name, value in headers.items()}


_CACHE_CONTROL_ITEM = re.compile(
    r"""\s*([^\s,=]+)\s*(?:=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*)))?\s*(?:,|$)"""
)


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """
    Parse a ``Cache-Control`` value into ``{directive: argument or None}``.

    Directive names are lowercased; quoted arguments are unquoted (they may
    contain commas, as in ``no-cache="set-cookie, x"``).  The first
    occurrence of a repeated directive wins.  Unparsable fragments are
    skipped.
    """
    directives: dict[str, str | None] = {}
    for match in list_items(_CACHE_CONTROL_ITEM, value or ""):
        name, quoted, token = match.groups()
        argument: str | None
        if quoted is not None:
            argument = re.sub(r"\\(.)", r"\1", quoted)
        else:
            argument = token
        directives.setdefault(name.lower(), argument)
    return directives


def list_items(item: re.Pattern[str], value: str) -> Iterator[re.Match[str]]:
    """
    The matches of ``item`` in the comma-separated list ``value``, each
    anchored where the previous one ended.  A malformed member is skipped
    to the next comma: it must not hide the ones after it (a ``no-store``
    after a broken directive, say).
    """
    position = 0
    while position < len(value):
        match = item.match(value, position)
        if match is None or match.end() == position:
            comma = value.find(",", position)
            if comma == -1:
                return
            position = comma + 1
            continue
        yield match
        position = match.end()


def delta_seconds(argument: str | None) -> int | None:
    """RFC 9111 delta-seconds, or None when missing or malformed."""
    if argument is None or not re.fullmatch(r"[0-9]+", argument, re.ASCII):
        return None
    return int(argument)


_TIME_OF_DAY = re.compile(r"\b\d{1,2}:\d{2}:\d{2}\b")


#: Distinct date strings whose parsed value is kept: every hit's freshness
#: reads its entry's ``Date`` and ``Last-Modified`` (or ``Expires``), and
#: parsing one costs more than the rest of that decision.
PARSED_DATES_KEPT = 4096


@functools.lru_cache(maxsize=PARSED_DATES_KEPT)
def parse_http_date(value: str | None) -> float | None:
    """
    Parse an HTTP-date (IMF-fixdate, RFC 850 or asctime form) to POSIX
    seconds; None when absent or unparsable.

    A value that holds more than one date (two header lines joined by a
    comma) is unparsable, as RFC 9110 section 13.1.3 asks for
    ``If-Modified-Since``.  A date without a zone is read as GMT.
    """
    if not value:
        return None
    if len(_TIME_OF_DAY.findall(value)) != 1:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


def format_http_date(timestamp: float) -> str:
    """Format POSIX seconds as an IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``)."""
    return email.utils.formatdate(timestamp, usegmt=True)

