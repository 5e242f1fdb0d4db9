"""
Operations on a cache directory as a whole: removing rows and their files
in the crash-safe order, reconciling files with rows when the writing
store opens, and the offline operations of the ``buildcache`` command
(:class:`OfflineIndex`: totals, stats by kind, purge, and re-hashing every
body), which work whether or not a server uses the directory.

Removing an entry follows the store's crash-safe order: the row goes first,
in a transaction that deletes it only if it still names the same file (the
server may have replaced or evicted it meanwhile), then the file.  A server
streaming that file keeps its open descriptor, and its next look-up of the
key finds no row and fetches the object again.  The server's in-memory
totals (entries, bytes) learn of such removals when it re-reads them from
the index.

What a key means (its kind, its project) is not the store's business: the
callers pass it in (``kind_of``, ``matches``).
"""

from __future__ import annotations

import fcntl
import hashlib
import heapq
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import Protocol, TypeVar

from attrs import frozen
from twisted.logger import Logger

from buildcache.store.layout import (
    INDEX_NAME,
    LOCK_NAME,
    OBJECTS,
    remove_foreign,
    safe_file_path,
    temp_directory,
    unlink_quietly,
)
from buildcache.store.schema import (
    ENTRY_COLUMNS,
    SCHEMA_VERSION,
    Entry,
    StoreError,
    entry_from_row,
    migrate_index,
    open_existing_index,
)

log = Logger()

#: Seconds an offline write waits for the server's transaction to end.
BUSY_TIMEOUT = 30.0
#: Rows read, or deleted, per statement or transaction: keeps every
#: transaction short so the server is never held up.
BATCH_SIZE = 500
#: Bytes read at a time when hashing a body.
CHUNK_SIZE = 1024 * 1024
#: How many of the largest entries :func:`collect_stats` keeps.
LARGEST_COUNT = 10

_V = TypeVar("_V")


def delete_rows(
    db: sqlite3.Connection,
    directory: str,
    victims: Sequence[_V],
    identify: Callable[[_V], tuple[str, str]],
) -> list[_V]:
    """
    Delete the rows of ``victims`` (``identify`` gives each one's key and
    file) in one transaction, each only while it still names that file,
    then their files; the victims whose rows were deleted.
    """
    deleted: list[_V] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        for victim in victims:
            key, name = identify(victim)
            cursor = db.execute(
                "DELETE FROM entries WHERE key = ? AND file = ?", (key, name)
            )
            if cursor.rowcount == 1:
                deleted.append(victim)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    for victim in deleted:
        path = safe_file_path(directory, identify(victim)[1])
        if path is not None:
            unlink_quietly(path)
    return deleted


def _entry_identity(entry: Entry) -> tuple[str, str]:
    return entry.key, entry.file


def reconcile(
    db: sqlite3.Connection, directory: str, logger: Logger = log
) -> tuple[int, int, int]:
    """
    Bring files and rows into agreement without reading any body: remove
    interrupted writes in ``tmp/``, files without rows, and rows whose
    file is missing or has the wrong size.  Only the writing store, which
    holds the directory's lock, may do this.  Returns the entries, body
    bytes and row bytes left.
    """
    started = time.monotonic()
    temp_dir = temp_directory(directory)
    removed_temp = 0
    for name in os.listdir(temp_dir):
        unlink_quietly(os.path.join(temp_dir, name))
        removed_temp += 1
    rows = {
        name: (key, size, meta, name)
        for key, name, size, meta in db.execute(
            "SELECT key, file, size, meta_size FROM entries"
        )
    }
    seen: set[str] = set()
    orphans = 0
    bad: list[tuple[str, int, int, str]] = []
    for fanout in os.scandir(os.path.join(directory, OBJECTS)):
        if not fanout.is_dir(follow_symlinks=False):
            continue
        for item in os.scandir(fanout.path):
            row = rows.get(item.name)
            if row is None:
                remove_foreign(item)
                orphans += 1
            elif item.stat(follow_symlinks=False).st_size != row[1]:
                bad.append(row)
            else:
                seen.add(item.name)
    missing = [row for name, row in rows.items() if name not in seen]
    # Rows of bad files and missing files are both dropped; delete_rows
    # also unlinks, which is harmless for a file that is not there.
    dropped = {row[0]: row for row in bad + missing}
    gone = (
        delete_rows(db, directory, list(dropped.values()), lambda r: (r[0], r[3]))
        if dropped else []
    )
    gone_keys = {row[0] for row in gone}
    kept = [row for row in rows.values() if row[0] not in gone_keys]
    entries = len(kept)
    size = sum(row[1] for row in kept)
    logger.info(
        "Cache {directory}: {entries} entries, {size} bytes; removed"
        " {temp} interrupted writes, {orphans} orphan files, {dropped}"
        " rows without a good file in {elapsed:.3f}s",
        directory=directory,
        entries=entries,
        size=size,
        temp=removed_temp,
        orphans=orphans,
        dropped=len(dropped),
        elapsed=time.monotonic() - started,
    )
    return entries, size, sum(row[2] for row in kept)


