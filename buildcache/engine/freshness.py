"""
Freshness policy: the one place that knows package formats.

This module owns:

- the rule table that sorts a URL path into IMMUTABLE (content-addressed or
  versioned files that never change: ``.apk``, ``pool/**.deb``, ``by-hash``,
  wheels and sdists), INDEX (index files that change under a fixed name and
  are revalidated after a TTL) and HTTP (everything else, governed by the
  response's own headers as RFC 9111 says);
- the decision whether a stored response may be served as it is or must be
  revalidated upstream, and whether a response may be stored at all;
- the ``Cache-Control`` the cache itself sends to clients;
- conditional request evaluation (``If-None-Match`` / ``If-Modified-Since``)
  and single byte-range parsing with ``If-Range``, shared by both front ends;
- HTTP date and ``Cache-Control`` parsing;
- which stored response may answer which request: a response to a request
  that carried the client's own credentials (``Authorization``,
  ``Cookie``) is private to those credentials, and its own directives
  alone decide its life (:func:`client_credentials`,
  :func:`effective_kind`, :func:`may_serve_stale`); a response with
  ``Vary`` answers only requests for which buildcache would send the same
  values of the headers it names (:func:`varying_names`,
  :func:`vary_values`, :func:`same_variant`).

The store knows none of this: a front end classifies the request, then hands
the store a kind and the TTL.  Everything here is pure: times are passed in
as POSIX seconds, never read from a clock.
"""

from __future__ import annotations

import email.utils
import enum
import math
import re
from collections.abc import Mapping
from datetime import timezone
from urllib.parse import urlsplit

import attrs

__all__ = [
    "Kind",
    "Decision",
    "Rule",
    "RULES",
    "classify",
    "decide",
    "is_storable",
    "CREDENTIAL_HEADERS",
    "client_credentials",
    "effective_kind",
    "may_serve_stale",
    "NORMALISED_REQUEST_HEADERS",
    "sent_headers",
    "vary_names",
    "varying_names",
    "vary_values",
    "same_variant",
    "client_cache_control",
    "freshness_lifetime",
    "current_age",
    "client_asks_refresh",
    "client_demands_revalidation",
    "not_modified",
    "validators_of",
    "parse_http_date",
    "format_http_date",
    "parse_cache_control",
    "RangeOutcome",
    "RangeResult",
    "parse_range",
    "IMMUTABLE_MAX_AGE",
    "HEURISTIC_FRACTION",
    "HEURISTIC_CAP",
]


class Kind(enum.Enum):
    """How a URL's content behaves over time."""

    IMMUTABLE = "immutable"
    INDEX = "index"
    HTTP = "http"


class Decision(enum.Enum):
    """What to do with a stored response for one request."""

    FRESH = "fresh"
    REVALIDATE = "revalidate"


#: One year, the conventional "forever" for ``max-age`` (RFC 8246 examples).
IMMUTABLE_MAX_AGE = 31536000

#: RFC 9111 section 4.2.2: a typical heuristic is 10% of the time since
#: Last-Modified.
HEURISTIC_FRACTION = 0.1

#: Cap on the heuristic lifetime (squid's default refresh_pattern max is
#: three days; a day keeps odd HTTP content reasonably current).
HEURISTIC_CAP = 24 * 3600.0


@attrs.frozen
class Rule:
    """
    One row of the classification table.

    ``pattern`` is searched in the URL path (no scheme, host or query).
    ``index_only`` rows apply only to files served through the simple-index
    front end, because the suffixes they match (``.tar.gz``, ``.zip``) are
    immutable there (an index never reuses a file name) but are often
    "latest" tarballs elsewhere on the web.
    """

    pattern: re.Pattern[str]
    kind: Kind
    index_only: bool = False


def _rule(regex: str, kind: Kind, index_only: bool = False) -> Rule:
    return Rule(re.compile(regex), kind, index_only)


