"""
One upstream response on its way to its clients and to the store: the
:class:`Download` state machine.  Each client's view of it is a
:class:`buildcache.fetch.reader.DownloadBody`.

The fetcher (:mod:`buildcache.fetch.fetcher`) owns every download and
moves it through its :class:`~buildcache.fetch.phase.Phase` (the table of
legal moves is :data:`buildcache.fetch.phase.NEXT`) with the transition
methods below;
each checks the phase it leaves and raises :class:`IllegalTransition`
otherwise.  Readers only read, and report their progress::

    from                          method (event)                       to
    CONNECTING                    start_body                           SPOOLING
    CONNECTING                    start_body (no room, disk refused)   IN_MEMORY
    CONNECTING                    not_modified (a 304)                 NOT_MODIFIED
    SPOOLING                      take (a write fails)                 IN_MEMORY
    IN_MEMORY                     take (slowest reader too far behind) HELD_BACK
    HELD_BACK                     reader_moved, drop_laggards          IN_MEMORY
    IN_MEMORY, HELD_BACK          abandon (nobody can use it)          ABANDONED
    SPOOLING, IN_MEMORY,
      HELD_BACK                   complete (whole and checked)         COMPLETE
    any of the five above         fail                                 FAILED
    NOT_MODIFIED, COMPLETE,
      FAILED                      settle (stored, if it was to be)     SETTLED
    SPOOLING, IN_MEMORY,
      HELD_BACK, ABANDONED        restart (a shared copy failed)       CONNECTING

- ``SPOOLING``: the body goes to a spool file in the store, which every
  reader follows at its own pace.
- ``IN_MEMORY``: the disk refused it (full, failing, no room under the
  limit): the bytes from there on are kept in memory for the readers
  already attached, and nothing is stored.  ``HELD_BACK``: the upstream is
  paused because the slowest streaming reader is more than
  :data:`MEMORY_BUFFER` bytes behind; it resumes when that reader has
  caught up, or when readers stuck for a whole idle timeout are dropped
  (:meth:`Download.drop_laggards`).  So memory stays bounded and the
  download goes at the pace of its slowest reader.
- ``ABANDONED``: in memory, and nobody can use it (every reader left, or
  it must be checked whole before anyone sees it): the upstream is
  stopped, and the fetcher fails it.
- ``COMPLETE``: whole and checked; readers get all of it while it is
  being stored.  ``SETTLED``: ended, and stored if it was to be
  (:meth:`Download.when_settled`).

Clients get their :class:`UpstreamAnswer` when the body starts, or, for a
request that holds its answer until the body is checked, when it is
complete; a download that fails before that fails their answer.

A download may first read a copy from the shared tier
(:meth:`Download.read_shared`, see :mod:`buildcache.fetch.shared`): that
body is held from every client until it is checked whole, its bytes are
not counted as fetched upstream, and its clients' answers say it was
shared.  A copy that fails is forgotten (:meth:`Download.restart`) before
anyone saw a byte of it, and the download goes upstream.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from attrs import Factory, define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure

from buildcache.credentials import redact
from buildcache.fetch.phase import (
    ENDED,
    MEMORY,
    NEXT,
    RECEIVING,
    IllegalTransition,
    Phase,
)
from buildcache.fetch.reader import DownloadBody
from buildcache.fetch.request import UpstreamAnswer, UpstreamRequest
from buildcache.fetch.shared import SharedLease
from buildcache.store import NoRoom, ObjectWriter, Store, mismatch
from buildcache.turns import Waiters

#: Checked files larger than this (or of unknown size) are streamed before
#: their check ends (see :attr:`UpstreamRequest.stream_before_check`):
#: holding a large file back until it has all arrived would leave its
#: clients without a byte for longer than they wait (pip: 15 s).
STREAM_CHECKED_ABOVE = 4 * 1024 * 1024

#: Most bytes a download that cannot be spooled to disk keeps in memory for
#: its slowest reader before it pauses the upstream.
MEMORY_BUFFER = 1024 * 1024


def spool_plan(counted: bool, held: bool) -> str:
    """
    Where a body goes (or its bytes from now on), given whether room for
    it is held under the size limit (``counted``: a declared length
    reserved, or the room of a body of unknown length still growing), and
    whether nobody may see it before its check (``held``):

    - ``"spool"``: to its spool file, counted against ``--max-size``;
    - ``"uncounted"``: to its spool file, holding room outside the limit
      (see :func:`buildcache.store.uncounted_limit`): its check needs it
      whole, so memory will not do, and refusing it would fail a request
      the cache used to serve (an index page beside a large download);
    - ``"memory"``: streamed to its readers from memory, not stored.
    """
    if counted:
        return "spool"
    if held:
        return "uncounted"
    return "memory"


@define(eq=False)
class Download:
    """
    One upstream request in flight, shared by every client of its key; a
    state machine (see the module docstring) that the fetcher drives.
    """

    log = Logger()

    request: UpstreamRequest
    store: Store
    #: Told of every body byte received (the activity's upstream count).
    on_received: Callable[[int], None] | None = None
    #: Told when the body goes on in memory: it no longer holds the bytes
    #: a new client would need from the start (the fetcher stops sharing it).
    on_unspooled: Callable[[Download], None] | None = None
    #: Told when a failed shared copy is forgotten (:meth:`restart`): the
    #: download holds nothing a new client would miss (the fetcher shares
    #: it again).
    on_restarted: Callable[[Download], None] | None = None
    #: The shared tier's lease this download fetches under, if any (see
    #: :mod:`buildcache.fetch.shared`): the fetcher releases it as soon
    #: as the body cannot be stored.
    lease: SharedLease | None = None
    #: Body bytes received so far.
    received: int = field(default=0, init=False)
    #: Bytes of the body in the spool file: all of them unless the body
    #: went on in memory (see :attr:`spool_error`).
    spooled: int = field(default=0, init=False)
    _phase: Phase = field(default=Phase.CONNECTING, init=False)
    _status: int = field(default=0, init=False)
    _headers: dict[str, str] = field(factory=dict, init=False)
    _spool_error: OSError | None = field(default=None, init=False)
    _failure: Failure | None = field(default=None, init=False)
    #: The failure its answer fails with: set when it failed before it
    #: answered anyone.
    _answer_failure: Failure | None = field(default=None, init=False)
    _sha256: str | None = field(default=None, init=False)
    _writer: ObjectWriter | None = field(default=None, init=False)
    _read_fd: int = field(default=-1, init=False)
    _settled_waiters: Waiters = field(default=Factory(Waiters), init=False)
    _answer_waiters: list[Deferred[UpstreamAnswer]] = field(factory=list, init=False)
    _more_waiters: list[Callable[[], None]] = field(factory=list, init=False)
    _bodies: list[DownloadBody] = field(factory=list, init=False)
    _memory: bytearray = field(factory=bytearray, init=False)
    _memory_start: int = field(default=0, init=False)
    _upstream: IPushProducer | None = field(default=None, init=False)
    #: The digest of the body, carried on from the spool file's once the
    #: body goes on in memory, so that a digest can still be checked.
    _memory_hash: Any = field(default=None, init=False)
    #: The body is a copy read from the shared tier (see
    #: :meth:`read_shared`).
    _shared: bool = field(default=False, init=False)

    # -- what readers see -------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def status(self) -> int:
        """
        The upstream status (0 until the response head has arrived).
        """
        return self._status

    @property
    def headers(self) -> dict[str, str]:
        """
        The end-to-end response headers (a copy).
        """
        return dict(self._headers)

    @property
    def finished(self) -> bool:
        """
        No more bytes will arrive (the body is whole, or failed).
        """
        return self._phase in ENDED

    @property
    def settled(self) -> bool:
        return self._phase is Phase.SETTLED

    @property
    def whole(self) -> bool:
        """
        The body has all arrived and passed its checks, and is being
        stored (see :meth:`complete`; a settled download is no longer
        joined).
        """
        return self._phase is Phase.COMPLETE

    @property
    def abandoned(self) -> bool:
        return self._phase is Phase.ABANDONED

    @property
    def failure(self) -> Failure | None:
        return self._failure

    @property
    def spool_error(self) -> OSError | None:
        """
        Why the body went on in memory (None while it is spooled).
        """
        return self._spool_error

    @property
    def sha256(self) -> str | None:
        """
        The digest of the whole body, once it has ended whole in its spool
        file (None when it went on in memory).
        """
        return self._sha256

    @property
    def spool(self) -> ObjectWriter | None:
        """
        The spool file the body is written to; None once it went on in
        memory (or before the body started).
        """
        return self._writer if self._spool_error is None else None

    @property
    def readers(self) -> int:
        return len(self._bodies)

    @property
    def memory_held(self) -> int:
        """
        Bytes of the body held in memory for its slowest reader.
        """
        return len(self._memory)

    @property
    def shared(self) -> bool:
        """
        Whether the body is a copy read from the shared tier.
        """
        return self._shared

    @property
    def holds_until_checked(self) -> bool:
        """
        Whether clients are answered only once the body is whole and
        checked: a shared copy is (a bad copy is never served), but for a
        large file whose request streams before its check (its tail is
        withheld until the check passes, as from upstream).
        """
        return self.request.holds_until_checked or (
            self._shared and not self.request.stream_before_check
        )

    def when_settled(self) -> Deferred[None]:
        """
        Fires once the download has ended and what it stores (if anything)
        is in the store: later lookups of its key see it.
        """
        return self._settled_waiters.wait(self.settled)

    def join(self) -> Deferred[UpstreamAnswer]:
        """
        Wait for the answer; see :class:`UpstreamAnswer`.
        """
        if self._answered:
            return self._make_answer()
        d: Deferred[UpstreamAnswer] = Deferred()
        self._answer_waiters.append(d)
        return d

    def when_more(self, callback: Callable[[], None]) -> None:
        if self.finished:
            callback()
        else:
            self._more_waiters.append(callback)

    def from_memory(self, offset: int, count: int) -> bytes:
        start = offset - self._memory_start
        if start < 0:
            return b""
        return bytes(self._memory[start:start + count])

    def memory_mismatch(self) -> str | None:
        """
        For a body that went on in memory: why it is not the one its
        request expects, or None.
        """
        if self._memory_hash is None:
            return None
        return mismatch(
            self.received, self._memory_hash.hexdigest(),
            self.request.expected_size, self.request.expected_sha256,
        )

    # -- transitions ------------------------------------------------------

    def _go(self, phase: Phase) -> Phase:
        """
        Move to ``phase``; the phase left.
        """
        left = self._phase
        if phase not in NEXT[left]:
            raise IllegalTransition(left, phase)
        self._phase = phase
        return left

    def read_shared(self) -> None:
        """
        The body about to start is a copy from the shared tier: held from
        clients until checked, not counted as fetched upstream.
        """
        if self._phase is not Phase.CONNECTING:
            raise IllegalTransition(self._phase, "reading a shared copy")
        self._shared = True

    @property
    def restartable(self) -> bool:
        """
        Whether :meth:`restart` may forget the body: a shared copy nobody
        has been given.
        """
        return self._shared and not self._bodies

    def restart(self) -> None:
        """
        SPOOLING, IN_MEMORY, HELD_BACK or ABANDONED → CONNECTING: the shared
        copy being read failed (cut short, or its check), and nobody has
        been answered with it: forget it, to fetch the body upstream.
        """
        if not self._shared or self._bodies:
            raise IllegalTransition(self._phase, "a restart of an answered body")
        if self._phase is not Phase.CONNECTING:
            self._go(Phase.CONNECTING)
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1
        self._shared = False
        self._status, self._headers = 0, {}
        self.received = self.spooled = 0
        self._spool_error = None
        self._sha256 = None
        self._memory = bytearray()
        self._memory_start = 0
        self._memory_hash = None
        self._upstream = None
        if self.on_restarted is not None:
            self.on_restarted(self)

    def resume_upstream(self) -> None:
        """
        The shared copy being streamed failed part-way, and the rest of the
        body now comes from upstream (a range): its bytes count as
        fetched upstream from here on.
        """
        if not self._shared or self._phase is not Phase.SPOOLING:
            raise IllegalTransition(self._phase, "resuming a copy upstream")
        self._shared = False

    def not_modified(self, headers: dict[str, str]) -> None:
        """
        CONNECTING → NOT_MODIFIED: a 304, with no body; its clients serve
        their stored copy.
        """
        self._go(Phase.NOT_MODIFIED)
        self._status, self._headers = 304, headers
        self._answer()

    def start_body(
        self, status: int, headers: dict[str, str], spool: ObjectWriter | OSError
    ) -> None:
        """
        CONNECTING → SPOOLING, or IN_MEMORY when ``spool`` is why the body
        cannot be spooled; clients are answered now unless the request
        holds its answer until the body is checked.
        """
        if self._phase is not Phase.CONNECTING:
            raise IllegalTransition(self._phase, "a second body")
        self._status, self._headers = status, headers
        if isinstance(spool, OSError):
            self._to_memory(spool)
        else:
            self._go(Phase.SPOOLING)
            self._writer = spool
            try:
                self._read_fd = spool.reader_fd()
            except OSError as e:
                self._to_memory(e)
        if not self.holds_until_checked:
            self._answer()

    def upstream_connected(self, producer: IPushProducer) -> None:
        """
        The body's transport: paused, resumed or stopped for the readers.
        A download that cannot be kept, and that nobody could use, is
        abandoned at once.
        """
        self._upstream = producer
        self._abandon_if_useless()

    def upstream_lost(self) -> None:
        self._upstream = None

    def take(self, data: bytes) -> bool:
        """
        Body bytes have arrived; False when the download is abandoned (the
        bytes are dropped).
        """
        phase = self._phase
        if phase is Phase.ABANDONED:
            return False
        if phase not in RECEIVING:
            raise IllegalTransition(phase, "receiving bytes")
        if phase is Phase.SPOOLING:
            writer = self._writer
            assert writer is not None
            try:
                self._write(writer, data)
            except OSError as e:
                self._to_memory(e)
            except sqlite3.Error as e:
                # Making room failed in the index: as a failing disk.
                self._to_memory(OSError(f"cache index: {e}"))
            else:
                self.spooled += len(data)
        self.received += len(data)
        if self.on_received is not None and not self._shared:
            self.on_received(len(data))
        if self._phase in MEMORY:
            if self._memory_hash is not None:
                # None: a body taken without a digest (see Store.writer).
                self._memory_hash.update(data)
            self._memory += data
            # Keep only what a streaming reader still needs.
            self.reader_moved()
        self._notify()
        if (
            self._phase is Phase.IN_MEMORY
            and self._upstream is not None
            and len(self._memory) > MEMORY_BUFFER
        ):
            self._go(Phase.HELD_BACK)
            self._upstream.pauseProducing()
        if phase is Phase.SPOOLING and self._spool_error is not None:
            return not self._abandon_if_useless()
        return True

    def complete(self) -> None:
        """
        RECEIVING → COMPLETE: the body is whole and has passed its checks.
        Clients joining from now on (also while it is being stored) get its
        length, and so ranges.
        """
        self._go(Phase.COMPLETE)
        if self.spool is not None:
            self._sha256 = self.spool.sha256
        self._headers["content-length"] = str(self.received)
        if self.holds_until_checked:
            self._answer()
        self._notify()

    def fail(self, failure: Failure) -> None:
        """
        Any phase before COMPLETE → FAILED: nothing is stored; readers see
        their responses cut short, and clients not yet answered get
        ``failure``.
        """
        answered = self._answered
        self._go(Phase.FAILED)
        if self._writer is not None:
            self._writer.abort()
        self._failure = failure
        if not answered:
            self._answer_failure = failure
            self._answer()
        self._notify()

    def settle(self) -> None:
        """
        COMPLETE, NOT_MODIFIED or FAILED → SETTLED: what it stores is in
        the store (see :meth:`when_settled`).
        """
        self._go(Phase.SETTLED)
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1
        self._settled_waiters.fire()

    def abandon(self) -> None:
        """
        IN_MEMORY or HELD_BACK → ABANDONED: stop the upstream.
        """
        self._go(Phase.ABANDONED)
        if self._upstream is not None:
            self._upstream.stopProducing()

    def _to_memory(self, error: OSError) -> None:
        """
        CONNECTING or SPOOLING → IN_MEMORY: the disk refused the body.
        """
        self._go(Phase.IN_MEMORY)
        self._spool_error = error
        self._memory_start = self.spooled
        if self._writer is not None:
            self._memory_hash = self._writer.hash_state()
            # Readers' descriptors keep the bytes already written.
            self._writer.abort()
        else:
            self._memory_hash = hashlib.sha256()
        if self.on_unspooled is not None:
            self.on_unspooled(self)
        if isinstance(error, NoRoom):
            self.log.info(
                "Not storing {url} ({error}); streaming it to its clients"
                " after {size} bytes in tmp/",
                event="streamed_not_stored",
                url=redact(self.request.url),
                size=self.spooled,
                error=str(error),
            )
            return
        self.log.error(
            "Cannot write {url} to the cache after {size} bytes: {error};"
            " streaming it to its clients from memory, not storing it",
            url=redact(self.request.url),
            size=self.spooled,
            error=str(error),
        )

    def _abandon_if_useless(self) -> bool:
        """
        Abandon a download in memory when nobody may see it before it is
        checked, or nobody is reading it: it cannot be kept, so it is not
        worth fetching.  (One streamed before its check is checked in
        memory, see :meth:`memory_mismatch`.)
        """
        if self._phase not in MEMORY or not (
            self.holds_until_checked or not self._bodies
        ):
            return False
        self.abandon()
        return True

    # -- readers ----------------------------------------------------------

    def reader_moved(self) -> None:
        """
        Forget the bytes every streaming reader has passed, and let the
        upstream go on once the slowest has caught up.
        """
        if self._spool_error is None:
            return
        positions = [b.position for b in self._bodies if b.position >= 0]
        # A reader of a range may wait at an offset not yet received: the
        # bytes kept start where the body has got to, at most.
        floor = min(min(positions) if positions else self.received, self.received)
        if floor > self._memory_start:
            del self._memory[: floor - self._memory_start]
            self._memory_start = floor
        if (
            self._phase is Phase.HELD_BACK
            and self._upstream is not None
            and len(self._memory) <= MEMORY_BUFFER // 2
        ):
            self._go(Phase.IN_MEMORY)
            self._upstream.resumeProducing()

    def reader_closed(self, body: DownloadBody) -> None:
        self._bodies.remove(body)
        if self._spool_error is None:
            return
        length = self._headers.get("content-length")
        whole = length is not None and self.received >= int(length)
        if (
            not (self._bodies or whole)
            and self._phase in MEMORY
            and self._upstream is not None
        ):
            # Nothing will be stored and nobody is reading.
            self.abandon()
            return
        self.reader_moved()

    def drop_laggards(self) -> bool:
        """
        The upstream has been held back for a whole idle timeout: give up
        on the readers holding it (their responses end incomplete) so the
        others go on.  False when it was not held back.
        """
        if self._phase is not Phase.HELD_BACK:
            return False
        limit = self.received - MEMORY_BUFFER // 2
        laggards = [b for b in self._bodies if 0 <= b.position < limit]
        for body in laggards:
            body.drop()
        self.log.warn(
            "Dropped {count} clients of {url}: they kept it from being"
            " fetched for the upstream timeout while it could not be spooled",
            count=len(laggards),
            url=redact(self.request.url),
        )
        self.reader_moved()
        return True

    # -- inside -----------------------------------------------------------

    @property
    def _answered(self) -> bool:
        """
        Whether clients have been answered (see :meth:`join`).
        """
        if self._phase in ENDED:
            return True
        if self._phase is Phase.CONNECTING:
            return False
        return not self.holds_until_checked

    def _answer(self) -> None:
        waiters, self._answer_waiters = self._answer_waiters, []
        for d in waiters:
            self._make_answer().chainDeferred(d)

    def _make_answer(self) -> Deferred[UpstreamAnswer]:
        if self._answer_failure is not None:
            failed: Deferred[UpstreamAnswer] = Deferred()
            failed.errback(self._answer_failure)
            return failed
        body = None
        if self._status != 304:
            fd = os.dup(self._read_fd) if self._read_fd >= 0 else -1
            body = DownloadBody(self, fd)
            self._bodies.append(body)
        return succeed(
            UpstreamAnswer(self._status, dict(self._headers), body, self._shared)
        )

    def _notify(self) -> None:
        waiters, self._more_waiters = self._more_waiters, []
        for callback in waiters:
            callback()

    def _write(self, writer: ObjectWriter, data: bytes) -> None:
        try:
            writer.write(data)
        except NoRoom:
            # Out of room under the limit as it grew (a chunked body): one
            # that must be checked whole goes on outside it.
            if not (
                writer.counted
                and spool_plan(False, self.holds_until_checked) == "uncounted"
                and writer.uncount()
            ):
                raise
            writer.write(data)
