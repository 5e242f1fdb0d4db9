"""
The ``twisted.web`` sites (protocol factories) of the two ports.

:class:`ProxySite` serves the proxy port (mirror routes, forward proxy and
``CONNECT`` tunnels), :class:`StrictSite` the index port; both build
:class:`~buildcache.frontends.channel.ProxyChannel` connections with the
limits of :mod:`buildcache.frontends.channel`, counted by one shared
:class:`~buildcache.frontends.connections.ClientConnections`.  Neither
writes twisted.web's access log (:class:`QuietSite`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Site

from buildcache.access import AccessPolicy
from buildcache.engine.hot import HotHits
from buildcache.fetch.connect import HostnameResolver
from buildcache.frontends.channel import (
    REQUEST_HEAD_TIMEOUT,
    SEND_STALL_TIMEOUT,
    ProxyChannel,
)
from buildcache.frontends.connections import ClientConnections
from buildcache.frontends.relay import RelayTarget
from buildcache.frontends.tunnel import DEFAULT_CONNECT_PORTS, TunnelSettings

__all__ = ["ProxySite", "QuietSite", "StrictSite"]


class QuietSite(Site):
    """
    A ``twisted.web`` site that leaves the access log to
    :class:`buildcache.ops.activity.Activity` (one structured line per
    request, with the cache status) instead of writing its own.
    """

    noisy = False

    def log(self, request: http.Request) -> None:
        pass


class StrictSite(QuietSite):
    """
    A site whose connections get
    :class:`~buildcache.frontends.channel.ProxyChannel`'s request-line and
    header limits and strict parsing, the request and send deadlines and
    the per-client connection cap; without tunnel settings a ``CONNECT``
    is answered 405 (the index port).

    ``connections`` is shared with the server's other port (a cap of its
    own with the default limit when not given; in a hit worker an
    ``Admission`` that asks the main process).  ``relay``, in a hit
    worker, is where this port's handed-off connections go (see
    :mod:`buildcache.frontends.relay`).  ``hot`` answers this port's
    repeated hits before they are parsed (see
    :mod:`buildcache.engine.hot`).  Other keyword arguments
    go to ``Site``; its ``reactor`` runs the deadlines.
    """

    protocol = ProxyChannel  # type: ignore[assignment]

    def __init__(
        self,
        resource: IResource,
        *,
        connections: Any = None,
        relay: RelayTarget | None = None,
        hot: HotHits | None = None,
        request_head_timeout: float = REQUEST_HEAD_TIMEOUT,
        send_stall_timeout: float = SEND_STALL_TIMEOUT,
        **site_kwargs: Any,
    ) -> None:
        super().__init__(resource, **site_kwargs)
        self.connections = connections if connections is not None else ClientConnections()
        self.relay = relay
        #: This port's repeated hits (:mod:`buildcache.engine.hot`), if any.
        self.hot = hot
        self.request_head_timeout = request_head_timeout
        self.send_stall_timeout = send_stall_timeout

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.connections = self.connections
        channel.relay = self.relay
        channel.hot = self.hot
        channel.request_head_timeout = self.request_head_timeout
        channel.send_stall_timeout = self.send_stall_timeout
        return channel


class ProxySite(StrictSite):
    """
    The proxy port's factory: ``resource`` answers every request except
    ``CONNECT``, which :class:`~buildcache.frontends.channel.ProxyChannel`
    hands to a :class:`~buildcache.frontends.tunnel.Tunnel`.

    Keyword arguments other than the tunnel's go to :class:`StrictSite`.
    """

    def __init__(
        self,
        resource: IResource,
        *,
        reactor: Any,
        policy: AccessPolicy,
        connect_timeout: float = 30.0,
        idle_timeout: float = 300.0,
        connect_ports: frozenset[int] = DEFAULT_CONNECT_PORTS,
        clock: IReactorTime | None = None,
        resolver: HostnameResolver | None = None,
        **site_kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=reactor, **site_kwargs)
        self.tunnel_settings = TunnelSettings(
            reactor=reactor,
            policy=policy,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            connect_ports=frozenset(connect_ports),
            clock=clock,
            resolver=resolver,
        )

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.tunnel_settings = self.tunnel_settings
        return channel
