"""
How buildcache opens connections to upstreams.

This module owns the upstream connection guard: every outgoing TCP
connection, whether for an HTTP fetch (through the client built by
:func:`make_http_client`) or for a ``CONNECT`` tunnel (:func:`connect_tcp`),
is opened by :class:`GuardedTCPEndpoint`, which

1. checks the host name with :meth:`AccessPolicy.host_allowed`;
2. resolves it with an ``IHostnameResolver`` (IP literals need no lookup);
3. checks every resolved address with :meth:`AccessPolicy.address_allowed`;
4. connects to an allowed address itself, by IP.

Because the address checked is the address connected to, a name that
resolves, or rebinds between two lookups, to a loopback, private or
link-local address cannot reach it unless the administrator allowed it.  A
refused address is never connected to, not even briefly.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, ConnectingCancelledError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IAddress,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from zope.interface import implementer

from buildcache.access import AccessPolicy, normalize_host
from buildcache.credentials import UpstreamCredentials
from buildcache.fetch.client import UpstreamClient, upstream_client
from buildcache.fetch.errors import TargetRefused, UpstreamError, UpstreamTimeout
from buildcache.fetch.headlimit import HeadLimitedEndpointFactory

__all__ = [
    "TargetRefused",
    "GuardedTCPEndpoint",
    "GuardedEndpointFactory",
    "make_http_client",
    "connect_tcp",
]


#: A reactor providing IReactorTCP, IReactorTime and (unless a resolver is
#: passed) IReactorPluggableNameResolver.  The typing.Protocol classes below
#: stand in for zope interfaces, which mypy cannot check without a plugin.
_TCPReactor = Any


class HostnameResolver(Protocol):
    """The part of ``HostnameResolver`` used here."""

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any: ...


class TLSPolicy(Protocol):
    """The part of ``IPolicyForHTTPS`` used here."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any: ...


def _bare_host(host: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    return host


def _ip_literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


@implementer(IResolutionReceiver)
class _AddressCollector:
    """
    Gathers the addresses of one resolution, in resolver order, without
    duplicates.
    """

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        # The waiter may have given up (timeout, cancellation) already.
        if not self.done.called:
            self.done.callback(self.addresses)


@implementer(IStreamClientEndpoint)
@attrs.frozen
class GuardedTCPEndpoint:
    """
    A TCP client endpoint that connects only to addresses the access
    policy allows (see the module docstring).

    ``connect`` fails with :class:`TargetRefused` when the host or every
    address it resolves to is refused, :class:`UpstreamTimeout` when the
    lookup or the connection takes longer than ``timeout`` seconds, and
    :class:`UpstreamError` when the name does not resolve or no allowed
    address accepts the connection.
    """

    log = Logger()

    reactor: _TCPReactor
    resolver: HostnameResolver
    policy: AccessPolicy
    host: str
    port: int
    timeout: float

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, protocolFactory: IProtocolFactory) -> IProtocol:
        host = _bare_host(self.host)
        verdict = self.policy.host_allowed(host, self.port)
        if not verdict:
            self._refused(host, None, verdict.reason)
            raise TargetRefused(host, self.port, verdict.reason)
        # host_allowed normalised it already, so this cannot fail.
        name = normalize_host(host)
        literal = _ip_literal(name)
        addresses = [literal] if literal is not None else await self._resolve(name)
        allowed: list[str] = []
        refusals: list[tuple[str, str]] = []
        for address in addresses:
            address_verdict = self.policy.address_allowed(name, self.port, address)
            if address_verdict:
                allowed.append(address)
            else:
                refusals.append((address, address_verdict.reason))
        if not allowed:
            if len(refusals) == 1:
                address, reason = refusals[0]
                self._refused(host, address, reason)
                raise TargetRefused(host, self.port, reason, address)
            reason = "; ".join(reason for _, reason in refusals)
            self._refused(host, ", ".join(a for a, _ in refusals), reason)
            raise TargetRefused(host, self.port, reason)
        return await self._connect_first(host, allowed, protocolFactory)

    def _refused(self, host: str, address: str | None, reason: str) -> None:
        self.log.warn(
            "Refused upstream connection to {host}:{port} ({address}): {reason}",
            event="upstream_refused",
            host=host,
            port=self.port,
            address=address,
            reason=reason,
        )

    async def _resolve(self, name: str) -> list[str]:
        collector = _AddressCollector()
        self.resolver.resolveHostName(collector, name, self.port)
        waiting = collector.done.addTimeout(self.timeout, self.reactor)
        try:
            addresses = await waiting
        except DeferredTimeoutError:
            raise UpstreamTimeout(
                f"resolving {name} took longer than {self.timeout:g}s"
            ) from None
        if not addresses:
            raise UpstreamError(f"{name} does not resolve to any address")
        return addresses

    async def _connect_first(
        self, host: str, addresses: Sequence[str], protocolFactory: IProtocolFactory
    ) -> IProtocol:
        """
        Try the allowed addresses in resolver order, each with the full
        timeout, until one accepts.
        """
        last_error: Exception | None = None
        for address in addresses:
            endpoint: TCP4ClientEndpoint | TCP6ClientEndpoint
            if ":" in address:
                endpoint = TCP6ClientEndpoint(
                    self.reactor, address, self.port, timeout=self.timeout
                )
            else:
                endpoint = TCP4ClientEndpoint(
                    self.reactor, address, self.port, timeout=self.timeout
                )
            try:
                protocol = await endpoint.connect(protocolFactory)
                _read_in_large_pieces(protocol)
                return protocol
            except (CancelledError, ConnectingCancelledError):
                # Given up by the caller: no other address is tried.
                raise
            except ConnectTimeoutError as error:
                last_error = UpstreamTimeout(
                    f"connecting to {host}:{self.port} at {address} took longer"
                    f" than {self.timeout:g}s"
                )
                last_error.__cause__ = error
            except ConnectError as error:
                last_error = UpstreamError(
                    f"cannot connect to {host}:{self.port} at {address}: {error}"
                )
                last_error.__cause__ = error
            self.log.info(
                "Connecting to {host}:{port} at {address} failed: {error}",
                event="upstream_connect_failed",
                host=host,
                port=self.port,
                address=address,
                error=str(last_error),
            )
        assert last_error is not None
        raise last_error


