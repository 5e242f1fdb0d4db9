"""
Keeping the shared tier's prefix under ``--shared-max-size``: the
:class:`Evictor` one node at a time runs, holding an expiring lease.

A pass (:meth:`Evictor.run_once`):

1. takes the eviction lease ``leases/evict`` (JSON ``{"node", "expires"}``)
   with a conditional PUT (``If-None-Match: *``); a live lease of another
   node ends the pass at once, an expired one is deleted and taken.  The
   lease is renewed while the pass runs and left in place after it, with a
   fresh expiry, so the node that evicts keeps evicting (its next pass
   retakes its own lease) and another takes over one ``lease_ttl`` after
   it died;
2. lists the whole prefix, page by page, keeping only what it needs: each
   blob's size and LastModified, each record's size, the access batches'
   names;
3. merges the access batches (:mod:`buildcache.shared.access`) into the
   merged map ``state/access.json``: per blob, its latest use and the
   records seen pointing at it;
4. when the prefix holds more than ``max_size`` bytes, deletes blobs least
   recently used first -- a blob's last use is the later of its
   LastModified and its merged access time -- each after the records known
   to point at it (those that still do: a key published again with another
   body keeps its record), until the prefix is under ``low_water ×
   max_size``;
5. writes the merged map, then deletes the batches it merged.

Every step may fail (the store down, slow, refusing): the failure is
logged (``shared_evict_failed``) and the pass ends there; nothing raises
to the caller.  Each step leaves the bucket consistent for the next: a
batch is deleted only after a merged map holding it was written (merging
one twice is harmless), and a blob's records go before the blob, so a pass
that dies between them leaves a blob without records (counted, and
evicted by the next pass) or, when a record was written meanwhile, a record
without its blob, which readers treat as absent (a failed copy: they fetch
upstream and publish again).

Without a store that honours conditional PUTs (``conditional=False``) the
lease is read, then written: two nodes starting a pass at the same moment
may both run one.  They delete the same least recently used blobs (a
delete of an absent object is fine); one's merged map may overwrite the
other's, losing the uses of batches only the other merged, so a few blobs
may look older than they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from buildcache.shared.access import ACCESS_PREFIX, Objects, valid_node

__all__ = [
    "BATCH_LIMIT", "EVICT_LEASE", "EvictionReport", "Evictor", "MAX_BATCHES",
    "MAX_ENTRIES", "MAX_LISTED", "MAX_RECORDS_PER_BLOB", "STATE",
]

log = Logger()

EVICT_LEASE = "leases/evict"
STATE = "state/access.json"
BLOBS = "blobs/sha256/"
#: Objects listed per pass: beyond them the pass works on what it saw
#: (``shared_evict_truncated``), so a bucket that large is kept under its
#: bound only approximately.  Also bounds the merged map's entries.
MAX_LISTED = 200_000
#: Access batches merged per pass; the rest wait for the next pass.
MAX_BATCHES = 500
#: Bytes of one access batch read; a larger one is deleted unread.
BATCH_LIMIT = 1024 * 1024
#: Entries of one access batch used; the rest are ignored.
MAX_ENTRIES = 10_000
#: Records remembered per blob (the latest seen): one body under more
#: keys leaves the others to be found by readers as dangling.
MAX_RECORDS_PER_BLOB = 16
#: Blobs a pass fails to delete before it gives up until the next pass.
MAX_DELETE_FAILURES = 16
#: Bytes of the merged map read (it holds at most ``MAX_LISTED`` blobs).
STATE_LIMIT = 64 * 1024 * 1024
#: Bytes of a record read before it is deleted.
RECORD_LIMIT = 256 * 1024
#: Bytes of the lease object read.
LEASE_LIMIT = 4096

_HEX = re.compile(r"[0-9a-f]{64}\Z")
_RECORD = re.compile(r"records/[0-9a-f]{64}\.json\Z")


@frozen
class EvictionReport:
    """
    What one pass saw and did.
    """

    #: Blobs listed.
    blobs: int
    #: Bytes under the prefix when listed.
    total: int
    evicted: int
    evicted_bytes: int
    records_deleted: int
    batches_merged: int


class _Abort(Exception):
    """A pass ends early; the reason was logged."""


@define
class _Blob:
    size: int
    last_modified: float


@define
class _Listing:
    blobs: dict[str, _Blob] = field(factory=dict)
    records: dict[str, int] = field(factory=dict)
    batches: list[tuple[str, int]] = field(factory=list)
    total: int = 0
    truncated: bool = False
    #: The merged map's size, if listed.
    state_size: int | None = None


#: The merged map: per blob sha256, [latest use, [record names]].
_State = dict[str, tuple[float, list[str]]]


@define
class Evictor:
    """
    Keeps the prefix under ``max_size`` bytes (see the module).  A pass
    runs every ``interval`` seconds while started (the first one interval
    after :meth:`start`); :meth:`run_once` runs one now.

    Bounds per pass: ``MAX_LISTED`` objects listed, ``MAX_BATCHES`` access
    batches merged, ``BATCH_LIMIT`` bytes and ``MAX_ENTRIES`` entries read
    of each, ``MAX_RECORDS_PER_BLOB`` records remembered per blob.
    """

    objects: Objects
    clock: IReactorTime
    node: str = field(converter=valid_node)
    max_size: int
    interval: float = 300.0
    lease_ttl: float = 600.0
    low_water: float = 0.9
    #: Whether the store honours ``If-None-Match: *`` (the tier's start-up
    #: probe says); without it passes of two nodes may overlap.
    conditional: bool = True
    _loop: LoopingCall | None = field(init=False, default=None)
    _running: Deferred[EvictionReport | None] | None = field(init=False, default=None)
    _stopping: bool = field(init=False, default=False)
    _lease_expires: float = field(init=False, default=0.0)
    #: Totals over this node's passes, for the tier's status.
    evicted: int = field(init=False, default=0)
    evicted_bytes: int = field(init=False, default=0)
    last_eviction: float | None = field(init=False, default=None)
    last_report: EvictionReport | None = field(init=False, default=None)

    def start(self) -> None:
        """
        Run a pass every ``interval`` seconds until :meth:`stop`.
        """
        if self._loop is not None:
            return
        self._stopping = False
        loop = LoopingCall(self._tick)
        loop.clock = self.clock
        self._loop = loop
        loop.start(self.interval, now=False)

    def _tick(self) -> None:
        if self._running is None:
            Deferred.fromCoroutine(self.run_once())

    def stop(self) -> Deferred[None]:
        """
        Stop the timer, end a running pass at its next step, and release
        the lease if this node holds it (another node takes over at once).
        """
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._running is not None:
            await self._running
        if self._lease_expires:
            self._lease_expires = 0.0
            try:
                held = await self._read_lease()
                if held is not None and held[0] == self.node:
                    await self.objects.delete(EVICT_LEASE)
            except Exception as error:
                self._failed("releasing the lease", error)

    async def run_once(self) -> EvictionReport | None:
        """
        One pass; None when another node holds the eviction lease, when
        this node is already running one or stopping, or when the pass
        ended early (logged).
        """
        if self._running is not None or self._stopping:
            return None
        running: Deferred[EvictionReport | None] = Deferred.fromCoroutine(self._pass())
        self._running = running
        try:
            return await running
        finally:
            self._running = None

    # -- the pass ---------------------------------------------------------

    async def _pass(self) -> EvictionReport | None:
        started = self.clock.seconds()
        try:
            if not await self._take_lease():
                return None
            listing = await self._list()
            state = await self._read_state(listing.state_size)
            merged = await self._merge(state, listing.batches)
            self._prune(state, listing, started)
            # The merged batches go once the state is written: they do
            # not count towards the bound.
            merged_names = set(merged)
            gone = sum(size for name, size in listing.batches if name in merged_names)
            report = await self._evict(state, listing, len(merged), gone)
            await self._checkpoint()
            if await self._write_state(state):
                await self._delete_batches(merged)
            await self._write_lease()
        except _Abort:
            return None
        except Exception:
            # A defect, not the store (whose failures are caught at each
            # step): still never raised into the timer or the tier.
            log.failure("Shared tier: eviction pass of node {node} failed", node=self.node)
            return None
        self.evicted += report.evicted
        self.evicted_bytes += report.evicted_bytes
        self.last_eviction = self.clock.seconds()
        self.last_report = report
        log.info(
            "Shared tier: eviction pass of node {node}: {blobs} blobs, {total}"
            " bytes under the prefix (bound {max_size}); evicted {evicted}"
            " ({evicted_bytes} bytes) and {records} records; merged {batches}"
            " access batches",
            event="shared_evicted",
            node=self.node,
            blobs=report.blobs,
            total=report.total,
            max_size=self.max_size,
            evicted=report.evicted,
            evicted_bytes=report.evicted_bytes,
            records=report.records_deleted,
            batches=report.batches_merged,
        )
        return report

    def _failed(self, step: str, error: BaseException) -> None:
        log.warn(
            "Shared tier: eviction by node {node} failed {step}: {error}",
            event="shared_evict_failed",
            node=self.node,
            step=step,
            error=str(error) or type(error).__name__,
        )

    # -- the lease --------------------------------------------------------

    async def _read_lease(self) -> tuple[str, float] | None:
        data = await self.objects.get_small(EVICT_LEASE, LEASE_LIMIT)
        if data is None:
            return None
        try:
            lease = json.loads(data)
            node, expires = str(lease["node"]), float(lease["expires"])
        except (ValueError, TypeError, KeyError, OverflowError, RecursionError):
            return ("", 0.0)  # unreadable: as good as expired
        if not expires < self.clock.seconds() + 2 * self.lease_ttl:
            # No node writes a lease that long (nor NaN): forged, or a
            # clock far off; as good as expired, or eviction stops for good.
            return (node, 0.0)
        return node, expires

    def _lease_bytes(self) -> bytes:
        self._lease_expires = self.clock.seconds() + self.lease_ttl
        return json.dumps(
            {"node": self.node, "expires": round(self._lease_expires, 3)}
        ).encode()

    async def _take_lease(self) -> bool:
        try:
            if self.conditional:
                if await self.objects.put_small(
                    EVICT_LEASE, self._lease_bytes(), if_absent=True
                ):
                    return True
            held = await self._read_lease()
            now = self.clock.seconds()
            if held is not None and held[0] != self.node and held[1] > now:
                self._lease_expires = 0.0
                log.debug(
                    "Shared tier: node {holder} holds the eviction lease",
                    event="shared_evict_lease_held",
                    holder=held[0],
                )
                return False
            if held is not None and held[0] != self.node and self.conditional:
                # Expired: delete it and race for it like any other node.
                await self.objects.delete(EVICT_LEASE)
                if not await self.objects.put_small(
                    EVICT_LEASE, self._lease_bytes(), if_absent=True
                ):
                    self._lease_expires = 0.0
                    return False
                return True
            # Our own lease (this node's previous pass), absent, or no
            # conditional PUT: write it over.
            await self.objects.put_small(EVICT_LEASE, self._lease_bytes())
            return True
        except Exception as error:
            self._lease_expires = 0.0
            self._failed("taking the lease", error)
            return False

    async def _write_lease(self) -> None:
        """
        Renew the lease -- unless another node holds it now: two nodes
        that found the same expired lease may each have deleted it and
        taken it, and the later one keeps it; the other ends its pass.
        """
        try:
            held = await self._read_lease()
            if held is not None and held[0] != self.node:
                self._lease_expires = 0.0
                log.warn(
                    "Shared tier: node {node} lost the eviction lease to node"
                    " {holder} mid-pass; its pass ends",
                    event="shared_evict_lease_lost",
                    node=self.node,
                    holder=held[0],
                )
                raise _Abort()
            await self.objects.put_small(EVICT_LEASE, self._lease_bytes())
        except _Abort:
            raise
        except Exception as error:
            self._failed("renewing the lease", error)
            raise _Abort() from error

    async def _checkpoint(self) -> None:
        """
        Between steps: end the pass if the evictor stops or the lease ran
        out (the store was too slow for ``lease_ttl``: another node may be
        evicting), and renew the lease once half its time is gone.
        """
        if self._stopping:
            raise _Abort()
        now = self.clock.seconds()
        if now >= self._lease_expires:
            self._failed("before its lease expired", TimeoutError("the store is too slow"))
            raise _Abort()
        if now >= self._lease_expires - self.lease_ttl / 2:
            await self._write_lease()

    # -- listing, merging ---------------------------------------------------

    async def _list(self) -> _Listing:
        listing = _Listing()
        token: str | None = None
        seen = 0
        while True:
            await self._checkpoint()
            try:
                page, token = await self.objects.list_page("", token)
            except Exception as error:
                self._failed("listing the prefix", error)
                raise _Abort() from error
            for info in page:
                seen += 1
                listing.total += info.size
                name = info.name
                if name.startswith(BLOBS) and _HEX.match(name[len(BLOBS):]):
                    listing.blobs[name[len(BLOBS):]] = _Blob(info.size, info.last_modified)
                elif _RECORD.match(name):
                    listing.records[name] = info.size
                elif name.startswith(ACCESS_PREFIX) and len(listing.batches) < MAX_BATCHES:
                    listing.batches.append((name, info.size))
                elif name == STATE:
                    listing.state_size = info.size
            if token is None:
                return listing
            if seen >= MAX_LISTED:
                listing.truncated = True
                log.warn(
                    "Shared tier: the prefix holds more than {count} objects;"
                    " this eviction pass works on the first {count}",
                    event="shared_evict_truncated",
                    count=seen,
                )
                return listing

    async def _read_state(self, size: int | None) -> _State:
        if size is not None and size > STATE_LIMIT:
            # Never read, so that no pass is stuck on it; written anew.
            self._invalid_state(f"{size} bytes, over {STATE_LIMIT}")
            return {}
        try:
            data = await self.objects.get_small(STATE, STATE_LIMIT)
        except Exception as error:
            self._failed("reading the merged access map", error)
            raise _Abort() from error
        if data is None:
            return {}
        try:
            blobs = json.loads(data)["blobs"]
            return {
                sha: (float(when), [r for r in records if _RECORD.match(r)])
                for sha, (when, records) in blobs.items()
                if _HEX.match(sha)
            }
        except (
            ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError,
        ) as error:
            self._invalid_state(str(error) or type(error).__name__)
            return {}

    def _invalid_state(self, why: str) -> None:
        log.warn(
            "Shared tier: the merged access map {name} is unusable ({why});"
            " starting a new one (blobs look as old as their LastModified)",
            event="shared_evict_state_invalid",
            name=STATE,
            why=why,
        )

    async def _merge(self, state: _State, batches: list[tuple[str, int]]) -> list[str]:
        """
        Merge ``batches`` into ``state``; the names of those merged (or
        unreadable: they are deleted with the merged ones).
        """
        merged: list[str] = []
        for name, size in batches:
            await self._checkpoint()
            if size > BATCH_LIMIT:
                self._invalid_batch(name, "too large")
                merged.append(name)
                continue
            try:
                data = await self.objects.get_small(name, BATCH_LIMIT)
            except Exception as error:
                self._failed(f"reading access batch {name}", error)
                continue  # the next pass tries it again
            if data is None:
                continue
            try:
                entries = json.loads(data)["entries"]
                if not isinstance(entries, list):
                    raise TypeError("entries is not a list")
                _merge_entries(state, entries[:MAX_ENTRIES], self.clock.seconds())
            except (
                ValueError, TypeError, KeyError, OverflowError, RecursionError,
            ) as error:
                # (A forged batch: a time too large for a float, nesting
                # too deep to parse.)  Deleted, or every pass stops on it.
                self._invalid_batch(name, str(error) or type(error).__name__)
                merged.append(name)
                continue
            merged.append(name)
            # Bounded as it grows, not only once every batch is in.
            _keep_recent(state, MAX_LISTED)
        return merged

    def _invalid_batch(self, name: str, why: str) -> None:
        log.warn(
            "Shared tier: access batch {name} is unusable ({why}); deleted",
            event="shared_access_batch_invalid",
            name=name,
            why=why,
        )

    def _prune(self, state: _State, listing: _Listing, started: float) -> None:
        """
        Forget blobs that are gone, except those used since shortly before
        this pass (a blob being published while the prefix was listed);
        keep at most ``MAX_LISTED`` entries, the most recently used.
        """
        recent = started - 2 * self.interval
        if not listing.truncated:
            for sha in [s for s, (when, _) in state.items() if s not in listing.blobs]:
                if state[sha][0] < recent:
                    del state[sha]
        _keep_recent(state, MAX_LISTED)

    # -- evicting -----------------------------------------------------------

    async def _evict(
        self, state: _State, listing: _Listing, merged: int, going: int
    ) -> EvictionReport:
        total = listing.total - going
        target = self.low_water * self.max_size
        evicted = evicted_bytes = records_deleted = failures = 0
        if total > self.max_size:
            def last_use(item: tuple[str, _Blob]) -> float:
                sha, blob = item
                used = state.get(sha)
                return max(blob.last_modified, used[0] if used else 0.0)

            for sha, blob in sorted(listing.blobs.items(), key=last_use):
                if total <= target:
                    break
                await self._checkpoint()
                records = state.get(sha, (0.0, []))[1]
                try:
                    for record in records:
                        if await self._delete_record(
                            record, sha, listing.records.get(record)
                        ):
                            records_deleted += 1
                            total -= listing.records.pop(record, 0)
                    await self.objects.delete(BLOBS + sha)
                except Exception as error:
                    # Another blob may go instead (one record of this one
                    # unreadable, say): a blob that always fails first
                    # must not stop eviction for good.
                    self._failed(f"deleting blob {sha}", error)
                    failures += 1
                    if failures >= MAX_DELETE_FAILURES:
                        break  # the merged map is still written; the rest waits
                    continue
                state.pop(sha, None)
                evicted += 1
                evicted_bytes += blob.size
                total -= blob.size
        return EvictionReport(
            blobs=len(listing.blobs),
            total=listing.total,
            evicted=evicted,
            evicted_bytes=evicted_bytes,
            records_deleted=records_deleted,
            batches_merged=merged,
        )

    async def _delete_record(self, record: str, sha: str, size: int | None) -> bool:
        """
        Delete ``record`` if it still names blob ``sha`` (or is not a
        record at all: one over ``RECORD_LIMIT``, as listed at ``size``
        bytes, no reader reads either): the key may have been published
        again since with another body (a rebuilt package), whose record
        must stay.
        """
        if size is not None and size > RECORD_LIMIT:
            await self.objects.delete(record)
            return True
        data = await self.objects.get_small(record, RECORD_LIMIT)
        if data is None:
            return False
        try:
            named = json.loads(data).get("sha256")
        except (ValueError, AttributeError, RecursionError):
            named = sha  # unreadable: no reader uses it either
        if named != sha:
            return False
        await self.objects.delete(record)
        return True

    async def _write_state(self, state: _State) -> bool:
        while True:
            data = json.dumps(
                {"v": 1, "node": self.node, "blobs": {s: [w, r] for s, (w, r) in state.items()}},
                separators=(",", ":"),
            ).encode()
            if len(data) <= STATE_LIMIT or not state:
                break
            # Too large to be read back: keep the more recently used half.
            keep = sorted(state.items(), key=lambda item: item[1][0])[len(state) // 2:]
            state.clear()
            state.update(keep)
        try:
            await self.objects.put_small(STATE, data)
        except Exception as error:
            self._failed("writing the merged access map", error)
            return False
        return True

    async def _delete_batches(self, names: Iterable[str]) -> None:
        for name in names:
            await self._checkpoint()
            try:
                await self.objects.delete(name)
            except Exception as error:
                # Merged again next pass: harmless.
                self._failed(f"deleting access batch {name}", error)
                return


def _merge_entries(state: _State, entries: list[object], now: float) -> None:
    """
    Fold access entries ``[sha256, record, size, unix_t]`` into ``state``;
    malformed entries are skipped.  A time after ``now`` (a node whose
    clock runs ahead) counts as ``now``: it cannot keep a blob young for
    longer than it is used.
    """
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 4:
            continue
        sha, record, _size, when = entry
        if not (isinstance(sha, str) and _HEX.match(sha)):
            continue
        if not isinstance(when, (int, float)) or isinstance(when, bool):
            continue
        last, records = state.get(sha, (0.0, []))
        if isinstance(record, str) and _RECORD.match(record) and record not in records:
            records = (records + [record])[-MAX_RECORDS_PER_BLOB:]
        state[sha] = (max(last, min(float(when), now)), records)


def _keep_recent(state: _State, most: int) -> None:
    """Keep the ``most`` most recently used blobs of ``state``."""
    if len(state) > most:
        keep = sorted(state.items(), key=lambda item: item[1][0])[-most:]
        state.clear()
        state.update(keep)
