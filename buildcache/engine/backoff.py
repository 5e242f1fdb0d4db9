"""
The engine's memory of failing upstreams: after an upstream host fails a
revalidation (it could not be reached, or answered a status served stale
for), further revalidations of entries from that host are served stale at
once for a while, without asking it.  A build on a box whose line is down
then gets its stored indexes at once, not one timeout per file.  A
successful answer from the host clears it.
"""

from __future__ import annotations

from collections import OrderedDict

from attrs import Factory, define
from twisted.internet.interfaces import IReactorTime

from buildcache.access import upstream_host_key

__all__ = ["UpstreamBackoff", "UPSTREAM_FAILURE_BACKOFF", "HOSTS_KEPT"]

#: Seconds a failed upstream host is not asked to revalidate.
UPSTREAM_FAILURE_BACKOFF = 30.0
#: Failing hosts remembered; the oldest failure is forgotten first.
HOSTS_KEPT = 256


@define
class UpstreamBackoff:
    """
    Failing upstream hosts and until when, by the name the upstream-health
    table gives them (:func:`buildcache.access.upstream_host_key`: the
    normalised host and a port other than the scheme's); a bounded table,
    at most ``kept`` hosts, the oldest failure dropped first.
    """

    clock: IReactorTime
    seconds: float = UPSTREAM_FAILURE_BACKOFF
    kept: int = HOSTS_KEPT
    _until: OrderedDict[str, float] = Factory(OrderedDict)

    def failing(self, url: str) -> bool:
        """Whether ``url``'s host failed less than ``seconds`` ago."""
        host = upstream_host_key(url)
        if host is None or host not in self._until:
            return False
        if self._until[host] > self.clock.seconds():
            return True
        del self._until[host]
        return False

    def failed(self, url: str) -> None:
        """``url``'s host failed a revalidation now."""
        host = upstream_host_key(url)
        if self.seconds <= 0 or host is None:
            return
        self._until.pop(host, None)
        self._until[host] = self.clock.seconds() + self.seconds
        while len(self._until) > self.kept:
            self._until.popitem(last=False)

    def succeeded(self, url: str) -> None:
        """``url``'s host answered: it is asked again at once."""
        if self._until:
            host = upstream_host_key(url)
            if host is not None:
                self._until.pop(host, None)
