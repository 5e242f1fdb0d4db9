"""
One client's view of a download (:class:`DownloadBody`): the bytes it may
read so far, from the spool file or from memory, and what it tells the
download about its progress.  Readers only read; the download
(:mod:`buildcache.fetch.download`) changes its own state.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from attrs import define
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from buildcache.fetch.download import Download

#: Bytes of a body streamed before its check that are held back until the
#: check has passed (see :attr:`UpstreamRequest.stream_before_check`).
WITHHELD_TAIL = 64 * 1024


@define(eq=False)
class DownloadBody:
    """
    One client's view of a download in progress (a
    :class:`buildcache.engine.body.BodySource`).

    ``fd`` reads the download's spool file (-1 when it has none).  A
    streaming reader reports its progress with :meth:`advance`; that is
    what a download kept in memory waits for (see :class:`Download`).
    """

    download: Download
    fd: int
    #: The offset this reader has reached, -1 until it first reports one.
    position: int = -1
    #: Set when the reader fell too far behind a download kept in memory:
    #: the bytes it needs next are gone.
    dropped: bool = False
    closed: bool = False

    def available(self) -> int:
        download = self.download
        if download.request.withholds_tail and (
            not download.finished or download.failure is not None
        ):
            return max(0, download.received - WITHHELD_TAIL)
        return download.received

    def in_file(self) -> int:
        return self.download.spooled

    def read(self, offset: int, count: int) -> bytes:
        """
        Up to ``count`` bytes at ``offset``, from the spool file or from
        memory; empty when they are no longer (or not yet) there.
        """
        download = self.download
        if offset < download.spooled:
            return os.pread(self.fd, min(count, download.spooled - offset), offset)
        if self.dropped:
            return b""
        return download.from_memory(offset, count)

    def advance(self, offset: int) -> None:
        """
        This reader needs no byte before ``offset`` any more.
        """
        if not self.dropped:
            self.position = offset
            self.download.reader_moved()

    def drop(self) -> None:
        """
        The bytes this reader needs next are gone (see
        :meth:`Download.drop_laggards`): its response ends incomplete.
        """
        self.dropped = True
        self.position = -1

    def finished(self) -> bool:
        return self.download.finished

    def failure(self) -> Failure | None:
        return self.download.failure

    def digest(self) -> str | None:
        """
        The sha256 of the whole body once it has ended whole in its spool
        file; None before, or when it went on in memory.
        """
        return self.download.sha256

    def when_more(self, callback: Callable[[], None]) -> None:
        self.download.when_more(callback)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.download.reader_closed(self)


async def drained(body: DownloadBody) -> None:
    """
    Wait until the download behind ``body`` has settled (ended and, if it
    was storable, been stored); releases ``body``.
    """
    try:
        await body.download.when_settled()
    finally:
        body.close()
