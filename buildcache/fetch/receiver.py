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
        done: Deferred[None], most: int | None = None,
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
        self.verify_error: Exception | None = None
        self.reason: Failure | None = None

    def connectionMade(self) -> None:
        self._arm()
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

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._download.upstream_lost()
        # A Failure passed to callback() would turn into an errback.
        self.reason = reason
        self._done.callback(None)

    def verify(self) -> None:
        if self.verify_error is not None:
            raise self.verify_error
        if self._verifier is not None:
            self._verifier.finish()
