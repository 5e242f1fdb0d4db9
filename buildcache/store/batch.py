"""
Rows of new bodies committed together (:class:`PendingRows`): the writing
store inserts each row in the index's open transaction and commits them
a short while later, or as soon as another write needs the index.

A committed transaction per body cost the reactor more than the rest of
the row's bookkeeping.  What a batch risks is bounded: a crash before the
commit loses the rows of the batch, whose files (fsynced and renamed into
``objects/`` before their rows were inserted) are then files without a
row, which opening the store removes (see
:func:`buildcache.store.maintenance.reconcile`).  Until the commit, this
process sees the rows (one connection sees its own transaction), other
processes (read-only workers) do not yet: a miss there goes to this
process, which answers it from its store.  The file a row replaces is
unlinked only once the row that replaces it is committed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from attrs import Factory, define, frozen
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from buildcache.store.layout import file_path, unlink_quietly

#: Seconds a new row waits for others to be committed with it.
COMMIT_DELAY = 0.05
#: Rows committed at once, at most: a busy server commits this often.
COMMIT_MOST = 64


@frozen
class PendingRow:
    """
    One row inserted and not yet committed: its key, file, sizes, and
    the committed row it replaced (body size, file, metadata size), if any.
    """

    key: str
    name: str
    size: int
    meta: int
    old: tuple[int, str, int] | None


@define
class PendingRows:
    """
    The rows inserted since the last commit, in order.
    """

    rows: list[PendingRow] = Factory(list)

    def add(self, row: PendingRow) -> bool:
        """
        Note ``row``; whether the batch is full (commit now).
        """
        self.rows.append(row)
        return len(self.rows) >= COMMIT_MOST

    def take(self) -> list[PendingRow]:
        rows, self.rows = self.rows, []
        return rows

    def __len__(self) -> int:
        return len(self.rows)


def undone_totals(
    rows: list[PendingRow], entries: int, body_bytes: int, meta_bytes: int
) -> tuple[int, int, int]:
    """
    The store's totals (entries, body bytes, row bytes) once ``rows``
    (inserted in this order) are rolled back: each row's sizes taken off,
    and the row it replaced, committed before, counted again.
    """
    for row in reversed(rows):
        body_bytes -= row.size
        meta_bytes -= row.meta
        if row.old is None:
            entries -= 1
        else:
            body_bytes += row.old[0]
            meta_bytes += row.old[2]
    return entries, body_bytes, meta_bytes


class BatchedCommits:
    """
    The writing store's side of a batch: committing the rows waiting, or
    rolling them back (a mixin of :class:`buildcache.store.Store`).
    """

    log: Logger
    directory: str
    _db: sqlite3.Connection
    _uncommitted: PendingRows
    _commit_call: IDelayedCall | None
    entry_count: int
    total_size: int
    metadata_bytes: int
    _forget: Callable[[str], None]

    def commit_pending(self) -> bool:
        """
        Commit the rows waiting in the index's transaction (see
        :mod:`buildcache.store.batch`), then unlink the files they
        replaced; False when the index refused (the rows are rolled back
        and their files removed, as if they had never been stored).
        Every other write to the index commits them first, so that its
        own rollback cannot take them.
        """
        if self._commit_call is not None:
            if self._commit_call.active():
                self._commit_call.cancel()
            self._commit_call = None
        if not len(self._uncommitted):
            return True
        try:
            self._db.commit()
        except sqlite3.Error as e:
            self.log.error(
                "Cannot commit {count} new entries to the cache index: {error};"
                " they are not stored",
                event="commit_failed", count=len(self._uncommitted), error=str(e),
            )
            self._roll_back()
            return False
        for row in self._uncommitted.take():
            if row.old is not None:
                # Readers of the old version keep their descriptors.
                unlink_quietly(file_path(self.directory, row.old[1]))
        return True

    def _roll_back(self) -> None:
        """
        Roll back the index's open transaction, and forget the rows that
        waited in it: their files and their sizes.
        """
        try:
            self._db.rollback()
        except sqlite3.Error:
            pass
        rows = self._uncommitted.take()
        self.entry_count, self.total_size, self.metadata_bytes = undone_totals(
            rows, self.entry_count, self.total_size, self.metadata_bytes
        )
        for row in rows:
            self._forget(row.key)
            unlink_quietly(file_path(self.directory, row.name))
