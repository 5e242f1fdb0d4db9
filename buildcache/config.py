"""
Command-line options of buildcache and their validation.

This module owns every option the server accepts (L{Options}, used by the
twistd plugin and by C{buildcache.tac}), the parsers for their value syntaxes
(sizes, durations, endpoints, mirrors, networks, upstream patterns) and the
frozen L{Config} that the rest of the server is built from.  Nothing here
touches the network or the reactor; the only side effect is creating the
cache directory when options are validated.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.python import usage

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
from buildcache.ops.logs import JSON_OBSERVER, use_logfile

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PROXY_PORT = 8899
DEFAULT_INDEX_PORT = 3141
DEFAULT_PROXY_ENDPOINT = f"tcp:{DEFAULT_PROXY_PORT}"
DEFAULT_INDEX_ENDPOINT = f"tcp:{DEFAULT_INDEX_PORT}"
DEFAULT_MAX_SIZE = 10 * 1024**3
DEFAULT_INDEX_TTL = 300.0
DEFAULT_UPSTREAM_TIMEOUT = 30.0
LOG_FORMATS = ("text", "json")
DEFAULT_LOG_FORMAT = "text"
#: Largest distribution file read ahead after its metadata (see
#: buildcache.ecosystems.pypi.prefetch).
DEFAULT_PREFETCH_MAX_SIZE = 32 * 1024**2

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
# Endpoint types whose description carries a listening port.
_PORTED_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "ssl"})


def _network_tuple(values: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(values)


def _string_tuple(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _mirror_tuple(values: Iterable[Mirror]) -> tuple[Mirror, ...]:
    return tuple(values)


def _absolute_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _without_trailing_slash(url: str) -> str:
    return url.rstrip("/")


def check_http_url(url: str) -> str:
    """
    Check that C{url} is an absolute http or https URL with a host, and
    return it.  The message of a refusal never quotes user information
    (see L{hide_userinfo}).
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


def check_http_url_without_userinfo(url: str) -> str:
    """
    L{check_http_url}, refusing user information: a configured URL's
    credentials are taken off it (see L{split_http_url}) and kept apart.
    """
    check_http_url(url)
    if "@" in urlsplit(url).netloc:
        raise ValueError(
            f"{hide_userinfo(url)!r} carries user information; credentials"
            " are kept apart from upstream URLs"
        )
    return url


def split_http_url(url: str) -> tuple[str, Credentials | None]:
    """
    Check an upstream URL and take its user information off: the URL
    without it, and the credentials it gave (or L{None}).
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
    A mirror route: requests for C{/NAME/...} on the proxy port are served
    from C{URL/...}.

    @ivar name: the first path segment of the route.
    @ivar url: the upstream base URL, http or https, without trailing slash
        and without user information (see L{Config.upstream_credentials}).
    """

    name: str = attrs.field(validator=_check_mirror_name)
    url: str = attrs.field(
        converter=_without_trailing_slash, validator=_check_http_url
    )


DEFAULT_MIRRORS: tuple[Mirror, ...] = (
    Mirror(name="alpine", url="https://dl-cdn.alpinelinux.org/alpine"),
)


@attrs.frozen
class Config:
    """
    The validated configuration of one buildcache server.

    Built by L{Options.postOptions}; tests may build it directly, giving only
    C{cache_dir}.  The command line resolves C{pypi_upstreams} from pip's own
    settings when none is given; a directly built C{Config} has no PyPI
    upstream unless one is passed, so a test never reaches a real registry by
    accident.

    @ivar cache_dir: absolute path of the store's directory.
    @ivar proxy_endpoint: server endpoint description of the proxy and
        mirror front end.
    @ivar index_endpoint: server endpoint description of the pip index.
    @ivar max_size: the store's size limit in bytes.
    @ivar index_ttl: seconds an index file (APKINDEX, simple page) stays
        fresh before it is revalidated.
    @ivar upstream_timeout: seconds an upstream may stay silent before the
        download is abandoned.
    @ivar mirrors: mirror routes, in the order they were declared.
    @ivar allow_from: client networks allowed to use the server.
    @ivar allow_upstream: patterns (see L{buildcache.access.UpstreamPattern}) of
        upstreams the forward proxy may reach besides the mirrors.
    @ivar pypi_upstreams: simple-index base URLs without trailing slash nor
        user information, in priority order.
    @ivar upstream_credentials: credentials sent to the mirror and index
        upstreams (by origin), from their URLs' user information or the
        netrc file.
    @ivar netrc_file: the netrc file they were read from, if any.
    @ivar log_format: C{"text"} or C{"json"}.
    @ivar prefetch_max_size: largest distribution file fetched ahead once a
        client has read its metadata; 0 turns read-ahead off.
    @ivar max_connections_per_client: open connections one client address
        may hold on both ports together; one more is answered 503.
    @ivar max_object_size: largest body stored (squid's
        C{maximum_object_size}); larger ones are streamed to their clients,
        never stored nor spooled whole; 0: C{max_size}.
    """

    cache_dir: str = attrs.field(converter=_absolute_path)
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


