"""
Which stored response may answer which request, over HTTP through the
running proxy: the scheme is part of the key, a response to a request with
the client's credentials reaches only the holder of the same credentials,
and a response with ``Vary`` answers only requests that buildcache would
send upstream with the same values.  Plus the key rules themselves, as
pure functions.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections import Counter
from collections.abc import Mapping

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from buildcache import store as store_module
from buildcache.config import Mirror
from buildcache.ecosystems.apk.check import (
    credentials_mark,
    directory_prefix,
    stored_package_matches,
    vouched_by,
)
from buildcache.ecosystems.apk.index import ApkFacts
from buildcache.ecosystems.pypi.pages import page_key
from buildcache.engine.keys import (
    PRIVATE_MARK,
    VARIANT_MARK,
    cache_key,
    http_twin,
    private_family,
    stored_key_for,
    twin_matches_digest,
    variant_key,
    variants_to_drop,
)
from buildcache.engine.respond import joined_header
from buildcache.fetch.fetcher import Fetcher, UpstreamAnswer, UpstreamRequest
from buildcache.frontends.proxy import client_headers
from buildcache.store import SECRET_NAME, StoreError, cache_secret
from tests.apkrepo import BuiltApk, build_apk, build_apkindex
from tests.support import Client, Received, Running, listen, start_server, url_of
from tests.test_store import make_version_1_cache

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
        self._arrivals: list[tuple[str, int, Deferred[None]]] = []

    def when_requests(self, path: str, count: int) -> Deferred[None]:
        """
        Fires once ``count`` requests for ``path`` have arrived.
        """
        arrived: Deferred[None] = Deferred()
        self._arrivals.append((path, count, arrived))
        self._fire_arrivals()
        return arrived

    def _fire_arrivals(self) -> None:
        waiting = []
        for path, count, arrived in self._arrivals:
            if self.requests[path] >= count:
                arrived.callback(None)
            else:
                waiting.append((path, count, arrived))
        self._arrivals = waiting

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
        self._fire_arrivals()
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
        """
        On a forward-proxy request (an absolute URL) the cookies are the
        named host's: forwarded, and the response is theirs alone.
        """
        box = Box(self)
        box.origin.cache_control = "public, max-age=600"
        await box.get(PAGE, {"cookie": "session=x"}, proxy=True)
        same = await box.get(PAGE, {"cookie": "session=x"}, proxy=True)
        self.assertEqual(
            (same.header("x-cache"), same.body), ("HIT", expected(PAGE, cookie="session=x"))
        )
        other = await box.get(PAGE, {"cookie": "session=y"}, proxy=True)
        self.assertEqual(other.body, expected(PAGE, cookie="session=y"))
        anonymous = await box.get(PAGE, proxy=True)
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
            Deferred.fromCoroutine(box.get(PAGE, headers, proxy=True))
            for headers in ({"cookie": "a=1"}, {"cookie": "a=2"}, {})
        ]
        await box.origin.when_requests(PAGE, 3)
        box.origin.gate.callback(None)
        received = await gatherResults(requests)
        self.assertEqual(
            [r.body for r in received],
            [expected(PAGE, cookie="a=1"), expected(PAGE, cookie="a=2"), expected(PAGE)],
        )



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
        # The second and third requests have joined the first's download
        # once the fetcher has been asked three times (joining is part of
        # the call).
        asked: list[UpstreamRequest] = []
        joined: Deferred[None] = Deferred()
        fetch = Fetcher.fetch

        def counting(fetcher: Fetcher, request: UpstreamRequest) -> Deferred[UpstreamAnswer]:
            answer = fetch(fetcher, request)
            asked.append(request)
            if len(asked) == 3:
                joined.callback(None)
            return answer

        self.patch(Fetcher, "fetch", counting)
        first = Deferred.fromCoroutine(box.get(PAGE, {"accept-language": "en"}))
        await box.origin.when_requests(PAGE, 1)
        second = Deferred.fromCoroutine(box.get(PAGE, {"accept-language": "fr"}))
        third = Deferred.fromCoroutine(box.get(PAGE, {"accept-language": "en"}))
        await joined
        self.assertEqual(box.origin.requests[PAGE], 1)
        self.assertTrue(box.running.server.fetcher.downloading(asked[0].key))
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



# -- cookies on mirror routes, and cookies sent on several lines -------------


class MirrorCookieTests(TestCase):
    """
    A mirror route is a path on this box: the cookies a browser holds for
    the box's host name (any ``localhost`` application's session) are not
    the mirror's, so they are neither forwarded nor a credential.
    """

    timeout = 20

    async def test_cookie_not_forwarded_to_a_mirror(self) -> None:
        box = Box(self)
        box.origin.cache_control = "public, max-age=600"
        first = await box.get(PAGE, {"cookie": "grafana_session=topsecret"})
        self.assertEqual((first.header("x-cache"), first.body), ("MISS", expected(PAGE)))
        other = await box.get(PAGE, {"cookie": "jupyter=abc"})
        anonymous = await box.get(PAGE)
        for received in (other, anonymous):
            self.assertEqual(
                (received.header("x-cache"), received.body), ("HIT", expected(PAGE))
            )
        self.assertEqual(box.origin.requests[PAGE], 1)
        self.assertEqual(box.keys(), {box.base + PAGE})

    async def test_authorization_still_private_on_a_mirror(self) -> None:
        """
        ``Authorization`` is sent on purpose: forwarded and keying as
        before, while the cookie beside it neither reaches the origin nor
        splits the holder's entry.
        """
        box = Box(self)
        box.origin.cache_control = "public, max-age=600"
        first = await box.get(DEB, {"authorization": A, "cookie": "s=1"})
        self.assertEqual(first.body, expected(DEB, auth=A))
        again = await box.get(DEB, {"authorization": A, "cookie": "s=2"})
        self.assertEqual((again.header("x-cache"), again.body), ("HIT", expected(DEB, auth=A)))
        anonymous = await box.get(DEB)
        self.assertEqual((anonymous.header("x-cache"), anonymous.body), ("MISS", expected(DEB)))
        self.assertEqual(box.origin.requests[DEB], 2)
        self.assertEqual(
            sorted(key.startswith(box.base + DEB + PRIVATE_MARK) for key in box.keys()),
            [False, True],
        )


class DuplicateCookieTests(TestCase):
    timeout = 20

    async def test_cookie_lines_joined_with_semicolons(self) -> None:
        """
        Two ``Cookie`` lines reach the origin as one ``a=1; b=2`` (a comma
        would make ``b=2`` part of the value of ``a``).
        """
        box = Box(self)
        box.origin.cache_control = "max-age=0"
        client = Client(proxy_port=box.running.proxy_port)
        response = await client.agent().request(
            b"GET", (box.base + PAGE).encode(),
            Headers({"cookie": ["a=1", "b=2"]}),
        )
        body = await readBody(response)
        await box.running.server.fetcher.when_idle()
        self.assertEqual(body, expected(PAGE, cookie="a=1; b=2"))


# -- an apk index that varies or is private still vouches for packages ------


APK_DIR = "/alpine/v3.20/main/x86_64"


class ApkRepository(Resource):
    """
    An apk repository at :data:`APK_DIR` that may ask for ``Authorization``
    and add headers (``Vary``, ``Cache-Control``) to its answers; requests
    counted per path.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.files: dict[str, bytes] = {}
        self.requests: Counter[str] = Counter()
        self.extra: dict[str, str] = {}
        self.need_auth: str | None = None
        self.cookies: list[str | None] = []

    def publish(self, *apks: BuiltApk) -> None:
        self.files = {f"{APK_DIR}/APKINDEX.tar.gz": build_apkindex(list(apks))}
        for apk in apks:
            self.files[f"{APK_DIR}/{apk.filename}"] = apk.content

    def render(self, request: IRequest) -> bytes:
        path = request.uri.decode()
        self.requests[path] += 1
        cookie = request.getHeader(b"cookie")
        self.cookies.append(cookie.decode() if cookie is not None else None)
        auth = request.getHeader(b"authorization")
        if self.need_auth is not None and (auth is None or auth.decode() != self.need_auth):
            request.setResponseCode(401)
            return b"authorization needed\n"
        body = self.files.get(path)
        if body is None:
            request.setResponseCode(404)
            return b"no such file\n"
        for name, value in self.extra.items():
            request.setHeader(name.encode(), value.encode())
        request.setHeader(b"etag", f'"{hashlib.sha256(body).hexdigest()[:16]}"'.encode())
        return body


