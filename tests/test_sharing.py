"""
Which stored response may answer which request, over HTTP through the
running proxy: the scheme is part of the key, a response to a request with
the client's credentials reaches only the holder of the same credentials,
and a response with ``Vary`` answers only requests that buildcache would
send upstream with the same values.  Plus the key rules themselves, as
pure functions.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Mapping

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from buildcache.config import Mirror
from buildcache.store import SECRET_NAME, StoreError, cache_secret
from buildcache.upstream import (
    PRIVATE_MARK,
    VARIANT_MARK,
    UpstreamRequest,
    cache_key,
    private_family,
    stored_key_for,
    variant_key,
    variants_to_drop,
)
from tests.test_store import make_version_1_cache
from tests.support import Client, Received, listen, start_server, url_of

DEB = "/debian/pool/main/h/hello/hello_2.10-3_amd64.deb"
WHEEL = "/packages/bcdemo_a-2.0-py3-none-any.whl"
PAGE = "/docs/page.txt"
SECRET = b"s" * 32

A = "Basic YWxpY2U6c2VjcmV0"
B = "Basic Ym9iOmh1bnRlcjI="


class Origin(Resource):
    """
    An origin whose body names the request headers that matter here (so a
    client can tell whose response it got), with the ``Cache-Control`` and
    ``Vary`` a test chooses, an ETag per body, and 304 to a matching
    ``If-None-Match``.  Counts requests per path and per credentials.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.cache_control = "max-age=0, must-revalidate"
        self.vary: str | None = None
        self.status: int | None = None
        self.requests: Counter[str] = Counter()
        self.seen: list[tuple[str, str | None, str | None]] = []
        self.gate: Deferred[None] | None = None

    def body_for(self, request: IRequest) -> bytes:
        def header(name: bytes) -> str:
            value = request.getHeader(name)
            return value.decode("latin-1") if value is not None else "-"

        return (
            f"{request.uri.decode()} auth={header(b'authorization')}"
            f" cookie={header(b'cookie')} lang={header(b'accept-language')}\n"
        ).encode()

    def render(self, request: IRequest) -> object:
        path = request.uri.decode()
        self.requests[path] += 1
        auth = request.getHeader(b"authorization")
        conditional = request.getHeader(b"if-none-match")
        self.seen.append((
            path,
            auth.decode() if auth is not None else None,
            conditional.decode() if conditional is not None else None,
        ))
        if self.status is not None:
            request.setResponseCode(self.status)
            return b"failing\n"
        body = self.body_for(request)
        etag = f'"{abs(hash(body)):x}"'
        request.setHeader(b"etag", etag.encode())
        request.setHeader(b"cache-control", self.cache_control.encode())
        if self.vary is not None:
            request.setHeader(b"vary", self.vary.encode())
        if conditional is not None and conditional.decode() == etag:
            request.setResponseCode(304)
            return b""
        request.setHeader(b"content-type", b"application/octet-stream")
        if self.gate is None:
            return body
        gate = self.gate

        def rest(_: object) -> None:
            request.write(body)
            request.finish()

        gate.addCallback(rest)
        return NOT_DONE_YET


class Box:
    """
    A running buildcache with the mirror route ``/up/`` to an
    :class:`Origin` on 127.0.0.1.
    """

    def __init__(self, testcase: TestCase, extra: tuple[Mirror, ...] = ()) -> None:
        self.origin = Origin()
        self.port = listen(self.origin)
        testcase.addCleanup(self.port.stopListening)
        self.base = url_of(self.port).rstrip("/")
        self.running = start_server(
            testcase, {"mirrors": (Mirror("up", self.base), *extra)}
        )
        self.client = Client()

    async def get(
        self, path: str, headers: Mapping[str, str] | None = None, proxy: bool = False,
        route: str = "up",
    ) -> Received:
        if proxy:
            received = await Client(proxy_port=self.running.proxy_port).get(
                self.base + path, headers
            )
        else:
            received = await self.client.get(
                f"http://127.0.0.1:{self.running.proxy_port}/{route}{path}", headers
            )
        await self.running.server.fetcher.when_idle()
        return received

    def keys(self) -> set[str]:
        return {entry.key for entry in self.running.store.keys()}