# Value parsers.  Each raises ValueError with a message that does not name
# the option; Options prefixes the option's name.


def parse_size(text: str) -> int:
    """
    Parse a size in bytes: C{"500M"}, C{"20G"}, C{"1.5T"}, C{"1024K"},
    C{"1048576"}, optionally followed by C{B} or C{iB}.  Units are powers of
    1024 and case-insensitive.
    """
    size = parse_size_or_zero(text)
    if size <= 0:
        raise ValueError(f"{text!r} is not a positive size")
    return size


def parse_size_or_zero(text: str) -> int:
    """
    Parse a size as L{parse_size} does, zero included (C{"0"}, C{"0M"}).
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
    Write C{size} bytes in the largest unit that keeps it a whole number, as
    L{parse_size} reads it back: C{10737418240} becomes C{"10G"}.
    """
    for unit, power in sorted(_SIZE_UNITS.items(), key=lambda item: -item[1]):
        if power and size % 1024**power == 0:
            return f"{size // 1024**power}{unit}"
    return str(size)


def parse_duration(text: str) -> float:
    """
    Parse a non-negative duration in seconds: C{"300"}, C{"30s"}, C{"5m"},
    C{"1h"}, C{"1d"}, with an optional fraction (C{"1.5h"}).
    """
    match = _DURATION_PATTERN.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration (examples: 300, 30s, 5m, 1h)"
        )
    return float(match["number"]) * _DURATION_UNITS[match["unit"].lower()]


def parse_positive_duration(text: str) -> float:
    """
    Parse a duration as L{parse_duration} does, refusing zero.
    """
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return seconds


def parse_positive_count(text: str) -> int:
    """
    Parse a whole number greater than zero: C{"256"}.
    """
    stripped = text.strip()
    if not stripped.isdigit() or int(stripped) <= 0:
        raise ValueError(f"{text!r} is not a whole number greater than zero")
    return int(stripped)


def format_duration(seconds: float) -> str:
    """
    Write a duration as L{parse_duration} reads it back: C{300.0} becomes
    C{"300s"}.
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
    arguments, with the grammar of L{twisted.internet.endpoints}: fields are
    separated by C{:}, the first C{=} of a field makes it a keyword, and a
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
    Parse a listening address: a bare port number becomes C{"tcp:PORT"}; a
    server endpoint description (C{"tcp:8899:interface=127.0.0.1"},
    C{"tcp6:port=8899"}, C{"unix:/run/buildcache.sock"},
    C{"systemd:domain=INET:index=0"}) is checked and returned unchanged.
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
    Parse C{"NAME=URL"} into a L{Mirror}, and the credentials the URL's
    user information gave (taken off the mirror's URL).
    """
    name, separator, url = text.partition("=")
    if not separator:
        raise ValueError(f"{hide_userinfo(text)!r} is not NAME=URL")
    _check_mirror_name(None, None, name.strip())
    bare, credentials = split_http_url(url.strip())
    return Mirror(name=name.strip(), url=bare), credentials


def parse_netrc(path: str) -> tuple[str, NetrcCredentials]:
    """
    Read a netrc file (C{machine HOST login USER password PASS}): its
    absolute path and its entries.
    """
    path = _absolute_path(path)
    return path, read_netrc(path)


def parse_network(text: str) -> IPNetwork:
    """
    Parse an address or CIDR network (C{"10.0.0.0/8"}, C{"::1"}); host bits
    set in a CIDR are cleared (C{"10.1.2.3/8"} is C{10.0.0.0/8}).
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or network") from None


def parse_upstream_pattern(text: str) -> str:
    """
    Check an upstream pattern (see L{buildcache.access.UpstreamPattern}:
    a host glob such as C{"*.example.org"}, optionally with C{:port}; an IP
    address or network such as C{"10.0.0.0/8"}) and return it stripped.
    """
    pattern = text.strip()
    UpstreamPattern.parse(pattern)
    return pattern


# Environment-dependent defaults.


def default_cache_dir(environ: Mapping[str, str]) -> str:
    """
    The cache directory used when none is given: systemd's
    C{$CACHE_DIRECTORY} (the first, when it lists several), else
    C{$XDG_CACHE_HOME/buildcache}, else C{~/.cache/buildcache}.
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


