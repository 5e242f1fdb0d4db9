"""
The names of the shared tier's objects, and its records: the small JSON
object per cache key that names the body's digest, signed with an HMAC
when the nodes share a secret.

Names (relative to the location's prefix): ``blobs/sha256/<hex>`` (bodies,
content-addressed), ``records/<hex of sha256(key)>.json``,
``leases/keys/<hex of sha256(key)>``, ``probe/<node>``.

A record is trusted only under the read rules of :func:`judge`: its key
is the request's, its MAC is valid when there is a secret (without one,
only a request with a check of its own is shared at all), and it agrees
with what the request knows of the body (its expected digest and size,
and the index's digest of the version it asks for); one that disagrees is
stale (the package was rebuilt under the same name).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any

from attrs import field, frozen

from buildcache.fetch.request import UpstreamRequest

__all__ = [
    "Record",
    "RecordError",
    "Verdict",
    "blob_name",
    "decode_record",
    "encode_record",
    "judge",
    "lease_name",
    "record_name",
    "trusted_headers",
]

#: Records and leases are read whole: never more than this.
RECORD_LIMIT = 64 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def record_name(key: str) -> str:
    return f"records/{_key_hash(key)}.json"


def lease_name(key: str) -> str:
    return f"leases/keys/{_key_hash(key)}"


def blob_name(sha256: str) -> str:
    return f"blobs/sha256/{sha256}"


class RecordError(ValueError):
    """A record that cannot be used at all (unreadable, unsigned, forged)."""


@frozen
class Record:
    """What one cache key's body is in the shared tier."""

    key: str
    sha256: str
    size: int
    #: The end-to-end headers stored and replayed with the body.
    headers: Mapping[str, str] = field(eq=False)
    source_digest: str | None
    stored_at: float
    node: str


def _canonical(fields: Mapping[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _mac(secret: bytes, fields: Mapping[str, Any]) -> str:
    return hmac.new(secret, _canonical(fields), hashlib.sha256).hexdigest()


def encode_record(record: Record, secret: bytes | None) -> bytes:
    """The record's JSON, with its ``mac`` when there is a secret."""
    fields: dict[str, Any] = {
        "v": 1,
        "key": record.key,
        "sha256": record.sha256,
        "size": record.size,
        "headers": dict(record.headers),
        "source_digest": record.source_digest,
        "stored_at": record.stored_at,
        "node": record.node,
    }
    if secret is not None:
        fields["mac"] = _mac(secret, fields)
    return _canonical(fields)


def decode_record(data: bytes, secret: bytes | None) -> Record:
    """
    The record in ``data``; with a secret, only if its MAC is valid.

    :raises RecordError: why it cannot be used.
    """
    try:
        fields = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RecordError("not JSON") from None
    if not isinstance(fields, dict) or fields.get("v") != 1:
        raise RecordError("not a version 1 record")
    mac = fields.pop("mac", None)
    if secret is not None:
        if not isinstance(mac, str):
            raise RecordError("not signed")
        if not hmac.compare_digest(mac, _mac(secret, fields)):
            raise RecordError("bad signature")
    key, sha256, size = fields.get("key"), fields.get("sha256"), fields.get("size")
    headers = fields.get("headers")
    source = fields.get("source_digest")
    stored_at = fields.get("stored_at")
    node = fields.get("node")
    if (
        not isinstance(key, str)
        or not isinstance(sha256, str) or not _HEX64.fullmatch(sha256)
        or not isinstance(size, int) or isinstance(size, bool) or size < 0
        or not isinstance(headers, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
        or not (source is None or isinstance(source, str))
        or not isinstance(stored_at, (int, float))
        or not isinstance(node, str)
    ):
        raise RecordError("malformed")
    return Record(key, sha256, size, headers, source, float(stored_at), node)


class Verdict(enum.Enum):
    #: The record names the body for this request.
    USE = "use"
    #: It is another version of the package (rebuilt under the same name):
    #: delete it, fetch upstream, publish that.
    STALE = "stale"
    #: Not this request's (another key: a collision or a forgery).
    REJECT = "reject"


def judge(record: Record, request: UpstreamRequest) -> Verdict:
    """
    Whether ``record`` answers ``request`` (see the module docstring).
    """
    if record.key != request.key:
        return Verdict.REJECT
    expected = request.expected_sha256
    if expected is not None and expected.lower() != record.sha256:
        return Verdict.STALE
    if request.expected_size is not None and request.expected_size != record.size:
        return Verdict.STALE
    if request.source_digest is not None and request.source_digest != record.source_digest:
        return Verdict.STALE
    return Verdict.USE


#: What an unsigned record may say of its body's headers: nothing a
#: bucket writer could turn against a client (a type a browser runs, a
#: redirect, a download name, a cache lifetime).
_UNSIGNED_HEADERS = frozenset({"etag", "last-modified"})
#: Types an unsigned record may give: a package file's, never one a
#: browser renders as a page or a script.
_UNSIGNED_TYPES = re.compile(
    r"application/(?!(?:[\w.+-]*\+)?(?:xml|xhtml|html|javascript|ecmascript)\b)"
    r"[\w.+-]+(?:\s*;.*)?",
    re.IGNORECASE,
)


def trusted_headers(record: Record, signed: bool) -> dict[str, str]:
    """
    The headers of ``record`` that are stored and served with its body.
    A signed record's are the publishing node's.  An unsigned record is
    trusted for its body only because the request checks the body
    itself; its headers are checked by nothing, so only harmless ones
    pass: validators, an ``application/`` type (else
    ``application/octet-stream``), and a ``Docker-Content-Digest`` that
    names the body's own digest.
    """
    if signed:
        return dict(record.headers)
    kept: dict[str, str] = {}
    for name, value in record.headers.items():
        lower = name.lower()
        if lower in _UNSIGNED_HEADERS:
            kept[lower] = value
        elif lower == "content-type" and _UNSIGNED_TYPES.fullmatch(value.strip()):
            kept[lower] = value
        elif lower == "docker-content-digest" and value == "sha256:" + record.sha256:
            kept[lower] = value
    # Never none: a server would fill in its own default (twisted.web's is
    # text/html, the type this keeps out).
    kept.setdefault("content-type", "application/octet-stream")
    return kept