#: First matching row wins, so the order matters: ``by-hash`` before the
#: ``dists`` index row, ``APKINDEX.tar.gz`` before the ``.tar.gz`` file row,
#: distribution files before the simple-index pages.
RULES: tuple[Rule, ...] = (
    # apt: by-hash/<algo>/<digest>, the file name is its own checksum.
    _rule(r"(?:^|/)by-hash/[A-Za-z0-9]+/[^/]+$", Kind.IMMUTABLE),
    # apt: pool files are versioned by name and never replaced.
    _rule(
        r"(?:^|/)pool/(?:[^/]+/)*[^/]+\.(?:deb|udeb|dsc|diff\.gz|tar\.[A-Za-z0-9]+)$",
        Kind.IMMUTABLE,
    ),
    # apt: suite metadata changes under a fixed name.
    _rule(
        r"(?:^|/)dists/(?:[^/]+/)+"
        r"(?:InRelease|Release|Release\.gpg|Packages[^/]*|Sources[^/]*"
        r"|Translation-[^/]+|Contents-[^/]+|[^/]+\.diff/Index)$",
        Kind.INDEX,
    ),
    # apk: the repository index.
    _rule(r"(?:^|/)APKINDEX\.tar\.gz$", Kind.INDEX),
    # apk: NAME-VERSION-rN.apk, Alpine never rebuilds under the same name.
    _rule(r"[^/]\.apk$", Kind.IMMUTABLE),
    # wheels and their PEP 658 metadata: versioned by name everywhere.
    _rule(r"[^/]\.whl(?:\.metadata)?$", Kind.IMMUTABLE),
    # sdists and legacy distributions, only as served by an index.
    _rule(
        r"[^/]\.(?:tar\.gz|zip|tar\.bz2|tar\.xz|tgz|egg)(?:\.metadata)?$",
        Kind.IMMUTABLE,
        index_only=True,
    ),
    # simple index (PEP 503/691): the root and the project pages (after the
    # file rows: a file name is never a project page), with
    # devpi's "+simple" spelling.
    _rule(r"(?:^|/)\+?simple(?:/[^/]*/?)?$", Kind.INDEX),
)


def classify(path: str, *, served_by_index: bool = False) -> Kind:
    """
    Classify a URL path by the first matching row of L{RULES}.

    @param path: the URL path; an absolute URL or a path with a query string
        is accepted too, only its path takes part.
    @param served_by_index: True for files the simple-index front end serves
        (enables the ``index_only`` rows).
    """
    if "://" in path:
        path = urlsplit(path).path
    else:
        path = path.split("?", 1)[0].split("#", 1)[0]
    for rule in RULES:
        if rule.index_only and not served_by_index:
            continue
        if rule.pattern.search(path):
            return rule.kind
    return Kind.HTTP


def _lowered(headers: Mapping[str, str]) -> dict[str, str]:
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
    if not value:
        return directives
    position = 0
    while position < len(value):
        match = _CACHE_CONTROL_ITEM.match(value, position)
        if match is None or match.end() == position:
            # Skip to the next comma: a malformed directive must not hide
            # the ones after it (no-store in particular).
            comma = value.find(",", position)
            if comma == -1:
                break
            position = comma + 1
            continue
        name, quoted, token = match.groups()
        argument: str | None
        if quoted is not None:
            argument = re.sub(r"\\(.)", r"\1", quoted)
        else:
            argument = token
        directives.setdefault(name.lower(), argument)
        position = match.end()
    return directives


def _delta_seconds(argument: str | None) -> int | None:
    """RFC 9111 delta-seconds, or None when missing or malformed."""
    if argument is None or not re.fullmatch(r"[0-9]+", argument, re.ASCII):
        return None
    return int(argument)


_TIME_OF_DAY = re.compile(r"\b\d{1,2}:\d{2}:\d{2}\b")


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


def freshness_lifetime(stored_headers: Mapping[str, str], received_at: float) -> float:
    """
    RFC 9111 section 4.2.1 freshness lifetime of a stored response, seen by
    a shared cache.

    ``s-maxage``, then ``max-age``, then ``Expires - Date``, then the
    heuristic (10% of ``Date - Last-Modified``, capped at a day), else 0.
    A malformed ``max-age`` or ``Expires`` means already stale (RFC 9111
    sections 1.2.2 and 5.3), not "fall through to the heuristic".

    @param received_at: when the response was received; stands in for a
        missing ``Date``.
    """
    headers = _lowered(stored_headers)
    directives = parse_cache_control(headers.get("cache-control"))
    for name in ("s-maxage", "max-age"):
        if name in directives:
            seconds = _delta_seconds(directives[name])
            return 0.0 if seconds is None else float(seconds)
    date = parse_http_date(headers.get("date"))
    origin_now = received_at if date is None else date
    if "expires" in headers:
        expires = parse_http_date(headers["expires"])
        if expires is None:
            return 0.0
        return max(0.0, expires - origin_now)
    last_modified = parse_http_date(headers.get("last-modified"))
    if last_modified is not None:
        return min(HEURISTIC_CAP, max(0.0, (origin_now - last_modified) * HEURISTIC_FRACTION))
    return 0.0


