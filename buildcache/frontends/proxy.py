"""
The package proxy on ``--port``: a caching HTTP forward proxy for
absolute-URI requests (apk, apt, curl with ``HTTP_PROXY``) and mirror
routes for origin-form requests (``/alpine/v3.20/main/...``), answered
from the shared store.

This module owns the translation from an HTTP request to a target URL and
cache key, the order of cache decisions (hit, revalidate, stale, miss) and
the proxy's own headers (``Via``, ``X-Cache``, ``Connection: keep-alive``).
Package-format knowledge lives in :mod:`buildcache.engine.freshness`; CONNECT in
:mod:`buildcache.frontends.tunnel`.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Protocol as TypingProtocol
from urllib.parse import unquote, urlsplit

import attrs
from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from buildcache.access import AccessPolicy
from buildcache.credentials import redact
from buildcache.ecosystems.apk.check import (
    ApkIndexes,
    stored_package_matches,
    verifier_for,
)
from buildcache.ecosystems.apk.index import ApkFacts, repository_index_url, stale_reason
from buildcache.ecosystems.apt.policy import RULES as APT_RULES
from buildcache.ecosystems.pypi.kinds import RULES as PIP_RULES
from buildcache.engine.events import CacheObserver, StatusPages
from buildcache.engine.freshness import (
    Decision,
    Kind,
    client_cache_control,
    client_credentials,
    decide,
    effective_kind,
    is_storable,
    may_serve_stale,
    validators_of,
)
from buildcache.engine.keys import (
    adopt_twin,
    cache_key,
    find_stored,
    http_twin,
    open_stored,
    private_family,
)
from buildcache.engine.policy import kind_by_rules, rule
from buildcache.engine.respond import (
    CacheStatus,
    request_headers,
    send_error,
    serve_answer,
    serve_head,
    serve_stored,
)
from buildcache.fetch.connect import TargetRefused
from buildcache.fetch.fetcher import (
    STREAM_CHECKED_ABOVE,
    Fetcher,
    UpstreamAnswer,
    UpstreamError,
    UpstreamRequest,
    drained,
)
from buildcache.store import IntegrityError, Store, StoredObject

VIA = "1.1 buildcache"
_APK_RULES = (rule(r"(?:^|/)APKINDEX\.tar\.gz$", Kind.INDEX), rule(r"[^/]\.apk$", Kind.IMMUTABLE))


def classify(path: str) -> Kind:
    return kind_by_rules(APT_RULES + _APK_RULES + PIP_RULES, path) or Kind.HTTP
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
class Target:
    url: str
    #: The key of the URL; for a private request, of its credentials'
    #: entries (see :meth:`ProxyResource._for_client`).
    key: str
    kind: Kind
    route: str  # "proxy" or the mirror's name
    #: The request carries the client's credentials.
    private: bool = False


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

    @raise ValueError: port 0.
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

    def target(self, request: Request) -> Target:
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
        return Target(url, cache_key(url), classify(parts.path), "proxy")

    def _mirror_target(self, uri: str) -> Target:
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
        return Target(url, cache_key(url), classify("/" + path), mirror.name)


class ProxyResource(Resource):
    """
    Serves GET and HEAD through the store; see the module docstring.
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        store: Store,
        fetcher: Fetcher,
        router: Router,
        index_ttl: float,
    ) -> None:
        super().__init__()
        self.store = store
        self.fetcher = fetcher
        self.router = router
        self.index_ttl = index_ttl
        self.apk_indexes = ApkIndexes(store)
        #: Set once the index port is known (see :class:`OwnIndex`).
        self.own_index: OwnIndex | None = None
        self.activity: CacheObserver | None = None
        self.status: StatusPages | None = None

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
        if self.activity is not None:
            self.activity.track(
                request,
                "mirror" if request.uri.startswith(b"/") else "proxy",
                package_name(request.uri.decode("latin-1")),
            )
        if not allowed:
            self.log.warn("Refused client {client}", client=client_ip)
            send_error(request, 403, f"client {client_ip} is not allowed to use this proxy")
            return NOT_DONE_YET
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader("allow", "GET, HEAD")
            send_error(
                request, 405,
                f"{request.method.decode('latin-1')} is not served: this cache"
                " answers GET and HEAD (and CONNECT to port 443)",
            )
            return NOT_DONE_YET
        try:
            target = self.router.target(request)
        except BadTarget as e:
            self.log.info(
                "Refused {method} {uri}: {reason}",
                method=request.method.decode("latin-1"),
                uri=redact(request.uri.decode("latin-1")),
                reason=str(e),
            )
            send_error(request, e.code, str(e))
            return NOT_DONE_YET
        request.setHeader("via", VIA)
        if request.clientproto == b"HTTP/1.1" and not (
            request.requestHeaders.getRawHeaders(b"connection", [b""])[0].lower()
            == b"close"
        ):
            # apk's libfetch reuses a connection only when it sees this.
            request.setHeader("connection", "keep-alive")
        d = Deferred.fromCoroutine(self._serve(request, target))
        d.addErrback(self._crashed, request)
        return NOT_DONE_YET

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

    def _crashed(self, failure: Failure, request: Request) -> None:
        self.log.failure("Proxy failed on {uri}", failure, uri=request.uri)
        if not request.startedWriting:
            send_error(request, 500, "internal error")
        else:
            request.loseConnection()

    def _upstream_request(
        self,
        target: Target,
        headers: Mapping[str, str],
        conditional: Mapping[str, str],
        apk_entry: ApkFacts | None,
        vouched: bool = True,
        revalidates: str | None = None,
    ) -> UpstreamRequest:
        """
        The upstream request for ``target``, checked against ``apk_entry``
        when there is one; an ``.apk`` no stored index vouches for is
        served but not ``vouched`` for storing.
        """
        forwarded = self._forwarded(headers)
        kind = target.kind

        def storable(status: int, response_headers: Mapping[str, str]) -> bool:
            return vouched and is_storable(kind, status, response_headers, headers)

        return UpstreamRequest(
            key=target.key,
            url=target.url,
            headers={**forwarded, **conditional},
            verify=verifier_for(apk_entry) if apk_entry is not None else None,
            # Small packages wait for their check (a mismatch is a clean
            # 502); large ones stream, all but their tail, so that many
            # clients of one cold package finish with the download.
            stream_before_check=(
                apk_entry is not None and apk_entry.size > STREAM_CHECKED_ABOVE
            ),
            storable=storable,
            follow_redirects=target.route != "proxy",
            variants=True,
            revalidates=revalidates,
            front_end="proxy" if target.route == "proxy" else "mirror",
            operator_credentials=target.route != "proxy",
            source_digest=(
                apk_entry.control_checksum if apk_entry is not None else None
            ),
        )

    @staticmethod
    def _forwarded(headers: Mapping[str, str]) -> dict[str, str]:
        forwarded = {k: headers[k] for k in FORWARDED_HEADERS if k in headers}
        forwarded["via"] = VIA
        return forwarded

    def _for_client(self, target: Target, headers: Mapping[str, str]) -> Target:
        """
        ``target`` as this client may see it: with the client's own
        credentials, its entries are keyed by them (an HMAC under the
        cache's secret) and only their own directives decide their life.
        """
        credentials = client_credentials(headers)
        if not credentials:
            return target
        return attrs.evolve(
            target,
            key=private_family(target.key, self.store.secret, credentials),
            kind=effective_kind(target.kind, True),
            private=True,
        )

    def _index_family(self, index_url: str, headers: Mapping[str, str]) -> str:
        """
        The key of the entries of an index as a client with ``headers``
        gets it: of its credentials, as for any of its requests.
        """
        return private_family(
            cache_key(index_url), self.store.secret, client_credentials(headers)
        )

    def _index_keys(self, headers: Mapping[str, str]) -> Callable[[str], str]:
        """
        Where the index at a URL that answers a client with ``headers`` is
        stored: the variant the proxy would serve it (see
        :func:`buildcache.fetch.fetcher.find_stored`), among its credentials'
        entries; what package checks read.
        """
        forwarded = self._forwarded(headers)

        def stored_key(index_url: str) -> str:
            family = self._index_family(index_url, headers)
            found = find_stored(self.store, family, forwarded)
            return family if found is None else found.key

        return stored_key

    async def _serve(self, request: Request, target: Target) -> None:
        headers = client_headers(request_headers(request), target.route == "proxy")
        index_url = repository_index_url(target.url) if ".apk" in target.url else None
        if index_url is not None:
            # An index just fetched may be being stored (apk asks for
            # packages right after their index); once it is, the packages it
            # now lists differently are dropped (once per version of it)
            # before one of them is served or checked against it.
            await self.fetcher.stored(self._index_family(index_url, headers))
            await self.apk_indexes.current(target.url, self._index_keys(headers))
        target = self._for_client(target, headers)
        stored = open_stored(self.store, target.key, self._forwarded(headers))
        if stored is not None:
            entry = stored.entry
            decision = decide(
                target.kind, entry.headers, entry.validated_at,
                self.store.clock.seconds(), headers, self.index_ttl,
            )
            if decision is Decision.FRESH:
                self.store.counters.hits += 1
                self._serve_stored(request, target, stored, CacheStatus.HIT)
                return
            await self._revalidate(request, target, headers, stored)
            return
        if request.method == b"HEAD" and not self.fetcher.downloading(target.key):
            await self._head(request, target, headers)
            return
        await self._miss(request, target, headers)

    async def _head(
        self, request: Request, target: Target, headers: Mapping[str, str]
    ) -> None:
        """
        A HEAD that missed goes upstream as a HEAD: nothing is fetched or
        stored for it (a HEAD that joins a running download shares it).
        An upstream that answers 405 or 501 to a HEAD is asked with a GET.
        """
        try:
            answer = await self.fetcher.head(
                self._upstream_request(target, headers, {}, None)
            )
        except UpstreamError as e:
            self.store.counters.misses += 1
            send_error(request, e.status, str(e))
            return
        if answer.status in (405, 501):
            # An upstream that does not do HEAD: a GET answers it, as it
            # did before HEADs went upstream as HEADs.
            await self._miss(request, target, headers)
            return
        self.store.counters.misses += 1
        serve_head(
            request, answer,
            cache_control=client_cache_control(
                target.kind, self.index_ttl, answer.headers, answer.status
            ),
        )

    def _serve_stored(
        self, request: Request, target: Target, stored: StoredObject,
        status: CacheStatus,
    ) -> None:
        serve_stored(
            request, stored, status,
            cache_control=client_cache_control(
                target.kind, self.index_ttl, stored.entry.headers
            ),
        )

    async def _revalidate(
        self, request: Request, target: Target, headers: Mapping[str, str],
        stored: StoredObject,
    ) -> None:
        upstream = self._upstream_request(
            target, headers, validators_of(stored.entry.headers), None,
            revalidates=stored.entry.key,
        )
        try:
            answer = await self.fetcher.fetch(upstream)
        except TargetRefused as e:
            stored.close()
            send_error(request, 403, str(e))
            return
        except UpstreamError as e:
            self._serve_stale(request, target, stored, str(e))
            return
        if answer.status == 304:
            stored.close()
            fresh = self.store.lookup(stored.entry.key)
            if fresh is None:
                await self._miss(request, target, headers)
                return
            self.store.counters.revalidations += 1
            self._serve_stored(request, target, fresh, CacheStatus.REVALIDATED)
            return
        if answer.status >= 500:
            assert answer.body is not None
            answer.body.close()
            self._serve_stale(request, target, stored, f"upstream answered {answer.status}")
            return
        stored.close()
        self.store.counters.misses += 1
        self._serve_answer(request, target, answer)

    def _serve_stale(
        self, request: Request, target: Target, stored: StoredObject, why: str
    ) -> None:
        if not may_serve_stale(stored.entry.headers, target.private):
            stored.close()
            send_error(
                request, 504,
                f"the upstream could not revalidate this private response ({why}),"
                " and its directives forbid serving it stale",
            )
            return
        self.log.warn(
            "Serving stale {key}: revalidation failed: {why}", key=target.key, why=why
        )
        if self.activity is not None:
            self.activity.stale_served(target.url)
        self.store.counters.hits += 1
        self._serve_stored(request, target, stored, CacheStatus.STALE)

    def _serve_answer(
        self, request: Request, target: Target, answer: UpstreamAnswer
    ) -> None:
        serve_answer(
            request, answer,
            cache_control=client_cache_control(
                target.kind, self.index_ttl, answer.headers, answer.status
            ),
        )

    async def _miss(
        self, request: Request, target: Target, headers: Mapping[str, str]
    ) -> None:
        # apk asks for packages right after their index, which may still
        # be being stored: _serve has waited for it.
        index_url = repository_index_url(target.url)
        apk_entry = await self.apk_indexes.entry_for(
            target.url, self._index_keys(headers)
        )
        if index_url is not None and apk_entry is None:
            # Its index was never fetched here, or is older than the
            # package: fetch or revalidate it, to check the package.
            apk_entry = await self._revalidated_index_entry(target, index_url, headers)
        if apk_entry is not None:
            adopted = await self._adopted_twin(target, headers, apk_entry)
            if adopted is not None:
                self.store.counters.hits += 1
                self._serve_stored(request, target, adopted, CacheStatus.HIT)
                return
        self.store.counters.misses += 1
        vouched = index_url is None or apk_entry is not None
        if not vouched:
            # Immutable once stored: a body nothing checked (an error page
            # sent as 200, say) would be served for good.
            self.log.info(
                "Serving {url} without storing it: its index does not list it",
                url=target.url,
            )
        try:
            answer = await self.fetcher.fetch(
                self._upstream_request(target, headers, {}, apk_entry, vouched)
            )
        except IntegrityError as e:
            if apk_entry is None:
                send_error(request, 502, f"upstream sent a bad body: {e}")
                return
            answer_or_none = await self._retry_with_fresh_index(
                request, target, headers, apk_entry, str(e)
            )
            if answer_or_none is None:
                return
            answer = answer_or_none
        except UpstreamError as e:
            send_error(request, e.status, str(e))
            return
        self._serve_answer(request, target, answer)

    async def _adopted_twin(
        self, target: Target, headers: Mapping[str, str], apk_entry: ApkFacts
    ) -> StoredObject | None:
        """
        The package of an ``https://`` target taken over from its plain-http
        twin (see :func:`buildcache.fetch.fetcher.http_twin`) when the index,
        fetched over https, vouches for the twin's bytes (size, control
        checksum, data hash: the check a download gets); None (nothing
        moved) otherwise.
        """
        twin_family = http_twin(target.key)
        if twin_family is None:
            return None
        twin = find_stored(self.store, twin_family, self._forwarded(headers))
        # A recorded checksum that differs rules it out without a read.
        if twin is None or stale_reason(apk_entry, twin.size, twin.source_digest):
            return None
        path = self.store.object_path(twin.key)
        if path is None or not await self.store.run_blocking(
            partial(stored_package_matches, path, apk_entry)
        ):
            self.log.info(
                "Not adopting {twin} for {key}: it is not the build its index lists",
                twin=twin.key, key=target.key,
            )
            return None
        adopted = adopt_twin(self.store, target.key, twin_family, twin)
        if adopted is None:
            return None
        if adopted.source_digest is None:
            self.store.set_source_digest(adopted, apk_entry.control_checksum)
        return self.store.lookup(adopted.key)

    async def _revalidated_index_entry(
        self, target: Target, index_url: str, headers: Mapping[str, str]
    ) -> ApkFacts | None:
        """
        The package's entry in its index once the index has been fetched or
        revalidated (and stored), or None.  The index is asked for as the
        client would ask for it (its forwarded headers, its credentials),
        so that the entry read is the one the client is served.
        """
        index_target = self._for_client(
            Target(index_url, cache_key(index_url), Kind.INDEX, target.route), headers
        )
        index_entry = find_stored(self.store, index_target.key, self._forwarded(headers))
        conditional = validators_of(index_entry.headers) if index_entry else {}
        try:
            answer = await self.fetcher.fetch(
                self._upstream_request(
                    index_target, headers, conditional, None,
                    revalidates=index_entry.key if index_entry else None,
                )
            )
            if answer.body is not None:
                # Wait for the whole index to be stored before reading it.
                await drained(answer.body)
        except UpstreamError as e:
            self.log.warn(
                "Could not revalidate {key}: {error}", key=index_target.key, error=str(e)
            )
        return await self.apk_indexes.entry_for(target.url, self._index_keys(headers))

    async def _retry_with_fresh_index(
        self,
        request: Request,
        target: Target,
        headers: Mapping[str, str],
        old_entry: ApkFacts,
        why: str,
    ) -> UpstreamAnswer | None:
        """
        A package failed its index check: the index may just be older than
        the package, so revalidate the index once and try again with its
        new entry; if the entry is unchanged the package is bad.
        """
        index_url = repository_index_url(target.url)
        assert index_url is not None
        new_entry = await self._revalidated_index_entry(target, index_url, headers)
        if new_entry is None or new_entry == old_entry:
            self.log.error(
                "Refusing {url}: it does not match its index entry: {why}",
                url=target.url, why=why,
            )
            send_error(request, 502, f"package does not match its index entry: {why}")
            return None
        try:
            return await self.fetcher.fetch(
                self._upstream_request(target, headers, {}, new_entry)
            )
        except (UpstreamError, IntegrityError) as e:
            self.log.error(
                "Refusing {url}: it does not match its index entry: {error}",
                url=target.url, error=str(e),
            )
            send_error(request, 502, f"package does not match its index entry: {e}")
            return None
