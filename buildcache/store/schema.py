"""
The SQLite index of a cache directory: its schema and the migrations
between versions, opening it (for the writing store, or read-only), the
:class:`Entry` a row describes, what a row costs against the size limit,
and the cache's secret.

Keys are opaque strings and an entry's headers are an opaque mapping
stored with it: the index knows nothing of what they mean.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Literal
from urllib.parse import quote

from attrs import field, frozen
from twisted.logger import Logger

from buildcache.store.layout import (
    INDEX_NAME,
    SECRET_NAME,
    temp_directory,
    unlink_quietly,
)

_log = Logger()


#: What a row costs against ``--max-size`` besides its key and headers: the
#: row and its index entries in SQLite, roughly.  A zero-byte body is not
#: free: without this a flood of them would grow ``index.sqlite`` unseen.
ROW_OVERHEAD = 256
#: The most header bytes (as stored, JSON) one entry may keep; a body
#: with more is not stored.
MAX_STORED_HEADERS = 64 * 1024
#: ``PRAGMA application_id`` of a buildcache index ("bcac").
APPLICATION_ID = 0x62636163
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
    Version 1 keys named no scheme (``host[:port]/path?query``); each
    becomes the key of its plain (``http://``) fetch, which is what wrote
    it: a row written without a secure fetch must never be taken for one
    written with it.  Keys that already carry their source's scheme (the
    package index's ``simple-page|...`` and ``simple-root|...``) stay.
    """
    db.execute(
        "UPDATE entries SET key = 'http://' || key"
        " WHERE key NOT LIKE 'simple-page|%' AND key NOT LIKE 'simple-root|%'"
    )
    return 0


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


#: In order: step ``i`` takes version ``i + 1`` to ``i + 2``.  A new index
#: is created at version 1 and goes through the same steps, so there is
#: one way to every version.
MIGRATIONS: tuple[Migration, ...] = (
    Migration("cache keys name their scheme", _keys_name_their_scheme),
    Migration("record the digest an object's source gave", _add_source_digest),
    Migration("metadata size", _add_metadata_size),
)
SCHEMA_VERSION = 1 + len(MIGRATIONS)


class StoreError(Exception):
    """
    The cache directory cannot be used; the message says why and what to do.
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



#: The columns :func:`entry_from_row` reads, in its order.
ENTRY_COLUMNS = (
    "key, size, headers, sha256, fetched_at, validated_at, last_access, file,"
    " source_digest, meta_size"
)
#: Keys per ``IN (...)`` list: well under SQLite's limit on parameters.
KEYS_PER_STATEMENT = 500


def entry_from_row(row: tuple[Any, ...], pending_access: float | None) -> Entry:
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


SECRET_SIZE = 32


def cache_secret(directory: str, create: bool = True) -> bytes:
    """
    The secret of the cache in ``directory``, made (with :mod:`secrets`,
    mode 0600) on first use: written whole and synced in ``tmp/`` (which
    start-up empties, should a crash leave one there), renamed into place,
    and the rename synced, so a power loss cannot take back a secret that
    entries were named with.  A secret that is not whole is replaced, with
    a warning: the private entries and variants named with the old one are
    then never found, and age out.  One others may read is made private.

    Without ``create`` (a read-only store) the secret is only read: one
    missing or not whole is a :class:`StoreError`.
    """
    path = os.path.join(directory, SECRET_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            if create and os.fstat(fd).st_mode & 0o077:
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
        if not create:
            raise StoreError(f"the cache secret {path} is not whole")
        _log.warn(
            "The cache secret {path} is not whole ({size} bytes); making a"
            " new one: the entries named with the old one (private entries"
            " and variants) are not found again, and age out", path=path, size=len(secret),
        )
    except FileNotFoundError:
        if not create:
            raise StoreError(
                f"{directory} has no cache secret ({SECRET_NAME}): no writing"
                " store has opened it yet"
            ) from None
    except OSError as e:
        raise StoreError(f"cannot read the cache secret {path}: {e}") from e
    secret = secrets.token_bytes(SECRET_SIZE)
    temp = os.path.join(temp_directory(directory), f"{SECRET_NAME}.{secrets.token_hex(6)}")
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
        unlink_quietly(temp)
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
    with _closed_on_error(db, lambda e: f"{path} is corrupt ({e}); {advice}"):
        migrate_index(db, path, advice, quiet=created)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise StoreError(f"{path} is corrupt ({check}); {advice}")
    return db


@contextmanager
def _closed_on_error(
    db: sqlite3.Connection, describe: Callable[[sqlite3.Error], str]
) -> Iterator[None]:
    """
    Close ``db`` when the block raises: a :class:`StoreError` as it is,
    an SQLite error as a :class:`StoreError` that ``describe`` words.
    """
    try:
        yield
    except sqlite3.Error as e:
        db.close()
        raise StoreError(describe(e)) from e
    except StoreError:
        db.close()
        raise


def open_existing_index(
    directory: str,
    mode: str,
    other_version: Callable[[sqlite3.Connection, str, int], None],
    timeout: float = 5.0,
    isolation_level: Literal["DEFERRED"] | None = "DEFERRED",
) -> sqlite3.Connection:
    """
    Open the index a cache directory already has, in SQLite's URI
    ``mode`` (``ro`` or ``rw``), creating nothing.  An index that is
    missing or not a buildcache index is refused with a
    :class:`StoreError`; one of another schema version than
    :data:`SCHEMA_VERSION` is handed to ``other_version`` (with its path
    and version), which migrates it or raises.
    """
    path = os.path.join(directory, INDEX_NAME)
    if not os.path.isfile(path):
        raise StoreError(f"{directory} holds no buildcache index ({INDEX_NAME})")
    try:
        db = sqlite3.connect(
            f"file:{quote(path)}?mode={mode}", uri=True, timeout=timeout,
            isolation_level=isolation_level,
        )
    except sqlite3.Error as e:
        raise StoreError(f"cannot open {path}: {e}") from e
    with _closed_on_error(db, lambda e: f"cannot read {path}: {e}"):
        identify_index(db, path)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            other_version(db, path, version)
    return db


def open_index_read_only(directory: str) -> sqlite3.Connection:
    """
    Open the index of a cache directory for reading only, beside the
    writing store (a WAL reader): nothing is created, checked at length or
    migrated, and SQLite refuses every write.  An index of another schema
    version is refused: the writing store migrates it when it opens.
    """
    return open_existing_index(directory, "ro", _refuse_other_version)


def _refuse_other_version(db: sqlite3.Connection, path: str, version: int) -> None:
    raise StoreError(
        f"{path} has index schema version {version}, this buildcache reads"
        f" version {SCHEMA_VERSION} without a writing store (one brings"
        " the index to it when it opens)"
    )


def identify_index(db: sqlite3.Connection, path: str) -> None:
    """
    Raise :class:`StoreError` unless ``db`` is a buildcache index.
    """
    if db.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
        raise StoreError(f"{path} is not a buildcache index")


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