def current_age(stored_headers: Mapping[str, str], validated_at: float, now: float) -> float:
    """
    Age of a stored response: the upstream's ``Age`` at reception plus the
    time it has been resting here since it was last validated.

    The apparent age from ``Date`` is deliberately left out: it depends on
    the upstream's clock agreeing with ours.
    """
    received_age = _delta_seconds(_lowered(stored_headers).get("age", "").strip()) or 0
    return received_age + max(0.0, now - validated_at)


def client_demands_revalidation(request_headers: Mapping[str, str], age: float) -> bool:
    """
    Whether the client refuses a stored response of this age: request
    ``Cache-Control: no-cache``, ``max-age=0``, ``max-age`` shorter than
    the age, or ``Pragma: no-cache``.
    """
    if client_asks_refresh(request_headers):
        return True
    directives = parse_cache_control(_lowered(request_headers).get("cache-control"))
    if "max-age" in directives:
        limit = _delta_seconds(directives["max-age"])
        if limit is None or limit == 0 or age > limit:
            return True
    return False


def client_asks_refresh(request_headers: Mapping[str, str]) -> bool:
    """
    Whether the request says ``Cache-Control: no-cache`` or ``Pragma:
    no-cache``: what a client sends when its user asks for fresh data
    (``apk update``, ``uv --refresh``, a browser's reload, ``curl -H``).
    """
    headers = _lowered(request_headers)
    if "no-cache" in parse_cache_control(headers.get("cache-control")):
        return True
    pragma = headers.get("pragma", "")
    return any(token.strip().lower() == "no-cache" for token in pragma.split(","))


def decide(
    kind: Kind,
    stored_headers: Mapping[str, str],
    validated_at: float,
    now: float,
    request_headers: Mapping[str, str],
    index_ttl: float,
) -> Decision:
    """
    Decide whether a stored response can answer this request unchanged.

    - IMMUTABLE: always FRESH, even when the client sends ``no-cache``.
      These names are versions or digests (``foo-1.2-r0.apk``,
      ``pool/…_1.2_amd64.deb``, ``by-hash/SHA256/<digest>``, a wheel): the
      archive never publishes different bytes under them, so a revalidation
      could only cost an upstream round trip, or fail while offline.
      Clients send ``no-cache`` to refresh indexes (``apk update``, pip's
      ``max-age=0``), not files.
    - INDEX: REVALIDATE when it was validated ``index_ttl`` or more seconds
      ago, or when the client asks (``no-cache``, ``max-age``, ``Pragma``).
    - HTTP: RFC 9111.  REVALIDATE when the stored response says
      ``no-cache`` (or ``Pragma: no-cache`` without ``Cache-Control``),
      when the client asks, when ``min-fresh`` cannot be met, or when its
      age has reached its freshness lifetime.

    @param stored_headers: the stored response's headers.
    @param validated_at: when the response was fetched or last revalidated.
    @param now: the current time, POSIX seconds.
    """
    if kind is Kind.IMMUTABLE:
        return Decision.FRESH
    if kind is Kind.INDEX:
        age = max(0.0, now - validated_at)
        lifetime = float(index_ttl)
    else:
        stored = _lowered(stored_headers)
        response_directives = parse_cache_control(stored.get("cache-control"))
        if "no-cache" in response_directives:
            return Decision.REVALIDATE
        if "cache-control" not in stored and stored.get("pragma", "").strip().lower() == "no-cache":
            return Decision.REVALIDATE
        age = current_age(stored, validated_at, now)
        lifetime = freshness_lifetime(stored, validated_at)
    if client_demands_revalidation(request_headers, age):
        return Decision.REVALIDATE
    request_directives = parse_cache_control(_lowered(request_headers).get("cache-control"))
    if "min-fresh" in request_directives:
        min_fresh = _delta_seconds(request_directives["min-fresh"])
        if min_fresh is not None and lifetime - age < min_fresh:
            return Decision.REVALIDATE
    return Decision.FRESH if age < lifetime else Decision.REVALIDATE


