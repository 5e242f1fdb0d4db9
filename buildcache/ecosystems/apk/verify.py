"""
Checking a downloaded ``.apk`` against its index entry while it streams
in: :class:`ApkVerifier` splits the package into its gzip members as they
arrive, hashes the control stream (the index's ``C:``), reads ``.PKGINFO``
for ``datahash`` and hashes the data stream against it, and counts the
size (the index's ``S:``).  The store feeds it every chunk it writes and
calls :meth:`ApkVerifier.finish` before it commits the file, so a package
that disagrees with its index is never kept.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib

import attrs
from twisted.logger import Logger

from buildcache.ecosystems.apk.archive import GZIP_WBITS, INFLATE_STEP
from buildcache.ecosystems.apk.index import (
    HEX_SHA256,
    ApkMismatch,
    PackageFacts,
    format_control_checksum,
)
from buildcache.store import BackgroundHashes, DigestBeside

__all__ = ["ApkVerifier"]

_log = Logger()


class _GzipMember:
    """
    One gzip member of a package as it streams in: inflates it to find where
    it ends, hashes its compressed bytes, and optionally keeps its inflated
    contents up to a cap.
    """

    def __init__(
        self,
        index: int,
        compressed_hash: "hashlib._Hash",
        keep_output_up_to: int | None,
    ) -> None:
        self.index = index
        self.compressed_hash = compressed_hash
        self.complete = False
        self.overflowed = False
        self.output = bytearray()
        self._keep_output_up_to = keep_output_up_to
        self._decompressor = zlib.decompressobj(wbits=GZIP_WBITS)

    def feed(self, data: bytes | memoryview) -> bytes:
        """
        Consume bytes of this member.

        :return: the bytes that follow this member's end (empty unless the
            member ended inside ``data``).
        :raises zlib.error: the member is not valid gzip.
        """
        pending: bytes | memoryview = data
        leftover = b""
        while True:
            produced = self._decompressor.decompress(pending, INFLATE_STEP)
            self._keep(produced)
            if self._decompressor.eof:
                leftover = self._decompressor.unused_data
                self.complete = True
                break
            pending = self._decompressor.unconsumed_tail
            if not pending and len(produced) < INFLATE_STEP:
                break
        self.compressed_hash.update(memoryview(data)[: len(data) - len(leftover)])
        return leftover

    def _keep(self, produced: bytes) -> None:
        if self._keep_output_up_to is None or self.overflowed:
            return
        if len(self.output) + len(produced) > self._keep_output_up_to:
            self.overflowed = True
            self.output = bytearray()
            return
        self.output += produced


class _HashedTail:
    """
    The data stream of a package whose ``.PKGINFO`` names its ``datahash``:
    everything after the control stream, hashed and never inflated.  The
    hash alone vouches for those bytes (a cut, altered or extended stream
    cannot match it), and inflating them cost more than everything else a
    miss does together.
    """

    overflowed = False
    complete = False

    def __init__(self, index: int, hashes: BackgroundHashes | None) -> None:
        self.index = index
        # Hashed beside the reactor when a hash thread is given: these are
        # most of a package's bytes.
        self.compressed_hash = DigestBeside(hashlib.sha256(), hashes)
        self.received = 0

    def feed(self, data: bytes | memoryview) -> bytes:
        self.compressed_hash.update(data)
        self.received += len(data)
        return b""


@attrs.frozen
class _ControlFacts:
    member_index: int
    sha1: bytes
    datahash: str | None


@attrs.define
class ApkVerifier:
    """
    Checks a package against its index entry while it streams in.

    Call :obj:`update` with each chunk as it arrives (any boundaries), then
    :obj:`finish`.  ``update`` never raises for bad content: it records the first
    problem (see :obj:`mismatch`, which lets a caller abandon a download early)
    and ``finish`` raises it.

    Memory stays bounded whatever the package size: compressed bytes are
    hashed and dropped, inflated output is only kept for members that may
    still be the signature or control stream, up to ``max_control_bytes``.

    :ivar entry: the index entry the package must match.
    :ivar max_control_bytes: largest inflated signature or control stream
        accepted; real ones are a few kilobytes.
    """

    entry: PackageFacts
    max_control_bytes: int = 1024 * 1024
    #: Where the data stream is hashed beside the reactor (the store's
    #: thread); None: here.
    hashes: BackgroundHashes | None = None
    _bytes_received: int = attrs.field(init=False, default=0)
    _mismatch: ApkMismatch | None = attrs.field(init=False, default=None)
    _finished: bool = attrs.field(init=False, default=False)
    _current: _GzipMember | _HashedTail | None = attrs.field(init=False, default=None)
    _members_completed: int = attrs.field(init=False, default=0)
    _signed: bool = attrs.field(init=False, default=False)
    _control: _ControlFacts | None = attrs.field(init=False, default=None)
    _data_sha256: str | None = attrs.field(init=False, default=None)

    @property
    def bytes_received(self) -> int:
        """Total bytes passed to :obj:`update` so far."""
        return self._bytes_received

    @property
    def control_sha1(self) -> bytes | None:
        """
        The SHA-1 of the package's control stream, once it has streamed in
        (whatever the index says): what a stored package's ``C:`` is.
        """
        return None if self._control is None else self._control.sha1

    @property
    def mismatch(self) -> ApkMismatch | None:
        """
        The first problem found so far, if any.  Size shortfalls and
        checksum mismatches only show up in :obj:`finish`.
        """
        return self._mismatch

    def update(self, chunk: bytes) -> None:
        """
        Account for the next bytes of the package.

        :raises RuntimeError: after :obj:`finish`.
        """
        if self._finished:
            raise RuntimeError("ApkVerifier.update() called after finish()")
        self._bytes_received += len(chunk)
        if self._mismatch is not None or not chunk:
            return
        if self._bytes_received > self.entry.size:
            self._fail(
                f"{self.entry.filename}: more than the {self.entry.size} bytes "
                "the index lists"
            )
            return
        remaining: bytes = chunk
        while remaining:
            member = self._current
            if member is None:
                member = self._start_member()
                if member is None:
                    return
                self._current = member
            try:
                remaining = member.feed(remaining)
            except zlib.error as error:
                self._fail(
                    f"{self.entry.filename}: gzip stream {member.index} is "
                    f"corrupt: {error}"
                )
                return
            if member.overflowed:
                self._fail(
                    f"{self.entry.filename}: gzip stream {member.index} inflates "
                    f"to more than {self.max_control_bytes} bytes before any "
                    ".PKGINFO, so it is neither a signature nor a control stream"
                )
                return
            if isinstance(member, _GzipMember) and member.complete:
                self._current = None
                self._members_completed += 1
                self._complete_member(member)
                if self._mismatch is not None:
                    return

    def finish(self) -> None:
        """
        Decide, once the whole package has been passed to :obj:`update`.

        :raises ApkMismatch: the package does not match the index entry.
        :raises RuntimeError: called twice.
        """
        if self._finished:
            raise RuntimeError("ApkVerifier.finish() called twice")
        self._finished = True
        name = self.entry.filename
        if self._bytes_received != self.entry.size:
            raise self._logged(
                ApkMismatch(
                    f"{name}: size is {self._bytes_received} bytes, the index "
                    f"says {self.entry.size}"
                )
            )
        if self._mismatch is not None:
            raise self._logged(self._mismatch)
        tail = self._current
        if isinstance(tail, _HashedTail) and tail.received:
            self._current = None
            self._data_sha256 = tail.compressed_hash.result().hexdigest()
        elif isinstance(tail, _HashedTail):
            self._current = None
        if self._current is not None:
            raise self._logged(
                ApkMismatch(
                    f"{name}: truncated, gzip stream {self._current.index} "
                    "has no end"
                )
            )
        if self._control is None:
            raise self._logged(ApkMismatch(f"{name}: no control stream (.PKGINFO)"))
        if self._data_sha256 is None:
            raise self._logged(
                ApkMismatch(f"{name}: no data stream after the control stream")
            )
        if self._control.sha1 != self.entry.control_sha1:
            actual = format_control_checksum(self._control.sha1)
            raise self._logged(
                ApkMismatch(
                    f"{name}: control stream checksum {actual} does not match "
                    f"the index's C:{self.entry.control_checksum}"
                )
            )
        datahash = self._control.datahash
        if datahash is not None and datahash != self._data_sha256:
            raise self._logged(
                ApkMismatch(
                    f"{name}: data stream sha256 {self._data_sha256} does not "
                    f"match .PKGINFO datahash {datahash}"
                )
            )
        # A match says nothing the access line does not: no event (a debug
        # one was written to the log file on every package, a second line
        # per miss).

    def _logged(self, mismatch: ApkMismatch) -> ApkMismatch:
        _log.info(
            "apk verification failed: {reason}",
            reason=mismatch.reason,
            filename=self.entry.filename,
        )
        return mismatch

    def _fail(self, reason: str) -> None:
        if self._mismatch is None:
            self._mismatch = ApkMismatch(reason)

    def _start_member(self) -> _GzipMember | _HashedTail | None:
        index = self._members_completed
        if self._control is None:
            # Either the signature or the control stream: only the control
            # stream's SHA-1 is ever compared, and its inflated tar is needed
            # to tell the two apart.
            return _GzipMember(index, hashlib.sha1(), self.max_control_bytes)
        if index == self._control.member_index + 1:
            if self._control.datahash is not None:
                return _HashedTail(index, self.hashes)
            return _GzipMember(index, hashlib.sha256(), None)
        self._fail(
            f"{self.entry.filename}: unexpected gzip stream {index} after the "
            "data stream"
        )
        return None

    def _complete_member(self, member: _GzipMember) -> None:
        if self._control is not None:
            self._data_sha256 = member.compressed_hash.hexdigest()
            return
        name = self.entry.filename
        try:
            names, pkginfo = _read_control_tar(bytes(member.output))
        except (tarfile.TarError, ValueError) as error:
            self._fail(f"{name}: gzip stream {member.index} is not a tar: {error}")
            return
        if pkginfo is not None:
            try:
                datahash = _pkginfo_datahash(pkginfo)
            except ValueError as error:
                self._fail(f"{name}: bad .PKGINFO: {error}")
                return
            self._control = _ControlFacts(
                member_index=member.index,
                sha1=member.compressed_hash.digest(),
                datahash=datahash,
            )
        elif member.index == 0 and names and all(
            entry_name.startswith(".SIGN.") for entry_name in names
        ):
            self._signed = True
        elif member.index == 0:
            self._fail(
                f"{name}: first gzip stream holds neither .PKGINFO nor a "
                f".SIGN.* signature (found {names[:5]!r})"
            )
        else:
            self._fail(f"{name}: no .PKGINFO in the first two gzip streams")


def _read_control_tar(content: bytes) -> tuple[list[str], bytes | None]:
    """
    Names in a (possibly end-of-archive-less) tar, and the contents of its
    ``.PKGINFO`` if it has one.
    """
    names: list[str] = []
    pkginfo: bytes | None = None
    with tarfile.open(fileobj=io.BytesIO(content), mode="r:") as archive:
        for member in archive:
            names.append(member.name)
            if member.name == ".PKGINFO" and member.isfile() and pkginfo is None:
                extracted = archive.extractfile(member)
                assert extracted is not None
                pkginfo = extracted.read()
    return names, pkginfo


def _pkginfo_datahash(pkginfo: bytes) -> str | None:
    """
    The ``datahash`` of a ``.PKGINFO`` (``key = value`` lines, ``#`` comments),
    or :obj:`None` when it has none.

    :raises ValueError: undecodable, or a ``datahash`` that is not hex SHA-256.
    """
    text = pkginfo.decode("utf-8")
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        if separator and key.strip() == "datahash":
            datahash = value.strip().lower()
            if not HEX_SHA256.fullmatch(datahash):
                raise ValueError(f"datahash is not a hex sha256: {value.strip()!r}")
            return datahash
    return None

