"""
The command line of ``twistd buildcache`` (and ``buildcache.tac``).

This module owns :class:`Options`, the twistd ``usage.Options`` that turns
the command line into a :class:`~buildcache.config.Config`, and the
defaults that depend on the machine: the index pip itself uses
(:func:`default_pypi_upstreams`, read from pip's configuration) and the
cache directory, which :func:`prepare_cache_dir` creates.  The value
syntaxes and the configuration itself are :mod:`buildcache.config`'s.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.python import usage

from buildcache.access import DEFAULT_ALLOW_FROM
from buildcache.config import (
    DEFAULT_INDEX_ENDPOINT,
    DEFAULT_INDEX_TTL,
    DEFAULT_LOG_FORMAT,
    DEFAULT_MAX_SIZE,
    DEFAULT_MIRRORS,
    DEFAULT_PREFETCH_MAX_SIZE,
    DEFAULT_PROXY_ENDPOINT,
    DEFAULT_REGISTRIES,
    DEFAULT_REGISTRY_ENDPOINT,
    DEFAULT_SHARED_WAIT,
    DEFAULT_UPSTREAM_TIMEOUT,
    Config,
    Mirror,
    Registry,
    absolute_path,
    check_http_url,
    default_cache_dir,
    default_workers,
    format_duration,
    format_size,
    parse_duration,
    parse_endpoint,
    parse_log_format,
    parse_mirror,
    parse_netrc,
    parse_network,
    parse_positive_count,
    parse_positive_duration,
    parse_registry,
    parse_registry_auth,
    parse_size,
    parse_size_or_zero,
    parse_upstream_pattern,
    read_shared_secret,
    split_http_url,
    without_trailing_slash,
)
from buildcache.credentials import (
    Credentials,
    UpstreamCredentials,
    hide_userinfo,
    split_userinfo,
)
from buildcache.frontends.connections import DEFAULT_MAX_CONNECTIONS_PER_CLIENT
from buildcache.ops.logs import JSON_OBSERVER, TEXT_OBSERVER, use_logfile
from buildcache.shared.location import S3Location, parse_shared_store

__all__ = [
    "NoPyPIUpstream",
    "Options",
    "default_pypi_upstreams",
    "pip_builtin_index_url",
    "pip_configured_index_url",
    "prepare_cache_dir",
]


def pip_configured_index_url() -> str | None:
    """
    The ``index-url`` from pip's configuration files (what ``pip config get
    global.index-url`` reports, ``[install]`` taking precedence as it does for
    ``pip install``), or ``None`` when pip is absent or sets none.
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
    ``None`` when pip is absent.
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
    The index pip itself uses on this machine: ``$PIP_INDEX_URL``, else pip's
    configured ``index-url``, else pip's built-in default.

    :return: a one-element tuple holding that URL without trailing slash.
    :raise NoPyPIUpstream: when none is found or it is not http(s).
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
            return (without_trailing_slash(url),)
    raise NoPyPIUpstream("pip is not installed and PIP_INDEX_URL is not set")


def prepare_cache_dir(path: str) -> str:
    """
    Create the cache directory if needed and check that files can be
    written in it.

    :return: its absolute path.
    :raise ValueError: naming the problem.
    """
    path = absolute_path(path)
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


