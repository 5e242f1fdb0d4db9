"""
The package proxy on ``--port``: a caching HTTP forward proxy for
absolute-URI requests (apk, apt, curl with ``HTTP_PROXY``) and mirror
routes for origin-form requests (``/alpine/v3.20/main/...``), answered
from the shared store.

This module owns the translation from an HTTP request to a target URL and
cache key (:class:`Router`), the choice of the ecosystem policy that
serves it (apt, apk, pip files, else generic RFC 9111), and the proxy's own
headers (``Via``, ``Connection: keep-alive``).  The cache flow (lookup,
freshness, revalidation, stale serving, the miss, the response) is the
engine's (:mod:`buildcache.engine.core`); package-format knowledge is in
:mod:`buildcache.ecosystems`; CONNECT in :mod:`buildcache.frontends.tunnel`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Protocol as TypingProtocol
from urllib.parse import unquote, urlsplit

from attrs import frozen
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.access import AccessPolicy
from buildcache.credentials import redact
from buildcache.engine.core import Engine
from buildcache.engine.events import StatusPages
from buildcache.engine.keys import cache_key
from buildcache.engine.policy import (
    GENERIC,
    GenericPolicy,
    Policy,
    Target,
    kind_by_rules,
)
from buildcache.engine.respond import request_headers

VIA = "1.1 buildcache"
#: Decoding rounds a mirror path may need before it stops changing: one
#: for the request, one for a file name holding a literal ``%``; more
#: is only ever an attack, and each round costs a pass over the path.
_MAX_DECODING_ROUNDS = 3
#: A request target: printable ASCII only (twisted.web lets some bytes
#: above 0x7e through).
_REQUEST_TARGET = re.compile(r"[\x21-\x7e]+")
#: Client request headers passed on to the upstream.  A response to a
#: request with the client's credentials among them is private to those
#: credentials (see :func:`buildcache.engine.freshness.client_credentials`).
FORWARDED_HEADERS = (
    "user-agent", "accept", "authorization", "cookie", "accept-language"
)


def client_headers(headers: Mapping[str, str], proxied: bool) -> dict[str, str]:
    """
    The headers of a request as the cache judges and forwards them.  A
    mirror route (``/NAME/...``) is a path on this box, so a ``Cookie`` the
    client sends there is the box's host's (a browser sends any
    ``localhost`` application's session): it is neither forwarded to the
    mirror nor a credential that makes the response private.  Only a
    forward-proxy request (an absolute URL, ``proxied``) names the host its
    cookies are for.  ``Authorization`` is sent on purpose and is kept on
    both.
    """
    if proxied:
        return dict(headers)
    return {name: value for name, value in headers.items() if name != "cookie"}


class MirrorRoute(TypingProtocol):
    """
    A mirror route (see :class:`buildcache.config.Mirror`): requests for
    ``/NAME/...`` are served from ``URL/...``.
    """

    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str: ...


class BadTarget(Exception):
    """
    The request names no URL this proxy may fetch; the message says why.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


_PACKAGE_SUFFIXES = (".apk", ".deb", ".udeb", ".whl", ".tar.gz", ".zip", ".rpm")


def package_name(uri: str) -> str | None:
    """
    The package file a request is for (its last path segment), for the
    most-requested table; None for indexes and other files.
    """
    try:
        path = urlsplit(uri).path if not uri.startswith("/") else uri.partition("?")[0]
    except ValueError:
        # Not a URL (an unbalanced "[" in the host): the router refuses it.
        return None
    last = unquote(path.rsplit("/", 1)[-1])
    return last if last.endswith(_PACKAGE_SUFFIXES) else None


#: Names a client may use for this box, besides its addresses.
OWN_NAMES = frozenset(
    {"localhost", "host.docker.internal", socket.gethostname().lower(),
     socket.getfqdn().lower()}
)


def names_this_box(
    request: Request, host: str, names: frozenset[str] = OWN_NAMES
) -> bool:
    """
    Whether ``host`` in an absolute URI names the box ``request`` reached:
    one of its names, the address the client connected to, or loopback.
    """
    host = host.lower().rstrip(".")
    if host in names or host == getattr(request.getHost(), "host", None):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class IndexServer(TypingProtocol):
    """
    The pip index front end, as the proxy forwards to it.
    """

    def serve(self, request: Request, path: str) -> None: ...


@frozen
class OwnIndex:
    """
    Recognises requests for this box's own index port, whatever name or
    address the client used for the box: a client with ``HTTP_PROXY``
    pointing here sends its index requests here too, and without this they
    would be refused as loopback or private targets.
    """

    server: IndexServer
    port: int
    names: frozenset[str] = OWN_NAMES

    def addressed(self, request: Request, host: str, port: int) -> bool:
        return port == self.port and names_this_box(request, host, self.names)


@frozen
class Route:
    """
    Where a request goes: the upstream URL, its cache key, and the route
    ("proxy" or the mirror's name).
    """

    url: str
    key: str
    route: str


def _checked_path(rest: str) -> None:
    """
    Refuse a mirror sub-path that could climb out of the mirror's base,
    however it is encoded: percent-encoded once or several times, with
    backslashes or NUL, as ``..;param`` (which Java servers read as
    ``..``), as compatibility forms of the dot (U+FF0E, U+2024, which
    NFKC turns into ``.``), or with bytes that are not UTF-8 (overlong forms of
    ``.`` and ``/``).
    """
    decoded = rest
    for _ in range(_MAX_DECODING_ROUNDS):
        if "\x00" in decoded or "\\" in decoded:
            raise BadTarget(400, "path contains a NUL byte or a backslash")
        for segment in decoded.split("/"):
            bare = unicodedata.normalize("NFKC", segment.split(";", 1)[0])
            if bare in ("..", "."):
                raise BadTarget(400, "path contains a '.' or '..' segment")
        try:
            once_more = unquote(decoded, errors="strict")
        except UnicodeDecodeError:
            raise BadTarget(400, "path is not percent-encoded UTF-8") from None
        if once_more == decoded:
            return
        decoded = once_more
    raise BadTarget(400, "path is percent-encoded too many times")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _port_of(port: int | None) -> int:
    """
    The port of an ``http://`` URL (``urlsplit``'s, which lets 0 through).

    :raises ValueError: port 0.
    """
    if port is None:
        return 80
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port}")
    return port


