"""
Credentials for upstreams (issue 12, item 1): user information in
``--mirror`` / ``--pypi-upstream`` / ``$PIP_INDEX_URL`` URLs and ``--netrc``
entries become ``Authorization: Basic`` on requests to that origin only
(never across a redirect to another one), and are never printed: not in
responses, logs, the status page, metrics, ``--help`` or option errors.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import eventAsJSON, formatEvent, globalLogPublisher
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IRequest, IResponse
from twisted.web.resource import Resource
from zope.interface import implementer

from buildcache.credentials import (
    Credentials,
    NetrcCredentials,
    Origin,
    UpstreamCredentials,
    hide_userinfo,
    masked_url,
    read_netrc,
    shown_url,
    split_userinfo,
)
from buildcache.fetch.credentials import CredentialsAgent
from buildcache.options import Options
from buildcache.turns import after_io
from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import (
    Client,
    FakeUpstream,
    GatedBody,
    Running,
    listen,
    reactor,
    start_server,
)
from tests.test_simple_index import PIP_ACCEPT, WHEEL_A2

USER = "builder"
TOKEN = "tok-9f3Kq7Zr2Lm"
BASIC = "Basic " + base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()
#: Every form in which the secret could leak.
SECRETS = (TOKEN, base64.b64encode(f"{USER}:{TOKEN}".encode()).decode())


def port_of(port: Any) -> int:
    return int(port.getHost().port)


class SplitUserinfoTests(SynchronousTestCase):
    def test_split(self) -> None:
        self.assertEqual(
            split_userinfo("http://u:t@127.0.0.1:81/simple"),
            ("http://127.0.0.1:81/simple", Credentials("u", "t")),
        )

    def test_percent_decoded(self) -> None:
        """
        A token holding ``@`` or ``:`` is written percent-encoded, as pip
        reads it.
        """
        url, credentials = split_userinfo("https://me%40corp:a%3Ab%40c@[::1]:8443/x")
        self.assertEqual(url, "https://[::1]:8443/x")
        self.assertEqual(credentials, Credentials("me@corp", "a:b@c"))

    def test_user_only(self) -> None:
        self.assertEqual(
            split_userinfo("http://token@h/x"), ("http://h/x", Credentials("token", ""))
        )

    def test_none(self) -> None:
        self.assertEqual(split_userinfo("http://h:80/a@b"), ("http://h:80/a@b", None))


class OriginTests(SynchronousTestCase):
    def test_default_ports_and_case(self) -> None:
        self.assertEqual(Origin.of("HTTP://Box.Example/x"), Origin("http", "box.example", 80))
        self.assertEqual(Origin.of(b"https://h/"), Origin("https", "h", 443))
        self.assertEqual(Origin.of("http://[::1]:8080/"), Origin("http", "::1", 8080))
        self.assertEqual(str(Origin.of("http://[::1]:8080/")), "http://[::1]:8080")

    def test_refused(self) -> None:
        for url in ("ftp://h/", "/x", "http:///x"):
            self.assertRaises(ValueError, Origin.of, url)


class UpstreamCredentialsTests(SynchronousTestCase):
    netrc = NetrcCredentials(
        {"127.0.0.1": Credentials("n", "netrc-pass"), "::1": Credentials("v6", "p6")}
    )

    def test_same_origin_only(self) -> None:
        """
        Scheme, host and port must all match the configured upstream's.
        """
        table = UpstreamCredentials.build(
            [split_userinfo("http://u:t@127.0.0.1:81/simple")]
        )
        self.assertEqual(table.for_url("http://127.0.0.1:81/files/x"), Credentials("u", "t"))
        self.assertEqual(table.for_url(b"http://127.0.0.1:81"), Credentials("u", "t"))
        for other in (
            "http://127.0.0.1:82/simple", "https://127.0.0.1:81/simple",
            "http://127.0.0.2:81/simple", "http://localhost:81/simple", "not a url",
        ):
            self.assertIsNone(table.for_url(other), other)

    def test_url_wins_over_netrc(self) -> None:
        table = UpstreamCredentials.build(
            [
                split_userinfo("http://u:t@127.0.0.1:81/simple"),
                ("http://127.0.0.1:82/base", None),
                ("http://[::1]:83/base", None),
                ("http://127.0.0.2:84/base", None),
            ],
            self.netrc,
        )
        self.assertEqual(table.for_url("http://127.0.0.1:81/"), Credentials("u", "t"))
        self.assertEqual(table.for_url("http://127.0.0.1:82/"), Credentials("n", "netrc-pass"))
        self.assertEqual(table.for_url("http://[::1]:83/"), Credentials("v6", "p6"))
        self.assertIsNone(table.for_url("http://127.0.0.2:84/"))

    def test_netrc_default_entry(self) -> None:
        entries = NetrcCredentials.from_entries(
            {"Mirror.Local": ("m", None, "mp"), "default": ("d", None, "dp")}
        )
        self.assertEqual(entries.for_host("mirror.local"), Credentials("m", "mp"))
        self.assertEqual(entries.for_host("elsewhere"), Credentials("d", "dp"))

    def test_repr_never_shows_secrets(self) -> None:
        table = UpstreamCredentials.build(
            [split_userinfo(f"http://{USER}:{TOKEN}@127.0.0.1:81/simple")]
        )
        for text in (repr(table), repr(Credentials(USER, TOKEN)), repr(self.netrc)):
            self.assertNotIn(TOKEN, text)
            self.assertNotIn("netrc-pass", text)
        self.assertIn("http://127.0.0.1:81", repr(table))

    def test_shown_url(self) -> None:
        table = UpstreamCredentials.build([split_userinfo("http://u:t@127.0.0.1:81/s")])
        self.assertEqual(shown_url("http://127.0.0.1:81/s", table), "http://***@127.0.0.1:81/s")
        self.assertEqual(shown_url("http://127.0.0.1:82/s", table), "http://127.0.0.1:82/s")


class MaskedUrlTests(SynchronousTestCase):
    def test_masked(self) -> None:
        self.assertEqual(masked_url("http://h:1/x"), "http://h:1/x")
        self.assertEqual(
            masked_url("http://u:t'o k<@host:99999/x"), "http://***@host:99999/x"
        )
        self.assertEqual(masked_url("u:p@host/x"), "***@host/x")
        self.assertEqual(masked_url("http://u:a@b@host/"), "http://***@host/")


class HideUserinfoTests(SynchronousTestCase):
    def test_hidden(self) -> None:
        cases = {
            "http://u:t@h/x": "http://***@h/x",
            "'ftp://u:t@h:bad/' is not valid": "'ftp://***@h:bad/' is not valid",
            # A raw "/" or "@" in a token: the URL parses another way.
            "http://u:a/b@h/": "http://***@h/",
            "http://u:a@b@h/": "http://***@h/",
            "x=http://u:t@h y=https://v:w@k": "x=http://***@h y=https://***@k",
            "http://h/plain": "http://h/plain",
        }
        for text, hidden in cases.items():
            self.assertEqual(hide_userinfo(text), hidden, text)


class NetrcFileTests(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_read(self) -> None:
        path = self.write(
            f"machine 127.0.0.1 login {USER} password {TOKEN}\n"
            "machine [::1] login v6 password p6\n"
        )
        entries = read_netrc(path)
        self.assertEqual(entries.for_host("127.0.0.1"), Credentials(USER, TOKEN))
        self.assertEqual(entries.for_host("::1"), Credentials("v6", "p6"))
        self.assertIsNone(entries.for_host("127.0.0.2"))

    def test_syntax_error_does_not_quote_the_file(self) -> None:
        """
        Python's netrc quotes the token it choked on, which may be a
        password: the message gives the file and line only.
        """
        path = self.write(f"machine h login u password\n{TOKEN} oops\n")
        with self.assertRaises(ValueError) as caught:
            read_netrc(path)
        self.assertNotIn(TOKEN, str(caught.exception))
        self.assertIn(path, str(caught.exception))

    def test_missing(self) -> None:
        with self.assertRaises(ValueError) as caught:
            read_netrc(self.mktemp())
        self.assertIn("cannot read", str(caught.exception))


@implementer(IAgent)
class RecordingAgent:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Headers]] = []

    def request(
        self, method: bytes, uri: bytes, headers: Headers | None = None,
        bodyProducer: Any = None,
    ) -> Deferred[IResponse]:
        assert headers is not None
        self.sent.append((uri, headers))
        return succeed(None)  # type: ignore[arg-type]


class CredentialsAgentTests(SynchronousTestCase):
    def test_added_to_its_origin_only(self) -> None:
        inner = RecordingAgent()
        table = UpstreamCredentials.build([split_userinfo(f"http://{USER}:{TOKEN}@127.0.0.1:81/s")])
        agent = CredentialsAgent(inner, table)
        given = Headers({b"accept": [b"*/*"]})
        agent.request(b"GET", b"http://127.0.0.1:81/s/x/", given)
        agent.request(b"GET", b"http://127.0.0.1:82/s/x/", Headers())
        agent.request(b"GET", b"http://127.0.0.1:81/s/y/", Headers({b"authorization": [b"Bearer own"]}))
        sent = [(uri, headers.getRawHeaders(b"authorization")) for uri, headers in inner.sent]
        self.assertEqual(
            sent,
            [
                (b"http://127.0.0.1:81/s/x/", [BASIC.encode()]),
                (b"http://127.0.0.1:82/s/x/", None),
                # A client's own credentials are sent as they are.
                (b"http://127.0.0.1:81/s/y/", [b"Bearer own"]),
            ],
        )
        # The caller's headers are not changed.
        self.assertFalse(given.hasHeader(b"authorization"))


class BasicAuthGate(Resource):
    """
    An origin that answers 401 unless the request carries the right Basic
    credentials, and records the ``Authorization`` of every request.
    """

    isLeaf = True

    def __init__(self, inner: Resource, expected: str = BASIC,
                 redirects: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.expected = expected
        self.redirects = dict(redirects or {})
        self.seen: list[tuple[str, str | None]] = []

    def render(self, request: IRequest) -> Any:
        path = request.uri.decode("latin-1")
        got = request.getHeader(b"authorization")
        self.seen.append((path, got.decode("latin-1") if got else None))
        if got is None or got.decode("latin-1") != self.expected:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="test"')
            return b"who are you?\n"
        if path in self.redirects:
            request.setResponseCode(302)
            request.setHeader(b"location", self.redirects[path].encode("ascii"))
            return b""
        return self.inner.render(request)


class Recorder(Resource):
    """An origin that records the headers it got and serves a body."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.seen: list[Headers] = []

    def render_GET(self, request: IRequest) -> bytes:
        self.seen.append(request.requestHeaders.copy())
        return self.body


