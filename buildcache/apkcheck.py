"""
Finding the index entry that a downloaded ``.apk`` must match.

The store may hold the repository's ``APKINDEX.tar.gz``; when it does, a
package fetched from that repository is checked against its entry while it
streams (see :class:`buildcache.apk.ApkVerifier`).  Parsed indexes are kept
in memory, keyed by the stored copy's digest, so a changed index is parsed
again and an unchanged one never is.  A parse runs through the store's
``run_blocking`` (a thread, in the server): a large index takes a good
fraction of a second, which would otherwise hold up every client; requests
that need the same version meanwhile wait for that one parse.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import partial

from attrs import Factory, define
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from buildcache.apk import (
    ApkIndex,
    ApkIndexEntry,
    ApkIndexError,
    ApkVerifier,
    package_filename,
    parse_apkindex,
    repository_index_url,
)
from buildcache.store import Store


@define
class ApkIndexes:
    """
    Parsed ``APKINDEX.tar.gz`` files from the store, a few at a time.
    """

    log = Logger()

    store: Store
    keep: int = 16
    #: Per index key, the digest of the stored index parsed and its entries;
    #: a new version replaces the old one.
    _parsed: OrderedDict[str, tuple[str, ApkIndex]] = Factory(OrderedDict)
    #: Versions (key, digest) being parsed, and who waits for them.
    _parsing: dict[tuple[str, str], list[Deferred[ApkIndex | None]]] = Factory(dict)

    async def entry_for(
        self, package_url: str, key_of: Callable[[str], str]
    ) -> ApkIndexEntry | None:
        """
        The stored index's entry for the package at ``package_url``, or
        ``None`` when the store has no index for it or the index does not
        list it.  ``key_of`` maps a URL to its cache key.
        """
        index_url = repository_index_url(package_url)
        filename = package_filename(package_url)
        if index_url is None or filename is None:
            return None
        index = await self._load(key_of(index_url))
        if index is None:
            return None
        return index.get(filename)

    async def _load(self, index_key: str) -> ApkIndex | None:
        entry = self.store.peek(index_key)
        if entry is None or entry.sha256 is None:
            return None
        known = self._parsed.get(index_key)
        if known is not None and known[0] == entry.sha256:
            self._parsed.move_to_end(index_key)
            return known[1]
        version = (index_key, entry.sha256)
        parsing = self._parsing.get(version)
        if parsing is not None:
            waiter: Deferred[ApkIndex | None] = Deferred()
            parsing.append(waiter)
            return await waiter
        path = self.store.object_path(index_key)
        if path is None:
            return None
        waiters: list[Deferred[ApkIndex | None]] = []
        self._parsing[version] = waiters
        parsed: ApkIndex | None = None
        try:
            parsed = await self.store.run_blocking(partial(_read_index, path))
        except ApkIndexError as e:
            self.log.warn(
                "Stored index {key} cannot be read: {error}", key=index_key, error=str(e)
            )
        except Exception:
            self.log.failure("Reading stored index {key} failed", key=index_key)
        finally:
            del self._parsing[version]
        if parsed is not None:
            self._parsed[index_key] = (entry.sha256, parsed)
            self._parsed.move_to_end(index_key)
            while len(self._parsed) > self.keep:
                self._parsed.popitem(last=False)
        for waiter in waiters:
            waiter.callback(parsed)
        return parsed


def _read_index(path: str) -> ApkIndex | None:
    """
    Parse the index stored at ``path``; None if it is gone (replaced or
    evicted since).  Touches no shared state: it may run in a thread.
    """
    try:
        with open(path, "rb") as f:
            return parse_apkindex(f)
    except FileNotFoundError:
        return None


def verifier_for(entry: ApkIndexEntry) -> Callable[[Mapping[str, str]], ApkVerifier]:
    return lambda headers: ApkVerifier(entry)
