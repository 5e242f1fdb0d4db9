"""
The durable cache store: object files under the cache directory, their
metadata in an SQLite index, LRU eviction under a size limit, start-up
reconciliation, and the counters the status page reads.

Layout of a cache directory::

    index.sqlite        metadata (WAL mode), one row per stored object
    objects/ab/<name>   object bodies, <name> is the sha256 of the cache key
    tmp/                bodies being written, and a few empty files kept
                        ready for the next ones; emptied at start-up
    lock                held (flock) by the one server using the directory
    secret              random bytes (mode 0600), made once: the key of the
                        HMACs that name private entries and variants in
                        keys (see :func:`buildcache.fetch.fetcher.private_family`)

An object becomes visible only after its body has been checked, fsynced and
renamed into ``objects/`` and its row committed.  The order (file first, row
second; row first, file second on removal) means a crash leaves at worst a
file without a row, which start-up removes.

The store knows nothing about HTTP front ends: keys are opaque strings and
headers are an opaque mapping the front ends replay.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from typing import Any, TypeVar
from typing import Protocol as TypingProtocol

import attrs
from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from buildcache.turns import after_io

#: Index rows kept in memory for hits before the lot is dropped, and the
#: most metadata bytes (see :func:`metadata_size`) they may hold.  Per
#: process: each worker keeps its own.
ROWS_KEPT = 20_000
ROWS_BYTES_KEPT = 16 * 1024 * 1024
#: What a row costs against ``--max-size`` besides its key and headers: the
#: row and its index entries in SQLite, roughly.  A zero-byte body is not
#: free: without this a flood of them would grow ``index.sqlite`` unseen.
ROW_OVERHEAD = 256
#: The most header bytes (as stored, JSON) one entry may keep; a response
#: with more is served but not stored.
MAX_STORED_HEADERS = 64 * 1024
#: Temporary files kept ready for new bodies (see :meth:`Store.writer`).
SPARE_TEMP_FILES = 4
#: The least room, outside ``--max-size``, that bodies which must be checked
#: whole before anyone sees them (index pages, small packages) may take in
#: ``tmp/`` together when the limit leaves them none (see
#: :func:`uncounted_limit`).  Per process: each worker holds its own.
UNCOUNTED_LIMIT = 64 * 1024 * 1024
#: ``PRAGMA application_id`` of a buildcache index ("bcac").
APPLICATION_ID = 0x62636163
INDEX_NAME = "index.sqlite"
#: The first schema; newer ones are reached through :data:`MIGRATIONS`.
_SCHEMA = """
CREATE TABLE entries (
    key TEXT PRIMARY KEY,
    file TEXT NOT NULL,
    size INTEGER NOT NULL,
    headers TEXT NOT NULL,
    sha256 TEXT,
    fetched_at REAL NOT NULL,
    validated_at REAL NOT NULL,
    last_access REAL NOT NULL
);
CREATE INDEX entries_lru ON entries (last_access);
"""


@frozen
class Migration:
    """
    One step from an index schema version to the next: ``run`` changes the
    tables inside the transaction that also records the new version, so a
    crash leaves the old version or the new one, never half of a step.
    ``run`` may delete rows it cannot carry over (start-up then removes
    their files); it returns how many, for the log line.
    """

    name: str
    run: Callable[[sqlite3.Connection], int]


def _add_source_digest(db: sqlite3.Connection) -> int:
    # Unknown (NULL) for the rows already there: whoever checks them
    # against their source later fills it in or drops them.
    db.execute("ALTER TABLE entries ADD COLUMN source_digest TEXT")
    return 0


def _keys_name_their_scheme(db: sqlite3.Connection) -> int:
    """
    Version 1 keys were ``host[:port]/path?query`` for ``http://`` and
    ``https://`` alike.  Each becomes its ``http://`` key: a row a plain
    fetch may have written must never answer an ``https://`` mirror
    route unchecked; that route takes over a package file only once a
    digest it obtained over https matches (see
    :func:`buildcache.fetch.fetcher.http_twin`), and fetches the rest again.  (A port written in the old
    key stays: it was not the default of the scheme that fetched it, and
    a ``:443`` is not the default of ``http://``.)  The index's own page
    keys (``simple-page|<upstream URL>|<name>``, ``simple-root|...``)
    already name their upstream's scheme and stay as they are.
    """
    db.execute(
        "UPDATE entries SET key = 'http://' || key"
        " WHERE key NOT LIKE 'simple-page|%' AND key NOT LIKE 'simple-root|%'"
    )
    return 0


#: In order: step ``i`` takes version ``i + 1`` to ``i + 2``.  A new index
#: is created at version 1 and goes through the same steps, so there is
#: one way to every version.
MIGRATIONS: tuple[Migration, ...] = (
    Migration("cache keys name their scheme", _keys_name_their_scheme),
    Migration("record the digest an object's source gave", _add_source_digest),
    Migration("metadata size", lambda db: _add_metadata_size(db)),
)
SCHEMA_VERSION = 1 + len(MIGRATIONS)


class StoreError(Exception):
    """
    The cache directory cannot be used; the message says why and what to do.
    """


class _NothingToRename(Exception):
    """
    Rolls back :meth:`Store.rename_entry` when its entry is no longer there.
    """


class IntegrityError(Exception):
    """
    A body did not match what was expected of it, and was not stored.
    """


class NoRoom(OSError):
    """
    A body being written cannot be kept: it is larger than an object may
    be, or the downloads in progress leave no room for it.  An ``OSError``
    so that its download goes on as one whose disk failed: streamed to the
    clients reading it, not stored.
    """


def metadata_size(key: str, headers_json: str) -> int:
    """
    What an entry's row costs against the size limit besides its body.
    """
    return ROW_OVERHEAD + len(key.encode("utf-8")) + len(headers_json.encode("utf-8"))


def headers_storable(headers_json: str) -> bool:
    """
    Whether an entry may keep these headers (see :data:`MAX_STORED_HEADERS`).
    """
    return len(headers_json.encode("utf-8")) <= MAX_STORED_HEADERS


def object_limit(max_size: int, max_object_size: int) -> int:
    """
    The largest body the store keeps: ``--max-object-size`` (0: no limit
    of its own), never more than the whole store.
    """
    if max_object_size <= 0:
        return max_size
    return min(max_size, max_object_size)


def uncounted_limit(max_object_size: int) -> int:
    """
    The most bytes that bodies spooled outside the size limit may hold
    together: the larger of ``--max-object-size`` and
    :data:`UNCOUNTED_LIMIT`.  A body that must be checked before it is
    served, and would take more, is refused rather than held.
    """
    return max(max_object_size, UNCOUNTED_LIMIT)


def mismatch(
    size: int, sha256: str, expected_size: int | None, expected_sha256: str | None
) -> str | None:
    """
    Why a body of ``size`` bytes with digest ``sha256`` is not the one
    expected, or None when it is.
    """
    if expected_size is not None and size != expected_size:
        return f"expected {expected_size} bytes, received {size}"
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        return f"expected sha256 {expected_sha256}, received {sha256}"
    return None


def object_name(key: str) -> str:
    """
    A new file name for a version of ``key``'s body: the key's digest
    (for the fan-out directory and for people looking) and a random part,
    so a new version never overwrites the file of the row still in force.
    """
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()
    return f"{digest}.{secrets.token_hex(6)}"


def _create_temp(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)


def _file_path(directory: str, name: str) -> str:
    return os.path.join(directory, "objects", name[:2], name)


def _make_fanout_directories(objects: str) -> None:
    """
    Create the 256 fan-out directories once, so that publishing a body
    never waits for a ``mkdir``.
    """
    present = set(os.listdir(objects))
    for prefix in range(256):
        name = f"{prefix:02x}"
        if name not in present:
            os.mkdir(os.path.join(objects, name))


_T = TypeVar("_T")


class BlockingRunner(TypingProtocol):
    """
    Runs ``call`` (which may block) and fires with its result.
    """

    def __call__(self, call: Callable[[], _T]) -> Deferred[_T]: ...


def run_here(call: Callable[[], _T]) -> Deferred[_T]:
    """
    The :class:`BlockingRunner` that runs ``call`` at once, in this thread.
    """
    return maybeDeferred(call)


def in_thread_pool(reactor: Any, pool: ThreadPool) -> BlockingRunner:
    """
    The :class:`BlockingRunner` of the server: ``pool``'s threads, once the
    responses of the current turn have gone out (waking a thread there
    would hold them up).  ``reactor`` provides ``IReactorTime`` and
    ``IReactorFromThreads``.
    """
    def run(call: Callable[[], _T]) -> Deferred[_T]:
        return after_io(reactor).addCallback(
            lambda _: deferToThreadPool(reactor, pool, call)
        )

    return run


@frozen
class Entry:
    """
    The metadata of one stored object.
    """

    key: str
    size: int
    headers: Mapping[str, str] = field(eq=False, hash=False)
    sha256: str | None
    fetched_at: float
    validated_at: float
    last_access: float
    file: str = field(default="", eq=False)
    #: The digest by which the source that vouched for this object (a
    #: repository index, say) identified it, in that source's notation;
    #: None when unknown (nothing vouched, or stored before it was kept).
    source_digest: str | None = None
    #: What the row costs besides the body (see :func:`metadata_size`).
    meta_size: int = field(default=0, eq=False)


@define
class StoredObject:
    """
    An open stored object: ``fd`` stays readable (``os.pread``) until
    :meth:`close`, even if the entry is evicted or replaced meanwhile.
    """

    entry: Entry
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@frozen
class StoreStats:
    """
    One consistent snapshot of the store's counters and size.
    """

    hits: int
    misses: int
    revalidations: int
    bytes_from_cache: int
    bytes_from_upstream: int
    evictions: int
    prefetches: int
    prefetch_hits: int
    entries: int
    #: Bodies and rows (metadata) together: what counts against max_size.
    bytes_stored: int
    max_size: int
    #: Of bytes_stored, the rows' part.
    bytes_metadata: int = 0
    #: Room held by downloads being written to tmp/ (also counted against
    #: max_size, not part of bytes_stored).
    bytes_downloading: int = 0


@define
class Counters:
    """
    Running totals since start-up, bumped by whoever serves a request.
    """

    hits: int = 0
    misses: int = 0
    revalidations: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    evictions: int = 0
    #: Files read ahead (see :mod:`buildcache.ecosystems.pypi.prefetch`), and how many of
    #: them clients asked for afterwards.
    prefetches: int = 0
    prefetch_hits: int = 0


class ObjectWriter:
    """
    Streams one body into a temporary file in the cache tree.

    The same descriptor is readable with ``os.pread`` while the body is
    still arriving, which is how concurrent clients of one download follow
    it; :meth:`reader_fd` hands out independent descriptors for them.
    """

    def __init__(self, store: Store, key: str, path: str, fd: int) -> None:
        self._store = store
        self.key = key
        self.path = path
        self._fd = fd
        self._hash = hashlib.sha256()
        self.size = 0
        self.closed = False
        #: Room held in the store for this body (see :meth:`Store.reserve`).
        self.reserved = 0
        #: Whether the room this body holds counts against the size limit;
        #: a body that must be checked whole before anyone sees it, and
        #: finds no room there, holds room outside it instead (see
        #: :meth:`uncount`).
        self.counted = True
        #: Whether making room for this body may evict stored entries: not
        #: for a body that will not be stored (see the fetcher).
        self.evicts = True

    def reserve(self, size: int) -> bool:
        """
        Hold room for a body of ``size`` bytes (its declared length);
        False, holding nothing more, when the store cannot keep it.
        """
        if size <= self.reserved:
            return True
        more = size - self.reserved
        if self.counted:
            held = self._store.fits(size) and self._store.reserve(
                more, evict=self.evicts, keep=self.key
            )
        else:
            held = self._store.reserve_uncounted(more)
        if not held:
            return False
        self.reserved = size
        return True

    def uncount(self) -> bool:
        """
        Hold the room for this body outside the size limit from now on
        (see :func:`uncounted_limit`); False when that is full too.
        """
        held = max(self.reserved, self.size)
        self._release()
        self.counted = False
        self._store.log.info(
            "No room under the size limit for {key}, which must be checked"
            " whole before it is served: holding it beside the limit",
            event="spooled_beside_limit", key=self.key, size=held,
        )
        return self.reserve(held)

    def _release(self) -> None:
        if self.counted:
            self._store.release(self.reserved)
        else:
            self._store.release_uncounted(self.reserved)
        self.reserved = 0

    def hash_state(self) -> Any:
        """
        A copy of the running digest of the bytes written so far.
        """
        return self._hash.copy()

    def write(self, data: bytes) -> None:
        """
        Append ``data``; an ``OSError`` (a full or failing disk, or
        :class:`NoRoom` for a body that outgrew what the store can hold)
        leaves :attr:`size` at the bytes written before this call.
        """
        needed = self.size + len(data)
        if needed > self.reserved and not self.reserve(needed):
            if not self.counted:
                raise NoRoom(
                    f"{needed} bytes would exceed the"
                    f" {uncounted_limit(self._store.max_object_size)} bytes the"
                    " cache holds of bodies being checked beside its limit"
                )
            raise NoRoom(
                f"{needed} bytes would exceed what the cache can keep"
                f" ({object_limit(self._store.max_size, self._store.max_object_size)}"
                " bytes an object, room left beside other downloads)"
            )
        view = memoryview(data)
        while view:
            written = self._store.write_file(self._fd, view)
            view = view[written:]
        self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str:
        """
        The digest of the bytes written so far.
        """
        return self._hash.hexdigest()

    def reader_fd(self) -> int:
        """
        A new descriptor on the body being written; the caller closes it.
        """
        return os.dup(self._fd)

    def check(
        self, expected_size: int | None = None, expected_sha256: str | None = None
    ) -> None:
        """
        Raise :class:`IntegrityError`, forgetting the body, when its size or
        digest differs from what was expected.
        """
        why = mismatch(self.size, self.sha256, expected_size, expected_sha256)
        if why is not None:
            self.abort()
            raise IntegrityError(why)

    def commit(
        self,
        headers: Mapping[str, str],
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        source_digest: str | None = None,
    ) -> Entry | None:
        """
        Check, fsync and publish the body under the writer's key, all
        before returning.

        Raises :class:`IntegrityError` (and stores nothing) when the size or
        digest differs from what was expected, and ``OSError`` (storing
        nothing either, and leaving no file behind) when the disk or the
        index refuses it. Returns ``None`` when the object is larger than
        the whole cache and so is not kept.  ``source_digest`` is recorded
        with the row (see :attr:`Entry.source_digest`).
        """
        self.check(expected_size, expected_sha256)
        if not self._keepable(headers):
            return None
        try:
            name = self._make_durable()
        finally:
            self._release()
        return self._store._record(
            self.key, name, self.size, self.sha256, headers, source_digest
        )

    async def persist(
        self, headers: Mapping[str, str], source_digest: str | None = None
    ) -> Entry | None:
        """
        Publish a body that has passed :meth:`check`, with the fsync and
        rename done by the store's ``run_blocking`` (a thread, in the
        server), so the reactor serves other requests meanwhile.  Raises
        and returns as :meth:`commit`.
        """
        if not self._keepable(headers):
            return None
        # From here the file belongs to the blocking call: abort() must
        # not close the descriptor under it.
        self.closed = True
        try:
            name = await self._store.run_blocking(self._make_durable)
        finally:
            self._release()
        return self._store._record(
            self.key, name, self.size, self.sha256, headers, source_digest
        )

    def _keepable(self, headers: Mapping[str, str]) -> bool:
        if not self._store.fits(self.size):
            self._store.log.info(
                "Not storing {key}: {size} bytes exceed the cache's object size limit",
                key=self.key,
                size=self.size,
            )
            self.abort()
            return False
        header_bytes = len(json.dumps(dict(headers)))
        if header_bytes > MAX_STORED_HEADERS:
            self._store.log.warn(
                "Not storing {key}: its headers take {header_bytes} bytes,"
                " more than the {limit} an entry may keep",
                event="headers_not_stored",
                key=self.key,
                header_bytes=header_bytes,
                limit=MAX_STORED_HEADERS,
            )
            self.abort()
            return False
        return True

    def _make_durable(self) -> str:
        """
        Fsync the body and move it to a new name under ``objects/``; the
        name, or ``OSError`` with nothing left behind.  Touches no shared
        state, so it may run in a thread.
        """
        self.closed = True
        try:
            self._store.sync_file(self._fd)
        except OSError:
            os.close(self._fd)
            _unlink_quietly(self.path)
            raise
        os.close(self._fd)
        return self._store._place(self.key, self.path)

    def abort(self) -> None:
        """
        Forget the body; descriptors from :meth:`reader_fd` stay readable.
        """
        self._release()
        if self.closed:
            return
        self.closed = True
        os.close(self._fd)
        _unlink_quietly(self.path)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


@define
class Store:
    """
    The on-disk store shared by every front end.

    Open one with :meth:`open`; call :meth:`flush` now and then (the service
    does) to write batched access times, and :meth:`close` at shutdown.
    """

    log = Logger()

    directory: str
    max_size: int
    clock: IReactorTime
    _db: sqlite3.Connection
    _lock_fd: int
    #: Bytes of the stored bodies, and of their rows (metadata_size).
    total_size: int = 0
    metadata_bytes: int = 0
    entry_count: int = 0
    #: Room held by bodies being written (see :meth:`reserve`).  Per
    #: process: workers sharing a directory would each hold their own
    #: against the same limit.
    reserved: int = 0
    #: Room held outside the limit (see :func:`uncounted_limit`).  Per
    #: process, like :attr:`reserved`.
    uncounted: int = 0
    #: The largest body kept (``--max-object-size``); 0: max_size.
    max_object_size: int = 0
    counters: Counters = Factory(Counters)
    _pending_access: dict[str, float] = Factory(dict)
    _temp_serial: int = 0
    #: Temporary files made ahead of need (see :meth:`writer`), and how
    #: many are being made.
    _spare_temp: list[tuple[str, int]] = Factory(list)
    _spare_coming: int = 0
    _data_version: int = -1
    _rows: dict[str, Entry] = Factory(dict)
    _rows_bytes: int = 0
    #: How body bytes reach the disk (``os.write``, ``os.fsync``); the
    #: fault tests replace them to make the disk fail.
    write_file: Callable[[int, memoryview], int] = os.write
    sync_file: Callable[[int], None] = os.fsync
    #: Runs a blocking call (a body's fsync and rename) and gives its
    #: result: in a thread pool in the server, here and now by default.
    run_blocking: BlockingRunner = run_here
    #: How many temporary files :meth:`writer` keeps ready, when
    #: ``run_blocking`` is not :func:`run_here`.
    spare_temp_files: int = SPARE_TEMP_FILES
    #: This cache's secret (see the module docstring); never logged.
    secret: bytes = field(default=b"", repr=False)

    @classmethod
    def open(
        cls, directory: str, max_size: int, clock: IReactorTime,
        run_blocking: BlockingRunner | None = None,
        max_object_size: int = 0,
    ) -> Store:
        """
        Open (creating if needed) the cache in ``directory`` and reconcile
        it with its index.  ``run_blocking`` is described on the class.

        Raises :class:`StoreError` with an explanation when the directory
        is unusable, locked by another server, or holds an index that is not
        a buildcache index or is corrupt.  Such an index is never deleted:
        it may belong to someone else.
        """
        directory = os.path.abspath(directory)
        try:
            for sub in ("objects", "tmp"):
                os.makedirs(os.path.join(directory, sub), exist_ok=True)
            _make_fanout_directories(os.path.join(directory, "objects"))
            lock_fd = os.open(
                os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o644
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
        store = cls(directory, max_size, clock, db, lock_fd, secret=secret)
        store.max_object_size = max_object_size
        if run_blocking is not None:
            store.run_blocking = run_blocking
        try:
            store._reconcile()
        except (OSError, sqlite3.DatabaseError) as e:
            store.close()
            raise StoreError(f"cannot reconcile cache directory {directory}: {e}") from e
        return store

    # -- reading ---------------------------------------------------------

    def _row(self, key: str) -> Entry | None:
        # Rows read on hits are kept in memory: every write to a row goes
        # through this object and drops it from here (see _forget), and
        # another process's writes clear it all (_follow_other_writers).
        entry = self._rows.get(key)
        if entry is None:
            row = self._db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE key = ?", (key,),
            ).fetchone()
            if row is None:
                return None
            entry = _entry_from_row(row, None)
            if (
                len(self._rows) >= ROWS_KEPT
                or self._rows_bytes + entry.meta_size > ROWS_BYTES_KEPT
            ):
                self._rows.clear()
                self._rows_bytes = 0
            self._rows[key] = entry
            self._rows_bytes += entry.meta_size
        pending = self._pending_access.get(key)
        if pending is not None:
            return attrs.evolve(entry, last_access=pending)
        return entry

    def _forget(self, key: str) -> None:
        entry = self._rows.pop(key, None)
        if entry is not None:
            self._rows_bytes -= entry.meta_size

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
            self._pending_access[key] = self.clock.seconds()
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
            fd = os.open(_file_path(self.directory, entry.file), os.O_RDONLY)
        except FileNotFoundError:
            self.log.warn("Index row without a file for {key}; dropping it", key=key)
            self._delete_rows([(key, entry.size, entry.meta_size, entry.file)])
            return None
        self._pending_access[key] = self.clock.seconds()
        return StoredObject(entry, fd)

    def object_path(self, key: str) -> str | None:
        """
        The file holding ``key``'s current body, or None.
        """
        entry = self._row(key)
        return None if entry is None else _file_path(self.directory, entry.file)

    def keys(self) -> Iterator[Entry]:
        """
        Every entry, in no particular order (for admin tools and tests).
        """
        for row in self._db.execute(f"SELECT {_ENTRY_COLUMNS} FROM entries").fetchall():
            yield _entry_from_row(row, self._pending_access.get(row[0]))

    def entries_under(self, prefix: str, limit: int = -1) -> list[Entry]:
        """
        The entries whose keys start with ``prefix``, in key order: every
        one, or the first ``limit`` (the variants of one URL are a few).
        """
        # The primary key's index answers a range; LIKE would need escaping.
        rows = self._db.execute(
            f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE key >= ? AND key < ?"
            " ORDER BY key LIMIT ?",
            (prefix, prefix + "\U0010ffff", limit),
        ).fetchall()
        return [
            _entry_from_row(row, self._pending_access.get(row[0]))
            for row in rows if row[0].startswith(prefix)
        ]

    def peek_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        """
        The entries stored under those of ``keys`` that have one, without
        counting an access; a few statements however many keys.
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, Entry] = {}
        for start in range(0, len(wanted), _KEYS_PER_STATEMENT):
            batch = wanted[start : start + _KEYS_PER_STATEMENT]
            marks = ", ".join("?" * len(batch))
            for row in self._db.execute(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE key IN ({marks})", batch
            ):
                found[row[0]] = _entry_from_row(row, self._pending_access.get(row[0]))
        return found

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
        download fails) to make it, as squid does; False (holding nothing)
        when the bodies being written would leave too little room even
        with nothing stored, when ``evict`` is false and the room is not
        free already, or when the index fails while evicting.
        """
        if size <= 0:
            return True
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
                "Cannot make room for {size} bytes being downloaded: {error};"
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

    def writer(self, key: str) -> ObjectWriter:
        """
        Start writing a new body for ``key``; nothing is visible until
        :meth:`ObjectWriter.commit`.

        Creating a file costs a journal write (a fraction of a millisecond
        on ext4) while a client waits for its miss, so with a threaded
        ``run_blocking`` the file comes from a few made ahead there, when
        one is ready.
        """
        if self._spare_temp:
            path, fd = self._spare_temp.pop()
        else:
            path = self._temp_path()
            fd = _create_temp(path)
        self._make_spare_temp()
        return ObjectWriter(self, key, path, fd)

    def _temp_path(self) -> str:
        self._temp_serial += 1
        return os.path.join(
            self.directory, "tmp", f"{os.getpid()}-{self._temp_serial}.part"
        )

    def _make_spare_temp(self) -> None:
        if self.run_blocking is run_here:
            # Made here and now, a spare would cost what it saves.
            return
        missing = self.spare_temp_files - len(self._spare_temp) - self._spare_coming
        for _ in range(missing):
            path = self._temp_path()
            self._spare_coming += 1

            def made(fd: int, path: str = path) -> None:
                self._spare_coming -= 1
                if self._lock_fd < 0:
                    # Closed meanwhile.
                    os.close(fd)
                    _unlink_quietly(path)
                else:
                    self._spare_temp.append((path, fd))

            def failed(failure: Failure) -> None:
                # A full or failing disk: writer() makes its own file and
                # meets the error there.
                self._spare_coming -= 1

            self.run_blocking(partial(_create_temp, path)).addCallbacks(made, failed)

    def _place(self, key: str, temp_path: str) -> str:
        """
        Rename a durable body to a new name under ``objects/``; the name.
        """
        name = object_name(key)
        final = _file_path(self.directory, name)
        try:
            try:
                os.rename(temp_path, final)
            except FileNotFoundError:
                # Its fan-out directory was removed since start-up.
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.rename(temp_path, final)
        except OSError:
            _unlink_quietly(temp_path)
            raise
        return name

    def _record(
        self, key: str, name: str, size: int, digest: str,
        headers: Mapping[str, str], source_digest: str | None = None,
    ) -> Entry:
        """
        Commit the row of a body already placed under ``name``.
        """
        final = _file_path(self.directory, name)
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
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO entries (key, file, size, headers, sha256,"
                    " fetched_at, validated_at, last_access, source_digest, meta_size)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key, name, size, headers_json, digest, now, now, now,
                        source_digest, meta,
                    ),
                )
        except (OSError, sqlite3.Error) as e:
            # No row names the file: remove it now rather than at the next
            # start-up.
            _unlink_quietly(final)
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
            # Readers of the old version keep their descriptors.
            _unlink_quietly(_file_path(self.directory, old[1]))
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
        Record that upstream confirmed the stored copy (a 304), merging
        any refreshed headers.
        """
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
        return Entry(
            key, entry.size, merged, entry.sha256, entry.fetched_at, now,
            entry.last_access, entry.file, entry.source_digest, meta,
        )

    def remove(self, key: str) -> bool:
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
            _unlink_quietly(_file_path(self.directory, replaced[1]))
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
        deleted = []
        for victim in victims:
            self._forget(victim[0])
        with self._db:
            for victim in victims:
                # Only rows still naming that file: ``buildcache purge`` may
                # have removed it, or the key may hold a newer version.
                cursor = self._db.execute(
                    "DELETE FROM entries WHERE key = ? AND file = ?",
                    (victim[0], victim[3]),
                )
                if cursor.rowcount == 1:
                    deleted.append(victim)
        for key, size, meta, name in deleted:
            self._pending_access.pop(key, None)
            _unlink_quietly(_file_path(self.directory, name))
            self.total_size -= size
            self.metadata_bytes -= meta
            self.entry_count -= 1

    def _evict(self, keep: str | None = None) -> None:
        """
        Remove least recently used entries until bodies, rows and the room
        held for bodies being written fit.

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
            self.counters.evictions += len(victims)
            for key, size, meta, _ in victims:
                self.log.info(
                    "Evicted {key} ({size} bytes)", key=key, size=size,
                    metadata_bytes=meta,
                )

    def set_max_size(self, max_size: int) -> None:
        self.max_size = max_size
        self._evict()

    # -- housekeeping ----------------------------------------------------

    def flush(self) -> None:
        """
        Write batched access times in one transaction (no fsync in WAL mode
        with synchronous=NORMAL).
        """
        self._follow_other_writers()
        if not self._pending_access:
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

    def _follow_other_writers(self) -> None:
        """
        Take in what another process (``buildcache purge`` or ``verify``)
        committed to the index: SQLite bumps ``data_version`` only for
        other connections' commits, so this costs one pragma when nothing
        happened.
        """
        try:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return
            self._data_version = version
            self._rows.clear()
            self._rows_bytes = 0
            count, total, meta = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(meta_size), 0)"
                " FROM entries"
            ).fetchone()
        except sqlite3.Error as e:
            self.log.error("Cannot read the cache index: {error}", error=str(e))
            return
        self.metadata_bytes = meta
        if (count, total) != (self.entry_count, self.total_size):
            self.log.info(
                "Index changed by another process: {entries} entries,"
                " {size} bytes (was {old_entries}, {old_size})",
                entries=count, size=total,
                old_entries=self.entry_count, old_size=self.total_size,
            )
            self.entry_count, self.total_size = count, total
            self._evict()

    def close(self) -> None:
        if self._lock_fd < 0:
            return
        spare, self._spare_temp = self._spare_temp, []
        for path, fd in spare:
            os.close(fd)
            _unlink_quietly(path)
        self.flush()
        self._db.close()
        os.close(self._lock_fd)
        self._lock_fd = -1

    def stats(self) -> StoreStats:
        c = self.counters
        return StoreStats(
            hits=c.hits,
            misses=c.misses,
            revalidations=c.revalidations,
            bytes_from_cache=c.bytes_from_cache,
            bytes_from_upstream=c.bytes_from_upstream,
            evictions=c.evictions,
            prefetches=c.prefetches,
            prefetch_hits=c.prefetch_hits,
            entries=self.entry_count,
            bytes_stored=self.total_size + self.metadata_bytes,
            max_size=self.max_size,
            bytes_metadata=self.metadata_bytes,
            bytes_downloading=self.reserved,
        )

    def _reconcile(self) -> None:
        """
        Bring files and rows into agreement without reading any body:
        remove interrupted writes, files without rows, and rows whose file
        is missing or has the wrong size.
        """
        started = time.monotonic()
        temp_dir = os.path.join(self.directory, "tmp")
        removed_temp = 0
        for name in os.listdir(temp_dir):
            _unlink_quietly(os.path.join(temp_dir, name))
            removed_temp += 1
        rows = {
            name: (key, size, meta, name)
            for key, name, size, meta in self._db.execute(
                "SELECT key, file, size, meta_size FROM entries"
            )
        }
        seen: set[str] = set()
        orphans = 0
        bad: list[tuple[str, int, int, str]] = []
        objects = os.path.join(self.directory, "objects")
        for fanout in os.scandir(objects):
            if not fanout.is_dir(follow_symlinks=False):
                continue
            for item in os.scandir(fanout.path):
                row = rows.get(item.name)
                if row is None:
                    _remove_foreign(item)
                    orphans += 1
                elif item.stat(follow_symlinks=False).st_size != row[1]:
                    bad.append(row)
                else:
                    seen.add(item.name)
        missing = [row for name, row in rows.items() if name not in seen]
        # Rows of bad files and missing files are both dropped; _delete_rows
        # also unlinks, which is harmless for a file that is not there.
        dropped = {row[0]: row for row in bad + missing}
        self.entry_count = len(rows)
        self.total_size = sum(row[1] for row in rows.values())
        self.metadata_bytes = sum(row[2] for row in rows.values())
        if dropped:
            self._delete_rows(list(dropped.values()))
        self.log.info(
            "Cache {directory}: {entries} entries, {size} bytes; removed"
            " {temp} interrupted writes, {orphans} orphan files, {dropped}"
            " rows without a good file in {elapsed:.3f}s",
            directory=self.directory,
            entries=self.entry_count,
            size=self.total_size,
            temp=removed_temp,
            orphans=orphans,
            dropped=len(dropped),
            elapsed=time.monotonic() - started,
        )
        self._evict()


def _remove_foreign(item: os.DirEntry[str]) -> None:
    """
    Remove something in ``objects/`` that no row names (an interrupted
    publish, or debris); a stray directory goes too, being ours by place.
    """
    if item.is_dir(follow_symlinks=False):
        shutil.rmtree(item.path, ignore_errors=True)
    else:
        _unlink_quietly(item.path)


#: The columns :func:`_entry_from_row` reads, in its order.
_ENTRY_COLUMNS = (
    "key, size, headers, sha256, fetched_at, validated_at, last_access, file,"
    " source_digest, meta_size"
)
#: Keys per ``IN (...)`` list: well under SQLite's limit on parameters.
_KEYS_PER_STATEMENT = 500


def _entry_from_row(row: tuple[Any, ...], pending_access: float | None) -> Entry:
    (
        key, size, headers, sha256, fetched_at, validated_at, last_access, file,
        source_digest, meta,
    ) = row
    return Entry(
        key=key,
        size=size,
        headers=json.loads(headers),
        sha256=sha256,
        fetched_at=fetched_at,
        validated_at=validated_at,
        last_access=pending_access if pending_access is not None else last_access,
        file=file,
        source_digest=source_digest,
        meta_size=meta,
    )


def _add_metadata_size(db: sqlite3.Connection) -> int:
    """
    Schema 2: each row records what it costs besides its body (see
    :func:`metadata_size`), so that headers count against ``--max-size``.
    Rows whose headers are over :data:`MAX_STORED_HEADERS` are dropped (a
    newer server would not have stored them); the count of them.
    """
    db.execute("ALTER TABLE entries ADD COLUMN meta_size INTEGER NOT NULL DEFAULT 0")
    dropped = db.execute(
        "DELETE FROM entries WHERE length(CAST(headers AS BLOB)) > ?",
        (MAX_STORED_HEADERS,),
    ).rowcount
    db.execute(
        "UPDATE entries SET meta_size ="
        " ? + length(CAST(key AS BLOB)) + length(CAST(headers AS BLOB))",
        (ROW_OVERHEAD,),
    )
    return int(dropped)


SECRET_NAME = "secret"
SECRET_SIZE = 32


def cache_secret(directory: str) -> bytes:
    """
    The secret of the cache in ``directory``, made (with :mod:`secrets`,
    mode 0600) on first use: written whole and synced in ``tmp/`` (which
    start-up empties, should a crash leave one there), renamed into place,
    and the rename synced, so a power loss cannot take back a secret that
    entries were named with.  A secret that is not whole is replaced, with
    a warning: the private entries and variants named with the old one are
    then never found, and age out.  One others may read is made private.
    """
    path = os.path.join(directory, SECRET_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if os.fstat(fd).st_mode & 0o077:
                os.fchmod(fd, 0o600)
                _log.warn(
                    "The cache secret {path} could be read by other users;"
                    " it is now private (mode 0600)", path=path,
                )
            secret = os.read(fd, SECRET_SIZE + 1)
        finally:
            os.close(fd)
        if len(secret) == SECRET_SIZE:
            return secret
        _log.warn(
            "The cache secret {path} is not whole ({size} bytes); making a"
            " new one: entries private to a client's credentials, and"
            " variants, are fetched again", path=path, size=len(secret),
        )
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StoreError(f"cannot read the cache secret {path}: {e}") from e
    secret = secrets.token_bytes(SECRET_SIZE)
    temp = os.path.join(directory, "tmp", f"{SECRET_NAME}.{secrets.token_hex(6)}")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, secret)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, path)
        directory_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)
    except OSError as e:
        _unlink_quietly(temp)
        raise StoreError(f"cannot create the cache secret {path}: {e}") from e
    return secret


def open_index(directory: str) -> sqlite3.Connection:
    """
    Open or create the SQLite index of a cache directory.

    An index that is corrupt or belongs to another program is refused with
    a :class:`StoreError` naming the file: buildcache does not delete what
    it cannot identify.
    """
    path = os.path.join(directory, INDEX_NAME)
    advice = (
        f"move {path} aside (buildcache then starts with an empty index and"
        " removes the object files it no longer knows)"
    )
    try:
        db = sqlite3.connect(path)
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        tables = [
            name for (name,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'"
            )
        ]
    except sqlite3.DatabaseError as e:
        db.close()
        raise StoreError(f"{path} is not a readable SQLite database ({e}); {advice}") from e
    created = application_id == 0 and not tables
    if created:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            # One transaction: a crash cannot leave tables without the
            # application id that marks them as ours.
            db.executescript(
                "BEGIN;" + _SCHEMA + f"PRAGMA application_id = {APPLICATION_ID};"
                " PRAGMA user_version = 1; COMMIT;"
            )
        except sqlite3.DatabaseError as e:
            db.close()
            raise StoreError(f"cannot create the cache index {path}: {e}") from e
    elif application_id != APPLICATION_ID:
        db.close()
        raise StoreError(f"{path} is not a buildcache index (it belongs to another program); {advice}")
    try:
        migrate_index(db, path, advice, quiet=created)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreError(f"{path} is corrupt ({check}); {advice}")
    except sqlite3.DatabaseError as e:
        db.close()
        raise StoreError(f"{path} is corrupt ({e}); {advice}") from e
    except StoreError:
        db.close()
        raise
    return db


_log = Logger()


def migrate_index(
    db: sqlite3.Connection, path: str, advice: str = "", quiet: bool = False
) -> None:
    """
    Bring the index ``db`` (at ``path``, for messages) up to
    :data:`SCHEMA_VERSION` through :data:`MIGRATIONS`, one transaction a
    step, with a log line for each (none when ``quiet``: a new index goes
    through the steps too, and has nothing to report).  An index newer
    than this buildcache
    (written by a later version) is refused with a :class:`StoreError`
    ending in ``advice``; it is left untouched.
    """
    newest = 1 + len(MIGRATIONS)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == newest:
        return
    if not 1 <= version < newest:
        raise StoreError(
            f"{path} has index schema version {version}, this buildcache"
            f" reads versions 1 to {newest}"
            + (f"; {advice}" if advice else "")
        )
    isolation = db.isolation_level
    db.isolation_level = None
    try:
        for step in range(version, newest):
            migration = MIGRATIONS[step - 1]
            db.execute("BEGIN IMMEDIATE")
            try:
                dropped = migration.run(db)
                db.execute(f"PRAGMA user_version = {step + 1}")
            except sqlite3.Error as e:
                db.execute("ROLLBACK")
                raise StoreError(
                    f"cannot migrate {path} from schema version {step} to"
                    f" {step + 1} ({migration.name}): {e}; it was left at"
                    f" version {step}"
                ) from e
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            if quiet:
                continue
            _log.info(
                "Migrated the cache index {path} from schema version {old} to"
                " {new} ({step}); {dropped} entries it could not carry over"
                " were dropped",
                path=path, old=step, new=step + 1, step=migration.name,
                dropped=dropped,
            )
    finally:
        db.isolation_level = isolation