class ApkIndexLookupTests(TestCase):
    """
    The package check reads the index the way the proxy serves it: the
    ``Vary`` variant of the client's request, under the client's
    credentials.
    """

    timeout = 20

    def box(self, origin: ApkRepository) -> Running:
        port = listen(origin)
        self.addCleanup(port.stopListening)
        return start_server(self, {"mirrors": (Mirror("up", url_of(port).rstrip("/")),)})

    async def get(
        self, running: Running, path: str, headers: Mapping[str, str] | None = None
    ) -> Received:
        received = await Client().get(
            f"http://127.0.0.1:{running.proxy_port}/up{path}", headers
        )
        await running.server.fetcher.when_idle()
        return received

    async def test_varying_index_vouches_for_packages(self) -> None:
        origin = ApkRepository()
        apk = build_apk("hello", "1.0-r0")
        origin.publish(apk)
        origin.extra = {"vary": "User-Agent", "cache-control": "max-age=600"}
        running = self.box(origin)
        agent = {"user-agent": "apk-tools/2.14"}
        index = await self.get(running, f"{APK_DIR}/APKINDEX.tar.gz", agent)
        self.assertEqual(index.status, 200)
        first = await self.get(running, f"{APK_DIR}/{apk.filename}", agent)
        second = await self.get(running, f"{APK_DIR}/{apk.filename}", agent)
        self.assertEqual((first.status, first.body), (200, apk.content))
        self.assertEqual((second.header("x-cache"), second.body), ("HIT", apk.content))
        self.assertEqual(origin.requests[f"{APK_DIR}/{apk.filename}"], 1)
        # The index was read where it was stored, not fetched again.
        self.assertEqual(origin.requests[f"{APK_DIR}/APKINDEX.tar.gz"], 1)

    def private_repository(self) -> tuple[ApkRepository, BuiltApk, Running]:
        """
        A repository that answers only ``Authorization: A``, publicly
        cacheable, holding one package, behind a box.
        """
        origin = ApkRepository()
        apk = build_apk("hello", "1.0-r0")
        origin.publish(apk)
        origin.extra = {"cache-control": "public, max-age=600"}
        origin.need_auth = A
        return origin, apk, self.box(origin)

    async def test_private_repository(self) -> None:
        origin, apk, running = self.private_repository()
        auth = {"authorization": A}
        index = await self.get(running, f"{APK_DIR}/APKINDEX.tar.gz", auth)
        first = await self.get(running, f"{APK_DIR}/{apk.filename}", auth)
        second = await self.get(running, f"{APK_DIR}/{apk.filename}", auth)
        self.assertEqual((index.status, first.status, first.body), (200, 200, apk.content))
        self.assertEqual((second.header("x-cache"), second.body), ("HIT", apk.content))
        self.assertEqual(origin.requests[f"{APK_DIR}/{apk.filename}"], 1)
        self.assertEqual(origin.requests[f"{APK_DIR}/APKINDEX.tar.gz"], 1)
        # Not for anyone else: an anonymous client gets the origin's 401.
        anonymous = await self.get(running, f"{APK_DIR}/{apk.filename}")
        self.assertEqual(anonymous.status, 401)

    async def test_private_package_not_yet_indexed_fetches_the_index_with_credentials(
        self,
    ) -> None:
        """
        A package asked for before its index: the index is fetched with the
        client's credentials (not anonymously, which the origin refuses), and
        the package is checked and stored.
        """
        origin, apk, running = self.private_repository()
        auth = {"authorization": A}
        first = await self.get(running, f"{APK_DIR}/{apk.filename}", auth)
        second = await self.get(running, f"{APK_DIR}/{apk.filename}", auth)
        self.assertEqual((first.status, second.header("x-cache")), (200, "HIT"))
        self.assertEqual(origin.requests[f"{APK_DIR}/APKINDEX.tar.gz"], 1)

    async def test_private_rebuild_invalidates_the_private_package(self) -> None:
        """
        The rebuild check reads keys with ``#p=`` marks: a private index that
        now lists another build of a stored private package drops it.
        """
        origin = ApkRepository()
        old = build_apk("hello", "1.0-r0")
        origin.publish(old)
        origin.extra = {"cache-control": "public, max-age=600"}
        origin.need_auth = A
        running = self.box(origin)
        auth = {"authorization": A}
        package = f"{APK_DIR}/{old.filename}"
        await self.get(running, f"{APK_DIR}/APKINDEX.tar.gz", auth)
        await self.get(running, package, auth)
        hit = await self.get(running, package, auth)
        self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", old.content))
        new = build_apk("hello", "1.0-r0", description="rebuilt")
        self.assertEqual(new.filename, old.filename)
        origin.publish(new)
        refreshed = await self.get(
            running, f"{APK_DIR}/APKINDEX.tar.gz", {**auth, "cache-control": "no-cache"}
        )
        self.assertEqual(refreshed.status, 200)
        rebuilt = await self.get(running, package, auth)
        self.assertEqual((rebuilt.header("x-cache"), rebuilt.body), ("MISS", new.content))
        self.assertEqual(origin.requests[package], 2)

    async def test_cookie_not_forwarded_to_an_apk_mirror(self) -> None:
        origin = ApkRepository()
        apk = build_apk("hello", "1.0-r0")
        origin.publish(apk)
        running = self.box(origin)
        session = {"cookie": "grafana_session=topsecret"}
        await self.get(running, f"{APK_DIR}/APKINDEX.tar.gz", session)
        await self.get(running, f"{APK_DIR}/{apk.filename}", session)
        hit = await self.get(running, f"{APK_DIR}/{apk.filename}")
        self.assertEqual(origin.cookies, [None, None])
        self.assertEqual(hit.header("x-cache"), "HIT")


