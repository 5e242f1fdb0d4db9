"""
Authentication to upstream registries: the distribution spec's token flow.

This module owns :class:`RegistryAuthAgent`, the agent that answers a
registry's ``401`` challenges for the cache, and what it keeps:

- parsing ``WWW-Authenticate`` (RFC 9110 section 11.6.1: several challenges,
  quoted strings; :func:`parse_challenges`);
- fetching a token from a ``Bearer`` challenge's realm (``GET
  realm?service=..&scope=..``, anonymously or with the registry's
  ``--registry-auth`` credentials), and answering a ``Basic`` challenge with
  those credentials;
- the tokens kept per (registry origin, scope) until their ``expires_in``
  (:class:`RegistryTokens`, bounded, least recently used first out), reused
  for later requests of the same repository without a ``401`` round trip,
  and one fetch shared by the requests that need the same token.

It sits below the redirect handling (see
:func:`buildcache.fetch.client.upstream_client`'s ``authenticate``), so each
hop of a redirect is its own request here, and a hop to another origin (a
blob store a registry redirects to) never gets the registry's token.

Neither a token nor a password is ever logged, shown or put in an error.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
from hyperlink import URL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse
from zope.interface import implementer

from buildcache.credentials import Credentials, Origin
from buildcache.fetch.client import ReadResponse, read_bounded, request_uri
from buildcache.fetch.errors import UpstreamError
from buildcache.turns import deliver

__all__ = [
    "AUTH_BODY_LIMIT",
    "Challenge",
    "DEFAULT_EXPIRES_IN",
    "MAX_EXPIRES_IN",
    "MAX_TOKENS",
    "RegistryAuthAgent",
    "RegistryTokens",
    "TokenFetchFailed",
    "parse_challenges",
    "registry_authentication",
]

#: Tokens kept at most (one per registry origin and scope).
MAX_TOKENS = 1024
#: Bytes read at most of a token response, or of a 401 the agent answers.
AUTH_BODY_LIMIT = 64 * 1024
#: Seconds a token is kept at most, whatever its response says.
MAX_EXPIRES_IN = 24 * 3600.0
#: Seconds a token is kept when its response does not say (the token
#: specification's default).
DEFAULT_EXPIRES_IN = 60.0


class TokenFetchFailed(UpstreamError):
    """
    A registry's token endpoint could not be asked, or its answer was not a
    token.  The message names the realm's host, never a token or a password.
    """


class RegistryLike(Protocol):
    """
    A configured registry as the agent needs it (``config.Registry``).
    """

    @property
    def url(self) -> str: ...

    @property
    def credentials(self) -> Credentials | None: ...


Registries = Iterable[RegistryLike] | Mapping[str, Credentials | None]


def _by_origin(
    registries: Registries | Mapping[Origin, Credentials | None],
) -> Mapping[Origin, Credentials | None]:
    pairs: Iterable[tuple[str | Origin, Credentials | None]]
    if isinstance(registries, Mapping):
        pairs = registries.items()
    else:
        pairs = ((r.url, r.credentials) for r in registries)
    table: dict[Origin, Credentials | None] = {}
    for url, credentials in pairs:
        origin = url if isinstance(url, Origin) else Origin.of(url)
        if table.get(origin) is None:
            table[origin] = credentials
    return table


# -- challenges ---------------------------------------------------------------

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
# A bare value is read up to the next separator, beyond what a token may
# hold (RFC 9110): some servers leave a realm URL unquoted.
_PARAM = re.compile(rf"({_TOKEN})[ \t]*=[ \t]*({_QUOTED}|[^\s,\"=][^\s,\"]*)")
_SCHEME = re.compile(_TOKEN)
_TOKEN68 = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_SPACE = re.compile(r"[ \t]*")
_ESCAPE = re.compile(r"\\(.)")


@attrs.frozen
class Challenge:
    """
    One challenge of a ``WWW-Authenticate`` header: its scheme (lowercase)
    and its parameters (names lowercase, quoted values unquoted).
    """

    scheme: str
    params: Mapping[str, str] = attrs.field(factory=dict)


def parse_challenges(values: Iterable[str]) -> list[Challenge]:
    """
    The challenges of ``WWW-Authenticate`` header values, in order.  What
    does not parse ends the value it is in (the challenges before it are
    kept); a parameter named twice keeps its first value.
    """
    found: list[Challenge] = []
    for value in values:
        found.extend(_parse_value(value))
    return found


def _parse_value(text: str) -> list[Challenge]:
    found: list[Challenge] = []
    at = 0
    while True:
        at = _skip_separators(text, at)
        scheme = _SCHEME.match(text, at)
        if scheme is None:
            return found
        at = scheme.end()
        params: dict[str, str] = {}
        found.append(Challenge(scheme.group().lower(), params))
        if at < len(text) and text[at] not in " \t,":
            return found
        at = _SPACE.match(text, at).end()  # type: ignore[union-attr]
        param = _PARAM.match(text, at)
        if param is None:
            token68 = _TOKEN68.match(text, at)
            if token68 is not None:
                at = token68.end()
            continue
        while param is not None:
            name, value = param.group(1).lower(), param.group(2)
            if value.startswith('"'):
                value = _ESCAPE.sub(r"\1", value[1:-1])
            params.setdefault(name, value)
            at = _SPACE.match(text, param.end()).end()  # type: ignore[union-attr]
            if at < len(text) and text[at] != ",":
                return found
            after = _skip_separators(text, at)
            param = _PARAM.match(text, after)
            if param is not None:
                at = after


def _skip_separators(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t,":
        at += 1
    return at


# -- tokens -------------------------------------------------------------------


@attrs.frozen
class _Token:
    #: The Authorization header value; never repr'd.
    authorization: bytes = attrs.field(repr=False)
    expires: float


_Key = tuple[Origin, str]


@attrs.define
class _Flight:
    """
    One token fetch in progress, and the requests waiting for it.
    """

    waiters: list[Deferred[_Token | None]] = attrs.field(factory=list)
    fetching: Deferred[_Token | None] | None = None


@attrs.define
class RegistryTokens:
    """
    The tokens kept for registries, by (registry origin, scope), at most
    ``max_tokens`` (least recently used dropped first), each until it
    expires by ``clock``; the token fetches in flight; and the registries
    that asked for Basic credentials.  Shared by the agents of one client.
    """

    clock: IReactorTime
    max_tokens: int = MAX_TOKENS
    _tokens: OrderedDict[_Key, _Token] = attrs.field(factory=OrderedDict, repr=False)
    _flights: dict[_Key, _Flight] = attrs.field(factory=dict, repr=False)
    #: Registries answered with Basic credentials, sent them up front.
    basic: set[Origin] = attrs.field(factory=set)

    def __len__(self) -> int:
        return len(self._tokens)

    def get(self, key: _Key) -> _Token | None:
        token = self._tokens.get(key)
        if token is None:
            return None
        if token.expires <= self.clock.seconds():
            del self._tokens[key]
            return None
        self._tokens.move_to_end(key)
        return token

    def put(self, key: _Key, token: _Token) -> None:
        self._tokens[key] = token
        self._tokens.move_to_end(key)
        while len(self._tokens) > self.max_tokens:
            self._tokens.popitem(last=False)

    def drop(self, key: _Key, token: _Token) -> None:
        """
        Forget ``token`` (refused by its registry), unless a newer one
        replaced it already.
        """
        if self._tokens.get(key) is token:
            del self._tokens[key]

    def shared(
        self, key: _Key, fetch: Callable[[], Deferred[_Token | None]]
    ) -> Deferred[_Token | None]:
        """
        The result of ``fetch()``, started once for all the requests that
        need ``key``'s token at the same time.  A waiter that is cancelled
        stops waiting; the fetch is cancelled when nobody waits any more.
        """
        running = self._flights.get(key)
        flight = running if running is not None else _Flight()

        def cancel(waiter: Deferred[_Token | None]) -> None:
            flight.waiters.remove(waiter)
            if not flight.waiters and flight.fetching is not None:
                flight.fetching.cancel()

        def landed(result: _Token | None | Failure) -> None:
            if self._flights.get(key) is flight:
                del self._flights[key]
            waiters, flight.waiters = flight.waiters, []
            deliver(waiters, result)

        waiter: Deferred[_Token | None] = Deferred(cancel)
        flight.waiters.append(waiter)
        if running is None:
            self._flights[key] = flight
            # ``landed`` is added after the waiter: the fetch may end at once.
            flight.fetching = fetch()
            flight.fetching.addBoth(landed)
        return waiter


# -- the agent ------------------------------------------------------------------

# A registry URL may have a path of its own before /v2/ (a mirror served
# under a prefix): the repository is what follows the first /v2/.
_REPOSITORY_PATH = re.compile(
    r"^(?:/[^?#]*?)?/v2/(?P<repository>.+)/(?:manifests|blobs|tags|referrers)/[^/]+$"
)


def repository_scope(path: str) -> str:
    """
    The scope a registry asks a token for to pull from the repository
    ``path`` names (``/v2/<repository>/manifests/<ref>`` and the like), or
    ``""`` for another path (``/v2/``).
    """
    match = _REPOSITORY_PATH.match(path)
    if match is None:
        return ""
    return f"repository:{match.group('repository')}:pull"


@implementer(IAgent)
@attrs.frozen
class RegistryAuthAgent:
    """
    Answers the authentication challenges of configured registries.

    It acts only on ``GET`` and ``HEAD`` requests for a configured
    registry's origin that carry no ``Authorization`` of their own; every
    other request passes through as it is.  Such a request is sent with the
    token kept for its repository, if any; a ``401`` with a ``Bearer``
    challenge gets a token from the challenge's realm and the request is
    sent once more with it (a kept token that was refused is dropped
    first); a ``401`` with a ``Basic`` challenge, the registry's
    credentials.  The ``401`` goes up when there is nothing to answer it
    with, when the token endpoint refuses, or when the retry is refused too.

    A repository's token is looked up by the scope Docker Hub and the
    distribution registry ask for (``repository:<name>:pull``); a registry
    that names another scope costs a ``401`` round trip per request, and
    its kept token is still reused.

    The registry's credentials go to the token realm only when it is
    ``https`` or on the registry's own host; otherwise the token is asked
    for anonymously.

    :param registries: the configured registries (anything with ``url`` and
        ``credentials``, such as ``Config.registries``) or a mapping of
        registry URL to credentials (or None).
    :param token_agent: sends the token requests (without redirects);
        ``agent`` when None.
    :param tokens: the token table, shared by the agents of one client.
    """

    agent: IAgent
    clock: IReactorTime
    registries: Mapping[Origin, Credentials | None] = attrs.field(
        converter=_by_origin, repr=False
    )
    token_agent: IAgent | None = None
    tokens: RegistryTokens = attrs.field(
        default=attrs.Factory(lambda self: RegistryTokens(self.clock), takes_self=True)
    )

    log = Logger()

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        origin = self._registry_origin(method, uri, headers)
        if origin is None:
            return self.agent.request(method, uri, headers, bodyProducer)
        return Deferred.fromCoroutine(
            self._request(origin, method, uri, headers or Headers(), bodyProducer)
        )

    def _registry_origin(
        self, method: bytes, uri: bytes, headers: Headers | None
    ) -> Origin | None:
        if method not in (b"GET", b"HEAD") or not self.registries:
            return None
        if headers is not None and headers.hasHeader(b"authorization"):
            return None
        try:
            origin = Origin.of(uri)
        except ValueError:
            return None
        return origin if origin in self.registries else None

    def _send(
        self, method: bytes, uri: bytes, headers: Headers, authorization: bytes | None,
        body: Any,
    ) -> Deferred[IResponse]:
        # A copy: the headers given are the redirect handler's, reused for
        # the next hop, which may be another origin.
        sent = headers.copy()
        if authorization is not None:
            sent.setRawHeaders(b"authorization", [authorization])
        return self.agent.request(method, uri, sent, body)

    async def _request(
        self, origin: Origin, method: bytes, uri: bytes, headers: Headers, body: Any
    ) -> IResponse:
        credentials = self.registries[origin]
        kept: _Token | None = None
        key = (origin, repository_scope(_path(uri)))
        authorization: bytes | None = None
        if origin in self.tokens.basic and credentials is not None:
            authorization = credentials.authorization()
        else:
            kept = self.tokens.get(key)
            if kept is not None:
                authorization = kept.authorization
        response = await self._send(method, uri, headers, authorization, body)
        if response.code != 401:
            return response
        sent_basic = authorization is not None and kept is None
        if sent_basic:
            self.tokens.basic.discard(origin)
        challenges = parse_challenges(
            v.decode("latin-1")
            for v in response.headers.getRawHeaders(b"www-authenticate", [])
        )
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if kept is not None:
            self.tokens.drop(key, kept)
        if bearer is None:
            basic = any(c.scheme == "basic" for c in challenges)
            if not basic or credentials is None or sent_basic:
                return response
            await read_bounded(response, AUTH_BODY_LIMIT)
            retried = await self._send(
                method, uri, headers, credentials.authorization(), body
            )
            if retried.code != 401:
                self.tokens.basic.add(origin)
            return retried
        # Read (bounded) now: an unread body waits in memory, unbounded.
        refused = ReadResponse.of(response, *await read_bounded(response, AUTH_BODY_LIMIT))
        challenge = bearer
        key = (origin, challenge.params.get("scope", ""))
        token = self.tokens.get(key)
        if token is None:
            token = await self.tokens.shared(
                key, lambda: Deferred.fromCoroutine(self._fetch(origin, challenge))
            )
        if token is None:
            return refused
        retried = await self._send(method, uri, headers, token.authorization, body)
        if retried.code == 401:
            self.tokens.drop(key, token)
        return retried

    async def _fetch(self, origin: Origin, challenge: Challenge) -> _Token | None:
        """
        A token for ``challenge`` from its realm, kept in the table; None
        when the token endpoint answers other than 200.

        :raises TokenFetchFailed: it could not be asked, or did not answer
            with a token.
        """
        realm = challenge.params.get("realm", "")
        try:
            realm_origin = Origin.of(realm)
            url = URL.from_text(realm)
        except ValueError:
            raise TokenFetchFailed(
                f"the registry {origin.host} named no usable token realm"
            ) from None
        where = realm_origin.host
        scope = challenge.params.get("scope", "")
        if "service" in challenge.params:
            url = url.add("service", challenge.params["service"])
        for one in scope.split():
            url = url.add("scope", one)
        headers = Headers({b"accept": [b"application/json"]})
        credentials = self.registries.get(origin)
        if credentials is not None and (
            realm_origin.scheme == "https" or realm_origin.host == origin.host
        ):
            headers.setRawHeaders(b"authorization", [credentials.authorization()])
        agent = self.token_agent if self.token_agent is not None else self.agent
        try:
            response = await agent.request(
                b"GET", request_uri(url.to_text()), headers, None
            )
            body, complete = await read_bounded(response, AUTH_BODY_LIMIT)
        except (UpstreamError, CancelledError):
            raise
        except Exception as error:
            # Agent errors name addresses, never the request's headers.
            reason = f"{type(error).__name__}: {error}"[:200]
            raise TokenFetchFailed(f"could not get a token from {where}: {reason}") from None
        if response.code != 200:
            self.log.warn(
                "The token endpoint on {realm_host} refused a token for"
                " {scope!r} with HTTP {status}",
                realm_host=where, scope=scope, status=response.code,
                event="registry_token_refused",
            )
            return None
        if not complete:
            raise TokenFetchFailed(
                f"the token response from {where} broke off or is larger than"
                f" {AUTH_BODY_LIMIT // 1024} KiB"
            )
        token, expires_in = _parse_token(body, where)
        kept = _Token(b"Bearer " + token.encode("ascii"), self.clock.seconds() + expires_in)
        self.tokens.put((origin, scope), kept)
        self.log.info(
            "Fetched a token for {scope!r} from {realm_host}, kept {expires_in:g}s",
            scope=scope, realm_host=where, expires_in=expires_in,
            registry=str(origin), event="registry_token_fetched",
        )
        return kept


def _parse_token(body: bytes, where: str) -> tuple[str, float]:
    """
    The token and its lifetime of a token response (``token`` or
    ``access_token``; ``expires_in``, else :data:`DEFAULT_EXPIRES_IN`, at
    most :data:`MAX_EXPIRES_IN`).
    ``issued_at`` is not used: it is the registry's wall clock, and the
    lifetime is counted from the response's arrival on ours.
    """
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise TokenFetchFailed(f"the token response from {where} is not a JSON object")
    token = document.get("token") or document.get("access_token")
    if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable():
        raise TokenFetchFailed(f"the token response from {where} holds no token")
    expires_in = document.get("expires_in")
    if isinstance(expires_in, bool) or not isinstance(expires_in, (int, float)) or not expires_in > 0:
        expires_in = DEFAULT_EXPIRES_IN
    return token, min(float(expires_in), MAX_EXPIRES_IN)


def _path(uri: bytes) -> str:
    return urlsplit(uri.decode("latin-1")).path


def registry_authentication(
    clock: IReactorTime, registries: Registries
) -> Callable[[IAgent], IAgent]:
    """
    The ``authenticate`` of :func:`buildcache.fetch.client.upstream_client`
    for ``registries``: each agent it wraps answers their challenges, all
    with one token table.
    """
    table = _by_origin(registries)
    tokens = RegistryTokens(clock)

    def authenticate(agent: IAgent) -> IAgent:
        return RegistryAuthAgent(agent, clock, table, tokens=tokens)

    return authenticate
