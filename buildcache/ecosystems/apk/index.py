"""
Alpine apk format knowledge: reading ``APKINDEX.tar.gz``, and the facts a
downloaded ``.apk`` is checked against (the check itself, as it streams
in, is :class:`buildcache.ecosystems.apk.verify.ApkVerifier`).

Nothing outside this package knows what an apk package looks like.  The
gzip members an index is read from are unwrapped by
:mod:`buildcache.ecosystems.apk.archive`.

Format facts relied on here (apk-tools 2.x, abuild):
  - A package is two or three concatenated gzip streams: an optional
    signature stream (a tar holding ``.SIGN.*`` entries), the control stream (a
    tar holding ``.PKGINFO`` and install scripts) and the data stream.  The
    signature and control tars are written without end-of-archive blocks so
    that the decompressed streams read as one continuous tar.
  - The index's ``C:Q1<base64>`` is the SHA-1 of the compressed control
    stream; ``S:`` is the size of the whole ``.apk`` in bytes; ``.PKGINFO``'s
    ``datahash`` is the hex SHA-256 of the compressed data stream.
  - ``APKINDEX.tar.gz`` is itself a signature stream followed by a gzip'd tar
    holding ``DESCRIPTION`` and ``APKINDEX``, so it must be read as
    concatenated gzip members (Python's ``tarfile`` stops after the first).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import tarfile
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Protocol, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import attrs
from twisted.logger import Logger

from buildcache.ecosystems.apk.archive import (
    READ_SIZE,
    ApkIndexError,
    ApkIndexTooLarge,
    ConcatenatedGzipReader,
)

__all__ = [
    "ApkFacts",
    "ApkIndex",
    "ApkIndexEntry",
    "ApkIndexError",
    "ApkIndexTooLarge",
    "ApkMismatch",
    "CompactApkIndex",
    "MAX_INDEX_ENTRIES",
    "MAX_INDEX_INFLATED",
    "PackageFacts",
    "package_filename",
    "parse_apkindex",
    "parse_compact_apkindex",
    "repository_index_url",
    "stale_reason",
]

_log = Logger()

_MAX_INDEX_LINE = 64 * 1024
_MAX_DESCRIPTION = 4096
_SHA1_LENGTH = 20
HEX_SHA256 = re.compile(r"[0-9a-f]{64}")

#: Most packages an index may list to be used for checking packages.
#: Alpine's largest (community, x86_64) lists about 25,000; the compact
#: form costs 36 bytes a package, so this bounds one parsed index to about
#: 7 MB (and its parse to a few times that, briefly).
MAX_INDEX_ENTRIES = 200_000
#: Most bytes an index may inflate to (its tar, with every field of every
#: entry): Alpine's largest inflates to about 12 MB.
MAX_INDEX_INFLATED = 128 * 1024 * 1024

# Directory names apk repositories use for architectures.  Matching only
# these keeps Android ".apk" downloads through the forward proxy from
# triggering index look-ups against arbitrary sites.
ALPINE_ARCHES = frozenset(
    {
        "aarch64",
        "armhf",
        "armv7",
        "loongarch64",
        "mips64",
        "ppc64le",
        "riscv64",
        "s390x",
        "x86",
        "x86_64",
    }
)


class ApkMismatch(Exception):
    """
    A downloaded package does not match its index entry.

    :ivar reason: human-readable explanation, also the exception's message.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@attrs.frozen
class ApkIndexEntry:
    """
    One package block of an ``APKINDEX``.

    :ivar control_sha1: raw 20-byte SHA-1 decoded from ``C:Q1...``.
    :ivar installed_size: ``I:``, or :obj:`None` when the block has none.
    """

    name: str
    version: str
    size: int
    control_sha1: bytes
    arch: str = ""
    installed_size: int | None = None
    depends: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    description: str = ""

    @property
    def filename(self) -> str:
        """The file name apk requests for this package: ``NAME-VERSION.apk``."""
        return f"{self.name}-{self.version}.apk"

    @property
    def control_checksum(self) -> str:
        """The ``C:`` value as written in the index."""
        return format_control_checksum(self.control_sha1)

    @property
    def facts(self) -> ApkFacts:
        return ApkFacts(self.filename, self.size, self.control_sha1)


def format_control_checksum(sha1: bytes) -> str:
    return "Q1" + base64.b64encode(sha1).decode("ascii")


