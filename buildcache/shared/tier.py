"""
:class:`S3Tier`: the shared tier as the fetcher asks it
(:class:`buildcache.fetch.shared.SharedTier`), over an
:class:`~buildcache.shared.s3.ObjectStore`.

It owns the tier's decisions: which requests share (:meth:`S3Tier.shares`),
which record is trusted (:mod:`buildcache.shared.records`), the download
leases and the bounded wait on another node's
(:mod:`buildcache.shared.leases`), what is published, the tier's health,
and its counters (:class:`SharedTierStatus`).  The fetcher owns single
flight and every body read: the tier never reads a blob itself.

Health: a failing store operation marks the tier unhealthy for
:data:`UNHEALTHY_FOR` seconds (``shared_store_failing`` logged once, then
``shared_store_recovered``); meanwhile look-ups answer None at once and
uploads are skipped.  A record look-up is bounded by
:data:`LOOKUP_TIMEOUT`: a slow store costs a miss at most that.
"""

from __future__ import annotations

import os
import re
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from buildcache.fetch.client import UpstreamClient, replayed
from buildcache.fetch.shared import CopyFault, SharedCopy, SharedLease
from buildcache.shared.access import AccessLog
from buildcache.shared.evict import Evictor
from buildcache.shared.leases import (
    LEASE_TTL,
    RENEW_EVERY,
    Holder,
    Lease,
    decode_lease,
    probe_conditional,
    take_lease,
)
from buildcache.shared.location import S3Location
from buildcache.shared.records import (
    RECORD_LIMIT,
    Record,
    RecordError,
    Verdict,
    blob_name,
    decode_record,
    encode_record,
    judge,
    lease_name,
    record_name,
    trusted_headers,
)
from buildcache.shared.s3 import ObjectStoreAPI, SharedStoreError, object_store

if TYPE_CHECKING:
    from buildcache.fetch.request import UpstreamRequest
    from buildcache.store import Entry, StoredObject

__all__ = ["S3Tier", "SharedTierStatus", "default_node", "make_tier"]

UNHEALTHY_FOR = 30.0
LOOKUP_TIMEOUT = 2.0
#: S3's limit for one PUT.
MAX_PUBLISHED = 5 * 1024**3
#: Publications running at once; more are skipped (counted as failures).
MAX_UPLOADS = 16
#: Keys whose copy failed here, remembered so that their upload replaces
#: the blob even if one of the same size is there (a corrupt one).
FAILED_COPIES = 1024
#: While another node holds a key's lease: the first and the longest
#: pause between looks for its record.
POLL_FIRST = 0.2
POLL_MAX = 1.0

_Found = TypeVar("_Found")

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Store(Protocol):
    def lookup(self, key: str) -> StoredObject | None: ...


class _Access(Protocol):
    def touched(self, sha256: str, record: str, size: int) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...


class _Evictor(Protocol):
    conditional: bool

    @property
    def evicted(self) -> int: ...

    @property
    def evicted_bytes(self) -> int: ...

    @property
    def last_eviction(self) -> float | None: ...

    def start(self) -> None: ...

    def stop(self) -> Deferred[None]: ...


@frozen
class SharedTierStatus:
    """The tier as the status page shows it."""

    endpoint: str
    bucket: str
    prefix: str
    healthy: bool
    last_error: str | None
    failing_since: float | None
    #: Whether the store honours ``If-None-Match: *``; None until probed.
    conditional: bool | None
    #: A shared secret signs the records.
    signed: bool
    #: Copies read whole and served.
    hits: int
    hit_bytes: int
    uploads: int
    upload_bytes: int
    upload_failures: int
    #: Downloads that waited on another node's lease ...
    lease_waits: int
    #: ... and fetched upstream after all.
    lease_timeouts: int
    #: Records or copies refused (bad MAC, digest mismatch, stale).
    rejected: int
    max_size: int | None
    evicted: int
    evicted_bytes: int
    last_eviction: float | None