@frozen
class Router:
    """
    Turns a request target into an upstream URL, or refuses it.
    """

    mirrors: Sequence[MirrorRoute]
    policy: AccessPolicy

    def target(self, request: Request) -> Route:
        uri = request.uri.decode("latin-1")
        if _REQUEST_TARGET.fullmatch(uri) is None:
            raise BadTarget(400, "the request target holds bytes other than printable ASCII")
        if uri.startswith("/"):
            return self._mirror_target(uri)
        try:
            parts = urlsplit(uri)
            hostname = parts.hostname
        except ValueError:
            raise BadTarget(400, "the URL's host is not valid")
        if parts.scheme != "http":
            raise BadTarget(
                400,
                "only http:// URLs are proxied; https goes through CONNECT,"
                " or through a mirror route",
            )
        if not hostname:
            raise BadTarget(400, "the URL has no host")
        if parts.username is not None or parts.password is not None:
            raise BadTarget(400, "user information in proxied URLs is not accepted")
        try:
            port = _port_of(parts.port)
        except ValueError:
            raise BadTarget(400, "the URL has an invalid port")
        if port == getattr(request.getHost(), "port", None) and names_this_box(
            request, hostname
        ):
            # HTTP_PROXY points here and the repository URL is already a
            # mirror route on this port (apk after the Dockerfile's sed):
            # fetching it from ourselves would be refused as a loopback or
            # private target.
            query = f"?{parts.query}" if parts.query else ""
            return self._mirror_target((parts.path or "/") + query)
        verdict = self.policy.host_allowed(hostname, port)
        if verdict and _is_ip_literal(hostname):
            # An address needs no lookup: judge it here, as the connection
            # guard would, before a download is set up for it.
            verdict = self.policy.address_allowed(hostname, port, hostname)
        if not verdict:
            raise BadTarget(403, f"not an allowed upstream: {verdict.reason}")
        url = parts._replace(fragment="").geturl()
        return Route(url, cache_key(url), "proxy")

    def _mirror_target(self, uri: str) -> Route:
        if "#" in uri:
            # Not allowed in a request target, and the upstream request
            # would leave out what follows it: "/x/..#" would fetch "/x/..".
            raise BadTarget(400, "a request target has no fragment ('#')")
        name, _, rest = uri[1:].partition("/")
        for mirror in self.mirrors:
            if mirror.name == name:
                break
        else:
            known = ", ".join(f"/{m.name}/" for m in self.mirrors)
            raise BadTarget(
                404, f"no mirror route /{name}/ (routes: {known}); to proxy, send"
                " an absolute URL"
            )
        path, _, query = rest.partition("?")
        _checked_path(path)
        url = f"{mirror.url}/{path}" + (f"?{query}" if query else "")
        return Route(url, cache_key(url), mirror.name)


