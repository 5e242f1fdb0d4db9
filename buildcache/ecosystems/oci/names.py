"""
The URL space of the registry port: parsing a ``/v2/...`` request into an
:class:`OciRequest`, checking its names against the distribution spec's
grammar, choosing the upstream registry it goes to, and the store key and
upstream URL it is served with.

Which upstream serves a request (the issue's order):

1. containerd's ``?ns=<registry>`` (a NAME or one of its aliases: Docker
   Hub's other host names, given by the configuration);
2. else a first path segment naming a configured registry (a NAME has a
   ``.`` or a ``:``, or is ``localhost``, as docker's own rule for host
   names: it never collides with a Docker Hub namespace), for mirrors with
   a path (podman's ``location = "box:5000/quay.io"``);
3. else ``docker.io``, with ``library/`` for one-word names, as docker
   does (the only form dockerd's ``registry-mirrors`` sends).

A registry that is not configured is refused (:class:`NameRefused`): the
port is never an open proxy.  This module is pure: no Twisted, no I/O.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote, unquote, urlencode

from attrs import frozen

__all__ = [
    "DOCKER_HUB",
    "Endpoint",
    "Selection",
    "OciRequest",
    "NameRefused",
    "parse_request",
    "canonical_registry",
    "looks_like_registry",
    "is_valid_repository",
    "is_valid_tag",
    "is_valid_digest",
    "digest_algorithm",
    "KEY_PREFIX",
]

#: The configured NAME of Docker Hub.
DOCKER_HUB = "docker.io"
#: Every store key of the registry front end starts with this.
KEY_PREFIX = "oci:"

#: Longest repository name (docker's limit on a whole reference's name).
MAX_NAME_LENGTH = 255
#: Longest query string kept (tags/list's ``n`` and ``last``, referrers'
#: ``artifactType``).
MAX_QUERY_LENGTH = 512

# The distribution spec's grammar (spec.md, "Pulling manifests").
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}")
_DIGEST = re.compile(r"(?P<algorithm>[a-z0-9]+(?:[+._-][a-z0-9]+)*):(?P<encoded>[a-zA-Z0-9=_-]+)")
#: Algorithms the cache can check, and the length of their hex digests.
_KNOWN_DIGESTS = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[a-f0-9]+")
# A registry NAME: a host (name or address, IPv6 bracketed) and a port.
_REGISTRY = re.compile(r"(?:\[[0-9a-fA-F:.]+\]|[a-zA-Z0-9.-]+)(?::[0-9]{1,5})?")

_ROUTES = (
    ("manifests", re.compile(r"/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)")),
    ("blobs", re.compile(r"/v2/(?P<name>.+)/blobs/(?P<ref>[^/]+)")),
    ("tags", re.compile(r"/v2/(?P<name>.+)/tags/list")),
    ("referrers", re.compile(r"/v2/(?P<name>.+)/referrers/(?P<ref>[^/]+)")),
)


class Endpoint(enum.Enum):
    """What a ``/v2/`` request asks for."""

    BASE = "base"
    MANIFEST = "manifests"
    BLOB = "blobs"
    TAGS = "tags"
    REFERRERS = "referrers"


class Selection(enum.Enum):
    """How the request named its upstream (kept for links back to this port)."""

    NS = "ns"
    PREFIX = "prefix"
    DEFAULT = "default"


class NameRefused(Exception):
    """
    A request this port cannot serve: ``status`` and the distribution
    spec's error ``code`` to answer with, and a one-line ``message``.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@frozen