def serve_options(
    testcase: TestCase, *arguments: str, environ: Mapping[str, str] | None = None
) -> Running:
    """
    A server built from a command line, as twistd builds it.
    """
    options = Options({"HOME": testcase.mktemp(), **(environ or {})})
    options.parseOptions(["--cache-dir", testcase.mktemp(), *arguments])
    config = options.config
    return start_server(
        testcase,
        {
            "mirrors": config.mirrors,
            "pypi_upstreams": config.pypi_upstreams,
            "allow_upstream": config.allow_upstream,
            "upstream_credentials": config.upstream_credentials,
            "netrc_file": config.netrc_file,
        },
    )


class OverHTTPTests(TestCase):
    """
    A pip index and a mirror behind origins that answer 401 without the
    right credentials.
    """

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        self.fixture = build_index(self.mktemp())
        self.index = StaticSimpleIndex(self.fixture)
        self.index_gate = BasicAuthGate(self.index)
        index_port = listen(self.index_gate)
        self.addCleanup(index_port.stopListening)
        self.index_address = f"127.0.0.1:{port_of(index_port)}"
        self.files = FakeUpstream()
        self.deb = b"a package\n" * 1000
        self.files.bodies["/base/pool/a.deb"] = GatedBody(self.deb)
        self.other = Recorder(b"elsewhere\n")
        other_port = listen(self.other)
        self.addCleanup(other_port.stopListening)
        self.other_url = f"http://127.0.0.1:{port_of(other_port)}/moved.deb"
        self.mirror_gate = BasicAuthGate(
            self.files,
            redirects={
                "/base/away.deb": self.other_url,
                "/base/same.deb": "/base/pool/a.deb",
            },
        )
        mirror_port = listen(self.mirror_gate)
        self.addCleanup(mirror_port.stopListening)
        self.mirror_address = f"127.0.0.1:{port_of(mirror_port)}"
        self.client = Client()

    async def exercise(self, running: Running) -> list[bytes]:
        """
        Use both front ends as a client would, including their error
        paths, and return every body received.
        """
        index = f"http://127.0.0.1:{running.index_port}"
        proxy = f"http://127.0.0.1:{running.proxy_port}"
        bodies = []
        page = await self.client.get(f"{index}/simple/bcdemo-a/", {"accept": PIP_ACCEPT})
        self.assertEqual(page.status, 200, page.body)
        wheel = await self.client.get(f"{index}/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((wheel.status, wheel.body), (200, self.fixture.content(WHEEL_A2)))
        mirrored = await self.client.get(f"{proxy}/up/pool/a.deb")
        self.assertEqual((mirrored.status, mirrored.body), (200, self.deb))
        bodies += [page.body, mirrored.body]
        # The error bodies, which quote the upstream URL.
        missing = await self.client.get(f"{index}/simple/no-such-project/")
        self.assertEqual(missing.status, 404)
        self.assertIn(f"http://{self.index_address}/simple".encode(), missing.body)
        self.index.broken = True
        failed = await self.client.get(f"{index}/simple/bcdemo-b/")
        self.assertEqual(failed.status, 502)
        self.index.broken = False
        self.files.status_override = 500
        upstream_500 = await self.client.get(f"{proxy}/up/pool/b.deb")
        self.files.status_override = None
        bodies += [missing.body, failed.body, upstream_500.body]
        for port in (running.proxy_port, running.index_port):
            for path in ("/", "/-/stats.json", "/-/metrics"):
                shown = await self.client.get(f"http://127.0.0.1:{port}{path}")
                self.assertEqual(shown.status, 200)
                bodies.append(shown.body)
        await after_io(reactor)
        return bodies

    def assert_never_printed(self, bodies: list[bytes]) -> None:
        for body in bodies:
            for secret in SECRETS:
                self.assertNotIn(secret.encode(), body)
        self.assertTrue(self.events)
        for event in self.events:
            for text in (formatEvent(event), eventAsJSON(event), repr(event)):
                for secret in SECRETS:
                    self.assertNotIn(secret, text)

    def assert_sent_everywhere(self) -> None:
        """
        Every request to both origins carried the credentials.
        """
        for gate in (self.index_gate, self.mirror_gate):
            self.assertTrue(gate.seen)
            self.assertEqual({auth for _, auth in gate.seen}, {BASIC}, gate.seen)

    async def test_url_userinfo(self) -> None:
        """
        Credentials in the URLs of --pypi-upstream and --mirror: both
        front ends work, and the token is printed nowhere (the status page
        marks those upstreams ***@).
        """
        running = serve_options(
            self,
            "--pypi-upstream", f"http://{USER}:{TOKEN}@{self.index_address}/simple/",
            "--mirror", f"up=http://{USER}:{TOKEN}@{self.mirror_address}/base",
        )
        bodies = await self.exercise(running)
        self.assert_sent_everywhere()
        self.assert_never_printed(bodies)
        stats = json.loads(bodies[-5])
        self.assertIn(
            f"http://***@{self.index_address}/simple", stats["config"]["pypi_upstreams"]
        )
        self.assertIn(
            {"name": "up", "url": f"http://***@{self.mirror_address}/base"},
            stats["config"]["mirrors"],
        )

    async def test_refused_credentials_make_an_unhealthy_upstream(self) -> None:
        """
        An upstream that refuses the configured credentials is shown as
        failing on the status page, with a warning naming what to check
        (before: counted as a success, and nothing logged).
        """
        running = serve_options(
            self, "--mirror", f"up=http://{USER}:wrong-{TOKEN}@{self.mirror_address}/base",
        )
        refused = await self.client.get(f"http://127.0.0.1:{running.proxy_port}/up/pool/a.deb")
        self.assertEqual(refused.status, 401)
        stats = json.loads(
            (await self.client.get(f"http://127.0.0.1:{running.proxy_port}/-/stats.json")).body
        )
        (health,) = [u for u in stats["upstreams"] if self.mirror_address in u["host"]]
        self.assertEqual((health["errors"], health["successes"]), (1, 0), health)
        warnings = [e for e in self.events if e.get("event") == "upstream_refused_credentials"]
        self.assertEqual([e["status"] for e in warnings], [401])
        self.assert_never_printed([refused.body])

    async def test_not_sent_through_the_forward_proxy(self) -> None:
        """
        The operator's credentials go with the mirror route, not with a
        forward-proxy request to the same origin: any allowed client can
        name any path of that host there (before: an authenticated GET of
        the whole host for anyone on the LAN).
        """
        running = serve_options(
            self,
            "--mirror", f"up=http://{USER}:{TOKEN}@{self.mirror_address}/base",
            "--allow-upstream", self.mirror_address,
        )
        proxied = await Client(proxy_port=running.proxy_port).get(
            f"http://{self.mirror_address}/admin/secret-area"
        )
        self.assertEqual(proxied.status, 401)
        self.assertEqual(self.mirror_gate.seen, [("/admin/secret-area", None)])
        mirrored = await self.client.get(f"http://127.0.0.1:{running.proxy_port}/up/pool/a.deb")
        self.assertEqual((mirrored.status, mirrored.body), (200, self.deb))
        self.assertEqual(self.mirror_gate.seen[-1], ("/base/pool/a.deb", BASIC))

    async def test_pip_index_url(self) -> None:
        """
        Credentials in $PIP_INDEX_URL, the default upstream.
        """
        running = serve_options(
            self,
            "--mirror", f"up=http://{USER}:{TOKEN}@{self.mirror_address}/base",
            environ={"PIP_INDEX_URL": f"http://{USER}:{TOKEN}@{self.index_address}/simple"},
        )
        bodies = await self.exercise(running)
        self.assert_sent_everywhere()
        self.assert_never_printed(bodies)

    async def test_netrc(self) -> None:
        """
        Credentials from --netrc, for every configured upstream on a host
        it names; the file's path is shown, not its content.
        """
        netrc = os.path.abspath(self.mktemp())
        with open(netrc, "w") as f:
            f.write(f"machine 127.0.0.1\n  login {USER}\n  password {TOKEN}\n")
        running = serve_options(
            self,
            "--netrc", netrc,
            "--pypi-upstream", f"http://{self.index_address}/simple",
            "--mirror", f"up=http://{self.mirror_address}/base",
        )
        bodies = await self.exercise(running)
        self.assert_sent_everywhere()
        self.assert_never_printed(bodies)
        self.assertIn(netrc.encode(), bodies[-6])

    async def test_without_credentials_the_origin_refuses(self) -> None:
        """
        The origins of these tests do refuse a request without them.
        """
        running = serve_options(
            self,
            "--pypi-upstream", f"http://{self.index_address}/simple",
            "--mirror", f"up=http://{self.mirror_address}/base",
        )
        page = await self.client.get(
            f"http://127.0.0.1:{running.index_port}/simple/bcdemo-a/"
        )
        self.assertEqual(page.status, 502)
        mirrored = await self.client.get(
            f"http://127.0.0.1:{running.proxy_port}/up/pool/a.deb"
        )
        self.assertEqual(mirrored.status, 401)
        self.assertEqual({auth for _, auth in self.mirror_gate.seen}, {None})

    async def test_not_sent_across_a_redirect_to_another_origin(self) -> None:
        """
        A redirect to another origin (another port of 127.0.0.1) is
        followed without the credentials; one within the origin keeps
        them.
        """
        running = serve_options(
            self,
            "--pypi-upstream", f"http://{self.index_address}/simple",
            "--mirror", f"up=http://{USER}:{TOKEN}@{self.mirror_address}/base",
            "--allow-upstream", "127.0.0.1",
        )
        proxy = f"http://127.0.0.1:{running.proxy_port}"
        away = await self.client.get(f"{proxy}/up/away.deb")
        self.assertEqual((away.status, away.body), (200, b"elsewhere\n"))
        self.assertEqual(len(self.other.seen), 1)
        self.assertIsNone(self.other.seen[0].getRawHeaders(b"authorization"))
        same = await self.client.get(f"{proxy}/up/same.deb")
        self.assertEqual((same.status, same.body), (200, self.deb))
        self.assertEqual(
            self.mirror_gate.seen,
            [("/base/away.deb", BASIC), ("/base/same.deb", BASIC), ("/base/pool/a.deb", BASIC)],
        )
        # Nor does a client that asks the proxy for the other origin get them.
        direct = Client(proxy_port=running.proxy_port)
        fetched = await direct.get(self.other_url.replace("moved", "direct"))
        self.assertEqual(fetched.status, 200)
        self.assertIsNone(self.other.seen[-1].getRawHeaders(b"authorization"))


class OptionTests(SynchronousTestCase):
    """
    Neither --help nor the option parser's errors echo a token.
    """

    def usage_error(self, *arguments: str, **environ: str) -> str:
        options = Options({"HOME": self.mktemp(), **environ})
        try:
            options.parseOptions(["--cache-dir", self.mktemp(), *arguments])
        except UsageError as error:
            return str(error)
        raise AssertionError(f"{arguments!r} parsed without error")

    def test_help(self) -> None:
        options = Options(
            {"HOME": self.mktemp(), "PIP_INDEX_URL": f"http://{USER}:{TOKEN}@127.0.0.1:9/simple"}
        )
        text = options.getUsage(width=1000)
        self.assertNotIn(TOKEN, text)
        self.assertIn("http://***@127.0.0.1:9/simple", text)
        self.assertIn("--netrc", text)

    def test_errors(self) -> None:
        cases: list[tuple[tuple[str, ...], dict[str, str]]] = [
            (("--pypi-upstream", f"http://{USER}:{TOKEN}@127.0.0.1:bad/simple"), {}),
            (("--pypi-upstream", f"ftp://{USER}:{TOKEN}@127.0.0.1/simple"), {}),
            (("--pypi-upstream", f"http://{USER}:{TOKEN[:4]}/{TOKEN[4:]}@127.0.0.1/"), {}),
            (("--mirror", f"http://{USER}:{TOKEN}@127.0.0.1/alpine"), {}),
            (("--mirror", f"http://{USER}:{TOKEN[:3]}={TOKEN[3:]}@127.0.0.1/x"), {}),
            (("--mirror", f"a=http://{USER}:{TOKEN}@127.0.0.1:99999/x"), {}),
            ((), {"PIP_INDEX_URL": f"file://{USER}:{TOKEN}@127.0.0.1/simple"}),
            # A quote, a space or "<" ended the pattern that hid tokens.
            (("--pypi-upstream", f"http://{USER}:{TOKEN[:4]}'{TOKEN[4:]}@127.0.0.1:99999/simple/"), {}),
            (("--pypi-upstream", f"http://{USER}:{TOKEN[:4]} {TOKEN[4:]}@127.0.0.1:99999/simple/"), {}),
            (("--mirror", f"a=http://{USER}:{TOKEN[:4]}<{TOKEN[4:]}@127.0.0.1:bad/x"), {}),
            # A raw "/" after a numeric start parsed as host:port and path.
            (("--pypi-upstream", f"http://{USER}:1234/{TOKEN}@127.0.0.1/simple/"), {}),
            (("--mirror", f"a=http://{USER}:1234/{TOKEN}@127.0.0.1/alpine"), {}),
        ]
        for arguments, environ in cases:
            message = self.usage_error(*arguments, **environ)
            self.assertNotIn(TOKEN, message)
            for piece in (TOKEN[:4], TOKEN[4:], TOKEN[:3], TOKEN[3:]):
                self.assertNotIn(piece, message, (arguments, message))

    def test_errors_show_where(self) -> None:
        """
        With the token hidden, the message still shows the host and port,
        so an operator with several --mirror options can tell which is wrong.
        """
        message = self.usage_error(
            "--mirror", f"a=http://{USER}:{TOKEN[:4]}'{TOKEN[4:]}@127.0.0.1:99999/x"
        )
        self.assertIn("http://***@127.0.0.1:99999/x", message)
        self.assertNotIn(TOKEN[4:], message)

    def test_netrc_errors(self) -> None:
        broken = self.mktemp()
        with open(broken, "w") as f:
            f.write(f"machine 127.0.0.1 login u password\n{TOKEN} nonsense\n")
        message = self.usage_error(
            "--pypi-upstream", "http://127.0.0.1:9/simple", "--netrc", broken
        )
        self.assertTrue(message.startswith("--netrc: "), message)
        self.assertNotIn(TOKEN, message)
        missing = self.usage_error(
            "--pypi-upstream", "http://127.0.0.1:9/simple", "--netrc", self.mktemp()
        )
        self.assertTrue(missing.startswith("--netrc: "), missing)

    def test_credentials_kept_off_the_urls(self) -> None:
        options = Options({"HOME": self.mktemp()})
        options.parseOptions([
            "--cache-dir", self.mktemp(),
            "--pypi-upstream", f"http://{USER}:{TOKEN}@127.0.0.1:9/simple/",
            "--mirror", f"up=https://{USER}:{TOKEN}@[::1]:8443/base/",
        ])
        config = options.config
        self.assertEqual(config.pypi_upstreams, ("http://127.0.0.1:9/simple",))
        self.assertEqual(config.mirrors[-1].url, "https://[::1]:8443/base")
        credentials = config.upstream_credentials
        self.assertEqual(credentials.for_url("http://127.0.0.1:9/x"), Credentials(USER, TOKEN))
        self.assertEqual(credentials.for_url("https://[::1]:8443/x"), Credentials(USER, TOKEN))
        self.assertNotIn(TOKEN, repr(config))