class ProxyResource(Resource):
    """
    Serves GET and HEAD through the cache engine; see the module docstring.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self, engine: Engine, router: Router, policies: Sequence[GenericPolicy]
    ) -> None:
        """
        :param policies: the ecosystems' policies, in the order their path
            rules are tried (the service builds them:
            :func:`buildcache.service.proxy_policies`).
        """
        super().__init__()
        self.engine = engine
        self.router = router
        self.policies = tuple(policies)
        #: Set once the index port is known (see :class:`OwnIndex`).
        self.own_index: OwnIndex | None = None
        self.status: StatusPages | None = None

    def policy_for(self, url: str) -> Policy:
        """
        The first of :attr:`policies` whose path rules match ``url``'s
        path, else the generic RFC 9111 one.
        """
        for policy in self.policies:
            if kind_by_rules(policy.rules, url) is not None:
                return policy
        return GENERIC

    def render(self, request: Request) -> object:
        client = request.getClientAddress()
        client_ip = getattr(client, "host", "")
        allowed = self.router.policy.client_allowed(client_ip)
        if allowed and self._serve_own_index(request):
            return NOT_DONE_YET
        if allowed and self.status is not None and request.uri.startswith(b"/"):
            path = request.uri.decode("latin-1").partition("?")[0]
            if path in self.status.paths:
                # Kept out of the activity figures it shows.
                self.status.serve(request, path)
                return NOT_DONE_YET
        self.engine.begin(
            request,
            "mirror" if request.uri.startswith(b"/") else "proxy",
            package_name(request.uri.decode("latin-1")),
        )
        if not allowed:
            self.log.warn("Refused client {client}", client=client_ip)
            self.engine.refuse(
                request, 403, f"client {client_ip} is not allowed to use this proxy"
            )
            return NOT_DONE_YET
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("allow", "GET, HEAD")
            self.engine.refuse(
                request, 405,
                f"{request.method.decode('latin-1')} is not served: this cache"
                " answers GET and HEAD (and CONNECT to port 443)",
            )
            return NOT_DONE_YET
        try:
            route = self.router.target(request)
        except BadTarget as e:
            self.log.info(
                "Refused {method} {uri}: {reason}",
                method=request.method.decode("latin-1"),
                uri=redact(request.uri.decode("latin-1")),
                reason=str(e),
            )
            self.engine.refuse(request, e.code, str(e))
            return NOT_DONE_YET
        request.setHeader("via", VIA)
        if request.clientproto == b"HTTP/1.1" and not (
            request.requestHeaders.getRawHeaders(b"connection", [b""])[0].lower()
            == b"close"
        ):
            # apk's libfetch reuses a connection only when it sees this.
            request.setHeader("connection", "keep-alive")
        self.engine.serve(
            request, self.engine_target(request, route), self.policy_for(route.url)
        )
        return NOT_DONE_YET

    @staticmethod
    def engine_target(request: Request, route: Route) -> Target:
        """
        What the engine serves for ``request`` routed to ``route``: a mirror
        route fetches with the operator's credentials and follows
        redirects; the forward proxy leaves both to its client.
        """
        proxied = route.route == "proxy"
        headers = client_headers(request_headers(request), proxied)
        forwarded = {k: headers[k] for k in FORWARDED_HEADERS if k in headers}
        forwarded["via"] = VIA
        return Target(
            url=route.url,
            front_end="proxy" if proxied else "mirror",
            headers=headers,
            upstream_headers=forwarded,
            key=route.key,
            follow_redirects=not proxied,
            operator_credentials=not proxied,
        )

    def _serve_own_index(self, request: Request) -> bool:
        if self.own_index is None or request.uri.startswith(b"/"):
            return False
        try:
            parts = urlsplit(request.uri.decode("latin-1"))
            hostname = parts.hostname
            port = _port_of(parts.port)
        except ValueError:
            return False
        if parts.scheme != "http" or not hostname:
            return False
        if not self.own_index.addressed(request, hostname, port):
            return False
        self.own_index.server.serve(request, parts.path or "/")
        return True
