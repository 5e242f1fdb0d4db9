"""
Read-ahead for pip: a distribution file is fetched into the store as soon
as a client has read its core metadata (PEP 658).

pip and uv resolve with the metadata files first and download the chosen
distributions afterwards, one by one; by then each file is in the store
(or on its way), so on a slow upstream the downloads overlap the
resolution instead of following it.  A client that only resolves (``pip
install --dry-run``, a lock) leaves files fetched for nothing, so read-ahead
is limited to files the page gives a size for, up to ``max_size`` each, and
to :data:`MAX_RUNNING` at a time; ``max_size`` 0 turns it off.  Every
read-ahead is one upstream request, the one the client would have caused,
and is counted (``prefetches``) with the number later asked for
(``prefetch_hits``).
"""

from __future__ import annotations

from collections import OrderedDict

from attrs import Factory, define
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from buildcache.activity import redact
from buildcache.store import IntegrityError, Store
from buildcache.turns import after_io
from buildcache.upstream import Fetcher, UpstreamError, UpstreamRequest, cache_key

#: Read-aheads running at once; more are skipped, not queued.
MAX_RUNNING = 4
#: Read-ahead keys remembered until a client asks for them.
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
    _running: set[str] = Factory(set)
    _unclaimed: OrderedDict[str, None] = Factory(OrderedDict)
    _done_waiters: list[Deferred[None]] = Factory(list)

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
        done: Deferred[None] = Deferred()
        if self._running:
            self._done_waiters.append(done)
        else:
            done.callback(None)
        return done

    def after_metadata(self, request: UpstreamRequest, size: int | None) -> None:
        """
        A client has read the core metadata of the file ``request`` fetches
        (``size`` bytes, if the page said): fetch the file unless it is
        stored, running, too large or of unknown size.
        """
        if (
            self.max_size <= 0
            or size is None
            or size > self.max_size
            or request.expected_sha256 is None
            or request.key in self._running
            or len(self._running) >= MAX_RUNNING
            or self.store.peek(request.key) is not None
        ):
            return
        self._running.add(request.key)
        self.store.counters.prefetches += 1
        after_io(self.reactor).addCallback(
            lambda _: Deferred.fromCoroutine(self._fetch(request))
        )

    async def _fetch(self, request: UpstreamRequest) -> None:
        try:
            answer = await self.fetcher.fetch(request)
        except (UpstreamError, IntegrityError) as e:
            # The fetcher has logged what went wrong; the client's own
            # request will try again.
            self.log.info(
                "Read-ahead of {url} failed: {error}",
                url=redact(request.url), error=str(e),
            )
        else:
            if answer.body is not None:
                # Checked and complete (files are held until then): the
                # store keeps it; nothing here reads it.
                answer.body.close()
            if answer.status == 200:
                self._unclaimed[request.key] = None
                while len(self._unclaimed) > UNCLAIMED_KEPT:
                    self._unclaimed.popitem(last=False)
        finally:
            self._running.discard(request.key)
            if not self._running:
                waiters, self._done_waiters = self._done_waiters, []
                for done in waiters:
                    done.callback(None)

    def claim(self, key: str) -> None:
        """
        A client asked for ``key``: count it if a read-ahead fetched it (or
        is fetching it) and nobody had asked for it since.
        """
        if key in self._unclaimed:
            del self._unclaimed[key]
        elif key not in self._running:
            return
        self.store.counters.prefetch_hits += 1


def file_request(url: str, expected_sha256: str | None, user_agent: str) -> UpstreamRequest:
    """
    The upstream request of a distribution or metadata file, checked
    against the digest its page gives.
    """
    return UpstreamRequest(
        key=cache_key(url),
        url=url,
        headers={"user-agent": user_agent},
        expected_sha256=expected_sha256,
        follow_redirects=True,
    )
