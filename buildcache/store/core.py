"""
The writing store: opening a cache directory (with its lock, or
read-only), room for bodies being written, publishing and replacing rows,
LRU eviction under a size limit, and batched access times.

An object becomes visible only after its body has been checked, fsynced and
renamed into ``objects/`` and its row committed.  The order (file first, row
second; row first, file second on removal, see
:func:`buildcache.store.maintenance.delete_rows`) means a crash leaves at
worst a file without a row, which opening the store removes.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
from collections.abc import Callable, Mapping

import attrs
from attrs import Factory, define
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from buildcache.store import maintenance
from buildcache.store.batch import BatchedCommits, PendingRow, PendingRows
from buildcache.store.layout import (
    LOCK_NAME,
    file_path,
    make_directories,
    place_object,
    unlink_quietly,
)
from buildcache.store.objects import (
    SPARE_TEMP_FILES,
    BackgroundHashes,
    BlockingRunner,
    ObjectWriter,
    object_limit,
    run_here,
    uncounted_limit,
)
from buildcache.store.reader import StoreReader
from buildcache.store.schema import (
    MAX_STORED_HEADERS,
    Entry,
    StoreError,
    cache_secret,
    headers_storable,
    metadata_size,
    open_index,
    open_index_read_only,
)
from buildcache.store.spare import SpareTemps


class _NothingToRename(Exception):
    """
    Rolls back :meth:`Store.rename_entry` when its entry is no longer there.
    """


@define
class Store(BatchedCommits, StoreReader):
    """
    The on-disk store shared by every front end.

    Open one with :meth:`open`; call :meth:`flush` now and then (the service
    does) to write batched access times, and :meth:`close` at shutdown.
    """

    #: Room held outside the limit (see :func:`uncounted_limit`).  Per
    #: process, like :attr:`reserved`.
    uncounted: int = 0
    #: The largest body kept (``--max-object-size``); 0: max_size.
    max_object_size: int = 0
    #: Temporary files, some made ahead of need (see :meth:`writer`).
    _spares: SpareTemps = attrs.field(
        default=Factory(lambda self: SpareTemps(self.directory), takes_self=True)
    )
    #: How body bytes reach the disk (``os.write``, ``os.fsync``); the
    #: fault tests replace them to make the disk fail.
    write_file: Callable[[int, memoryview], int] = os.write
    sync_file: Callable[[int], None] = os.fsync
    #: How many temporary files :meth:`writer` keeps ready, when
    #: ``run_blocking`` is not :func:`run_here`.
    spare_temp_files: int = SPARE_TEMP_FILES
    #: Seconds a new row may wait to be committed with others (see
    #: :mod:`buildcache.store.batch`); 0: each row is committed at once.
    commit_delay: float = 0.0
    _uncommitted: PendingRows = Factory(PendingRows)
    _commit_call: IDelayedCall | None = None
    #: Where bodies being written are hashed: beside the reactor when
    #: ``run_blocking`` is not :func:`run_here`; None: in the writer.
    hashes: BackgroundHashes | None = None

    @classmethod
    def open(
        cls, directory: str, max_size: int, clock: IReactorTime,
        run_blocking: BlockingRunner | None = None,
        max_object_size: int = 0,
        read_only: bool = False,
        on_evicted: Callable[[int, int], None] | None = None,
        commit_delay: float = 0.0,
    ) -> Store:
        """
        Open (creating if needed) the cache in ``directory`` and reconcile
        it with its index.  ``run_blocking`` is described on the class.

        Raises :class:`StoreError` with an explanation when the directory
        is unusable, locked by another server, or holds an index that is not
        a buildcache index or is corrupt.  Such an index is never deleted:
        it may belong to someone else.

        ``on_evicted`` is told of every eviction from the start (reopening
        with a lower ``max_size`` evicts at once); see :attr:`on_evicted`.

        With ``read_only``, the cache must exist already (a writing store
        made it): nothing is created, locked, cleaned, reconciled or
        migrated, and every write raises
        :class:`buildcache.store.ReadOnlyStore`.

        ``commit_delay``: see :attr:`commit_delay`.
        """
        directory = os.path.abspath(directory)
        if read_only:
            return cls._open_read_only(directory, max_size, clock, max_object_size)
        try:
            make_directories(directory)
            lock_fd = os.open(
                os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644
            )
        except OSError as e:
            raise StoreError(f"cannot use cache directory {directory}: {e}") from e
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(lock_fd)
            raise StoreError(
                f"cache directory {directory} is in use by another buildcache "
                "server; give each server its own --cache-dir"
            ) from e
        try:
            secret = cache_secret(directory)
            db = open_index(directory)
        except StoreError:
            os.close(lock_fd)
            raise
        store = cls(
            directory, max_size, clock, db, lock_fd, secret=secret,
            on_evicted=on_evicted,
        )
        store.max_object_size = max_object_size
        store.commit_delay = commit_delay
        if run_blocking is not None:
            store.run_blocking = run_blocking
            if run_blocking is not run_here:
                store.hashes = BackgroundHashes()
        try:
            store._reconcile()
        except (OSError, sqlite3.DatabaseError) as e:
            store.close()
            raise StoreError(f"cannot reconcile cache directory {directory}: {e}") from e
        return store

    @classmethod
    def _open_read_only(
        cls, directory: str, max_size: int, clock: IReactorTime, max_object_size: int
    ) -> Store:
        secret = cache_secret(directory, create=False)
        db = open_index_read_only(directory)
        store = cls(directory, max_size, clock, db, read_only=True, secret=secret)
        store.max_object_size = max_object_size
        store._follow_other_writers()
        return store

    def _file_missing(self, entry: Entry) -> None:
        if self.read_only:
            super()._file_missing(entry)
            return
        self.log.warn("Index row without a file for {key}; dropping it", key=entry.key)
        self._delete_rows([(entry.key, entry.size, entry.meta_size, entry.file)])

    # -- writing ---------------------------------------------------------

    def fits(self, size: int) -> bool:
        """
        Whether a body of ``size`` bytes may be kept at all.
        """
        return size <= object_limit(self.max_size, self.max_object_size)

    def used(self) -> int:
        """
        Bytes counted against ``max_size``: bodies, rows, and the room
        held by bodies being written.
        """
        return self.total_size + self.metadata_bytes + self.reserved

    def reserve(self, size: int, evict: bool = True, keep: str | None = None) -> bool:
        """
        Hold room for ``size`` more bytes of bodies being written in
        ``tmp/``, evicting stored entries (other than ``keep``'s, which
        the body would replace and which may still be served if its
        new body fails) to make it, as squid does; False (holding nothing)
        when the bodies being written would leave too little room even
        with nothing stored, when ``evict`` is false and the room is not
        free already, or when the index fails while evicting.
        """
        if size <= 0:
            return True
        self._writable("hold room for a body")
        if self.reserved + size > self.max_size:
            return False
        if not evict and self.used() + size > self.max_size:
            return False
        self.reserved += size
        try:
            self._evict(keep=keep)
        except sqlite3.Error as e:
            self.reserved -= size
            self.log.error(
                "Cannot make room for {size} bytes being written: {error};"
                " that body is not stored",
                event="reserve_failed", size=size, error=str(e),
            )
            return False
        return True

    def reserve_uncounted(self, size: int) -> bool:
        """
        Hold room for ``size`` more bytes outside the size limit, within
        :func:`uncounted_limit`; False (holding nothing) past it.
        """
        if self.uncounted + size > uncounted_limit(self.max_object_size):
            return False
        self.uncounted += size
        return True

    def release_uncounted(self, size: int) -> None:
        self.uncounted -= size

    def release(self, size: int) -> None:
        """
        Give back room held by :meth:`reserve`.
        """
        self.reserved -= size

    def writer(self, key: str, whole_digest: bool = True) -> ObjectWriter:
        """
        Start writing a new body for ``key``; nothing is visible until
        :meth:`ObjectWriter.commit`.  With a threaded ``run_blocking``
        its file is one made ahead there, when one is ready (see
        :mod:`buildcache.store.spare`).  Without ``whole_digest`` no
        sha256 of the body is taken, and none recorded with it.
        """
        self._writable("write a body")
        path, fd = self._spares.take()
        if self.run_blocking is not run_here:
            # Made here and now, a spare would cost what it saves.
            self._spares.refill(self.spare_temp_files, self.run_blocking)
        return ObjectWriter(self, key, path, fd, whole_digest)

    @property
    def _spare_temp(self) -> list[tuple[str, int]]:
        """The temporary files made ahead (path, descriptor)."""
        return self._spares.ready

    def _place(self, key: str, temp_path: str) -> str:
        return place_object(self.directory, key, temp_path)

    def _record(
        self, key: str, name: str, size: int, digest: str | None,
        headers: Mapping[str, str], source_digest: str | None = None,
    ) -> Entry:
        """
        Commit the row of a body already placed under ``name``.
        """
        final = file_path(self.directory, name)
        now = self.clock.seconds()
        headers_json = json.dumps(dict(headers))
        meta = metadata_size(key, headers_json)
        try:
            # No fsync of the directory: if a power loss forgets the rename
            # while the row survives, start-up drops the row without a file.
            # The file's own fsync (in commit) is what keeps a row from ever
            # naming a file of the right size with the wrong bytes.
            old = self._db.execute(
                "SELECT size, file, meta_size FROM entries WHERE key = ?", (key,)
            ).fetchone()
            # Opens the transaction, or joins the one open (see batch.py).
            self._db.execute(
                "INSERT OR REPLACE INTO entries (key, file, size, headers, sha256,"
                " fetched_at, validated_at, last_access, source_digest, meta_size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    key, name, size, headers_json, digest, now, now, now,
                    source_digest, meta,
                ),
            )
            if self.commit_delay <= 0:
                self._db.commit()
        except (OSError, sqlite3.Error) as e:
            # No row names the file: remove it now rather than at the next
            # start-up.  Rows waiting in the transaction went with it.
            self._roll_back()
            unlink_quietly(final)
            if isinstance(e, OSError):
                raise
            raise OSError(f"cannot record {key} in the cache index: {e}") from e
        self._pending_access.pop(key, None)
        self._forget(key)
        if old is None:
            self.entry_count += 1
        else:
            self.total_size -= old[0]
            self.metadata_bytes -= old[2]
            if self.commit_delay <= 0:
                # Readers of the old version keep their descriptors.
                unlink_quietly(file_path(self.directory, old[1]))
        if self.commit_delay > 0:
            full = self._uncommitted.add(PendingRow(key, name, size, meta, old))
            if full or old is not None:
                # A new version of a stored entry (an index that changed)
                # is committed at once: hit workers see only committed
                # rows, and would serve the old version meanwhile.  A new
                # key can wait; a worker hands its requests to this process.
                self.commit_pending()
            elif self._commit_call is None:
                self._commit_call = self.clock.callLater(
                    self.commit_delay, self.commit_pending
                )
        self.total_size += size
        self.metadata_bytes += meta
        self._evict(keep=key)
        return Entry(
            key, size, dict(headers), digest, now, now, now, name, source_digest,
            meta,
        )

    def mark_validated(
        self, key: str, headers: Mapping[str, str] | None = None
    ) -> Entry | None:
        """
        Record that the source confirmed the stored copy, merging any
        refreshed headers.
        """
        self._writable("mark an entry validated")
        entry = self._row(key)
        if entry is None:
            return None
        merged = dict(entry.headers)
        if headers:
            merged.update(headers)
        merged_json = json.dumps(merged)
        if not headers_storable(merged_json):
            self.log.warn(
                "Keeping the stored headers of {key}: the refreshed ones would"
                " take {header_bytes} bytes, more than the {limit} an entry may keep",
                event="headers_not_stored", key=key,
                header_bytes=len(merged_json), limit=MAX_STORED_HEADERS,
            )
            merged, merged_json = dict(entry.headers), json.dumps(dict(entry.headers))
        meta = metadata_size(key, merged_json)
        now = self.clock.seconds()
        self.commit_pending()
        with self._db:
            cursor = self._db.execute(
                "UPDATE entries SET validated_at = ?, headers = ?, meta_size = ?"
                " WHERE key = ? AND file = ?",
                (now, merged_json, meta, key, entry.file),
            )
        self._forget(key)
        if cursor.rowcount == 1:
            self.metadata_bytes += meta - entry.meta_size
            self._evict(keep=key)
        return attrs.evolve(entry, headers=merged, validated_at=now, meta_size=meta)

    def remove(self, key: str) -> bool:
        self._writable("remove an entry")
        entry = self._row(key)
        if entry is None:
            return False
        self._delete_rows([(key, entry.size, entry.meta_size, entry.file)])
        return True

    def remove_entry(self, entry: Entry) -> bool:
        """
        Remove ``entry`` if its key still holds that version (not one
        stored since); whether it did.
        """
        self._writable("remove an entry")
        before = self.entry_count
        self._delete_rows([(entry.key, entry.size, entry.meta_size, entry.file)])
        return self.entry_count < before

    def rename_entry(self, entry: Entry, new_key: str) -> Entry | None:
        """
        Move ``entry`` to ``new_key`` in one transaction, if its key still
        holds that version, replacing whatever ``new_key`` held; the entry
        under its new key, or None when ``entry`` is gone or was replaced.
        Its file stays where it is: file names are unique per version
        (:func:`object_name`), so a later body for the old key never
        overwrites it.
        """
        self._writable("rename an entry")
        self.commit_pending()
        self._forget(entry.key)
        self._forget(new_key)
        replaced = self._db.execute(
            "SELECT size, file FROM entries WHERE key = ?", (new_key,)
        ).fetchone()
        try:
            with self._db:
                if replaced is not None:
                    self._db.execute("DELETE FROM entries WHERE key = ?", (new_key,))
                moved = self._db.execute(
                    "UPDATE entries SET key = ? WHERE key = ? AND file = ?",
                    (new_key, entry.key, entry.file),
                ).rowcount
                if moved != 1:
                    raise _NothingToRename()
        except _NothingToRename:
            return None
        except sqlite3.Error as e:
            self.log.error(
                "Cannot rename {key} in the cache index: {error}",
                key=entry.key, error=str(e),
            )
            return None
        if replaced is not None:
            self.total_size -= replaced[0]
            self.entry_count -= 1
            unlink_quietly(file_path(self.directory, replaced[1]))
        self._pending_access.pop(new_key, None)
        self._pending_access[new_key] = self._pending_access.pop(
            entry.key, self.clock.seconds()
        )
        return self._row(new_key)

    def set_source_digest(self, entry: Entry, source_digest: str) -> None:
        """
        Record the source digest of ``entry`` found after it was stored,
        if its key still holds that version.
        """
        self._writable("record a source digest")
        self.commit_pending()
        self._forget(entry.key)
        with self._db:
            self._db.execute(
                "UPDATE entries SET source_digest = ? WHERE key = ? AND file = ?",
                (source_digest, entry.key, entry.file),
            )

    def _delete_rows(self, victims: list[tuple[str, int, int, str]]) -> None:
        """
        Delete rows (key, body size, metadata size, file) and their files.
        """
        self.commit_pending()
        for victim in victims:
            self._forget(victim[0])
        deleted = maintenance.delete_rows(
            self._db, self.directory, victims, lambda victim: (victim[0], victim[3])
        )
        for key, size, meta, _ in deleted:
            self._pending_access.pop(key, None)
            self.total_size -= size
            self.metadata_bytes -= meta
            self.entry_count -= 1

    def _evict(self, keep: str | None = None) -> None:
        """
        Remove least recently used entries until bodies, rows and the room
        held for bodies being written fit, telling :attr:`on_evicted`.

        Readers holding a descriptor keep reading: unlinking does not cut
        an open file short.
        """
        if self.used() <= self.max_size:
            return
        self.flush()
        while self.used() > self.max_size:
            rows = self._db.execute(
                "SELECT key, size, meta_size, file FROM entries WHERE key != ?"
                " ORDER BY last_access LIMIT 64",
                (keep or "",),
            ).fetchall()
            if not rows:
                break
            victims = []
            excess = self.used() - self.max_size
            for key, size, meta, name in rows:
                victims.append((key, size, meta, name))
                excess -= size + meta
                if excess <= 0:
                    break
            self._delete_rows(victims)
            for key, size, meta, _ in victims:
                self.log.info(
                    "Evicted {key} ({size} bytes)", key=key, size=size,
                    metadata_bytes=meta,
                )
            if self.on_evicted is not None:
                self.on_evicted(len(victims), sum(v[1] + v[2] for v in victims))

    def set_max_size(self, max_size: int) -> None:
        self.max_size = max_size
        if not self.read_only:
            self._evict()

    # -- housekeeping ----------------------------------------------------

    def flush(self) -> None:
        """
        Write batched access times in one transaction (no fsync in WAL mode
        with synchronous=NORMAL).  A read-only store only takes in what
        the writing store committed; its access times wait for
        :meth:`take_accesses`.
        """
        self._follow_other_writers()
        if not self.read_only:
            self.commit_pending()
        if not self._pending_access or self.read_only:
            return
        pending, self._pending_access = self._pending_access, {}
        try:
            # Kept rows take their new access time rather than being
            # dropped: dropping them would send the next hit of each of
            # them to SQLite.
            for key, when in pending.items():
                kept = self._rows.get(key)
                if kept is not None:
                    self._rows[key] = attrs.evolve(kept, last_access=when)
            with self._db:
                self._db.executemany(
                    "UPDATE entries SET last_access = ? WHERE key = ?",
                    [(when, key) for key, when in pending.items()],
                )
        except sqlite3.Error as e:
            # A full or failing disk: keep the times for the next flush,
            # and keep serving (this runs from a timer that would stop for
            # good on an exception).
            for key, when in pending.items():
                self._pending_access.setdefault(key, when)
            self.log.error(
                "Cannot write access times to the cache index: {error}",
                error=str(e),
            )

    def record_accesses(self, accesses: Mapping[str, float]) -> None:
        """
        Take in access times another process's read-only store recorded
        (see :meth:`StoreReader.take_accesses`), so that eviction follows
        its hits too; written with the next :meth:`flush`.
        """
        self._writable("record access times")
        for key, when in accesses.items():
            if when > self._pending_access.get(key, float("-inf")):
                self._pending_access[key] = when

    def _follow_other_writers(self) -> bool:
        changed = super()._follow_other_writers()
        if changed and not self.read_only:
            self._evict()
        return changed

    def close(self) -> None:
        if self._closed:
            return
        if self.read_only:
            super().close()
            return
        if self.hashes is not None:
            self.hashes.close()
        self._spares.close()
        self.flush()
        super().close()
        os.close(self._lock_fd)
        self._lock_fd = -1

    def _reconcile(self) -> None:
        """
        Bring files and rows into agreement without reading any body (see
        :func:`buildcache.store.maintenance.reconcile`), then evict down
        to the size limit.
        """
        totals = maintenance.reconcile(self._db, self.directory, self.log)
        self.entry_count, self.total_size, self.metadata_bytes = totals
        self._evict()