def expected(path: str, auth: str = "-", cookie: str = "-", lang: str = "-") -> bytes:
    return f"{path} auth={auth} cookie={cookie} lang={lang}\n".encode()


# -- item 8: the scheme ----------------------------------------------------


class SchemeTests(TestCase):
    """
    A plain-http fetch never fills the entry an https mirror route serves.
    """

    timeout = 20

    async def test_plain_http_fetch_does_not_feed_the_https_route(self) -> None:
        """
        The https route to the same host and port as a plain-http proxied
        fetch is no HIT of that fetch's entry: it goes upstream over TLS
        (which this plain origin cannot speak, hence a 502), and the store
        holds only the ``http://`` key.
        """
        origin = Origin()
        origin.cache_control = "max-age=600"
        factory = _TLSRefusing(Site(origin))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = url_of(port).rstrip("/")
        https_base = "https://" + base.removeprefix("http://")
        running = start_server(
            self, {"mirrors": (Mirror("up", base), Mirror("sec", https_base))}
        )
        proxied = await Client(proxy_port=running.proxy_port).get(base + DEB)
        await running.server.fetcher.when_idle()
        self.assertEqual((proxied.status, proxied.header("x-cache")), (200, "MISS"))
        secure = await Client().get(f"http://127.0.0.1:{running.proxy_port}/sec{DEB}")
        await running.server.fetcher.when_idle()
        self.assertNotEqual(secure.header("x-cache"), "HIT")
        self.assertEqual(secure.status, 502)
        self.assertNotIn(proxied.body, secure.body)
        self.assertEqual({e.key for e in running.store.keys()}, {base + DEB})
        # The https route went upstream (one TLS handshake); the plain
        # origin answered one request.
        self.assertEqual((factory.handshakes, origin.requests[DEB]), (1, 1))
        # The plain-http route itself still shares its entry with the proxy.
        mirrored = await Client().get(f"http://127.0.0.1:{running.proxy_port}/up{DEB}")
        self.assertEqual((mirrored.header("x-cache"), mirrored.body), ("HIT", proxied.body))


class _TLSRefusing(WrappingFactory):
    """
    Plain HTTP on a port; a TLS handshake (what an ``https://`` upstream
    request sends first) is counted and its connection closed.
    """

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self.handshakes = 0

    def buildProtocol(self, addr: object) -> _Sniffing:
        return _Sniffing(self, self.wrappedFactory.buildProtocol(addr))


class _Sniffing(ProtocolWrapper):
    factory: _TLSRefusing
    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first and data[:1] == b"\x16":
            self.factory.handshakes += 1
            self.transport.loseConnection()
            return
        self._first = False
        super().dataReceived(data)


class UpgradeTests(TestCase):
    """
    A cache written before keys named their scheme starts and serves its
    entries on plain-http routes; an https route does not inherit them.
    """

    timeout = 20

    async def test_old_cache_serves_its_entries(self) -> None:
        origin = Origin()
        factory = _TLSRefusing(Site(origin))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        base = url_of(port).rstrip("/")
        cache_dir = self.mktemp()
        # As the code before this change wrote it: schema version 1, and a
        # key without a scheme.
        make_version_1_cache(
            os.path.abspath(cache_dir),
            {base.removeprefix("http://") + DEB: b"stored before the upgrade"},
        )
        # start_server makes its cache directory with mktemp.
        self.patch(self, "mktemp", lambda: cache_dir)
        running = start_server(
            self, {"mirrors": (Mirror("up", base), Mirror("sec", "https://" + base[7:]))}
        )
        self.assertEqual({e.key for e in running.store.keys()}, {base + DEB})
        for received in (
            await Client().get(f"http://127.0.0.1:{running.proxy_port}/up{DEB}"),
            await Client(proxy_port=running.proxy_port).get(base + DEB),
        ):
            self.assertEqual(
                (received.status, received.header("x-cache"), received.body),
                (200, "HIT", b"stored before the upgrade"),
            )
        secure = await Client().get(f"http://127.0.0.1:{running.proxy_port}/sec{DEB}")
        await running.server.fetcher.when_idle()
        self.assertEqual((secure.status, factory.handshakes), (502, 1))
        self.assertEqual(origin.requests[DEB], 0)


