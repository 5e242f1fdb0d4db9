"""
Assembling the server: one store, one fetcher and the front ends built
from a :class:`buildcache.config.Config`, as one twistd ``MultiService``.

:class:`Server` wires the parts (tests build one and listen on port 0);
:func:`make_service` adds the listening ports and the store's
housekeeping for ``twistd buildcache`` and ``buildcache.tac``.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.application.strports import service as endpoint_service
from twisted.logger import Logger
from twisted.web.server import Site

from buildcache.access import AccessPolicy
from buildcache.config import Config
from buildcache.connect import make_http_client
from buildcache.proxy import ProxyResource, Router
from buildcache.store import Store
from buildcache.tunnel import ProxySite
from buildcache.upstream import Fetcher

#: Seconds between writes of batched access times.
FLUSH_INTERVAL = 5.0


@frozen
class Server:
    """
    Every long-lived object of one buildcache server.
    """

    config: Config
    store: Store
    policy: AccessPolicy
    fetcher: Fetcher
    proxy_site: Site

    @classmethod
    def build(cls, config: Config, reactor: Any, store: Store) -> Server:
        policy = AccessPolicy.from_config(
            config.allow_from,
            config.allow_upstream,
            [m.url for m in config.mirrors] + list(config.pypi_upstreams),
        )
        http = make_http_client(reactor, policy, config.upstream_timeout)
        fetcher = Fetcher(store, http, reactor, idle_timeout=config.upstream_timeout)
        proxy = ProxyResource(
            store, fetcher, Router(tuple(config.mirrors), policy), config.index_ttl
        )
        proxy_site = ProxySite(proxy, reactor=reactor, policy=policy)
        return cls(config, store, policy, fetcher, proxy_site)


class StoreService(Service):
    """
    Flushes batched access times now and then, and closes the store (a
    last flush included) when the server stops.
    """

    log = Logger()

    def __init__(self, store: Store, reactor: Any) -> None:
        self.store = store
        self._timer = TimerService(FLUSH_INTERVAL, store.flush)
        self._timer.clock = reactor

    def startService(self) -> None:
        super().startService()
        self._timer.startService()

    def stopService(self) -> None:
        super().stopService()
        self._timer.stopService()
        self.store.close()
        self.log.info("Cache closed cleanly")


def make_service(config: Config, reactor: Any) -> MultiService:
    """
    The whole server for twistd: store housekeeping and both ports.

    Raises :class:`buildcache.store.StoreError` (before anything listens)
    when the cache directory cannot be used.
    """
    store = Store.open(config.cache_dir, config.max_size, reactor)
    server = Server.build(config, reactor, store)
    top = MultiService()
    # Listening ports stop before the store closes: services stop in
    # reverse order of addition.
    StoreService(store, reactor).setServiceParent(top)
    endpoint_service(config.proxy_endpoint, server.proxy_site, reactor=reactor).setServiceParent(top)
    return top
