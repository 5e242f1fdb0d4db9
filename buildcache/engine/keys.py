"""
Store keys of upstream URLs, and who may be answered from them:
:func:`cache_key` (scheme, host, port, path, query), the entries of one
client's credentials (:func:`private_family`), the ``Vary`` variants of a
URL (:func:`variant_key`, :func:`find_stored`, :func:`variants_to_drop`),
and when an ``https://`` key may take over the entry its plain-http twin
holds (:func:`http_twin`, :func:`adopt_twin`).  The HTTP rules behind them
are in :mod:`buildcache.engine.freshness`.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from twisted.logger import Logger

from buildcache.engine.freshness import sent_headers, vary_values, varying_names
from buildcache.store import Entry, Store, StoredObject

_log = Logger()

_DEFAULT_PORTS = {"http": 80, "https": 443}


def cache_key(url: str) -> str:
    """
    The store key of an upstream URL: scheme, host, non-default port, path
    and query (``http://host:8080/x?y``).  The scheme is part of it: a
    plain ``http://`` fetch through the proxy, which anyone on its path
    can alter, must never fill the entry an ``https://`` mirror route
    serves.  A key never holds ``#`` (the fragment is dropped), which
    :func:`private_family` and :func:`variant_key` use.
    """
    # Every request asks; only ordinary URLs are remembered, so that odd
    # long ones cannot fill memory.
    if len(url) <= MEMOISED_URL_LENGTH:
        return _memoised_cache_key(url)
    return _cache_key(url)


#: URLs up to this long have their cache key remembered (see cache_key).
MEMOISED_URL_LENGTH = 512


def _cache_key(url: str) -> str:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme.lower()}://{host}{parts.path or '/'}{query}"


_memoised_cache_key = functools.lru_cache(maxsize=4096)(_cache_key)

#: Marks the part of a key that names whose credentials an entry answers.
PRIVATE_MARK = "#p="
#: Marks the part of a key that names the variant (``Vary``) of an entry.
VARIANT_MARK = "#v="
#: Variants kept per URL (and per set of credentials); the least recently
#: used goes first when another arrives.
VARIANTS_KEPT = 4


def _tag(secret: bytes, label: str, pairs: Sequence[tuple[str, str | None]]) -> str:
    """
    An HMAC of ``pairs`` under the cache's secret: keys may be read by
    anyone who can read the index (``buildcache stats`` lists them), and a
    bare digest of a password or token could be checked against guesses.
    """
    message = json.dumps([label, [list(pair) for pair in pairs]]).encode("utf-8")
    return hmac.new(secret, message, hashlib.sha256).hexdigest()[:32]


def private_family(
    base: str, secret: bytes, credentials: Sequence[tuple[str, str]]
) -> str:
    """
    The key under which responses to requests carrying ``credentials``
    (see :func:`buildcache.engine.freshness.client_credentials`) are stored:
    ``base`` itself when there are none, else ``base#p=<HMAC>``, which no
    request without the same credentials can name.
    """
    if not credentials:
        return base
    return f"{base}{PRIVATE_MARK}{_tag(secret, 'credentials', credentials)}"


def variant_key(
    family: str, secret: bytes, values: Sequence[tuple[str, str | None]]
) -> str:
    """
    The key of the variant of ``family`` for the ``Vary`` values ``values``
    (see :func:`buildcache.engine.freshness.vary_values`): ``family`` itself when
    the response does not vary, else ``family#v=<HMAC>`` (an HMAC, as a
    ``Vary: Cookie`` would otherwise put a digest of a cookie in the key).
    """
    if not values:
        return family
    return f"{family}{VARIANT_MARK}{_tag(secret, 'vary', values)}"


def stored_key_for(
    family: str, secret: bytes, response_headers: Mapping[str, str],
    sent: Mapping[str, str],
) -> str | None:
    """
    The key a response of ``family`` to a request sent with ``sent``
    headers is stored under, or None when it cannot be (``Vary: *``).
    """
    names = varying_names(response_headers)
    if names is None:
        return None
    return variant_key(family, secret, vary_values(names, sent_headers(sent)))


def find_stored(
    store: Store, family: str, sent: Mapping[str, str]
) -> Entry | None:
    """
    The entry of ``family`` that answers a request sent upstream with
    ``sent`` headers (RFC 9111 section 4.1): the one stored under
    ``family`` when it does not vary, else the variant whose key the
    request's values give, most recently used first.  An entry under
    ``family`` that varies (stored before variants were kept) answers
    nobody; the next response replaces it.
    """
    entry = store.peek(family)
    if entry is not None and varying_names(entry.headers) == ():
        return entry
    secret = store.secret
    wanted = sent_headers(sent)
    for candidate in sorted(
        store.entries_under(family + VARIANT_MARK, limit=64), key=lambda e: -e.last_access
    ):
        names = varying_names(candidate.headers)
        if not names:
            continue
        if variant_key(family, secret, vary_values(names, wanted)) == candidate.key:
            return candidate
    return None


def open_stored(
    store: Store, family: str, sent: Mapping[str, str]
) -> StoredObject | None:
    """
    :func:`find_stored`, opened (and its access recorded).
    """
    entry = find_stored(store, family, sent)
    return None if entry is None else store.lookup(entry.key)


def http_twin(key: str) -> str | None:
    """
    The key the URL of the ``https://`` key ``key`` has over plain http
    (with the same credential and variant marks): where a cache from before
    keys named their scheme left the entry (the upgrade gave every old key
    ``http://``), and where a plain-http fetch puts its copy.  None for
    any other key.  Such an entry may answer ``key`` only once a digest
    obtained over https vouches for its bytes (see :func:`adopt_twin`).
    """
    if not key.startswith("https://"):
        return None
    return "http://" + key[len("https://"):]


def twin_matches_digest(twin_sha256: str | None, expected_sha256: str | None) -> bool:
    """
    Whether a stored body whose sha256 is ``twin_sha256`` is the one a
    digest obtained over https (``expected_sha256``) names.
    """
    return (
        twin_sha256 is not None
        and expected_sha256 is not None
        and twin_sha256.lower() == expected_sha256.lower()
    )


def adopt_twin(store: Store, family: str, twin_family: str, twin: Entry) -> Entry | None:
    """
    Move ``twin`` (an entry of ``twin_family``, the :func:`http_twin` of
    ``family``) to the same place in ``family``, once the caller has
    checked its bytes against a digest obtained over https; the entry
    under its new key, or None if it is gone.
    """
    adopted = store.rename_entry(twin, family + twin.key[len(twin_family):])
    if adopted is not None:
        _log.info(
            "Adopted {twin} as {key}: its digest matches the one obtained over https",
            twin=twin.key, key=adopted.key,
        )
    return adopted


def variants_to_drop(
    family: str, stored_key: str, siblings: Sequence[tuple[str, float]],
    keep: int = VARIANTS_KEPT,
) -> list[str]:
    """
    Which entries of ``family`` (``(key, last access)`` pairs, the one
    under ``family`` itself and its variants) go once ``stored_key`` has
    been stored: all variants when the new response does not vary (the
    upstream stopped varying), else the unvarying one and the least
    recently used variants beyond ``keep``.
    """
    others = [(key, used) for key, used in siblings if key != stored_key]
    if stored_key == family:
        return [key for key, _ in others if key.startswith(family + VARIANT_MARK)]
    drop = [key for key, _ in others if key == family]
    variants = sorted(
        ((key, used) for key, used in others if key.startswith(family + VARIANT_MARK)),
        key=lambda item: item[1],
        reverse=True,
    )
    drop += [key for key, _ in variants[keep - 1:]]
    return drop
