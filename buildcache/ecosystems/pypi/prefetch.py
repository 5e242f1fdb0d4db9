"""
Read-ahead for pip: a distribution file is fetched into the store as soon
as a client has read its core metadata (PEP 658).

pip and uv resolve with the metadata files first and download the chosen
distributions afterwards, one by one; by then each file is in the store
(or on its way), so on a slow upstream the downloads overlap the
resolution instead of following it.

A client that only resolves (``pip install --dry-run``, a lock, a resolver
backtracking over candidates) leaves files fetched for nothing, and on the
slow line this cache is for, bytes nobody asked for are the cost to keep
down.  So read-ahead takes only files the page gives a sha256 and a size
for, up to ``max_size`` each, :data:`MAX_RUNNING` at a time; one file per
project until a client asks for it (a backtracking resolver reads the
metadata of several versions, and installs one); and it pauses while the
files it fetched that no client has asked for yet add up to
:data:`UNCLAIMED_BUDGET_FILES` times ``max_size``: a file stops counting
once asked for, or is written off :data:`UNCLAIMED_TTL` seconds after it
was stored.
``max_size`` 0 turns it off.

The prefetcher also holds the read-ahead of the pages of the dependencies
a metadata file names (:mod:`.pagereads`, attached by the index as
``pages``), so that the server starts, counts, stops and waits for both as
one.  And it reads ahead core metadata: on a page fetched for a client, or
read ahead for one, whose Python is known (from its ``User-Agent``), the
metadata of the file that client reads next when that is certain (the
newest allowed version's one pure wheel, see
:func:`~buildcache.ecosystems.pypi.requires.best_pure_wheel`); once stored,
that metadata's dependencies' pages are read ahead in turn, so read-ahead
walks the dependency graph ahead of the resolver, within the pages'
budget.  A metadata read-ahead, like a file's, holds its project until a
client asks for it, and is answered ``MISS`` then.

The observer is told of each read-ahead that asked the upstream
(:meth:`~buildcache.engine.events.CacheObserver.read_ahead_started`: one
request each, the one the client would have caused) and of each a client
asked for afterwards
(:meth:`~buildcache.engine.events.CacheObserver.read_ahead_claimed`).  That first request is answered
``X-Cache: MISS`` and its bytes count as from upstream: they crossed the
line for it, just earlier.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import attrs
from attrs import Factory, define, frozen
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from buildcache.credentials import redact
from buildcache.ecosystems.pypi.model import ProjectFile, ProjectPage
from buildcache.ecosystems.pypi.pagereads import PageReadAhead
from buildcache.ecosystems.pypi.pages import metadata_servable
from buildcache.ecosystems.pypi.policy import USER_AGENT, FileRequest, file_request
from buildcache.ecosystems.pypi.requires import best_pure_wheel, client_environment
from buildcache.engine.core import Engine
from buildcache.engine.errors import ANSWERED_ERRORS
from buildcache.engine.events import CacheObserver
from buildcache.fetch.fetcher import drained
from buildcache.turns import Waiters, after_io

#: Read-aheads scheduled or running at once; more are skipped, not queued.
MAX_RUNNING = 4
#: Read-aheads of core metadata files scheduled or running at once, besides.
MAX_RUNNING_METADATA = 8
#: Stored read-aheads remembered until a client asks for them.
UNCLAIMED_KEPT = 4096
#: Read-ahead pauses while the files it fetched (or is fetching) that no
#: client has asked for add up to this many times ``max_size``.
UNCLAIMED_BUDGET_FILES = 8
#: Seconds after which an unclaimed read-ahead is written off: it no
#: longer counts against the budget (nor as a hit, should a client ask).
UNCLAIMED_TTL = 30 * 60.0


@frozen
class _ReadAhead:
    """
    A read-ahead's size (as the page gave it) and project; once stored,
    when it was.
    """

    size: int
    project: str
    stored_at: float = 0.0


@define
class Prefetcher:
    """
    Starts read-aheads and keeps their count; see the module docstring.
    A read-ahead is the file's own request without a client: the engine
    resolves it under the file's policy (same key, same check, same
    ``http://`` twin adoption), and the body is drained into the store.
    """

    log = Logger()

    engine: Engine
    #: Schedules read-aheads after the response that caused them is sent.
    reactor: IReactorTime
    max_size: int
    #: Told when a read-ahead starts and when a client claims one.
    observer: CacheObserver | None = None
    #: Read-ahead of dependencies' pages, when the index attached one.
    pages: PageReadAhead | None = None
    #: Scheduled or fetching.
    _running: dict[str, _ReadAhead] = Factory(dict)
    #: Fetching: asked the upstream (a subset of ``_running``).
    _fetching: set[str] = Factory(set)
    #: Fetching, and a client has already asked for it.
    _claimed: set[str] = Factory(set)
    #: Stored, and no client has asked for it yet; oldest first.
    _unclaimed: OrderedDict[str, _ReadAhead] = Factory(OrderedDict)
    _unclaimed_size: int = 0
    #: Projects with a read-ahead running or unclaimed.
    _projects: Counter[str] = Factory(Counter)
    #: Of ``_running``, core metadata files, and the ``User-Agent`` of
    #: the client they are read for.
    _metadata_running: dict[str, str] = Factory(dict)
    _paused: bool = False
    _stopped: bool = False
    _done: Waiters = Factory(Waiters)

    def running(self) -> int:
        """
        Read-aheads (of files and pages) scheduled or running.
        """
        pages = 0 if self.pages is None else self.pages.running()
        return len(self._running) + pages

    def when_done(self) -> Deferred[None]:
        """
        Fires once no read-ahead is scheduled or running (at once if none
        is).
        """
        return Deferred.fromCoroutine(self._all_done())

    async def _all_done(self) -> None:
        # A page read ahead may start a metadata file's read-ahead.
        while self.running():
            await self._done.wait(not self._running)
            if self.pages is not None:
                await self.pages.when_done()

    def stop(self) -> None:
        """
        Start no more read-aheads (the server is stopping).
        """
        self._stopped = True
        if self.pages is not None:
            self.pages.stop()

    def after_core_metadata(
        self, key: str, user_agent: str | None, credentialed: bool
    ) -> None:
        """
        A client has been answered the core metadata stored under ``key``:
        read ahead its dependencies' pages (see :mod:`.pagereads`).
        """
        if self.pages is not None and self.max_size > 0:
            self.pages.after_metadata(key, user_agent, credentialed)

    def page_asked(self, name: str) -> None:
        """
        A client asks for the page of ``name``: counted as used if it was
        read ahead.
        """
        if self.pages is not None:
            self.pages.claim(name)

    def after_metadata(
        self, request: FileRequest, size: int | None, project: str
    ) -> None:
        """
        A client has read the core metadata of the file ``request`` fetches
        (``size`` bytes, if the page said), of ``project``: fetch the file,
        after this turn's responses, unless read-ahead is off or busy, the
        file is of unknown size, too large, or without a digest, the
        project already has a read-ahead no client asked for, or the
        budget of unclaimed bytes is spent.
        """
        self._write_off(self.reactor.seconds())
        if (
            self._stopped
            or self.max_size <= 0
            or size is None
            or size > self.max_size
            or not self.engine.store.fits(size)
            or request.expected_sha256 is None
            or request.key in self._running
            or len(self._running) >= MAX_RUNNING
            or self._projects[project]
            or not self._within_budget(size)
        ):
            return
        self._running[request.key] = _ReadAhead(size, project)
        self._projects[project] += 1
        after_io(self.reactor).addCallback(
            lambda _: Deferred.fromCoroutine(self._fetch(request))
        )

    def metadata_ahead(self, file: ProjectFile, project: str, user_agent: str) -> None:
        """
        Fetch the core metadata of ``file`` of ``project``, the file a
        client (sending ``user_agent``) will read the metadata of next:
        one per project until a client asks for it, at most
        :data:`MAX_RUNNING_METADATA` at once, only with the sha256 the page
        gives for it.  Once stored, the pages of the dependencies it names
        are read ahead for that client, as if it had read it (the
        resolver's walk, ahead of it; bounded by the pages' budget).
        """
        expected = file.core_metadata_hashes.get("sha256")
        self._write_off(self.reactor.seconds())
        if (
            self._stopped
            or self.max_size <= 0
            or not expected
            or not metadata_servable(file)
            or len(self._metadata_running) >= MAX_RUNNING_METADATA
            or self._projects[project]
        ):
            return
        request = file_request(file.metadata_url, expected.lower(), USER_AGENT, 0)
        if request.key in self._running:
            return
        self._running[request.key] = _ReadAhead(0, project)
        self._metadata_running[request.key] = user_agent
        self._projects[project] += 1
        Deferred.fromCoroutine(self._fetch(request))

    def page_fetched(self, page: ProjectPage, project: str, user_agent: str | None) -> None:
        """
        A client asked for ``page`` of ``project``, which was just fetched
        for it: read ahead the core metadata of the file it reads next,
        when that is certain for its Python (the newest version's one pure
        wheel; see :func:`~buildcache.ecosystems.pypi.requires.best_pure_wheel`).
        """
        if self.max_size <= 0 or self._stopped:
            return
        environment = client_environment(user_agent)
        if environment is None or not environment["python_full_version"]:
            return
        candidate = best_pure_wheel(page, "", environment["python_full_version"])
        if candidate is not None:
            self.metadata_ahead(candidate, project, user_agent or "")

    def unclaimed_bytes(self) -> int:
        """
        Bytes of read-aheads running or stored that no client has asked
        for (written-off ones aside).
        """
        self._write_off(self.reactor.seconds())
        return self._unclaimed_bytes()

    def _unclaimed_bytes(self) -> int:
        running = sum(
            r.size for key, r in self._running.items() if key not in self._claimed
        )
        return running + self._unclaimed_size

    def _within_budget(self, size: int) -> bool:
        # after_metadata has just written off what is due.
        budget = UNCLAIMED_BUDGET_FILES * self.max_size
        unclaimed = self._unclaimed_bytes()
        if unclaimed + size <= budget:
            self._paused = False
            return True
        if not self._paused:
            self._paused = True
            self.log.info(
                "Read-ahead paused: {unclaimed} bytes it fetched have not been"
                " asked for by any client (budget {budget}); it resumes as"
                " clients ask for them, or as they are written off after"
                " {ttl:g}s",
                unclaimed=unclaimed, budget=budget, ttl=UNCLAIMED_TTL,
            )
        return False

    def _write_off(self, now: float) -> None:
        while self._unclaimed:
            key, oldest = next(iter(self._unclaimed.items()))
            if oldest.stored_at + UNCLAIMED_TTL > now:
                return
            self._drop_unclaimed(key)

    def _drop_unclaimed(self, key: str) -> None:
        gone = self._unclaimed.pop(key, None)
        if gone is not None:
            self._unclaimed_size -= gone.size
            self._release(gone.project)

    def _release(self, project: str) -> None:
        self._projects[project] -= 1
        if self._projects[project] <= 0:
            del self._projects[project]

    async def _fetch(self, request: FileRequest) -> None:
        key = request.key
        target, policy, engine = request.target, request.policy, self.engine
        url = target.url
        stored = False
        try:
            # Nothing to read ahead when a client's download runs, or the
            # file is a hit (the engine's own hit path; a miss, the twin
            # takeover included, is left to engine.resolve below).
            if self._stopped or engine.fetcher.downloading(key):
                return
            if engine.would_hit(target, policy):
                return
            self._fetching.add(key)
            if self.observer is not None:
                self.observer.read_ahead_started()
            resolved = await engine.resolve(target, policy)
            answer = resolved.answer
            if answer is None:
                # Stored meanwhile, or taken over from its http:// twin.
                resolved.close()
                return
            if answer.body is not None:
                # Until it is in the store (or not): a large file is
                # answered while it still streams.
                await drained(answer.body)
            stored = answer.status == 200 and engine.find(target) is not None
        except ANSWERED_ERRORS as e:
            # The fetcher has logged what went wrong; the client's own
            # request will try again.
            self.log.info(
                "Read-ahead of {url} failed: {error}",
                url=redact(url), error=str(e),
            )
        except Exception:
            self.log.failure("Read-ahead of {url} failed", url=redact(url))
        finally:
            read_ahead = self._running.pop(key)
            user_agent = self._metadata_running.pop(key, None)
            if user_agent is not None and stored and self.pages is not None:
                self.pages.after_metadata(key, user_agent, credentialed=False)
            self._fetching.discard(key)
            if key in self._claimed:
                # Released when the client asked.
                self._claimed.discard(key)
            elif stored:
                self._drop_unclaimed(key)
                self._unclaimed[key] = attrs.evolve(
                    read_ahead, stored_at=self.reactor.seconds()
                )
                self._unclaimed_size += read_ahead.size
                while len(self._unclaimed) > UNCLAIMED_KEPT:
                    self._drop_unclaimed(next(iter(self._unclaimed)))
            else:
                self._release(read_ahead.project)
            if not self._running:
                self._done.fire()

    def claim(self, key: str, stored: bool) -> bool:
        """
        A client asks for ``key``, which the store has (``stored``) or not:
        whether this is the first request for a file a read-ahead fetched
        into the store, or is fetching.  Counted once per read-ahead.
        """
        self._write_off(self.reactor.seconds())
        if stored:
            if key not in self._unclaimed:
                return False
            self._drop_unclaimed(key)
        else:
            # Evicted before anyone asked, if it was read ahead at all.
            self._drop_unclaimed(key)
            if key not in self._fetching or key in self._claimed:
                return False
            self._claimed.add(key)
            # From now on it is the client's download: off the budget, and
            # no longer holding its project back.
            self._release(self._running[key].project)
        if self.observer is not None:
            self.observer.read_ahead_claimed()
        return True