# -- item 2: private responses --------------------------------------------


class PrivateResponseTests(TestCase):
    """
    A response to a request with the client's credentials answers only
    requests with the same credentials, and only as its own directives
    allow, whatever the path's kind.
    """

    timeout = 20

    async def _private_entry_stays_private(self, path: str) -> None:
        box = Box(self)
        first = await box.get(path, {"authorization": A})
        self.assertEqual((first.status, first.body), (200, expected(path, auth=A)))
        (key,) = box.keys()
        self.assertTrue(key.startswith(box.base + path + PRIVATE_MARK), key)
        self.assertNotIn(A, key)
        anonymous = await box.get(path)
        self.assertEqual(anonymous.body, expected(path))
        self.assertEqual(anonymous.header("x-cache"), "MISS")
        other = await box.get(path, {"authorization": B})
        self.assertEqual(other.body, expected(path, auth=B))
        self.assertEqual(other.header("x-cache"), "MISS")
        self.assertEqual(box.origin.requests[path], 3)
        # max-age=0, must-revalidate: the holder's next request is
        # revalidated upstream, with the holder's credentials.
        again = await box.get(path, {"authorization": A})
        self.assertEqual(again.body, expected(path, auth=A))
        self.assertEqual(again.header("x-cache"), "REVALIDATED")
        self.assertEqual(box.origin.requests[path], 4)
        last_path, last_auth, conditional = box.origin.seen[-1]
        self.assertEqual((last_path, last_auth), (path, A))
        self.assertIsNotNone(conditional)
        # Not the year-long lifetime of a package path: the response's own.
        self.assertEqual(again.header("cache-control"), "max-age=0, must-revalidate")

    async def test_deb_path(self) -> None:
        await self._private_entry_stays_private(DEB)

    async def test_wheel_path(self) -> None:
        await self._private_entry_stays_private(WHEEL)

    async def test_fresh_private_entry_is_a_hit_for_its_holder(self) -> None:
        """
        ``public, max-age=600``: the same credentials get a HIT, others and
        anonymous clients still reach the origin; the holder's
        ``no-cache`` revalidates.
        """
        box = Box(self)
        box.origin.cache_control = "public, max-age=600"
        await box.get(DEB, {"authorization": A})
        hit = await box.get(DEB, {"authorization": A})
        self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", expected(DEB, auth=A)))
        self.assertEqual(box.origin.requests[DEB], 1)
        anonymous = await box.get(DEB)
        self.assertEqual((anonymous.header("x-cache"), anonymous.body), ("MISS", expected(DEB)))
        refreshed = await box.get(DEB, {"authorization": A, "cache-control": "no-cache"})
        self.assertEqual(refreshed.header("x-cache"), "REVALIDATED")
        self.assertEqual(box.origin.requests[DEB], 3)
        # The anonymous response is stored on its own, for everyone.
        again = await box.get(DEB)
        self.assertEqual((again.header("x-cache"), again.body), ("HIT", expected(DEB)))

    async def test_without_permission_not_stored(self) -> None:
        """
        Without ``public``, ``s-maxage`` or ``must-revalidate`` (RFC 9111
        section 3.5) a private response is not stored at all.
        """
        box = Box(self)
        box.origin.cache_control = "max-age=600"
        for _ in range(2):
            received = await box.get(WHEEL, {"authorization": A})
            self.assertEqual(received.body, expected(WHEEL, auth=A))
        self.assertEqual(box.origin.requests[WHEEL], 2)
        self.assertEqual(box.keys(), set())

    async def test_cookie_is_a_credential(self) -> None:
        box = Box(self)
        box.origin.cache_control = "public, max-age=600"
        await box.get(PAGE, {"cookie": "session=x"})
        same = await box.get(PAGE, {"cookie": "session=x"})
        self.assertEqual(
            (same.header("x-cache"), same.body), ("HIT", expected(PAGE, cookie="session=x"))
        )
        other = await box.get(PAGE, {"cookie": "session=y"})
        self.assertEqual(other.body, expected(PAGE, cookie="session=y"))
        anonymous = await box.get(PAGE)
        self.assertEqual(anonymous.body, expected(PAGE))
        self.assertEqual(box.origin.requests[PAGE], 3)
        self.assertTrue(all("session" not in key for key in box.keys()))

    async def test_must_revalidate_private_never_served_stale(self) -> None:
        """
        When revalidation fails, an anonymous entry is served stale (today's
        rule, for offline builds) but a private ``must-revalidate`` one is
        not: its holder gets a 504.
        """
        box = Box(self)
        box.origin.cache_control = "public, max-age=0, must-revalidate"
        await box.get(PAGE, {"authorization": A})
        await box.get(PAGE)
        box.origin.status = 500
        anonymous = await box.get(PAGE)
        self.assertEqual((anonymous.status, anonymous.header("x-cache")), (200, "STALE"))
        holder = await box.get(PAGE, {"authorization": A})
        self.assertEqual(holder.status, 504)
        self.assertNotIn(A.encode(), holder.body)

    async def test_concurrent_requests_with_other_credentials_do_not_share(self) -> None:
        box = Box(self)
        box.origin.cache_control = "public, max-age=600"
        box.origin.gate = Deferred()
        requests = [
            Deferred.fromCoroutine(box.get(PAGE, headers))
            for headers in ({"cookie": "a=1"}, {"cookie": "a=2"}, {})
        ]
        while box.origin.requests[PAGE] < 3:
            await _turn()
        box.origin.gate.callback(None)
        received = await gatherResults(requests)
        self.assertEqual(
            [r.body for r in received],
            [expected(PAGE, cookie="a=1"), expected(PAGE, cookie="a=2"), expected(PAGE)],
        )


