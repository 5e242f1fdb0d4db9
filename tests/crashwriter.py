"""
Helper process for the crash test in ``tests/test_store.py``.

Run as ``python tests/crashwriter.py CACHE_DIR`` with the repository root on
``PYTHONPATH``: it opens a store in CACHE_DIR, commits the objects of
:func:`small_objects`, then streams a large body for :data:`LARGE_KEY` and
prints ``writing`` once a few megabytes are in its temporary file.  It never
commits that body: after at most :data:`LARGE_LIMIT` bytes it waits on its
standard input for the test to kill it, so the disk use stays bounded even
if the kill comes late.

``python tests/crashwriter.py CACHE_DIR --die-at-sql PATTERN`` instead dies
(``os._exit``, no clean-up at all, like a kill) just before the store runs
the first SQL statement matching the regular expression PATTERN, while it
opens CACHE_DIR.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
from typing import Any, cast

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock

from buildcache.store import Store

LARGE_KEY = "crash/large.bin"
CHUNK = b"\xa5" * (1024 * 1024)
ANNOUNCE_AFTER = 4 * len(CHUNK)
LARGE_LIMIT = 32 * len(CHUNK)
MAX_SIZE = 1024 * 1024 * 1024
DIED_AT_SQL = 17


def small_objects() -> dict[str, bytes]:
    """
    The committed objects, by key; the test derives the same bodies.
    """
    return {
        f"crash/small-{index}": f"small object {index}\n".encode() * (index * 97 + 1)
        for index in range(5)
    }


def main(directory: str) -> None:
    store = Store.open(directory, MAX_SIZE, cast(IReactorTime, Clock()))
    for key, body in small_objects().items():
        writer = store.writer(key)
        writer.write(body)
        writer.commit({"Content-Type": "application/octet-stream"})
    writer = store.writer(LARGE_KEY)
    written = 0
    announced = False
    while written < LARGE_LIMIT:
        writer.write(CHUNK)
        written += len(CHUNK)
        if not announced and written >= ANNOUNCE_AFTER:
            sys.stdout.write("writing\n")
            sys.stdout.flush()
            announced = True
    sys.stdin.read()


def die_at_sql(directory: str, pattern: str) -> None:
    """
    Open a store whose index connection ends the process just before the
    first statement matching ``pattern`` runs.
    """
    matcher = re.compile(pattern)
    real_connect = sqlite3.connect

    def dying_connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = real_connect(*args, **kwargs)

        def trace(statement: str) -> None:
            if matcher.search(statement):
                os._exit(DIED_AT_SQL)

        connection.set_trace_callback(trace)
        return connection

    sqlite3.connect = dying_connect  # type: ignore[assignment]
    Store.open(directory, MAX_SIZE, cast(IReactorTime, Clock()))


if __name__ == "__main__":
    if sys.argv[2:3] == ["--die-at-sql"]:
        die_at_sql(sys.argv[1], sys.argv[3])
    else:
        main(sys.argv[1])
