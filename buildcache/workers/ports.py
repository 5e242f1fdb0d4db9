"""
One listening socket per process for the TCP ports of ``--workers N``.

With one listening socket shared by every process, the first process to
wake takes a whole burst: Twisted's ``tcp.Port.doRead`` accepts up to a
hundred connections per wake-up, so 32 connections opened at once all
land in one process.  Here the main process makes, for each TCP port
(``tcp:`` and ``tcp6:`` descriptions), one socket per process with
``SO_REUSEPORT``, all bound to the same address and port: the kernel
then gives each new connection to one socket of the group, by a hash of
its addresses and ports.  The main process listens on the first
(:meth:`PerProcessListening.listen`, ``reactor.adoptStreamPort``) and
gives worker ``n`` the ``n``-th (:meth:`PerProcessListening.fileno_for`),
keeping its own copy open: a worker restarted gets the same socket back,
with the connections the kernel queued on it meanwhile, where closing it
would reset them.

Other endpoint kinds (``unix:``, ``systemd:``, ...) keep one socket
shared by every process (:class:`buildcache.service.ListeningService`).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort

from buildcache.service import ListeningService

__all__ = ["DEFAULT_BACKLOG", "PerProcessListening", "TCPAddress", "bind_group", "tcp_address"]

#: Twisted's backlog for a ``tcp:`` description without ``backlog=``.
DEFAULT_BACKLOG = 50


@attrs.frozen
class TCPAddress:
    """Where a ``tcp:``/``tcp6:`` description listens."""

    family: socket.AddressFamily
    interface: str
    port: int
    backlog: int = DEFAULT_BACKLOG

    def sockaddr(self, port: int) -> Any:
        """The address to bind to, on ``port``."""
        if self.family == socket.AF_INET6:
            # As Twisted does (scope ids included): numeric hosts only.
            return socket.getaddrinfo(
                self.interface, port, socket.AF_INET6, socket.SOCK_STREAM, 0,
                socket.AI_NUMERICHOST,
            )[0][4]
        return (self.interface, port)


def _arguments(description: str) -> list[tuple[str | None, str]]:
    """
    A server description's fields, split on unescaped colons, as (key or
    None, value): Twisted's syntax, where ``\\`` escapes the next
    character (``tcp6:8080:interface=\\:\\:1``).
    """
    fields: list[tuple[str | None, str]] = []
    key: str | None = None
    current: list[str] = []
    escaped = False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            fields.append((key, "".join(current)))
            key, current = None, []
        elif char == "=" and key is None:
            key, current = "".join(current), []
        else:
            current.append(char)
    fields.append((key, "".join(current)))
    return fields


_POSITIONS = ("port", "interface", "backlog")
_INTERFACES = {"tcp": ("", socket.AF_INET), "tcp6": ("::", socket.AF_INET6)}


def tcp_address(description: str) -> TCPAddress | None:
    """
    The address of a ``tcp:`` or ``tcp6:`` server description (port,
    ``interface=``, ``backlog=``, by name or position, as Twisted reads
    them); None for any other kind, or an argument Twisted's TCP
    endpoints do not take.
    """
    fields = _arguments(description)
    kind_key, kind = fields[0]
    if kind_key is not None or kind not in _INTERFACES:
        return None
    interface, family = _INTERFACES[kind]
    values: dict[str, str] = {"interface": interface, "backlog": str(DEFAULT_BACKLOG)}
    for position, (key, value) in enumerate(fields[1:]):
        if key is None:
            if position >= len(_POSITIONS):
                return None
            key = _POSITIONS[position]
        if key not in _POSITIONS:
            return None
        values[key] = value
    try:
        return TCPAddress(family, values["interface"], int(values["port"]), int(values["backlog"]))
    except (KeyError, ValueError):
        return None


def _bound(address: TCPAddress, port: int, reuse_port: bool) -> socket.socket:
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        # As Twisted's own ports: a restart is not refused for the
        # connections of the last run still in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Before bind: every socket of the group must set it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address.sockaddr(port))
    except BaseException:
        sock.close()
        raise
    return sock


def bind_group(address: TCPAddress, count: int) -> list[socket.socket]:
    """
    ``count`` sockets listening on ``address``, all on the same port,
    with ``SO_REUSEPORT``, non-blocking.  Port 0 is resolved to a free
    port, the same for all.

    A port already in use raises :class:`CannotListenError`, as Twisted's
    own ports do, even when what holds it set ``SO_REUSEPORT`` too (the
    same user's other server would otherwise share its connections with
    this one): a probe without ``SO_REUSEPORT`` binds first, and is
    closed before the group binds.
    """
    try:
        probe = _bound(address, address.port, reuse_port=False)
    except OSError as e:
        raise CannotListenError(address.interface, address.port, e) from None
    port = probe.getsockname()[1]
    probe.close()
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _bound(address, port, reuse_port=True)
            group.append(sock)
            sock.listen(address.backlog)
            sock.setblocking(False)
    except OSError as e:
        for sock in group:
            sock.close()
        raise CannotListenError(address.interface, port, e) from None
    return group


class PerProcessListening(ListeningService):
    """
    A :class:`~buildcache.service.ListeningService` for ``processes``
    processes: on a ``tcp:``/``tcp6:`` description, one ``SO_REUSEPORT``
    socket each (see the module docstring); on any other, the shared
    socket of its base class.
    """

    def __init__(self, *arguments: Any, processes: int, **named: Any) -> None:
        super().__init__(*arguments, **named)
        self.processes = processes
        #: The group's sockets, the main process's first, while listening.
        self.sockets: Sequence[socket.socket] = ()
        #: The workers' sockets this process accepts on while they are
        #: down, by worker number.
        self.covering: dict[int, IListeningPort] = {}

    def address(self) -> TCPAddress | None:
        """Where the group listens; None when the endpoint is not TCP."""
        if self.processes <= 1 or not isinstance(
            self.endpoint, (TCP4ServerEndpoint, TCP6ServerEndpoint)
        ):
            return None
        return tcp_address(self.description)

    def listen(self) -> Deferred[IListeningPort]:
        address = self.address()
        if address is None:
            return super().listen()
        try:
            self.sockets = bind_group(address, self.processes)
            port: IListeningPort = self.reactor.adoptStreamPort(
                self.sockets[0].fileno(), address.family, self.factory
            )
        except Exception:
            self._close()
            return defer.fail()
        return defer.succeed(port)

    def fileno_for(self, worker: int) -> int:
        if not self.sockets:
            return super().fileno_for(worker)
        return self.sockets[worker].fileno()

    def cover(self, worker: int) -> None:
        """
        Accept on worker ``worker``'s socket in this process too, while the
        worker is down: the kernel goes on giving that socket its share of
        the connections, which would otherwise wait for the restart (up to
        ``MAX_BACKOFF`` seconds for a worker that keeps dying).
        """
        if not self.sockets or worker in self.covering:
            return
        sock = self.sockets[worker]
        self.covering[worker] = self.reactor.adoptStreamPort(
            sock.fileno(), sock.family, self.factory
        )

    def uncover(self, worker: int) -> Deferred[None] | None:
        """Stop accepting on worker ``worker``'s socket (it is back)."""
        port = self.covering.pop(worker, None)
        # A copy of the socket: the group's own stays open.
        return None if port is None else port.stopListening()

    def _close(self) -> None:
        for worker in list(self.covering):
            self.uncover(worker)
        for sock in self.sockets:
            sock.close()
        self.sockets = ()

    def stopService(self) -> Deferred[None] | None:
        stopped = super().stopService()
        # The workers hold their own copies: closing ours ends nothing
        # they still accept on.
        if stopped is None:
            self._close()
            return None

        def closed(result: object) -> object:
            self._close()
            return result

        return stopped.addBoth(closed)
