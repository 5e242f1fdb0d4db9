"""
The cache engine: one flow for every front end.

:meth:`Engine.serve` answers a client request for a :class:`Target` under
an ecosystem's :class:`Policy`: look the target up (the client's own
credentials' entries, the ``Vary`` variant its headers select), make the
one freshness decision (:func:`buildcache.engine.freshness.decide`),
revalidate (a 304 refreshes; a 304 for an entry evicted meanwhile becomes
a miss), serve a stored copy stale when the upstream fails (unless a
private response's directives forbid it), fetch a miss once through the
fetcher (which joins concurrent clients), and respond.  Failures map to
statuses in one table (:mod:`buildcache.engine.errors`), and the outcome is
recorded for accounting (:mod:`buildcache.engine.exchanges`).

:meth:`Engine.resolve` is the same flow without the response, for a front
end that renders what it gets (the pip index's pages).

The RFC 9111 and credential rules are the engine's, whatever a policy
says: a policy's stale statuses are heeded among error statuses only
(:func:`buildcache.engine.freshness.stale_status`), a private request's
client is never promised a longer life than its response's own
(:func:`buildcache.engine.freshness.private_cache_control`), and a twin is
taken over under the client's own key (:meth:`Engine.adopt`).  An upstream
host that failed a revalidation is not asked again for a while
(:mod:`buildcache.engine.backoff`).

A **hits-only** engine (``hits_only=True``, a hit worker's, over a
read-only store and no fetcher) answers what :meth:`Engine.fresh_hit`
answers and nothing else: every other outcome raises
:class:`~buildcache.engine.errors.HandOff` before any I/O, and
:meth:`Engine.crashed` (every front end's errback) passes the request to
``on_hand_off``, which the service injects (the engine knows no
connections).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from buildcache.credentials import redact
from buildcache.engine.backoff import UPSTREAM_FAILURE_BACKOFF, UpstreamBackoff
from buildcache.engine.conditional import validators_of
from buildcache.engine.errors import (
    ANSWERED_ERRORS,
    NO_FETCHER,
    HandOff,
    IntegrityError,
    StaleForbidden,
    TargetRefused,
    UpstreamError,
    message_for,
    status_for,
)
from buildcache.engine.events import CacheObserver
from buildcache.engine.exchanges import (
    CacheStatus,
    ClientExchange,
    ErrorFormat,
    Exchanges,
    client_gone,
    from_shared_tier,
    hand_off_exchange,
)
from buildcache.engine.freshness import (
    Decision,
    Kind,
    client_credentials,
    decide,
    effective_kind,
    is_storable,
    may_serve_stale,
    private_cache_control,
    stale_status,
)
from buildcache.engine.hot import HotHits
from buildcache.engine.keys import (
    adopt_twin,
    find_stored,
    http_twin,
    open_stored,
    private_family,
)
from buildcache.engine.policy import NO_EXPECTATION, Expectation, Policy, Target
from buildcache.engine.resolved import ForClient, Resolved
from buildcache.engine.respond import send_error, serve_answer, serve_head, serve_stored
from buildcache.engine.variants import URL_VARIANTS
from buildcache.fetch.fetcher import Fetcher, UpstreamAnswer, UpstreamRequest, drained
from buildcache.store import Entry, Store, StoredObject

__all__ = ["Engine", "HandOff", "Resolved", "NO_FETCHER"]


@define
class Engine:
    """
    See the module docstring.
    """

    log = Logger()

    store: Store
    fetcher: Fetcher
    clock: IReactorTime
    observer: CacheObserver | None = None
    index_ttl: float = 600.0
    #: Seconds an upstream host that failed a revalidation is not asked
    #: again (its stored entries are served stale at once meanwhile).
    upstream_backoff: float = UPSTREAM_FAILURE_BACKOFF
    #: Answer fresh hits only; hand everything else off (see the module
    #: docstring).
    hits_only: bool = False
    #: What takes a handed-off request (its connection goes to the process
    #: that fetches); the service sets it for a hits-only engine.
    on_hand_off: Callable[[Request], None] | None = None
    #: Bumped by a front end whenever state it holds in memory, which its
    #: answers derive from, changes (the page of a project a pip client
    #: last saw): answers remembered before no longer hold (see
    #: :meth:`hot_hits`).
    held_changes: int = field(default=0, init=False)
    exchanges: Exchanges = field(init=False)
    backoff: UpstreamBackoff = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.exchanges = Exchanges(self.clock, self.observer)
        self.backoff = UpstreamBackoff(self.clock, self.upstream_backoff)

    def begin(
        self, request: Request, front_end: str, name: str | None = None,
        errors: ErrorFormat | None = None,
    ) -> ClientExchange:
        """
        Start accounting for ``request``: a front end calls this when it
        starts answering one (refusals included).  ``name`` is the package
        or project it is for; ``errors``, when given, writes every error
        answer the engine sends it (the registry's JSON errors).
        """
        return self.exchanges.begin(request, front_end, name, errors)

    def hot_hits(self) -> HotHits:
        """
        A table of repeated hits (:mod:`buildcache.engine.hot`) for one
        port of this engine.  Its answers hold while no row changes, no
        state a front end holds in memory changes (:attr:`held_changes`:
        a page fetched but not stored, which a download started before
        the answer's request may bring) and, when this engine fetches, no
        download starts: a lookup hook (an apk package's waits for its
        index being stored) may wait for one.
        """
        store, fetcher = self.store, self.fetcher
        if self.hits_only:
            def generation() -> int:
                return store.changes() + self.held_changes

            used = None
        else:
            def generation() -> int:
                return store.changes() + fetcher.started + self.held_changes

            used = fetcher.used if fetcher.shared is not None else None
        return HotHits(store, self.clock, generation, self.observer, used)

    def refuse(self, request: Request, code: int, message: str) -> None:
        """Answer ``request`` with ``code`` and a one-line reason."""
        send_error(request, code, message)

    def answer_error(self, request: Request, error: BaseException) -> None:
        """Answer ``request`` with the status the error table gives ``error``."""
        send_error(request, status_for(error), message_for(error))

    def serve(self, request: Request, target: Target, policy: Policy) -> Deferred[None]:
        """
        Answer ``request`` for ``target`` under ``policy``; see the module
        docstring.  Fires when the answer has started (never fails).
        """
        if self.hits_only:
            # The hit path is synchronous: no coroutine, no Deferred.
            try:
                self.respond(request, target, policy, self._hit_or_hand_off(target, policy))
            except BaseException:
                self.crashed(Failure(), request)
            return succeed(None)
        d = Deferred.fromCoroutine(self._serve(request, target, policy))
        d.addErrback(self.crashed, request)
        return d

    async def _serve(self, request: Request, target: Target, policy: Policy) -> None:
        resolved = await self.resolve_for(request, target, policy)
        if resolved is not None:
            self.respond(request, target, policy, resolved)

    async def resolve_for(
        self, request: Request, target: Target, policy: Policy
    ) -> Resolved | None:
        """
        :meth:`resolve` for ``request``'s method; when that fails with a
        failure of the error table, ``request`` is answered with its status
        and None returned.
        """
        try:
            return await self.resolve(target, policy, request.method)
        except ANSWERED_ERRORS as e:
            self.answer_error(request, e)
            return None

    def crashed(self, failure: Failure, request: Request) -> None:
        """
        Answer ``request`` after a bug: a 500 if nothing went out yet, else
        the connection closed (its response cannot be whole).  A front end
        that answers on its own path adds this as its errback too.
        """
        if failure.check(HandOff) is not None:
            self.hand_off(request)
            return
        self.log.failure("Serving {uri} failed", failure, uri=_shown_uri(request))
        if client_gone(request):
            return
        if not request.startedWriting:
            send_error(request, 500, "internal error")
        else:
            request.loseConnection()

    def hand_off(self, request: Request) -> None:
        """
        Pass ``request`` (nothing of its answer written) to
        ``on_hand_off``: the one place a hits-only engine's requests leave
        this process.  It is neither logged nor counted here (the process
        that answers it does both).
        """
        hand_off_exchange(request)
        if self.on_hand_off is None or request.startedWriting:
            # A bug: a hits-only engine without a way out, or a hand-off
            # after the answer began.
            self.log.error(
                "Cannot hand off {uri}", uri=_shown_uri(request), event="hand_off_failed"
            )
            if not request.startedWriting:
                send_error(request, 503, "this worker cannot hand the request off")
            else:
                request.loseConnection()
            return
        self.on_hand_off(request)

    def respond(
        self, request: Request, target: Target, policy: Policy, resolved: Resolved
    ) -> None:
        """
        Send what :meth:`resolve` found, with the policy's ``Cache-Control``
        and extra headers.
        """
        extra = policy.extra_headers(target)
        if resolved.shared:
            from_shared_tier(request)
        if resolved.stored is not None:
            stored = resolved.stored
            serve_stored(
                request, stored, resolved.cache,
                self._cache_control(policy, resolved, stored.entry.headers, 200), extra,
                repeatable=(
                    resolved.cache is CacheStatus.HIT and resolved.kind is Kind.IMMUTABLE
                    and not resolved.private and not resolved.shared
                ),
            )
            return
        answer = resolved.answer
        assert answer is not None
        cache_control = self._cache_control(policy, resolved, answer.headers, answer.status)
        if answer.body is None:
            serve_head(request, answer, resolved.cache, cache_control, extra)
        else:
            serve_answer(request, answer, resolved.cache, cache_control, extra)

    def _cache_control(
        self, policy: Policy, resolved: Resolved, headers: Mapping[str, str], status: int
    ) -> str | None:
        """
        The policy's ``Cache-Control`` for the client; a private one never
        promises a longer life than the response's own.
        """
        kind = resolved.kind
        chosen = policy.cache_control(kind, policy.ttl(kind, self.index_ttl), headers, status)
        if not resolved.private:
            return chosen
        return private_cache_control(chosen, headers, status, self.clock.seconds())

    async def resolve(
        self, target: Target, policy: Policy, method: bytes = b"GET"
    ) -> Resolved:
        """
        The stored entry or the upstream answer for ``target``, without
        responding.  Fails with one of the failures in
        :data:`buildcache.engine.errors.ERROR_STATUS`; in a hits-only
        engine, anything but a fresh hit raises :class:`HandOff`.
        """
        if self.hits_only:
            return self._hit_or_hand_off(target, policy)
        await policy.before_lookup(target, self)
        client = self._for_client(target, policy)
        stored = self._open(client, policy)
        if stored is not None:
            if self._fresh(client, policy, stored.entry):
                if client.kind is Kind.IMMUTABLE and not client.private:
                    self.fetcher.used(stored.entry)
                return self._resolved(client, CacheStatus.HIT, stored=stored)
            resolved = await self._revalidate(client, policy, stored)
        elif method == b"HEAD" and not policy.head_fetches(client.kind):
            if self.fetcher.downloading(client.key):
                return await self._miss(client, policy)
            return await self._head(client, policy)
        else:
            resolved = await self._miss(client, policy)
        if method == b"HEAD" and policy.head_fetches(client.kind):
            return await self._stored_for_head(client, policy, resolved)
        return resolved

    def fresh_hit(self, target: Target, policy: Policy) -> Resolved | None:
        """
        ``target``'s stored entry when it answers this client as it is (a
        HIT), else None: the hit path alone.  It reads the store and the
        clock and nothing else (no fetcher, no policy hook, no write but
        the access time a read-only store keeps for its writer), so that a
        process holding a read-only store can answer hits and hand the
        rest to the process that fetches.
        """
        client = self._for_client(target, policy)
        stored = self._open(client, policy)
        if stored is None:
            return None
        if self._fresh(client, policy, stored.entry):
            return self._resolved(client, CacheStatus.HIT, stored=stored)
        stored.close()
        return None

    def would_hit(self, target: Target, policy: Policy) -> bool:
        """
        Whether ``target`` would be answered by a HIT now (see
        :meth:`fresh_hit`), from the store's index alone: nothing is
        opened and no access is recorded, so that asking (a read-ahead
        deciding what to fetch) neither costs a file's opening nor counts
        as a use for eviction.
        """
        client = self._for_client(target, policy)
        entry = self._find(target, client.key)
        return (
            entry is not None
            and policy.answers(target, entry)
            and self._fresh(client, policy, entry)
        )

    def _hit_or_hand_off(self, target: Target, policy: Policy) -> Resolved:
        resolved = self.fresh_hit(target, policy)
        if resolved is None:
            raise HandOff(target.url)
        return resolved

    def _no_upstream(self, what: str) -> None:
        """A hits-only engine hands off whatever would go upstream or write."""
        if self.hits_only:
            raise HandOff(what)

    def _resolved(
        self, client: ForClient, cache: CacheStatus, *,
        stored: StoredObject | None = None, answer: UpstreamAnswer | None = None,
        shared: bool = False,
    ) -> Resolved:
        shared = shared or (answer is not None and answer.shared)
        return Resolved(cache, client.kind, stored, answer, client.private, shared)

    def _open(self, client: ForClient, policy: Policy) -> StoredObject | None:
        """
        The stored entry that answers ``client``, opened, when the policy
        lets it (see :meth:`Policy.answers`); None to fetch.
        """
        target = client.target
        if target.variants:
            stored = open_stored(self.store, client.key, target.upstream_headers)
        else:
            # Always asked with the same headers: its one entry answers,
            # whatever its Vary says.
            stored = self.store.lookup(client.key)
        if stored is not None and not policy.answers(target, stored.entry):
            self.log.info(
                "Not answering {key} from {entry}: its policy rejects it",
                key=client.key, entry=stored.entry.key,
            )
            stored.close()
            return None
        return stored

    def _fresh(self, client: ForClient, policy: Policy, entry: Entry) -> bool:
        return decide(
            client.kind, entry.headers, entry.validated_at, self.clock.seconds(),
            client.target.headers, policy.ttl(client.kind, self.index_ttl),
        ) is Decision.FRESH

    def family(self, target: Target) -> str:
        """
        The key of ``target``'s entries as its client gets them: of its
        credentials, if it sends any.
        """
        return private_family(
            target.key, self.store.secret, client_credentials(target.headers)
        )

    def find(self, target: Target) -> Entry | None:
        """
        The stored entry (of the client's family, the variant its upstream
        headers select) that would answer ``target``, without opening it.
        """
        return self._find(target, self.family(target))

    def _find(self, target: Target, family: str) -> Entry | None:
        if not target.variants:
            return self.store.peek(family)
        return find_stored(self.store, family, target.upstream_headers)

    async def adopt(
        self, target: Target, policy: Policy, expected: Expectation
    ) -> StoredObject | None:
        """
        The entry the ``http://`` twin of ``target``'s key holds in the
        client's own family (:func:`buildcache.engine.keys.http_twin`),
        taken over under the client's key when the policy vouches for its
        bytes (:meth:`Policy.vouches_for`), and opened; else None.  The
        key is the engine's choice, never the policy's: a client with
        credentials is never answered from an anonymous twin.
        """
        self._no_upstream(target.url)
        family = self.family(target)
        twin_family = http_twin(family)
        if twin_family is None:
            return None
        twin = find_stored(self.store, twin_family, target.upstream_headers)
        if twin is None or not await policy.vouches_for(target, self, twin, expected):
            return None
        adopted = adopt_twin(self.store, family, twin_family, twin)
        if adopted is None:
            return None
        if adopted.source_digest is None and expected.source_digest is not None:
            self.store.set_source_digest(adopted, expected.source_digest)
        return self.store.lookup(adopted.key)

    async def refresh(self, target: Target, policy: Policy) -> None:
        """
        Fetch ``target`` upstream (conditionally, when a copy is stored)
        and wait until the answer is stored: what a policy that checks
        files against an index does before it reads the index.  A failed
        upstream is logged; the stored copy stays.
        """
        self._no_upstream(target.url)
        client = self._for_client(target, policy)
        entry = self.find(target)
        conditional = validators_of(entry.headers) if entry is not None else {}
        try:
            # Checked as any fetch of it is: what fails its policy's check
            # does not replace the stored copy.
            expected = await policy.expect(target, self)
            answer = await self.fetcher.fetch(self._upstream_request(
                client, policy, conditional, expected,
                revalidates=entry.key if entry is not None else None,
            ))
            if answer.body is not None:
                await drained(answer.body)
        except (UpstreamError, IntegrityError) as e:
            self.log.warn("Could not revalidate {key}: {error}", key=client.key, error=str(e))

    def _for_client(self, target: Target, policy: Policy) -> ForClient:
        private = bool(client_credentials(target.headers))
        return ForClient(
            target, self.family(target), effective_kind(policy.kind(target), private),
            private,
        )

    def _upstream_request(
        self,
        client: ForClient,
        policy: Policy,
        conditional: Mapping[str, str],
        expected: Expectation,
        revalidates: str | None = None,
    ) -> UpstreamRequest:
        target = client.target
        kind = client.kind

        def storable(status: int, response_headers: Mapping[str, str]) -> bool:
            # RFC 9111's rules win over any ecosystem's; a policy may only
            # narrow them.
            return (
                expected.vouched
                and is_storable(kind, status, response_headers, target.headers)
                and policy.storable(kind, status, response_headers, target.headers)
            )

        return UpstreamRequest(
            key=client.key,
            url=target.url,
            headers={**target.upstream_headers, **conditional},
            expected_size=expected.size,
            expected_sha256=expected.sha256,
            verify=expected.verify,
            verify_covers_body=expected.verify_covers_body,
            stream_before_check=expected.stream_before_check,
            storable=storable,
            follow_redirects=target.follow_redirects,
            variants=URL_VARIANTS if target.variants else None,
            revalidates=revalidates,
            front_end=target.front_end,
            operator_credentials=target.operator_credentials,
            source_digest=expected.source_digest,
            # Only what every node would store alike: an immutable file,
            # asked without credentials or conditions, that its policy
            # vouches for.
            shared=(
                kind is Kind.IMMUTABLE and not client.private and not conditional
                and revalidates is None and expected.vouched
            ),
        )

    async def _revalidate(
        self, client: ForClient, policy: Policy, stored: StoredObject
    ) -> Resolved:
        validator = policy.head_validator(client.kind)
        version = None if validator is None else stored.entry.headers.get(validator)
        if validator is not None and version is not None:
            return await self._revalidate_by_head(client, policy, stored, validator, version)

        async def conditional_get() -> UpstreamAnswer:
            # A 200 replaces the stored copy: it is checked as a miss's
            # body is (a captive portal's page must not replace a good
            # index page).
            expected = await policy.expect(client.target, self)
            return await self.fetcher.fetch(self._upstream_request(
                client, policy, validators_of(stored.entry.headers), expected,
                revalidates=stored.entry.key,
            ))

        outcome = await self._ask_or_stale(client, policy, stored, conditional_get)
        if isinstance(outcome, Resolved):
            return outcome
        if outcome.status == 304:
            return await self._refreshed(client, policy, stored.entry.key)
        return self._resolved(client, CacheStatus.MISS, answer=outcome)

    async def _ask_or_stale(
        self, client: ForClient, policy: Policy, stored: StoredObject,
        ask: Callable[[], Awaitable[UpstreamAnswer]],
    ) -> UpstreamAnswer | Resolved:
        """
        The upstream's answer to a revalidation of ``stored`` (which is
        closed), or ``stored`` as a STALE answer when the upstream failed
        moments ago, fails now (unreachable, a body that fails its check,
        a stale status), and its directives allow it (see
        :meth:`_stale`).  The host's backoff follows the outcome.
        """
        url = client.target.url
        try:
            if self._backing_off(client, stored):
                return self._stale(client, stored, "the upstream failed moments ago")
            answer = await ask()
        except TargetRefused:
            stored.close()
            raise
        except UpstreamError as e:
            self.backoff.failed(url)
            return self._stale(client, stored, str(e))
        except IntegrityError as e:
            # A body that fails its check (a captive portal's 200) is a
            # failed revalidation, as a 5xx is.
            return self._stale(client, stored, str(e))
        except BaseException:
            stored.close()
            raise
        if stale_status(answer.status, policy.stale_on(answer.status)):
            if answer.body is not None:
                answer.body.close()
            self.backoff.failed(url)
            return self._stale(client, stored, f"upstream answered {answer.status}")
        self.backoff.succeeded(url)
        stored.close()
        return answer

    def _backing_off(self, client: ForClient, stored: StoredObject) -> bool:
        """
        Whether ``stored`` is served stale without asking its upstream,
        which failed moments ago (when it may be served stale at all;
        else the upstream is asked).
        """
        return self.backoff.failing(client.target.url) and may_serve_stale(
            stored.entry.headers, client.private
        )

    async def _revalidate_by_head(
        self, client: ForClient, policy: Policy, stored: StoredObject,
        validator: str, version: str,
    ) -> Resolved:
        """
        Ask for the file's version with a HEAD: the same version refreshes
        the stored copy, another one is fetched (a registry does not count
        a HEAD against its pull limit, as it does a GET).
        """

        async def head() -> UpstreamAnswer:
            return await self.fetcher.head(
                self._upstream_request(client, policy, {}, NO_EXPECTATION)
            )

        outcome = await self._ask_or_stale(client, policy, stored, head)
        if isinstance(outcome, Resolved):
            return outcome
        if outcome.status == 200 and outcome.headers.get(validator) == version:
            self.store.mark_validated(stored.entry.key)
            return await self._refreshed(client, policy, stored.entry.key)
        # Another version: its GET may still fail (a registry's pull limit
        # counts GETs, not HEADs), and the stored copy then answers stale.
        again = self._open(client, policy)
        if again is None:
            return await self._miss(client, policy)

        async def get() -> UpstreamAnswer:
            expected = await policy.expect(client.target, self)
            return _unconditional(client.target.url, await self.fetcher.fetch(
                self._upstream_request(client, policy, {}, expected)
            ))

        fetched = await self._ask_or_stale(client, policy, again, get)
        if isinstance(fetched, Resolved):
            return fetched
        return self._resolved(client, CacheStatus.MISS, answer=fetched)

    async def _refreshed(self, client: ForClient, policy: Policy, key: str) -> Resolved:
        """
        The entry under ``key`` the upstream just confirmed, or, when it
        was evicted while the upstream was asked, a fetch of it.
        """
        fresh = self.store.lookup(key)
        if fresh is None:
            return await self._miss(client, policy)
        return self._resolved(client, CacheStatus.REVALIDATED, stored=fresh)

    def stale(self, target: Target, policy: Policy, why: str) -> Resolved | None:
        """
        ``target``'s stored copy as a STALE answer because ``why`` (another
        source failed: the pip index serves a later upstream's page when
        the one that owns the project fails), with the same rules, log and
        report as a failed revalidation's; None when nothing is stored or
        its directives forbid serving it stale.  A hits-only engine hands
        it off (serving stale is the fetching process's decision).
        """
        self._no_upstream(target.url)
        client = self._for_client(target, policy)
        stored = self._open(client, policy)
        if stored is None:
            return None
        try:
            return self._stale(client, stored, why)
        except StaleForbidden:
            return None

    def _stale(self, client: ForClient, stored: StoredObject, why: str) -> Resolved:
        if not may_serve_stale(stored.entry.headers, client.private):
            stored.close()
            raise StaleForbidden(
                f"the upstream could not revalidate this private response ({why}),"
                " and its directives forbid serving it stale"
            )
        self.log.warn(
            "Serving stale {key}: revalidation failed: {why}", key=client.key, why=why
        )
        if self.observer is not None:
            self.observer.stale_served(client.target.url)
        return self._resolved(client, CacheStatus.STALE, stored=stored)

    async def _head(self, client: ForClient, policy: Policy) -> Resolved:
        """
        A HEAD that missed goes upstream as a HEAD: nothing is fetched or
        stored for it (a HEAD that joins a running download shares it).
        An upstream that answers 405 or 501 to a HEAD is asked with a GET.
        """
        answer = await self.fetcher.head(
            self._upstream_request(client, policy, {}, NO_EXPECTATION)
        )
        if answer.status in (405, 501):
            return await self._miss(client, policy)
        cache = CacheStatus.HIT if answer.spared_the_line else CacheStatus.MISS
        return self._resolved(client, cache, answer=answer)

    async def _stored_for_head(
        self, client: ForClient, policy: Policy, resolved: Resolved
    ) -> Resolved:
        """
        A HEAD for a file its policy fetches whole for a HEAD (see
        :meth:`Policy.head_fetches`) that was answered by the upstream: the
        body is stored before the HEAD is answered from the store, as a
        MISS.  An answer that was not stored (an error, a body that may not
        be kept) is the answer.
        """
        answer = resolved.answer
        if answer is None or answer.status != 200 or answer.body is None:
            return resolved
        # What was stored before: still there afterwards means the new body
        # was not kept (no-store, a type this client may not store), and
        # the old copy must not answer for it.
        before = self.find(client.target)
        download = answer.body.download
        await drained(answer.body)
        failure = download.failure
        if failure is not None:
            # A truncated or mismatching body: no HEAD may promise it.
            if isinstance(failure.value, ANSWERED_ERRORS):
                failure.raiseException()
            raise UpstreamError(f"{client.target.url}: {failure.getErrorMessage()}")
        stored = self._open(client, policy)
        if stored is not None and before is not None and stored.entry == before:
            stored.close()
            stored = None
        cache = CacheStatus.HIT if answer.spared_the_line else CacheStatus.MISS
        if stored is None:
            # Not kept (no-store, say): its status and headers still answer.
            return self._resolved(client, cache, answer=UpstreamAnswer(
                answer.status, answer.headers, None, answer.shared,
            ))
        return self._resolved(client, cache, stored=stored, shared=answer.shared)

    async def _miss(self, client: ForClient, policy: Policy) -> Resolved:
        target = client.target
        expected = await policy.expect(target, self)
        adopted = await self.adopt(target, policy, expected)
        if adopted is not None:
            return self._resolved(client, CacheStatus.HIT, stored=adopted)
        if not expected.vouched:
            # Immutable once stored: a body nothing checked (an error page
            # sent as 200, say) would be served for good.
            self.log.info(
                "Serving {url} without storing it: what would vouch for it"
                " (an index) does not list it",
                url=target.url,
            )
        try:
            answer = await self.fetcher.fetch(
                self._upstream_request(client, policy, {}, expected)
            )
        except IntegrityError as e:
            newer = await policy.recheck(target, self, expected, e)
            if newer is None:
                raise
            answer = await self.fetcher.fetch(
                self._upstream_request(client, policy, {}, newer)
            )
        _unconditional(target.url, answer)
        if answer.spared_the_line:
            # Read from the shared tier, or from a download that had ended
            # (its row on its way into the store).
            return self._resolved(client, CacheStatus.HIT, answer=answer)
        if not stale_status(answer.status, policy.stale_on(answer.status)):
            # The host answers again: its stale entries are asked about.
            self.backoff.succeeded(target.url)
        return self._resolved(client, CacheStatus.MISS, answer=answer)


def _unconditional(url: str, answer: UpstreamAnswer) -> UpstreamAnswer:
    """
    ``answer`` to a request sent without conditions; a 304 to one is an
    upstream failure: nothing was asked on condition, and it has no body
    to serve.
    """
    if answer.status == 304:
        if answer.body is not None:
            answer.body.close()
        raise UpstreamError(f"{url} answered 304 to an unconditional request")
    return answer


def _shown_uri(request: Request) -> str:
    """``request``'s target as a log may show it: credentials masked."""
    return redact(request.uri.decode("latin-1"))
