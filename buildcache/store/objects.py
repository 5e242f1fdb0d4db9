"""
Object bodies: streaming one into ``tmp/`` (:class:`ObjectWriter`),
checking it against what was expected, making it durable and handing it
to the store to publish; an open stored body (:class:`StoredObject`); the
size limits of bodies; and how blocking calls (fsync, rename) are run.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar
from typing import Protocol as TypingProtocol

from attrs import define
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from buildcache.store.layout import unlink_quietly
from buildcache.store.schema import MAX_STORED_HEADERS, Entry
from buildcache.turns import after_io

if TYPE_CHECKING:
    from buildcache.store.core import Store


#: Temporary files kept ready for new bodies (see :meth:`Store.writer`).
SPARE_TEMP_FILES = 4
#: The least room, outside ``--max-size``, that bodies which must be checked
#: whole before anyone sees them (index pages, small packages) may take in
#: ``tmp/`` together when the limit leaves them none (see
#: :func:`uncounted_limit`).  Per process: each worker holds its own.
UNCOUNTED_LIMIT = 64 * 1024 * 1024


#: Chunks of a body being written at least this long are hashed by the
#: store's :class:`BackgroundHashes`; shorter ones, in the writer, unless
#: an earlier chunk of the body is still being hashed there.
HASH_BESIDE_FROM = 256 * 1024
#: Most bytes waiting for the hash thread: past them a writer waits for
#: its own to be hashed and hashes the chunk itself (a starved thread
#: must not hold a whole body in memory).
HASH_QUEUE_MOST = 8 * 1024 * 1024


class IntegrityError(Exception):
    """
    A body did not match what was expected of it, and was not stored.
    """


class NoRoom(OSError):
    """
    A body being written cannot be kept: it is larger than an object may
    be, or the bodies being written leave no room for it.  An ``OSError``
    so that its writer carries on as on a failed disk: the bytes go on to
    whoever reads them, and are not stored.
    """


def object_limit(max_size: int, max_object_size: int) -> int:
    """
    The largest body the store keeps: ``--max-object-size`` (0: no limit
    of its own), never more than the whole store.
    """
    if max_object_size <= 0:
        return max_size
    return min(max_size, max_object_size)


def uncounted_limit(max_object_size: int) -> int:
    """
    The most bytes that bodies spooled outside the size limit may hold
    together: the larger of ``--max-object-size`` and
    :data:`UNCOUNTED_LIMIT`.  A body that must be checked before it is
    served, and would take more, is refused rather than held.
    """
    return max(max_object_size, UNCOUNTED_LIMIT)


def mismatch(
    size: int, sha256: str | None, expected_size: int | None, expected_sha256: str | None
) -> str | None:
    """
    Why a body of ``size`` bytes with digest ``sha256`` is not the one
    expected, or None when it is.
    """
    if expected_size is not None and size != expected_size:
        return f"expected {expected_size} bytes, received {size}"
    if expected_sha256 is not None and sha256 is None:
        return f"expected sha256 {expected_sha256}, and no digest was taken of the body"
    if expected_sha256 is not None and sha256 != expected_sha256.lower():
        return f"expected sha256 {expected_sha256}, received {sha256}"
    return None


_T = TypeVar("_T")


class BlockingRunner(TypingProtocol):
    """
    Runs ``call`` (which may block) and fires with its result.
    """

    def __call__(self, call: Callable[[], _T]) -> Deferred[_T]: ...


def run_here(call: Callable[[], _T]) -> Deferred[_T]:
    """
    The :class:`BlockingRunner` that runs ``call`` at once, in this thread.
    """
    return maybeDeferred(call)


def in_thread_pool(reactor: Any, pool: ThreadPool) -> BlockingRunner:
    """
    The :class:`BlockingRunner` of the server: ``pool``'s threads, once the
    writes of the reactor's current turn have gone out (waking a thread
    there would hold them up).  ``reactor`` provides ``IReactorTime`` and
    ``IReactorFromThreads``.
    """
    def run(call: Callable[[], _T]) -> Deferred[_T]:
        return after_io(reactor).addCallback(
            lambda _: deferToThreadPool(reactor, pool, call)
        )

    return run


class BackgroundHashes:
    """
    One thread that runs the sha256 of the bodies being written, in the
    order their bytes were written, beside the reactor: ``hashlib``
    releases the GIL while it hashes, so the reactor goes on with the
    next chunk (and a package's own check hashes it too, see
    :mod:`buildcache.ecosystems.apk.verify`).  A writer waits for its
    digest only when it needs it (:meth:`ObjectWriter.sha256`), by then
    at most a read or two behind.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, bytes] | None] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._queued = 0
        self._finished = 0
        #: Bytes queued and not yet hashed.
        self.waiting_bytes = 0
        self._thread: threading.Thread | None = None

    def update(self, digest: Any, data: bytes) -> int:
        """
        Hash ``data`` into ``digest`` after every update queued before;
        the ticket to :meth:`wait` for.
        """
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="buildcache-hash", daemon=True
            )
            self._thread.start()
        self._queued += 1
        with self._done:
            self.waiting_bytes += len(data)
        self._queue.put((digest, data))
        return self._queued

    def done(self, ticket: int) -> bool:
        """
        Whether the update that gave ``ticket`` is done.
        """
        return self._finished >= ticket

    def wait(self, ticket: int) -> None:
        """
        Return once the update that gave ``ticket`` (and every one before
        it) is done.
        """
        with self._done:
            while self._finished < ticket:
                self._done.wait()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            digest, data = item
            digest.update(data)
            with self._done:
                self._finished += 1
                self.waiting_bytes -= len(data)
                self._done.notify_all()

    def close(self) -> None:
        """
        Finish the updates queued, and end the thread.
        """
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class DigestBeside:
    """
    A running digest whose long updates are hashed by a
    :class:`BackgroundHashes` thread beside the reactor (see
    :data:`HASH_BESIDE_FROM`, :data:`HASH_QUEUE_MOST`), in order; without
    one, here and now.
    """

    def __init__(self, digest: Any, hashes: BackgroundHashes | None) -> None:
        self._digest = digest
        self._hashes = hashes
        #: The last update handed to the thread (0: none waiting).
        self._ticket = 0

    def update(self, data: bytes | memoryview) -> None:
        hashes = self._hashes
        if hashes is not None and hashes.waiting_bytes + len(data) > HASH_QUEUE_MOST:
            self.result()
            hashes = None
        if hashes is not None and (
            len(data) >= HASH_BESIDE_FROM or not hashes.done(self._ticket)
        ):
            # A copy: the caller may reuse its buffer.
            self._ticket = hashes.update(self._digest, bytes(data))
        else:
            # Waking the thread costs more than hashing a small chunk.
            self._digest.update(data)

    def result(self) -> Any:
        """The digest, once every byte given so far is in it."""
        if self._ticket:
            assert self._hashes is not None
            self._hashes.wait(self._ticket)
            self._ticket = 0
        return self._digest