def pip_configured_index_url() -> str | None:
    """
    The C{index-url} from pip's configuration files (what C{pip config get
    global.index-url} reports, C{[install]} taking precedence as it does for
    C{pip install}), or L{None} when pip is absent or sets none.
    """
    try:
        from pip._internal.configuration import Configuration

        configuration = Configuration(isolated=False)
        configuration.load()
        settings = dict(configuration.items())
    except Exception:
        # pip's internals are not an API: any failure means "unknown".
        return None
    for key in ("install.index-url", "global.index-url"):
        if settings.get(key):
            return str(settings[key])
    return None


def pip_builtin_index_url() -> str | None:
    """
    The index pip uses when nothing configures one, read from pip itself, or
    L{None} when pip is absent.
    """
    try:
        from pip._internal.models.index import PyPI

        return str(PyPI.simple_url)
    except Exception:
        return None


class NoPyPIUpstream(Exception):
    """
    No default PyPI upstream could be found, or the one found is unusable.
    """


def default_pypi_upstreams(
    environ: Mapping[str, str],
    configured_index_url: Callable[[], str | None] = pip_configured_index_url,
    builtin_index_url: Callable[[], str | None] = pip_builtin_index_url,
) -> tuple[str, ...]:
    """
    The index pip itself uses on this machine: C{$PIP_INDEX_URL}, else pip's
    configured C{index-url}, else pip's built-in default.

    @return: a one-element tuple holding that URL without trailing slash.
    @raise NoPyPIUpstream: when none is found or it is not http(s).
    """
    sources: list[tuple[str, Callable[[], str | None]]] = [
        ("PIP_INDEX_URL", lambda: environ.get("PIP_INDEX_URL") or None),
        ("pip's configured index-url", configured_index_url),
        ("pip's built-in default", builtin_index_url),
    ]
    for source, lookup in sources:
        url = lookup()
        if url:
            url = url.strip()
            try:
                check_http_url(url)
            except ValueError as error:
                raise NoPyPIUpstream(f"{source}: {error}") from None
            # With its user information, if any: the caller takes it off.
            return (_without_trailing_slash(url),)
    raise NoPyPIUpstream("pip is not installed and PIP_INDEX_URL is not set")


def prepare_cache_dir(path: str) -> str:
    """
    Create the cache directory if needed and check that files can be
    written in it.

    @return: its absolute path.
    @raise ValueError: naming the problem.
    """
    path = _absolute_path(path)
    try:
        os.makedirs(path, exist_ok=True)
        # Writing a file is the only check that also catches read-only
        # mounts and does not trust root's permission bypass.
        probe_fd, probe_path = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(probe_fd)
        os.unlink(probe_path)
    except OSError as error:
        raise ValueError(
            f"cannot use {path!r} as the cache directory: {error.strerror or error}"
        ) from None
    return path


def parse_log_format(text: str) -> str:
    """
    Check a log format name: C{"text"} or C{"json"}.
    """
    if text not in LOG_FORMATS:
        raise ValueError(f"{text!r} is not one of {', '.join(LOG_FORMATS)}")
    return text


