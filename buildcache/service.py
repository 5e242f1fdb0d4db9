"""
Assembling the server: one store, one fetcher (and the shared tier it
asks before upstreams, when one is configured) and the front ends built
from a :class:`buildcache.config.Config`, as one twistd ``MultiService``.

:class:`Server` wires the parts (tests build one and listen on port 0);
:func:`make_service` adds the listening ports and the store's
housekeeping for ``twistd buildcache`` and ``buildcache.tac``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from attrs import Factory, frozen
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from twisted.web.client import HTTPConnectionPool
from twisted.web.iweb import IAgent
from twisted.web.server import Site

from buildcache.access import AccessPolicy, upstream_host_key
from buildcache.config import REGISTRY_ALIASES, Config
from buildcache.credentials import hide_userinfo, readable_by_others
from buildcache.ecosystems.apk.check import ApkIndexes
from buildcache.ecosystems.apk.policy import ApkPolicy
from buildcache.ecosystems.apt.policy import APT
from buildcache.ecosystems.oci.auth import registry_authentication as oci_authentication
from buildcache.ecosystems.oci.registry import RegistryResource
from buildcache.ecosystems.pypi.assemble import index_resource
from buildcache.ecosystems.pypi.index import IndexResource
from buildcache.ecosystems.pypi.kinds import PIP_FILES
from buildcache.ecosystems.pypi.prefetch import Prefetcher
from buildcache.engine.core import NO_FETCHER, Engine
from buildcache.engine.policy import GenericPolicy
from buildcache.fetch.connect import make_http_client, upstream_pool
from buildcache.fetch.fetcher import Fetcher
from buildcache.frontends.connections import Admission, ClientConnections
from buildcache.frontends.proxy import OwnIndex, ProxyResource, Router
from buildcache.frontends.relay import (
    HandOffStatus,
    RelayListeners,
    RelayTarget,
    hand_off_request,
)
from buildcache.frontends.sites import ProxySite, StrictSite
from buildcache.ops.activity import Activity
from buildcache.ops.snapshot import SnapshotSources
from buildcache.ops.status import STATUS_PATHS, StatusResource
from buildcache.shared.tier import S3Tier, make_tier
from buildcache.store import COMMIT_DELAY, Store, StoreError, in_thread_pool

#: Seconds between writes of batched access times.
FLUSH_INTERVAL = 5.0
#: Seconds an idle client connection (keep-alive) is kept open.
CLIENT_IDLE_TIMEOUT = 60.0
#: Seconds a stopping server waits for downloads in flight and responses
#: being sent.
STOP_GRACE = 10.0
#: Threads that fsync and rename stored bodies.
STORE_THREADS = 4



def proxy_policies(apk_indexes: ApkIndexes) -> tuple[GenericPolicy, ...]:
    """
    The policies the proxy port serves, in the order their path rules are
    tried: apt, apk (packages checked against ``apk_indexes``), pip files.
    Anything else is served under the generic RFC 9111 policy.
    """
    return (APT, ApkPolicy(indexes=apk_indexes), PIP_FILES)


def configured_upstreams(config: Config) -> list[str]:
    """
    The base URLs of every configured upstream (mirrors, pip indexes,
    registries) and of the shared tier's object store: allowed even on a
    private address, kept in the health table.
    """
    return (
        [m.url for m in config.mirrors]
        + list(config.pypi_upstreams)
        + [r.url for r in config.registries]
        + ([config.shared_store.endpoint] if config.shared_store is not None else [])
    )


def registry_authentication(config: Config, reactor: Any) -> Callable[[IAgent], IAgent] | None:
    """
    What wraps the upstream agent so that requests to the configured
    registries answer their challenges (the token flow, with their
    ``--registry-auth``): ``authenticate`` of
    :func:`buildcache.fetch.connect.make_http_client`; None without
    registries.
    """
    if not config.registries:
        return None
    return oci_authentication(reactor, config.registries)


def new_activity(config: Config, reactor: Any) -> Activity:
    """
    The accounting of a server for ``config``: its configured upstreams
    always keep their rows in the health table.
    """
    upstream_urls = configured_upstreams(config)
    return Activity(
        reactor,
        frozenset(
            key for key in map(upstream_host_key, upstream_urls) if key is not None
        ),
    )


def registry_resource(engine: Engine, config: Config, policy: AccessPolicy) -> RegistryResource:
    """The registry port's resource over ``engine``, with the configured registries."""
    return RegistryResource(
        engine, {r.name: r.url for r in config.registries}, policy=policy,
        aliases=REGISTRY_ALIASES,
        credentialed=frozenset(r.name for r in config.registries if r.credentials),
    )