@define
class StoredObject:
    """
    An open stored object: ``fd`` stays readable (``os.pread``) until
    :meth:`close`, even if the entry is evicted or replaced meanwhile.
    """

    entry: Entry
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ObjectWriter:
    """
    Streams one body into a temporary file in the cache tree.

    The same descriptor is readable with ``os.pread`` while the body is
    still arriving, which is how concurrent readers follow a body being
    written; :meth:`reader_fd` hands out independent descriptors for them.
    """

    def __init__(
        self, store: Store, key: str, path: str, fd: int, whole_digest: bool = True,
    ) -> None:
        self._store = store
        self.key = key
        self.path = path
        self._fd = fd
        self._hash = DigestBeside(hashlib.sha256(), store.hashes) if whole_digest else None
        self.size = 0
        self.closed = False
        #: Room held in the store for this body (see :meth:`Store.reserve`).
        self.reserved = 0
        #: Whether the room this body holds counts against the size limit;
        #: a body that must be checked whole before anyone sees it, and
        #: finds no room there, holds room outside it instead (see
        #: :meth:`uncount`).
        self.counted = True
        #: Whether making room for this body may evict stored entries: not
        #: for a body that will not be stored (see the fetcher).
        self.evicts = True

    def reserve(self, size: int) -> bool:
        """
        Hold room for a body of ``size`` bytes (its declared length);
        False, holding nothing more, when the store cannot keep it.
        """
        if size <= self.reserved:
            return True
        more = size - self.reserved
        if self.counted:
            held = self._store.fits(size) and self._store.reserve(
                more, evict=self.evicts, keep=self.key
            )
        else:
            held = self._store.reserve_uncounted(more)
        if not held:
            return False
        self.reserved = size
        return True

    def uncount(self, quiet: bool = False) -> bool:
        """
        Hold the room for this body outside the size limit from now on
        (see :func:`uncounted_limit`); False when that is full too.
        ``quiet``: held there by design (a shared copy whose size nothing
        vouches for), not for want of room: not logged.
        """
        held = max(self.reserved, self.size)
        self._release()
        self.counted = False
        if quiet:
            return self.reserve(held)
        self._store.log.info(
            "No room under the size limit for {key}, which must be checked"
            " whole before it is served: holding it beside the limit",
            event="spooled_beside_limit", key=self.key, size=held,
        )
        return self.reserve(held)

    def _release(self) -> None:
        if self.counted:
            self._store.release(self.reserved)
        else:
            self._store.release_uncounted(self.reserved)
        self.reserved = 0

    def hash_state(self) -> Any:
        """
        A copy of the running digest of the bytes written so far; None
        for a body written without one.
        """
        return None if self._hash is None else self._hash.result().copy()

    def write(self, data: bytes) -> None:
        """
        Append ``data``; an ``OSError`` (a full or failing disk, or
        :class:`NoRoom` for a body that outgrew what the store can hold)
        leaves :attr:`size` at the bytes written before this call.
        """
        needed = self.size + len(data)
        if needed > self.reserved and not self.reserve(needed):
            if not self.counted:
                raise NoRoom(
                    f"{needed} bytes would exceed the"
                    f" {uncounted_limit(self._store.max_object_size)} bytes the"
                    " cache holds of bodies being checked beside its limit"
                )
            raise NoRoom(
                f"{needed} bytes would exceed what the cache can keep"
                f" ({object_limit(self._store.max_size, self._store.max_object_size)}"
                " bytes an object, room left beside other bodies being written)"
            )
        view = memoryview(data)
        while view:
            written = self._store.write_file(self._fd, view)
            view = view[written:]
        if self._hash is not None:
            self._hash.update(data)
        self.size += len(data)

    @property
    def sha256(self) -> str | None:
        """
        The digest of the bytes written so far; None for a body written
        without one (see :meth:`Store.writer`).
        """
        return None if self._hash is None else self._hash.result().hexdigest()

    def reader_fd(self) -> int:
        """
        A new descriptor on the body being written; the caller closes it.
        """
        return os.dup(self._fd)

    def check(
        self, expected_size: int | None = None, expected_sha256: str | None = None
    ) -> None:
        """
        Raise :class:`IntegrityError`, forgetting the body, when its size or
        digest differs from what was expected.
        """
        why = mismatch(self.size, self.sha256, expected_size, expected_sha256)
        if why is not None:
            self.abort()
            raise IntegrityError(why)

    def commit(
        self,
        headers: Mapping[str, str],
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        source_digest: str | None = None,
    ) -> Entry | None:
        """
        Check, fsync and publish the body under the writer's key, all
        before returning.

        Raises :class:`IntegrityError` (and stores nothing) when the size or
        digest differs from what was expected, and ``OSError`` (storing
        nothing either, and leaving no file behind) when the disk or the
        index refuses it. Returns ``None`` when the object is larger than
        the whole cache and so is not kept.  ``source_digest`` is recorded
        with the row (see :attr:`Entry.source_digest`).
        """
        self.check(expected_size, expected_sha256)
        if not self._keepable(headers):
            return None
        try:
            name = self._make_durable()
        finally:
            self._release()
        return self._store._record(
            self.key, name, self.size, self.sha256, headers, source_digest
        )

    async def persist(
        self, headers: Mapping[str, str], source_digest: str | None = None
    ) -> Entry | None:
        """
        Publish a body that has passed :meth:`check`, with the fsync and
        rename done by the store's ``run_blocking`` (a thread, in the
        server), so the reactor does other work meanwhile.  Raises
        and returns as :meth:`commit`.
        """
        if not self._keepable(headers):
            return None
        # From here the file belongs to the blocking call: abort() must
        # not close the descriptor under it.
        self.closed = True
        try:
            name = await self._store.run_blocking(self._make_durable)
        finally:
            self._release()
        return self._store._record(
            self.key, name, self.size, self.sha256, headers, source_digest
        )

    def _keepable(self, headers: Mapping[str, str]) -> bool:
        if not self._store.fits(self.size):
            self._store.log.info(
                "Not storing {key}: {size} bytes exceed the cache's object size limit",
                key=self.key,
                size=self.size,
            )
            self.abort()
            return False
        header_bytes = len(json.dumps(dict(headers)))
        if header_bytes > MAX_STORED_HEADERS:
            self._store.log.warn(
                "Not storing {key}: its headers take {header_bytes} bytes,"
                " more than the {limit} an entry may keep",
                event="headers_not_stored",
                key=self.key,
                header_bytes=header_bytes,
                limit=MAX_STORED_HEADERS,
            )
            self.abort()
            return False
        return True

    def _make_durable(self) -> str:
        """
        Fsync the body and move it to a new name under ``objects/``; the
        name, or ``OSError`` with nothing left behind.  Touches no shared
        state, so it may run in a thread.
        """
        self.closed = True
        try:
            self._store.sync_file(self._fd)
        except OSError:
            os.close(self._fd)
            unlink_quietly(self.path)
            raise
        os.close(self._fd)
        return self._store._place(self.key, self.path)

    def abort(self) -> None:
        """
        Forget the body; descriptors from :meth:`reader_fd` stay readable.
        """
        self._release()
        if self.closed:
            return
        self.closed = True
        os.close(self._fd)
        unlink_quietly(self.path)