def _migrate_unless_served(
    db: sqlite3.Connection, path: str, version: int, directory: str
) -> None:
    """
    Bring an older index up to date, as the writing store does when it
    opens, but only when no server holds the directory: one still running
    is an older buildcache (a newer one would have migrated it), and would
    go on writing rows of its own schema into the migrated index.
    """
    if version > SCHEMA_VERSION:
        migrate_index(db, path)  # refuses, saying which versions it reads
        return
    lock_fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            raise StoreError(
                f"{path} has index schema version {version} and the server"
                " using it is an older buildcache; restart the server with"
                f" this version first (it brings the index to version"
                f" {SCHEMA_VERSION} at start-up)"
            ) from error
        migrate_index(db, path)
    finally:
        os.close(lock_fd)


@frozen
class OfflineIndex:
    """
    A cache directory's index opened without the server's lock, for the
    offline operations.

    Reads are paged (no long-lived read transaction holds back the
    server's WAL checkpoints); writes are short ``BEGIN IMMEDIATE``
    transactions that wait up to :data:`BUSY_TIMEOUT` for the server's.
    """

    directory: str
    _db: sqlite3.Connection

    @classmethod
    def open(cls, directory: str) -> OfflineIndex:
        """
        Open the index of the cache in ``directory``.

        Raises :class:`StoreError` when there is none, or when it is not a
        buildcache index of the version this buildcache reads.  Nothing is
        created: a wrong directory must not leave an empty cache behind.
        """
        directory = os.path.abspath(directory)
        try:
            db = open_existing_index(
                directory, "rw", partial(_migrate_unless_served, directory=directory),
                timeout=BUSY_TIMEOUT, isolation_level=None,
            )
        except StoreError as error:
            if os.path.isfile(os.path.join(directory, INDEX_NAME)):
                raise
            raise StoreError(
                f"{error}; pass the server's --cache-dir (the systemd unit's"
                " is /var/cache/buildcache)"
            ) from None
        return cls(directory, db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> OfflineIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def totals(self, with_digest_only: bool = False) -> tuple[int, int]:
        """
        The number of entries and their total body size in bytes.
        """
        where = " WHERE sha256 IS NOT NULL" if with_digest_only else ""
        count, size = self._db.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM entries{where}"
        ).fetchone()
        return int(count), int(size)

    def rows(self) -> Iterator[Entry]:
        """
        Every entry, in key order, read :data:`BATCH_SIZE` at a time.
        """
        batch = self._db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries ORDER BY key LIMIT ?", (BATCH_SIZE,)
        ).fetchall()
        while batch:
            for values in batch:
                yield entry_from_row(values, None)
            batch = self._db.execute(
                f"SELECT {ENTRY_COLUMNS} FROM entries WHERE key > ? ORDER BY key LIMIT ?",
                (batch[-1][0], BATCH_SIZE),
            ).fetchall()

    def row(self, key: str) -> Entry | None:
        """
        The entry stored under ``key``, or None.
        """
        values = self._db.execute(
            f"SELECT {ENTRY_COLUMNS} FROM entries WHERE key = ?", (key,)
        ).fetchone()
        return None if values is None else entry_from_row(values, None)

    def object_path(self, entry: Entry) -> str | None:
        """
        Where ``entry``'s body lives, or None for a file name that would
        lead out of ``objects/`` (never produced by the store).
        """
        return safe_file_path(self.directory, entry.file)

    def remove(self, entries: Iterable[Entry]) -> list[Entry]:
        """
        Remove entries, :data:`BATCH_SIZE` to a transaction, each only
        while its row still names the same file (an entry the server
        replaced or evicted meanwhile is left to the server); the entries
        removed.
        """
        removed: list[Entry] = []
        for batch in _batches(entries, BATCH_SIZE):
            gone = delete_rows(self._db, self.directory, batch, _entry_identity)
            for entry in gone:
                log.info(
                    "Removed {key} ({size} bytes) from {directory}",
                    key=entry.key, size=entry.size, directory=self.directory,
                )
            removed.extend(gone)
        return removed


