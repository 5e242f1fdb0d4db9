"""
The configuration of one buildcache server, and the syntax of its values.

This module owns the frozen :class:`Config` the rest of the server is
built from (tests build one directly), its :class:`Mirror` routes and
defaults, and the parsers of the value syntaxes the command line takes
(sizes, durations, endpoints, mirrors, networks, upstream patterns,
upstream URLs and their credentials).  The command line itself, and the
defaults read from the machine (pip's index, the cache directory's
creation), are :mod:`buildcache.options`'.  Nothing here touches the
network, the reactor or the disk, except reading a netrc file named on the
command line.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from fractions import Fraction
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs

from buildcache.access import DEFAULT_ALLOW_FROM, UpstreamPattern
from buildcache.credentials import (
    Credentials,
    NetrcCredentials,
    UpstreamCredentials,
    hide_userinfo,
    masked_url,
    read_netrc,
    split_userinfo,
)
from buildcache.frontends.connections import DEFAULT_MAX_CONNECTIONS_PER_CLIENT

if TYPE_CHECKING:
    from buildcache.shared.location import S3Location

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PROXY_PORT = 8899
DEFAULT_INDEX_PORT = 3141
DEFAULT_PROXY_ENDPOINT = f"tcp:{DEFAULT_PROXY_PORT}"
DEFAULT_INDEX_ENDPOINT = f"tcp:{DEFAULT_INDEX_PORT}"
DEFAULT_REGISTRY_PORT = 5000
DEFAULT_REGISTRY_ENDPOINT = f"tcp:{DEFAULT_REGISTRY_PORT}"
DEFAULT_MAX_SIZE = 10 * 1024**3
DEFAULT_INDEX_TTL = 300.0
DEFAULT_UPSTREAM_TIMEOUT = 30.0
LOG_FORMATS = ("text", "json")
DEFAULT_LOG_FORMAT = "text"
#: Seconds a download waits, at most, for another node's copy of the same
#: file to appear in the shared tier (pip's read timeout).
DEFAULT_SHARED_WAIT = 10.0
#: Largest ``--shared-secret-file`` read.
SHARED_SECRET_MAX = 64 * 1024
#: Largest distribution file read ahead after its metadata (see
#: buildcache.ecosystems.pypi.prefetch).
DEFAULT_PREFETCH_MAX_SIZE = 32 * 1024**2
#: Most processes ``--workers`` starts by default (see :func:`default_workers`).
MAX_DEFAULT_WORKERS = 8


def default_workers(cpu_count: int | None = None) -> int:
    """
    The command line's default ``--workers``: one process per CPU, at most
    :data:`MAX_DEFAULT_WORKERS`, at least one.
    """
    count = os.cpu_count() if cpu_count is None else cpu_count
    return max(1, min(count or 1, MAX_DEFAULT_WORKERS))

_SIZE_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}
_SIZE_PATTERN = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*"
    r"(?P<unit>[KMGTP]?)(?:I?B)?",
    re.IGNORECASE,
)
_DURATION_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PATTERN = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[smhd]?)",
    re.IGNORECASE,
)
_MIRROR_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]*")
# A registry NAME: a host name or address (IPv6 bracketed) and a port.
_REGISTRY_NAME_PATTERN = re.compile(
    r"(?:\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)"
    r"(?::[0-9]{1,5})?"
)
# Endpoint types whose description carries a listening port.
_PORTED_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "ssl"})


def _network_tuple(values: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(values)


def _string_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _mirror_tuple(values: Iterable[Mirror]) -> tuple[Mirror, ...]:
    return tuple(values)


def _registry_tuple(values: Iterable[Registry]) -> tuple[Registry, ...]:
    return tuple(values)


def absolute_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def without_trailing_slash(url: str) -> str:
    return url.rstrip("/")


def check_http_url(url: str) -> str:
    """
    Check that ``url`` is an absolute http or https URL with a host, and
    return it.  The message of a refusal never quotes user information
    (see :func:`hide_userinfo`).
    """
    # A URL with an "@" may carry a token written in any way (a quote or a
    # space in it defeats a pattern): all before its last "@" is hidden.
    shown = repr(masked_url(url))
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(f"{shown} is not a valid URL") from None
    try:
        # .port parses lazily: read it so a bad port fails here.  Its
        # message quotes the port, which may be part of a token.
        parts.port
    except ValueError:
        raise ValueError(f"{shown} has an invalid port") from None
    if parts.port == 0:
        raise ValueError(f"{shown} has port 0, which nothing can be reached on")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{shown} is not an http or https URL with a host")
    return url


def check_http_url_without_userinfo(url: str, how_to_give: str | None = None) -> str:
    """
    :func:`check_http_url`, refusing user information: a configured URL's
    credentials are taken off it (see :func:`split_http_url`) and kept apart.
    ``how_to_give`` tells the refusal's reader where they go instead.
    """
    check_http_url(url)
    if "@" in urlsplit(url).netloc:
        raise ValueError(
            f"{hide_userinfo(url)!r} carries user information; "
            + (how_to_give or "credentials are kept apart from upstream URLs")
        )
    return url


def split_http_url(url: str) -> tuple[str, Credentials | None]:
    """
    Check an upstream URL and take its user information off: the URL
    without it, and the credentials it gave (or ``None``).
    """
    check_http_url(url)
    parts = urlsplit(url)
    if "@" in parts.path + parts.query + parts.fragment:
        # "http://user:12/34@host/" parses as host "user", port 12: a token
        # with a raw "/" would be taken for a path and shown everywhere.
        raise ValueError(
            "the URL given (not shown) has an '@' after its host; write an"
            " '@', ':' or '/' inside a user name or password percent-encoded"
            " (%40, %3A, %2F), or give the credentials in --netrc"
        )
    return split_userinfo(url)


def _check_mirror_name(instance: object, attribute: Any, name: str) -> None:
    if not _MIRROR_NAME_PATTERN.fullmatch(name):
        # A "name" holding ":" or "@" is likely a URL with a token in it.
        shown = f" {name!r}" if re.fullmatch(r"[\w.-]*", name) else ""
        raise ValueError(
            f"mirror name{shown} must match [a-z0-9][a-z0-9._-]*"
        )


def _check_http_url(instance: object, attribute: Any, url: str) -> None:
    check_http_url_without_userinfo(url)


def _check_http_urls(instance: object, attribute: Any, urls: tuple[str, ...]) -> None:
    for url in urls:
        check_http_url_without_userinfo(url)


@attrs.frozen
class Mirror:
    """
    A mirror route: requests for ``/NAME/...`` on the proxy port are served
    from ``URL/...``.

    :ivar name: the first path segment of the route.
    :ivar url: the upstream base URL, http or https, without trailing slash
        and without user information (see :attr:`Config.upstream_credentials`).
    """

    name: str = attrs.field(validator=_check_mirror_name)
    url: str = attrs.field(
        converter=without_trailing_slash, validator=_check_http_url
    )


DEFAULT_MIRRORS: tuple[Mirror, ...] = (
    Mirror(name="alpine", url="https://dl-cdn.alpinelinux.org/alpine"),
)


def check_registry_name(name: str) -> str:
    """
    Check a registry NAME: a host[:port] with a ``.`` or a ``:``, or
    ``localhost`` (docker's rule: else it is a Docker Hub namespace).
    """
    if not _REGISTRY_NAME_PATTERN.fullmatch(name) or len(name) > 255:
        shown = f" {name!r}" if re.fullmatch(r"[\w.:\[\]-]{0,100}", name) else ""
        raise ValueError(
            f"registry name{shown} must be a lowercase host name or address"
            " with an optional :port (docker.io, registry.example:5000)"
        )
    if not ("." in name or ":" in name or name == "localhost"):
        raise ValueError(
            f"registry name {name!r} must contain a '.' or a ':', or be"
            " 'localhost' (a name without them is a Docker Hub namespace)"
        )
    return name


def _check_registry_name(instance: object, attribute: Any, name: str) -> None:
    check_registry_name(name)


@attrs.frozen
class Registry:
    """
    An upstream of the registry port: clients select it by ``name``
    (``?ns=NAME``, a first path segment); ``url`` is its base URL (no
    user information), ``credentials`` its ``--registry-auth`` (never in
    ``repr``).
    """

    name: str = attrs.field(validator=_check_registry_name)
    url: str = attrs.field(converter=without_trailing_slash, validator=_check_http_url)
    credentials: Credentials | None = attrs.field(default=None, repr=False)


#: Docker Hub's registry endpoint: the built-in ``docker.io`` (tests always
#: override it with a loopback URL).
DEFAULT_REGISTRIES: tuple[Registry, ...] = (
    Registry(name="docker.io", url="https://registry-1.docker.io"),
)
#: Other names clients give a registry (``?ns=``, a path prefix): Docker
#: Hub's host names.
REGISTRY_ALIASES: Mapping[str, str] = {
    "index.docker.io": "docker.io",
    "registry-1.docker.io": "docker.io",
}


@attrs.frozen
class Config:
    """
    The validated configuration of one buildcache server.

    Built by :meth:`buildcache.options.Options.postOptions`; tests may
    build it directly, giving only ``cache_dir``.  The command line
    resolves ``pypi_upstreams`` from pip's own settings when none is
    given; a directly built ``Config`` has no PyPI
    upstream unless one is passed, so a test never reaches a real registry by
    accident.

    :ivar cache_dir: absolute path of the store's directory.
    :ivar proxy_endpoint: server endpoint description of the proxy and
        mirror front end.
    :ivar index_endpoint: server endpoint description of the pip index.
    :ivar max_size: the store's size limit in bytes.
    :ivar index_ttl: seconds an index file (APKINDEX, simple page) stays
        fresh before it is revalidated.
    :ivar upstream_timeout: seconds an upstream may stay silent before the
        download is abandoned.
    :ivar mirrors: mirror routes, in the order they were declared.
    :ivar allow_from: client networks allowed to use the server.
    :ivar allow_upstream: patterns (see :class:`buildcache.access.UpstreamPattern`) of
        upstreams the forward proxy may reach besides the mirrors.
    :ivar pypi_upstreams: simple-index base URLs without trailing slash nor
        user information, in priority order.
    :ivar upstream_credentials: credentials sent to the mirror and index
        upstreams (by origin), from their URLs' user information or the
        netrc file.
    :ivar netrc_file: the netrc file they were read from, if any.
    :ivar log_format: ``"text"`` or ``"json"``.
    :ivar prefetch_max_size: largest distribution file fetched ahead once a
        client has read its metadata; 0 turns read-ahead off.
    :ivar max_connections_per_client: open connections one client address
        may hold on both ports together; one more is answered 503.
    :ivar max_object_size: largest body stored (squid's
        ``maximum_object_size``); larger ones are streamed to their clients,
        never stored nor spooled whole; 0: ``max_size``.
    :ivar registry_endpoint: the registry port's endpoint, or None (the
        command line's default is ``tcp:5000``, a direct Config's None).
    :ivar registries: the registry port's upstreams (``docker.io`` is the
        command line's default only).
    :ivar registry_auth_files: the ``--registry-auth`` files (for a
        warning about their modes).
    :ivar shared_store: the object store several nodes share behind their
        disks (``--shared-store``), or None: no shared tier.
    :ivar shared_secret: the key that signs and checks the tier's records
        (never in ``repr``), or None: only files with an independent digest
        are shared.
    :ivar shared_secret_file: the file it was read from (for a warning
        about its mode, and the status page).
    :ivar shared_max_size: the bucket prefix's size limit, or None: no
        eviction from the bucket.
    :ivar shared_wait: seconds a download waits, at most, for another
        node's copy of the same file.
    :ivar workers: processes serving hits, the main one included (see
        :mod:`buildcache.workers`); 1 is one process, as a directly built
        ``Config`` has it (the command line's default is
        :func:`default_workers`).
    """

    cache_dir: str = attrs.field(converter=absolute_path)
    proxy_endpoint: str = attrs.field(default=DEFAULT_PROXY_ENDPOINT)
    index_endpoint: str = attrs.field(default=DEFAULT_INDEX_ENDPOINT)
    max_size: int = attrs.field(
        default=DEFAULT_MAX_SIZE, validator=attrs.validators.gt(0)
    )
    index_ttl: float = attrs.field(
        default=DEFAULT_INDEX_TTL, converter=float, validator=attrs.validators.ge(0)
    )
    upstream_timeout: float = attrs.field(
        default=DEFAULT_UPSTREAM_TIMEOUT,
        converter=float,
        validator=attrs.validators.gt(0),
    )
    mirrors: tuple[Mirror, ...] = attrs.field(
        default=DEFAULT_MIRRORS, converter=_mirror_tuple
    )
    allow_from: tuple[IPNetwork, ...] = attrs.field(
        default=DEFAULT_ALLOW_FROM, converter=_network_tuple
    )
    allow_upstream: tuple[str, ...] = attrs.field(
        default=(), converter=_string_tuple
    )
    pypi_upstreams: tuple[str, ...] = attrs.field(
        default=(), converter=_string_tuple, validator=_check_http_urls
    )
    log_format: str = attrs.field(
        default=DEFAULT_LOG_FORMAT, validator=attrs.validators.in_(LOG_FORMATS)
    )
    prefetch_max_size: int = attrs.field(
        default=DEFAULT_PREFETCH_MAX_SIZE, validator=attrs.validators.ge(0)
    )
    max_connections_per_client: int = attrs.field(
        default=DEFAULT_MAX_CONNECTIONS_PER_CLIENT, validator=attrs.validators.gt(0)
    )
    upstream_credentials: UpstreamCredentials = attrs.field(
        factory=UpstreamCredentials
    )
    netrc_file: str | None = None
    max_object_size: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    registry_endpoint: str | None = None
    registries: tuple[Registry, ...] = attrs.field(
        default=(), converter=_registry_tuple
    )
    registry_auth_files: tuple[str, ...] = attrs.field(
        default=(), converter=_string_tuple
    )
    shared_store: S3Location | None = None
    shared_secret: bytes | None = attrs.field(default=None, repr=False)
    shared_secret_file: str | None = None
    shared_max_size: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(attrs.validators.gt(0)),
    )
    shared_wait: float = attrs.field(
        default=DEFAULT_SHARED_WAIT, converter=float, validator=attrs.validators.ge(0)
    )
    workers: int = attrs.field(default=1, validator=attrs.validators.ge(1))

    def __attrs_post_init__(self) -> None:
        names = [registry.name for registry in self.registries]
        if len(set(names)) != len(names):
            raise ValueError("a registry NAME is configured twice")


# Value parsers.  Each raises ValueError with a message that does not name
# the option; buildcache.options.Options prefixes the option's name.


def parse_size(text: str) -> int:
    """
    Parse a size in bytes: ``"500M"``, ``"20G"``, ``"1.5T"``, ``"1024K"``,
    ``"1048576"``, optionally followed by ``B`` or ``iB``.  Units are powers of
    1024 and case-insensitive.
    """
    size = parse_size_or_zero(text)
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def parse_size_or_zero(text: str) -> int:
    """
    Parse a size as :func:`parse_size` does, zero included (``"0"``, ``"0M"``).
    """
    match = _SIZE_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a size (examples: 500M, 20G, 1.5T, 1048576)"
        )
    # Fraction keeps "1.5T" and long byte counts exact.
    return int(Fraction(match["number"]) * 1024 ** _SIZE_UNITS[match["unit"].upper()])


def format_size(size: int) -> str:
    """
    Write ``size`` bytes in the largest unit that keeps it a whole number, as
    :func:`parse_size` reads it back: ``10737418240`` becomes ``"10G"``.
    """
    for unit, power in sorted(_SIZE_UNITS.items(), key=lambda item: -item[1]):
        if power and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def parse_duration(text: str) -> float:
    """
    Parse a non-negative duration in seconds: ``"300"``, ``"30s"``, ``"5m"``,
    ``"1h"``, ``"1d"``, with an optional fraction (``"1.5h"``).
    """
    match = _DURATION_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration (examples: 300, 30s, 5m, 1h)"
        )
    return float(match["number"]) * _DURATION_UNITS[match["unit"].lower()]


def parse_positive_duration(text: str) -> float:
    """
    Parse a duration as :func:`parse_duration` does, refusing zero.
    """
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


def parse_positive_count(text: str) -> int:
    """
    Parse a whole number greater than zero: ``"256"``.
    """
    stripped = text.strip()
    if not stripped.isdigit() or int(stripped) <= 0:
        raise ValueError(f"{text!r} is not a whole number greater than zero")
    return int(stripped)


def format_duration(seconds: float) -> str:
    """
    Write a duration as :func:`parse_duration` reads it back: ``300.0`` becomes
    ``"300s"``.
    """
    return f"{seconds:g}s"


def _check_port(text: str) -> int:
    if not text.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not between 1 and 65535")
    return port


def _split_endpoint(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split a server endpoint description into positional and keyword
    arguments, with the grammar of :mod:`twisted.internet.endpoints`: fields are
    separated by ``:``, the first ``=`` of a field makes it a keyword, and a
    backslash escapes the next character.
    """
    positional: list[str] = []
    keywords: dict[str, str] = {}
    fields: list[list[str]] = [[""]]
    characters = iter(description)
    for character in characters:
        if character == "\\":
            fields[-1][-1] += next(characters, "")
        elif character == ":":
            fields.append([""])
        elif character == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += character
    for field in fields:
        if len(field) == 1:
            positional.append(field[0])
        else:
            keywords[field[0]] = field[1]
    return positional, keywords