# -- a 304 refreshes the variant or private entry it revalidated -------------


class RevalidationTests(TestCase):
    """
    A stale variant (or private entry) is revalidated with its own
    validators, and the 304 refreshes that entry: the client sees
    REVALIDATED with that entry's body, and the refreshed lifetime holds.
    """

    timeout = 20

    async def _revalidated(self, headers: Mapping[str, str], body: bytes) -> None:
        box = Box(self)
        box.origin.vary = "Accept-Language"
        # public: a private response needs it to be stored at all.
        box.origin.cache_control = "public, max-age=0"
        other = {**headers, "accept-language": "fr"}
        await box.get(PAGE, other)
        await box.get(PAGE, headers)
        self.assertEqual(box.origin.requests[PAGE], 2)
        box.origin.cache_control = "public, max-age=600"
        again = await box.get(PAGE, headers)
        self.assertEqual(
            (again.status, again.header("x-cache"), again.body), (200, "REVALIDATED", body)
        )
        self.assertEqual(box.origin.requests[PAGE], 3)
        self.assertIsNotNone(box.origin.seen[-1][2])  # a conditional request
        # The 304's max-age=600 was recorded on that variant.
        hit = await box.get(PAGE, headers)
        self.assertEqual((hit.header("x-cache"), hit.body), ("HIT", body))
        self.assertEqual(box.origin.requests[PAGE], 3)
        self.assertEqual(len(box.keys()), 2)

    async def test_variant(self) -> None:
        await self._revalidated({"accept-language": "en"}, expected(PAGE, lang="en"))

    async def test_private_variant(self) -> None:
        await self._revalidated(
            {"authorization": A, "accept-language": "en"}, expected(PAGE, auth=A, lang="en")
        )

    async def test_private_entry(self) -> None:
        box = Box(self)
        box.origin.cache_control = "max-age=0, must-revalidate"
        await box.get(PAGE, {"authorization": A})
        box.origin.cache_control = "public, max-age=600"
        again = await box.get(PAGE, {"authorization": A})
        self.assertEqual(
            (again.header("x-cache"), again.body), ("REVALIDATED", expected(PAGE, auth=A))
        )
        hit = await box.get(PAGE, {"authorization": A})
        self.assertEqual(hit.header("x-cache"), "HIT")
        self.assertEqual(box.origin.requests[PAGE], 2)