@frozen
class Server:
    """
    Every long-lived object of one buildcache server: the main process's
    (or the only one's), or a hit worker's (:meth:`build` with
    ``hits_only``: no fetcher, no upstream pool, no read-ahead, no tier,
    an engine that answers fresh hits and hands the rest off).
    """

    config: Config
    store: Store
    policy: AccessPolicy
    activity: Activity
    #: None in a hit worker (nothing goes upstream from it).
    pool: HTTPConnectionPool | None
    fetcher: Fetcher | None
    proxy: ProxyResource
    index: IndexResource
    status: StatusResource
    proxy_site: Site
    index_site: Site
    #: Both ports' client connections (the per-client cap, and what a
    #: stopping server waits for).
    connections: Admission
    registry: RegistryResource
    #: The registry port's site (listened on when
    #: ``config.registry_endpoint`` is set).
    registry_site: Site
    #: The tier shared with other nodes (``config.shared_store``), if any.
    shared: S3Tier | None = None
    #: The connections relayed from hit workers (main process): never
    #: refused (the worker admitted them), drained on stop.
    relayed: ClientConnections = Factory(lambda: ClientConnections(sys.maxsize))
    hits_only: bool = False

    @classmethod
    def build(
        cls, config: Config, reactor: Any, store: Store,
        activity: Activity | None = None,
        connections: Admission | None = None,
        *,
        hits_only: bool = False,
        relays: Mapping[str, str] | None = None,
    ) -> Server:
        """
        The server over ``store``.  ``activity`` is the one the store was
        opened with (so that evictions at start-up count), else a new one.
        ``connections`` admits the client connections (an ``Admission``:
        a hit worker's ``RemoteConnections``), else a
        :class:`~buildcache.frontends.connections.ClientConnections` of
        the configured cap.

        With ``hits_only`` (a hit worker, over a read-only ``store``):
        ``relays`` gives the main process's relay socket per port
        (``proxy``, ``index``, ``registry``: :attr:`RelayListeners.paths`).
        """
        if hits_only:
            return cls._build_hits_only(
                config, reactor, store, activity, relays or {}, connections
            )
        policy = AccessPolicy.from_config(
            config.allow_from, config.allow_upstream, configured_upstreams(config),
        )
        if activity is None:
            activity = new_activity(config, reactor)
        store.on_evicted = activity.evicted
        pool = upstream_pool(reactor)
        http = make_http_client(
            reactor, policy, config.upstream_timeout, pool=pool,
            credentials=config.upstream_credentials,
            authenticate=registry_authentication(config, reactor),
        )
        shared = None
        if config.shared_store is not None:
            # Through the upstream client: the store's endpoint is guarded
            # and allowed like a mirror's.
            shared = make_tier(
                config.shared_store, secret=config.shared_secret,
                max_size=config.shared_max_size, wait=config.shared_wait,
                http=http, store=store, clock=reactor,
            )
        fetcher = Fetcher(
            store, http, reactor, idle_timeout=config.upstream_timeout,
            activity=activity, shared=shared,
        )
        engine = Engine(store, fetcher, reactor, activity, config.index_ttl)
        proxy = ProxyResource(
            engine, Router(tuple(config.mirrors), policy), proxy_policies(ApkIndexes(store))
        )
        if connections is None:
            connections = ClientConnections(config.max_connections_per_client)
        proxy_site = ProxySite(
            proxy, reactor=reactor, policy=policy,
            connect_timeout=config.upstream_timeout, timeout=CLIENT_IDLE_TIMEOUT,
            connections=connections, hot=engine.hot_hits(),
        )
        index = index_resource(
            engine, config.pypi_upstreams, config.index_ttl, policy=policy,
            prefetcher=Prefetcher(
                engine, reactor, config.prefetch_max_size, observer=activity
            ),
        )
        index_site = StrictSite(
            index, reactor=reactor, timeout=CLIENT_IDLE_TIMEOUT,
            connections=connections, hot=engine.hot_hits(),
        )
        status = StatusResource(
            SnapshotSources(
                config, store, fetcher, activity, reactor, prefetcher=index.prefetcher,
                shared_tier=shared,
            ).snapshot
        )
        proxy.status = index.status = status
        registry = registry_resource(engine, config, policy)
        registry_site = StrictSite(
            registry, reactor=reactor, timeout=CLIENT_IDLE_TIMEOUT,
            connections=connections,
        )
        return cls(
            config, store, policy, activity, pool, fetcher, proxy, index,
            status, proxy_site, index_site, connections, registry, registry_site,
            shared,
        )

    @classmethod
    def _build_hits_only(
        cls, config: Config, reactor: Any, store: Store, activity: Activity | None,
        relays: Mapping[str, str], connections: Any,
    ) -> Server:
        policy = AccessPolicy.from_config(
            config.allow_from, config.allow_upstream, configured_upstreams(config),
        )
        if activity is None:
            activity = new_activity(config, reactor)
        engine = Engine(
            store, NO_FETCHER, reactor, activity, config.index_ttl,
            hits_only=True, on_hand_off=hand_off_request,
        )
        # No APKINDEX is ever parsed here (no lookup hook runs): a stored
        # package answers, and the main process drops the disowned ones.
        proxy = ProxyResource(
            engine, Router(tuple(config.mirrors), policy), proxy_policies(ApkIndexes(store))
        )
        if connections is None:
            connections = ClientConnections(config.max_connections_per_client)

        def relay(name: str) -> RelayTarget | None:
            path = relays.get(name)
            return None if path is None else RelayTarget(reactor, path)

        proxy_site = ProxySite(
            proxy, reactor=reactor, policy=policy,
            connect_timeout=config.upstream_timeout, timeout=CLIENT_IDLE_TIMEOUT,
            connections=connections, relay=relay("proxy"), hot=engine.hot_hits(),
        )
        index = index_resource(engine, config.pypi_upstreams, config.index_ttl, policy=policy)
        index_site = StrictSite(
            index, reactor=reactor, timeout=CLIENT_IDLE_TIMEOUT,
            connections=connections, relay=relay("index"), hot=engine.hot_hits(),
        )
        # The pages themselves are the main process's (it holds the
        # totals); the snapshot is for it to combine.
        status = StatusResource(SnapshotSources(config, store, None, activity, reactor).snapshot)
        proxy.status = index.status = HandOffStatus(STATUS_PATHS)
        registry = registry_resource(engine, config, policy)
        registry_site = StrictSite(
            registry, reactor=reactor, timeout=CLIENT_IDLE_TIMEOUT,
            connections=connections, relay=relay("registry"),
        )
        return cls(
            config, store, policy, activity, None, None, proxy, index,
            status, proxy_site, index_site, connections, registry, registry_site,
            None, hits_only=True,
        )

    def sites(self) -> dict[str, Site]:
        """
        The sites of the ports this server listens on, by name (``proxy``,
        ``index``, and ``registry`` when configured): the names of
        ``relays``.
        """
        sites = {"proxy": self.proxy_site, "index": self.index_site}
        if self.config.registry_endpoint is not None:
            sites["registry"] = self.registry_site
        return sites

    def relay_listeners(self, reactor: Any) -> RelayListeners:
        """
        The main process's relay sockets for hit workers (a service: its
        parent starts and stops it), one per port of :meth:`sites`, served
        by the same sites; their ``paths`` are what workers get.
        """
        return RelayListeners(reactor, self.sites(), self.relayed)

    def index_listening(self, port: IListeningPort) -> None:
        """
        Tell the proxy which port is the index's, so that clients whose
        ``HTTP_PROXY`` points at the proxy reach the index through it.
        """
        address = port.getHost()
        if isinstance(address, (IPv4Address, IPv6Address)):
            self.proxy.own_index = OwnIndex(self.index, address.port)