@attrs.frozen
class ApkFacts:
    """
    What an index vouches for about one package file: all a downloaded
    ``.apk`` is checked against.
    """

    filename: str
    size: int
    control_sha1: bytes

    @property
    def control_checksum(self) -> str:
        """The ``C:`` value as written in the index."""
        return format_control_checksum(self.control_sha1)


class PackageFacts(Protocol):
    """
    An :obj:`ApkFacts` or an :obj:`ApkIndexEntry`: what :obj:`ApkVerifier` checks.
    """

    @property
    def filename(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def control_sha1(self) -> bytes: ...

    @property
    def control_checksum(self) -> str: ...


def stale_reason(
    facts: PackageFacts, size: int, control_checksum: str | None
) -> str | None:
    """
    Why a stored package of ``size`` bytes, whose control checksum (as
    written in an index: ``Q1...``) is ``control_checksum`` or unknown, is not
    the file an index now describes with ``facts``; None when nothing shows
    it (an unknown checksum with the right size).
    """
    if size != facts.size:
        return f"{size} bytes stored, the index lists {facts.size}"
    if control_checksum is not None and control_checksum != facts.control_checksum:
        return (
            f"control checksum {control_checksum} stored, the index lists"
            f" {facts.control_checksum}"
        )
    return None


#: Bytes of a record of :obj:`CompactApkIndex`: size (8) and control SHA-1 (20).
_RECORD = 8 + _SHA1_LENGTH


def _name_hash(filename: str) -> int:
    """
    The 64-bit key of a file name in a :obj:`CompactApkIndex`.  A collision
    (about one in 2**64 / n) can only make a package be checked against
    another's facts, which it then fails: it is served unstored.
    """
    return int.from_bytes(
        hashlib.blake2b(filename.encode("utf-8"), digest_size=8).digest(), "big"
    )


@attrs.frozen(eq=False)
class CompactApkIndex:
    """
    The part of an index that packages are checked against, in a compact
    form: per package, a 64-bit hash of its file name, its size and its
    control SHA-1, as fixed-size records sorted by hash (36 bytes a
    package, against about 300 for a parsed :obj:`ApkIndexEntry` in a dict).

    :ivar hashes: sorted name hashes (see :obj:`_name_hash`).
    :ivar records: per hash, in the same order, the size (8 bytes, big
        endian) and the control SHA-1 (20 bytes).
    """

    hashes: array[int]
    records: bytes
    description: str = ""

    @classmethod
    def build(
        cls, entries: Iterator[tuple[str, int, bytes]], description: str = ""
    ) -> CompactApkIndex:
        """
        From ``(filename, size, control_sha1)`` triples; the first of
        several entries of one file name wins, as in :obj:`parse_apkindex`.
        """
        unsorted: array[int] = array("Q")
        values = bytearray()
        for filename, size, sha1 in entries:
            unsorted.append(_name_hash(filename))
            values += size.to_bytes(8, "big") + sha1
        # A stable sort keeps the first of equal hashes first, and
        # bisect_left finds that one.
        order = sorted(range(len(unsorted)), key=unsorted.__getitem__)
        hashes: array[int] = array("Q", (unsorted[i] for i in order))
        records = bytearray(len(values))
        for position, i in enumerate(order):
            records[position * _RECORD : (position + 1) * _RECORD] = values[
                i * _RECORD : (i + 1) * _RECORD
            ]
        return cls(hashes, bytes(records), description)

    def get(self, filename: str) -> ApkFacts | None:
        wanted = _name_hash(filename)
        position = bisect_left(self.hashes, wanted)
        if position == len(self.hashes) or self.hashes[position] != wanted:
            return None
        record = self.records[position * _RECORD : (position + 1) * _RECORD]
        return ApkFacts(filename, int.from_bytes(record[:8], "big"), record[8:])

    def __contains__(self, filename: str) -> bool:
        return self.get(filename) is not None

    def __len__(self) -> int:
        return len(self.hashes)

    @property
    def nbytes(self) -> int:
        """Memory it holds, about: what a cache of indexes counts."""
        return self.hashes.itemsize * len(self.hashes) + len(self.records) + 200


@attrs.frozen
class ApkIndex(Mapping[str, ApkIndexEntry]):
    """
    A parsed repository index: a read-only mapping from package file name
    (``NAME-VERSION.apk``) to its :obj:`ApkIndexEntry`.

    :ivar description: contents of the ``DESCRIPTION`` member (stripped).
    :ivar signed: whether the index carried ``.SIGN.*`` members.  The
        signature itself is not checked; apk does that.
    """

    entries: Mapping[str, ApkIndexEntry]
    description: str = ""
    signed: bool = False

    def __getitem__(self, filename: str) -> ApkIndexEntry:
        return self.entries[filename]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def repository_index_url(package_url: str) -> str | None:
    """
    The index that describes a package.

    :param package_url: an absolute URL or a bare path, such as
        ``http://host/alpine/v3.20/main/x86_64/busybox-1.36.1-r29.apk``.
    :return: the ``APKINDEX.tar.gz`` URL in the same directory (query and
        fragment dropped), or :obj:`None` when the URL does not end in
        ``/<arch>/<name>.apk`` for a known Alpine architecture.
    """
    parts = urlsplit(package_url)
    segments = parts.path.split("/")
    if len(segments) < 3:
        return None
    arch, filename = segments[-2], segments[-1]
    if arch not in ALPINE_ARCHES or not filename.endswith(".apk"):
        return None
    if filename == ".apk":
        return None
    index_path = "/".join(segments[:-1] + ["APKINDEX.tar.gz"])
    return urlunsplit((parts.scheme, parts.netloc, index_path, "", ""))


def package_filename(package_url: str) -> str | None:
    """
    The key to look a package URL up in an :obj:`ApkIndex`: its last path
    segment, percent-decoded (clients may send ``libstdc%2B%2B-...apk``), or
    :obj:`None` when :obj:`repository_index_url` does not recognise the URL.
    """
    if repository_index_url(package_url) is None:
        return None
    return unquote(urlsplit(package_url).path.rsplit("/", 1)[-1])


_T = TypeVar("_T")


def _read_archive(
    fileobj: IO[bytes], max_index_bytes: int, read_index: Callable[[IO[bytes]], _T]
) -> tuple[_T, str, bool]:
    """
    Walk an ``APKINDEX.tar.gz``, streaming: ``read_index`` reads the
    ``APKINDEX`` member; its result, the description, and whether the
    archive was signed.
    """
    reader = ConcatenatedGzipReader(fileobj, max_index_bytes)
    found: list[_T] = []
    description = ""
    signed = False
    try:
        with tarfile.open(fileobj=reader, mode="r|") as archive:
            for member in archive:
                if member.name.startswith(".SIGN."):
                    signed = True
                if not member.isfile():
                    continue
                if member.name == "APKINDEX" and not found:
                    content = archive.extractfile(member)
                    assert content is not None
                    found.append(read_index(content))
                elif member.name == "DESCRIPTION":
                    content = archive.extractfile(member)
                    assert content is not None
                    description = _decode(
                        content.read(_MAX_DESCRIPTION), "DESCRIPTION"
                    ).strip()
        # tarfile stops at the end-of-archive blocks; reading on to the end
        # checks the gzip trailers (CRC, length) and catches truncation.
        while reader.read(READ_SIZE):
            pass
    except tarfile.TarError as error:
        raise ApkIndexError(f"APKINDEX.tar.gz is not a valid tar: {error}") from None
    if not found:
        raise ApkIndexError("APKINDEX.tar.gz has no APKINDEX member")
    return found[0], description, signed


def parse_apkindex(
    fileobj: IO[bytes], *, max_index_bytes: int = 256 * 1024 * 1024
) -> ApkIndex:
    """
    Read an ``APKINDEX.tar.gz`` from ``fileobj``, streaming: memory grows with
    the number of entries, not with the file.  Every field is kept: for
    resolving dependencies; checking packages needs only
    :obj:`parse_compact_apkindex`.

    :param max_index_bytes: refuse archives that inflate to more than this.
    :raises ApkIndexError: for any malformed input.
    """
    entries, description, signed = _read_archive(
        fileobj, max_index_bytes, _parse_index_text
    )
    _log.debug(
        "Parsed apk index {description!r}: {count} packages, signed={signed}",
        description=description,
        count=len(entries),
        signed=signed,
    )
    return ApkIndex(entries=entries, description=description, signed=signed)


def parse_compact_apkindex(
    fileobj: IO[bytes],
    *,
    max_entries: int = MAX_INDEX_ENTRIES,
    max_index_bytes: int = MAX_INDEX_INFLATED,
) -> CompactApkIndex:
    """
    Read an ``APKINDEX.tar.gz`` into a :obj:`CompactApkIndex`, streaming, and
    checking every entry as :obj:`parse_apkindex` does.

    :raises ApkIndexTooLarge: more than ``max_entries`` entries, or more than
        ``max_index_bytes`` inflated; the parse stops there.
    :raises ApkIndexError: for any other malformed input.
    """

    def facts(content: IO[bytes]) -> CompactApkIndex:
        def triples() -> Iterator[tuple[str, int, bytes]]:
            for count, (fields, block_line) in enumerate(_index_blocks(content)):
                if count == max_entries:
                    raise ApkIndexTooLarge(
                        f"APKINDEX lists more than {max_entries} packages"
                    )
                entry = _entry_facts(fields, block_line)
                yield entry.filename, entry.size, entry.control_sha1

        return CompactApkIndex.build(triples())

    index, description, _ = _read_archive(fileobj, max_index_bytes, facts)
    return attrs.evolve(index, description=description)


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ApkIndexError(f"{where} is not UTF-8: {error}") from None


def _index_blocks(content: IO[bytes]) -> Iterator[tuple[dict[str, str], int]]:
    """
    The blocks of an ``APKINDEX``, one at a time: its fields (the first of
    each letter) and the line it starts on.
    """
    fields: dict[str, str] = {}
    block_line = 0
    line_number = 0
    while True:
        raw = content.readline(_MAX_INDEX_LINE)
        if not raw:
            break
        line_number += 1
        if not raw.endswith(b"\n") and len(raw) == _MAX_INDEX_LINE:
            raise ApkIndexError(
                f"APKINDEX line {line_number} is longer than {_MAX_INDEX_LINE} bytes"
            )
        line = _decode(raw, f"APKINDEX line {line_number}").rstrip("\r\n")
        if not line:
            if fields:
                yield fields, block_line
                fields = {}
            continue
        if len(line) < 2 or line[1] != ":":
            raise ApkIndexError(
                f"APKINDEX line {line_number}: expected 'X:value', got {line[:60]!r}"
            )
        if not fields:
            block_line = line_number
        fields.setdefault(line[0], line[2:])
    if fields:
        yield fields, block_line


def _parse_index_text(content: IO[bytes]) -> dict[str, ApkIndexEntry]:
    entries: dict[str, ApkIndexEntry] = {}
    for fields, block_line in _index_blocks(content):
        _add_entry(entries, fields, block_line)
    return entries


def _entry_facts(fields: Mapping[str, str], block_line: int) -> ApkFacts:
    where = f"APKINDEX entry at line {block_line}"
    for key in "PVCS":
        if not fields.get(key):
            raise ApkIndexError(f"{where} has no {key}: field")
    return ApkFacts(
        filename=f"{fields['P']}-{fields['V']}.apk",
        size=_parse_count(fields["S"], f"{where} S:"),
        control_sha1=_parse_control_checksum(fields["C"], where),
    )


def _add_entry(
    entries: dict[str, ApkIndexEntry], fields: Mapping[str, str], block_line: int
) -> None:
    where = f"APKINDEX entry at line {block_line}"
    facts = _entry_facts(fields, block_line)
    entry = ApkIndexEntry(
        name=fields["P"],
        version=fields["V"],
        size=facts.size,
        control_sha1=facts.control_sha1,
        arch=fields.get("A", ""),
        installed_size=(
            _parse_count(fields["I"], f"{where} I:") if "I" in fields else None
        ),
        depends=tuple(fields.get("D", "").split()),
        provides=tuple(fields.get("p", "").split()),
        description=fields.get("T", ""),
    )
    entries.setdefault(entry.filename, entry)


def _parse_count(text: str, where: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise ApkIndexError(f"{where} is not a byte count: {text[:40]!r}")
    return int(text)


def control_sha1_of(checksum: str) -> bytes:
    """
    The SHA-1 a control checksum as an index writes it (``Q1...``, as a
    stored package records it) names; ApkIndexError if it is not one.
    """
    return _parse_control_checksum(checksum, "the checksum")


def _parse_control_checksum(text: str, where: str) -> bytes:
    if not text.startswith("Q1"):
        raise ApkIndexError(
            f"{where} C: is not a Q1 (SHA-1) checksum: {text[:40]!r}"
        )
    try:
        digest = base64.b64decode(text[2:], validate=True)
    except (binascii.Error, ValueError):
        raise ApkIndexError(f"{where} C: is not valid base64: {text[:40]!r}") from None
    if len(digest) != _SHA1_LENGTH:
        raise ApkIndexError(
            f"{where} C: decodes to {len(digest)} bytes, a SHA-1 has {_SHA1_LENGTH}"
        )
    return digest