class RequestRuleTests(SynchronousTestCase):
    def test_client_headers_drop_cookies_on_mirror_routes(self) -> None:
        headers = {"cookie": "s=1", "authorization": A, "accept-language": "en"}
        self.assertEqual(
            client_headers(headers, proxied=False),
            {"authorization": A, "accept-language": "en"},
        )
        self.assertEqual(client_headers(headers, proxied=True), headers)
        self.assertEqual(client_headers({}, proxied=False), {})

    def test_joined_header(self) -> None:
        self.assertEqual(joined_header("cookie", ["a=1", "b=2"]), "a=1; b=2")
        self.assertEqual(joined_header("Cookie", ["a=1"]), "a=1")
        self.assertEqual(joined_header("accept", ["a/b", "c/d"]), "a/b, c/d")


class ApkKeyRuleTests(SynchronousTestCase):
    index = "https://h:8/alpine/v3.20/main/x86_64/APKINDEX.tar.gz"
    package = "https://h:8/alpine/v3.20/main/x86_64/hello-1.0-r0.apk"

    def test_directory_prefix_reads_the_url_part(self) -> None:
        directory = "https://h:8/alpine/v3.20/main/x86_64/"
        self.assertEqual(directory_prefix(self.index), directory)
        self.assertEqual(directory_prefix(self.index + "#p=ab#v=cd"), directory)
        self.assertEqual(directory_prefix(self.index + "?a=/b"), directory)
        self.assertEqual(directory_prefix("http://[::1]:8/x/y"), "http://[::1]:8/x/")

    def test_credentials_mark(self) -> None:
        self.assertEqual(credentials_mark(self.package), "")
        self.assertEqual(credentials_mark(self.package + "#v=cd"), "")
        self.assertEqual(credentials_mark(self.package + "#p=ab"), "#p=ab")
        self.assertEqual(credentials_mark(self.package + "#p=ab#v=cd"), "#p=ab")

    def test_vouched_by(self) -> None:
        self.assertTrue(vouched_by(self.index, self.package))
        self.assertTrue(vouched_by(self.index + "#v=1", self.package + "#v=2"))
        self.assertTrue(vouched_by(self.index + "#p=a#v=1", self.package + "#p=a"))
        # Another client's packages, or the anonymous ones.
        self.assertFalse(vouched_by(self.index + "#p=a", self.package + "#p=b"))
        self.assertFalse(vouched_by(self.index + "#p=a", self.package))
        self.assertFalse(vouched_by(self.index, self.package + "#p=a"))
        # Not a package of this directory.
        self.assertFalse(vouched_by(self.index, self.index + "#v=2"))
        self.assertFalse(
            vouched_by(self.index, self.package.replace("x86_64/", "x86_64/sub/"))
        )


