"""
Unwrapping apk's concatenated gzip streams: an ``APKINDEX.tar.gz`` (a
signature stream, then the index's tar) and a package (signature, control
and data streams) are several gzip members in a row, which Python's
``gzip`` and ``tarfile`` stop reading after the first.

This module owns that reader (:class:`ConcatenatedGzipReader`, bounded in
what it inflates), the zlib settings the streaming package check shares
with it, and the errors an unreadable index raises.  What the members hold
is :mod:`buildcache.ecosystems.apk.index`'s.
"""

from __future__ import annotations

import io
import zlib
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "ApkIndexError",
    "ApkIndexTooLarge",
    "ConcatenatedGzipReader",
    "GZIP_WBITS",
    "INFLATE_STEP",
    "READ_SIZE",
]

GZIP_WBITS = 31
# Upper bound on the output of one zlib call: keeps memory flat even for a
# stream that inflates a thousandfold.
INFLATE_STEP = 64 * 1024
#: Bytes read from the compressed source at a time.
READ_SIZE = 64 * 1024


class ApkIndexError(Exception):
    """
    An ``APKINDEX.tar.gz`` could not be read: corrupt gzip or tar, no
    ``APKINDEX`` member, or an entry with missing or malformed fields.
    """


class ApkIndexTooLarge(ApkIndexError):
    """
    An ``APKINDEX.tar.gz`` lists more packages, or inflates to more bytes,
    than an index is allowed to (see :obj:`buildcache.ecosystems.apk.index.MAX_INDEX_ENTRIES`).
    """


class ConcatenatedGzipReader(io.RawIOBase):
    """
    Read-only binary stream of the decompressed contents of every gzip
    member in ``source``, one after the other, as apk reads them.
    """

    def __init__(self, source: IO[bytes], max_output: int) -> None:
        super().__init__()
        self._source = source
        self._max_output = max_output
        self._output_total = 0
        self._decompressor: zlib._Decompress | None = None
        self._members_started = 0
        self._input = b""
        self._pending = b""
        self._output_may_be_pending = False
        self._exhausted = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        target = memoryview(buffer).cast("B")
        while not self._pending:
            if self._exhausted:
                return 0
            self._inflate_more()
        count = min(len(target), len(self._pending))
        target[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def _inflate_more(self) -> None:
        member_open = self._decompressor is not None and not self._decompressor.eof
        if not self._input and not self._output_may_be_pending:
            self._input = self._source.read(READ_SIZE)
            if not self._input:
                if member_open:
                    raise ApkIndexError(
                        "APKINDEX.tar.gz is truncated: gzip stream "
                        f"{self._members_started} ends early"
                    )
                if self._members_started == 0:
                    raise ApkIndexError("APKINDEX.tar.gz is empty")
                self._exhausted = True
                return
        if not member_open:
            self._decompressor = zlib.decompressobj(wbits=GZIP_WBITS)
            self._members_started += 1
        assert self._decompressor is not None
        try:
            produced = self._decompressor.decompress(self._input, INFLATE_STEP)
        except zlib.error as error:
            raise ApkIndexError(
                f"APKINDEX.tar.gz gzip stream {self._members_started} is "
                f"corrupt: {error}"
            ) from None
        if self._decompressor.eof:
            self._input = self._decompressor.unused_data
            self._output_may_be_pending = False
        else:
            self._input = self._decompressor.unconsumed_tail
            self._output_may_be_pending = len(produced) == INFLATE_STEP
        self._output_total += len(produced)
        if self._output_total > self._max_output:
            raise ApkIndexTooLarge(
                f"APKINDEX.tar.gz inflates to more than {self._max_output} bytes"
            )
        self._pending = produced
