"""
Access rules: what keeps buildcache from being an open proxy.

This module owns, without any network I/O:

- which clients may use the cache at all (``allow_from`` networks);
- which upstream hosts a client may make it fetch from (``allow_upstream``
  patterns, plus the mirror and index upstreams the administrator
  configured, which are always allowed);
- which addresses a fetch may actually connect to after DNS resolution:
  public addresses always, loopback, private, link-local, multicast and
  reserved ones only for hosts or networks an administrator listed.  The
  check runs on the address connected to, so a name that resolves (or
  rebinds) to ``127.0.0.1`` or ``169.254.169.254`` is refused, whatever
  spelling of the host reached us (``127.1``, ``0x7f000001``, …);
- ``CONNECT`` tunnels: port 443 of an allowed host only.

Where an address leads (loopback, private, ...) is
:mod:`buildcache.addresses`'s.

Every check returns a :class:`Verdict`: true or false in a boolean context, with
a reason a front end can log and put in a 403 body.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit

import attrs
import idna

from buildcache.addresses import (
    AddressClass,
    IPAddress,
    IPNetwork,
    classify_address,
    parse_address,
    unmapped,
)

__all__ = [
    "AddressClass",
    "Verdict",
    "InvalidHost",
    "IPAddress",
    "IPNetwork",
    "UpstreamPattern",
    "AccessPolicy",
    "DEFAULT_ALLOW_FROM",
    "classify_address",
    "normalize_host",
    "upstream_endpoint",
    "upstream_host_key",
]

@attrs.frozen
class Verdict:
    """
    The outcome of an access check: truthy when allowed.

    ``reason`` explains either way (``"matches --allow-upstream
    '*.example.org'"``, ``"10.0.0.5 is a private address …"``).
    """

    allowed: bool
    reason: str

    def __bool__(self) -> bool:
        return self.allowed

    @classmethod
    def allow(cls, reason: str) -> Verdict:
        return cls(True, reason)

    @classmethod
    def refuse(cls, reason: str) -> Verdict:
        return cls(False, reason)


class InvalidHost(ValueError):
    """A host name or literal that cannot be requested; str() is the reason."""


_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?", re.ASCII)
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII)


def _ip_literal(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def normalize_host(host: str) -> str:
    """
    The canonical form of a URL host: IP literals in their standard text
    form without brackets; names lowercase, IDNA A-labels, without the
    trailing dot.

    Numeric spellings that ``ipaddress`` rejects (``127.1``,
    ``0x7f000001``, ``2130706433``) stay names: the resolver may still turn
    them into an address, which the address check then judges.

    :raise InvalidHost: empty, bad IDNA, bad characters, too long.
    """
    text = host.strip()
    if text.startswith("[") or text.endswith("]"):
        if not (text.startswith("[") and text.endswith("]")):
            raise InvalidHost(f"unbalanced brackets in host {host!r}")
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise InvalidHost(f"{host!r} is not an IPv6 literal") from None
    if text.endswith("."):
        text = text[:-1]
    if not text:
        raise InvalidHost("empty host")
    literal = _ip_literal(text)
    if literal is not None:
        return str(literal)
    if text.isascii():
        name = text.lower()
    else:
        try:
            name = idna.encode(text, uts46=True).decode("ascii")
        except (idna.IDNAError, UnicodeError, ValueError) as error:
            raise InvalidHost(f"host {host!r} is not a valid IDNA name: {error}") from None
    if len(name) > 253:
        raise InvalidHost(f"host name longer than 253 characters: {host!r}")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise InvalidHost(f"host {host!r} has an invalid label {label!r}")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except (idna.IDNAError, UnicodeError, ValueError):
                raise InvalidHost(f"host {host!r} has an invalid A-label {label!r}") from None
    return name


def _endpoint_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _ends_in_number(name: str) -> bool:
    """WHATWG URL's test for a host that browsers would read as IPv4."""
    return _NUMERIC_LABEL.fullmatch(name.rsplit(".", 1)[-1]) is not None


_WILDCARD_LABEL = re.compile(r"[a-z0-9_*-]+", re.ASCII)


def _port_number(text: str, source: str) -> int:
    if not re.fullmatch(r"[0-9]{1,5}", text, re.ASCII) or not 1 <= int(text) <= 65535:
        raise ValueError(f"invalid port in {source!r}")
    return int(text)


@attrs.frozen
class UpstreamPattern:
    """
    One ``allow_upstream`` entry.

    Grammar: ``HOST[:PORT]`` where HOST is a name (``mirror.local``), a
    glob (``*.example.org`` = any name below example.org at any depth;
    ``*`` inside a label matches within that label only), an IPv4 address
    or network (``127.0.0.1``, ``10.0.0.0/8``) or an IPv6 address or
    network, bracketed when a port follows (``[::1]:3141``, ``fd00::/8``).
    Without a port, any port matches.

    Name patterns match only names and never names ending in a number
    (``127.1``); network patterns match only IP literals and connected
    addresses.  Refused: a lone ``*`` or a wildcard in the last label (it
    would lift the address check for every host), and names ending in a
    number (``127.1``, ``0x7f000001``: write the address instead).
    """

    text: str
    port: int | None
    network: IPNetwork | None
    name_regex: re.Pattern[str] | None

    @classmethod
    def parse(cls, text: str) -> UpstreamPattern:
        """
        The pattern ``text`` writes.

        :raise ValueError: an entry that follows no form above.
        """
        source = text
        text = text.strip().lower()
        if not text:
            raise ValueError("empty --allow-upstream entry")
        bracketed = re.fullmatch(r"\[([^\]]+)\](/[0-9]+)?(?::([^:]*))?", text)
        if bracketed is not None:
            inner, prefix, port_text = bracketed.groups()
            try:
                network = ipaddress.IPv6Network(inner + (prefix or ""), strict=False)
            except ValueError:
                raise ValueError(f"{source!r}: brackets hold an IPv6 address") from None
            port = None if port_text is None else _port_number(port_text, source)
            return cls(source, port, network, None)
        if text.count(":") >= 2:
            try:
                return cls(source, None, ipaddress.IPv6Network(text, strict=False), None)
            except ValueError:
                raise ValueError(f"{source!r} is not an IPv6 address or network") from None
        host_text, colon, port_text = text.partition(":")
        port = _port_number(port_text, source) if colon else None
        try:
            return cls(source, port, ipaddress.ip_network(host_text, strict=False), None)
        except ValueError:
            pass
        return cls(source, port, None, _compile_name_pattern(host_text, source))

    def _port_matches(self, port: int) -> bool:
        return self.port is None or self.port == port

    def matches_host(self, host: str, port: int) -> bool:
        """Whether the normalised ``host`` (see :func:`normalize_host`) matches."""
        if not self._port_matches(port):
            return False
        literal = _ip_literal(host)
        if literal is not None:
            return self.network is not None and unmapped(literal) in self.network
        if self.name_regex is None or _ends_in_number(host):
            return False
        return self.name_regex.fullmatch(host) is not None

    def matches_address(self, address: IPAddress, port: int) -> bool:
        """Whether a connected-to address lies in this network pattern."""
        if self.network is None or not self._port_matches(port):
            return False
        return unmapped(address) in self.network


def _compile_name_pattern(host_text: str, source: str) -> re.Pattern[str]:
    if host_text.endswith("."):
        host_text = host_text[:-1]
    if _ends_in_number(host_text):
        raise ValueError(
            f"{source!r} ends in a number but is not an IP address or network; "
            "write the address in dotted-quad form"
        )
    labels = host_text.split(".")
    if "*" in labels[-1]:
        raise ValueError(
            f"{source!r}: the last label must be literal; leave --allow-upstream "
            "empty to allow any public host"
        )
    pieces: list[str] = []
    for position, label in enumerate(labels):
        if label == "*" and position == 0:
            pieces.append(r"(?:[^.]+\.)*[^.]+")
        elif "*" in label:
            if not _WILDCARD_LABEL.fullmatch(label):
                raise ValueError(f"{source!r}: invalid wildcard label {label!r}")
            pieces.append("[^.]*".join(re.escape(part) for part in label.split("*")))
        else:
            try:
                pieces.append(re.escape(normalize_host(label)))
            except InvalidHost as error:
                raise ValueError(f"{source!r}: {error}") from None
    return re.compile(r"\.".join(pieces))


def _networks(values: Iterable[str | IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(
        value if isinstance(value, (ipaddress.IPv4Network, ipaddress.IPv6Network))
        else ipaddress.ip_network(value.strip(), strict=False)
        for value in values
    )


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _endpoints(values: Iterable[tuple[str, int]]) -> frozenset[tuple[str, int]]:
    return frozenset((normalize_host(host), int(port)) for host, port in values)


def upstream_endpoint(url: str) -> tuple[str, int]:
    """
    The (normalised host, port) an upstream URL connects to, default ports
    80 for http and 443 for https.

    :raise ValueError: no host, an unknown scheme without a port, or a bad
        port.
    """
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"upstream URL without a host: {url!r}")
    port = parts.port
    if port is None:
        defaults = {"http": 80, "https": 443}
        if parts.scheme.lower() not in defaults:
            raise ValueError(f"upstream URL without a port or known scheme: {url!r}")
        port = defaults[parts.scheme.lower()]
    return normalize_host(parts.hostname), port


_DEFAULT_PORTS = {"http": 80, "https": 443}


def upstream_host_key(url: str) -> str | None:
    """
    The name an upstream goes by in the health table and its metrics
    labels: the normalised host (:func:`normalize_host`), IPv6 in brackets, and
    the port only when it is not the scheme's default; never the userinfo.

    ``http://LoCaLhOsT:80/x`` and ``http://localhost/y`` are one upstream,
    ``localhost:8080`` another.  ``None`` for a URL without a usable host
    or port: no upstream was reached, so no row is due.
    """
    try:
        parts = urlsplit(url)
        hostname = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not hostname:
        return None
    try:
        host = normalize_host(hostname)
    except InvalidHost:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(parts.scheme.lower()):
        return host
    return f"{host}:{port}"


#: Loopback, RFC 1918 and IPv6 unique-local: a build box on a LAN, with
#: Docker's bridge networks (172.17.0.0/16 and up) included.
DEFAULT_ALLOW_FROM: tuple[IPNetwork, ...] = _networks(
    ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)


#: The ports below 1024 a forward request may reach without its port being
#: listed in ``allow_upstream``; from 1024 up, any.
WEB_PORTS = frozenset({80, 443})


# The memoised methods below hash the policy on every request.
@attrs.frozen(cache_hash=True)
class AccessPolicy:
    """
    Who may use the cache, and what it may fetch for them.

    :ivar allow_from: client networks; empty means no client at all.
    :ivar allow_upstream: :class:`UpstreamPattern` texts; empty means any host
        name (the address check still applies).
    :ivar configured_upstreams: (host, port) of the mirror and index
        upstreams from the configuration: always allowed, address check
        included, because an administrator chose them.

    :raise ValueError: at construction, for a bad network, pattern or host.
    """

    allow_from: tuple[IPNetwork, ...] = attrs.field(
        default=DEFAULT_ALLOW_FROM, converter=_networks
    )
    allow_upstream: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    configured_upstreams: frozenset[tuple[str, int]] = attrs.field(
        default=frozenset(), converter=_endpoints
    )
    _patterns: tuple[UpstreamPattern, ...] = attrs.field(init=False, repr=False, eq=False)

    @_patterns.default
    def _parse_patterns(self) -> tuple[UpstreamPattern, ...]:
        return tuple(UpstreamPattern.parse(text) for text in self.allow_upstream)

    @classmethod
    def from_config(
        cls,
        allow_from: Iterable[str | IPNetwork],
        allow_upstream: Iterable[str],
        upstream_urls: Iterable[str],
    ) -> AccessPolicy:
        """Build from configuration strings and the configured upstream URLs."""
        return cls(
            allow_from=_networks(allow_from),
            allow_upstream=tuple(allow_upstream),
            configured_upstreams=frozenset(upstream_endpoint(url) for url in upstream_urls),
        )

    # Pure functions of a frozen policy, asked on every request: memoised.
    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def client_allowed(self, ip: str) -> Verdict:
        """Whether a client at ``ip`` may use the cache (``::ffff:a.b.c.d`` is IPv4)."""
        try:
            address = unmapped(parse_address(ip))
        except ValueError:
            return Verdict.refuse(f"client address {ip!r} is not an IP address")
        for network in self.allow_from:
            if address in network:
                return Verdict.allow(f"client {address} is in --allow-from {network}")
        return Verdict.refuse(f"client {address} is not in --allow-from")

    def _configured(self, host: str, port: int) -> bool:
        return (host, port) in self.configured_upstreams

    # Pure functions of a frozen policy, asked on every request: memoised.
    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def host_allowed(self, host: str, port: int) -> Verdict:
        """
        Whether a client may ask for ``host:port`` at all, before DNS.

        Configured upstreams always; otherwise any host when
        ``allow_upstream`` is empty, else only a matching pattern.
        """
        try:
            name = normalize_host(host)
        except InvalidHost as error:
            return Verdict.refuse(str(error))
        if not 1 <= port <= 65535:
            return Verdict.refuse(f"invalid port {port}")
        if self._configured(name, port):
            return Verdict.allow(f"{_endpoint_text(name, port)} is a configured upstream")
        if port < 1024 and port not in WEB_PORTS:
            # Another protocol's port (SMTP, IMAP, ...): reached through an
            # HTTP proxy only to abuse it; squid refuses these too.
            for pattern in self._patterns:
                if pattern.port == port and pattern.matches_host(name, port):
                    return Verdict.allow(
                        f"{_endpoint_text(name, port)} matches --allow-upstream {pattern.text!r}"
                    )
            return Verdict.refuse(
                f"port {port} is not a web port; list {_endpoint_text(name, port)}"
                " (with its port) in --allow-upstream to reach it"
            )
        if not self._patterns:
            return Verdict.allow("--allow-upstream is empty: any host, public addresses only")
        for pattern in self._patterns:
            if pattern.matches_host(name, port):
                return Verdict.allow(f"{_endpoint_text(name, port)} matches --allow-upstream {pattern.text!r}")
        return Verdict.refuse(f"{_endpoint_text(name, port)} is not in --allow-upstream")

    # Pure functions of a frozen policy, asked on every request: memoised.
    @functools.lru_cache(maxsize=4096)  # noqa: B019
    def address_allowed(self, host: str, port: int, ip: str) -> Verdict:
        """
        Whether the fetch for ``host:port`` may connect to ``ip``, the
        address DNS gave.  Call it after :meth:`host_allowed` passed, for every
        address tried.

        Public addresses always; any other class only when ``host`` is a
        configured upstream or matches a pattern by name, or ``ip`` lies in
        a network pattern.
        """
        try:
            address = parse_address(ip)
        except ValueError:
            return Verdict.refuse(f"{ip!r} is not an IP address")
        address_class = classify_address(address)
        if address_class is AddressClass.PUBLIC:
            return Verdict.allow(f"{address} is a public address")
        try:
            name = normalize_host(host)
        except InvalidHost as error:
            return Verdict.refuse(str(error))
        if self._configured(name, port):
            return Verdict.allow(f"{_endpoint_text(name, port)} is a configured upstream")
        for pattern in self._patterns:
            if pattern.matches_host(name, port) or pattern.matches_address(address, port):
                return Verdict.allow(
                    f"{address_class.value} address {address} allowed by "
                    f"--allow-upstream {pattern.text!r}"
                )
        return Verdict.refuse(
            f"{name} resolved to {address}, a {address_class.value} address; "
            "list the host or network in --allow-upstream to reach it"
        )

    def connect_allowed(self, host: str, port: int) -> Verdict:
        """
        Whether a ``CONNECT host:port`` tunnel may be opened: port 443 of an
        allowed host only (the address check still applies after DNS).
        """
        if port != 443:
            return Verdict.refuse(f"CONNECT is only allowed to port 443, not {port}")
        return self.host_allowed(host, port)
