"""
Conditional requests and byte ranges, for GET and HEAD of a stored
representation: the validators that revalidate a stored response upstream
(:func:`validators_of`), whether a client's ``If-None-Match`` /
``If-Modified-Since`` makes the answer a 304 (:func:`not_modified`), and
single byte ranges with ``If-Range`` (:func:`parse_range`).  Every front
end answers through these (see :mod:`buildcache.engine.respond`).  Pure:
times are passed in.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping

import attrs

from buildcache.engine.fields import list_items, parse_http_date
from buildcache.engine.fields import lowered as _lowered

__all__ = [
    "validators_of",
    "not_modified",
    "RangeOutcome",
    "RangeResult",
    "parse_range",
]


_ENTITY_TAG = re.compile(r'\s*(W/)?("[^"]*"|[^,\s]+)\s*(?:,|$)')


def _entity_tags(value: str) -> list[tuple[bool, str]] | None:
    """
    Split an entity-tag list into (weak, opaque-tag) pairs; None for ``*``.

    Unquoted tags (sent by sloppy servers and clients) are accepted as
    they are.
    """
    if value.strip() == "*":
        return None
    tags: list[tuple[bool, str]] = []
    for match in list_items(_ENTITY_TAG, value):
        weak, opaque = match.groups()
        tags.append((weak is not None, opaque.strip('"')))
    return tags


def _stored_entity_tag(stored: Mapping[str, str]) -> tuple[bool, str] | None:
    value = stored.get("etag", "").strip()
    if not value:
        return None
    parsed = _entity_tags(value)
    if not parsed:
        return None
    return parsed[0]


def validators_of(stored_headers: Mapping[str, str]) -> dict[str, str]:
    """
    The conditional request headers that revalidate a stored response
    upstream: its ``ETag`` and ``Last-Modified``, as given.
    """
    stored = _lowered(stored_headers)
    conditional = {}
    if "etag" in stored:
        conditional["if-none-match"] = stored["etag"]
    if "last-modified" in stored:
        conditional["if-modified-since"] = stored["last-modified"]
    return conditional


def not_modified(
    request_headers: Mapping[str, str],
    stored_headers: Mapping[str, str],
    stored_at: float | None = None,
) -> bool:
    """
    RFC 9110 section 13.2.2 evaluation for a GET or HEAD of a stored
    representation: True means answer ``304 Not Modified``.

    ``If-None-Match`` (weak comparison, ``*``, lists) takes precedence: when
    present, ``If-Modified-Since`` is not looked at.  ``If-Modified-Since``
    is a date comparison, at one-second resolution: 304 when the date is
    the stored ``Last-Modified``, or when neither it nor ``stored_at`` is
    later than the date given.  An unparsable date is ignored.  Without either
    header the answer is always False: a 304 to an unconditional request
    breaks clients that hold no copy (apk fails the install).

    The caller only calls this for GET and HEAD of a representation it
    holds (other methods use these headers as preconditions, and
    ``If-None-Match: *`` means "any stored representation").

    :param stored_at: when the stored body was downloaded (not merely
        revalidated), used when the response has no ``Last-Modified``:
        apk sends its own download time as ``If-Modified-Since``.
    """
    request = _lowered(request_headers)
    stored = _lowered(stored_headers)
    if_none_match = request.get("if-none-match")
    if if_none_match is not None:
        wanted = _entity_tags(if_none_match)
        if wanted is None:
            return True
        current = _stored_entity_tag(stored)
        if current is None:
            return False
        return any(opaque == current[1] for _weak, opaque in wanted)
    since = parse_http_date(request.get("if-modified-since"))
    if since is None:
        return False
    modified = parse_http_date(stored.get("last-modified"))
    if modified is not None and modified == since:
        # The client's copy is this one (apt sends its Last-Modified back).
        return True
    if stored_at is None:
        return False
    # A later date (apk sends its own download time) proves the client's
    # copy current only if it is after this copy arrived here as well: a
    # client may hold an older copy it got after the upstream published
    # this one (served stale while the upstream was unreachable).
    arrived = float(math.floor(stored_at))
    return max(modified or arrived, arrived) <= since


class RangeOutcome(enum.Enum):
    """How to answer a request that may carry ``Range``."""

    FULL = 200
    PARTIAL = 206
    UNSATISFIABLE = 416


@attrs.frozen
class RangeResult:
    """
    The answer to a (possibly) ranged request over ``size`` bytes.

    For FULL, ``start`` is 0 and ``end`` is ``size - 1``; for PARTIAL they
    are the inclusive byte positions to send; for UNSATISFIABLE they are
    meaningless (0 and -1).
    """

    outcome: RangeOutcome
    size: int
    start: int = 0
    end: int = -1

    @classmethod
    def full(cls, size: int) -> RangeResult:
        return cls(RangeOutcome.FULL, size, 0, size - 1)

    @classmethod
    def unsatisfiable(cls, size: int) -> RangeResult:
        return cls(RangeOutcome.UNSATISFIABLE, size)

    @property
    def status(self) -> int:
        """The response status code: 200, 206 or 416."""
        return self.outcome.value

    @property
    def length(self) -> int:
        """The number of body bytes to send (``Content-Length``)."""
        if self.outcome is RangeOutcome.UNSATISFIABLE:
            return 0
        return self.end - self.start + 1

    @property
    def content_range(self) -> str | None:
        """The ``Content-Range`` header value, None for a full response."""
        if self.outcome is RangeOutcome.PARTIAL:
            return f"bytes {self.start}-{self.end}/{self.size}"
        if self.outcome is RangeOutcome.UNSATISFIABLE:
            return f"bytes */{self.size}"
        return None


_BYTE_RANGE = re.compile(r"\s*bytes\s*=\s*([0-9]*)\s*-\s*([0-9]*)\s*", re.ASCII | re.IGNORECASE)


def _if_range_holds(if_range: str, stored: Mapping[str, str]) -> bool:
    """
    RFC 9110 section 13.1.5: an entity-tag must match the stored ETag by
    strong comparison (weak tags never match); a date must equal the
    stored ``Last-Modified`` exactly.
    """
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        if value.startswith("W/"):
            return False
        current = _stored_entity_tag(stored)
        if current is None or current[0]:
            return False
        return value.strip('"') == current[1]
    since = parse_http_date(value)
    modified = parse_http_date(stored.get("last-modified"))
    return since is not None and modified is not None and since == modified


def parse_range(
    header: str | None,
    size: int,
    *,
    if_range: str | None = None,
    stored_headers: Mapping[str, str] | None = None,
) -> RangeResult:
    """
    Evaluate a ``Range`` header over a representation of ``size`` bytes.

    Only a single byte range is honoured: ``bytes=a-b``, ``bytes=a-`` and
    the suffix ``bytes=-n``.  A missing, malformed, multi-range or
    non-bytes header gives FULL (RFC 9110 lets a server ignore Range), as
    does an ``If-Range`` that does not match ``stored_headers``.  A range
    starting at or after the end (or ``bytes=-0``, or any range of an empty
    body) is UNSATISFIABLE: answer 416 with ``Content-Range: bytes */size``.
    """
    if size < 0:
        raise ValueError(f"negative representation size {size}")
    if header is None:
        return RangeResult.full(size)
    if if_range is not None and not _if_range_holds(if_range, _lowered(stored_headers or {})):
        return RangeResult.full(size)
    match = _BYTE_RANGE.fullmatch(header)
    if match is None:
        return RangeResult.full(size)
    first, last = match.groups()
    if not first:
        if not last:
            return RangeResult.full(size)
        suffix = int(last)
        if suffix == 0 or size == 0:
            return RangeResult.unsatisfiable(size)
        return RangeResult(RangeOutcome.PARTIAL, size, max(0, size - suffix), size - 1)
    start = int(first)
    if last:
        end = int(last)
        if end < start:
            return RangeResult.full(size)
    else:
        end = size - 1
    if start >= size:
        return RangeResult.unsatisfiable(size)
    return RangeResult(RangeOutcome.PARTIAL, size, start, min(end, size - 1))