def _coercer(option: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    Wrap C{parse} so that a bad value becomes a L{usage.UsageError} naming
    C{--option}.
    """

    def coerce(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise usage.UsageError(f"--{option}: {error}") from None

    return coerce


class Options(usage.Options):
    """
    buildcache's command line.  After L{parseOptions}, C{self.config} holds
    the resulting L{Config}.

    @param environ: the environment the defaults are read from
        (C{os.environ} when omitted).
    """

    longdesc = (
        "Caching proxy for Alpine apk, Debian apt and pip on one box. "
        "Sizes take K/M/G/T suffixes (powers of 1024); durations take "
        "s/m/h/d suffixes. Endpoints are a port number or a Twisted endpoint "
        "description such as tcp:8899:interface=127.0.0.1."
    )

    optParameters = [
        [
            "port",
            None,
            DEFAULT_PROXY_ENDPOINT,
            "Endpoint of the HTTP proxy and mirror routes.",
            _coercer("port", parse_endpoint),
        ],
        [
            "pypi-port",
            None,
            DEFAULT_INDEX_ENDPOINT,
            "Endpoint of the pip simple index.",
            _coercer("pypi-port", parse_endpoint),
        ],
        [
            "cache-dir",
            None,
            None,
            "Directory of the store, created if missing; $CACHE_DIRECTORY, "
            "else $XDG_CACHE_HOME/buildcache, else ~/.cache/buildcache.",
            _coercer("cache-dir", _absolute_path),
        ],
        [
            "max-size",
            None,
            DEFAULT_MAX_SIZE,
            "Size limit of the store (e.g. 500M, 20G, 1.5T).",
            _coercer("max-size", parse_size),
        ],
        [
            "max-object-size",
            None,
            0,
            "Largest object stored (e.g. 2G); larger ones are streamed to"
            " their clients, never stored; 0: as --max-size.",
            _coercer("max-object-size", parse_size_or_zero),
        ],
        [
            "index-ttl",
            None,
            DEFAULT_INDEX_TTL,
            "Seconds an index (APKINDEX, simple page) stays fresh (e.g. 300, 5m).",
            _coercer("index-ttl", parse_duration),
        ],
        [
            "upstream-timeout",
            None,
            DEFAULT_UPSTREAM_TIMEOUT,
            "Seconds an upstream may stay silent before the fetch fails.",
            _coercer("upstream-timeout", parse_positive_duration),
        ],
        [
            "prefetch-max-size",
            None,
            DEFAULT_PREFETCH_MAX_SIZE,
            "Largest distribution file fetched ahead once pip or uv has read"
            " its metadata (e.g. 32M); read-ahead pauses while 8 times this"
            " is fetched and not asked for; 0 turns read-ahead off.",
            _coercer("prefetch-max-size", parse_size_or_zero),
        ],
        [
            "max-connections-per-client",
            None,
            DEFAULT_MAX_CONNECTIONS_PER_CLIENT,
            "Open connections one client address may hold on both ports"
            " together; one more is answered 503 (per process).",
            _coercer("max-connections-per-client", parse_positive_count),
        ],
        [
            "log-format",
            None,
            DEFAULT_LOG_FORMAT,
            "Log output: text or json.",
            _coercer("log-format", parse_log_format),
        ],
        [
            "netrc",
            None,
            None,
            "netrc file (machine HOST login USER password PASS) with the"
            " credentials of mirror and pip upstreams, sent to that upstream"
            " only; a URL's own user:password@ wins.",
            _coercer("netrc", parse_netrc),
        ],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self._environ: Mapping[str, str] = (
            os.environ if environ is None else environ
        )
        # Method docstrings keep their line breaks and indentation; --help
        # wraps text itself.
        self.docs = {name: " ".join(doc.split()) for name, doc in self.docs.items()}
        self["cache-dir"] = self.defaults["cache-dir"] = default_cache_dir(
            self._environ
        )
        self["mirror"] = []
        self["allow-from"] = []
        self["allow-upstream"] = []
        self["pypi-upstream"] = []
        # Credentials from the URLs' user information, kept off the URLs:
        # (URL without it, credentials).
        self._url_credentials: list[tuple[str, Credentials]] = []
        # self.defaults only feeds --help: show values as they are written.
        self.defaults["max-size"] = format_size(DEFAULT_MAX_SIZE)
        self.defaults["prefetch-max-size"] = format_size(DEFAULT_PREFETCH_MAX_SIZE)
        self.defaults["index-ttl"] = format_duration(DEFAULT_INDEX_TTL)
        self.defaults["upstream-timeout"] = format_duration(
            DEFAULT_UPSTREAM_TIMEOUT
        )
        self.defaults["mirror"] = " ".join(
            f"{mirror.name}={mirror.url}" for mirror in DEFAULT_MIRRORS
        )
        self.defaults["allow-from"] = " ".join(
            str(network) for network in DEFAULT_ALLOW_FROM
        )
        self.defaults["allow-upstream"] = "any public host"
        self.defaults["netrc"] = "none (~/.netrc is not read unless given)"

    def opt_mirror(self, value: str) -> None:
        """
        Mirror route NAME=URL: /NAME/... on the proxy port is served from
        URL/... Repeatable; a NAME given here replaces the built-in one.
        """
        mirror, credentials = _coercer("mirror", parse_mirror)(value)
        if any(known.name == mirror.name for known in self["mirror"]):
            raise usage.UsageError(f"--mirror: {mirror.name!r} is given twice")
        self["mirror"].append(mirror)
        if credentials is not None:
            self._url_credentials.append((mirror.url, credentials))

    def opt_allow_from(self, value: str) -> None:
        """
        Client network (CIDR) allowed to use the server. Repeatable; giving
        any replaces the default list.
        """
        self["allow-from"].append(_coercer("allow-from", parse_network)(value))

    def opt_allow_upstream(self, value: str) -> None:
        """
        Limit the forward proxy to these upstreams (besides the mirrors and
        pip upstreams): a host glob (*.example.org) with an optional :port,
        or an IP network; a listed loopback or private target is allowed.
        Repeatable. Without any: every host with a public address.
        """
        self["allow-upstream"].append(
            _coercer("allow-upstream", parse_upstream_pattern)(value)
        )

    def opt_pypi_upstream(self, value: str) -> None:
        """
        Simple-index URL to mirror, in priority order: the first that has a
        project serves all of it. Repeatable; the default is the index pip
        uses here (PIP_INDEX_URL, pip's index-url setting, pip's default).
        """
        url, credentials = _coercer("pypi-upstream", split_http_url)(value.strip())
        url = _without_trailing_slash(url)
        self["pypi-upstream"].append(url)
        if credentials is not None:
            self._url_credentials.append((url, credentials))

    def getUsage(self, width: int | None = None) -> str:
        # Resolved here, not in __init__, so that only --help and errors pay
        # for importing pip's configuration code.
        if "pypi-upstream" not in self.defaults:
            try:
                upstreams = " ".join(default_pypi_upstreams(self._environ))
            except NoPyPIUpstream as error:
                upstreams = f"none ({error})"
            # $PIP_INDEX_URL may carry a token; --help must not show it.
            upstreams = hide_userinfo(upstreams)
            self.defaults["pypi-upstream"] = upstreams
        return super().getUsage(width)

    def postOptions(self) -> None:
        """
        Resolve the remaining defaults, create the cache directory, and build
        C{self.config}.
        """
        pypi_upstreams = tuple(self["pypi-upstream"])
        url_credentials = list(self._url_credentials)
        if not pypi_upstreams:
            try:
                defaults = default_pypi_upstreams(self._environ)
            except NoPyPIUpstream as error:
                raise usage.UsageError(
                    f"--pypi-upstream: no default ({error}); give one"
                ) from None
            split = [split_userinfo(url) for url in defaults]
            pypi_upstreams = tuple(url for url, _ in split)
            url_credentials += [
                (url, credentials) for url, credentials in split
                if credentials is not None
            ]
        if self["max-object-size"] > self["max-size"]:
            raise usage.UsageError(
                f"--max-object-size {format_size(self['max-object-size'])} is"
                f" larger than --max-size {format_size(self['max-size'])}: an"
                " object that large could never be kept; give a smaller one,"
                " or 0 for --max-size"
            )
        given_mirrors: list[Mirror] = self["mirror"]
        given_names = {mirror.name for mirror in given_mirrors}
        mirrors = tuple(
            mirror for mirror in DEFAULT_MIRRORS if mirror.name not in given_names
        ) + tuple(given_mirrors)
        cache_dir = _coercer("cache-dir", prepare_cache_dir)(self["cache-dir"])
        netrc_file, netrc_entries = self["netrc"] or (None, None)
        own = dict(url_credentials)
        credentials = UpstreamCredentials.build(
            [(url, own.get(url)) for url in [m.url for m in mirrors] + list(pypi_upstreams)],
            netrc_entries,
        )
        self.config = Config(
            cache_dir=cache_dir,
            proxy_endpoint=self["port"],
            index_endpoint=self["pypi-port"],
            max_size=self["max-size"],
            index_ttl=self["index-ttl"],
            upstream_timeout=self["upstream-timeout"],
            mirrors=mirrors,
            allow_from=tuple(self["allow-from"]) or DEFAULT_ALLOW_FROM,
            allow_upstream=tuple(self["allow-upstream"]),
            pypi_upstreams=pypi_upstreams,
            log_format=self["log-format"],
            prefetch_max_size=self["prefetch-max-size"],
            max_connections_per_client=self["max-connections-per-client"],
            upstream_credentials=credentials,
            netrc_file=netrc_file,
            max_object_size=self["max-object-size"],
        )
        if self.config.log_format == "json" and self.parent is not None:
            # twistd builds its log observer from its own "logger" option
            # after parsing the command line, so setting it here makes the
            # whole process (twistd's lines too) log JSON.
            logfile = self.parent.get("logfile")
            if not logfile and not self.parent.get("nodaemon"):
                # What twistd itself writes to once it has daemonized.
                logfile = "twistd.log"
            use_logfile(logfile)
            self.parent["logger"] = JSON_OBSERVER
