"""
Download leases: one node fetches a key upstream for every node.

A lease is a small object ``leases/keys/<hex>`` holding
``{"node": NODE, "expires": UNIX_SECONDS}``, created with a conditional
PUT (``If-None-Match: *``), so that of several nodes asking at once one
gets it.  Its holder rewrites it every :data:`RENEW_EVERY` seconds with a
later expiry while the download runs, and deletes it when done; a node
that dies leaves a lease that expires by itself within :data:`LEASE_TTL`
seconds, after which the next node deletes it and takes its own.

How it fails: two nodes that find the same expired lease at once may both
delete it and both take one (S3 has no compare-and-delete): both then
download, which costs a second upstream fetch, never a wrong body.  A
store that does not honour ``If-None-Match: *`` (:func:`probe_conditional`
at start-up) gets no leases at all: every node downloads for itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from buildcache.shared.records import RECORD_LIMIT
from buildcache.shared.s3 import ObjectStoreAPI, SharedStoreError

__all__ = [
    "LEASE_TTL",
    "RENEW_EVERY",
    "Holder",
    "Lease",
    "decode_lease",
    "encode_lease",
    "probe_conditional",
    "take_lease",
]

LEASE_TTL = 30.0
RENEW_EVERY = 10.0

_log = Logger(namespace="buildcache.shared.leases")


@frozen
class Holder:
    """Who holds a lease, and until when (unix seconds)."""

    node: str
    expires: float


def encode_lease(node: str, expires: float) -> bytes:
    return json.dumps({"node": node, "expires": expires}, sort_keys=True).encode()


def decode_lease(data: bytes) -> Holder | None:
    """The lease's holder; None for something unreadable (a dead lease)."""
    try:
        fields = json.loads(data)
        node, expires = fields["node"], fields["expires"]
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None
    if not isinstance(node, str) or not isinstance(expires, (int, float)) or isinstance(expires, bool):
        return None
    return Holder(node, float(expires))


@define(eq=False)
class Lease:
    """
    A lease this node holds (:class:`buildcache.fetch.shared.SharedLease`),
    renewed until :meth:`release`.
    """

    objects: ObjectStoreAPI
    clock: IReactorTime
    #: The lease object's name.
    name: str
    node: str
    ttl: float = LEASE_TTL
    renew_every: float = RENEW_EVERY
    #: Called once, when released (the tier forgets it).
    on_release: Callable[[Lease], None] | None = None
    released: bool = False
    #: Set when a renewal found another node's lease in its place.
    lost: bool = False
    _call: IDelayedCall | None = field(default=None, repr=False)
    #: The last renewal or the deletion, while it runs.
    _busy: Deferred[None] | None = field(default=None, repr=False)

    def start(self) -> None:
        self._call = self.clock.callLater(self.renew_every, self._renew)

    def _renew(self) -> None:
        self._call = None
        if self.released:
            return
        self._busy = Deferred.fromCoroutine(self._rewrite())
        self._busy.addBoth(self._renewed)

    def _renewed(self, _: object) -> None:
        self._busy = None
        if not self.released and not self.lost:
            self._call = self.clock.callLater(self.renew_every, self._renew)

    async def _rewrite(self) -> None:
        try:
            data = await self.objects.get_small(self.name, RECORD_LIMIT)
            holder = decode_lease(data) if data is not None else None
            if holder is not None and holder.node != self.node:
                # Taken by another node: ours had expired (the store was
                # unreachable for a while).  Its download goes on.
                self.lost = True
                _log.warn(
                    "Lost the lease {name} to node {holder}",
                    name=self.name, holder=holder.node, event="shared_lease_lost",
                )
                return
            expires = self.clock.seconds() + self.ttl
            await self.objects.put_small(self.name, encode_lease(self.node, expires))
        except SharedStoreError as e:
            # Tried again at the next interval; the lease may expire.
            _log.info(
                "Could not renew the lease {name}: {error}",
                name=self.name, error=str(e), event="shared_lease_renew_failed",
            )

    def release(self) -> None:
        """
        Stop renewing and delete the lease (in the background; a failure
        is logged, and the lease then expires by itself).
        """
        if self.released:
            return
        self.released = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        previous = self._busy
        self._busy = Deferred.fromCoroutine(self._delete(previous))
        if self.on_release is not None:
            self.on_release(self)

    async def _delete(self, previous: Deferred[None] | None) -> None:
        if previous is not None:
            # A renewal in flight would write the lease back after the
            # deletion.
            await previous
        if self.lost:
            return
        try:
            data = await self.objects.get_small(self.name, RECORD_LIMIT)
            holder = decode_lease(data) if data is not None else None
            if holder is not None and holder.node == self.node:
                await self.objects.delete(self.name)
        except SharedStoreError as e:
            _log.info(
                "Could not delete the lease {name}: {error}",
                name=self.name, error=str(e), event="shared_lease_release_failed",
            )

    def ended(self) -> Deferred[None]:
        """Fires once no renewal or deletion is running."""
        busy = self._busy
        if busy is None:
            return Deferred.fromCoroutine(_nothing())
        done: Deferred[None] = Deferred()
        busy.addBoth(lambda _: None if done.called else done.callback(None))
        return done


async def _nothing() -> None:
    return None


async def take_lease(
    objects: ObjectStoreAPI, clock: IReactorTime, name: str, node: str,
    ttl: float = LEASE_TTL, renew_every: float = RENEW_EVERY,
    timeout: float | None = None,
) -> Lease | Holder:
    """
    Take lease ``name`` for ``node`` (a started :class:`Lease`), or the
    live :class:`Holder` that has it.  A lease past its expiry, unreadable,
    or this node's own (left by an earlier run of it) is deleted and taken.
    Each request to the store waits ``timeout`` seconds at most (a miss
    waits on it).

    :raises SharedStoreError: the store failed.
    """
    holder: Holder | None = None
    for _ in range(3):
        now = clock.seconds()
        if await objects.put_small(
            name, encode_lease(node, now + ttl), if_absent=True, timeout=timeout
        ):
            lease = Lease(objects, clock, name, node, ttl, renew_every)
            lease.start()
            return lease
        data = await objects.get_small(name, RECORD_LIMIT, timeout=timeout)
        if data is None:
            # Released between the two requests: try again.
            continue
        holder = decode_lease(data)
        if holder is not None and holder.node != node and holder.expires > now:
            return holder
        _log.info(
            "Lease {name} of node {holder} is dead: deleting it",
            name=name, holder=holder.node if holder else None, event="shared_lease_expired",
        )
        await objects.delete(name, timeout=timeout)
    # Lost the race three times: another node has it now.
    return holder if holder is not None else Holder("", clock.seconds() + ttl)


async def probe_conditional(objects: ObjectStoreAPI, node: str) -> bool:
    """
    Whether the store honours ``If-None-Match: *`` on PUT: a second
    conditional PUT of ``probe/<node>`` must be refused.

    :raises SharedStoreError: the store failed.
    """
    name = f"probe/{node}"
    await objects.delete(name)
    first = await objects.put_small(name, b"1", if_absent=True)
    second = await objects.put_small(name, b"2", if_absent=True)
    await objects.delete(name)
    return first and not second
