"""
Tests for :mod:`buildcache.ecosystems.oci.auth`: the registry token agent,
in memory (a scripted agent below it, a clock for expiry) and over real TCP
on 127.0.0.1 (a registry, its token server and a blob store, through the
real ``upstream_client``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IListeningPort, IPushProducer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, RedirectAgent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest, IResponse
from twisted.web.resource import Resource
from zope.interface import implementer

from buildcache.credentials import Credentials, Origin, UpstreamCredentials
from buildcache.ecosystems.oci.auth import (
    AUTH_BODY_LIMIT,
    MAX_EXPIRES_IN,
    Challenge,
    RegistryAuthAgent,
    RegistryTokens,
    TokenFetchFailed,
    _Token,
    parse_challenges,
    registry_authentication,
    repository_scope,
)
from buildcache.fetch.client import read_bounded, upstream_client
from buildcache.fetch.credentials import CredentialsAgent
from buildcache.fetch.fetcher import Fetcher
from buildcache.fetch.request import UpstreamAnswer, UpstreamRequest
from buildcache.store import Store
from tests.support import listen, reactor, url_of

REGISTRY = "http://127.0.0.1:5999"
REALM = "https://auth.example.test/token"
USER = "robot"
PASSWORD = "pw-Zq81xKcM"
CREDENTIALS = Credentials(USER, PASSWORD)
BASIC = b"Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode())
#: Every form in which the operator's secret could leak.
SECRETS = (PASSWORD, BASIC.decode()[6:])


def challenge(scope: str = "repository:team/app:pull", realm: str = REALM) -> str:
    return f'Bearer realm="{realm}",service="test-registry",scope="{scope}"'


# -- a scripted agent -------------------------------------------------------------


@implementer(IPushProducer)
class Transport:
    """
    A response body's transport: says whether the reader stopped it.
    """

    stopped = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IResponse)
@attrs.define(eq=False)
class FakeResponse:
    code: int
    body: bytes = b""
    headers: Headers = attrs.Factory(Headers)
    version: tuple[bytes, int, int] = (b"HTTP", 1, 1)
    phrase: bytes = b"X"
    request: Any = None
    previousResponse: Any = None
    transport: Transport = attrs.Factory(Transport)
    delivered: bool = False

    @property
    def length(self) -> int:
        return len(self.body)

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol: Any) -> None:
        self.delivered = True
        protocol.makeConnection(self.transport)
        # Delivered in 16 KiB pieces, stopping when the reader stops it.
        for start in range(0, len(self.body), 16384):
            if self.transport.stopped:
                protocol.connectionLost(Failure(PotentialDataLoss()))
                return
            protocol.dataReceived(self.body[start:start + 16384])
        protocol.connectionLost(Failure(ResponseDone()))


def unauthorized(*challenges: str, body: bytes = b'{"errors":[]}') -> FakeResponse:
    return FakeResponse(
        401, body, Headers({b"www-authenticate": list(c.encode() for c in challenges)})
    )


def token_response(document: object, code: int = 200) -> FakeResponse:
    return FakeResponse(code, json.dumps(document).encode())


@attrs.frozen
class Sent:
    method: bytes
    uri: bytes
    headers: Headers

    @property
    def authorization(self) -> bytes | None:
        values = self.headers.getRawHeaders(b"authorization")
        return values[0] if values else None

    @property
    def path(self) -> str:
        return urlsplit(self.uri.decode()).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.uri.decode()).query)


Answer = Callable[[Sent], "FakeResponse | Deferred[IResponse]"]


@implementer(IAgent)
@attrs.define
class ScriptedAgent:
    """
    Records every request and answers it with ``answer(sent)``.
    """

    answer: Answer = attrs.field(repr=False)
    sent: list[Sent] = attrs.field(factory=list, repr=False)

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        sent = Sent(method, uri, headers if headers is not None else Headers())
        self.sent.append(sent)
        answer = self.answer(sent)
        if isinstance(answer, Deferred):
            return answer
        return succeed(answer)  # type: ignore[arg-type]


@attrs.define
class TokenRegistry:
    """
    A registry with a token server, as an ``Answer``: requests for
    ``/v2/...`` need ``Bearer <a valid token>``; the realm hands out
    ``tok-1``, ``tok-2``, ... (``document`` adds to each answer).
    """

    realm: str = REALM
    expires_in: int | None = 300
    valid: set[bytes] = attrs.Factory(set)
    issued: int = 0
    token_status: int = 200
    key: str = "token"

    def __call__(self, sent: Sent) -> FakeResponse:
        if sent.uri.decode().startswith(self.realm):
            if self.token_status != 200:
                return FakeResponse(self.token_status, b"denied")
            self.issued += 1
            token = f"tok-{self.issued}"
            self.valid.add(f"Bearer {token}".encode())
            document: dict[str, object] = {self.key: token}
            if self.expires_in is not None:
                document["expires_in"] = self.expires_in
            return token_response(document)
        if sent.authorization in self.valid:
            return FakeResponse(200, b"manifest " + sent.path.encode())
        scope = repository_scope(sent.path)
        return unauthorized(challenge(scope, self.realm) if scope else f'Bearer realm="{self.realm}"')


def body_of(response: IResponse) -> bytes:
    got: list[bytes] = []
    ended: list[Failure] = []

    class Reader:
        def makeConnection(self, transport: object) -> None:
            pass

        def dataReceived(self, data: bytes) -> None:
            got.append(data)

        def connectionLost(self, reason: Failure) -> None:
            ended.append(reason)

    response.deliverBody(Reader())
    assert ended, "body not delivered at once"
    return b"".join(got)


def agent_for(
    answer: Answer,
    credentials: Credentials | None = None,
    clock: Clock | None = None,
) -> tuple[RegistryAuthAgent, ScriptedAgent, Clock]:
    inner = ScriptedAgent(answer)
    clock = clock if clock is not None else Clock()
    agent = RegistryAuthAgent(inner, clock, {REGISTRY: credentials})
    return agent, inner, clock


def get(agent: Any, path: str, method: bytes = b"GET", **headers: str) -> IResponse:
    result: IResponse = SynchronousTestCase().successResultOf(
        agent.request(
            method, f"{REGISTRY}{path}".encode(),
            Headers({k.encode(): [v.encode()] for k, v in headers.items()}),
        )
    )
    return result


MANIFEST = "/v2/team/app/manifests/v1"
BLOB = "/v2/team/app/blobs/sha256:" + "a" * 64


# -- challenges ----------------------------------------------------------------


class ParseChallengesTests(SynchronousTestCase):
    def test_docker_hub(self) -> None:
        self.assertEqual(
            parse_challenges([
                'Bearer realm="https://auth.example.test/token",'
                'service="registry.example.test",scope="repository:library/alpine:pull"'
            ]),
            [Challenge("bearer", {
                "realm": "https://auth.example.test/token",
                "service": "registry.example.test",
                "scope": "repository:library/alpine:pull",
            })],
        )

    def test_several_challenges_tokens_and_escapes(self) -> None:
        self.assertEqual(
            parse_challenges([
                'Negotiate abc==, Basic realm="say \\"hi\\", friend" , '
                'BEARER Realm = https://r.test/t ,scope="a b",realm="second"',
                "Basic",
            ]),
            [
                Challenge("negotiate", {}),
                Challenge("basic", {"realm": 'say "hi", friend'}),
                Challenge("bearer", {"realm": "https://r.test/t", "scope": "a b"}),
                Challenge("basic", {}),
            ],
        )

    def test_garbage_ends_the_value(self) -> None:
        self.assertEqual(
            parse_challenges(['Bearer realm="x" junk, Basic', '"oops', ""]),
            [Challenge("bearer", {"realm": "x"})],
        )

    def test_repository_scope(self) -> None:
        self.assertEqual(
            repository_scope("/v2/a/b/c/manifests/latest"), "repository:a/b/c:pull"
        )
        self.assertEqual(repository_scope("/v2/x/blobs/sha256:1"), "repository:x:pull")
        self.assertEqual(repository_scope("/v2/x/tags/list"), "repository:x:pull")
        self.assertEqual(repository_scope("/v2/"), "")
        # A registry under a path prefix: its token is reused as well.
        self.assertEqual(
            repository_scope("/mirror/v2/a/b/manifests/latest"), "repository:a/b:pull"
        )
        self.assertEqual(repository_scope("/mirror/v2/"), "")


# -- the token flow in memory ---------------------------------------------------------


class TokenFlowTests(SynchronousTestCase):
    def test_token_fetched_once_and_reused_per_repository(self) -> None:
        registry = TokenRegistry()
        agent, inner, _ = agent_for(registry)
        self.assertEqual(body_of(get(agent, MANIFEST)), b"manifest " + MANIFEST.encode())
        self.assertEqual(
            [(s.path, s.authorization) for s in inner.sent],
            [(MANIFEST, None), ("/token", None), (MANIFEST, b"Bearer tok-1")],
        )
        token_request = inner.sent[1]
        self.assertEqual(
            token_request.query,
            {"service": ["test-registry"], "scope": ["repository:team/app:pull"]},
        )
        # Later requests of the repository: the token up front, no 401.
        self.assertEqual(get(agent, BLOB).code, 200)
        self.assertEqual(get(agent, "/v2/team/app/tags/list", b"HEAD").code, 200)
        self.assertEqual(
            [(s.path, s.authorization) for s in inner.sent[3:]],
            [(BLOB, b"Bearer tok-1"), ("/v2/team/app/tags/list", b"Bearer tok-1")],
        )
        # Another repository needs its own token.
        self.assertEqual(get(agent, "/v2/team/other/manifests/v1").code, 200)
        self.assertEqual(registry.issued, 2)
        self.assertEqual(inner.sent[-1].authorization, b"Bearer tok-2")

    def test_kept_until_expires_in(self) -> None:
        registry = TokenRegistry(expires_in=300)
        agent, inner, clock = agent_for(registry)
        get(agent, MANIFEST)
        clock.advance(299.5)
        get(agent, MANIFEST)
        self.assertEqual(inner.sent[-1].authorization, b"Bearer tok-1")
        self.assertEqual(registry.issued, 1)
        clock.advance(0.5)
        get(agent, MANIFEST)
        self.assertEqual(registry.issued, 2)
        self.assertEqual(
            [s.authorization for s in inner.sent[-3:]], [None, None, b"Bearer tok-2"]
        )

    def test_access_token_and_default_lifetime(self) -> None:
        registry = TokenRegistry(expires_in=None, key="access_token")
        agent, _, clock = agent_for(registry)
        get(agent, MANIFEST)
        clock.advance(59)
        get(agent, MANIFEST)
        self.assertEqual(registry.issued, 1)
        clock.advance(1)
        get(agent, MANIFEST)
        self.assertEqual(registry.issued, 2)

    def test_lifetime_bounded(self) -> None:
        for expires_in, kept in ((10**12, MAX_EXPIRES_IN), (float("nan"), 60), (-5, 60)):
            registry = TokenRegistry(expires_in=expires_in)  # type: ignore[arg-type]
            agent, _, clock = agent_for(registry)
            get(agent, MANIFEST)
            clock.advance(kept - 1)
            get(agent, MANIFEST)
            self.assertEqual(registry.issued, 1)
            clock.advance(1)
            get(agent, MANIFEST)
            self.assertEqual(registry.issued, 2)

    def test_kept_token_refused_is_replaced_once(self) -> None:
        registry = TokenRegistry()
        agent, inner, _ = agent_for(registry)
        get(agent, MANIFEST)
        registry.valid.clear()  # revoked before its time
        self.assertEqual(get(agent, MANIFEST).code, 200)
        self.assertEqual(
            [(s.path, s.authorization) for s in inner.sent[3:]],
            [(MANIFEST, b"Bearer tok-1"), ("/token", None), (MANIFEST, b"Bearer tok-2")],
        )

    def test_retry_refused_too_sends_that_401_up(self) -> None:
        registry = TokenRegistry()

        def answer(sent: Sent) -> FakeResponse:
            response = registry(sent)
            registry.valid.clear()  # every token refused
            return response

        agent, inner, _ = agent_for(answer)
        response = get(agent, MANIFEST)
        self.assertEqual(response.code, 401)
        self.assertEqual(len(inner.sent), 3)
        # The refused token is not kept: the next request asks again.
        get(agent, MANIFEST)
        self.assertEqual(inner.sent[3].authorization, None)
        self.assertEqual(registry.issued, 2)

    def test_token_endpoint_refusal_sends_the_original_401_up(self) -> None:
        registry = TokenRegistry(token_status=403)
        first = unauthorized(challenge(), body=b'{"errors":[{"code":"UNAUTHORIZED"}]}')

        def answer(sent: Sent) -> FakeResponse:
            return first if sent.path == MANIFEST else registry(sent)

        agent, inner, _ = agent_for(answer)
        with self._events() as events:
            response = get(agent, MANIFEST)
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [challenge().encode()])
        self.assertEqual(body_of(response), b'{"errors":[{"code":"UNAUTHORIZED"}]}')
        self.assertEqual(len(inner.sent), 2)
        self.assertEqual(
            [(e["event"], e["status"], e["realm_host"]) for e in events
             if e.get("event") == "registry_token_refused"],
            [("registry_token_refused", 403, "auth.example.test")],
        )

    def test_bounded_bodies(self) -> None:
        big_401 = unauthorized(challenge(), body=b"x" * (AUTH_BODY_LIMIT * 3))
        big_token = token_response({"token": "t", "pad": "y" * AUTH_BODY_LIMIT})

        def answer(sent: Sent) -> FakeResponse:
            return big_token if sent.uri.startswith(REALM.encode()) else big_401

        agent, _, _ = agent_for(answer)
        failure = self.failureResultOf(
            agent.request(b"GET", f"{REGISTRY}{MANIFEST}".encode()), TokenFetchFailed
        )
        self.assertIn("auth.example.test", str(failure.value))
        self.assertIn("64 KiB", str(failure.value))
        self.assertTrue(big_401.transport.stopped)
        self.assertTrue(big_token.transport.stopped)

    def test_bad_token_responses(self) -> None:
        for body in (b"not json", b"[]", b'{"token": 5}', b'{"token": "a\\nb"}', b"{}"):
            answers = {REALM: FakeResponse(200, body)}
            agent, _, _ = agent_for(
                lambda s: answers.get(s.uri.decode().split("?")[0], unauthorized(challenge()))
            )
            failure = self.failureResultOf(
                agent.request(b"GET", f"{REGISTRY}{MANIFEST}".encode()), TokenFetchFailed
            )
            self.assertIn("from auth.example.test", str(failure.value))

    def test_token_server_unreachable(self) -> None:
        def answer(sent: Sent) -> Any:
            if sent.uri.startswith(REALM.encode()):
                return Deferred.fromCoroutine(_fail(ConnectionRefusedError("auth.example.test")))
            return unauthorized(challenge())

        agent, _, _ = agent_for(answer, CREDENTIALS)
        failure = self.failureResultOf(
            agent.request(b"GET", f"{REGISTRY}{MANIFEST}".encode()), TokenFetchFailed
        )
        message = str(failure.value)
        self.assertIn("could not get a token from auth.example.test", message)
        for secret in SECRETS:
            self.assertNotIn(secret, message)

    def test_unusable_realm(self) -> None:
        agent, _, _ = agent_for(lambda s: unauthorized('Bearer realm="/relative"'))
        failure = self.failureResultOf(
            agent.request(b"GET", f"{REGISTRY}{MANIFEST}".encode()), TokenFetchFailed
        )
        self.assertIn("127.0.0.1", str(failure.value))

    @contextmanager
    def _events(self) -> Iterator[list[LogEvent]]:
        events: list[LogEvent] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        try:
            yield events
        finally:
            globalLogPublisher.removeObserver(observer)


async def _fail(error: Exception) -> IResponse:
    raise error


class CredentialsToRealmTests(SynchronousTestCase):
    def _realm_authorization(self, realm: str, registry: str = REGISTRY) -> bytes | None:
        token_server = TokenRegistry(realm=realm)
        inner = ScriptedAgent(token_server)
        agent = RegistryAuthAgent(inner, Clock(), {registry: CREDENTIALS})
        self.successResultOf(agent.request(b"GET", f"{registry}{MANIFEST}".encode()))
        (fetch,) = [s for s in inner.sent if s.uri.startswith(realm.encode())]
        return fetch.authorization

    def test_https_realm_gets_them(self) -> None:
        self.assertEqual(self._realm_authorization("https://auth.example.test/token"), BASIC)

    def test_http_realm_on_the_registry_host_gets_them(self) -> None:
        self.assertEqual(self._realm_authorization("http://127.0.0.1:6000/token"), BASIC)

    def test_http_realm_elsewhere_asked_anonymously(self) -> None:
        self.assertIsNone(self._realm_authorization("http://127.0.0.2:5999/token"))


class BasicChallengeTests(SynchronousTestCase):
    def _registry(self, sent: Sent) -> FakeResponse:
        if sent.authorization == BASIC:
            return FakeResponse(200, b"ok")
        return unauthorized('Basic realm="Registry Realm"')

    def test_answered_with_credentials_then_sent_up_front(self) -> None:
        agent, inner, _ = agent_for(self._registry, CREDENTIALS)
        self.assertEqual(get(agent, MANIFEST).code, 200)
        self.assertEqual(get(agent, BLOB).code, 200)
        self.assertEqual(
            [s.authorization for s in inner.sent], [None, BASIC, BASIC]
        )

    def test_without_credentials_the_401_goes_up_unread(self) -> None:
        agent, inner, _ = agent_for(self._registry)
        response = get(agent, MANIFEST)
        self.assertEqual(response.code, 401)
        assert isinstance(response, FakeResponse)
        self.assertFalse(response.delivered)
        self.assertEqual(len(inner.sent), 1)


class PassThroughTests(SynchronousTestCase):
    def test_only_registry_pulls_without_their_own_authorization(self) -> None:
        agent, inner, _ = agent_for(lambda s: unauthorized(challenge()))
        given = Headers()
        for method, uri, headers in [
            (b"GET", b"http://127.0.0.1:6000" + MANIFEST.encode(), given),  # another port
            (b"POST", f"{REGISTRY}/v2/team/app/blobs/uploads/".encode(), given),
            (b"GET", f"{REGISTRY}{MANIFEST}".encode(),
             Headers({b"authorization": [b"Bearer own"]})),
        ]:
            response = self.successResultOf(agent.request(method, uri, headers))
            self.assertEqual(response.code, 401)
        self.assertEqual(
            [s.authorization for s in inner.sent], [None, None, b"Bearer own"]
        )
        self.assertFalse(given.hasHeader(b"authorization"))

    def test_redirect_to_another_origin_carries_no_token(self) -> None:
        registry = TokenRegistry()
        storage = "http://127.0.0.1:6001/storage/blob"

        def answer(sent: Sent) -> FakeResponse:
            if sent.path == BLOB and sent.authorization in registry.valid:
                return FakeResponse(307, headers=Headers({b"location": [storage.encode()]}))
            if sent.uri.decode() == storage:
                return FakeResponse(200, b"blob bytes")
            return registry(sent)

        agent, inner, _ = agent_for(answer)
        given = Headers()
        response = self.successResultOf(
            RedirectAgent(agent).request(b"GET", f"{REGISTRY}{BLOB}".encode(), given)
        )
        self.assertEqual(body_of(response), b"blob bytes")
        self.assertEqual(
            [(s.uri.decode(), s.authorization) for s in inner.sent],
            [
                (REGISTRY + BLOB, None),
                (REALM + "?service=test-registry&scope=repository:team/app:pull", None),
                (REGISTRY + BLOB, b"Bearer tok-1"),
                (storage, None),
            ],
        )
        self.assertFalse(given.hasHeader(b"authorization"))


class SharedFetchTests(SynchronousTestCase):
    def test_concurrent_requests_share_one_fetch(self) -> None:
        pending: list[Deferred[IResponse]] = []
        registry = TokenRegistry()

        def answer(sent: Sent) -> Any:
            if sent.uri.startswith(REALM.encode()):
                d: Deferred[IResponse] = Deferred()
                pending.append(d)
                return d
            return registry(sent)

        agent, inner, _ = agent_for(answer)
        first = agent.request(b"GET", f"{REGISTRY}{MANIFEST}".encode())
        second = agent.request(b"GET", f"{REGISTRY}{BLOB}".encode())
        third = agent.request(b"GET", f"{REGISTRY}{BLOB}".encode())
        self.assertEqual(len(pending), 1)
        # One waiter gives up: the fetch goes on for the others.
        third.cancel()
        self.failureResultOf(third, CancelledError)
        self.assertFalse(pending[0].called)
        pending[0].callback(registry(Sent(b"GET", REALM.encode(), Headers())))
        self.assertEqual(self.successResultOf(first).code, 200)
        self.assertEqual(self.successResultOf(second).code, 200)
        self.assertEqual(registry.issued, 1)
        self.assertEqual(
            [s.authorization for s in inner.sent if s.path != "/token"],
            [None, None, None, b"Bearer tok-1", b"Bearer tok-1"],
        )

    def test_fetch_cancelled_when_nobody_waits(self) -> None:
        cancelled: list[object] = []

        def answer(sent: Sent) -> Any:
            if sent.uri.startswith(REALM.encode()):
                return Deferred(cancelled.append)
            return unauthorized(challenge())

        agent, _, _ = agent_for(answer)
        requests = [agent.request(b"GET", f"{REGISTRY}{MANIFEST}".encode()) for _ in range(2)]
        requests[0].cancel()
        self.assertEqual(cancelled, [])
        requests[1].cancel()
        self.assertEqual(len(cancelled), 1)
        for request in requests:
            self.failureResultOf(request, CancelledError)
        self.assertEqual(agent.tokens._flights, {})


class TokenTableTests(SynchronousTestCase):
    def test_bounded_least_recently_used_first(self) -> None:
        clock = Clock()
        table = RegistryTokens(clock, max_tokens=2)
        o = Origin.of(REGISTRY)
        tokens = {name: _Token(b"Bearer " + name.encode(), 100.0) for name in "abc"}
        table.put((o, "a"), tokens["a"])
        table.put((o, "b"), tokens["b"])
        self.assertIs(table.get((o, "a")), tokens["a"])  # now the most recent
        table.put((o, "c"), tokens["c"])
        self.assertEqual(len(table), 2)
        self.assertIsNone(table.get((o, "b")))
        self.assertIs(table.get((o, "a")), tokens["a"])
        clock.advance(100)
        self.assertIsNone(table.get((o, "a")))
        self.assertEqual(len(table), 1)

    def test_reprs_hide_secrets(self) -> None:
        agent, _, _ = agent_for(TokenRegistry(), CREDENTIALS)
        get(agent, MANIFEST)
        shown = repr(agent) + repr(agent.tokens) + repr(agent.tokens._tokens)
        for secret in (*SECRETS, "tok-1", USER):
            self.assertNotIn(secret, shown)


class UpstreamClientTests(SynchronousTestCase):
    def test_authenticate_wraps_the_operators_agent_below_redirects(self) -> None:
        inner = ScriptedAgent(TokenRegistry())
        wrapped: list[Any] = []

        def authenticate(agent: Any) -> Any:
            wrapped.append(agent)
            return RegistryAuthAgent(agent, Clock(), {REGISTRY: None})

        credentials = UpstreamCredentials.build([("http://127.0.0.1:7000/", CREDENTIALS)])
        client = upstream_client(inner, credentials, authenticate)
        self.assertIsInstance(client.agent, RegistryAuthAgent)
        self.assertIsInstance(wrapped[0], CredentialsAgent)
        # A forward-proxy client's request (its own credentials, or none)
        # never gets the operator's tokens.
        self.assertNotIsInstance(client.anonymous_agent, RegistryAuthAgent)
        self.assertEqual(self.successResultOf(client.request(
            "GET", REGISTRY + MANIFEST, operator_credentials=True
        )).code, 200)
        self.assertEqual(self.successResultOf(client.request(
            "GET", REGISTRY + MANIFEST, operator_credentials=False
        )).code, 401)
        # Without operator credentials too.
        bare = upstream_client(inner, None, authenticate)
        self.assertIsInstance(bare.agent, RegistryAuthAgent)
        self.assertNotIsInstance(bare.anonymous_agent, RegistryAuthAgent)

    def test_registry_authentication_shares_one_table(self) -> None:
        authenticate = registry_authentication(Clock(), {REGISTRY: None})
        one, two = authenticate(ScriptedAgent(TokenRegistry())), authenticate(ScriptedAgent(TokenRegistry()))
        assert isinstance(one, RegistryAuthAgent) and isinstance(two, RegistryAuthAgent)
        self.assertIs(one.tokens, two.tokens)

    def test_registries_as_configured(self) -> None:
        @attrs.frozen
        class Registry:
            name: str
            url: str
            credentials: Credentials | None

        agent = RegistryAuthAgent(
            ScriptedAgent(TokenRegistry()), Clock(),
            (Registry("127.0.0.1:5999", REGISTRY, CREDENTIALS),
             Registry("docker.io", "https://registry.example.test", None)),
        )
        self.assertEqual(
            {str(origin): c for origin, c in agent.registries.items()},
            {"http://127.0.0.1:5999": CREDENTIALS, "https://registry.example.test:443": None},
        )


# -- over real TCP ------------------------------------------------------------------


class TokenServer(Resource):
    """
    Hands out ``secret-token-N`` (``expires_in`` seconds) and records the
    ``Authorization`` of each request.
    """

    isLeaf = True

    def __init__(self, expires_in: int) -> None:
        super().__init__()
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.authorizations: list[bytes | None] = []
        self.queries: list[dict[bytes, list[bytes]]] = []

    def render_GET(self, request: IRequest) -> bytes:
        self.authorizations.append(request.getHeader(b"authorization"))
        self.queries.append(dict(request.args))
        token = f"secret-token-{len(self.issued) + 1}"
        self.issued.append(token)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"token": token, "expires_in": self.expires_in, "issued_at": "2026-01-01T00:00:00Z"}
        ).encode()


class Registry(Resource):
    """
    A registry that wants ``Bearer <an issued token not revoked>``; blobs
    redirect (307) to ``storage``.
    """

    isLeaf = True

    def __init__(self, tokens: TokenServer, realm: str, storage: str) -> None:
        super().__init__()
        self.tokens = tokens
        self.realm = realm
        self.storage = storage
        self.revoked: set[str] = set()
        self.seen: list[tuple[str, bytes | None]] = []

    def render_GET(self, request: IRequest) -> bytes:
        path = request.path.decode()
        authorization = request.getHeader(b"authorization")
        self.seen.append((path, authorization))
        valid = {f"Bearer {t}".encode() for t in self.tokens.issued if t not in self.revoked}
        if authorization not in valid:
            request.setResponseCode(401)
            request.setHeader(
                b"www-authenticate",
                f'Bearer realm="{self.realm}",service="test",'
                f'scope="{repository_scope(path)}"'.encode(),
            )
            return b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
        if "/blobs/" in path:
            request.setResponseCode(307)
            request.setHeader(b"location", self.storage.encode())
            return b""
        return b"manifest of " + path.encode()


class Storage(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.authorizations: list[bytes | None] = []

    def render_GET(self, request: IRequest) -> bytes:
        self.authorizations.append(request.getHeader(b"authorization"))
        return b"blob bytes"


class OverTCPTests(TestCase):
    def setUp(self) -> None:
        self.token_server = TokenServer(expires_in=120)
        self.storage = Storage()
        token_port = self._listen(self.token_server)
        storage_port = self._listen(self.storage)
        self.registry = Registry(
            self.token_server, url_of(token_port, "/token"), url_of(storage_port, "/blob")
        )
        self.registry_url = url_of(self._listen(self.registry), "").rstrip("/")
        self.clock = Clock()
        self.events: list[LogEvent] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = upstream_client(
            Agent(reactor, pool=pool),
            authenticate=registry_authentication(
                self.clock, {self.registry_url: Credentials(USER, PASSWORD)}
            ),
        )

    def _listen(self, resource: Resource) -> IListeningPort:
        port = listen(resource)
        self.addCleanup(port.stopListening)
        return port

    async def _get(self, path: str) -> tuple[int, bytes]:
        response = await self.client.request("GET", self.registry_url + path)
        body, complete = await read_bounded(response, 1 << 20)
        self.assertTrue(complete)
        return response.code, body

    async def test_token_flow(self) -> None:
        manifests = [f"/v2/team/app/manifests/v{i}" for i in range(4)]
        for path in manifests:
            self.assertEqual(await self._get(path), (200, b"manifest of " + path.encode()))
        # N requests of one repository: one token, one 401.
        self.assertEqual(self.token_server.issued, ["secret-token-1"])
        self.assertEqual([a for _, a in self.registry.seen].count(None), 1)
        self.assertEqual(
            self.token_server.queries,
            [{b"service": [b"test"], b"scope": [b"repository:team/app:pull"]}],
        )
        # The realm is on the registry's host: the credentials go there.
        self.assertEqual(self.token_server.authorizations, [BASIC])

        # A blob: 307 to the storage origin, which sees no Authorization.
        self.assertEqual(await self._get(BLOB), (200, b"blob bytes"))
        self.assertEqual(self.storage.authorizations, [None])
        self.assertEqual(self.registry.seen[-1], (BLOB, b"Bearer secret-token-1"))

        # Kept until expires_in, then fetched again.
        self.clock.advance(119)
        await self._get(manifests[0])
        self.assertEqual(len(self.token_server.issued), 1)
        self.clock.advance(1)
        await self._get(manifests[0])
        self.assertEqual(len(self.token_server.issued), 2)
        self.assertEqual(
            self.registry.seen[-2:],
            [(manifests[0], None), (manifests[0], b"Bearer secret-token-2")],
        )

        # A kept token refused: dropped, a new one fetched, retried once.
        self.registry.revoked.add("secret-token-2")
        self.assertEqual(await self._get(manifests[1]), (200, b"manifest of " + manifests[1].encode()))
        self.assertEqual(
            self.registry.seen[-2:],
            [(manifests[1], b"Bearer secret-token-2"), (manifests[1], b"Bearer secret-token-3")],
        )

        # Every token refused: one retry, then the 401 goes up.
        self.registry.revoked.update(f"secret-token-{i}" for i in range(1, 10))
        seen = len(self.registry.seen)
        code, body = await self._get(manifests[2])
        self.assertEqual(code, 401)
        self.assertIn(b"UNAUTHORIZED", body)
        self.assertEqual(len(self.registry.seen) - seen, 2)

        fetched = [e for e in self.events if e.get("event") == "registry_token_fetched"]
        self.assertEqual(
            [(e["scope"], e["expires_in"]) for e in fetched],
            [("repository:team/app:pull", 120.0)] * 4,
        )
        shown = "\n".join(formatEvent(e) + repr(e) for e in self.events)
        for secret in (*SECRETS, "secret-token"):
            self.assertNotIn(secret, shown)


class FetcherTests(SynchronousTestCase):
    """
    The agent under the real fetcher: what it passes up is read and stored
    like any response.
    """

    def _fetch(self, answer: Answer) -> tuple[int, bytes, Store]:
        clock = Clock()
        store = Store.open(self.mktemp(), 1 << 30, clock)
        self.addCleanup(store.close)
        client = upstream_client(
            ScriptedAgent(answer),
            authenticate=registry_authentication(clock, {REGISTRY: None}),
        )
        fetched = Fetcher(store, client, clock).fetch(
            UpstreamRequest(key="oci:test", url=REGISTRY + MANIFEST, follow_redirects=True)
        )
        result: UpstreamAnswer = self.successResultOf(fetched)
        assert result.body is not None
        self.addCleanup(result.body.close)
        return result.status, result.body.read(0, result.body.available()), store

    def test_token_flow_stored(self) -> None:
        status, body, store = self._fetch(TokenRegistry())
        self.assertEqual((status, body), (200, b"manifest " + MANIFEST.encode()))
        stored = store.lookup("oci:test")
        assert stored is not None
        self.addCleanup(stored.close)

    def test_refused_token_passes_the_registry_401_up(self) -> None:
        error = b'{"errors":[{"code":"UNAUTHORIZED","message":"no"}]}'
        registry = TokenRegistry(token_status=401)

        def answer(sent: Sent) -> FakeResponse:
            if sent.path == MANIFEST:
                return unauthorized(challenge(), body=error)
            return registry(sent)

        status, body, store = self._fetch(answer)
        self.assertEqual((status, body), (401, error))
        self.assertIsNone(store.lookup("oci:test"))
