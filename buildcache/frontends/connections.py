"""
The open client connections of one server, by client address.

This module owns the cap on connections per client address (both ports
share one :class:`ClientConnections`; one more connection is answered
503) and the graceful stop: :meth:`ClientConnections.drain` lets the
responses under way go out and closes everything else.  What a
connection is to it is :class:`Drainable`;
:class:`buildcache.frontends.channel.ProxyChannel` is the one in service.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred

from buildcache.turns import Waiters

__all__ = [
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "ClientConnections",
    "Drainable",
    "client_key",
    "connection_admitted",
]

#: Open connections per client address (both ports together, per process).
DEFAULT_MAX_CONNECTIONS_PER_CLIENT = 256


def client_key(host: str) -> str:
    """
    The address a client connection counts against: an IPv4 address (an
    IPv4-mapped IPv6 address as the IPv4 address it is); for other IPv6
    addresses their /64, which one host holds whole (privacy addresses
    would otherwise give it a cap each), but loopback as itself.
    Anything else (a UNIX socket's path) as given.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        if not address.is_loopback:
            return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def connection_admitted(open_from_client: int, limit: int) -> bool:
    """
    Whether one more connection may be served from a client address that
    already holds ``open_from_client`` open connections.
    """
    return open_from_client < limit


class Drainable(Protocol):
    """A client connection as :class:`ClientConnections` sees it."""

    @property
    def in_tunnel(self) -> bool:
        """Whether it carries a ``CONNECT`` tunnel (not drained)."""

    def drain(self) -> None:
        """
        Close once the response under way has gone out (at once when
        idle); a tunnel is left as it is.
        """


@attrs.define(eq=False)
class ClientConnections:
    """
    The open client connections of one server (both ports share one), by
    client address.

    Admits a connection only while its address holds fewer than
    ``max_per_client`` (a limit per process: worker processes each count
    their own), and lets a stopping server close them once their responses
    have gone out (:meth:`drain`).
    """

    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    _by_client: Counter[str] = attrs.Factory(Counter)
    _channels: dict[Drainable, str] = attrs.Factory(dict)
    _draining: bool = False
    _drained: Waiters = attrs.Factory(Waiters)

    def open_from(self, host: str) -> int:
        """Open connections admitted from ``host``."""
        return self._by_client[client_key(host)]

    def admit(self, channel: Drainable, host: str) -> bool:
        """
        Count ``channel``, from ``host``, if that address is under the
        cap; whether it was.  A connection admitted while the server stops
        is drained at once.
        """
        key = client_key(host)
        if not connection_admitted(self._by_client[key], self.max_per_client):
            return False
        self._by_client[key] += 1
        self._channels[channel] = key
        if self._draining:
            channel.drain()
        return True

    def release(self, channel: Drainable) -> None:
        """``channel`` has closed: its slot is free again."""
        key = self._channels.pop(channel, None)
        if key is None:
            return
        self._by_client[key] -= 1
        if not self._by_client[key]:
            del self._by_client[key]
        self.changed()

    def busy(self) -> int:
        """Connections with a request or response under way (tunnels aside)."""
        return sum(1 for channel in self._channels if not channel.in_tunnel)

    def changed(self) -> None:
        """A connection closed or became a tunnel: maybe the drain is over."""
        if self._draining and not self.busy():
            self._drained.fire()

    def drain(self) -> Deferred[None]:
        """
        Close every connection once its response (if any) has gone out to
        the client, and fire when no connection but ``CONNECT`` tunnels is
        left.  Idle keep-alive connections close at once.
        """
        self._draining = True
        for channel in list(self._channels):
            channel.drain()
        return self._drained.wait(not self.busy())