def is_storable(
    kind: Kind,
    status: int,
    response_headers: Mapping[str, str],
    request_headers: Mapping[str, str] | None = None,
) -> bool:
    """
    Whether a response may be written to the store.

    Only complete ``200`` responses are stored (no 206 fragments, no
    errors, no redirects).  Never when the response says ``no-store`` or
    ``private`` (this is a shared cache), nor with ``Vary: *``.

    Like squid, an HTTP-kind 200 is stored even without a validator or
    explicit freshness: it then has a zero or heuristic lifetime and is
    revalidated (or refetched) on the next request, which costs nothing
    more than not storing it, and keeps it available for offline use.

    Two more refusals protect other clients' privacy: a response to a
    request carrying the client's credentials (``Authorization`` or
    ``Cookie``, see :func:`client_credentials`) needs ``public``, ``s-maxage`` or
    ``must-revalidate`` (RFC 9111 section 3.5), and an HTTP-kind response
    that sets a cookie is not stored (its session would be replayed to
    everyone).  Package files and indexes are exempt from the cookie rule:
    CDNs attach load-balancer cookies to them; the front end must not
    replay ``Set-Cookie`` from the store.
    """
    if status != 200:
        return False
    headers = _lowered(response_headers)
    directives = parse_cache_control(headers.get("cache-control"))
    if "no-store" in directives or "private" in directives:
        return False
    if any(token.strip() == "*" for token in headers.get("vary", "").split(",")):
        return False
    if request_headers is not None and client_credentials(request_headers):
        if not ({"public", "s-maxage", "must-revalidate"} & directives.keys()):
            return False
    if kind is Kind.HTTP and "set-cookie" in headers:
        return False
    return True


#: Request headers that carry a client's own credentials: a response to a
#: request with any of them belongs to whoever holds the same values.
CREDENTIAL_HEADERS = ("authorization", "cookie")


