"""
Read-ahead of project pages: once a client has read a distribution's core
metadata, the pages of the dependencies it names are fetched into the
store, so the client's next requests (pip and uv ask for each dependency's
page as they resolve) find them there instead of waiting for the upstream,
one round trip each.

A page is read ahead exactly as a client's request for it is resolved
(:meth:`~buildcache.ecosystems.pypi.pages.PageResolver.resolve`, with no
client header): the same store key, which does not depend on the client's
``Accept`` (the index stores the upstream's page and renders JSON or HTML
from it), the same upstream order and negative cache; a client asking
while it is fetched joins that one download.

Which dependencies: those :func:`~buildcache.ecosystems.pypi.requires.dependencies`
finds for the client's environment (from its ``User-Agent``), at most
:data:`PER_METADATA` per metadata file; none for a request that carries
credentials.  Bounded: at most :data:`MAX_RUNNING` fetching at once and
:data:`MAX_PENDING` queued (more are skipped), none whose page is stored
and fresh,
and none while :data:`UNCLAIMED_BUDGET` pages read ahead have not been
asked for (a page stops counting once asked for, or once it is as old as
the index TTL: it would be revalidated by then anyway).

The observer counts each page read ahead from the upstream
(``read_ahead_started``) and each one a client asked for afterwards
(``read_ahead_claimed``), as for files (:mod:`.prefetch`).  A page read
ahead is answered ``HIT``: it is small, and serving it from the store
without a round trip is the point.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence

from attrs import Factory, define
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from buildcache.ecosystems.pypi.lru import LRU
from buildcache.ecosystems.pypi.model import ProjectFile
from buildcache.ecosystems.pypi.pages import PageResolver, Refusal
from buildcache.ecosystems.pypi.policy import open_entry, read_stored
from buildcache.ecosystems.pypi.requires import (
    best_pure_wheel,
    client_environment,
    requirements,
)
from buildcache.engine.core import Engine
from buildcache.engine.events import CacheObserver
from buildcache.engine.exchanges import CacheStatus
from buildcache.turns import Waiters, after_io

__all__ = [
    "PageReadAhead", "MAX_RUNNING", "MAX_PENDING", "PER_METADATA", "UNCLAIMED_BUDGET",
]

#: Pages read ahead for one metadata file, at most.
PER_METADATA = 16
#: Page read-aheads fetching at once; more wait in a queue.
MAX_RUNNING = 8
#: Page read-aheads queued, at most; more are skipped.
MAX_PENDING = 64
#: Read-ahead pauses while this many pages it fetched are not asked for.
UNCLAIMED_BUDGET = 64
#: Dependency lists kept per (metadata key, client environment).
_PARSED_KEPT = 2048


@define
class PageReadAhead:
    """
    Reads ahead the pages a metadata file's dependencies are on; see the
    module docstring.
    """

    log = Logger()

    engine: Engine
    pages: PageResolver
    reactor: IReactorTime
    observer: CacheObserver | None = None
    #: Told of the file whose core metadata the client will read first on
    #: a page read ahead, when that is certain (see
    #: :func:`~buildcache.ecosystems.pypi.requires.best_pure_wheel`), and
    #: its project, and the client's ``User-Agent``.
    on_candidate: Callable[[ProjectFile, str, str], None] | None = None
    #: Queued or fetching, by normalised project name.
    _running: set[str] = Factory(set)
    #: Queued, oldest first (a subset of ``_running``).
    _pending: deque[str] = Factory(deque)
    #: Fetching from the upstream (a subset of ``_running``).
    _fetching: set[str] = Factory(set)
    #: Fetching, and a client has asked for it already.
    _claimed: set[str] = Factory(set)
    #: Fetched, not asked for yet: name to when, and the page's store
    #: key; oldest first.
    _unclaimed: OrderedDict[str, tuple[float, str]] = Factory(OrderedDict)
    #: The specifier and client Python of each queued or fetching page,
    #: when known: to find its candidate.
    _wanted: dict[str, tuple[str, str, str]] = Factory(dict)
    _parsed: LRU[tuple[str, str], tuple[tuple[tuple[str, str], ...], str]] = Factory(
        lambda: LRU(_PARSED_KEPT, _PARSED_KEPT * 512)
    )
    #: Metadata files waiting to be read for their dependencies.
    _parsing: int = 0
    _stopped: bool = False
    _done: Waiters = Factory(Waiters)

    def running(self) -> int:
        """
        Page read-aheads scheduled or fetching, and metadata files about to
        be read for them.
        """
        return len(self._running) + self._parsing

    def when_done(self) -> Deferred[None]:
        """
        Fires once :meth:`running` is 0 (at once if it is).
        """
        return self._done.wait(not self.running())

    def stop(self) -> None:
        """
        Start no more read-aheads (the server is stopping); the queued ones
        are dropped.
        """
        self._stopped = True
        self._start_pending()

    def after_metadata(
        self, key: str, user_agent: str | None, credentialed: bool,
    ) -> None:
        """
        A client (sending ``user_agent``; ``credentialed`` when it sent
        credentials) has been answered the core metadata stored under
        ``key``: read ahead the pages of its dependencies, after this
        turn's responses.
        """
        if self._stopped or credentialed or self._parsing >= MAX_PENDING:
            return
        self._parsing += 1
        # Even a list read before: deciding what to fetch looks each page
        # up, which would hold back the answer in Twisted's buffer.
        after_io(self.reactor).addCallback(
            lambda _: Deferred.fromCoroutine(self._parse(key, user_agent))
        )

    async def _parse(self, key: str, user_agent: str | None) -> None:
        try:
            slot = (key, user_agent or "")
            parsed = self._parsed.get(slot)
            if parsed is None:
                await self._read_dependencies(key, slot, user_agent)
            else:
                self._read_ahead_for(*parsed, user_agent or "")
        finally:
            self._parsing -= 1
            if not self.running():
                self._done.fire()

    async def _read_dependencies(
        self, key: str, slot: tuple[str, str], user_agent: str | None
    ) -> None:
        try:
            # A metadata file that has just arrived may still be on its way
            # into the store.
            await self.engine.fetcher.stored(key)
            stored = open_entry(self.engine, key, CacheStatus.HIT)
            if stored is None or stored.stored is None:
                return
            try:
                metadata = read_stored(stored.stored)
            finally:
                stored.close()
            environment = client_environment(user_agent)
            wanted = tuple(requirements(metadata, environment, PER_METADATA))
        except Exception:
            self.log.failure("Reading the dependencies in {key} failed", key=key)
            return
        python = "" if environment is None else environment["python_full_version"]
        self._parsed.put(
            slot, (wanted, python),
            len(key) + len(slot[1]) + sum(len(n) + len(v) for n, v in wanted) + 64,
        )
        self._read_ahead_for(wanted, python, user_agent or "")

    def _read_ahead_for(
        self, wanted: Sequence[tuple[str, str]], python: str, user_agent: str
    ) -> None:
        self.read_ahead(
            [name for name, _ in wanted],
            {name: specifier for name, specifier in wanted} if python else None,
            python, user_agent,
        )

    def read_ahead(
        self, names: Sequence[str], specifiers: Mapping[str, str] | None = None,
        python: str = "", user_agent: str = "",
    ) -> None:
        """
        Fetch the pages of ``names`` (normalised) that are not stored fresh,
        within the bounds: the first :data:`PER_METADATA`, queued (up to
        :data:`MAX_PENDING`) while :data:`MAX_RUNNING` are fetching.  With
        the ``specifiers`` of the names and the client's ``python`` (full
        version), each page's candidate is told to ``on_candidate`` (with
        the client's ``user_agent``).
        """
        self._write_off()
        for name in names[:PER_METADATA]:
            if (
                self._stopped
                or len(self._pending) >= MAX_PENDING
                or self._over_budget()
            ):
                break
            if name in self._running or name in self._unclaimed:
                continue
            if self.pages.has_fresh(name):
                continue
            self._running.add(name)
            self._pending.append(name)
            if specifiers is not None and name in specifiers and python:
                self._wanted[name] = (specifiers[name], python, user_agent)
        self._start_pending()

    def _start_pending(self) -> None:
        while self._pending and len(self._fetching) < MAX_RUNNING:
            name = self._pending.popleft()
            if self._stopped or self.pages.has_fresh(name):
                # A client asked for it meanwhile (or the server stops).
                self._running.discard(name)
                self._wanted.pop(name, None)
                continue
            self._fetching.add(name)
            if self.observer is not None:
                self.observer.read_ahead_started()
            Deferred.fromCoroutine(self._fetch(name))
        if not self.running():
            self._done.fire()

    async def _fetch(self, name: str) -> None:
        fetched: str | None = None
        wanted = self._wanted.pop(name, None)
        try:
            resolved = await self.pages.resolve(name, {})
            fetched = resolved.key
            if wanted is not None and self.on_candidate is not None and not self._stopped:
                specifier, python, user_agent = wanted
                candidate = best_pure_wheel(resolved.page, specifier, python)
                if candidate is not None:
                    self.on_candidate(candidate, name, user_agent)
        except Refusal as refusal:
            # Not found upstream (remembered by the resolver), or failed:
            # the client's own request will say so.
            self.log.debug(
                "Read-ahead of the page of {name}: {why}",
                name=name, why=refusal.message,
            )
        except Exception:
            self.log.failure("Read-ahead of the page of {name} failed", name=name)
        finally:
            self._running.discard(name)
            self._fetching.discard(name)
            if name in self._claimed:
                self._claimed.discard(name)
            elif fetched is not None:
                self._unclaimed[name] = (self.reactor.seconds(), fetched)
                while len(self._unclaimed) > UNCLAIMED_BUDGET:
                    self._unclaimed.popitem(last=False)
            self._start_pending()

    def claim(self, name: str) -> bool:
        """
        A client asks for the page of ``name``: whether this is the first
        request for a page read ahead (fetched, or fetching).  Counted once.
        """
        if name in self._unclaimed:
            del self._unclaimed[name]
        elif name in self._fetching and name not in self._claimed:
            self._claimed.add(name)
        else:
            return False
        if self.observer is not None:
            self.observer.read_ahead_claimed()
        return True

    def unclaimed(self) -> int:
        """
        Pages read ahead (fetched or fetching) no client has asked for.
        """
        self._write_off()
        return self._unclaimed_count()

    def _over_budget(self) -> bool:
        if self._unclaimed_count() + len(self._pending) < UNCLAIMED_BUDGET:
            return False
        self._claimed_elsewhere()
        return self._unclaimed_count() + len(self._pending) >= UNCLAIMED_BUDGET

    def _claimed_elsewhere(self) -> None:
        """
        Count as asked for the pages read ahead that a client read since
        without this object seeing it (a hit worker answered it; its
        accesses reach this process's store): their last access is later
        than their read-ahead.
        """
        for name, (when, key) in list(self._unclaimed.items()):
            entry = self.engine.store.peek(key)
            if entry is not None and entry.last_access > when:
                self.claim(name)

    def _unclaimed_count(self) -> int:
        return len(self._unclaimed) + len(self._fetching) - len(self._claimed)

    def _write_off(self) -> None:
        # As old as the index TTL: stale now, its upstream request spent.
        cutoff = self.reactor.seconds() - self.pages.index_ttl
        while self._unclaimed:
            name, (when, _) = next(iter(self._unclaimed.items()))
            if when > cutoff:
                return
            del self._unclaimed[name]