def _known_plugin_endpoint_types() -> frozenset[str]:
    from twisted.internet.interfaces import IStreamServerEndpointStringParser
    from twisted.plugin import getPlugins

    return frozenset(
        plugin.prefix.lower()
        for plugin in getPlugins(IStreamServerEndpointStringParser)
    )


def parse_endpoint(text: str) -> str:
    """
    Parse a listening address: a bare port number becomes ``"tcp:PORT"``; a
    server endpoint description (``"tcp:8899:interface=127.0.0.1"``,
    ``"tcp6:port=8899"``, ``"unix:/run/buildcache.sock"``,
    ``"systemd:domain=INET:index=0"``) is checked and returned unchanged.
    """
    text = text.strip()
    if text.isdigit():
        return f"tcp:{_check_port(text)}"
    positional, keywords = _split_endpoint(text)
    endpoint_type = positional[0]
    arguments = positional[1:]
    if not endpoint_type:
        raise ValueError(f"{text!r} is neither a port nor an endpoint description")
    if endpoint_type in _PORTED_ENDPOINT_TYPES:
        if "port" in keywords:
            port = keywords["port"]
        elif arguments:
            port = arguments[0]
        else:
            raise ValueError(f"endpoint {text!r} has no port")
        _check_port(port)
    elif endpoint_type == "unix":
        if not (arguments and arguments[0]) and not keywords.get("address"):
            raise ValueError(f"endpoint {text!r} has no socket path")
    elif endpoint_type.lower() not in _known_plugin_endpoint_types():
        raise ValueError(f"endpoint type {endpoint_type!r} of {text!r} is unknown")
    return text


