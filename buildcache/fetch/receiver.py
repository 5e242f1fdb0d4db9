"""
The protocol an upstream response body is delivered to
(:class:`BodyReceiver`): it passes each chunk to its download, runs the
request's verifier over it, and gives up on an upstream silent for the
idle timeout, unless the download's own readers are holding it back.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from buildcache.fetch.download import Download


class BodyReceiver(Protocol):
    """
    Passes an upstream body to its download, resetting the idle timer on
    every chunk, and runs the request's verifier over it.
    """

    def __init__(
        self, download: Download, clock: IReactorTime, idle_timeout: float,
        done: Deferred[None], most: int | None = None, deadline: float | None = None,
        skip: int = 0,
    ):
        self._download = download
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._done = done
        self._timer: IDelayedCall | None = None
        verify = download.request.verify
        self._verifier = verify(download.headers) if verify is not None else None
        self.timed_out = False
        #: Bytes beyond which the body is refused (a shared copy's size).
        self._most = most
        #: The body went past ``most``: it was stopped there.
        self.overran = False
        #: Seconds the whole body may take (a shared copy held from its
        #: clients): past them it is stopped, as a silent upstream is.
        self._deadline = deadline
        self._deadline_call: IDelayedCall | None = None
        #: Bytes at the start of the body the download already has (the
        #: part of a shared copy read before it failed): dropped.
        self._skip = skip
        self.verify_error: Exception | None = None
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self._arm()
        if self._deadline is not None:
            self._deadline_call = self._clock.callLater(self._deadline, self._too_slow)
        # The transport of a response body is a producer proxy.
        self._download.upstream_connected(IPushProducer(self.transport))

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._idle_timeout)
        else:
            self._timer = self._clock.callLater(self._idle_timeout, self._idle)

    def _idle(self) -> None:
        if self._download.drop_laggards():
            # Held back by its readers, not silent on its own.
            self._arm()
            return
        self.timed_out = True
        IPushProducer(self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.overran:
            return
        if self._skip:
            dropped = data[: self._skip]
            self._skip -= len(dropped)
            data = data[len(dropped):]
            self._arm()
            if not data:
                return
        if self._most is not None and self._download.received + len(data) > self._most:
            self.overran = True
            IPushProducer(self.transport).stopProducing()
            return
        self._arm()
        if not self._download.take(data):
            return
        if self._verifier is not None and self.verify_error is None:
            try:
                self._verifier.update(data)
            except Exception as e:
                self.verify_error = e

    def _too_slow(self) -> None:
        self.timed_out = True
        IPushProducer(self.transport).stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if self._deadline_call is not None and self._deadline_call.active():
            self._deadline_call.cancel()
        self._download.upstream_lost()
        # A Failure passed to callback() would turn into an errback.
        self.reason = reason
        self._done.callback(None)

    def verify(self) -> None:
        if self.verify_error is not None:
            raise self.verify_error
        if self._verifier is not None:
            self._verifier.finish()