class ListeningService(Service):
    """
    Listens on a server endpoint description while running, and reports
    the listening port (its number is only known then, e.g. for port 0).
    ``option`` is the command-line option that gave the description, for
    the message when it cannot listen.
    """

    def __init__(
        self,
        reactor: Any,
        description: str,
        factory: Site,
        on_listening: Callable[[IListeningPort], None] = lambda port: None,
        option: str = "--port",
    ) -> None:
        self._description = description
        self._option = option
        #: The command-line option that gave the description.
        self.option = option
        self.reactor = reactor
        #: The endpoint description (``tcp:8899:interface=...``).
        self.description = description
        self.endpoint = serverFromString(reactor, description)
        self.factory = factory
        self._on_listening = on_listening
        self.port: IListeningPort | None = None

    def listen(self) -> Deferred[IListeningPort]:
        """
        Start listening (when the service starts, before privileges are
        dropped): the endpoint's ``listen``.  The hit workers' ports
        (:mod:`buildcache.workers.ports`) override it.
        """
        return self.endpoint.listen(self.factory)

    def fileno_for(self, worker: int) -> int:
        """
        The listening socket hit worker ``worker`` (1 to N-1) is given:
        here the one this process listens on, shared.
        """
        if self.port is None:
            raise RuntimeError(f"{self.option} is not listening")
        fileno: int = self.port.fileno()  # type: ignore[attr-defined]
        return fileno

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures: list[Failure] = []
        started = self.factory.numPorts
        self.listen().addCallbacks(self._listened, failures.append)
        # A port in use must stop twistd at start-up, not leave a server
        # running without it; with a line that says so, not a traceback.
        if failures:
            # A UNIX port starts its factory before it binds: a failed bind
            # would leave the factory's timers running.
            if self.factory.numPorts > started:
                self.factory.doStop()
            raise SystemExit(
                f"buildcache: {self._option} {self._description}: cannot listen:"
                f" {failures[0].getErrorMessage()}"
            )

    def _listened(self, port: IListeningPort) -> None:
        self.port = port
        self._on_listening(port)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is not None:
            return self.port.stopListening()
        return None