def _batches(items: Iterable[_V], size: int) -> Iterator[list[_V]]:
    batch: list[_V] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- stats -----------------------------------------------------------------


@frozen
class KindTotal:
    entries: int = 0
    bytes: int = 0


@frozen
class CacheStats:
    """
    What is stored in one cache directory, summed up.
    """

    cache_dir: str
    entries: int
    #: Bodies and rows, as the server counts them against its size limit.
    bytes: int
    oldest: Entry | None
    newest: Entry | None
    largest: tuple[Entry, ...]
    kinds: Mapping[str, KindTotal]
    #: Of ``bytes``, the rows' part.
    metadata_bytes: int = 0

    def as_json(self) -> dict[str, object]:
        def described(entry: Entry | None) -> dict[str, object] | None:
            if entry is None:
                return None
            return {"key": entry.key, "size": entry.size, "fetched_at": entry.fetched_at}

        return {
            "cache_dir": self.cache_dir,
            "entries": self.entries,
            "bytes": self.bytes,
            "metadata_bytes": self.metadata_bytes,
            "oldest": described(self.oldest),
            "newest": described(self.newest),
            "largest": [{"key": entry.key, "size": entry.size} for entry in self.largest],
            "kinds": {
                kind: {"entries": total.entries, "bytes": total.bytes}
                for kind, total in self.kinds.items()
            },
        }


def collect_stats(
    index: OfflineIndex, kinds: Sequence[str], kind_of: Callable[[str], str]
) -> CacheStats:
    """
    Read every row once and sum it up by ``kind_of`` its key (one of
    ``kinds``, which gives their order); nothing is written.
    """
    entries = 0
    stored = 0
    metadata = 0
    oldest: Entry | None = None
    newest: Entry | None = None
    largest: list[tuple[int, str, Entry]] = []
    totals = {kind: [0, 0] for kind in kinds}
    for row in index.rows():
        entries += 1
        stored += row.size + row.meta_size
        metadata += row.meta_size
        if oldest is None or row.fetched_at < oldest.fetched_at:
            oldest = row
        if newest is None or row.fetched_at > newest.fetched_at:
            newest = row
        # The key breaks ties so that entries are never compared.
        item = (row.size, row.key, row)
        if len(largest) < LARGEST_COUNT:
            heapq.heappush(largest, item)
        else:
            heapq.heappushpop(largest, item)
        total = totals[kind_of(row.key)]
        total[0] += 1
        total[1] += row.size + row.meta_size
    return CacheStats(
        cache_dir=index.directory,
        entries=entries,
        bytes=stored,
        oldest=oldest,
        newest=newest,
        largest=tuple(row for _, _, row in sorted(largest, reverse=True)),
        kinds={kind: KindTotal(count, size) for kind, (count, size) in totals.items()},
        metadata_bytes=metadata,
    )


# -- purge -----------------------------------------------------------------


