"""
The ``buildcache`` administration command: ``stats``, ``purge``, ``verify``
and ``warm``.

This module owns the operator's view of a cache directory and the warming
of a running server.  ``stats``, ``purge`` and ``verify`` work on the cache
directory whether or not a server uses it: they take the server's ``lock``
(that is :meth:`buildcache.store.Store.open`'s) only for a moment, to
migrate an index of an older schema that no server holds; they never touch
``tmp/``, and open the SQLite index directly (WAL mode lets the server and
this command read and write it at the same time) with short transactions.

Removing an entry follows the store's crash-safe order: the row goes first,
in a transaction that deletes it only if it still names the same file (the
server may have replaced or evicted it meanwhile), then the file.  A server
streaming that file keeps its open descriptor, and its next look-up of the
key finds no row and fetches the object again.  The server's in-memory
totals (entries, bytes) learn of such removals when it re-reads them from
the index.

``warm`` talks only HTTP to a running server (the synchronous standard
library client: this is a short-lived command, not the server), so that
everything it asks for goes through the server's cache.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import heapq
import http.client
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from typing import TextIO
from urllib.parse import quote, unquote, urljoin, urlsplit

from attrs import Factory, define, frozen
from twisted.logger import Logger

from buildcache import __version__
from buildcache.config import DEFAULT_INDEX_PORT, DEFAULT_PROXY_PORT, default_cache_dir
from buildcache.ecosystems.apk.check import directory_prefix, read_control_checksum
from buildcache.ecosystems.apk.index import (
    ALPINE_ARCHES,
    ApkIndex,
    ApkIndexEntry,
    ApkIndexError,
    parse_apkindex,
    parse_compact_apkindex,
    stale_reason,
)
from buildcache.ecosystems.pypi.model import (
    SimplePageError,
    normalize_project_name,
)
from buildcache.ecosystems.pypi.pages import page_digests
from buildcache.ecosystems.pypi.parse import (
    parse_page,
)
from buildcache.store import (
    APPLICATION_ID,
    INDEX_NAME,
    SCHEMA_VERSION,
    StoreError,
    migrate_index,
)

__all__ = [
    "AdminError",
    "CacheIndex",
    "CacheStats",
    "KINDS",
    "PurgeResult",
    "Row",
    "VerifyResult",
    "WarmResult",
    "collect_stats",
    "distribution_project",
    "entry_kind",
    "human_size",
    "key_matcher",
    "main",
    "purge",
    "resolve_apk_closure",
    "verify",
    "warm_apk",
    "warm_requirements",
]

log = Logger(namespace="buildcache.ops.cli")

#: Bytes read at a time when hashing or downloading.
CHUNK_SIZE = 1024 * 1024
#: Seconds a write waits for the server's transaction to end.
BUSY_TIMEOUT = 30.0
#: Rows read, or deleted, per statement or transaction: keeps every
#: transaction short so the server is never held up.
BATCH_SIZE = 500
#: How many of the largest entries ``stats`` lists.
LARGEST_COUNT = 10
#: Kinds of entries ``stats`` counts, in display order.
KINDS = ("apk", "deb", "wheel", "sdist", "index", "other")

DEFAULT_SERVER = f"http://127.0.0.1:{DEFAULT_PROXY_PORT}"
DEFAULT_INDEX = f"http://127.0.0.1:{DEFAULT_INDEX_PORT}/simple/"
DEFAULT_HTTP_TIMEOUT = 120.0

_SDIST_SUFFIXES = (".tar.gz", ".tar.bz2", ".tar.xz", ".tgz", ".zip", ".tar")
_DEB_SUFFIXES = (".deb", ".udeb", ".ddeb")
_METADATA_SUFFIX = ".metadata"
_DEPENDENCY_OPERATOR = re.compile(r"[<>=~]")
# Machine names that differ from Alpine's architecture directory names.
_ALPINE_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64", "i686": "x86", "i386": "x86"}


class AdminError(Exception):
    """
    The command cannot do what was asked; the message says why and what
    to do.
    """


# -- the index, read and written beside a running server ------------------


@frozen
class Row:
    """
    One entry of the cache index, as the admin commands need it.
    """

    key: str
    file: str
    size: int
    sha256: str | None
    fetched_at: float
    last_access: float
    #: See :attr:`buildcache.store.Entry.source_digest`.
    source_digest: str | None = None
    #: What the row itself costs against the size limit (headers, key).
    meta_size: int = 0


#: The columns of a :class:`Row`, in its order.
_ROW_COLUMNS = (
    "key, file, size, sha256, fetched_at, last_access, source_digest, meta_size"
)


def _migrate_unless_served(
    db: sqlite3.Connection, directory: str, path: str, version: int
) -> None:
    """
    Bring an older index up to date, as the server does at start-up, but
    only when no server holds the directory: one still running is an older
    buildcache (a newer one would have migrated it), and would go on
    writing rows of its own schema into the migrated index.
    """
    if version > SCHEMA_VERSION:
        migrate_index(db, path)  # refuses, saying which versions it reads
        return
    lock_fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o644)
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
class CacheIndex:
    """
    A cache directory's SQLite index opened without the server's lock.

    Reads are paged (no long-lived read transaction holds back the
    server's WAL checkpoints); writes are short ``BEGIN IMMEDIATE``
    transactions that wait up to :data:`BUSY_TIMEOUT` for the server's.
    """

    directory: str
    _db: sqlite3.Connection

    @classmethod
    def open(cls, directory: str) -> CacheIndex:
        """
        Open the index of the cache in ``directory``.

        Raises :class:`AdminError` when there is none, or when it is not a
        buildcache index of the version this command reads.  Nothing is
        created: a wrong ``--cache-dir`` must not leave an empty cache
        behind.
        """
        directory = os.path.abspath(directory)
        path = os.path.join(directory, INDEX_NAME)
        if not os.path.isfile(path):
            raise AdminError(
                f"{directory} holds no buildcache index ({INDEX_NAME}); pass"
                " the server's --cache-dir (the systemd unit's is"
                " /var/cache/buildcache)"
            )
        try:
            db = sqlite3.connect(
                f"file:{quote(path)}?mode=rw", uri=True, timeout=BUSY_TIMEOUT,
                isolation_level=None,
            )
        except sqlite3.Error as error:
            raise AdminError(f"cannot open {path}: {error}") from error
        try:
            application_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as error:
            db.close()
            raise AdminError(f"cannot read {path}: {error}") from error
        if application_id != APPLICATION_ID:
            db.close()
            raise AdminError(f"{path} is not a buildcache index")
        if version != SCHEMA_VERSION:
            try:
                _migrate_unless_served(db, directory, path, version)
            except (StoreError, sqlite3.Error) as error:
                db.close()
                raise AdminError(str(error)) from error
        return cls(directory, db)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CacheIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def totals(self, with_digest_only: bool = False) -> tuple[int, int]:
        """
        The number of entries and their total size in bytes.
        """
        where = " WHERE sha256 IS NOT NULL" if with_digest_only else ""
        count, size = self._db.execute(
            f"SELECT count(*), coalesce(sum(size), 0) FROM entries{where}"
        ).fetchone()
        return int(count), int(size)

    def rows(self) -> Iterator[Row]:
        """
        Every entry, in key order, read :data:`BATCH_SIZE` at a time.
        """
        columns = _ROW_COLUMNS
        batch = self._db.execute(
            f"SELECT {columns} FROM entries ORDER BY key LIMIT ?", (BATCH_SIZE,)
        ).fetchall()
        while batch:
            for values in batch:
                yield Row(*values)
            batch = self._db.execute(
                f"SELECT {columns} FROM entries WHERE key > ? ORDER BY key LIMIT ?",
                (batch[-1][0], BATCH_SIZE),
            ).fetchall()

    def row(self, key: str) -> Row | None:
        """
        The entry stored under ``key``, or None.
        """
        values = self._db.execute(
            f"SELECT {_ROW_COLUMNS} FROM entries WHERE key = ?", (key,)
        ).fetchone()
        return None if values is None else Row(*values)

    def headers(self, row: Row) -> dict[str, str]:
        """
        The stored response headers of ``row`` (empty once it is gone).
        """
        values = self._db.execute(
            "SELECT headers FROM entries WHERE key = ? AND file = ?", (row.key, row.file)
        ).fetchone()
        return {} if values is None else dict(json.loads(values[0]))

    def object_path(self, row: Row) -> str | None:
        """
        Where ``row``'s body lives, or None for a file name that would
        lead out of ``objects/`` (never produced by the store).
        """
        name = row.file
        if not name or name.startswith(".") or "/" in name or "\\" in name:
            return None
        return os.path.join(self.directory, "objects", name[:2], name)

    def remove(self, rows: Iterable[Row]) -> list[Row]:
        """
        Remove entries: rows first, in short transactions, then their
        files.

        A row is deleted only while it still names the same file, so an
        entry the server replaced or evicted meanwhile is left to the
        server.  Returns the rows that were removed.
        """
        removed: list[Row] = []
        for batch in _batches(rows, BATCH_SIZE):
            gone: list[Row] = []
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in batch:
                    cursor = self._db.execute(
                        "DELETE FROM entries WHERE key = ? AND file = ?",
                        (row.key, row.file),
                    )
                    if cursor.rowcount:
                        gone.append(row)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            for row in gone:
                path = self.object_path(row)
                if path is not None:
                    _unlink_quietly(path)
                log.info(
                    "Removed {key} ({size} bytes) from {directory}",
                    key=row.key, size=row.size, directory=self.directory,
                )
            removed.extend(gone)
        return removed


def _batches(rows: Iterable[Row], size: int) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- what a key is ---------------------------------------------------------


def _key_url(key: str) -> str:
    """
    The URL part of a key (``scheme://host/path?query``), without what
    names a private entry or a variant of it (``#p=...``, ``#v=...``).
    """
    return key.partition("#")[0]


def _key_filename(key: str) -> str:
    """
    The last path segment of a URL key (``scheme://host/path?query``),
    decoded.
    """
    path = _key_url(key).partition("?")[0]
    return unquote(path.rpartition("/")[2])


def entry_kind(key: str) -> str:
    """
    The kind of a cache key, one of :data:`KINDS`: ``index`` covers
    everything that changes upstream (simple pages, ``APKINDEX.tar.gz``,
    apt's ``dists/`` files) and PEP 658 metadata files.
    """
    if key.startswith(("simple-page|", "simple-root|")):
        return "index"
    filename = _key_filename(key)
    if filename == "APKINDEX.tar.gz":
        return "index"
    if filename.endswith(".apk"):
        return "apk"
    if filename.endswith(_DEB_SUFFIXES):
        return "deb"
    if "/dists/" in _key_url(key).partition("?")[0] or filename.endswith(_METADATA_SUFFIX):
        return "index"
    if filename.endswith((".whl", ".egg")):
        return "wheel"
    if filename.endswith(_SDIST_SUFFIXES) and distribution_project(filename):
        return "sdist"
    return "other"


def distribution_project(filename: str) -> str | None:
    """
    The normalised project name of a Python distribution file (or of its
    ``.metadata`` file), or None when ``filename`` is not one.

    A wheel's (or egg's) name ends at its first hyphen; an sdist's version
    follows its last hyphen, since old sdists keep the project's hyphens
    (``python-dateutil-2.8.2.tar.gz``).
    """
    name = filename.removesuffix(_METADATA_SUFFIX)
    if name.endswith((".whl", ".egg")):
        project, separator, _ = name.partition("-")
    else:
        suffix = next((s for s in _SDIST_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            return None
        project, separator, _ = name[: -len(suffix)].rpartition("-")
    if not separator or not project:
        return None
    return normalize_project_name(project)


def key_matcher(
    patterns: Sequence[str], projects: Sequence[str]
) -> Callable[[str], bool]:
    """
    A predicate on cache keys for ``purge``.

    A pattern is an ``fnmatch`` glob over the URL of a key
    (``scheme://host/path?query``; its private entries and variants go
    with it); a pattern without ``scheme://`` matches either scheme, as
    keys had none before.  A project (any spelling) matches its
    simple-index pages and every distribution file whose name belongs to
    it.
    """
    globs = list(patterns)
    names = {normalize_project_name(project) for project in projects}

    def matches(key: str) -> bool:
        if key.startswith("simple-"):
            # The index's own keys (``simple-page|https://…|name``) hold a
            # URL inside, which a glob without a scheme must not reach into.
            url = schemeless = key
        else:
            url = _key_url(key)
            schemeless = url.partition("://")[2]
        if any(
            fnmatchcase(url, glob) or ("://" not in glob and fnmatchcase(schemeless, glob))
            for glob in globs
        ):
            return True
        if not names:
            return False
        if key.startswith("simple-page|"):
            return key.rpartition("|")[2] in names
        if key.startswith("simple-"):
            return False
        return distribution_project(_key_filename(key)) in names

    return matches


# -- stats -----------------------------------------------------------------


@frozen
class KindTotal:
    entries: int = 0
    bytes: int = 0


@frozen
class CacheStats:
    """
    What ``buildcache stats`` reports about one cache directory.
    """

    cache_dir: str
    entries: int
    #: Bodies and rows, as the server counts them against --max-size.
    bytes: int
    oldest: Row | None
    newest: Row | None
    largest: tuple[Row, ...]
    kinds: Mapping[str, KindTotal]
    #: Of ``bytes``, the rows' part.
    metadata_bytes: int = 0

    def as_json(self) -> dict[str, object]:
        def described(row: Row | None) -> dict[str, object] | None:
            if row is None:
                return None
            return {"key": row.key, "size": row.size, "fetched_at": row.fetched_at}

        return {
            "cache_dir": self.cache_dir,
            "entries": self.entries,
            "bytes": self.bytes,
            "metadata_bytes": self.metadata_bytes,
            "oldest": described(self.oldest),
            "newest": described(self.newest),
            "largest": [{"key": row.key, "size": row.size} for row in self.largest],
            "kinds": {
                kind: {"entries": total.entries, "bytes": total.bytes}
                for kind, total in self.kinds.items()
            },
        }


def collect_stats(index: CacheIndex) -> CacheStats:
    """
    Read every row once and sum it up; nothing is written.
    """
    entries = 0
    stored = 0
    metadata = 0
    oldest: Row | None = None
    newest: Row | None = None
    largest: list[tuple[int, str, Row]] = []
    kinds = {kind: [0, 0] for kind in KINDS}
    for row in index.rows():
        entries += 1
        stored += row.size + row.meta_size
        metadata += row.meta_size
        if oldest is None or row.fetched_at < oldest.fetched_at:
            oldest = row
        if newest is None or row.fetched_at > newest.fetched_at:
            newest = row
        # The key breaks ties so that rows are never compared.
        item = (row.size, row.key, row)
        if len(largest) < LARGEST_COUNT:
            heapq.heappush(largest, item)
        else:
            heapq.heappushpop(largest, item)
        total = kinds[entry_kind(row.key)]
        total[0] += 1
        total[1] += row.size + row.meta_size
    return CacheStats(
        cache_dir=index.directory,
        entries=entries,
        bytes=stored,
        oldest=oldest,
        newest=newest,
        largest=tuple(row for _, _, row in sorted(largest, reverse=True)),
        kinds={kind: KindTotal(count, size) for kind, (count, size) in kinds.items()},
        metadata_bytes=metadata,
    )


def human_size(size: float) -> str:
    """
    ``size`` bytes in binary units for people: ``"512 B"``, ``"1.5 MiB"``.
    """
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def render_stats(stats: CacheStats) -> str:
    lines = [
        f"Cache directory  {stats.cache_dir}",
        f"Entries          {stats.entries}",
        f"Stored           {human_size(stats.bytes)} ({stats.bytes} bytes,"
        f" {stats.metadata_bytes} of them index rows)",
    ]
    if stats.oldest is not None and stats.newest is not None:
        lines += [
            f"Oldest entry     {_timestamp(stats.oldest.fetched_at)}  {stats.oldest.key}",
            f"Newest entry     {_timestamp(stats.newest.fetched_at)}  {stats.newest.key}",
        ]
    lines += ["", f"{'Kind':<8} {'entries':>9} {'stored':>11}"]
    for kind, total in stats.kinds.items():
        lines.append(f"{kind:<8} {total.entries:>9} {human_size(total.bytes):>11}")
    if stats.largest:
        lines += ["", "Largest entries"]
        lines += [f"{human_size(row.size):>11}  {row.key}" for row in stats.largest]
    return "\n".join(lines) + "\n"


# -- purge -----------------------------------------------------------------


@frozen
class PurgeResult:
    """
    The entries ``purge`` removed (or, in a dry run, would remove).
    """

    rows: tuple[Row, ...]
    dry_run: bool

    @property
    def bytes(self) -> int:
        return sum(row.size + row.meta_size for row in self.rows)


def purge(index: CacheIndex, matches: Callable[[str], bool], dry_run: bool = False) -> PurgeResult:
    """
    Remove every entry whose key ``matches``; with ``dry_run``, only list
    them.
    """
    chosen = [row for row in index.rows() if matches(row.key)]
    if dry_run:
        return PurgeResult(tuple(chosen), dry_run=True)
    return PurgeResult(tuple(index.remove(chosen)), dry_run=False)


# -- progress --------------------------------------------------------------


@define
class Progress:
    """
    Progress of a batch of files on a text stream.

    On a terminal, one bar redrawn in place (``\\r``) at most ten times a
    second; otherwise (a log, a CI job) one line per finished file.
    """

    stream: TextIO
    total_files: int
    total_bytes: int
    interactive: bool
    files_done: int = 0
    bytes_done: int = 0
    current: str = ""
    _drawn_at: float = 0.0
    _width: int = Factory(lambda: shutil.get_terminal_size((80, 24)).columns)

    @classmethod
    def on(cls, stream: TextIO, total_files: int, total_bytes: int) -> Progress:
        try:
            interactive = stream.isatty()
        except (AttributeError, ValueError):
            interactive = False
        return cls(stream, total_files, total_bytes, interactive)

    def start(self, name: str) -> None:
        self.current = name
        self._draw(force=True)

    def advance(self, count: int) -> None:
        self.bytes_done += count
        self._draw()

    def finished(self, name: str, size: int, note: str = "") -> None:
        self.files_done += 1
        if self.interactive:
            self._draw(force=True)
        else:
            suffix = f"  {note}" if note else ""
            self.stream.write(
                f"[{self.files_done}/{self.total_files}] {name}  {human_size(size)}{suffix}\n"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.interactive and self.total_files:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.interactive:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        fraction = min(self.bytes_done / self.total_bytes, 1.0) if self.total_bytes else 1.0
        bar_width = 24
        filled = int(fraction * bar_width)
        line = (
            f"[{'#' * filled}{'.' * (bar_width - filled)}] {fraction * 100:3.0f}%"
            f"  {self.files_done}/{self.total_files}"
            f"  {human_size(self.bytes_done)}/{human_size(self.total_bytes)}"
            f"  {self.current}"
        )
        width = max(self._width - 1, 20)
        self.stream.write("\r" + line[:width].ljust(width))
        self.stream.flush()


# -- verify ----------------------------------------------------------------


@frozen
class VerifyResult:
    """
    What ``verify`` found; ``corrupt`` and ``missing`` were removed.
    """

    checked: int
    checked_bytes: int
    corrupt: tuple[tuple[Row, str], ...]
    missing: tuple[Row, ...]
    without_digest: int
    #: Entries their current stored index describes differently (an apk
    #: package rebuilt under the same name, a file whose project page now
    #: gives another sha256); removed too.
    stale: tuple[tuple[Row, str], ...] = ()

    @property
    def clean(self) -> bool:
        return not self.corrupt and not self.missing and not self.stale


def _check_body(path: str, row: Row, progress: Progress | None) -> str | None:
    """
    Why the file at ``path`` is not ``row``'s body, or None when it is.

    Raises FileNotFoundError when there is no file.
    """
    with open(path, "rb", buffering=0) as body:
        size = os.fstat(body.fileno()).st_size
        if size != row.size:
            return f"{size} bytes, the index says {row.size}"
        digest = hashlib.sha256()
        buffer = bytearray(CHUNK_SIZE)
        view = memoryview(buffer)
        while count := body.readinto(buffer):
            digest.update(view[:count])
            if progress is not None:
                progress.advance(count)
    found = digest.hexdigest()
    if found != (row.sha256 or "").lower():
        return f"sha256 {found}, the index says {row.sha256}"
    return None


def verify(index: CacheIndex, progress: Progress | None = None) -> VerifyResult:
    """
    Re-hash every entry that has a known sha256 and remove those whose file
    is missing or differs; then remove the entries their current stored
    index describes differently: an apk package whose ``APKINDEX.tar.gz``
    lists another size or control checksum, a pip file whose project page
    gives another sha256.

    An entry the server replaced or evicted while it was being checked is
    neither reported nor touched: the removal only deletes a row that
    still names the file that was checked.
    """
    checked = 0
    checked_bytes = 0
    without_digest = 0
    corrupt: list[tuple[Row, str]] = []
    missing: list[Row] = []
    apk_indexes: list[Row] = []
    pages: list[Row] = []
    packages: dict[str, list[Row]] = {}
    for row in index.rows():
        if row.key.startswith("simple-page|"):
            pages.append(row)
        elif _key_filename(row.key) == "APKINDEX.tar.gz":
            apk_indexes.append(row)
        elif entry_kind(row.key) == "apk":
            packages.setdefault(directory_prefix(row.key), []).append(row)
        if row.sha256 is None:
            without_digest += 1
            continue
        path = index.object_path(row)
        if progress is not None:
            progress.start(row.key)
        try:
            if path is None:
                raise FileNotFoundError(row.file)
            reason = _check_body(path, row, progress)
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
    gone = {row.key for row, _ in corrupt} | {row.key for row in missing}
    stale: list[tuple[Row, str]] = []
    for row, reason in [
        *_stale_packages(index, apk_indexes, packages, gone),
        *_stale_files(index, pages, gone),
    ]:
        if index.remove([row]):
            log.warn("Removed stale {key}: {reason}", key=row.key, reason=reason)
            stale.append((row, reason))
    return VerifyResult(
        checked, checked_bytes, tuple(corrupt), tuple(missing), without_digest,
        tuple(stale),
    )


def _stale_packages(
    index: CacheIndex,
    apk_indexes: Sequence[Row],
    packages: Mapping[str, Sequence[Row]],
    gone: set[str],
) -> Iterator[tuple[Row, str]]:
    """
    The apk packages whose stored ``APKINDEX.tar.gz`` (the current one)
    lists them with another size or control checksum.
    """
    for index_row in apk_indexes:
        beside = packages.get(directory_prefix(index_row.key), ())
        path = index.object_path(index_row)
        if not beside or path is None or index_row.key in gone:
            continue
        try:
            with open(path, "rb") as f:
                compact = parse_compact_apkindex(f)
        except (OSError, ApkIndexError) as error:
            log.warn(
                "Cannot check packages against {key}: {error}",
                key=index_row.key, error=str(error),
            )
            continue
        for row in beside:
            facts = compact.get(_key_filename(row.key))
            if facts is None or row.key in gone:
                continue
            checksum = row.source_digest
            package_path = index.object_path(row)
            if checksum is None and row.size == facts.size and package_path:
                checksum = read_control_checksum(package_path, row.size)
            reason = stale_reason(facts, row.size, checksum)
            if reason is not None:
                yield row, f"{reason} (in {index_row.key})"


def _stale_files(
    index: CacheIndex, pages: Sequence[Row], gone: set[str]
) -> Iterator[tuple[Row, str]]:
    """
    The pip files whose sha256 differs from the one their stored project
    page gives.
    """
    for page_row in pages:
        _, upstream, name = page_row.key.split("|", 2)
        path = index.object_path(page_row)
        if path is None or page_row.key in gone:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
            page = parse_page(
                data, index.headers(page_row).get("content-type"),
                f"{upstream}/{quote(name)}/",
            )
        except (OSError, SimplePageError) as error:
            log.warn(
                "Cannot check files against {key}: {error}",
                key=page_row.key, error=str(error),
            )
            continue
        digests = page_digests(page)
        stored = {
            key: row for key in digests
            if key not in gone and (row := index.row(key)) is not None
        }
        for key, row in stored.items():
            if row.sha256 is not None and row.sha256.lower() != digests[key]:
                yield row, (
                    f"sha256 {row.sha256} stored, the page of {name} gives"
                    f" {digests[key]}"
                )


# -- warm ------------------------------------------------------------------


@frozen
class WarmResult:
    """
    What ``warm`` fetched through the server, and what it could not.
    """

    fetched: tuple[tuple[str, int, str], ...] = ()
    failed: tuple[tuple[str, str], ...] = ()
    unresolved: tuple[str, ...] = ()
    not_found: tuple[str, ...] = ()

    @property
    def bytes(self) -> int:
        return sum(size for _, size, _ in self.fetched)


@frozen
class ServerClient:
    """
    Blocking HTTP to a running buildcache server: its own URLs (mirror
    routes) directly, any other http URL through it as a forward proxy.
    Proxy settings of the environment are ignored either way: the point is
    to go through this server.
    """

    server: str
    timeout: float = DEFAULT_HTTP_TIMEOUT

    def url_for(self, location: str) -> str:
        """
        An absolute URL for ``location``: a path (``alpine/v3.20/main``) is
        taken relative to the server.
        """
        if "://" not in location:
            return urljoin(self.server.rstrip("/") + "/", location.lstrip("/"))
        if urlsplit(location).scheme != "http":
            raise AdminError(
                f"{location}: only http URLs can be cached by the server (an"
                " https URL through a proxy is an opaque tunnel); use the"
                f" server's mirror route, e.g. {self.server.rstrip('/')}/alpine/v3.20/main"
            )
        return location

    def open(self, url: str) -> http.client.HTTPResponse:
        if urlsplit(url).netloc == urlsplit(self.server).netloc:
            handler = urllib.request.ProxyHandler({})
        else:
            handler = urllib.request.ProxyHandler({"http": self.server})
        opener = urllib.request.build_opener(handler)
        request = urllib.request.Request(url, headers={"User-Agent": f"buildcache-warm/{__version__}"})
        try:
            response: http.client.HTTPResponse = opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:
            error.close()
            raise AdminError(f"{url}: the server answered {error.code} {error.reason}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            reason = getattr(error, "reason", error)
            raise AdminError(
                f"{url}: cannot reach the server at {self.server} ({reason});"
                " is it running? (--server)"
            ) from None
        return response


def default_alpine_arch() -> str:
    machine = platform.machine().lower()
    machine = _ALPINE_ARCH_ALIASES.get(machine, machine)
    return machine if machine in ALPINE_ARCHES else "x86_64"


def _dependency_name(token: str) -> str | None:
    """
    The package name a ``D:`` token asks for, without its version
    constraint; None for a conflict (``!name``), which asks for nothing.
    """
    if token.startswith("!"):
        return None
    return _DEPENDENCY_OPERATOR.split(token, maxsplit=1)[0]


@frozen
class ApkResolution:
    """
    The packages to fetch, by repository, and what could not be resolved.
    """

    packages: tuple[tuple[str, ApkIndexEntry], ...]
    unresolved: tuple[str, ...]
    not_found: tuple[str, ...]


def resolve_apk_closure(
    indexes: Sequence[tuple[str, ApkIndex]], names: Iterable[str]
) -> ApkResolution:
    """
    The named packages and, recursively, their dependencies, by package
    name; the first repository that lists a name provides it.

    Dependencies on something other than a package name (``so:``,
    ``cmd:``, ``pc:``) are satisfied through the ``p:`` (provides) of
    other packages; package names come first.  What nothing provides is
    returned in ``unresolved``, and named packages no repository lists in
    ``not_found``.
    """
    by_name: dict[str, tuple[str, ApkIndexEntry]] = {}
    for repository, index in indexes:
        for entry in index.values():
            by_name.setdefault(entry.name, (repository, entry))
    for repository, index in indexes:
        for entry in index.values():
            for provided in entry.provides:
                name = _dependency_name(provided)
                if name is not None:
                    by_name.setdefault(name, (repository, entry))
    chosen: dict[str, tuple[str, ApkIndexEntry]] = {}
    unresolved: dict[str, None] = {}
    not_found: list[str] = []
    pending = [(name, True) for name in names]
    while pending:
        name, asked = pending.pop(0)
        if name in chosen:
            continue
        found = by_name.get(name)
        if found is None:
            if asked:
                not_found.append(name)
            else:
                unresolved[name] = None
            continue
        chosen[name] = found
        for token in found[1].depends:
            dependency = _dependency_name(token)
            if dependency is not None and dependency not in chosen:
                pending.append((dependency, False))
    return ApkResolution(tuple(chosen.values()), tuple(unresolved), tuple(not_found))


def warm_apk(
    client: ServerClient,
    repositories: Sequence[str],
    packages: Sequence[str],
    arch: str,
    stderr: TextIO,
) -> WarmResult:
    """
    Fetch ``packages`` and their dependencies from ``repositories`` through
    the server, with a progress bar on ``stderr``.
    """
    indexes: list[tuple[str, ApkIndex]] = []
    for repository in repositories:
        base = client.url_for(repository).rstrip("/")
        url = f"{base}/{arch}/APKINDEX.tar.gz"
        with client.open(url) as response:
            try:
                indexes.append((base, parse_apkindex(response)))
            except (ApkIndexError, OSError, http.client.HTTPException) as error:
                raise AdminError(f"{url}: not a usable APKINDEX.tar.gz ({error})") from None
    resolution = resolve_apk_closure(indexes, packages)
    progress = Progress.on(
        stderr, len(resolution.packages),
        sum(entry.size for _, entry in resolution.packages),
    )
    fetched: list[tuple[str, int, str]] = []
    failed: list[tuple[str, str]] = []
    for base, entry in resolution.packages:
        url = f"{base}/{arch}/{quote(entry.filename)}"
        progress.start(entry.filename)
        try:
            size, cache_status = _download(client, url, progress)
        except AdminError as error:
            failed.append((url, str(error)))
            progress.finished(entry.filename, 0, "FAILED")
            continue
        if size != entry.size:
            failed.append((url, f"received {size} bytes, the index says {entry.size}"))
            progress.finished(entry.filename, size, "FAILED")
            continue
        fetched.append((url, size, cache_status))
        progress.finished(entry.filename, size, cache_status)
    progress.close()
    return WarmResult(
        tuple(fetched), tuple(failed), resolution.unresolved, resolution.not_found
    )


def _download(client: ServerClient, url: str, progress: Progress) -> tuple[int, str]:
    """
    GET ``url`` and discard the body (the server keeps it); returns the
    bytes received and the server's ``X-Cache``.
    """
    received = 0
    with client.open(url) as response:
        cache_status = response.headers.get("x-cache", "")
        try:
            while chunk := response.read(CHUNK_SIZE):
                received += len(chunk)
                progress.advance(len(chunk))
        except (OSError, http.client.HTTPException) as error:
            raise AdminError(f"{url}: the body was cut short ({error!r})") from None
    return received, cache_status


def warm_requirements(
    requirement_files: Sequence[str],
    index_url: str,
    pip_arguments: Sequence[str],
    python: str,
    stderr: TextIO,
    environ: Mapping[str, str],
) -> WarmResult:
    """
    Let pip resolve and download the requirements' closure from the
    server's index into a temporary directory, then delete it: the server
    keeps every page and file pip asked for.

    pip runs isolated (no user configuration or ``PIP_*`` variables, which
    could add another index) and without its own cache (which would answer
    instead of the server); its output is copied to ``stderr``.
    """
    host = urlsplit(index_url).hostname or "127.0.0.1"
    with tempfile.TemporaryDirectory(prefix="buildcache-warm-") as destination:
        command = [
            python, "-m", "pip", "download", "--isolated", "--no-cache-dir",
            "--disable-pip-version-check", "--no-input",
            "--index-url", index_url, "--trusted-host", host,
            "--dest", destination,
        ]
        for requirement_file in requirement_files:
            command += ["--requirement", os.path.abspath(requirement_file)]
        command += list(pip_arguments)
        try:
            pip = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, env=dict(environ),
            )
        except OSError as error:
            raise AdminError(f"cannot run {python} -m pip: {error}") from None
        assert pip.stdout is not None
        with pip.stdout:
            for line in pip.stdout:
                stderr.write(line.decode("utf-8", "replace"))
                stderr.flush()
        status = pip.wait()
        fetched = tuple(
            (entry.name, entry.stat().st_size, "")
            for entry in sorted(os.scandir(destination), key=lambda e: e.name)
            if entry.is_file()
        )
    if status != 0:
        return WarmResult(fetched, ((index_url, f"pip download exited with status {status}"),))
    return WarmResult(fetched)


# -- the command line ------------------------------------------------------


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buildcache",
        description=(
            "Administer a buildcache cache directory (whether or not the"
            " server is running) and warm a running server."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_dir = argparse.ArgumentParser(add_help=False)
    cache_dir.add_argument(
        "--cache-dir", default=default_cache_dir(environ),
        help="the server's cache directory (default: %(default)s)",
    )

    stats = commands.add_parser(
        "stats", parents=[cache_dir], help="entries, size and kinds of what is stored",
    )
    stats.add_argument("--json", action="store_true", help="print JSON for machines")

    purge_command = commands.add_parser(
        "purge", parents=[cache_dir],
        help="remove entries by key glob or project name",
        description=(
            "Remove entries whose cache key matches a glob. Keys are upstream"
            " URLs (scheme://host[:port]/path[?query]), as 'stats' lists"
            " them, e.g. '*/alpine/v3.19/*' or '*.apk'; a glob without a"
            " scheme matches http and https alike."
        ),
    )
    purge_command.add_argument("patterns", nargs="*", metavar="PATTERN", help="key glob")
    purge_command.add_argument(
        "--project", action="append", default=[], metavar="NAME",
        help="a Python project: its index pages and distribution files (repeatable)",
    )
    purge_command.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing",
    )

    commands.add_parser(
        "verify", parents=[cache_dir],
        help="re-hash every entry, remove the corrupt ones (exit 1 if any)",
    )

    warm = commands.add_parser(
        "warm", help="fetch packages into the cache through a running server",
        description=(
            "Fetch a requirements file's closure (through the server's pip"
            " index) and/or Alpine packages with their dependencies (through"
            " the server's proxy port), so that later builds find them cached."
        ),
    )
    warm.add_argument(
        "--server", type=_http_url, default=DEFAULT_SERVER,
        help="the server's proxy port URL (default: %(default)s)",
    )
    warm.add_argument(
        "--index", type=_http_url, default=None,
        help=(
            "the server's simple index URL (default: port"
            f" {DEFAULT_INDEX_PORT} of --server's host, {DEFAULT_INDEX})"
        ),
    )
    warm.add_argument(
        "--requirements", "-r", action="append", default=[], metavar="FILE",
        help="pip requirements file to resolve and download (repeatable)",
    )
    warm.add_argument(
        "--pip-arg", action="append", default=[], metavar="ARG",
        help="extra argument for pip download, e.g. --pip-arg=--only-binary=:all: (repeatable)",
    )
    warm.add_argument(
        "--python", default=sys.executable,
        help="the interpreter whose pip resolves requirements (default: %(default)s)",
    )
    warm.add_argument("--apk", nargs="+", default=[], metavar="PACKAGE", help="Alpine packages")
    warm.add_argument(
        "--alpine-repo", action="append", default=[], metavar="URL",
        help=(
            "Alpine repository through the server: a mirror-route URL such as"
            f" {DEFAULT_SERVER}/alpine/v3.20/main, a path on the server, or an"
            " http repository reached through the server as a proxy (repeatable)"
        ),
    )
    warm.add_argument(
        "--arch", default=default_alpine_arch(),
        help="Alpine architecture (default: %(default)s)",
    )
    warm.add_argument(
        "--timeout", type=_positive_seconds, default=DEFAULT_HTTP_TIMEOUT,
        help="seconds the server may stay silent (default: %(default)s)",
    )
    return parser


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// URL (e.g. {DEFAULT_SERVER})"
        )
    return text


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def _run_stats(options: argparse.Namespace, stdout: TextIO) -> int:
    with CacheIndex.open(options.cache_dir) as index:
        stats = collect_stats(index)
    if options.json:
        stdout.write(json.dumps(stats.as_json(), indent=2) + "\n")
    else:
        stdout.write(render_stats(stats))
    return 0


def _run_purge(options: argparse.Namespace, stdout: TextIO) -> int:
    if not options.patterns and not options.project:
        raise AdminError("purge needs a PATTERN or --project NAME")
    matches = key_matcher(options.patterns, options.project)
    with CacheIndex.open(options.cache_dir) as index:
        result = purge(index, matches, dry_run=options.dry_run)
    verb = "would remove" if result.dry_run else "removed"
    for row in result.rows:
        stdout.write(f"{verb} {row.key}  {human_size(row.size)}\n")
    summary = "Would remove" if result.dry_run else "Removed"
    freed = "" if result.dry_run else " freed"
    stdout.write(
        f"{summary} {len(result.rows)} entries, {human_size(result.bytes)}{freed}"
        f" ({result.bytes} bytes)\n"
    )
    return 0


def _run_verify(options: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    with CacheIndex.open(options.cache_dir) as index:
        count, size = index.totals(with_digest_only=True)
        progress = Progress.on(stderr, count, size)
        # A line per file only helps on a terminal; a log gets the summary.
        result = verify(index, progress if progress.interactive else None)
        progress.close()
    for row, reason in result.corrupt:
        stdout.write(f"corrupt, removed: {row.key} ({reason})\n")
    for row in result.missing:
        stdout.write(f"file missing, row removed: {row.key}\n")
    for row, reason in result.stale:
        stdout.write(f"disagrees with its index, removed: {row.key} ({reason})\n")
    stdout.write(
        f"Checked {result.checked} entries, {human_size(result.checked_bytes)}"
        f" ({result.checked_bytes} bytes): {len(result.corrupt)} corrupt,"
        f" {len(result.missing)} missing, {len(result.stale)} disagreeing with"
        f" their index, {result.without_digest} without a digest\n"
    )
    return 0 if result.clean else 1


def index_beside(server: str) -> str:
    """
    The simple index of the server whose proxy port is at ``server``: the
    default index port of the same host (``--server http://box:8899`` is
    ``http://box:3141/simple/``).
    """
    host = urlsplit(server).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{DEFAULT_INDEX_PORT}/simple/"


def _run_warm(
    options: argparse.Namespace, stdout: TextIO, stderr: TextIO,
    environ: Mapping[str, str],
) -> int:
    if not options.requirements and not options.apk:
        raise AdminError("warm needs --requirements FILE and/or --apk PACKAGE...")
    if options.apk and not options.alpine_repo:
        raise AdminError(
            "--apk needs --alpine-repo, e.g."
            f" --alpine-repo {DEFAULT_SERVER}/alpine/v3.20/main"
        )
    if options.index is None:
        options.index = index_beside(options.server)
    results: list[WarmResult] = []
    if options.requirements:
        result = warm_requirements(
            options.requirements, options.index, options.pip_arg, options.python,
            stderr, environ,
        )
        stdout.write(
            f"pip: {len(result.fetched)} files, {human_size(result.bytes)} through"
            f" {options.index}\n"
        )
        results.append(result)
    if options.apk:
        client = ServerClient(options.server, options.timeout)
        result = warm_apk(client, options.alpine_repo, options.apk, options.arch, stderr)
        statuses: dict[str, int] = {}
        for _, _, status in result.fetched:
            statuses[status or "unknown"] = statuses.get(status or "unknown", 0) + 1
        described = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
        stdout.write(
            f"apk: {len(result.fetched)} packages, {human_size(result.bytes)}"
            f"{f' ({described})' if described else ''}\n"
        )
        if result.unresolved:
            stderr.write(
                "apk: not resolved (satisfied by packages' provides, which this"
                " command does not read; name the providing packages to warm"
                f" them): {' '.join(result.unresolved)}\n"
            )
        if result.not_found:
            stderr.write(f"apk: no such package in the repositories: {' '.join(result.not_found)}\n")
        results.append(result)
    failed = False
    for result in results:
        for what, reason in result.failed:
            stderr.write(f"failed: {what}: {reason}\n")
        failed = failed or bool(result.failed or result.not_found)
    return 1 if failed else 0


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """
    Run the ``buildcache`` command; returns the exit status (0 success, 1
    a check or a warm-up failed, 2 unusable arguments or cache).
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    env = os.environ if environ is None else environ
    parser = _parser(env)
    try:
        options = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    try:
        if options.command == "stats":
            return _run_stats(options, out)
        if options.command == "purge":
            return _run_purge(options, out)
        if options.command == "verify":
            return _run_verify(options, out, err)
        return _run_warm(options, out, err, env)
    except AdminError as error:
        err.write(f"buildcache {options.command}: {error}\n")
        return 2
    except sqlite3.Error as error:
        err.write(
            f"buildcache {options.command}: the cache index failed: {error}"
            " (run as the user that owns the cache directory, or root)\n"
        )
        return 2
    except KeyboardInterrupt:
        err.write(f"\nbuildcache {options.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