def client_credentials(request_headers: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """
    The credentials a request carries, as ``(name, value)`` pairs in
    :data:`CREDENTIAL_HEADERS` order; empty for an anonymous request.

    These are the client's own.  Credentials the operator configures for
    an upstream are added by the fetcher below this and are the cache's:
    they never reach this function, and never split the cache.
    """
    headers = _lowered(request_headers)
    return tuple(
        (name, headers[name]) for name in CREDENTIAL_HEADERS if name in headers
    )


def effective_kind(kind: Kind, private: bool) -> Kind:
    """
    The kind that governs a stored response: a private one (answering a
    request with the client's credentials) is HTTP whatever its path, so
    only its own directives decide how long it is fresh and whether a
    client's ``no-cache`` revalidates it (RFC 9111 section 3.5); a path's
    kind never makes it fresher.  Anonymous responses keep their path's
    kind.
    """
    return Kind.HTTP if private else kind


def may_serve_stale(stored_headers: Mapping[str, str], private: bool) -> bool:
    """
    Whether a stored response may be served stale when its revalidation
    fails (the upstream is down, or answers 5xx).

    Anonymous responses keep today's rule: yes, so that builds carry on
    offline.  A private one not when it says ``must-revalidate``,
    ``proxy-revalidate``, ``s-maxage`` (which implies
    ``proxy-revalidate`` for a shared cache) or ``no-cache``: RFC 9111
    sections 4.2.4 and 5.2.2 forbid it, and its holder gets a 504 instead.
    """
    if not private:
        return True
    directives = parse_cache_control(_lowered(stored_headers).get("cache-control"))
    forbidding = {"must-revalidate", "proxy-revalidate", "s-maxage", "no-cache"}
    return not (forbidding & directives.keys())


#: Request headers buildcache sends upstream with one value whatever the
#: client sent (the fetcher always asks for the body as stored): a ``Vary``
#: naming one of them never splits the cache.
NORMALISED_REQUEST_HEADERS: Mapping[str, str] = {"accept-encoding": "identity"}


def sent_headers(forwarded: Mapping[str, str]) -> dict[str, str]:
    """
    The request headers buildcache sends upstream for a request whose
    forwarded headers are ``forwarded``: those, lowercased, and the ones it
    normalises (:data:`NORMALISED_REQUEST_HEADERS`).
    """
    return {**_lowered(forwarded), **NORMALISED_REQUEST_HEADERS}


def vary_names(response_headers: Mapping[str, str]) -> tuple[str, ...] | None:
    """
    The request field names a response's ``Vary`` lists, lowercased,
    sorted and without repeats (empty without ``Vary``); None for
    ``Vary: *``, which no request matches.
    """
    value = _lowered(response_headers).get("vary", "")
    names = {token.strip().lower() for token in value.split(",")}
    names.discard("")
    if "*" in names:
        return None
    return tuple(sorted(names))


def varying_names(response_headers: Mapping[str, str]) -> tuple[str, ...] | None:
    """
    The ``Vary`` names whose values can differ between two of buildcache's
    upstream requests: :func:`vary_names` without the headers it sends
    with one fixed value (``Vary: Accept-Encoding`` splits nothing).
    Empty when the response answers every request alike; None for
    ``Vary: *``.
    """
    names = vary_names(response_headers)
    if names is None:
        return None
    return tuple(name for name in names if name not in NORMALISED_REQUEST_HEADERS)


def _normalised_value(value: str) -> str:
    # RFC 9111 section 4.1: values may be normalised before they are
    # compared: whitespace around list separators does not count.
    return ",".join(" ".join(part.split()) for part in value.split(","))


def vary_values(
    names: tuple[str, ...], sent: Mapping[str, str]
) -> tuple[tuple[str, str | None], ...]:
    """
    The values of the request headers ``names`` in the headers buildcache
    sent upstream (see :func:`sent_headers`), normalised; None for a header
    not sent (which matches only another request without it).
    """
    headers = _lowered(sent)
    return tuple(
        (name, _normalised_value(headers[name]) if name in headers else None)
        for name in names
    )


def same_variant(
    response_headers: Mapping[str, str],
    sent: Mapping[str, str],
    other_sent: Mapping[str, str],
) -> bool:
    """
    Whether a response to a request sent with ``sent`` headers also answers
    one sent with ``other_sent`` (RFC 9111 section 4.1): the headers its
    ``Vary`` names have the same values in both.  Never for ``Vary: *``.
    """
    names = varying_names(response_headers)
    if names is None:
        return False
    return vary_values(names, sent) == vary_values(names, other_sent)


def client_cache_control(
    kind: Kind,
    index_ttl: float,
    upstream_headers: Mapping[str, str] | None = None,
    status: int = 200,
) -> str | None:
    """
    The ``Cache-Control`` value to send to clients, or None for "send none".

    For a file or page (``status`` 200 or 206): IMMUTABLE: ``max-age=
    31536000, immutable``; INDEX: ``max-age=<ttl>`` (so uv and browsers do
    not come back before the cache itself would revalidate); HTTP: the
    upstream's own value, passed through.  Any other answer (a 404, a 401,
    a redirect) gets only the upstream's own value: a path's kind says how
    long its *file* lives, not that "not found" does.
    """
    if status not in (200, 206):
        return None if upstream_headers is None else _lowered(upstream_headers).get("cache-control")
    if kind is Kind.IMMUTABLE:
        return f"max-age={IMMUTABLE_MAX_AGE}, immutable"
    if kind is Kind.INDEX:
        return f"max-age={max(0, int(index_ttl))}"
    if upstream_headers is None:
        return None
    return _lowered(upstream_headers).get("cache-control")


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
    position = 0
    while position < len(value):
        match = _ENTITY_TAG.match(value, position)
        if match is None or match.end() == position:
            comma = value.find(",", position)
            if comma == -1:
                break
            position = comma + 1
            continue
        weak, opaque = match.groups()
        tags.append((weak is not None, opaque.strip('"')))
        position = match.end()
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

    @param stored_at: when the stored body was downloaded (not merely
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