class BuildcacheService(MultiService):
    """
    The running server: the ports as children, the store's housekeeping
    around them.

    Stopping (SIGTERM) closes the ports first, gives downloads in flight
    and the responses being sent to clients (hits included) up to
    ``grace`` seconds to finish, closing each client connection once its
    response has gone out, then lets the shared tier finish its uploads and
    stop (its leases released, its access records written; ``grace``
    seconds each at most), and
    only then writes the last access times and closes the store, so the
    cache is consistent whatever was under way.
    """

    log = Logger()

    def __init__(
        self, server: Server, reactor: Any, grace: float = STOP_GRACE,
        store_threads: ThreadPool | None = None,
    ) -> None:
        super().__init__()
        self.server = server
        self.reactor = reactor
        self.grace = grace
        #: The store's fsync and rename threads (see make_service), stopped
        #: after the downloads that use them.
        self.store_threads = store_threads
        self._flusher = TimerService(FLUSH_INTERVAL, server.store.flush)
        self._flusher.clock = reactor
        self._relays: RelayListeners | None = None

    def relay_paths(self) -> Mapping[str, str]:
        """
        The main process's relay socket per port name, for hit workers
        (their command line): the :class:`RelayListeners` are made and
        listening from the first call on, and stopped after every other
        part of this service (workers drain while they still relay).
        """
        if self._relays is None:
            relays = self._relays = self.server.relay_listeners(self.reactor)
            # Started now if this service runs (addService does both starts).
            relays.setServiceParent(self)
            # Children stop in reverse order: first in the list, last to stop.
            self.services.remove(relays)
            self.services.insert(0, relays)
        return self._relays.paths

    def startService(self) -> None:
        if self.store_threads is not None:
            self.store_threads.start()
        if self.server.config.workers > 1:
            # Made before the children start: a child asking for them
            # while they start would change the list being started (and
            # be started twice).
            self.relay_paths()
        super().startService()
        self._flusher.startService()
        if self.server.shared is not None:
            self.server.shared.start()

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _downloads_ended(self) -> None:
        # Read-aheads first: one just scheduled is not a download yet.
        prefetcher = self.server.index.prefetcher
        if prefetcher is not None:
            await prefetcher.when_done()
        if self.server.fetcher is not None:
            await self.server.fetcher.when_idle()

    async def _stop_shared(self, tier: S3Tier) -> None:
        # The last downloads' uploads first (what this node fetched is for
        # every node), then its leases released and its access records
        # written: each for ``grace`` seconds at most.  A lease left behind
        # expires on its own; access records lost only make eviction a
        # little less exact.
        for ending, what in ((tier.when_idle, "its uploads"), (tier.stop, "stopping")):
            ended = ending()
            ended.addTimeout(self.grace, self.reactor)
            try:
                await ended
            except defer.TimeoutError:
                self.log.warn(
                    "The shared tier's store did not answer within {grace}s"
                    " ({what}): stopping without it",
                    grace=self.grace, what=what, event="shared_tier_stop_timeout",
                )

    async def _ended(self, responses_sent: Deferred[None]) -> None:
        await self._downloads_ended()
        await responses_sent

    async def _stop(self) -> None:
        prefetcher = self.server.index.prefetcher
        if prefetcher is not None:
            # Clients still connected may go on reading metadata.
            prefetcher.stop()
        # Idle connections close now, the others once their response (a
        # hit read from the store as much as a download) has gone out.
        # Before the children stop: the worker pool waits for its workers
        # to drain, and a worker waits for the connections it relayed
        # here, which only this drain closes.
        connections = self.server.connections
        relayed = self.server.relayed
        responses_sent = gatherResults([connections.drain(), relayed.drain()])
        await super().stopService()
        fetcher = self.server.fetcher
        in_flight = (fetcher.in_flight() if fetcher is not None else 0) + (
            prefetcher.running() if prefetcher is not None else 0
        )
        responding = connections.busy() + relayed.busy()
        if in_flight or responding:
            self.log.info(
                "Waiting up to {grace}s for {count} downloads in flight and"
                " {responses} client connections still answered",
                grace=self.grace, count=in_flight, responses=responding,
            )
            idle = Deferred.fromCoroutine(
                self._ended(responses_sent.addCallback(lambda _: None))
            )
            idle.addTimeout(self.grace, self.reactor)
            try:
                await idle
            except defer.TimeoutError:
                self.log.warn(
                    "Stopping with {count} downloads unfinished (they are not"
                    " stored) and {responses} responses cut short",
                    count=fetcher.in_flight() if fetcher is not None else 0,
                    responses=connections.busy() + relayed.busy(),
                )
        if self.server.shared is not None:
            # After the downloads: the last of them publish to it.
            await self._stop_shared(self.server.shared)
        if self.server.pool is not None:
            await self.server.pool.closeCachedConnections()
        self._flusher.stopService()
        if self.store_threads is not None:
            # Joins a thread still in an fsync (after the grace only).
            self.store_threads.stop()
        self.server.store.close()
        self.log.info("Cache closed cleanly")


