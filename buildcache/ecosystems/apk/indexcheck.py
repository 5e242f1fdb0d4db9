"""
Checking an ``APKINDEX.tar.gz`` while it streams in, before it may replace
the stored one: it must be gzip, inflate whole (its members one after
another, as apk writes them), and begin with a tar header.  A captive
portal's page or an error page sent as 200, or a body cut short, fails,
and the good index stays stored (and is served stale).  The entries are
read later, and only when a package is checked against them
(:mod:`buildcache.ecosystems.apk.check`).

The check keeps no more than one tar header of inflated bytes, and inflates
in bounded steps: a small body that inflates to gigabytes cannot fill
memory, and one past :data:`MAX_INDEX_INFLATED` is refused.
"""

from __future__ import annotations

import zlib

from buildcache.ecosystems.apk.index import MAX_INDEX_INFLATED, ApkIndexError

__all__ = ["ApkIndexCheck"]

_GZIP_MAGIC = b"\x1f\x8b"
_TAR_BLOCK = 512
#: Where a POSIX tar header says ``ustar``.
_TAR_MAGIC_AT = 257
#: Inflated bytes produced per step.
_STEP = 64 * 1024


class ApkIndexCheck:
    """
    A :class:`buildcache.fetch.request.BodyVerifier` for an APKINDEX:
    ``update`` with each chunk, ``finish`` at the end; both raise
    :class:`ApkIndexError` on a body that is not an index.
    """

    def __init__(self, max_inflated: int = MAX_INDEX_INFLATED) -> None:
        self._max_inflated = max_inflated
        self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        self._start = b""
        self._head = b""
        self._inflated = 0
        #: The current member has ended and nothing of a next one came yet.
        self._between_members = False

    def update(self, data: bytes) -> None:
        if len(self._start) < len(_GZIP_MAGIC):
            self._start += data[: len(_GZIP_MAGIC) - len(self._start)]
            if not _GZIP_MAGIC.startswith(self._start[: len(_GZIP_MAGIC)]):
                raise ApkIndexError("not gzip: an APKINDEX.tar.gz starts with 1f 8b")
        self._inflate(data)

    def _inflate(self, data: bytes) -> None:
        while data:
            if self._between_members:
                self._inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                self._between_members = False
            try:
                out = self._inflater.decompress(data, _STEP)
            except zlib.error as e:
                raise ApkIndexError(f"not a gzip stream: {e}") from None
            self._took(out)
            if self._inflater.eof:
                # apk concatenates gzip members (signature, then index).
                data = self._inflater.unused_data
                self._between_members = True
            else:
                data = self._inflater.unconsumed_tail

    def _took(self, out: bytes) -> None:
        self._inflated += len(out)
        if self._inflated > self._max_inflated:
            raise ApkIndexError(
                f"inflates to more than {self._max_inflated} bytes"
            )
        if len(self._head) < _TAR_BLOCK:
            self._head += out[: _TAR_BLOCK - len(self._head)]
            if len(self._head) == _TAR_BLOCK and self._head[
                _TAR_MAGIC_AT:_TAR_MAGIC_AT + 5
            ] != b"ustar":
                raise ApkIndexError("its first member is not a tar archive")

    def finish(self) -> None:
        if len(self._start) < len(_GZIP_MAGIC):
            raise ApkIndexError("empty")
        while not (self._between_members or self._inflater.eof):
            # Output zlib held back at the step's bound.
            try:
                out = self._inflater.decompress(self._inflater.unconsumed_tail, _STEP)
            except zlib.error as e:
                raise ApkIndexError(f"not a gzip stream: {e}") from None
            if not out:
                break
            self._took(out)
        if not (self._between_members or self._inflater.eof):
            raise ApkIndexError("the gzip stream ends before its end")
        if len(self._head) < _TAR_BLOCK:
            raise ApkIndexError("too short to hold a tar header")