def parse_mirror(text: str) -> tuple[Mirror, Credentials | None]:
    """
    Parse ``"NAME=URL"`` into a :class:`Mirror`, and the credentials the URL's
    user information gave (taken off the mirror's URL).
    """
    name, separator, url = text.partition("=")
    if not separator:
        raise ValueError(f"{hide_userinfo(text)!r} is not NAME=URL")
    _check_mirror_name(None, None, name.strip())
    bare, credentials = split_http_url(url.strip())
    return Mirror(name=name.strip(), url=bare), credentials


def parse_registry(text: str) -> Registry:
    """Parse ``"NAME=URL"`` (credentials go in ``--registry-auth``)."""
    name, separator, url = text.partition("=")
    if not separator:
        raise ValueError(f"{hide_userinfo(text)!r} is not NAME=URL")
    name = name.strip().lower()
    check_registry_name(name)
    checked = check_http_url_without_userinfo(
        url.strip(),
        f"give a registry's credentials with --registry-auth {name}=FILE"
        " (a file holding USER:PASSWORD)",
    )
    return Registry(name=name, url=checked)


def parse_registry_auth(text: str) -> tuple[str, str, Credentials]:
    """
    Parse ``"NAME=FILE"``: the registry NAME, the file's absolute path, and
    the credentials it holds (its first line, ``USER:PASSWORD``).  No
    message quotes the file's content.
    """
    name, separator, path = text.partition("=")
    if not separator or not path.strip():
        raise ValueError(f"{text[:200]!r} is not NAME=FILE")
    name = name.strip().lower()
    check_registry_name(name)
    path = absolute_path(path.strip())
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024)
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or 'error'}") from None
    try:
        lines = raw.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path!r} is not UTF-8 text") from None
    line = lines[0] if lines else ""
    username, colon, password = line.strip().partition(":")
    if not colon or not username:
        raise ValueError(f"{path!r} must hold one line USER:PASSWORD")
    return name, path, Credentials(username, password)