async def _turn() -> None:
    await deferLater(reactor, 0.005)


# -- item 3: Vary ---------------------------------------------------------


class VaryTests(TestCase):
    """
    A response with ``Vary`` answers only requests that buildcache sends
    upstream with the same values of the headers it names.
    """

    timeout = 20

    async def test_each_language_its_own_variant(self) -> None:
        box = Box(self)
        box.origin.cache_control = "max-age=600"
        box.origin.vary = "Accept-Language"
        en = await box.get(PAGE, {"accept-language": "en"})
        fr = await box.get(PAGE, {"accept-language": "fr"})
        self.assertEqual((en.body, fr.body), (expected(PAGE, lang="en"), expected(PAGE, lang="fr")))
        self.assertEqual(box.origin.requests[PAGE], 2)
        for lang in ("en", "fr", "fr", "en"):
            again = await box.get(PAGE, {"accept-language": lang})
            self.assertEqual(
                (again.header("x-cache"), again.body), ("HIT", expected(PAGE, lang=lang))
            )
        anonymous = await box.get(PAGE)
        self.assertEqual((anonymous.header("x-cache"), anonymous.body), ("MISS", expected(PAGE)))
        self.assertEqual(box.origin.requests[PAGE], 3)
        self.assertTrue(all(VARIANT_MARK in key for key in box.keys()), box.keys())

    async def test_fifth_variant_evicts_the_least_recently_used(self) -> None:
        box = Box(self)
        box.origin.cache_control = "max-age=600"
        box.origin.vary = "Accept-Language"
        for lang in ("en", "fr", "de", "it"):
            await box.get(PAGE, {"accept-language": lang})
        hit = await box.get(PAGE, {"accept-language": "en"})
        self.assertEqual(hit.header("x-cache"), "HIT")
        self.assertEqual(len(box.keys()), 4)
        await box.get(PAGE, {"accept-language": "es"})
        self.assertEqual(len(box.keys()), 4)
        self.assertEqual(box.origin.requests[PAGE], 5)
        # fr was used least recently: gone; en, de, it, es remain.
        for lang in ("en", "de", "it", "es"):
            kept = await box.get(PAGE, {"accept-language": lang})
            self.assertEqual(
                (kept.header("x-cache"), kept.body), ("HIT", expected(PAGE, lang=lang))
            )
        self.assertEqual(box.origin.requests[PAGE], 5)
        gone = await box.get(PAGE, {"accept-language": "fr"})
        self.assertEqual((gone.header("x-cache"), gone.body), ("MISS", expected(PAGE, lang="fr")))

    async def test_accept_encoding_does_not_split(self) -> None:
        """
        buildcache always asks upstream for ``identity``, so pip's and apk's
        requests share one entry under ``Vary: Accept-Encoding``.
        """
        box = Box(self)
        box.origin.cache_control = "max-age=600"
        box.origin.vary = "Accept-Encoding"
        pip_like = await box.get(
            WHEEL, {"accept-encoding": "gzip, deflate", "user-agent": "pip/24.0"}
        )
        apk_like = await box.get(WHEEL, {"user-agent": "libfetch/2.0"})
        self.assertEqual((pip_like.header("x-cache"), apk_like.header("x-cache")), ("MISS", "HIT"))
        self.assertEqual(apk_like.body, pip_like.body)
        self.assertEqual(box.origin.requests[WHEEL], 1)
        self.assertEqual(box.keys(), {box.base + WHEEL})

    async def test_joined_download_of_another_variant(self) -> None:
        """
        Two clients of one URL at once share a download only when the
        response's ``Vary`` lets them: each language gets its own body.
        """
        box = Box(self)
        box.origin.cache_control = "max-age=600"
        box.origin.vary = "Accept-Language"
        box.origin.gate = gate = Deferred()
        first = Deferred.fromCoroutine(box.get(PAGE, {"accept-language": "en"}))
        while box.origin.requests[PAGE] < 1:
            await _turn()
        second = Deferred.fromCoroutine(box.get(PAGE, {"accept-language": "fr"}))
        third = Deferred.fromCoroutine(box.get(PAGE, {"accept-language": "en"}))
        await _turn()
        box.origin.gate = None
        gate.callback(None)
        received = await gatherResults([first, second, third])
        self.assertEqual(
            [r.body for r in received],
            [expected(PAGE, lang="en"), expected(PAGE, lang="fr"), expected(PAGE, lang="en")],
        )
        self.assertEqual(box.origin.requests[PAGE], 2)

    async def test_private_variants(self) -> None:
        """
        A private response that varies: its variants stay its holder's.
        """
        box = Box(self)
        box.origin.cache_control = "public, max-age=600"
        box.origin.vary = "Accept-Language"
        await box.get(PAGE, {"authorization": A, "accept-language": "en"})
        hit = await box.get(PAGE, {"authorization": A, "accept-language": "en"})
        self.assertEqual(hit.header("x-cache"), "HIT")
        anonymous = await box.get(PAGE, {"accept-language": "en"})
        self.assertEqual(anonymous.body, expected(PAGE, lang="en"))
        self.assertEqual(box.origin.requests[PAGE], 2)