# -- an upgraded cache keeps its https files, once https vouches for them ----


WHEEL_NAME = "bcdemo-1.0-py3-none-any.whl"


class TwinAdoptionTests(TestCase):
    """
    A cache from before keys named their scheme keeps its files under
    ``http://`` keys (the upgrade cannot know which were fetched over
    https).  An https route takes such a file over only when a digest it
    obtained over https (the project page's sha256, the APKINDEX's size
    and control checksum) matches the stored bytes; the origin here speaks
    no TLS, so any fetch on the https route shows as a handshake and a 502.
    """

    timeout = 20

    def upgraded(
        self, old_entries: Mapping[str, bytes], config: Mapping[str, object]
    ) -> tuple[Running, Origin, _TLSRefusing, str]:
        origin = Origin()
        factory = _TLSRefusing(Site(origin))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        authority = url_of(port).rstrip("/").removeprefix("http://")
        cache_dir = self.mktemp()
        make_version_1_cache(
            os.path.abspath(cache_dir),
            {authority + path: body for path, body in old_entries.items()},
        )
        self.patch(self, "mktemp", lambda: cache_dir)
        https_base = "https://" + authority
        running = start_server(self, {
            key: value(https_base) if callable(value) else value
            for key, value in config.items()
        })
        self.assertEqual(
            {e.key for e in running.store.keys()},
            {"http://" + authority + path for path in old_entries},
        )
        return running, origin, factory, https_base

    def seed(self, running: Running, key: str, body: bytes, headers: Mapping[str, str]) -> None:
        """
        Store ``body`` under ``key`` as a fetch over https would have.
        """
        writer = running.store.writer(key)
        writer.write(body)
        writer.commit(headers)

    def page(self, https_base: str, sha256: str) -> bytes:
        url = f"{https_base}/packages/{WHEEL_NAME}#sha256={sha256}"
        return (
            f'<!DOCTYPE html><html><body><a href="{url}">{WHEEL_NAME}</a>'
            "</body></html>"
        ).encode()

    async def wheel(self, page_sha256: str | None = None) -> tuple[Received, Running, _TLSRefusing, Origin, str]:
        stored = b"a wheel stored before the upgrade"
        running, origin, factory, https_base = self.upgraded(
            {f"/packages/{WHEEL_NAME}": stored},
            {"pypi_upstreams": lambda base: (base + "/simple",)},
        )
        self.seed(
            running, page_key(https_base + "/simple", "bcdemo"),
            self.page(https_base, page_sha256 or hashlib.sha256(stored).hexdigest()),
            {"content-type": "text/html"},
        )
        received = await Client().get(
            f"http://127.0.0.1:{running.index_port}/files/bcdemo/{WHEEL_NAME}"
        )
        await running.server.fetcher.when_idle()
        return received, running, factory, origin, https_base

    async def test_wheel_adopted_when_the_page_vouches(self) -> None:
        received, running, factory, origin, https_base = await self.wheel()
        self.assertEqual(
            (received.status, received.header("x-cache"), received.body),
            (200, "HIT", b"a wheel stored before the upgrade"),
        )
        self.assertEqual((factory.handshakes, sum(origin.requests.values())), (0, 0))
        file_key = f"{https_base}/packages/{WHEEL_NAME}"
        self.assertIn(file_key, {e.key for e in running.store.keys()})
        self.assertNotIn(http_twin(file_key), {e.key for e in running.store.keys()})

    async def test_wheel_with_another_digest_not_adopted(self) -> None:
        received, running, factory, origin, https_base = await self.wheel("0" * 64)
        self.assertEqual(received.status, 502)
        self.assertNotIn(b"before the upgrade", received.body)
        # The https upstream was asked (one TLS handshake); the twin stays
        # where it was, for plain-http routes.
        self.assertEqual(factory.handshakes, 1)
        file_key = f"{https_base}/packages/{WHEEL_NAME}"
        self.assertEqual(
            {e.key for e in running.store.keys()} - {page_key(https_base + "/simple", "bcdemo")},
            {http_twin(file_key)},
        )

    async def test_read_ahead_adopts_instead_of_fetching(self) -> None:
        """
        The read-ahead that follows a client's read of a wheel's metadata
        takes the wheel over from its twin rather than fetching it.
        """
        wheel = b"a wheel stored before the upgrade"
        metadata = b"Metadata-Version: 2.1\nName: bcdemo\nVersion: 1.0\n"
        running, origin, factory, https_base = self.upgraded(
            {
                f"/packages/{WHEEL_NAME}": wheel,
                f"/packages/{WHEEL_NAME}.metadata": metadata,
            },
            {"pypi_upstreams": lambda base: (base + "/simple",)},
        )
        page = {
            "meta": {"api-version": "1.1"},
            "name": "bcdemo",
            "files": [{
                "filename": WHEEL_NAME,
                "url": f"{https_base}/packages/{WHEEL_NAME}",
                "hashes": {"sha256": hashlib.sha256(wheel).hexdigest()},
                "core-metadata": {"sha256": hashlib.sha256(metadata).hexdigest()},
                "size": len(wheel),
            }],
        }
        self.seed(
            running, page_key(https_base + "/simple", "bcdemo"),
            json.dumps(page).encode(),
            {"content-type": "application/vnd.pypi.simple.v1+json"},
        )
        received = await Client().get(
            f"http://127.0.0.1:{running.index_port}/files/bcdemo/{WHEEL_NAME}.metadata"
        )
        self.assertEqual((received.header("x-cache"), received.body), ("HIT", metadata))
        await running.server.index.prefetcher.when_done()
        wheel_key = f"{https_base}/packages/{WHEEL_NAME}"
        self.assertEqual(
            {e.key for e in running.store.keys()} - {page_key(https_base + "/simple", "bcdemo")},
            {wheel_key, wheel_key + ".metadata"},
        )
        self.assertEqual(factory.handshakes, 0)

    async def apk(self, stored: BuiltApk, listed: BuiltApk) -> tuple[Received, Running, _TLSRefusing, str]:
        package = f"{APK_DIR}/{listed.filename}"
        running, origin, factory, https_base = self.upgraded(
            {package: stored.content},
            {"mirrors": lambda base: (Mirror("sec", base),)},
        )
        self.seed(
            running, https_base + f"{APK_DIR}/APKINDEX.tar.gz", build_apkindex([listed]),
            {"cache-control": "max-age=600"},
        )
        received = await Client().get(f"http://127.0.0.1:{running.proxy_port}/sec{package}")
        await running.server.fetcher.when_idle()
        return received, running, factory, https_base + package

    async def test_apk_adopted_when_the_index_vouches(self) -> None:
        apk = build_apk("hello", "1.0-r0")
        received, running, factory, key = await self.apk(apk, apk)
        self.assertEqual(
            (received.status, received.header("x-cache"), received.body),
            (200, "HIT", apk.content),
        )
        again = await Client().get(
            f"http://127.0.0.1:{running.proxy_port}/sec{APK_DIR}/{apk.filename}"
        )
        self.assertEqual((again.header("x-cache"), again.body), ("HIT", apk.content))
        self.assertEqual(factory.handshakes, 0)
        adopted = running.store.peek(key)
        assert adopted is not None
        # Read from the file once, and recorded for the rebuild check.
        self.assertEqual(adopted.source_digest, apk.control_checksum)
        self.assertIsNone(running.store.peek(http_twin(key)))

    async def test_apk_of_another_build_not_adopted(self) -> None:
        stored = build_apk("hello", "1.0-r0", description="another build")
        listed = build_apk("hello", "1.0-r0")
        self.assertEqual(stored.filename, listed.filename)
        received, running, factory, key = await self.apk(stored, listed)
        self.assertEqual(received.status, 502)
        self.assertEqual(factory.handshakes, 1)
        self.assertIsNone(running.store.peek(key))
        self.assertIsNotNone(running.store.peek(http_twin(key)))


