"""
Temporary files made ahead of need (:class:`SpareTemps`), for the bodies
the writing store starts (:meth:`buildcache.store.Store.writer`).

Creating a file costs a journal write (a fraction of a millisecond on
ext4) while a reader waits for the body, so with a threaded
``run_blocking`` a few are made there ahead.  They are made several at a
time, in one blocking call, once at most half of them are left: each call
costs the reactor a hand-off to a thread and back, which a miss paid
every time when they were made one per call.
"""

from __future__ import annotations

import os
from functools import partial

from attrs import Factory, define
from twisted.python.failure import Failure

from buildcache.store.layout import create_temp, temp_directory, unlink_quietly
from buildcache.store.objects import BlockingRunner


def create_temps(paths: list[str]) -> list[tuple[str, int]]:
    """
    Create the temporary files ``paths``; those made, with their
    descriptors (fewer on a full disk; the error when none could be).
    """
    made: list[tuple[str, int]] = []
    for path in paths:
        try:
            made.append((path, create_temp(path)))
        except OSError:
            if not made:
                raise
            break
    return made


@define
class SpareTemps:
    """
    The temporary files of one store's directory: names, and those made
    ahead (:attr:`ready`).
    """

    directory: str
    ready: list[tuple[str, int]] = Factory(list)
    #: Files being made ahead.
    coming: int = 0
    serial: int = 0
    closed: bool = False

    def path(self) -> str:
        """
        A new temporary file's path.
        """
        self.serial += 1
        return os.path.join(
            temp_directory(self.directory), f"{os.getpid()}-{self.serial}.part"
        )

    def take(self) -> tuple[str, int]:
        """
        A temporary file (path, descriptor): one made ahead, or one made now.
        """
        if self.ready:
            return self.ready.pop()
        path = self.path()
        return path, create_temp(path)

    def refill(self, wanted: int, run_blocking: BlockingRunner) -> None:
        """
        Make up to ``wanted`` files ready, in one call of ``run_blocking``,
        once at most half of them are ready or being made.
        """
        have = len(self.ready) + self.coming
        if wanted <= 0 or have > wanted // 2:
            return
        paths = [self.path() for _ in range(wanted - have)]
        self.coming += len(paths)

        def made(files: list[tuple[str, int]]) -> None:
            self.coming -= len(paths)
            if self.closed:
                _remove(files)
            else:
                self.ready.extend(files)

        def failed(failure: Failure) -> None:
            # A full or failing disk: take() makes its own file and meets
            # the error there.
            self.coming -= len(paths)

        run_blocking(partial(create_temps, paths)).addCallbacks(made, failed)

    def close(self) -> None:
        """
        Remove the files made ahead, and those made from now on.
        """
        self.closed = True
        files, self.ready = self.ready, []
        _remove(files)


def _remove(files: list[tuple[str, int]]) -> None:
    for path, fd in files:
        os.close(fd)
        unlink_quietly(path)
