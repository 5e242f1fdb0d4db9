"""
When deferred work runs: after the responses of this reactor turn have gone
out (:func:`after_io`), or once something has happened (:class:`Waiters`,
:func:`deliver` for the waiters of one shared result); and calling off a
timer (:func:`cancel_call`).

Twisted writes to a socket on the reactor's next pass over its descriptors,
not when ``write`` is called; bookkeeping done in the turn that answers a
request (an access-log line, handing an fsync to a thread) delays the
answer by as much.  :func:`after_io` moves such work behind that pass.
"""

from __future__ import annotations

from typing import TypeVar

from attrs import Factory, define
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

_T = TypeVar("_T")


def deliver(waiters: list[Deferred[_T]], result: _T | Failure) -> None:
    """
    Fire every one of ``waiters`` with the one ``result`` they share (an
    upstream answer several clients asked for at once), a failure as a
    failure.  A waiter cancelled meanwhile ignores it.
    """
    for waiter in waiters:
        if isinstance(result, Failure):
            waiter.errback(result)
        else:
            waiter.callback(result)


def after_io(clock: IReactorTime) -> Deferred[None]:
    """
    Fires after the reactor's next pass over its descriptors.

    The reactor runs its due timed calls, then polls; a call scheduled by a
    timed call waits for the next round, so two hops land after one poll.
    """
    later: Deferred[None] = Deferred()
    clock.callLater(0, clock.callLater, 0, later.callback, None)
    return later


def cancel_call(call: IDelayedCall | None) -> None:
    """
    Cancel the delayed ``call`` (a timer, or None) if it is still to run.
    """
    if call is not None and call.active():
        call.cancel()


@define
class Waiters:
    """
    Deferreds waiting for one condition (a download settled, nothing in
    flight): each fires once, when :meth:`fire` is called after it was made.
    """

    _waiting: list[Deferred[None]] = Factory(list)

    def wait(self, already: bool) -> Deferred[None]:
        """
        A Deferred that fires at the next :meth:`fire`, or at once if the
        condition ``already`` holds.
        """
        waiter: Deferred[None] = Deferred()
        if already:
            waiter.callback(None)
        else:
            self._waiting.append(waiter)
        return waiter

    def fire(self) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)
