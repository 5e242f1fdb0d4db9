"""
The RFC 9111 freshness rules of a shared cache, and the one freshness
decision every front end's requests go through.

This module owns:

- the kinds a stored response can have: IMMUTABLE (a name the upstream
  never reuses: a versioned package, a digest), INDEX (changes under a
  fixed name, revalidated after the index TTL) and HTTP (its own headers
  decide, as RFC 9111 says).  Which file is which kind is an ecosystem's
  knowledge (its policy, see :mod:`buildcache.engine.policy`); nothing here
  knows a file name;
- the decision whether a stored response may answer a request as it is
  or must be revalidated upstream (:func:`decide`), and whether a response
  may be stored at all (:func:`is_storable`);
- the ``Cache-Control`` the cache itself sends to clients;
- which stored response may answer which request: a response to a request
  that carried the client's own credentials (``Authorization``,
  ``Cookie``) is private to those credentials, and its own directives
  alone decide its life (:func:`client_credentials`,
  :func:`effective_kind`, :func:`may_serve_stale`); a response with
  ``Vary`` answers only requests for which buildcache would send the same
  values of the headers it names (:func:`varying_names`,
  :func:`vary_values`, :func:`same_variant`).  These rules always win over
  an ecosystem's kind.

Field parsing is in :mod:`buildcache.engine.fields`, conditional requests
and ranges in :mod:`buildcache.engine.conditional`.  Everything here is
pure: times are passed in as POSIX seconds, never read from a clock.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

from buildcache.engine.fields import delta_seconds as _delta_seconds
from buildcache.engine.fields import lowered as _lowered
from buildcache.engine.fields import parse_cache_control, parse_http_date

__all__ = [
    "Kind",
    "Decision",
    "decide",
    "is_storable",
    "CREDENTIAL_HEADERS",
    "client_credentials",
    "effective_kind",
    "may_serve_stale",
    "GONE_STATUSES",
    "stale_status",
    "private_cache_control",
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


def freshness_lifetime(stored_headers: Mapping[str, str], received_at: float) -> float:
    """
    RFC 9111 section 4.2.1 freshness lifetime of a stored response, seen by
    a shared cache.

    ``s-maxage``, then ``max-age``, then ``Expires - Date``, then the
    heuristic (10% of ``Date - Last-Modified``, capped at a day), else 0.
    A malformed ``max-age`` or ``Expires`` means already stale (RFC 9111
    sections 1.2.2 and 5.3), not "fall through to the heuristic".

    :param received_at: when the response was received; stands in for a
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

    :param stored_headers: the stored response's headers.
    :param validated_at: when the response was fetched or last revalidated.
    :param now: the current time, POSIX seconds.
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


#: Statuses never served stale for, whatever a policy says: the upstream
#: says the file is gone, and a stored copy must not hide that.
GONE_STATUSES = frozenset({404, 410})


def stale_status(status: int, policy_says: bool) -> bool:
    """
    Whether an upstream answer of ``status`` to a revalidation serves the
    stored copy stale, when the policy's ``stale_on`` said ``policy_says``.
    The policy decides among error statuses (5xx by default; a registry
    adds 429) but cannot go further: a success or a redirect (< 400) and
    an upstream saying the file is gone (404, 410) are never stale
    triggers.
    """
    return policy_says and status >= 400 and status not in GONE_STATUSES


def private_cache_control(
    policy_value: str | None, response_headers: Mapping[str, str], status: int,
    now: float,
) -> str | None:
    """
    The ``Cache-Control`` sent to the client of a private request (one
    with credentials), given the one its policy chose: the policy's value
    when it promises no longer a life than the response's own (it says
    ``no-store`` or ``no-cache``, or has a ``max-age`` no longer than the
    response's freshness lifetime, and no ``immutable``), else the
    response's own value.  A private response's own directives decide its
    life, in the client's cache as in this one.
    """
    own = client_cache_control(Kind.HTTP, 0.0, response_headers, status)
    if policy_value is None or policy_value == own:
        return own if policy_value is None else policy_value
    directives = parse_cache_control(policy_value)
    if "no-store" in directives or "no-cache" in directives:
        return policy_value
    max_age = _delta_seconds(directives.get("max-age"))
    if "immutable" in directives or max_age is None:
        return own
    if max_age <= freshness_lifetime(response_headers, now):
        return policy_value
    return own


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