@define(eq=False)
class S3Tier:
    """
    The shared tier of one node (see the module docstring).  Implements
    :class:`buildcache.fetch.shared.SharedTier`; no method fails.
    """

    objects: ObjectStoreAPI
    location: S3Location
    store: _Store
    clock: IReactorTime
    node: str
    secret: bytes | None = field(default=None, repr=False)
    max_size: int | None = None
    #: How long a download waits, at most, for a copy while another node
    #: holds its lease (from its first look-up on).
    wait: float = 10.0
    access: _Access | None = None
    evictor: _Evictor | None = None
    lease_ttl: float = LEASE_TTL
    renew_every: float = RENEW_EVERY
    #: None until probed (no leases meanwhile).
    conditional: bool | None = None

    hits: int = field(default=0, init=False)
    hit_bytes: int = field(default=0, init=False)
    uploads: int = field(default=0, init=False)
    upload_bytes: int = field(default=0, init=False)
    upload_failures: int = field(default=0, init=False)
    lease_waits: int = field(default=0, init=False)
    lease_timeouts: int = field(default=0, init=False)
    rejected: int = field(default=0, init=False)

    _healthy: bool = field(default=True, init=False)
    _retry_at: float = field(default=0.0, init=False)
    _last_error: str | None = field(default=None, init=False)
    _failing_since: float | None = field(default=None, init=False)
    _held: dict[str, Lease] = field(factory=dict, init=False)
    _failed_copies: OrderedDict[str, str] = field(factory=OrderedDict, init=False)
    _running: set[Deferred[None]] = field(factory=set, init=False)
    #: Deletions of released leases.
    _releasing: set[Deferred[None]] = field(factory=set, init=False)
    _probe_call: IDelayedCall | None = field(default=None, init=False)
    _probing: Deferred[None] | None = field(default=None, init=False)
    _stopped: bool = field(default=False, init=False)

    log = Logger()

    # -- life -----------------------------------------------------------------

    def start(self) -> None:
        """
        Probe the store (the bucket answers; ``If-None-Match: *`` is
        honoured, logged as ``shared_store_conditional``), then start the
        access log and, with a size limit, the evictor.
        """
        if self.access is not None:
            self.access.start()
        self._probing = Deferred.fromCoroutine(self._probe())

    async def _probe(self) -> None:
        self._probe_call = None
        try:
            honoured = await probe_conditional(self.objects, self.node)
        except SharedStoreError as e:
            self._failing(SharedStoreError(
                f"{e} (at start-up: check --shared-store's endpoint and bucket,"
                " and the AWS credentials in the server's environment)"
            ))
            if not self._stopped:
                self._probe_call = self.clock.callLater(UNHEALTHY_FOR, self._probe_again)
            return
        self._succeeded()
        self.conditional = honoured
        self.log.info(
            "Shared store {location}: If-None-Match: * {answer}",
            location=self.location.url(),
            answer="honoured (one download across nodes)" if honoured
            else "not honoured (each node downloads for itself)",
            honoured=honoured, event="shared_store_conditional",
        )
        if self.evictor is not None and not self._stopped:
            self.evictor.conditional = honoured
            self.evictor.start()

    def _probe_again(self) -> None:
        self._probing = Deferred.fromCoroutine(self._probe())

    def stop(self) -> Deferred[None]:
        """
        Stop: uploads in flight are cancelled, held leases released, the
        access log flushed, the evictor stopped.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        self._stopped = True
        if self._probe_call is not None:
            self._probe_call.cancel()
            self._probe_call = None
        if self._probing is not None and not self._probing.called:
            # A probe of a store that does not answer would hold the stop.
            self._probing.addErrback(lambda _: None)
            self._probing.cancel()
        for upload in list(self._running):
            upload.cancel()
        leases = list(self._held.values())
        for lease in leases:
            lease.release()
        await self._idle()
        if self.access is not None:
            await self.access.stop()
        if self.evictor is not None:
            await self.evictor.stop()

    def when_idle(self) -> Deferred[None]:
        """Fires once no publication is running (tests, shutdown)."""
        return Deferred.fromCoroutine(self._idle())

    async def _idle(self) -> None:
        while self._running or self._releasing:
            await DeferredList(list(self._running | self._releasing))

    def status(self) -> SharedTierStatus:
        evictor = self.evictor
        return SharedTierStatus(
            endpoint=self.location.endpoint, bucket=self.location.bucket,
            prefix=self.location.prefix, healthy=self._healthy,
            last_error=self._last_error, failing_since=self._failing_since,
            conditional=self.conditional, signed=self.secret is not None,
            hits=self.hits, hit_bytes=self.hit_bytes, uploads=self.uploads,
            upload_bytes=self.upload_bytes, upload_failures=self.upload_failures,
            lease_waits=self.lease_waits, lease_timeouts=self.lease_timeouts,
            rejected=self.rejected, max_size=self.max_size,
            evicted=evictor.evicted if evictor is not None else 0,
            evicted_bytes=evictor.evicted_bytes if evictor is not None else 0,
            last_eviction=evictor.last_eviction if evictor is not None else None,
        )

    # -- health ---------------------------------------------------------------

    def _usable(self) -> bool:
        return not self._stopped and self.clock.seconds() >= self._retry_at

    def _failing(self, error: Exception) -> None:
        if self._stopped:
            # What stopping cancelled.
            return
        now = self.clock.seconds()
        self._retry_at = now + UNHEALTHY_FOR
        self._last_error = str(error)
        if self._healthy:
            self._healthy = False
            self._failing_since = now
            self.log.warn(
                "Shared store {location} failing ({error}): serving without it "
                "for {seconds:.0f} s at a time",
                location=self.location.url(), error=str(error), seconds=UNHEALTHY_FOR,
                event="shared_store_failing",
            )

    def _succeeded(self) -> None:
        if not self._healthy:
            now = self.clock.seconds()
            self.log.info(
                "Shared store {location} recovered after {seconds:.0f} s",
                location=self.location.url(),
                seconds=now - (self._failing_since or now),
                event="shared_store_recovered",
            )
            self._healthy = True
            self._failing_since = None

    # -- the fetcher's protocol ---------------------------------------------

    def shares(self, request: UpstreamRequest) -> bool:
        return request.shared and (
            self.secret is not None
            or request.expected_sha256 is not None
            or request.verify is not None
        )

    def before_upstream(
        self, request: UpstreamRequest
    ) -> Deferred[SharedCopy | SharedLease | None]:
        return Deferred.fromCoroutine(self._guarded(request, self._copy_or_lease))

    def head_of(self, request: UpstreamRequest) -> Deferred[SharedCopy | None]:
        return Deferred.fromCoroutine(self._guarded(request, self._find_copy))

    async def _guarded(
        self, request: UpstreamRequest,
        ask: Callable[[UpstreamRequest], Awaitable[_Found]],
    ) -> _Found | None:
        """
        ``ask`` about ``request`` when the tier is usable and shares it;
        None otherwise, or when the store fails (marked failing).
        """
        if not self._usable() or not self.shares(request):
            return None
        try:
            return await ask(request)
        except SharedStoreError as e:
            self._failing(e)
            return None
        except Exception:
            self.log.failure("The shared tier failed on {key}", key=request.key)
            return None

    async def _copy_or_lease(self, request: UpstreamRequest) -> SharedCopy | SharedLease | None:
        # From the start: the look-ups count against the wait.
        deadline = self.clock.seconds() + self.wait
        copy = await self._find_copy(request)
        if copy is not None or self.conditional is not True:
            return copy
        name = lease_name(request.key)
        delay = POLL_FIRST
        waited = False
        holder: Holder | None = None
        while True:
            if name in self._held:
                # Another download of the key on this node (one that may
                # not join it): wait for its record like another node's.
                holder = Holder(self.node, self.clock.seconds() + self.lease_ttl)
            elif (
                holder is None or holder.node == self.node
                or holder.expires <= self.clock.seconds()
            ):
                # Free, dead, or this node's own left from an earlier run.
                got = await take_lease(
                    self.objects, self.clock, name, self.node, self.lease_ttl,
                    self.renew_every, timeout=LOOKUP_TIMEOUT,
                )
                if isinstance(got, Lease):
                    got.on_release = self._released
                    self._held[name] = got
                    return got
                holder = got
            if not waited:
                waited = True
                self.lease_waits += 1
                self.log.info(
                    "Waiting for node {holder} to fetch {key}",
                    holder=holder.node, key=request.key, event="shared_lease_wait",
                )
            # The pause and the next round's look-ups must fit.
            if self.clock.seconds() + delay + 2 * LOOKUP_TIMEOUT > deadline:
                self.lease_timeouts += 1
                self.log.info(
                    "Node {holder} did not publish {key} within {wait} s: fetching it here",
                    holder=holder.node, key=request.key, wait=self.wait,
                    event="shared_lease_timeout",
                )
                return None
            await deferLater(self.clock, delay, lambda: None)
            delay = min(delay * 2, POLL_MAX)
            if not self._usable():
                return None
            copy = await self._find_copy(request)
            if copy is not None:
                return copy
            if name not in self._held:
                data = await self.objects.get_small(name, RECORD_LIMIT, timeout=LOOKUP_TIMEOUT)
                # Gone or dead: try to take it at the top of the loop.
                holder = decode_lease(data) if data is not None else None

    def _released(self, lease: Lease) -> None:
        if self._held.get(lease.name) is lease:
            del self._held[lease.name]
        deleted = lease.ended()
        self._releasing.add(deleted)
        deleted.addBoth(lambda _: self._releasing.discard(deleted))

    async def _find_copy(self, request: UpstreamRequest) -> SharedCopy | None:
        name = record_name(request.key)
        data = await self.objects.get_small(name, RECORD_LIMIT, timeout=LOOKUP_TIMEOUT)
        self._succeeded()
        if data is None:
            return None
        try:
            record = decode_record(data, self.secret)
        except RecordError as e:
            self.rejected += 1
            hint = (
                " (is --shared-secret-file the same file on every node? a node"
                " with another secret refuses the others' records, and they its)"
                if self.secret is not None and str(e) in ("bad signature", "not signed")
                else ""
            )
            self.log.warn(
                "Shared record {name} for {key} refused: {why}{hint}",
                name=name, key=request.key, why=str(e), hint=hint,
                event="shared_record_rejected",
            )
            return None
        verdict = judge(record, request)
        if verdict is Verdict.REJECT:
            self.rejected += 1
            self.log.warn(
                "Shared record {name} is not {key}'s", name=name, key=request.key,
                why="another key", event="shared_record_rejected",
            )
            return None
        if verdict is Verdict.STALE:
            # Another version than this request's (a package rebuilt
            # under its name, or this node's index older than the one
            # that published it): left alone, for the nodes it answers;
            # what this node fetches upstream is published over it.
            self.rejected += 1
            self.log.info(
                "Shared record {name} for {key} describes another version: not used",
                name=name, key=request.key, sha256=record.sha256,
                event="shared_record_stale",
            )
            return None
        if self._failed_copies.get(request.key) == record.sha256:
            # Its blob failed here (a large file's copy that failed after
            # streaming could not go upstream at once): upstream until
            # this node publishes over it.
            return None
        blob = blob_name(record.sha256)
        signed = self.secret is not None
        return SharedCopy(
            name=blob, url=self.objects.get_url(blob),
            headers=trusted_headers(record, signed),
            size=record.size, sha256=record.sha256,
            size_vouched=signed or request.expected_size is not None,
        )

    def copy_served(self, request: UpstreamRequest, copy: SharedCopy) -> None:
        # (The access line says it was from the shared tier.)
        self.hits += 1
        self.hit_bytes += copy.size
        if self.access is not None:
            self.access.touched(copy.sha256, record_name(request.key), copy.size)

    def copy_failed(
        self, request: UpstreamRequest, copy: SharedCopy, why: str, fault: CopyFault
    ) -> None:
        # (The fetcher logs the failure itself.)
        if fault is CopyFault.STORE:
            self._failing(SharedStoreError(f"reading {copy.name}: {why}"))
            return
        if fault is not CopyFault.CORRUPT:
            # Missing (evicted under its record: the upload after the
            # upstream fetch puts it back), or this node's disk.
            return
        self.rejected += 1
        self._failed_copies[request.key] = copy.sha256
        self._failed_copies.move_to_end(request.key)
        while len(self._failed_copies) > FAILED_COPIES:
            self._failed_copies.popitem(last=False)
        self.log.info(
            "Shared copy {name} of {key} will be replaced by the upstream's body",
            name=copy.name, key=request.key, why=why, event="shared_blob_to_replace",
        )

    def used(self, entry: Entry) -> None:
        if self.access is not None and entry.sha256 is not None and not self._stopped:
            self.access.touched(entry.sha256, record_name(entry.key), entry.size)

    # -- publishing -----------------------------------------------------------

    def _not_published(self, request: UpstreamRequest, entry: Entry) -> str | None:
        if not self.shares(request):
            return "not shared"
        if entry.key != request.key:
            return "a variant"
        if any(name.lower() == "vary" for name in entry.headers):
            return "varies"
        if entry.sha256 is None:
            return "no digest"
        if entry.size > MAX_PUBLISHED:
            return "too large"
        return None

    def publish(
        self, request: UpstreamRequest, entry: Entry, lease: SharedLease | None
    ) -> None:
        why = self._not_published(request, entry)
        if why is None and not self._usable():
            why = "store failing"
            self.upload_failures += 1
        if why is None and len(self._running) >= MAX_UPLOADS:
            why = "too many uploads running"
            self.upload_failures += 1
        if why is not None:
            self.log.debug(
                "Not publishing {key}: {why}", key=request.key, why=why,
                event="shared_not_published",
            )
            if lease is not None:
                lease.release()
            return
        upload = Deferred.fromCoroutine(self._publish(request, entry, lease))
        self._running.add(upload)
        upload.addBoth(lambda _: self._running.discard(upload))

    async def _publish(
        self, request: UpstreamRequest, entry: Entry, lease: SharedLease | None
    ) -> None:
        assert entry.sha256 is not None
        blob = blob_name(entry.sha256)
        rname = record_name(entry.key)
        try:
            replace = self._failed_copies.pop(entry.key, None) is not None
            present = None if replace else await self.objects.head(blob)
            uploaded = False
            if present is None or present.size != entry.size:
                if not await self._upload(entry, blob):
                    return
                uploaded = True
            record = Record(
                key=entry.key, sha256=entry.sha256, size=entry.size,
                headers={k: v for k, v in replayed(entry.headers).items() if k != "vary"},
                source_digest=entry.source_digest or request.source_digest,
                stored_at=self.clock.seconds(), node=self.node,
            )
            await self.objects.put_small(rname, encode_record(record, self.secret))
            self._succeeded()
            if uploaded:
                self.uploads += 1
                self.upload_bytes += entry.size
            self.log.info(
                "Published {key} to the shared tier ({name}, {size} bytes{how})",
                key=entry.key, name=blob, size=entry.size,
                how="" if uploaded else ", body already there",
                uploaded=uploaded, event="shared_published",
            )
            if self.access is not None:
                self.access.touched(entry.sha256, rname, entry.size)
        except SharedStoreError as e:
            self.upload_failures += 1
            self._failing(e)
        except Exception:
            self.upload_failures += 1
            self.log.failure("Publishing {key} failed", key=entry.key)
        finally:
            if lease is not None:
                lease.release()

    async def _upload(self, entry: Entry, blob: str) -> bool:
        stored = self.store.lookup(entry.key)
        if stored is None or stored.entry.sha256 != entry.sha256 or stored.entry.size != entry.size:
            if stored is not None:
                stored.close()
            self.log.info(
                "Not publishing {key}: no longer stored here", key=entry.key,
                event="shared_not_published",
            )
            return False
        try:
            await self.objects.put_file(blob, stored.fd, entry.size)
        finally:
            stored.close()
        return True


def default_node() -> str:
    """This node's name in the bucket: the host's name and the process."""
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:100].strip(".-_") or "node"
    return f"{host}-{os.getpid()}"


def make_tier(
    location: S3Location, *, secret: bytes | None, max_size: int | None, wait: float,
    http: UpstreamClient, store: _Store, clock: IReactorTime, node: str | None = None,
) -> S3Tier:
    """
    The tier for ``location``: its object store (credentials resolved now,
    from the standard AWS chain), an access log, and with ``max_size`` an
    evictor.  Nothing is sent until :meth:`S3Tier.start`.

    :raises ValueError: ``node`` is not a name fit for object names.
    """
    node = node if node is not None else default_node()
    if not _NODE.fullmatch(node):
        raise ValueError(f"shared tier node name {node!r}: letters, digits, '.', '_', '-'")
    objects = object_store(location, http, clock)
    access = AccessLog(objects, clock, node)
    evictor = Evictor(objects, clock, node, max_size) if max_size is not None else None
    return S3Tier(
        objects=objects, location=location, store=store, clock=clock, node=node,
        secret=secret, max_size=max_size, wait=wait, access=access, evictor=evictor,
    )