#: Bytes read from an upstream connection per reactor turn.  Twisted's
#: default (64 KiB) starves downloads on a busy server: every ready client
#: connection gets its turn between two reads.
UPSTREAM_READ_SIZE = 1024 * 1024


def _read_in_large_pieces(protocol: IProtocol) -> None:
    transport = getattr(protocol, "transport", None)
    if transport is not None and hasattr(transport, "bufferSize"):
        transport.bufferSize = UPSTREAM_READ_SIZE


def _default_resolver(reactor: object) -> HostnameResolver:
    resolver: HostnameResolver = IReactorPluggableNameResolver(reactor).nameResolver
    return resolver


@implementer(IAgentEndpointFactory)
@attrs.frozen
class GuardedEndpointFactory:
    """
    Endpoints for ``Agent.usingEndpointFactory``: every connection the agent
    opens goes through :class:`GuardedTCPEndpoint`; ``https`` URIs get TLS
    on top with the connection creator ``tls_policy`` gives for the host.

    ``resolver`` defaults to the reactor's ``nameResolver``.
    """

    reactor: _TCPReactor
    policy: AccessPolicy
    connect_timeout: float
    tls_policy: TLSPolicy = attrs.field(factory=BrowserLikePolicyForHTTPS)
    resolver: HostnameResolver | None = None

    def endpointForURI(self, uri: URI) -> Any:
        scheme = uri.scheme
        if scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {scheme!r}")
        host = _bare_host(uri.host.decode("ascii"))
        endpoint = guarded_endpoint(
            self.reactor,
            self.policy,
            host,
            uri.port,
            self.connect_timeout,
            resolver=self.resolver,
        )
        if scheme == b"https":
            creator = self.tls_policy.creatorForNetloc(host.encode("ascii"), uri.port)
            return wrapClientTLS(
                creator, cast(IStreamClientEndpoint, endpoint), clock=self.reactor
            )
        return endpoint


def guarded_endpoint(
    reactor: _TCPReactor,
    policy: AccessPolicy,
    host: str,
    port: int,
    timeout: float,
    resolver: HostnameResolver | None = None,
) -> GuardedTCPEndpoint:
    """A :class:`GuardedTCPEndpoint` using the reactor's resolver by default."""
    return GuardedTCPEndpoint(
        reactor,
        resolver if resolver is not None else _default_resolver(reactor),
        policy,
        host,
        port,
        timeout,
    )


def upstream_pool(
    reactor: _TCPReactor,
    persistent: bool = True,
    max_persistent_per_host: int = 8,
    cached_connection_timeout: int = 60,
) -> HTTPConnectionPool:
    """
    The pool of upstream connections: keep-alive connections are kept per
    (scheme, host, port), up to ``max_persistent_per_host`` idle ones, each
    for ``cached_connection_timeout`` seconds.
    """
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = max_persistent_per_host
    pool.cachedConnectionTimeout = cached_connection_timeout
    return pool


def make_http_client(
    reactor: _TCPReactor,
    policy: AccessPolicy,
    connect_timeout: float,
    persistent: bool = True,
    *,
    pool: HTTPConnectionPool | None = None,
    tls_policy: TLSPolicy | None = None,
    resolver: HostnameResolver | None = None,
    credentials: UpstreamCredentials | None = None,
    authenticate: Callable[[IAgent], IAgent] | None = None,
) -> UpstreamClient:
    """
    The client for upstream fetches: all its connections are guarded,
    their response heads bounded (see :mod:`buildcache.fetch.headlimit`), and
    the operator's ``credentials`` go to their own origins only
    (``authenticate`` as for :func:`upstream_client`).
    """
    factory = GuardedEndpointFactory(
        reactor,
        policy,
        connect_timeout,
        tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS(),
        resolver,
    )
    if pool is None:
        pool = upstream_pool(reactor, persistent)
    return upstream_client(
        Agent.usingEndpointFactory(
            reactor, HeadLimitedEndpointFactory(factory), pool=pool
        ),
        credentials,
        authenticate,
    )


def connect_tcp(
    reactor: _TCPReactor,
    policy: AccessPolicy,
    host: str,
    port: int,
    factory: IProtocolFactory,
    timeout: float,
    resolver: HostnameResolver | None = None,
) -> Deferred[IProtocol]:
    """
    Open a guarded TCP connection to ``host:port`` (for a ``CONNECT``
    tunnel) and return the connected protocol; failures as for
    :class:`GuardedTCPEndpoint`.
    """
    endpoint = guarded_endpoint(reactor, policy, host, port, timeout, resolver)
    return endpoint.connect(factory)
