"""
Read-ahead for pip: a distribution file is fetched into the store as soon
as a client has read its core metadata (PEP 658).

pip and uv resolve with the metadata files first and download the chosen
distributions afterwards, one by one; by then each file is in the store
(or on its way), so on a slow upstream the downloads overlap the
resolution instead of following it.  A client that only resolves (``pip
install --dry-run``, a lock, a resolver backtracking over candidates)
leaves files fetched for nothing, so read-ahead is limited to files the
page gives a sha256 and a size for, up to ``max_size`` each, and to
:data:`MAX_RUNNING` at a time; ``max_size`` 0 turns it off.

``prefetches`` counts read-aheads that asked the upstream (one request
each, the one the client would have caused); ``prefetch_hits`` counts
those a client asked for afterwards.  That first request is answered
``X-Cache: MISS`` and its bytes count as from upstream: they crossed the
line for it, just earlier.
"""

from __future__ import annotations

from collections import OrderedDict

from attrs import Factory, define
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from buildcache.activity import redact
from buildcache.store import IntegrityError, Store
from buildcache.turns import Waiters, after_io
from buildcache.upstream import (
    Fetcher,
    UpstreamError,
    UpstreamRequest,
    cache_key,
    drained,
)

#: Read-aheads scheduled or running at once; more are skipped, not queued.
MAX_RUNNING = 4
#: Stored read-aheads remembered until a client asks for them.
UNCLAIMED_KEPT = 4096


@define
class Prefetcher:
    """
    Starts read-aheads and keeps their count; see the module docstring.
    """

    log = Logger()

    store: Store
    fetcher: Fetcher
    #: Schedules read-aheads after the response that caused them is sent.
    reactor: IReactorTime
    max_size: int
    #: Scheduled or fetching.
    _running: set[str] = Factory(set)
    #: Fetching: asked the upstream (a subset of ``_running``).
    _fetching: set[str] = Factory(set)
    #: Fetching, and a client has already asked for it.
    _claimed: set[str] = Factory(set)
    #: Stored, and no client has asked for it yet.
    _unclaimed: OrderedDict[str, None] = Factory(OrderedDict)
    _stopped: bool = False
    _done: Waiters = Factory(Waiters)

    def running(self) -> int:
        """
        Read-aheads scheduled or running.
        """
        return len(self._running)

    def when_done(self) -> Deferred[None]:
        """
        Fires once no read-ahead is scheduled or running (at once if none
        is).
        """
        return self._done.wait(not self._running)

    def stop(self) -> None:
        """
        Start no more read-aheads (the server is stopping).
        """
        self._stopped = True

    def after_metadata(self, request: UpstreamRequest, size: int | None) -> None:
        """
        A client has read the core metadata of the file ``request`` fetches
        (``size`` bytes, if the page said): fetch the file, after this
        turn's responses, unless read-ahead is off or busy, or the file is
        of unknown size, too large, or without a digest.
        """
        if (
            self._stopped
            or self.max_size <= 0
            or size is None
            or size > self.max_size
            or not self.store.fits(size)
            or request.expected_sha256 is None
            or request.key in self._running
            or len(self._running) >= MAX_RUNNING
        ):
            return
        self._running.add(request.key)
        after_io(self.reactor).addCallback(
            lambda _: Deferred.fromCoroutine(self._fetch(request))
        )

    async def _fetch(self, request: UpstreamRequest) -> None:
        key = request.key
        stored = False
        try:
            if (
                self._stopped
                or self.store.peek(key) is not None
                or self.fetcher.downloading(key)
            ):
                return
            self._fetching.add(key)
            self.store.counters.prefetches += 1
            answer = await self.fetcher.fetch(request)
            if answer.body is not None:
                # Until it is in the store (or not): a large file is
                # answered while it still streams.
                await drained(answer.body)
            stored = answer.status == 200 and self.store.peek(key) is not None
        except (UpstreamError, IntegrityError) as e:
            # The fetcher has logged what went wrong; the client's own
            # request will try again.
            self.log.info(
                "Read-ahead of {url} failed: {error}",
                url=redact(request.url), error=str(e),
            )
        except Exception:
            self.log.failure("Read-ahead of {url} failed", url=redact(request.url))
        finally:
            self._running.discard(key)
            self._fetching.discard(key)
            if stored and key not in self._claimed:
                self._unclaimed[key] = None
                while len(self._unclaimed) > UNCLAIMED_KEPT:
                    self._unclaimed.popitem(last=False)
            self._claimed.discard(key)
            if not self._running:
                self._done.fire()

    def claim(self, key: str, stored: bool) -> bool:
        """
        A client asks for ``key``, which the store has (``stored``) or not:
        whether this is the first request for a file a read-ahead fetched
        into the store, or is fetching.  Counted once per read-ahead.
        """
        if stored:
            if key not in self._unclaimed:
                return False
            del self._unclaimed[key]
        else:
            # Evicted before anyone asked, if it was read ahead at all.
            self._unclaimed.pop(key, None)
            if key not in self._fetching or key in self._claimed:
                return False
            self._claimed.add(key)
        self.store.counters.prefetch_hits += 1
        return True


def file_request(
    url: str, expected_sha256: str | None, user_agent: str, may_be_large: bool,
) -> UpstreamRequest:
    """
    The upstream request of a distribution or metadata file, checked
    against the digest its page gives.  One that ``may_be_large`` streams
    before its check ends (see :data:`STREAM_CHECKED_ABOVE`); a small one is
    answered once checked, so that a mismatch is a clean 502.
    """
    return UpstreamRequest(
        key=cache_key(url),
        url=url,
        headers={"user-agent": user_agent},
        expected_sha256=expected_sha256,
        follow_redirects=True,
        stream_before_check=may_be_large,
    )