_log = Logger()


def log_shared_tier(config: Config) -> None:
    """
    Say which shared tier the server uses and what it shares (never its
    credentials nor the secret: the endpoint carries none).
    """
    if config.shared_store is None:
        return
    secret_file = config.shared_secret_file
    if secret_file is not None and readable_by_others(secret_file):
        _log.warn(
            "The --shared-secret-file {path} can be read by other users: make"
            " it mode 0600 (chmod 600), as whoever reads it can sign records",
            path=secret_file, event="shared_secret_readable_by_others",
        )
    _log.info(
        "Shared tier: {store}; {what}",
        store=hide_userinfo(config.shared_store.url()),
        what=(
            "records signed with the --shared-secret-file"
            if config.shared_secret is not None else
            "no --shared-secret-file: only files with a digest of their own"
            " (pip's sha256, an image's digest, an APKINDEX entry) are shared"
        ),
        event="shared_tier_configured",
    )


def make_service(
    config: Config, reactor: Any,
    listening: Callable[..., ListeningService] = ListeningService,
) -> MultiService:
    """
    The whole server for twistd: store housekeeping and both ports, each
    a ``listening`` service (:class:`ListeningService`, or the hit
    workers' :class:`buildcache.workers.ports.PerProcessListening`).

    Raises :class:`buildcache.store.StoreError` (before anything listens)
    when the cache directory cannot be used.
    """
    for path in config.registry_auth_files:
        if readable_by_others(path):
            _log.warn(
                "The --registry-auth file {path} can be read by other users:"
                " make it mode 0600 (chmod 600), as it holds a password",
                path=path, event="registry_auth_readable_by_others",
            )
    if config.netrc_file is not None and readable_by_others(config.netrc_file):
        _log.warn(
            "The --netrc file {path} can be read by other users: make it"
            " mode 0600 (chmod 600), as it holds passwords",
            path=config.netrc_file, event="netrc_readable_by_others",
        )
    log_shared_tier(config)
    # Their own threads, not the reactor's: those also resolve names, and a
    # slow disk must not hold up connecting to upstreams.
    store_threads = ThreadPool(1, STORE_THREADS, "buildcache-store")
    # Before the store: reopening it under a lower --max-size evicts at
    # once, and those evictions belong in the figures.
    activity = new_activity(config, reactor)
    store = Store.open(
        config.cache_dir, config.max_size, reactor,
        run_blocking=in_thread_pool(reactor, store_threads),
        max_object_size=config.max_object_size,
        on_evicted=activity.evicted,
        commit_delay=COMMIT_DELAY,
    )
    # The row cache's bounds are the server's: each hit worker keeps its
    # share too (workers/child.py).
    store.share_row_cache(config.workers)
    server = Server.build(config, reactor, store, activity)
    top = BuildcacheService(server, reactor, store_threads=store_threads)
    listening(
        reactor, config.proxy_endpoint, server.proxy_site, option="--port"
    ).setServiceParent(top)
    listening(
        reactor, config.index_endpoint, server.index_site, server.index_listening,
        option="--pypi-port",
    ).setServiceParent(top)
    if config.registry_endpoint is not None:
        listening(
            reactor, config.registry_endpoint, server.registry_site,
            option="--registry-port",
        ).setServiceParent(top)
    return top


def service_for_twistd(
    config: Config, reactor: Any,
    listening: Callable[..., ListeningService] = ListeningService,
) -> MultiService:
    """
    :func:`make_service`, for ``twistd`` (the plugin and the ``.tac``
    file): a cache directory that cannot be used stops it with one line
    that says why and what to do, not a traceback that buries it.
    """
    try:
        return make_service(config, reactor, listening)
    except StoreError as e:
        raise SystemExit(f"buildcache: --cache-dir: {e}") from None
