"""
Scheduling work for after the responses of this reactor turn have gone out.

Twisted writes to a socket on the reactor's next pass over its descriptors,
not when ``write`` is called; bookkeeping done in the turn that answers a
request (an access-log line, handing an fsync to a thread) delays the
answer by as much.  :func:`after_io` moves such work behind that pass.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime


def after_io(clock: IReactorTime) -> Deferred[None]:
    """
    Fires after the reactor's next pass over its descriptors.

    The reactor runs its due timed calls, then polls; a call scheduled by a
    timed call waits for the next round, so two hops land after one poll.
    """
    later: Deferred[None] = Deferred()
    clock.callLater(0, clock.callLater, 0, later.callback, None)
    return later