class TwinRuleTests(SynchronousTestCase):
    def test_http_twin(self) -> None:
        self.assertEqual(http_twin("https://h/x.whl"), "http://h/x.whl")
        self.assertEqual(http_twin("https://h:8443/x#p=ab#v=cd"), "http://h:8443/x#p=ab#v=cd")
        self.assertIsNone(http_twin("http://h/x.whl"))
        self.assertIsNone(http_twin("simple-page|https://h/simple|x"))

    def test_twin_matches_digest(self) -> None:
        self.assertTrue(twin_matches_digest("ab" * 32, ("AB" * 32)))
        self.assertFalse(twin_matches_digest("ab" * 32, "cd" * 32))
        self.assertFalse(twin_matches_digest(None, "ab" * 32))
        self.assertFalse(twin_matches_digest("ab" * 32, None))

    def test_stored_package_matches(self) -> None:
        listed = build_apk("hello", "1.0-r0")
        rebuilt = build_apk("hello", "1.0-r0", description="another build")
        facts = ApkFacts(listed.filename, listed.size, listed.control_sha1)
        directory = self.mktemp()
        os.makedirs(directory)

        def stored(body: bytes) -> str:
            path = os.path.join(directory, str(len(os.listdir(directory))))
            with open(path, "wb") as f:
                f.write(body)
            return path

        self.assertTrue(stored_package_matches(stored(listed.content), facts))
        self.assertFalse(stored_package_matches(stored(rebuilt.content), facts))
        # The size and control stream of the listed build, other data: the
        # datahash gives it away.
        data = bytearray(listed.data_stream)
        data[len(data) // 2] ^= 0xFF
        forged = listed.signature_stream + listed.control_stream + bytes(data)
        self.assertEqual(len(forged), listed.size)
        self.assertFalse(stored_package_matches(stored(forged), facts))
        self.assertFalse(stored_package_matches(stored(listed.content[:-1]), facts))
        self.assertFalse(stored_package_matches(os.path.join(directory, "gone"), facts))


class RenameEntryTests(SynchronousTestCase):
    def store(self) -> store_module.Store:
        store = store_module.Store.open(self.mktemp(), 1 << 20, Clock())
        self.addCleanup(store.close)
        return store

    def put(self, store: store_module.Store, key: str, body: bytes) -> store_module.Entry:
        writer = store.writer(key)
        writer.write(body)
        entry = writer.commit({"etag": '"1"'})
        assert entry is not None
        return entry

    def test_renamed_with_its_file(self) -> None:
        store = self.store()
        old = self.put(store, "http://h/x", b"twin")
        replaced = self.put(store, "https://h/x", b"older https copy")
        store.peek("http://h/x")  # kept in the row cache
        adopted = store.rename_entry(old, "https://h/x")
        assert adopted is not None
        self.assertEqual((adopted.key, adopted.size, adopted.file), ("https://h/x", 4, old.file))
        self.assertIsNone(store.peek("http://h/x"))
        stored = store.lookup("https://h/x")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(os.pread(stored.fd, 100, 0), b"twin")
        self.assertEqual((store.entry_count, store.total_size), (1, 4))
        # The https copy it replaced is gone with its file.
        self.assertFalse(os.path.exists(
            os.path.join(store.directory, "objects", replaced.file[:2], replaced.file)
        ))
        # A later body for the old key gets a file of its own.
        self.put(store, "http://h/x", b"new plain fetch")
        again = store.lookup("https://h/x")
        assert again is not None
        self.addCleanup(again.close)
        self.assertEqual(os.pread(again.fd, 100, 0), b"twin")

    def test_gone_or_replaced_entry_not_renamed(self) -> None:
        store = self.store()
        old = self.put(store, "http://h/x", b"twin")
        self.put(store, "http://h/x", b"replaced since")
        self.assertIsNone(store.rename_entry(old, "https://h/x"))
        self.assertIsNone(store.peek("https://h/x"))
        self.assertIsNotNone(store.peek("http://h/x"))
