"""
Tests for :mod:`buildcache.engine.freshness` (RFC 9111 freshness,
storability), :mod:`buildcache.engine.conditional` (conditional requests,
byte ranges), :mod:`buildcache.engine.fields` (dates) and the ecosystems'
path tables.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from buildcache.ecosystems.apk.policy import RULES as APK_RULES
from buildcache.ecosystems.apt.policy import RULES as APT_RULES
from buildcache.ecosystems.pypi.kinds import FILE_RULES, INDEX_FILE_RULES, PAGE_RULES
from buildcache.engine.conditional import (
    RangeOutcome,
    RangeResult,
    not_modified,
    parse_range,
)
from buildcache.engine.fields import (
    format_http_date,
    parse_cache_control,
    parse_http_date,
)
from buildcache.engine.freshness import (
    HEURISTIC_CAP,
    Decision,
    Kind,
    client_cache_control,
    client_credentials,
    decide,
    effective_kind,
    freshness_lifetime,
    is_storable,
    may_serve_stale,
    same_variant,
    sent_headers,
    vary_names,
    vary_values,
    varying_names,
)
from buildcache.engine.policy import PathRule, kind_by_rules

T0 = 1_700_000_000.0
SUNDAY = 784111777.0  # Sun, 06 Nov 1994 08:49:37 GMT
DIGEST = "0f" * 32

# (path, kind through the proxy, kind when served by the index front end)
CLASSIFY_CASES: list[tuple[str, Kind, Kind]] = [
    # apk
    ("/alpine/v3.20/main/x86_64/APKINDEX.tar.gz", Kind.INDEX, Kind.INDEX),
    ("/alpine/v3.20/main/x86_64/busybox-1.36.1-r29.apk", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/alpine/edge/testing/aarch64/APKINDEX.tar.gz", Kind.INDEX, Kind.INDEX),
    ("/.apk", Kind.HTTP, Kind.HTTP),
    ("/x86_64/busybox.apk.sig", Kind.HTTP, Kind.HTTP),
    # apt indexes
    ("/debian/dists/bookworm/InRelease", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/Release", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/Release.gpg", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/main/binary-amd64/Packages", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/main/binary-amd64/Packages.xz", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/main/binary-amd64/Packages.diff/Index", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/main/i18n/Translation-en.diff/Index", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/main/binary-amd64/Packages.diff/T-2024-01-01-0000.00-F-2024.gz", Kind.HTTP, Kind.HTTP),
    ("/debian/dists/bookworm/main/source/Sources.gz", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/main/i18n/Translation-en.bz2", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/main/Contents-amd64.gz", Kind.INDEX, Kind.INDEX),
    ("/ubuntu/dists/noble-updates/main/binary-amd64/Release", Kind.INDEX, Kind.INDEX),
    ("/debian/dists/bookworm/main/installer-amd64/current/images/MANIFEST", Kind.HTTP, Kind.HTTP),
    # apt by-hash: inside dists/, yet immutable
    (f"/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/{DIGEST}", Kind.IMMUTABLE, Kind.IMMUTABLE),
    (f"/debian/dists/bookworm/main/i18n/by-hash/MD5Sum/{DIGEST[:32]}", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/debian/dists/bookworm/main/by-hash/SHA256/", Kind.HTTP, Kind.HTTP),
    # apt pool
    ("/debian/pool/main/h/hello/hello_2.10-3_amd64.deb", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/debian/pool/main/d/debian-installer/foo_1.0_amd64.udeb", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/debian/pool/main/h/hello/hello_2.10-3.dsc", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/debian/pool/main/h/hello/hello_2.10.orig.tar.gz", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/debian/pool/main/h/hello/hello_2.10-3.debian.tar.xz", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/debian/pool/main/o/old/old_1.0-1.diff.gz", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/debian/pool/main/h/hello/", Kind.HTTP, Kind.HTTP),
    ("/debian/pool/main/h/hello/hello_2.10-3_amd64.changes", Kind.HTTP, Kind.HTTP),
    # simple index pages
    ("/simple/", Kind.INDEX, Kind.INDEX),
    ("/simple", Kind.INDEX, Kind.INDEX),
    ("/simple/requests/", Kind.INDEX, Kind.INDEX),
    ("/simple/Requests", Kind.INDEX, Kind.INDEX),
    ("/root/pypi/+simple/requests/", Kind.INDEX, Kind.INDEX),
    ("/simple/requests/extra/", Kind.HTTP, Kind.HTTP),
    ("/simple/x-1.0-py3-none-any.whl", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/simple/x-1.0.tar.gz", Kind.INDEX, Kind.IMMUTABLE),
    # distributions
    ("/packages/ab/cd/ef/requests-2.31.0-py3-none-any.whl", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/packages/ab/cd/ef/requests-2.31.0-py3-none-any.whl.metadata", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/files/requests-2.31.0.tar.gz", Kind.HTTP, Kind.IMMUTABLE),
    ("/files/requests-2.31.0.tar.gz.metadata", Kind.HTTP, Kind.IMMUTABLE),
    ("/files/pywin32-1.0.zip", Kind.HTTP, Kind.IMMUTABLE),
    ("/files/ancient-0.1.tar.bz2", Kind.HTTP, Kind.IMMUTABLE),
    ("/files/ancient-0.1-py2.4.egg", Kind.HTTP, Kind.IMMUTABLE),
    ("/downloads/latest.tar.gz", Kind.HTTP, Kind.IMMUTABLE),
    # everything else
    ("/", Kind.HTTP, Kind.HTTP),
    ("/index.html", Kind.HTTP, Kind.HTTP),
    ("/download.php?file=x.whl", Kind.HTTP, Kind.HTTP),
    ("/x-1.0-py3-none-any.whl?token=1", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("/x-1.0-py3-none-any.whl#sha256=00", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("http://127.0.0.1:8080/alpine/v3.20/main/x86_64/zlib-1.3.1-r1.apk", Kind.IMMUTABLE, Kind.IMMUTABLE),
    ("http://127.0.0.1:8080/page?next=/x86_64/APKINDEX.tar.gz", Kind.HTTP, Kind.HTTP),
]


#: The rows in the order the proxy tries them (apt, apk, pip); the index
#: front end's sdist rows only for the files it serves.
RULES = APT_RULES + APK_RULES + FILE_RULES + INDEX_FILE_RULES + PAGE_RULES
_INDEX_ONLY = {id(row) for row in INDEX_FILE_RULES}


def _rows(served_by_index: bool) -> list[PathRule]:
    return [row for row in RULES if served_by_index or id(row) not in _INDEX_ONLY]


def classify(path: str, *, served_by_index: bool = False) -> Kind:
    """The kind the ecosystems' tables give ``path``, as the proxy (or the index) sees it."""
    return kind_by_rules(_rows(served_by_index), path) or Kind.HTTP


