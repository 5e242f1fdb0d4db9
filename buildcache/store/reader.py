"""
The reading half of the store: finding entries in the index (with the rows
of recent hits kept in memory), opening their bodies, and following what
other processes commit to the index.

A read-only store (:meth:`buildcache.store.Store.open` with
``read_only=True``, for worker processes and offline reads) is this half
alone at work: it takes no lock, leaves ``tmp/`` alone, and writes
nothing, while the writing store of the directory goes on beside it.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator

import attrs
from attrs import Factory, define, field, frozen
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from buildcache.store.layout import OBJECTS, file_path
from buildcache.store.objects import BlockingRunner, StoredObject, run_here
from buildcache.store.schema import (
    ENTRY_COLUMNS,
    KEYS_PER_STATEMENT,
    Entry,
    StoreError,
    entry_from_row,
)

#: Index rows kept in memory for hits before the lot is dropped, and the
#: most metadata bytes (see :func:`buildcache.store.metadata_size`) they
#: may hold: the server's, shared out among its processes
#: (:meth:`StoreReader.share_row_cache`).
ROWS_KEPT = 20_000
ROWS_BYTES_KEPT = 16 * 1024 * 1024


class ReadOnlyStore(StoreError):
    """
    A write was asked of a store opened read-only.
    """


@frozen
class StoreStats:
    """
    One consistent snapshot of the store's size.
    """

    entries: int
    #: Bodies and rows (metadata) together: what counts against max_size.
    bytes_stored: int
    max_size: int
    #: Of bytes_stored, the rows' part.
    bytes_metadata: int = 0
    #: Room held by bodies being written to tmp/ (also counted against
    #: max_size, not part of bytes_stored).
    bytes_downloading: int = 0


@define
class StoreReader:
    """
    Look-ups in a cache directory's index; see :class:`buildcache.store.Store`,
    which adds writing.
    """

    log = Logger()

    directory: str
    max_size: int
    clock: IReactorTime
    _db: sqlite3.Connection
    #: The directory lock held by a writing store; -1 when it holds none
    #: (read-only) or is closed.
    _lock_fd: int = -1
    #: Whether this store only reads (see the module docstring).
    read_only: bool = False
    #: Bytes of the stored bodies, and of their rows (metadata_size).
    total_size: int = 0
    metadata_bytes: int = 0
    entry_count: int = 0
    #: Room held by bodies being written (see :meth:`Store.reserve`).  Per
    #: process: workers sharing a directory would each hold their own
    #: against the same limit.
    reserved: int = 0
    _closed: bool = False
    _pending_access: dict[str, float] = Factory(dict)
    _data_version: int = -1
    #: Whether another process committed since the totals were read.
    _totals_behind: bool = True
    _rows: dict[str, Entry] = Factory(dict)
    _rows_bytes: int = 0
    #: Bumped whenever a row may have changed (see :meth:`changes`).
    _changes: int = 0
    #: This process's share of the row cache's bounds.
    rows_kept: int = ROWS_KEPT
    rows_bytes_kept: int = ROWS_BYTES_KEPT
    #: The last row given with its pending access time: (row, time, copy).
    _last_evolved: tuple[Entry, float, Entry] | None = None
    _objects_dir: str = ""
    #: Runs a blocking call (a body's fsync and rename) and gives its
    #: result: in a thread pool in the server, here and now by default.
    run_blocking: BlockingRunner = run_here
    #: This cache's secret (see :mod:`buildcache.store.layout`); never logged.
    secret: bytes = field(default=b"", repr=False)
    #: Told the count of the entries each eviction removed and the bytes
    #: they took against ``max_size`` (bodies and rows); the service
    #: passes it on to its observer.  The store itself counts nothing.
    on_evicted: Callable[[int, int], None] | None = None

    def _row(self, key: str) -> Entry | None:
        # Rows read on hits are kept in memory: every write to a row goes
        # through the writing store and drops it from here (see _forget),
        # and another process's writes clear it all (_follow_other_writers;
        # a read-only store, which sees only others' writes, asks at each
        # look-up: one pragma; the totals wait until asked for).
        if self.read_only:
            self._took_others_commits()
        entry = self._rows.get(key)
        if entry is None:
            row = self._db.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE key = ?", (key,),
            ).fetchone()
            if row is None:
                return None
            entry = entry_from_row(row, None)
            if (
                len(self._rows) >= self.rows_kept
                or self._rows_bytes + entry.meta_size > self.rows_bytes_kept
            ):
                self._rows.clear()
                self._rows_bytes = 0
            self._rows[key] = entry
            self._rows_bytes += entry.meta_size
        pending = self._pending_access.get(key)
        if pending is None:
            return entry
        # A hit looks its row up twice (the variants, then the body) with
        # the same access pending: one copy serves both.
        last = self._last_evolved
        if last is not None and last[0] is entry and last[1] == pending:
            return last[2]
        evolved = attrs.evolve(entry, last_access=pending)
        self._last_evolved = (entry, pending, evolved)
        return evolved

    def _forget(self, key: str) -> None:
        self._changes += 1
        entry = self._rows.pop(key, None)
        if entry is not None:
            self._rows_bytes -= entry.meta_size

    def _accessed(self, key: str) -> None:
        # A read-only store cannot write access times: it holds them for
        # take_accesses, and past ROWS_KEPT keys drops the new ones (the
        # entry then merely looks older than it is).
        if self.read_only and len(self._pending_access) >= ROWS_KEPT:
            if key not in self._pending_access:
                return
        self._pending_access[key] = self.clock.seconds()

    def accessed(self, key: str) -> None:
        """
        Record an access to ``key`` (as :meth:`lookup` does), for a caller
        that opened its file by a path it kept (see :meth:`changes`).
        """
        self._accessed(key)

    def changes(self) -> int:
        """
        A count that moves whenever a row may have changed since it was
        last read: this store's own writes, and (read at once by a
        read-only store, one pragma) another process's commits.  What was
        derived from rows while it stood still is still true.
        """
        if self.read_only:
            self._took_others_commits()
        return self._changes

    def take_accesses(self) -> dict[str, float]:
        """
        The access times recorded since the last call (key to time), for
        a read-only store's process to hand to the writing store's
        (:meth:`Store.record_accesses`); they are forgotten here.
        """
        taken, self._pending_access = self._pending_access, {}
        return taken

    def peek(self, key: str) -> Entry | None:
        """
        The entry stored under ``key``, without counting it as an access.
        """
        return self._row(key)

    def touch(self, key: str) -> Entry | None:
        """
        The entry stored under ``key``, recording the access (as
        :meth:`lookup` does) without opening its file.
        """
        entry = self._row(key)
        if entry is not None:
            self._accessed(key)
        return entry

    def lookup(self, key: str) -> StoredObject | None:
        """
        Open the object stored under ``key`` and record the access.

        The access time is batched in memory: a hit costs no disk write.
        """
        entry = self._row(key)
        if entry is None:
            return None
        try:
            fd = os.open(self._file_path(entry.file), os.O_RDONLY)
        except FileNotFoundError:
            self._file_missing(entry)
            return None
        self._accessed(key)
        return StoredObject(entry, fd)

    def _file_path(self, name: str) -> str:
        # file_path without os.path.join on every hit (same result for the
        # names the store writes).
        if not self._objects_dir:
            self._objects_dir = os.path.join(self.directory, OBJECTS)
        if name[:1] == "/":
            return file_path(self.directory, name)
        return f"{self._objects_dir}/{name[:2]}/{name}"

    def _file_missing(self, entry: Entry) -> None:
        """
        ``entry``'s row names a file that is not there: removed since by
        the writing store, which a read-only store leaves to it.
        """
        self._forget(entry.key)

    def object_path(self, key: str) -> str | None:
        """
        The file holding ``key``'s current body, or None.
        """
        entry = self._row(key)
        return None if entry is None else file_path(self.directory, entry.file)

    def keys(self) -> Iterator[Entry]:
        """
        Every entry, in no particular order (for admin tools and tests).
        """
        for row in self._db.execute(f"SELECT {ENTRY_COLUMNS} FROM entries").fetchall():
            yield entry_from_row(row, self._pending_access.get(row[0]))

    def entries_under(self, prefix: str, limit: int = -1) -> list[Entry]:
        """
        The entries whose keys start with ``prefix``, in key order: every
        one, or the first ``limit`` (the variants of one key are a few).
        """
        # The primary key's index answers a range; LIKE would need escaping.
        rows = self._db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE key >= ? AND key < ?"
            " ORDER BY key LIMIT ?",
            (prefix, prefix + "\U0010ffff", limit),
        ).fetchall()
        return [
            entry_from_row(row, self._pending_access.get(row[0]))
            for row in rows if row[0].startswith(prefix)
        ]

    def keys_matching(
        self, prefix: str, pattern: str, limit: int, exclude: str | None = None
    ) -> list[str]:
        """
        The first ``limit`` keys, in key order, that start with ``prefix``
        and match the SQLite ``GLOB`` ``pattern`` but not ``exclude``: keys
        only, for a bounded listing (the status page's stored images) that
        must not read whole rows.
        """
        query = "SELECT key FROM entries WHERE key >= ? AND key < ? AND key GLOB ?"
        arguments: list[object] = [prefix, prefix + "\U0010ffff", pattern]
        if exclude is not None:
            query += " AND key NOT GLOB ?"
            arguments.append(exclude)
        rows = self._db.execute(query + " ORDER BY key LIMIT ?", (*arguments, limit))
        return [key for (key,) in rows if key.startswith(prefix)]

    def peek_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        """
        The entries stored under those of ``keys`` that have one, without
        counting an access; a few statements however many keys.
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Entry] = {}
        for start in range(0, len(wanted), KEYS_PER_STATEMENT):
            batch = wanted[start : start + KEYS_PER_STATEMENT]
            marks = ", ".join("?" * len(batch))
            for row in self._db.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE key IN ({marks})", batch
            ):
                found[row[0]] = entry_from_row(row, self._pending_access.get(row[0]))
        return found

    def share_row_cache(self, processes: int) -> None:
        """
        Keep this process's share of the row cache's bounds, so that the
        ``processes`` of one server (``--workers``) hold at most
        :data:`ROWS_KEPT` rows and :data:`ROWS_BYTES_KEPT` bytes together.
        """
        processes = max(1, processes)
        self.rows_kept = max(1, ROWS_KEPT // processes)
        self.rows_bytes_kept = ROWS_BYTES_KEPT // processes
        self._rows.clear()
        self._rows_bytes = 0

    def _follow_other_writers(self) -> bool:
        """
        Take in what another process (the writing store, or ``buildcache
        purge`` or ``verify``) committed to the index: the rows kept are
        dropped, and the totals read again.  Whether the totals changed.
        """
        self._took_others_commits()
        if not self._totals_behind:
            return False
        return self._read_totals()

    def _took_others_commits(self) -> bool:
        """
        Whether another process committed to the index since the last
        call (then the rows kept are dropped, and the totals are behind):
        SQLite bumps ``data_version`` only for other connections' commits,
        so this costs one pragma.  A hit worker asks at each look-up, so
        it must not read the totals here: that is a pass over the whole
        index, after every batch the writing store commits.
        """
        try:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error as e:
            self.log.error("Cannot read the cache index: {error}", error=str(e))
            return False
        if version == self._data_version:
            return False
        self._data_version = version
        self._changes += 1
        self._rows.clear()
        self._rows_bytes = 0
        self._totals_behind = True
        return True

    def _read_totals(self) -> bool:
        try:
            count, total, meta = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(meta_size), 0)"
                " FROM entries"
            ).fetchone()
        except sqlite3.Error as e:
            self.log.error("Cannot read the cache index: {error}", error=str(e))
            return False
        self._totals_behind = False
        self.metadata_bytes = meta
        if (count, total) == (self.entry_count, self.total_size):
            return False
        if not self.read_only:
            self.log.info(
                "Index changed by another process: {entries} entries,"
                " {size} bytes (was {old_entries}, {old_size})",
                entries=count, size=total,
                old_entries=self.entry_count, old_size=self.total_size,
            )
        self.entry_count, self.total_size = count, total
        return True

    def stats(self) -> StoreStats:
        if self.read_only:
            self._follow_other_writers()
        return StoreStats(
            entries=self.entry_count,
            bytes_stored=self.total_size + self.metadata_bytes,
            max_size=self.max_size,
            bytes_metadata=self.metadata_bytes,
            bytes_downloading=self.reserved,
        )

    def _writable(self, what: str) -> None:
        if self.read_only:
            raise ReadOnlyStore(
                f"cannot {what}: the cache in {self.directory} was opened read-only"
            )

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._db.close()