def _coercer(option: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """
    Wrap ``parse`` so that a bad value becomes a
    :class:`~twisted.python.usage.UsageError` naming
    ``--option``.
    """

    def coerce(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise usage.UsageError(f"--{option}: {error}") from None

    return coerce


def _shared_store(text: str) -> S3Location:
    """
    :func:`parse_shared_store`, its refusal a
    :class:`~twisted.python.usage.UsageError` (its messages name the
    option already).
    """
    try:
        return parse_shared_store(text)
    except ValueError as error:
        message = str(error)
        if not message.startswith("--shared-store"):
            message = f"--shared-store: {message}"
        raise usage.UsageError(message) from None


class Options(usage.Options):
    """
    buildcache's command line.  After ``parseOptions``, ``self.config`` holds
    the resulting :class:`~buildcache.config.Config`.

    :param environ: the environment the defaults are read from
        (``os.environ`` when omitted).
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
            "registry-port",
            None,
            DEFAULT_REGISTRY_ENDPOINT,
            "Endpoint of the container registry cache (the pull side of the"
            " OCI distribution API at /v2/).",
            _coercer("registry-port", parse_endpoint),
        ],
        [
            "cache-dir",
            None,
            None,
            "Directory of the store, created if missing; $CACHE_DIRECTORY, "
            "else $XDG_CACHE_HOME/buildcache, else ~/.cache/buildcache.",
            _coercer("cache-dir", absolute_path),
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
            "Seconds an index (APKINDEX, simple page, an image's tag) stays"
            " fresh (e.g. 300, 5m).",
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
            " together; one more is answered 503 (counted across --workers).",
            _coercer("max-connections-per-client", parse_positive_count),
        ],
        [
            "workers",
            None,
            default_workers(),
            "Processes serving hits, this one included (by default one per"
            " CPU, at most 8): the others serve stored files from the same"
            " ports and hand everything else to this one; 1: one process.",
            _coercer("workers", parse_positive_count),
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
        [
            "shared-store",
            None,
            None,
            "An S3-compatible object store that several buildcache nodes"
            " share behind their own disks: s3://BUCKET/PREFIX?endpoint=URL"
            " (&region=R). Immutable files are shared; credentials come from"
            " the standard AWS environment variables and files.",
            _shared_store,
        ],
        [
            "shared-secret-file",
            None,
            None,
            "File holding a secret the nodes share (at least 16 bytes, mode"
            " 0600) that signs the shared store's records, so that write"
            " access to the bucket alone cannot poison the cache. Without it,"
            " only files with a digest of their own (pip's sha256, an image's"
            " digest, an APKINDEX entry) are shared.",
            _coercer("shared-secret-file", read_shared_secret),
        ],
        [
            "shared-max-size",
            None,
            None,
            "Size limit of the shared store's PREFIX (e.g. 500G): one node at"
            " a time removes the least recently used files.",
            _coercer("shared-max-size", parse_size),
        ],
        [
            "shared-wait",
            None,
            DEFAULT_SHARED_WAIT,
            "Seconds a download waits, at most, for the file another node is"
            " fetching before fetching it itself.",
            _coercer("shared-wait", parse_duration),
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
        self["registry"] = []
        # NAME -> (file, credentials).
        self["registry-auth"] = {}
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
        self.defaults["registry"] = " ".join(
            f"{registry.name}={registry.url}" for registry in DEFAULT_REGISTRIES
        )
        self.defaults["registry-auth"] = "none"
        self.defaults["shared-store"] = "none"
        self.defaults["shared-secret-file"] = "none"
        self.defaults["shared-max-size"] = "none"
        self.defaults["shared-wait"] = format_duration(DEFAULT_SHARED_WAIT)

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

    def opt_registry(self, value: str) -> None:
        """
        Upstream registry NAME=URL of the registry port (NAME has a '.' or
        a ':', or is localhost). Clients select it with ?ns=NAME
        (containerd) or a first path segment NAME/ (podman mirrors with a
        path); other requests go to docker.io. Repeatable; a NAME given
        here replaces the built-in one.
        """
        registry = _coercer("registry", parse_registry)(value)
        if any(known.name == registry.name for known in self["registry"]):
            raise usage.UsageError(f"--registry: {registry.name!r} is given twice")
        self["registry"].append(registry)

    def opt_registry_auth(self, value: str) -> None:
        """
        NAME=FILE: the user and password (one line USER:PASSWORD, mode
        0600) for registry NAME's token service. Every client allowed to
        use the cache can then pull what they can read. Repeatable.
        """
        name, path, credentials = _coercer("registry-auth", parse_registry_auth)(value)
        if name in self["registry-auth"]:
            raise usage.UsageError(f"--registry-auth: {name!r} is given twice")
        self["registry-auth"][name] = (path, credentials)

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
        url = without_trailing_slash(url)
        self["pypi-upstream"].append(url)
        if credentials is not None:
            self._url_credentials.append((url, credentials))

    def _registries(self) -> tuple[Registry, ...]:
        """
        The built-in registries not replaced, then those given, each with
        its --registry-auth credentials.
        """
        given: list[Registry] = self["registry"]
        given_names = {registry.name for registry in given}
        registries = tuple(
            registry for registry in DEFAULT_REGISTRIES if registry.name not in given_names
        ) + tuple(given)
        auth: dict[str, tuple[str, Credentials]] = self["registry-auth"]
        names = {registry.name for registry in registries}
        for name in auth:
            if name not in names:
                raise usage.UsageError(
                    f"--registry-auth: {name!r} is not a configured registry"
                    " (give it with --registry NAME=URL)"
                )
        return tuple(
            attrs.evolve(registry, credentials=auth[registry.name][1])
            if registry.name in auth else registry
            for registry in registries
        )

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
        ``self.config``.
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
        registries = self._registries()
        shared_store: S3Location | None = self["shared-store"]
        secret_file, secret = self["shared-secret-file"] or (None, None)
        if shared_store is None:
            for option in ("shared-secret-file", "shared-max-size"):
                if self[option] is not None:
                    raise usage.UsageError(
                        f"--{option} is given without --shared-store"
                    )
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
            registry_endpoint=self["registry-port"],
            registries=registries,
            registry_auth_files=tuple(
                path for path, _ in self["registry-auth"].values()
            ),
            shared_store=shared_store,
            shared_secret=secret,
            shared_secret_file=secret_file,
            shared_max_size=self["shared-max-size"],
            shared_wait=self["shared-wait"],
            workers=self["workers"],
        )
        parent = self.parent
        if parent is None:
            return
        if self.config.log_format == "json":
            # twistd builds its log observer from its own "logger" option
            # after parsing the command line, so setting it here makes the
            # whole process (twistd's lines too) log JSON.
            observer = JSON_OBSERVER
        elif (
            parent.get("logger") is None
            and not parent.get("syslog")
            and (parent.get("logfile") != "-" or parent.get("nodaemon"))
        ):
            # twistd's text observer, made cheaper (an access line per
            # request): the same lines to the same file (see
            # buildcache.ops.logs.text_observer).  Syslog, a --logger of
            # one's own, and twistd's refusal of a daemon's "-" stay twistd's.
            observer = TEXT_OBSERVER
        else:
            return
        logfile = parent.get("logfile")
        if not logfile and not parent.get("nodaemon"):
            # What twistd itself writes to once it has daemonized.
            logfile = "twistd.log"
        use_logfile(logfile)
        parent["logger"] = observer
