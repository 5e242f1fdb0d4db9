"""
``buildcache verify``: the store re-hashes every body
(:func:`buildcache.store.verify_bodies`); this module then checks the
stored packages and files against the stored indexes that describe them
(an apk package against its ``APKINDEX.tar.gz``, a pip file against its
project page) and the registry's blobs and manifests against the digest
their key names, which needs the ecosystems' knowledge.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from attrs import frozen
from twisted.logger import Logger

from buildcache.ecosystems.apk.check import (
    directory_prefix,
    listed_packages,
    package_mismatch,
    read_control_checksum,
)
from buildcache.ecosystems.apk.index import (
    ApkFacts,
    ApkIndexError,
    control_sha1_of,
    parse_compact_apkindex,
    stale_reason,
)
from buildcache.ecosystems.pypi.model import SimplePageError
from buildcache.ecosystems.pypi.pages import (
    disowned_files,
    page_digests,
    page_url,
    split_page_key,
)
from buildcache.ecosystems.pypi.parse import parse_page
from buildcache.ops.cli_keys import (
    PAGE_PREFIX,
    entry_kind,
    key_filename,
)
from buildcache.ops.registry_keys import KEY_PREFIX, digest_mismatch
from buildcache.store import BodyCheck, Entry, OfflineIndex, verify_bodies
from buildcache.store.maintenance import BodyChecker, Progress

log = Logger(namespace="buildcache.ops.cli")


@frozen
class VerifyResult:
    """
    What ``verify`` found: the store's check of every body (its corrupt
    and missing entries were removed), and the entries their current
    stored index describes differently (an apk package rebuilt under the
    same name, a file whose project page now gives another sha256),
    removed too.
    """

    bodies: BodyCheck
    stale: tuple[tuple[Entry, str], ...] = ()

    @property
    def clean(self) -> bool:
        return not self.bodies.corrupt and not self.bodies.missing and not self.stale


def verify(index: OfflineIndex, progress: Progress | None = None) -> VerifyResult:
    """
    Re-hash every entry that has a known sha256, check every apk package
    stored without one as its download was checked, and remove those whose
    file is missing or differs; then remove the entries their current stored
    index describes differently: an apk package whose ``APKINDEX.tar.gz``
    lists another size or control checksum, a pip file whose project page
    gives another sha256, a registry blob or manifest whose sha256 is not
    the digest its key names.

    An entry the server replaced or evicted while it was being checked is
    neither reported nor touched: the removal only deletes a row that
    still names the file that was checked.
    """
    apk_indexes: list[Entry] = []
    pages: list[Entry] = []
    packages: dict[str, list[Entry]] = {}
    misnamed: list[tuple[Entry, str]] = []

    def sort(row: Entry) -> None:
        if row.key.startswith(KEY_PREFIX):
            reason = digest_mismatch(row.key, row.sha256, row.headers)
            if reason is not None:
                misnamed.append((row, reason))
        elif row.key.startswith(PAGE_PREFIX):
            pages.append(row)
        elif key_filename(row.key) == "APKINDEX.tar.gz":
            apk_indexes.append(row)
        elif entry_kind(row.key) == "apk":
            packages.setdefault(directory_prefix(row.key), []).append(row)

    bodies = verify_bodies(index, progress, sort, _package_check)
    gone = {row.key for row, _ in bodies.corrupt} | {row.key for row in bodies.missing}
    stale: list[tuple[Entry, str]] = []
    for row, reason in [
        *((row, reason) for row, reason in misnamed if row.key not in gone),
        *_stale_packages(index, apk_indexes, packages, gone),
        *_stale_files(index, pages, gone),
    ]:
        if index.remove([row]):
            log.warn("Removed stale {key}: {reason}", key=row.key, reason=reason)
            stale.append((row, reason))
    return VerifyResult(bodies, tuple(stale))


def _package_check(row: Entry) -> BodyChecker | None:
    """
    How to check an apk package stored without a sha256 (its download's
    check covered every byte, see :meth:`UpstreamRequest.needs_digest`):
    as that download was checked, against the size and control checksum
    it was stored with (and the data stream against the ``datahash`` its
    control stream names).  None for any other entry.
    """
    if entry_kind(row.key) != "apk" or row.source_digest is None:
        return None
    try:
        facts = ApkFacts(
            key_filename(row.key), row.size, control_sha1_of(row.source_digest)
        )
    except ApkIndexError:
        return None

    def check(path: str, entry: Entry, progress: Progress | None) -> str | None:
        return package_mismatch(path, facts, None if progress is None else progress.advance)

    return check


def _stale_packages(
    index: OfflineIndex,
    apk_indexes: Sequence[Entry],
    packages: Mapping[str, Sequence[Entry]],
    gone: set[str],
) -> Iterator[tuple[Entry, str]]:
    """
    The apk packages whose stored ``APKINDEX.tar.gz`` (the current one)
    lists them with another size or control checksum: the packages each
    index speaks for, as the server judges them
    (:func:`buildcache.ecosystems.apk.check.listed_packages`).
    """
    for index_row in apk_indexes:
        beside = [
            row for row in packages.get(directory_prefix(index_row.key), ())
            if row.key not in gone
        ]
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
        for row, facts in listed_packages(index_row.key, compact, beside):
            checksum = row.source_digest
            package_path = index.object_path(row)
            if checksum is None and row.size == facts.size and package_path:
                checksum = read_control_checksum(package_path, row.size)
            reason = stale_reason(facts, row.size, checksum)
            if reason is not None:
                yield row, f"{reason} (in {index_row.key})"


def _stale_files(
    index: OfflineIndex, pages: Sequence[Entry], gone: set[str]
) -> Iterator[tuple[Entry, str]]:
    """
    The pip files whose sha256 differs from the one their stored project
    page gives (:func:`buildcache.ecosystems.pypi.pages.disowned_files`).
    """
    for page_row in pages:
        upstream, name = split_page_key(page_row.key)
        path = index.object_path(page_row)
        if path is None or page_row.key in gone:
            continue
        try:
            with open(path, "rb") as f:
                data = f.read()
            page = parse_page(
                data, page_row.headers.get("content-type"), page_url(upstream, name)
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
        for row, _ in disowned_files(digests, stored):
            yield row, (
                f"sha256 {row.sha256} stored, the page of {name} gives"
                f" {digests[row.key]}"
            )
