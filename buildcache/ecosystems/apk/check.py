"""
Finding the index entry that a downloaded ``.apk`` must match, and
dropping stored packages that their repository's current index describes
differently.

The store may hold the repository's ``APKINDEX.tar.gz``; when it does, a
package fetched from that repository is checked against its entry while it
streams (see :class:`buildcache.ecosystems.apk.index.ApkVerifier`).  Parsed indexes are kept
in memory in their compact form (:class:`buildcache.ecosystems.apk.index.CompactApkIndex`),
keyed by the stored copy's digest, so a changed index is parsed again and
an unchanged one never is; the ones kept are bounded in bytes.  An index
past :data:`buildcache.ecosystems.apk.index.MAX_INDEX_ENTRIES` is refused for checking (its
packages are then served unstored, as for any package no index vouches
for), and that version is not parsed again.  A parse runs through the
store's ``run_blocking`` (a thread, in the server): a large index takes a
good fraction of a second, which would otherwise hold up every client;
requests that need the same version meanwhile wait for that one parse.

A private repository may rebuild a package under the same file name.  Each
stored package records the control checksum (``C:``) it was checked
against; once per version of an index, before a package of its directory is
served, the stored packages it now lists with another size or checksum are
removed from the store, so the next request fetches and checks the new
build (see :meth:`ApkIndexes.current`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial

from attrs import Factory, define
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from buildcache.ecosystems.apk.index import (
    MAX_INDEX_ENTRIES,
    ApkFacts,
    ApkIndexError,
    ApkIndexTooLarge,
    ApkMismatch,
    CompactApkIndex,
    PackageFacts,
    package_filename,
    parse_compact_apkindex,
    repository_index_url,
    stale_reason,
)
from buildcache.ecosystems.apk.verify import ApkVerifier
from buildcache.engine.keys import PRIVATE_MARK
from buildcache.store import BackgroundHashes, Entry, Store
from buildcache.turns import Waiters

__all__ = [
    "ApkIndexes",
    "ApkMismatch",
    "credentials_mark",
    "directory_prefix",
    "listed_packages",
    "read_control_checksum",
    "stored_package_matches",
    "verifier_for",
    "vouched_by",
]

#: Bytes of parsed indexes kept in memory, per process: about 8 of the
#: largest indexes allowed, or 40 of Alpine's largest.
KEEP_BYTES = 64 * 1024 * 1024
#: Index versions remembered as refused or as checked, per process.
REMEMBERED_VERSIONS = 1024
#: Most bytes of a stored package read to find its control checksum (the
#: signature and control streams come first and are a few kilobytes).
_CONTROL_READ_LIMIT = 4 * 1024 * 1024
_READ_SIZE = 64 * 1024


def directory_prefix(index_key: str) -> str:
    """
    The start shared by the keys of every file beside the index stored
    under ``index_key``: its URL part (a key may go on with ``#p=`` and
    ``#v=`` marks, see :func:`buildcache.fetch.fetcher.private_family`) up to
    the last ``/`` of its path.
    """
    url, _, _ = index_key.partition("#")
    scheme, _, rest = url.partition("://")
    path_start = rest.find("/")
    if path_start < 0:
        return url + "/"
    authority, path = rest[:path_start], rest[path_start:].partition("?")[0]
    return f"{scheme}://{authority}{path.rpartition('/')[0]}/"


def credentials_mark(key: str) -> str:
    """
    The part of ``key`` that names whose credentials its entry answers
    (``#p=<HMAC>``), or ``""`` for an anonymous entry.
    """
    _, mark, rest = key.partition(PRIVATE_MARK)
    if not mark:
        return ""
    return mark + rest.partition("#")[0]


def vouched_by(
    index_key: str, package_key: str
) -> bool:
    """
    Whether the index stored under ``index_key`` speaks for the package
    stored under ``package_key``: a package of its directory (not in a
    directory below it), fetched with the same credentials (an index a
    client fetched with its own credentials describes that client's
    packages, and an anonymous one the anonymous packages).
    """
    url = package_key.partition("#")[0]
    return (
        repository_index_url(url) is not None
        and directory_prefix(package_key) == directory_prefix(index_key)
        and credentials_mark(package_key) == credentials_mark(index_key)
    )


def listed_packages(
    index_key: str, index: CompactApkIndex, entries: Iterable[Entry]
) -> Iterator[tuple[Entry, ApkFacts]]:
    """
    The stored packages among ``entries`` that ``index`` (stored under
    ``index_key``) speaks for (:func:`vouched_by`) and lists, each with
    what it lists for it: what a directory of stored packages is checked
    against (by the server, :meth:`ApkIndexes.current`, and by ``buildcache
    verify``).  Compare with :func:`buildcache.ecosystems.apk.index.stale_reason`.
    """
    for stored in entries:
        if not vouched_by(index_key, stored.key):
            continue
        filename = package_filename(stored.key.partition("#")[0])
        facts = index.get(filename) if filename is not None else None
        if facts is None:
            # No longer listed: its bytes are what an older version
            # vouched for, and nobody is sent to them by this one.
            continue
        yield stored, facts


def _bounded_put(memo: OrderedDict[str, str], key: str, value: str) -> None:
    memo[key] = value
    memo.move_to_end(key)
    while len(memo) > REMEMBERED_VERSIONS:
        memo.popitem(last=False)


#: Answers of :meth:`ApkIndexes.held_entry` remembered (per process).
HELD_ANSWERS_KEPT = 8192


@define
class ApkIndexes:
    """
    Parsed ``APKINDEX.tar.gz`` files from the store, up to ``keep_bytes``
    of them (per process).
    """

    log = Logger()

    store: Store
    keep_bytes: int = KEEP_BYTES
    max_entries: int = MAX_INDEX_ENTRIES
    #: Per index key, the digest of the stored index parsed and its
    #: compact form; a new version replaces the old one.
    _parsed: OrderedDict[str, tuple[str, CompactApkIndex]] = Factory(OrderedDict)
    _parsed_bytes: int = 0
    #: Per package key, the held index (key, digest) that lists it and its
    #: entry: :meth:`held_entry` is asked on every hit of a package, and
    #: finding the index costs a pass over those held (at most
    #: :data:`HELD_ANSWERS_KEPT` kept).
    _held_answers: dict[str, tuple[str, str, ApkFacts]] = Factory(dict)
    #: Versions (key, digest) being parsed, and who waits for them.
    _parsing: dict[tuple[str, str], list[Deferred[CompactApkIndex | None]]] = Factory(dict)
    #: Per index key, the digest of a stored version that cannot be used
    #: (too large, malformed): not parsed again.
    _refused: OrderedDict[str, str] = Factory(OrderedDict)
    #: Per index key, the digest of the version stored packages were last
    #: checked against (see :meth:`current`), and the checks running.
    _checked: OrderedDict[str, str] = Factory(OrderedDict)
    _checking: dict[str, Waiters] = Factory(dict)

    @property
    def kept_bytes(self) -> int:
        return self._parsed_bytes

    def kept(self) -> int:
        return len(self._parsed)

    async def entry_for(
        self, package_url: str, key_of: Callable[[str], str]
    ) -> ApkFacts | None:
        """
        The stored index's entry for the package at ``package_url``, or
        ``None`` when the store has no usable index for it or the index
        does not list it.  ``key_of`` maps the index's URL to the key its
        stored copy is under (for the proxy, the ``Vary`` variant and
        credentials of the client's request).
        """
        index_url = repository_index_url(package_url)
        filename = package_filename(package_url)
        if index_url is None or filename is None:
            return None
        index = await self._load(key_of(index_url))
        if index is None:
            return None
        return index.get(filename)

    def held_entry(self, package_key: str) -> ApkFacts | None:
        """
        The entry for the package stored under ``package_key`` in an index
        of its directory and credentials already parsed in memory, and
        still the version stored; None when none is held or lists it.
        Reads no file (the hit path asks it): the index that answered is
        remembered, and only checked, by one row look-up, to be still the
        version stored (an index replaced, even by one that cannot be
        parsed, no longer speaks for the package).
        """
        held = self._held_answers.get(package_key)
        if held is not None:
            index_key, digest, facts = held
            stored = self.store.peek(index_key)
            if stored is not None and stored.sha256 == digest:
                return facts
        if len(self._held_answers) >= HELD_ANSWERS_KEPT:
            self._held_answers.clear()
        found = self._held_entry(package_key)
        if found is None:
            self._held_answers.pop(package_key, None)
            return None
        self._held_answers[package_key] = found
        return found[2]

    def _held_entry(self, package_key: str) -> tuple[str, str, ApkFacts] | None:
        url = package_key.partition("#")[0]
        index_url = repository_index_url(url)
        filename = package_filename(url)
        if index_url is None or filename is None:
            return None
        for index_key, (digest, parsed) in self._parsed.items():
            if index_key.partition("#")[0] != index_url or not vouched_by(
                index_key, package_key
            ):
                continue
            stored = self.store.peek(index_key)
            facts = parsed.get(filename)
            if facts is not None and stored is not None and stored.sha256 == digest:
                return index_key, digest, facts
        return None

    async def current(self, package_url: str, key_of: Callable[[str], str]) -> None:
        """
        Make sure the stored packages beside ``package_url`` have been
        checked against the current version of their stored index (at
        once when they have): a package it lists differently is removed.
        Runs once per version of an index, per process; requests for that
        directory meanwhile wait for the one check.
        """
        index_url = repository_index_url(package_url)
        if index_url is None:
            return
        index_key = key_of(index_url)
        entry = self.store.peek(index_key)
        if entry is None or entry.sha256 is None:
            return
        if self._checked.get(index_key) == entry.sha256:
            self._mark_checked(index_key, entry.sha256)
            return
        running = self._checking.get(index_key)
        if running is not None:
            await running.wait(False)
            return
        waiters = self._checking[index_key] = Waiters()
        try:
            await self._check_directory(index_key, entry.sha256)
        except Exception:
            self.log.failure("Checking stored packages against {key} failed", key=index_key)
        finally:
            del self._checking[index_key]
            waiters.fire()

    async def _check_directory(self, index_key: str, digest: str) -> None:
        index = await self._load(index_key)
        if index is None:
            # Nothing to compare with: keep what was stored, and look again
            # at the next version.
            _bounded_put(self._checked, index_key, digest)
            self._mark_checked(index_key, digest)
            return
        removed = 0
        beside = self.store.entries_under(directory_prefix(index_key))
        for stored, facts in listed_packages(index_key, index, beside):
            checksum = stored.source_digest
            if checksum is None and stored.size == facts.size:
                # Stored before checksums were recorded: read it once.
                checksum = await self._control_checksum(stored)
                if checksum is not None:
                    self.store.set_source_digest(stored, checksum)
            reason = stale_reason(facts, stored.size, checksum)
            if reason is not None and self.store.remove_entry(stored):
                removed += 1
                self.log.info(
                    "Removed {key}: its index now describes another build"
                    " ({reason}); the next request fetches it",
                    key=stored.key, index=index_key, reason=reason,
                )
        _bounded_put(self._checked, index_key, digest)
        self._mark_checked(index_key, digest)
        self.log.info(
            "Checked stored packages against {key}: {removed} removed",
            key=index_key, removed=removed,
        )

    def _mark_checked(self, index_key: str, digest: str) -> None:
        """
        Record on the stored index that the packages beside it were
        checked against this version of it (its sha256 as its source
        digest): hit workers, which hold no index, serve those packages
        only then (:meth:`checked_for_workers`).
        """
        entry = self.store.peek(index_key)
        if entry is not None and entry.sha256 == digest and entry.source_digest != digest:
            self.store.set_source_digest(entry, digest)

    def checked_for_workers(self, index_key: str) -> bool:
        """
        Whether the stored packages beside the index stored under
        ``index_key`` may be served by a process that holds no index (a
        hit worker): the writing process has checked them against the
        version of the index stored now (see :meth:`_mark_checked`), or
        no index is stored.
        """
        entry = self.store.peek(index_key)
        return entry is None or entry.sha256 is None or entry.source_digest == entry.sha256

    async def _control_checksum(self, stored: Entry) -> str | None:
        path = self.store.object_path(stored.key)
        if path is None:
            return None
        return await self.store.run_blocking(
            partial(read_control_checksum, path, stored.size)
        )

    async def _load(self, index_key: str) -> CompactApkIndex | None:
        entry = self.store.peek(index_key)
        if entry is None or entry.sha256 is None:
            return None
        known = self._parsed.get(index_key)
        if known is not None and known[0] == entry.sha256:
            self._parsed.move_to_end(index_key)
            return known[1]
        if self._refused.get(index_key) == entry.sha256:
            return None
        version = (index_key, entry.sha256)
        parsing = self._parsing.get(version)
        if parsing is not None:
            waiter: Deferred[CompactApkIndex | None] = Deferred()
            parsing.append(waiter)
            return await waiter
        path = self.store.object_path(index_key)
        if path is None:
            return None
        waiters: list[Deferred[CompactApkIndex | None]] = []
        self._parsing[version] = waiters
        parsed: CompactApkIndex | None = None
        try:
            parsed = await self.store.run_blocking(
                partial(_read_index, path, self.max_entries)
            )
        except ApkIndexTooLarge as e:
            _bounded_put(self._refused, index_key, entry.sha256)
            self.log.warn(
                "Not checking packages against {key}: {error}; it is served,"
                " and the packages it lists are served without being stored",
                key=index_key, error=str(e), refused="too large",
            )
        except ApkIndexError as e:
            _bounded_put(self._refused, index_key, entry.sha256)
            self.log.warn(
                "Stored index {key} cannot be read: {error}", key=index_key, error=str(e)
            )
        except Exception:
            self.log.failure("Reading stored index {key} failed", key=index_key)
        finally:
            del self._parsing[version]
        if parsed is not None:
            self._keep(index_key, entry.sha256, parsed)
        for waiter in waiters:
            waiter.callback(parsed)
        return parsed

    def _keep(self, index_key: str, digest: str, parsed: CompactApkIndex) -> None:
        self._held_answers.clear()
        old = self._parsed.pop(index_key, None)
        if old is not None:
            self._parsed_bytes -= old[1].nbytes
        self._parsed[index_key] = (digest, parsed)
        self._parsed_bytes += parsed.nbytes
        # The newest always stays (one index is at most MAX_INDEX_ENTRIES).
        while self._parsed_bytes > self.keep_bytes and len(self._parsed) > 1:
            _, (_, dropped) = self._parsed.popitem(last=False)
            self._parsed_bytes -= dropped.nbytes


def _read_index(path: str, max_entries: int) -> CompactApkIndex | None:
    """
    Parse the index stored at ``path``; None if it is gone (replaced or
    evicted since).  Touches no shared state: it may run in a thread.
    """
    try:
        with open(path, "rb") as f:
            return parse_compact_apkindex(f, max_entries=max_entries)
    except FileNotFoundError:
        return None


def read_control_checksum(path: str, size: int) -> str | None:
    """
    The control checksum (``Q1...``) of the package stored at ``path``,
    reading only as far as its control stream; None if it has none there
    or is gone.  May run in a thread.
    """
    verifier = ApkVerifier(ApkFacts("stored.apk", size, b""))
    try:
        with open(path, "rb") as f:
            read = 0
            while verifier.control_sha1 is None and read < _CONTROL_READ_LIMIT:
                chunk = f.read(_READ_SIZE)
                if not chunk:
                    break
                read += len(chunk)
                verifier.update(chunk)
                if verifier.mismatch is not None:
                    return None
    except FileNotFoundError:
        return None
    sha1 = verifier.control_sha1
    return None if sha1 is None else ApkFacts("", 0, sha1).control_checksum


def stored_package_matches(path: str, facts: PackageFacts) -> bool:
    """
    Whether the package stored at ``path`` is, byte for byte, the file
    ``facts`` describe (see :func:`package_mismatch`).  What lets an
    ``https://`` key take over a package stored over plain http (see
    :func:`buildcache.fetch.fetcher.http_twin`): only an index fetched over
    https vouches for it, and a control stream alone would not cover the
    data.  False if it is gone.  Reads the whole file: may run in a thread.
    """
    try:
        return package_mismatch(path, facts) is None
    except FileNotFoundError:
        return False


def package_mismatch(
    path: str, facts: PackageFacts, on_read: Callable[[int], None] | None = None
) -> str | None:
    """
    Why the package stored at ``path`` is not the file ``facts`` describe
    (its size, control checksum and the data stream's ``datahash``, as a
    download is checked: :class:`ApkVerifier`), or None when it is;
    ``on_read`` is told the bytes of each read.  Raises FileNotFoundError
    when it is gone.  Reads the whole file: may run in a thread.
    """
    verifier = ApkVerifier(facts)
    with open(path, "rb") as f:
        while verifier.mismatch is None:
            chunk = f.read(_READ_SIZE)
            if not chunk:
                break
            if on_read is not None:
                on_read(len(chunk))
            verifier.update(chunk)
    if verifier.mismatch is not None:
        # Read no further: the first fault found is the reason.
        return verifier.mismatch.reason
    try:
        verifier.finish()
    except ApkMismatch as mismatch:
        return mismatch.reason
    return None


def verifier_for(
    entry: PackageFacts, hashes: BackgroundHashes | None = None
) -> Callable[[Mapping[str, str]], ApkVerifier]:
    return lambda headers: ApkVerifier(entry, hashes=hashes)