@frozen
class PurgeResult:
    """
    The entries ``purge`` removed (or, in a dry run, would remove).
    """

    rows: tuple[Entry, ...]
    dry_run: bool

    @property
    def bytes(self) -> int:
        return sum(row.size + row.meta_size for row in self.rows)


def purge(
    index: OfflineIndex, matches: Callable[[str], bool], dry_run: bool = False
) -> PurgeResult:
    """
    Remove every entry whose key ``matches``; with ``dry_run``, only list
    them.
    """
    chosen = [row for row in index.rows() if matches(row.key)]
    if dry_run:
        return PurgeResult(tuple(chosen), dry_run=True)
    return PurgeResult(tuple(index.remove(chosen)), dry_run=False)


# -- re-hashing bodies -----------------------------------------------------


class Progress(Protocol):
    """
    Told of the bodies :func:`verify_bodies` reads, for a progress display.
    """

    def start(self, name: str) -> None: ...

    def advance(self, count: int) -> None: ...

    def finished(self, name: str, size: int, note: str = "") -> None: ...


@frozen
class BodyCheck:
    """
    What :func:`verify_bodies` found; ``corrupt`` and ``missing`` were
    removed.
    """

    checked: int
    checked_bytes: int
    corrupt: tuple[tuple[Entry, str], ...]
    missing: tuple[Entry, ...]
    without_digest: int


def check_body(path: str, entry: Entry, progress: Progress | None = None) -> str | None:
    """
    Why the file at ``path`` is not ``entry``'s body, or None when it is.

    Raises FileNotFoundError when there is no file.
    """
    with open(path, "rb", buffering=0) as body:
        size = os.fstat(body.fileno()).st_size
        if size != entry.size:
            return f"{size} bytes, the index says {entry.size}"
        digest = hashlib.sha256()
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        while count := body.readinto(buffer):
            digest.update(view[:count])
            if progress is not None:
                progress.advance(count)
    found = digest.hexdigest()
    if found != (entry.sha256 or "").lower():
        return f"sha256 {found}, the index says {entry.sha256}"
    return None


#: Why the file at a path is not an entry's body (None when it is), read
#: with its progress shown; raises FileNotFoundError when there is no file.
BodyChecker = Callable[[str, Entry, Progress | None], str | None]


def verify_bodies(
    index: OfflineIndex,
    progress: Progress | None = None,
    each: Callable[[Entry], None] | None = None,
    own_check: Callable[[Entry], BodyChecker | None] | None = None,
) -> BodyCheck:
    """
    Re-hash every entry that has a known sha256 and remove those whose file
    is missing or differs; ``each`` is shown every entry on the way (for
    checks of the caller's own that follow).  An entry stored without a
    sha256 is checked by what ``own_check`` gives for it (an apk package:
    as its download was checked), if anything.

    An entry the server replaced or evicted while it was being checked is
    neither reported nor touched: the removal only deletes a row that
    still names the file that was checked.
    """
    checked = 0
    checked_bytes = 0
    without_digest = 0
    corrupt: list[tuple[Entry, str]] = []
    missing: list[Entry] = []
    for row in index.rows():
        if each is not None:
            each(row)
        checker: BodyChecker = check_body
        if row.sha256 is None:
            own = None if own_check is None else own_check(row)
            if own is None:
                without_digest += 1
                continue
            checker = own
        path = index.object_path(row)
        if progress is not None:
            progress.start(row.key)
        try:
            if path is None:
                raise FileNotFoundError(row.file)
            reason = checker(path, row, progress)
        except FileNotFoundError:
            if index.remove([row]):
                missing.append(row)
            if progress is not None:
                progress.finished(row.key, 0, "missing")
            continue
        checked += 1
        checked_bytes += row.size
        if progress is not None:
            progress.finished(row.key, row.size, "bad" if reason else "ok")
        if reason is not None and index.remove([row]):
            log.warn("Removed corrupt {key}: {reason}", key=row.key, reason=reason)
            corrupt.append((row, reason))
    return BodyCheck(checked, checked_bytes, tuple(corrupt), tuple(missing), without_digest)