# -- the rules as pure functions --------------------------------------------


class KeyRuleTests(SynchronousTestCase):
    def test_private_family(self) -> None:
        base = cache_key("http://mirror.test/pool/a.deb")
        self.assertEqual(private_family(base, SECRET, ()), base)
        a = private_family(base, SECRET, (("authorization", A),))
        b = private_family(base, SECRET, (("authorization", B),))
        self.assertTrue(a.startswith(base + PRIVATE_MARK))
        self.assertNotEqual(a, b)
        self.assertNotIn("YWxpY2U", a)
        # Keyed by the cache's secret: another cache names it otherwise.
        self.assertNotEqual(a, private_family(base, b"t" * 32, (("authorization", A),)))
        self.assertEqual(a, private_family(base, SECRET, (("authorization", A),)))
        with_cookie = private_family(
            base, SECRET, (("authorization", A), ("cookie", "s=1"))
        )
        self.assertNotEqual(a, with_cookie)

    def test_variant_key(self) -> None:
        family = "http://mirror.test/page"
        self.assertEqual(variant_key(family, SECRET, ()), family)
        en = variant_key(family, SECRET, (("accept-language", "en"),))
        fr = variant_key(family, SECRET, (("accept-language", "fr"),))
        none = variant_key(family, SECRET, (("accept-language", None),))
        self.assertEqual(len({en, fr, none}), 3)
        self.assertTrue(en.startswith(family + VARIANT_MARK))

    def test_stored_key_for(self) -> None:
        family = "http://mirror.test/page"
        sent = {"accept-language": "en", "user-agent": "x"}
        self.assertEqual(stored_key_for(family, SECRET, {}, sent), family)
        self.assertEqual(
            stored_key_for(family, SECRET, {"vary": "Accept-Encoding"}, sent), family
        )
        self.assertEqual(
            stored_key_for(family, SECRET, {"vary": "accept-language"}, sent),
            variant_key(family, SECRET, (("accept-language", "en"),)),
        )
        self.assertIsNone(stored_key_for(family, SECRET, {"vary": "*"}, sent))

    def test_variants_to_drop(self) -> None:
        family = "http://h/x"
        v = [f"{family}{VARIANT_MARK}{n}" for n in "abcde"]
        siblings = [(v[0], 1.0), (v[1], 5.0), (v[2], 3.0), (v[3], 4.0)]
        # A fifth variant: the least recently used of the four goes.
        self.assertEqual(variants_to_drop(family, v[4], siblings + [(v[4], 6.0)]), [v[0]])
        # A replaced variant drops nothing.
        self.assertEqual(variants_to_drop(family, v[1], siblings), [])
        # A response that no longer varies replaces every variant.
        self.assertEqual(
            sorted(variants_to_drop(family, family, siblings)), sorted(v[:4])
        )
        # A varying response replaces the entry that did not vary.
        self.assertEqual(variants_to_drop(family, v[0], [(family, 9.0)]), [family])
        # Another credentials' entries are not this family's variants.
        other = family + PRIVATE_MARK + "f" * 32
        self.assertEqual(variants_to_drop(family, family, [(other, 1.0)]), [])

    def test_may_join_compares_cookies(self) -> None:
        one = UpstreamRequest(key="k", url="http://h/x", headers={"cookie": "a=1"})
        two = UpstreamRequest(key="k", url="http://h/x", headers={"cookie": "a=2"})
        none = UpstreamRequest(key="k", url="http://h/x")
        self.assertFalse(one.may_join(two))
        self.assertFalse(none.may_join(one))
        self.assertTrue(one.may_join(UpstreamRequest(key="k", url="http://h/x", headers={"cookie": "a=1"})))

    def test_may_join_compares_the_entry_revalidated(self) -> None:
        a = UpstreamRequest(key="k", url="http://h/x", revalidates="k#v=1")
        b = UpstreamRequest(key="k", url="http://h/x", revalidates="k#v=2")
        self.assertFalse(a.may_join(b))