def read_shared_secret(path: str) -> tuple[str, bytes]:
    """
    Read ``--shared-secret-file``: its absolute path, and the secret (its
    bytes, surrounding white space stripped).  No message quotes the
    file's content.
    """
    path = absolute_path(path.strip())
    try:
        with open(path, "rb") as f:
            raw = f.read(SHARED_SECRET_MAX + 1)
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or 'error'}") from None
    if len(raw) > SHARED_SECRET_MAX:
        raise ValueError(f"{path!r} is larger than {SHARED_SECRET_MAX} bytes")
    secret = raw.strip()
    if len(secret) < 16:
        raise ValueError(
            f"{path!r} must hold a secret of at least 16 bytes (for example"
            " the output of: openssl rand -hex 32)"
        )
    return path, secret


def parse_netrc(path: str) -> tuple[str, NetrcCredentials]:
    """
    Read a netrc file (``machine HOST login USER password PASS``): its
    absolute path and its entries.
    """
    path = absolute_path(path)
    return path, read_netrc(path)


def parse_network(text: str) -> IPNetwork:
    """
    Parse an address or CIDR network (``"10.0.0.0/8"``, ``"::1"``); host bits
    set in a CIDR are cleared (``"10.1.2.3/8"`` is ``10.0.0.0/8``).
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network") from None


def parse_upstream_pattern(text: str) -> str:
    """
    Check an upstream pattern (see :class:`buildcache.access.UpstreamPattern`:
    a host glob such as ``"*.example.org"``, optionally with ``:port``; an IP
    address or network such as ``"10.0.0.0/8"``) and return it stripped.
    """
    pattern = text.strip()
    UpstreamPattern.parse(pattern)
    return pattern


# Environment-dependent defaults.


def default_cache_dir(environ: Mapping[str, str]) -> str:
    """
    The cache directory used when none is given: systemd's
    ``$CACHE_DIRECTORY`` (the first, when it lists several), else
    ``$XDG_CACHE_HOME/buildcache``, else ``~/.cache/buildcache``.
    """
    systemd_directories = [
        path for path in environ.get("CACHE_DIRECTORY", "").split(":") if path
    ]
    if systemd_directories:
        return os.path.abspath(systemd_directories[0])
    xdg_cache_home = environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    if not os.path.isabs(xdg_cache_home):
        home = environ.get("HOME") or os.path.expanduser("~")
        xdg_cache_home = os.path.join(home, ".cache")
    return os.path.abspath(os.path.join(xdg_cache_home, "buildcache"))


def parse_log_format(text: str) -> str:
    """
    Check a log format name: ``"text"`` or ``"json"``.
    """
    if text not in LOG_FORMATS:
        raise ValueError(f"{text!r} is not one of {', '.join(LOG_FORMATS)}")
    return text
