"""
End-to-end: what real package clients send, through the running service,
against an in-process Alpine-style origin on 127.0.0.1.

``apk`` itself is not available on a Debian test machine, so its traffic is
replayed byte for byte from what design.md records of apk-tools 2.14:
absolute-URI requests through ``HTTP_PROXY`` (or origin-form requests to a
mirror route) with only ``Host`` and ``User-Agent: libfetch/2.0``, one at a
time on one connection while responses say ``Connection: keep-alive``;
``If-Modified-Since`` with the client's own download time on a later index
fetch; ``Cache-Control: no-cache`` from ``apk update``.  ``curl`` runs for
real (``-x`` through the proxy, and against a mirror route) as a
subprocess while the reactor keeps serving.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from buildcache.engine.fields import format_http_date
from tests.apkrepo import BuiltApk, build_apk
from tests.support import reactor
from tests.test_proxy import (
    ARCH_PATH,
    INDEX_PATH,
    ProxyHarness,
    RawConnection,
    RawResponse,
    raw_connection,
)

USER_AGENT = "libfetch/2.0"


def packages() -> list[BuiltApk]:
    return [
        build_apk("musl-test", "1.2.5-r0", data_size_pad=50_000, pad_seed=1),
        build_apk("app", "1.0-r0", depends=["musl-test"], data_size_pad=120_000, pad_seed=2),
        build_apk("tool", "2.0-r1", data_size_pad=30_000, pad_seed=3),
    ]


class ApkClient:
    """
    Sends exactly what apk's libfetch sends for a repository URL, either
    through the proxy (absolute URI) or to a mirror route (origin-form),
    on one kept-alive connection.
    """

    def __init__(self, harness: ProxyHarness, connection: RawConnection, via_proxy: bool):
        self.harness = harness
        self.connection = connection
        self.via_proxy = via_proxy

    def request_bytes(self, path: str, extra: str = "") -> bytes:
        if self.via_proxy:
            target = self.harness.proxied(path)
            host = self.harness.origin_authority
        else:
            target = f"/up{path}"
            host = f"127.0.0.1:{self.harness.proxy_port}"
        return (
            f"GET {target} HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"User-Agent: {USER_AGENT}\r\n"
            f"{extra}"
            "\r\n"
        ).encode("ascii")

    async def fetch(self, path: str, extra: str = "") -> RawResponse:
        response = await self.connection.request(self.request_bytes(path, extra))
        await self.harness.idle()
        return response


class ApkAddReplayTests(TestCase):
    timeout = 30

    def check(self, response: RawResponse, status: int, cache: str, body: bytes) -> None:
        self.assertEqual(response.status, status)
        self.assertEqual(response.header("x-cache"), cache)
        self.assertEqual(response.body, body)
        # Without this header libfetch opens a new connection per file.
        self.assertEqual(response.header("connection"), "keep-alive")
        self.assertIsNone(response.header("content-encoding"))

    async def replay(self, via_proxy: bool) -> None:
        harness = ProxyHarness.start(self, packages=packages())
        index = harness.index_bytes()
        musl, app, tool = (
            harness.packages[name]
            for name in ("musl-test-1.2.5-r0.apk", "app-1.0-r0.apk", "tool-2.0-r1.apk")
        )

        # `apk add app` in a fresh container: the index, then each package.
        first = ApkClient(harness, await raw_connection(self, harness.proxy_port), via_proxy)
        self.check(await first.fetch(INDEX_PATH), 200, "MISS", index)
        downloaded_at = time.time()
        for apk in (musl, app):
            self.check(await first.fetch(f"{ARCH_PATH}/{apk.filename}"), 200, "MISS", apk.content)
        self.assertFalse(first.connection.closed)
        await first.connection.close()

        # A later `apk add tool` in the same container: its cached index is
        # older than apk's limit, so it asks with its own download time.
        later = ApkClient(harness, await raw_connection(self, harness.proxy_port), via_proxy)
        since = f"If-Modified-Since: {format_http_date(downloaded_at)}\r\n"
        not_modified = await later.fetch(INDEX_PATH, since)
        self.check(not_modified, 304, "HIT", b"")
        self.check(await later.fetch(f"{ARCH_PATH}/{tool.filename}"), 200, "MISS", tool.content)
        await later.connection.close()

        # What reached the origin: one request per file, as apk sent it
        # (its User-Agent), marked by the proxy, without apk's conditional.
        self.assertEqual(harness.requests_for(INDEX_PATH), 1)
        for apk in (musl, app, tool):
            self.assertEqual(harness.requests_for(f"{ARCH_PATH}/{apk.filename}"), 1)
        for recorded in harness.origin.requests:
            self.assertEqual(recorded.headers.get("user-agent"), USER_AGENT)
            self.assertEqual(recorded.headers.get("via"), "1.1 buildcache")
            self.assertNotIn("if-modified-since", recorded.headers)

        # `apk add app tool` in another fresh container with the origin
        # gone: everything from the cache.
        await harness.stop_origin()
        asked = harness.total_requests()
        warm = ApkClient(harness, await raw_connection(self, harness.proxy_port), via_proxy)
        self.check(await warm.fetch(INDEX_PATH), 200, "HIT", index)
        for apk in (musl, app, tool):
            self.check(await warm.fetch(f"{ARCH_PATH}/{apk.filename}"), 200, "HIT", apk.content)
        await warm.connection.close()
        self.assertEqual(harness.total_requests(), asked)

    async def test_apk_add_through_http_proxy(self) -> None:
        """
        apk with HTTP_PROXY pointing at the proxy: cold, later, and warm
        with the origin down.
        """
        await self.replay(via_proxy=True)

    async def test_apk_add_through_mirror_route(self) -> None:
        """
        apk whose repositories file was rewritten to the mirror route.
        """
        await self.replay(via_proxy=False)

    async def test_apk_update(self) -> None:
        """
        `apk update` sends ``Cache-Control: no-cache``: the index is
        revalidated with the origin (REVALIDATED), and while the origin is
        down the stored copy is served as STALE rather than failing.
        """
        harness = ProxyHarness.start(self, packages=packages())
        client = ApkClient(harness, await raw_connection(self, harness.proxy_port), True)
        no_cache = "Cache-Control: no-cache\r\n"
        self.check(await client.fetch(INDEX_PATH, no_cache), 200, "MISS", harness.index_bytes())
        self.check(
            await client.fetch(INDEX_PATH, no_cache), 200, "REVALIDATED", harness.index_bytes()
        )
        self.assertIn("if-none-match", harness.origin.requests[-1].headers)
        await client.connection.close()
        await harness.stop_origin()
        client = ApkClient(harness, await raw_connection(self, harness.proxy_port), True)
        self.check(await client.fetch(INDEX_PATH, no_cache), 200, "STALE", harness.index_bytes())
        await client.connection.close()


def curl_environment(home: Path) -> dict[str, str]:
    """
    The test's environment without proxy settings (curl would obey them)
    and with a home of its own (no ~/.curlrc, no ~/.netrc).
    """
    environment = {
        name: value for name, value in os.environ.items()
        if not name.lower().endswith("_proxy")
    }
    environment["HOME"] = str(home)
    return environment


class CurlTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        curl = shutil.which("curl")
        if curl is None:
            raise SkipTest("curl is not installed (.ci/run installs it)")
        self.curl = curl
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)

    async def curl_get(self, arguments: list[str], output: Path) -> dict[str, str]:
        """
        Run curl; return the last response's headers (lower-case names).
        """
        out, err, code = await getProcessOutputAndValue(
            self.curl,
            ["-q", "--silent", "--show-error", "--fail", "--dump-header", "-",
             "--output", str(output), *arguments],
            env=curl_environment(self.work),
            path=str(self.work),
            reactor=reactor,
        )
        if code != 0:
            self.fail(f"curl {' '.join(arguments)} exited {code}: {err.decode(errors='replace')}")
        headers: dict[str, str] = {}
        for line in out.decode("latin-1").splitlines():
            if line.startswith("HTTP/"):
                headers = {}
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        return headers

    async def test_curl_through_proxy(self) -> None:
        """
        ``curl -x http://127.0.0.1:<proxy>``: a package is fetched once and
        then served from the cache, byte for byte.
        """
        harness = ProxyHarness.start(self, packages=packages())
        apk = harness.packages["app-1.0-r0.apk"]
        path = f"{ARCH_PATH}/{apk.filename}"
        proxy = f"http://127.0.0.1:{harness.proxy_port}"
        for attempt, cache in enumerate(("MISS", "HIT")):
            output = self.work / f"proxied-{attempt}.apk"
            headers = await self.curl_get(["-x", proxy, harness.proxied(path)], output)
            await harness.idle()
            self.assertEqual(headers.get("x-cache"), cache)
            self.assertEqual(headers.get("via"), "1.1 buildcache")
            self.assertEqual(output.read_bytes(), apk.content)
        self.assertEqual(harness.requests_for(path), 1)
        # Its index was fetched first (nothing had fetched it), to check it.
        self.assertEqual(harness.requests_for(INDEX_PATH), 1)
        package_requests = [r for r in harness.origin.requests if r.path == path]
        self.assertEqual(package_requests[0].headers["user-agent"][:5], "curl/")

    async def test_curl_against_mirror_route(self) -> None:
        """
        curl against a mirror-route URL: the index arrives as the origin's
        archive (never unpacked, even with ``--compressed``), then from the
        cache; a range of a package comes from the cache too.
        """
        harness = ProxyHarness.start(self, packages=packages())
        for attempt, cache in enumerate(("MISS", "HIT")):
            output = self.work / f"APKINDEX-{attempt}.tar.gz"
            headers = await self.curl_get(
                ["--compressed", harness.mirrored(INDEX_PATH)], output
            )
            await harness.idle()
            self.assertEqual(headers.get("x-cache"), cache)
            self.assertNotIn("content-encoding", headers)
            self.assertEqual(output.read_bytes(), harness.index_bytes())
        self.assertEqual(harness.requests_for(INDEX_PATH), 1)
        apk = harness.packages["tool-2.0-r1.apk"]
        url = harness.mirrored(f"{ARCH_PATH}/{apk.filename}")
        await self.curl_get([url], self.work / "tool.apk")
        await harness.idle()
        headers = await self.curl_get(["--range", "100-299", url], self.work / "part")
        self.assertEqual(headers.get("x-cache"), "HIT")
        self.assertEqual(headers.get("content-range"), f"bytes 100-299/{apk.size}")
        self.assertEqual((self.work / "part").read_bytes(), apk.content[100:300])
