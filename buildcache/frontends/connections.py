"""
The open client connections of one server, by client address.

This module owns the cap on connections per client address (both ports
share one :class:`ClientConnections`; one more connection is answered
503) and the graceful stop: :meth:`ClientConnections.drain` lets the
responses under way go out and closes everything else.  What a
connection is to it is :class:`Drainable`;
:class:`buildcache.frontends.channel.ProxyChannel` is the one in service.

With ``--workers``, the cap holds for the whole server: the main
process's :class:`ClientConnections` also counts the connections its hit
workers admitted (:meth:`ClientConnections.admit_remote`), and a worker's
sites get a :class:`RemoteConnections`, which asks the main process
(through a :class:`RemoteAdmitter`, the control channel of
:mod:`buildcache.workers.control`) and answers a Deferred.  Both are an
:class:`Admission`.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from buildcache.turns import Waiters

__all__ = [
    "DEFAULT_MAX_CONNECTIONS_PER_CLIENT",
    "Admission",
    "ClientConnections",
    "Drainable",
    "RemoteAdmitter",
    "RemoteConnections",
    "client_key",
    "connection_admitted",
]

#: Open connections per client address (both ports together, every
#: process of the server together).
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
    ``max_per_client``, counting the connections hit workers admitted
    (:meth:`admit_remote`) in the same table, and lets a stopping server
    close its own once their responses have gone out (:meth:`drain`).
    """

    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    _by_client: Counter[str] = attrs.Factory(Counter)
    _channels: dict[Drainable, str] = attrs.Factory(dict)
    _draining: bool = False
    _drained: Waiters = attrs.Factory(Waiters)
    #: Per worker (its number), the connections it holds by client key.
    _remote: dict[int, Counter[str]] = attrs.Factory(dict)

    def open_from(self, host: str) -> int:
        """Open connections admitted from ``host``."""
        return self._by_client[client_key(host)]

    def admit(self, channel: Drainable, host: str) -> bool:
        """
        Count ``channel``, from ``host``, if that address is under the
        cap; whether it was.  A connection admitted while the server stops
        is drained at once.
        """
        if not connection_admitted(self._by_client[client_key(host)], self.max_per_client):
            return False
        self.count(channel, host)
        return True

    def count(self, channel: Drainable, host: str) -> None:
        """
        Count ``channel``, from ``host``, whatever the count: a connection
        a hit worker admitted and has handed over (its slot there is
        released as it lets go).  One counted while the server stops is
        drained at once.
        """
        key = client_key(host)
        self._by_client[key] += 1
        self._channels[channel] = key
        if self._draining:
            channel.drain()

    def release(self, channel: Drainable) -> None:
        """``channel`` has closed: its slot is free again."""
        key = self._channels.pop(channel, None)
        if key is None:
            return
        self._free(key)
        self.changed()

    def _free(self, key: str, count: int = 1) -> None:
        self._by_client[key] -= count
        if self._by_client[key] <= 0:
            del self._by_client[key]

    def admit_remote(self, worker: int, key: str) -> bool:
        """
        Count a connection hit worker ``worker`` accepted from client
        ``key`` (already a :func:`client_key`), if that address is under
        the cap; whether it was.
        """
        if not connection_admitted(self._by_client[key], self.max_per_client):
            return False
        self._by_client[key] += 1
        self._remote.setdefault(worker, Counter())[key] += 1
        return True

    def release_remote(self, worker: int, key: str) -> None:
        """A connection worker ``worker`` admitted has closed."""
        held = self._remote.get(worker)
        if held is None or not held[key]:
            return
        held[key] -= 1
        if not held[key]:
            del held[key]
        self._free(key)

    def forget_remote(self, worker: int) -> int:
        """
        Worker ``worker`` has ended: its connections ended with it.  How
        many it held.
        """
        held = self._remote.pop(worker, Counter())
        for key, count in held.items():
            self._free(key, count)
        return sum(held.values())

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


class Admission(Protocol):
    """
    What a site's channels ask to be served and tell when they close:
    :class:`ClientConnections` in the main process (answers at once),
    :class:`RemoteConnections` in a hit worker (answers a Deferred).
    """

    max_per_client: int

    def admit(self, channel: Drainable, host: str) -> bool | Deferred[bool]: ...

    def release(self, channel: Drainable) -> None: ...

    def changed(self) -> None: ...

    def busy(self) -> int: ...

    def drain(self) -> Deferred[None]: ...


class RemoteAdmitter(Protocol):
    """The main process, as a worker's :class:`RemoteConnections` asks it."""

    def admit(self, key: str) -> Deferred[bool]:
        """Whether one more connection from client ``key`` may be served."""

    def release(self, key: str) -> None:
        """A connection admitted from client ``key`` has closed."""


@attrs.define(eq=False)
class _Slot:
    key: str
    #: None while the main process has not answered.
    admitted: bool | None = None
    closed: bool = False


@attrs.define(eq=False)
class RemoteConnections:
    """
    A hit worker's client connections: admitted by the main process,
    which counts every process's connections in one table (so the cap
    holds for the whole server), drained by this one.

    A connection that closes before the main process answered is released
    there once it has (if it was admitted); when the main process cannot
    answer (it has gone), nothing is admitted.
    """

    log = Logger()

    remote: RemoteAdmitter
    max_per_client: int = DEFAULT_MAX_CONNECTIONS_PER_CLIENT
    _channels: dict[Drainable, _Slot] = attrs.Factory(dict)
    _draining: bool = False
    _drained: Waiters = attrs.Factory(Waiters)

    def admit(self, channel: Drainable, host: str) -> Deferred[bool]:
        """
        Ask the main process to count ``channel``, from ``host``; fires
        with whether it did.  One admitted while the worker stops is
        drained at once.
        """
        slot = _Slot(client_key(host))
        self._channels[channel] = slot
        try:
            asked = self.remote.admit(slot.key)
        except Exception:
            asked = succeed(False)

        def answered(admitted: bool) -> bool:
            slot.admitted = admitted
            if slot.closed or not admitted:
                # Closed while the main process was asked: its slot there
                # is given back at once.
                self._channels.pop(channel, None)
                if slot.closed and admitted:
                    self.remote.release(slot.key)
                self.changed()
                return False
            if self._draining:
                channel.drain()
            return True

        def failed(reason: Failure) -> bool:
            self.log.warn(
                "Cannot ask the main process to admit a connection: {error}",
                error=reason.getErrorMessage(), event="admission_failed",
            )
            return answered(False)

        return asked.addCallbacks(answered, failed)

    def release(self, channel: Drainable) -> None:
        """``channel`` has closed: its slot is free again (once admitted)."""
        slot = self._channels.get(channel)
        if slot is None:
            return
        slot.closed = True
        if slot.admitted is None:
            # Released when the answer comes (see admit).
            return
        del self._channels[channel]
        if slot.admitted:
            self.remote.release(slot.key)
        self.changed()

    def busy(self) -> int:
        """Connections with a request or response under way (tunnels aside)."""
        return sum(
            1 for channel, slot in self._channels.items()
            if not slot.closed and not channel.in_tunnel
        )

    def changed(self) -> None:
        """A connection closed or became a tunnel: maybe the drain is over."""
        if self._draining and not self.busy():
            self._drained.fire()

    def drain(self) -> Deferred[None]:
        """As :meth:`ClientConnections.drain`, for this worker's connections."""
        self._draining = True
        for channel, slot in list(self._channels.items()):
            if slot.admitted:
                channel.drain()
        return self._drained.wait(not self.busy())