class SecretTests(SynchronousTestCase):
    def mktemp(self) -> str:
        # A cache directory as Store.open lays it out before the secret.
        directory = super().mktemp()
        os.makedirs(os.path.join(directory, "tmp"))
        return directory

    def test_made_once_private_to_its_owner(self) -> None:
        directory = self.mktemp()
        secret = cache_secret(directory)
        self.assertEqual(len(secret), 32)
        path = os.path.join(directory, SECRET_NAME)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(cache_secret(directory), secret)
        self.assertNotEqual(cache_secret(self._other()), secret)

    def test_a_broken_secret_is_replaced(self) -> None:
        directory = self.mktemp()
        path = os.path.join(directory, SECRET_NAME)
        with open(path, "wb") as half:
            half.write(b"short")
        with capturedLogs() as events:
            secret = cache_secret(directory)
        self.assertEqual(len(secret), 32)
        with open(path, "rb") as written:
            self.assertEqual(written.read(), secret)
        # Nothing left beside it: the new one was written in tmp/.
        self.assertEqual(sorted(os.listdir(directory)), [SECRET_NAME, "tmp"])
        self.assertEqual(os.listdir(os.path.join(directory, "tmp")), [])
        self.assertEqual([e["size"] for e in events if "size" in e], [5])

    def test_a_secret_others_can_read_is_made_private(self) -> None:
        directory = self.mktemp()
        secret = cache_secret(directory)
        path = os.path.join(directory, SECRET_NAME)
        os.chmod(path, 0o644)
        with capturedLogs() as events:
            self.assertEqual(cache_secret(directory), secret)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(len([e for e in events if e.get("path") == path]), 1)

    def test_a_link_is_not_followed(self) -> None:
        directory = self.mktemp()
        target = os.path.join(self._other(), "elsewhere")
        with open(target, "wb") as f:
            f.write(b"x" * 32)
        os.symlink(target, os.path.join(directory, SECRET_NAME))
        self.assertRaises(StoreError, cache_secret, directory)

    def _other(self) -> str:
        return self.mktemp()

