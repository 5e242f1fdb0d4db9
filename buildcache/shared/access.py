"""
The access log of the shared tier: which blobs this node used, written to
the bucket as small batch objects, since an S3 object's metadata (its
LastModified) cannot be changed in place.

Each use of a blob (a copy served, a body published) is noted in memory
with :meth:`AccessLog.touched`; every ``flush_every`` seconds, or as soon
as ``max_batch`` uses are pending, they are written as one object
``access/<node>/<13-digit unix ms>-<seq>.json``::

    {"node": NODE, "entries": [[SHA256, RECORD, SIZE, UNIX_T], ...]}

where ``RECORD`` is the name of the record that led to the blob
(``records/<hex>.json``).  The evicting node (:mod:`buildcache.shared.evict`)
merges the batches and deletes them.  A batch that cannot be written is
logged and kept for the next flush; a node that dies loses the uses it had
not written yet, which only makes those blobs look older to the evictor.

This module also says what the shared tier's bookkeeping needs of an
object store (:class:`Objects`, met by
:class:`buildcache.shared.s3.ObjectStore`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from enum import Enum
from typing import Protocol

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

__all__ = [
    "ACCESS_PREFIX",
    "AccessLog",
    "KEPT_BATCHES",
    "Listed",
    "Objects",
    "batch_name",
    "valid_node",
]

log = Logger()

#: Where access batches live, relative to the tier's prefix.
ACCESS_PREFIX = "access/"
#: How many batches' worth of uses (``KEPT_BATCHES × max_batch`` entries)
#: a node keeps while the store cannot be written; beyond that the oldest
#: uses are dropped (and logged): a store down for long costs eviction
#: order, never memory.
KEPT_BATCHES = 4

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")


class Listed(Protocol):
    """
    One object as a listing names it (:class:`buildcache.shared.s3.ObjectInfo`).
    """

    @property
    def name(self) -> str:
        """The object's name, relative to the tier's prefix."""

    @property
    def size(self) -> int:
        """Its size in bytes."""

    @property
    def last_modified(self) -> float:
        """When it was last written, in unix seconds (the store's clock)."""


class Objects(Protocol):
    """
    What the access log and the evictor use of an object store
    (:class:`buildcache.shared.s3.ObjectStore`): every method raises on
    any failure of the store, and names are relative to the tier's prefix.
    """

    async def get_small(self, name: str, limit: int) -> bytes | None:
        """The object's bytes (at most ``limit``), or None if it is absent."""

    async def put_small(self, name: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write it; False when ``if_absent`` and it exists already."""

    async def delete(self, name: str) -> None:
        """Delete it; an absent object is fine."""

    async def list_page(
        self, prefix: str, token: str | None = None
    ) -> tuple[Sequence[Listed], str | None]:
        """One page of the objects under ``prefix``, and the next page's token."""


def valid_node(node: str) -> str:
    """
    ``node`` if it may appear in an object name (letters, digits, ``.``,
    ``_``, ``-``; at most 128), else :class:`ValueError`.
    """
    if not _NODE.match(node):
        raise ValueError(f"node name {node!r} is not [A-Za-z0-9._-]{{1,128}}")
    return node


def batch_name(node: str, unix_ms: int, seq: int) -> str:
    """
    The name of ``node``'s access batch written at ``unix_ms`` (its
    ``seq``-th): names of one node sort by time.
    """
    return f"{ACCESS_PREFIX}{node}/{unix_ms:013d}-{seq}.json"


class _Flush(Enum):
    #: Nothing was pending.
    EMPTY = "empty"
    #: A batch was written.
    WRITTEN = "written"
    #: The store failed; the batch is pending again.
    FAILED = "failed"


#: One pending use: record name, size, unix time.
_Use = tuple[int, float]


@define
class AccessLog:
    """
    This node's uses of shared blobs, batched into small objects.

    Bounds: at most ``max_batch`` entries per batch object (a flush writes
    several objects when more are pending); uses of one (blob, record) pair
    are merged into one entry (the latest time); at most ``KEPT_BATCHES ×
    max_batch`` entries are held while writes fail, the oldest dropped
    first.  Nothing here raises to its callers: a failed write is logged
    (``shared_access_flush_failed``) and retried at the next flush.
    """

    objects: Objects
    clock: IReactorTime
    node: str = field(converter=valid_node)
    flush_every: float = 30.0
    max_batch: int = 1000
    #: Pending uses by (blob sha256, record name), oldest first.
    _pending: dict[tuple[str, str], _Use] = field(init=False, factory=dict)
    _lock: DeferredLock = field(init=False, factory=DeferredLock)
    _loop: LoopingCall | None = field(init=False, default=None)
    _seq: int = field(init=False, default=0)
    #: The last flush failed (the next failures are logged at debug level).
    _failing: bool = field(init=False, default=False)
    #: Uses dropped because the store could not be written for long.
    dropped: int = field(init=False, default=0)
    #: Batch objects written.
    written: int = field(init=False, default=0)

    def touched(self, sha256: str, record: str, size: int) -> None:
        """
        The blob ``sha256`` (``size`` bytes), named by the record object
        ``record``, was used now.  Starts a flush once ``max_batch`` uses
        are pending.
        """
        key = (sha256, record)
        self._pending.pop(key, None)  # re-inserted last: the newest use
        self._pending[key] = (size, self.clock.seconds())
        self._bound()
        if len(self._pending) >= self.max_batch and not self._lock.locked:
            Deferred.fromCoroutine(self.flush())

    def _bound(self) -> None:
        excess = len(self._pending) - KEPT_BATCHES * self.max_batch
        if excess <= 0:
            return
        for key in list(self._pending)[:excess]:
            del self._pending[key]
        self.dropped += excess
        log.warn(
            "Shared tier: dropped {count} access records of node {node} (the"
            " store has not taken a batch for long); those blobs look older",
            event="shared_access_dropped",
            count=excess,
            node=self.node,
        )

    @property
    def pending(self) -> int:
        """How many uses wait to be written."""
        return len(self._pending)

    async def flush(self) -> None:
        """
        Write every pending use, ``max_batch`` per object, one flush at a
        time; stops at the first failure (logged, the uses kept).
        """
        await self._lock.acquire()
        try:
            while await self._flush_one() is _Flush.WRITTEN:
                pass
        finally:
            self._lock.release()

    async def _flush_one(self) -> _Flush:
        if not self._pending:
            return _Flush.EMPTY
        keys = list(self._pending)[: self.max_batch]
        taken = {key: self._pending.pop(key) for key in keys}
        entries = [
            [sha256, record, size, round(when, 3)]
            for (sha256, record), (size, when) in taken.items()
        ]
        self._seq += 1
        name = batch_name(self.node, int(self.clock.seconds() * 1000), self._seq)
        data = json.dumps(
            {"node": self.node, "entries": entries}, separators=(",", ":")
        ).encode()
        try:
            await self.objects.put_small(name, data)
        except Exception as error:
            # Put back the uses not touched again meanwhile, before the
            # newer ones: the order stays oldest first.
            newer = self._pending
            self._pending = {k: v for k, v in taken.items() if k not in newer}
            self._pending.update(newer)
            self._bound()
            # The tier logs the store failing once; each failed flush
            # while it fails is no news.
            emit = log.warn if not self._failing else log.debug
            self._failing = True
            emit(
                "Shared tier: could not write access batch {name} ({count}"
                " entries): {error}; kept for the next flush",
                event="shared_access_flush_failed",
                name=name,
                count=len(entries),
                error=str(error),
            )
            return _Flush.FAILED
        self._failing = False
        self.written += 1
        return _Flush.WRITTEN

    def start(self) -> None:
        """
        Flush every ``flush_every`` seconds until :meth:`stop`.
        """
        if self._loop is not None:
            return
        loop = LoopingCall(lambda: Deferred.fromCoroutine(self.flush()))
        loop.clock = self.clock
        self._loop = loop
        loop.start(self.flush_every, now=False)

    def stop(self) -> Deferred[None]:
        """
        Stop flushing on a timer and write what is pending (a failure is
        logged; the uses are lost with the process).
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return Deferred.fromCoroutine(self.flush())
