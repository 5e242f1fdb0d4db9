"""
The shared tier as operations see it: its figures in a snapshot
(:class:`SharedFigures`, read from the tier's
:class:`buildcache.shared.tier.SharedTierStatus`), and how those of
several processes add up.

Only what an operator needs to judge the tier is kept: where it is (the
endpoint without user information, the bucket, the prefix), whether it
works (health, the last error, redacted), what it does (copies read,
uploads, lease waits, records refused, evictions).  Nothing here can carry
a credential: the tier's status holds none, and its error text is
redacted once more on the way in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypedDict

from buildcache.credentials import hide_userinfo

if TYPE_CHECKING:
    from buildcache.shared.tier import SharedTierStatus


class SharedFigures(TypedDict):
    """
    The shared tier's state and counts since start-up (times are Unix
    seconds, sizes bytes).
    """

    #: The object store's endpoint, without user information.
    endpoint: str
    bucket: str
    prefix: str
    healthy: bool
    #: The last store failure (redacted), and since when it has failed
    #: (None while healthy).
    last_error: str | None
    failing_since: float | None
    #: Whether the store honours ``If-None-Match: *`` (leases across
    #: nodes); None until probed.
    conditional: bool | None
    #: Whether records are signed with a secret the nodes share.
    signed: bool
    #: Copies read whole from the store, checked and stored here.
    hits: int
    hit_bytes: int
    uploads: int
    upload_bytes: int
    upload_failures: int
    #: Downloads that waited on another node's lease, and of those, the
    #: ones that fetched upstream after all.
    lease_waits: int
    lease_timeouts: int
    #: Records or copies refused (bad signature, digest mismatch, stale).
    rejected: int
    #: ``--shared-max-size``, and what eviction removed from the bucket.
    max_size: int | None
    evicted: int
    evicted_bytes: int
    last_eviction: float | None


class SharedStatus(Protocol):
    """
    The shared tier, as the snapshot reads it.
    """

    def status(self) -> SharedTierStatus:
        """
        The tier's state and counts now.
        """


def shared_figures(status: SharedTierStatus, redact_text: Callable[[str], str]) -> SharedFigures:
    """
    The figures of one tier's ``status``; ``redact_text`` masks the
    credentials of any URL in its error text.
    """
    last_error = status.last_error
    return {
        # The location refuses user information; hidden again all the same.
        "endpoint": hide_userinfo(status.endpoint),
        "bucket": status.bucket,
        "prefix": status.prefix,
        "healthy": bool(status.healthy),
        "last_error": None if last_error is None else redact_text(last_error),
        "failing_since": status.failing_since,
        "conditional": status.conditional,
        "signed": bool(status.signed),
        "hits": status.hits,
        "hit_bytes": status.hit_bytes,
        "uploads": status.uploads,
        "upload_bytes": status.upload_bytes,
        "upload_failures": status.upload_failures,
        "lease_waits": status.lease_waits,
        "lease_timeouts": status.lease_timeouts,
        "rejected": status.rejected,
        "max_size": status.max_size,
        "evicted": status.evicted,
        "evicted_bytes": status.evicted_bytes,
        "last_eviction": status.last_eviction,
    }


#: Counts that add up across processes.
_SUMMED = (
    "hits", "hit_bytes", "uploads", "upload_bytes", "upload_failures",
    "lease_waits", "lease_timeouts", "rejected", "evicted", "evicted_bytes",
)


def combine_shared(parts: Sequence[SharedFigures | None]) -> SharedFigures | None:
    """
    The tier's figures for several processes of one server: the counts
    summed; the location and settings as the first has them; unhealthy if
    any is, with the latest failure; the latest eviction.
    """
    present = [part for part in parts if part is not None]
    if not present:
        return None
    combined: SharedFigures = dict(present[0])  # type: ignore[assignment]
    for name in _SUMMED:
        combined[name] = sum(part[name] for part in present)  # type: ignore[literal-required]
    failing = [part for part in present if not part["healthy"]]
    if failing:
        worst = max(failing, key=lambda part: part["failing_since"] or 0.0)
        combined["healthy"] = False
        combined["last_error"] = worst["last_error"]
        combined["failing_since"] = min(
            (part["failing_since"] for part in failing if part["failing_since"] is not None),
            default=None,
        )
    evictions = [part["last_eviction"] for part in present if part["last_eviction"] is not None]
    combined["last_eviction"] = max(evictions, default=None)
    return combined