def _first_rule(path: str, served_by_index: bool) -> int | None:
    path = urlsplit(path).path
    for row in _rows(served_by_index):
        if row.pattern.search(path):
            return RULES.index(row)
    return None


class ClassifyTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Every case gets its kind through the proxy and through the index."""
        for path, proxied, indexed in CLASSIFY_CASES:
            self.assertIs(classify(path), proxied, f"proxy: {path}")
            self.assertIs(classify(path, served_by_index=True), indexed, f"index: {path}")

    def test_every_rule_is_exercised(self) -> None:
        """Each row of RULES is the first match for some case above."""
        hit = set()
        for path, _proxied, _indexed in CLASSIFY_CASES:
            for served_by_index in (False, True):
                number = _first_rule(path, served_by_index)
                if number is not None:
                    hit.add(number)
        self.assertEqual(hit, set(range(len(RULES))))

    def test_case_sensitive(self) -> None:
        """Archive file names are case-sensitive: apkindex.tar.gz is not the index."""
        self.assertIs(classify("/x86_64/apkindex.tar.gz"), Kind.HTTP)
        self.assertIs(classify("/dists/bookworm/inrelease"), Kind.HTTP)


class ParseCacheControlTests(SynchronousTestCase):
    def test_table(self) -> None:
        cases: list[tuple[str | None, dict[str, str | None]]] = [
            (None, {}),
            ("", {}),
            ("max-age=60, no-cache", {"max-age": "60", "no-cache": None}),
            ("Max-Age=60,PUBLIC", {"max-age": "60", "public": None}),
            ('no-cache="Set-Cookie, X-Foo", max-age=5', {"no-cache": "Set-Cookie, X-Foo", "max-age": "5"}),
            ('max-age="60"', {"max-age": "60"}),
            ('x="a\\"b"', {"x": 'a"b'}),
            ("max-age=10, max-age=20", {"max-age": "10"}),
            (",,, public ,", {"public": None}),
            ("max-age=1 2, no-store", {"no-store": None}),
            ("s-maxage = 30", {"s-maxage": "30"}),
        ]
        for value, expected in cases:
            self.assertEqual(parse_cache_control(value), expected, repr(value))


class HttpDateTests(SynchronousTestCase):
    def test_parse(self) -> None:
        cases: list[tuple[str | None, float | None]] = [
            ("Sun, 06 Nov 1994 08:49:37 GMT", SUNDAY),
            ("Sunday, 06-Nov-94 08:49:37 GMT", SUNDAY),
            ("Sun Nov  6 08:49:37 1994", SUNDAY),
            ("Sun, 06 Nov 1994 08:49:37", SUNDAY),
            ("  Sun, 06 Nov 1994 08:49:37 GMT  ", SUNDAY),
            ("Sun, 06 Nov 1994 09:49:37 +0100", SUNDAY),
            (None, None),
            ("", None),
            ("0", None),
            ("-1", None),
            ("garbage", None),
            ("Sun, 06 Nov 1994 25:49:37 GMT", None),
            ("Sun, 31 Feb 1994 08:49:37 GMT", None),
            ("Sun, 06 Nov 1994 08:49 GMT", None),
            ("Sun, 06 Nov 1994 08:49:37 GMT, Mon, 07 Nov 1994 08:49:37 GMT", None),
        ]
        for value, expected in cases:
            self.assertEqual(parse_http_date(value), expected, repr(value))

    def test_format(self) -> None:
        self.assertEqual(format_http_date(SUNDAY), "Sun, 06 Nov 1994 08:49:37 GMT")
        self.assertEqual(format_http_date(SUNDAY + 0.9), "Sun, 06 Nov 1994 08:49:37 GMT")

    @given(st.integers(min_value=0, max_value=253402300799))
    def test_round_trip(self, seconds: int) -> None:
        self.assertEqual(parse_http_date(format_http_date(seconds)), seconds)


def _date(offset: float) -> str:
    return format_http_date(T0 + offset)


class FreshnessLifetimeTests(SynchronousTestCase):
    def test_table(self) -> None:
        cases: list[tuple[dict[str, str], float]] = [
            ({"cache-control": "max-age=600"}, 600),
            ({"cache-control": "s-maxage=100, max-age=600"}, 100),
            ({"cache-control": "max-age=600, s-maxage=100"}, 100),
            ({"cache-control": "max-age=600", "expires": _date(5)}, 600),
            ({"cache-control": "max-age=abc", "last-modified": _date(-10000)}, 0),
            ({"cache-control": "max-age=-5"}, 0),
            ({"date": _date(0), "expires": _date(300)}, 300),
            ({"date": _date(-100), "expires": _date(300)}, 400),
            ({"expires": _date(300)}, 300),
            ({"date": _date(0), "expires": _date(-5)}, 0),
            ({"date": _date(0), "expires": "0", "last-modified": _date(-10000)}, 0),
            ({"date": _date(0), "last-modified": _date(-10000)}, 1000),
            ({"last-modified": _date(-10000)}, 1000),
            ({"date": _date(0), "last-modified": _date(-10 * 365 * 86400)}, HEURISTIC_CAP),
            ({"date": _date(0), "last-modified": _date(60)}, 0),
            ({"date": _date(0), "last-modified": "yesterday"}, 0),
            ({"date": _date(0)}, 0),
            ({}, 0),
            ({"Cache-Control": "max-age=60"}, 60),
        ]
        for headers, expected in cases:
            self.assertEqual(freshness_lifetime(headers, T0), expected, repr(headers))


class DecideTests(SynchronousTestCase):
    def test_immutable_is_always_fresh(self) -> None:
        """Even a client no-cache, an ancient copy and a no-cache response."""
        for request in ({}, {"cache-control": "no-cache"}, {"pragma": "no-cache"}, {"cache-control": "max-age=0"}):
            self.assertIs(
                decide(Kind.IMMUTABLE, {"cache-control": "no-cache"}, T0, T0 + 10**9, request, 0),
                Decision.FRESH,
            )

    def test_index(self) -> None:
        ttl = 1800.0
        cases: list[tuple[dict[str, str], float, dict[str, str], Decision]] = [
            ({}, 0, {}, Decision.FRESH),
            ({}, 1799, {}, Decision.FRESH),
            ({}, 1800, {}, Decision.REVALIDATE),
            ({}, 1801, {}, Decision.REVALIDATE),
            ({}, -50, {}, Decision.FRESH),
            ({}, 0, {"cache-control": "no-cache"}, Decision.REVALIDATE),
            ({}, 0, {"Cache-Control": "No-Cache"}, Decision.REVALIDATE),
            ({}, 0, {"pragma": "no-cache"}, Decision.REVALIDATE),
            ({}, 0, {"cache-control": "max-age=0"}, Decision.REVALIDATE),
            ({}, 50, {"cache-control": "max-age=100"}, Decision.FRESH),
            ({}, 150, {"cache-control": "max-age=100"}, Decision.REVALIDATE),
            ({}, 1000, {"cache-control": "min-fresh=900"}, Decision.REVALIDATE),
            ({}, 800, {"cache-control": "min-fresh=900"}, Decision.FRESH),
            # The index TTL rules, not the upstream's headers.
            ({"cache-control": "max-age=999999"}, 2000, {}, Decision.REVALIDATE),
            ({"cache-control": "no-cache"}, 0, {}, Decision.FRESH),
            ({"age": "5000"}, 0, {}, Decision.FRESH),
        ]
        for stored, age, request, expected in cases:
            self.assertIs(
                decide(Kind.INDEX, stored, T0, T0 + age, request, ttl),
                expected,
                repr((stored, age, request)),
            )

    def test_zero_ttl_index_always_revalidates(self) -> None:
        self.assertIs(decide(Kind.INDEX, {}, T0, T0, {}, 0), Decision.REVALIDATE)

    def test_http(self) -> None:
        date = _date(0)
        cases: list[tuple[dict[str, str], float, dict[str, str], Decision]] = [
            ({"cache-control": "max-age=600"}, 599, {}, Decision.FRESH),
            ({"cache-control": "max-age=600"}, 600, {}, Decision.REVALIDATE),
            ({"cache-control": "s-maxage=100, max-age=600"}, 200, {}, Decision.REVALIDATE),
            ({"cache-control": "max-age=600", "age": "500"}, 50, {}, Decision.FRESH),
            ({"cache-control": "max-age=600", "age": "500"}, 150, {}, Decision.REVALIDATE),
            ({"cache-control": "max-age=600", "age": "junk"}, 599, {}, Decision.FRESH),
            ({"date": date, "expires": _date(300)}, 299, {}, Decision.FRESH),
            ({"date": date, "expires": _date(300)}, 300, {}, Decision.REVALIDATE),
            ({"date": date, "expires": "0"}, 0, {}, Decision.REVALIDATE),
            ({"date": date, "last-modified": _date(-10000)}, 999, {}, Decision.FRESH),
            ({"date": date, "last-modified": _date(-10000)}, 1000, {}, Decision.REVALIDATE),
            ({}, 0, {}, Decision.REVALIDATE),
            ({"etag": '"v1"'}, 0, {}, Decision.REVALIDATE),
            ({"cache-control": "no-cache, max-age=600"}, 0, {}, Decision.REVALIDATE),
            ({"cache-control": 'max-age=600, no-cache="set-cookie"'}, 0, {}, Decision.REVALIDATE),
            ({"pragma": "no-cache", "expires": _date(300)}, 0, {}, Decision.REVALIDATE),
            ({"pragma": "no-cache", "cache-control": "max-age=600"}, 0, {}, Decision.FRESH),
            ({"cache-control": "max-age=600"}, 0, {"cache-control": "no-cache"}, Decision.REVALIDATE),
            ({"cache-control": "max-age=600"}, 0, {"cache-control": "max-age=0"}, Decision.REVALIDATE),
            ({"cache-control": "max-age=600"}, 0, {"pragma": "no-cache"}, Decision.REVALIDATE),
            ({"cache-control": "max-age=600"}, 100, {"cache-control": "max-age=200"}, Decision.FRESH),
            ({"cache-control": "max-age=600"}, 300, {"cache-control": "max-age=200"}, Decision.REVALIDATE),
            ({"cache-control": "max-age=600"}, 550, {"cache-control": "min-fresh=100"}, Decision.REVALIDATE),
            ({"cache-control": "max-age=600"}, 400, {"cache-control": "min-fresh=100"}, Decision.FRESH),
            ({"Cache-Control": "Max-Age=600"}, 10, {}, Decision.FRESH),
        ]
        for stored, age, request, expected in cases:
            self.assertIs(
                decide(Kind.HTTP, stored, T0, T0 + age, request, 1800),
                expected,
                repr((stored, age, request)),
            )


class IsStorableTests(SynchronousTestCase):
    def test_status(self) -> None:
        for kind in Kind:
            self.assertTrue(is_storable(kind, 200, {}), kind)
            for status in (201, 203, 204, 206, 301, 302, 304, 404, 410, 500, 503):
                self.assertFalse(is_storable(kind, status, {}), (kind, status))

    def test_forbidden_by_headers(self) -> None:
        for kind in Kind:
            for headers in (
                {"cache-control": "no-store"},
                {"Cache-Control": "max-age=60, No-Store"},
                {"cache-control": "private"},
                {"cache-control": 'private="set-cookie"'},
                {"vary": "*"},
                {"vary": "Accept-Encoding, *"},
            ):
                self.assertFalse(is_storable(kind, 200, headers), (kind, headers))

    def test_allowed_headers(self) -> None:
        for kind in Kind:
            for headers in (
                {"vary": "Accept"},
                {"cache-control": "no-cache"},
                {"cache-control": "max-age=0"},
                {"etag": '"x"'},
            ):
                self.assertTrue(is_storable(kind, 200, headers), (kind, headers))

    def test_authorization(self) -> None:
        request = {"Authorization": "Basic eDp5"}
        self.assertFalse(is_storable(Kind.HTTP, 200, {}, request))
        self.assertFalse(is_storable(Kind.IMMUTABLE, 200, {"cache-control": "max-age=60"}, request))
        for directive in ("public", "s-maxage=60", "must-revalidate"):
            self.assertTrue(is_storable(Kind.HTTP, 200, {"cache-control": directive}, request), directive)
        self.assertTrue(is_storable(Kind.HTTP, 200, {}, {"accept": "*/*"}))

    def test_cookie(self) -> None:
        """
        A client's cookie is a credential like ``Authorization``.
        """
        request = {"Cookie": "session=1"}
        self.assertFalse(is_storable(Kind.IMMUTABLE, 200, {"cache-control": "max-age=60"}, request))
        self.assertTrue(is_storable(Kind.HTTP, 200, {"cache-control": "public"}, request))

    def test_set_cookie(self) -> None:
        headers = {"Set-Cookie": "session=1"}
        self.assertFalse(is_storable(Kind.HTTP, 200, headers))
        self.assertTrue(is_storable(Kind.IMMUTABLE, 200, headers))
        self.assertTrue(is_storable(Kind.INDEX, 200, headers))


class ClientCacheControlTests(SynchronousTestCase):
    def test_table(self) -> None:
        self.assertEqual(client_cache_control(Kind.IMMUTABLE, 1800), "max-age=31536000, immutable")
        self.assertEqual(
            client_cache_control(Kind.IMMUTABLE, 1800, {"cache-control": "max-age=60"}, 206),
            "max-age=31536000, immutable",
        )
        # An error or redirect keeps the upstream's own value, or none.
        self.assertIsNone(client_cache_control(Kind.IMMUTABLE, 1800, {}, 404))
        self.assertIsNone(client_cache_control(Kind.INDEX, 1800, None, 401))
        self.assertEqual(
            client_cache_control(Kind.INDEX, 1800, {"Cache-Control": "no-store"}, 404),
            "no-store",
        )
        self.assertEqual(client_cache_control(Kind.INDEX, 1800), "max-age=1800")
        self.assertEqual(client_cache_control(Kind.INDEX, 1800.9), "max-age=1800")
        self.assertEqual(client_cache_control(Kind.INDEX, 1800, {"cache-control": "no-store"}), "max-age=1800")
        self.assertEqual(client_cache_control(Kind.HTTP, 1800, {"Cache-Control": "max-age=5, public"}), "max-age=5, public")
        self.assertIsNone(client_cache_control(Kind.HTTP, 1800, {"etag": '"x"'}))
        self.assertIsNone(client_cache_control(Kind.HTTP, 1800))


class NotModifiedTests(SynchronousTestCase):
    stored = {"etag": '"abc"', "last-modified": _date(0)}

    def test_never_without_conditional(self) -> None:
        for request in ({}, {"cache-control": "no-cache"}, {"range": "bytes=0-1"}, {"if-range": '"abc"'}):
            self.assertFalse(not_modified(request, self.stored, T0), request)
            self.assertFalse(not_modified(request, {}, T0), request)

    def test_if_none_match(self) -> None:
        cases: list[tuple[str, dict[str, str], bool]] = [
            ('"abc"', {"etag": '"abc"'}, True),
            ('W/"abc"', {"etag": '"abc"'}, True),
            ('"abc"', {"etag": 'W/"abc"'}, True),
            ('"x", "abc"', {"etag": '"abc"'}, True),
            ('"x",W/"abc"', {"etag": '"abc"'}, True),
            ('"x"', {"etag": '"abc"'}, False),
            ('"ab"', {"etag": '"abc"'}, False),
            ('"a,b"', {"etag": '"a,b"'}, True),
            ('"a"', {"etag": '"a,b"'}, False),
            ("*", {"etag": '"abc"'}, True),
            ("*", {}, True),
            ('"abc"', {}, False),
            ("abc", {"etag": "abc"}, True),
            ("", {"etag": '"abc"'}, False),
        ]
        for value, stored, expected in cases:
            self.assertIs(not_modified({"If-None-Match": value}, stored), expected, (value, stored))

    def test_if_none_match_takes_precedence(self) -> None:
        """A non-matching tag means 200, however recent the If-Modified-Since."""
        request = {"if-none-match": '"old"', "if-modified-since": _date(100)}
        self.assertFalse(not_modified(request, self.stored, T0))
        request = {"if-none-match": '"abc"', "if-modified-since": _date(-100)}
        self.assertTrue(not_modified(request, self.stored, T0))

    def test_if_modified_since_last_modified(self) -> None:
        """
        The stored Last-Modified itself (what apt sends back) is a 304; a
        later date only once it is after the copy arrived here too.
        """
        cases: list[tuple[str, bool]] = [
            (_date(0), True),
            (_date(1), False),
            (_date(86400), False),
            (_date(99999), True),
            (_date(100000), True),
            (_date(-1), False),
            ("not a date", False),
            ("", False),
            (f"{_date(0)}, {_date(5)}", False),
        ]
        for value, expected in cases:
            self.assertIs(
                not_modified({"If-Modified-Since": value}, {"Last-Modified": _date(0)}, T0 + 99999),
                expected,
                value,
            )

    def test_copy_served_stale_is_not_taken_for_the_new_one(self) -> None:
        """
        The upstream published at T0; its copy reached the cache at T0+20,
        after an outage during which a client got the older copy at T0+10
        (served stale) and now asks If-Modified-Since T0+10: it must get
        the new one, though T0+10 is after the new Last-Modified.
        """
        self.assertFalse(
            not_modified({"If-Modified-Since": _date(10)}, {"Last-Modified": _date(0)}, T0 + 20)
        )
        self.assertFalse(
            not_modified({"If-Modified-Since": _date(10)}, {"Last-Modified": _date(0)}, None)
        )

    def test_if_modified_since_fetch_time(self) -> None:
        """Without Last-Modified, the download time stands in (apk sends its own)."""
        self.assertTrue(not_modified({"if-modified-since": _date(0)}, {}, T0 + 0.7))
        self.assertTrue(not_modified({"if-modified-since": _date(60)}, {}, T0))
        self.assertFalse(not_modified({"if-modified-since": _date(0)}, {}, T0 + 5))
        self.assertFalse(not_modified({"if-modified-since": _date(0)}, {}, None))
        self.assertFalse(not_modified({"if-modified-since": _date(0)}, {"etag": '"x"'}))


class ParseRangeTests(SynchronousTestCase):
    def test_table(self) -> None:
        full, partial, unsat = RangeOutcome.FULL, RangeOutcome.PARTIAL, RangeOutcome.UNSATISFIABLE
        cases: list[tuple[str | None, int, RangeOutcome, int, int]] = [
            (None, 1000, full, 0, 999),
            ("bytes=0-499", 1000, partial, 0, 499),
            ("bytes=500-", 1000, partial, 500, 999),
            ("bytes=0-", 1000, partial, 0, 999),
            ("bytes=-200", 1000, partial, 800, 999),
            ("bytes=-2000", 1000, partial, 0, 999),
            ("bytes=990-2000", 1000, partial, 990, 999),
            ("bytes=0-0", 1000, partial, 0, 0),
            ("bytes=999-999", 1000, partial, 999, 999),
            ("BYTES=0-1", 1000, partial, 0, 1),
            ("bytes = 2 - 3", 1000, partial, 2, 3),
            ("bytes=1000-", 1000, unsat, 0, -1),
            ("bytes=1000-1001", 1000, unsat, 0, -1),
            ("bytes=-0", 1000, unsat, 0, -1),
            ("bytes=0-", 0, unsat, 0, -1),
            ("bytes=-5", 0, unsat, 0, -1),
            ("bytes=5-4", 1000, full, 0, 999),
            ("bytes=0-1,4-5", 1000, full, 0, 999),
            ("bytes=0-1, 2000-3000", 1000, full, 0, 999),
            ("items=0-1", 1000, full, 0, 999),
            ("bytes=", 1000, full, 0, 999),
            ("bytes=-", 1000, full, 0, 999),
            ("bytes=+1-2", 1000, full, 0, 999),
            ("bytes=abc", 1000, full, 0, 999),
            ("bytes=0x1-2", 1000, full, 0, 999),
            ("bytes=\u0661-\u0662", 1000, full, 0, 999),
            ("", 1000, full, 0, 999),
            (None, 0, full, 0, -1),
        ]
        for header, size, outcome, start, end in cases:
            self.assertEqual(parse_range(header, size), RangeResult(outcome, size, start, end), repr(header))

    def test_headers(self) -> None:
        partial = parse_range("bytes=0-499", 1000)
        self.assertEqual((partial.status, partial.length, partial.content_range), (206, 500, "bytes 0-499/1000"))
        full = parse_range(None, 1000)
        self.assertEqual((full.status, full.length, full.content_range), (200, 1000, None))
        unsatisfiable = parse_range("bytes=5000-", 1000)
        self.assertEqual(
            (unsatisfiable.status, unsatisfiable.length, unsatisfiable.content_range),
            (416, 0, "bytes */1000"),
        )

    def test_if_range(self) -> None:
        strong = {"etag": '"v1"', "last-modified": _date(0)}
        cases: list[tuple[str, dict[str, str], RangeOutcome]] = [
            ('"v1"', strong, RangeOutcome.PARTIAL),
            ('"v2"', strong, RangeOutcome.FULL),
            ('W/"v1"', strong, RangeOutcome.FULL),
            ('"v1"', {"etag": 'W/"v1"'}, RangeOutcome.FULL),
            ('"v1"', {}, RangeOutcome.FULL),
            (_date(0), strong, RangeOutcome.PARTIAL),
            (_date(1), strong, RangeOutcome.FULL),
            (_date(-1), strong, RangeOutcome.FULL),
            (_date(0), {"etag": '"v1"'}, RangeOutcome.FULL),
            ("garbage", strong, RangeOutcome.FULL),
        ]
        for if_range, stored, outcome in cases:
            result = parse_range("bytes=10-19", 100, if_range=if_range, stored_headers=stored)
            self.assertIs(result.outcome, outcome, (if_range, stored))
        self.assertIs(parse_range(None, 100, if_range='"v1"', stored_headers=strong).outcome, RangeOutcome.FULL)
        # A failed If-Range serves the full body, never a 416.
        self.assertIs(
            parse_range("bytes=500-", 100, if_range='"v2"', stored_headers=strong).outcome,
            RangeOutcome.FULL,
        )

    def test_negative_size(self) -> None:
        self.assertRaises(ValueError, parse_range, "bytes=0-1", -1)

    @settings(max_examples=300, deadline=None)
    @given(
        header=st.one_of(
            st.none(),
            st.text(max_size=30),
            st.builds(
                lambda a, b: f"bytes={a}-{b}",
                st.one_of(st.just(""), st.integers(0, 3000).map(str)),
                st.one_of(st.just(""), st.integers(0, 3000).map(str)),
            ),
        ),
        size=st.integers(0, 2000),
    )
    def test_always_within_bounds(self, header: str | None, size: int) -> None:
        result = parse_range(header, size)
        self.assertEqual(result.size, size)
        if result.outcome is RangeOutcome.FULL:
            self.assertEqual((result.start, result.end, result.length), (0, size - 1, size))
            self.assertIsNone(result.content_range)
        elif result.outcome is RangeOutcome.PARTIAL:
            self.assertTrue(0 <= result.start <= result.end < size, result)
            self.assertEqual(result.length, result.end - result.start + 1)
            self.assertEqual(result.content_range, f"bytes {result.start}-{result.end}/{size}")
        else:
            self.assertEqual((result.length, result.content_range), (0, f"bytes */{size}"))

    @settings(max_examples=300, deadline=None)
    @given(st.integers(0, 3000), st.integers(0, 3000), st.integers(0, 2000))
    def test_first_last_semantics(self, first: int, last: int, size: int) -> None:
        result = parse_range(f"bytes={first}-{last}", size)
        if last < first:
            self.assertIs(result.outcome, RangeOutcome.FULL)
        elif first >= size:
            self.assertIs(result.outcome, RangeOutcome.UNSATISFIABLE)
        else:
            self.assertEqual((result.start, result.end), (first, min(last, size - 1)))

    @settings(max_examples=200, deadline=None)
    @given(st.integers(0, 3000), st.integers(0, 2000))
    def test_suffix_semantics(self, suffix: int, size: int) -> None:
        result = parse_range(f"bytes=-{suffix}", size)
        if suffix == 0 or size == 0:
            self.assertIs(result.outcome, RangeOutcome.UNSATISFIABLE)
        else:
            self.assertEqual(result.length, min(suffix, size))
            self.assertEqual(result.end, size - 1)


class PrivateResponseRuleTests(SynchronousTestCase):
    """
    The rules for responses to requests with the client's credentials.
    """

    def test_client_credentials(self) -> None:
        self.assertEqual(client_credentials({"Accept": "*/*"}), ())
        self.assertEqual(
            client_credentials({"Cookie": "a=1", "Authorization": "Bearer t"}),
            (("authorization", "Bearer t"), ("cookie", "a=1")),
        )

    def test_effective_kind(self) -> None:
        for kind in Kind:
            self.assertIs(effective_kind(kind, False), kind)
            self.assertIs(effective_kind(kind, True), Kind.HTTP)

    def test_path_kind_never_makes_private_fresher(self) -> None:
        """
        A private ``.deb`` under ``max-age=0, must-revalidate`` is
        revalidated; under ``public, max-age=600`` it is fresh until then,
        and the client's ``no-cache`` revalidates it.
        """
        kind = effective_kind(classify("/debian/pool/main/h/hello_1_amd64.deb"), True)
        stored = {"cache-control": "max-age=0, must-revalidate"}
        self.assertIs(decide(kind, stored, T0, T0, {}, 1800), Decision.REVALIDATE)
        public = {"cache-control": "public, max-age=600"}
        self.assertIs(decide(kind, public, T0, T0 + 10, {}, 1800), Decision.FRESH)
        self.assertIs(decide(kind, public, T0, T0 + 600, {}, 1800), Decision.REVALIDATE)
        self.assertIs(
            decide(kind, public, T0, T0 + 10, {"cache-control": "no-cache"}, 1800),
            Decision.REVALIDATE,
        )
        self.assertIs(decide(kind, {"cache-control": "no-cache"}, T0, T0, {}, 1800), Decision.REVALIDATE)

    def test_may_serve_stale(self) -> None:
        for value in ("must-revalidate", "proxy-revalidate", "s-maxage=60", "no-cache, public"):
            headers = {"Cache-Control": value}
            self.assertFalse(may_serve_stale(headers, True), value)
            self.assertTrue(may_serve_stale(headers, False), value)
        self.assertTrue(may_serve_stale({"cache-control": "public, max-age=60"}, True))
        self.assertTrue(may_serve_stale({}, True))


class VaryRuleTests(SynchronousTestCase):
    """
    RFC 9111 section 4.1 over the headers buildcache sends upstream.
    """

    def test_vary_names(self) -> None:
        self.assertEqual(vary_names({}), ())
        self.assertEqual(
            vary_names({"Vary": "Accept-Language, accept ,ACCEPT"}), ("accept", "accept-language")
        )
        self.assertIsNone(vary_names({"vary": "accept, *"}))

    def test_accept_encoding_is_normalised_away(self) -> None:
        self.assertEqual(varying_names({"vary": "Accept-Encoding"}), ())
        self.assertEqual(varying_names({"vary": "Accept-Encoding, Accept"}), ("accept",))
        self.assertIsNone(varying_names({"vary": "*"}))
        self.assertEqual(sent_headers({"Accept-Encoding": "gzip"})["accept-encoding"], "identity")

    def test_vary_values(self) -> None:
        sent = {"Accept-Language": "en,  fr ;q=0.5", "User-Agent": "x"}
        self.assertEqual(
            vary_values(("accept-language", "cookie"), sent),
            (("accept-language", "en,fr ;q=0.5"), ("cookie", None)),
        )

    def test_same_variant(self) -> None:
        pip = sent_headers({"user-agent": "pip/24", "accept-encoding": "gzip"})
        apk = sent_headers({"user-agent": "libfetch/2.0"})
        self.assertTrue(same_variant({"vary": "Accept-Encoding"}, pip, apk))
        self.assertTrue(same_variant({}, pip, apk))
        self.assertFalse(same_variant({"vary": "User-Agent"}, pip, apk))
        self.assertFalse(same_variant({"vary": "*"}, pip, pip))
        self.assertTrue(
            same_variant({"vary": "accept-language"}, {"Accept-Language": "en"}, {"accept-language": "en"})
        )
        self.assertFalse(
            same_variant({"vary": "accept-language"}, {"accept-language": "en"}, {})
        )