class OciRequest:
    """
    One parsed request of the registry port.
    """

    endpoint: Endpoint
    #: The configured NAME of the upstream (``docker.io``, ``127.0.0.1:5001``).
    registry: str
    #: The repository on that registry (``library/alpine``); empty for BASE.
    repository: str = ""
    #: A tag or digest (manifests), a digest (blobs, referrers), else None.
    reference: str | None = None
    #: The query sent upstream and kept in the key (``ns`` taken off),
    #: its pairs sorted.
    query: str = ""
    selection: Selection = Selection.DEFAULT
    #: The name as the client wrote it (path prefix included), for links.
    client_name: str = ""

    @property
    def name(self) -> str:
        """``<registry>/<repository>``: the exchange's name for accounting."""
        return f"{self.registry}/{self.repository}"

    @property
    def by_digest(self) -> bool:
        """Whether the reference is a digest (a manifest by digest, a blob)."""
        return self.reference is not None and ":" in self.reference

    def path(self) -> str:
        """The path of this request on the upstream registry."""
        if self.endpoint is Endpoint.BASE:
            return "/v2/"
        if self.endpoint is Endpoint.TAGS:
            return f"/v2/{self.repository}/tags/list"
        return f"/v2/{self.repository}/{self.endpoint.value}/{self.reference}"

    def upstream_url(self, base: str) -> str:
        """This request's URL on the registry whose base URL is ``base``."""
        url = base.rstrip("/") + self.path()
        return f"{url}?{self.query}" if self.query else url

    def key(self, accept_suffix: str = "") -> str:
        """
        The store key (see OCI_API.md "Keys"); ``accept_suffix`` is
        ``;accept=...`` for a manifest client accepting fewer types.
        """
        if self.endpoint is Endpoint.BLOB:
            # One copy of a layer, whatever repository or registry it is
            # asked from: its bytes are checked against the digest, and base
            # layers are shared by many images.
            return f"{KEY_PREFIX}blobs/{self.reference}"
        base = f"{KEY_PREFIX}{self.name}"
        if self.endpoint is Endpoint.TAGS:
            return f"{base}/tags/list" + (f"?{self.query}" if self.query else "")
        if self.endpoint is Endpoint.REFERRERS:
            return f"{base}/referrers/{self.reference}" + (
                f"?{self.query}" if self.query else ""
            )
        return f"{base}/{self.endpoint.value}/{self.reference}{accept_suffix}"

    def link_back(self, upstream_link: str) -> str | None:
        """
        The upstream's ``Link`` value for the next page of a tags list
        (``</v2/<repo>/tags/list?n=..&last=..>; rel="next"``), pointing
        back at this port in the upstream-selection form the client used
        (its path prefix, its ``?ns=``); None when it is not a link to
        this repository's listing.
        """
        if self.endpoint is not Endpoint.TAGS:
            return None
        match = re.fullmatch(r"\s*<([^>]*)>(.*)", upstream_link, re.DOTALL)
        if match is None:
            return None
        target, params = match.group(1), match.group(2)
        path, _, query = target.partition("?")
        if "://" in path:
            path = "/" + path.split("://", 1)[1].partition("/")[2]
        # An upstream under a path prefix links under it too.
        if not unquote(path).endswith(self.path()):
            return None
        pairs = [
            (k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "ns"
        ]
        if self.selection is Selection.NS:
            pairs.append(("ns", self.registry))
        new_query = urlencode(pairs)
        local = f"/v2/{self.client_name}/tags/list"
        return f"<{local}{'?' + new_query if new_query else ''}>{params}"


def canonical_registry(name: str, aliases: Mapping[str, str]) -> str:
    """
    ``name`` as configured: lowercase, and an alias (Docker Hub's other
    host names, from the configuration) the NAME it stands for.
    """
    lowered = name.lower()
    return aliases.get(lowered, lowered)


def looks_like_registry(segment: str) -> bool:
    """
    Whether a first path segment names a registry host rather than a
    Docker Hub namespace (docker's rule: a ``.`` or ``:``, or
    ``localhost``).
    """
    return ("." in segment or ":" in segment or segment == "localhost") and bool(
        _REGISTRY.fullmatch(segment)
    )


def is_valid_repository(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and _NAME.fullmatch(name) is not None


def is_valid_tag(tag: str) -> bool:
    return _TAG.fullmatch(tag) is not None


def is_valid_digest(digest: str) -> bool:
    """Whether ``digest`` has the spec's digest form (any algorithm)."""
    return len(digest) <= 256 and _DIGEST.fullmatch(digest) is not None


def digest_algorithm(digest: str) -> tuple[str, str] | None:
    """
    ``(algorithm, hex)`` of a digest the cache can check (sha256, sha512,
    lowercase hex of the right length), else None.
    """
    algorithm, _, encoded = digest.partition(":")
    length = _KNOWN_DIGESTS.get(algorithm)
    if length is None or len(encoded) != length or not _HEX.fullmatch(encoded):
        return None
    return algorithm, encoded


def _query_pairs(query: str) -> list[tuple[str, str]]:
    if len(query) > MAX_QUERY_LENGTH:
        raise NameRefused(400, "UNSUPPORTED", "the query string is too long")
    try:
        return parse_qsl(query, keep_blank_values=True, max_num_fields=16)
    except ValueError:
        raise NameRefused(400, "UNSUPPORTED", "the query string has too many fields") from None


def _choose_upstream(
    name: str, ns: str | None, registries: Mapping[str, str],
    aliases: Mapping[str, str],
) -> tuple[str, str, Selection]:
    """
    ``(registry, repository, selection)`` for the client's ``name``.
    """
    if ns is not None:
        registry = canonical_registry(ns, aliases)
        if registry not in registries:
            raise NameRefused(
                404, "NAME_UNKNOWN",
                f"registry {ns[:100]!r} (?ns=) is not configured on this cache;"
                " an operator adds it with --registry NAME=URL",
            )
        repository, selection = name, Selection.NS
    else:
        first, _, rest = name.partition("/")
        if rest and looks_like_registry(first):
            registry = canonical_registry(first, aliases)
            if registry not in registries:
                raise NameRefused(
                    404, "NAME_UNKNOWN",
                    f"registry {first[:100]!r} (the first path segment) is not"
                    " configured on this cache; an operator adds it with"
                    " --registry NAME=URL",
                )
            repository, selection = rest, Selection.PREFIX
        else:
            if DOCKER_HUB not in registries:
                raise NameRefused(
                    404, "NAME_UNKNOWN",
                    "docker.io is not configured on this cache, and the request"
                    " names no configured registry (?ns= or a first path segment)",
                )
            registry, repository, selection = DOCKER_HUB, name, Selection.DEFAULT
    if registry == DOCKER_HUB and "/" not in repository:
        repository = f"library/{repository}"
    if not is_valid_repository(repository):
        raise NameRefused(
            400, "NAME_INVALID",
            f"invalid repository name {repository[:100]!r}: lowercase"
            " components of letters and digits separated by '/', '.', '_' or '-'",
        )
    return registry, repository, selection


def parse_request(
    path: str, query: str, registries: Mapping[str, str],
    aliases: Mapping[str, str] = {},
) -> OciRequest:
    """
    The request for the percent-encoded ``path`` and raw ``query`` of a
    request target, with ``registries`` the configured NAME -> base URL
    and ``aliases`` other names of some (``index.docker.io`` ->
    ``docker.io``).

    :raise NameRefused: not a path of the pull API, an invalid name, tag
        or digest, or a registry that is not configured.
    """
    path = unquote(path)
    pairs = _query_pairs(query)
    ns_values = [v for k, v in pairs if k == "ns"]
    ns = ns_values[0] if ns_values else None
    kept = sorted((k, v) for k, v in pairs if k != "ns")
    if path in ("/v2", "/v2/"):
        registry = canonical_registry(ns, aliases) if ns is not None else DOCKER_HUB
        return OciRequest(Endpoint.BASE, registry)
    for route, pattern in _ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        client_name = match["name"]
        if len(client_name) > MAX_NAME_LENGTH + 64:
            raise NameRefused(400, "NAME_INVALID", "the repository name is too long")
        registry, repository, selection = _choose_upstream(client_name, ns, registries, aliases)
        if route == "tags":
            return OciRequest(
                Endpoint.TAGS, registry, repository, None,
                urlencode([(k, v) for k, v in kept if k in ("n", "last")]),
                selection, client_name,
            )
        reference = match["ref"]
        if route == "manifests":
            if not (is_valid_tag(reference) or is_valid_digest(reference)):
                raise NameRefused(
                    404, "MANIFEST_UNKNOWN",
                    f"invalid tag or digest {reference[:140]!r}",
                )
            endpoint = Endpoint.MANIFEST
        else:
            if not is_valid_digest(reference):
                raise NameRefused(
                    400, "DIGEST_INVALID", f"invalid digest {reference[:140]!r}"
                )
            endpoint = Endpoint.BLOB if route == "blobs" else Endpoint.REFERRERS
        if ":" in reference and digest_algorithm(reference) is None:
            raise NameRefused(
                400, "DIGEST_INVALID",
                f"digest {reference[:140]!r}: this cache checks sha256 and sha512"
                " digests (lowercase hex) only",
            )
        query_kept = (
            urlencode([(k, v) for k, v in kept if k == "artifactType"])
            if endpoint is Endpoint.REFERRERS else ""
        )
        return OciRequest(
            endpoint, registry, repository, reference, query_kept, selection, client_name
        )
    raise NameRefused(
        404, "NAME_UNKNOWN" if path.startswith("/v2/") else "UNSUPPORTED",
        f"no such endpoint on this registry: {quote(path[:200])}; it serves the"
        " pull side of the distribution API under /v2/",
    )
