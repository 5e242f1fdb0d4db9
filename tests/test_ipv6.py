"""
IPv6-literal upstreams (issue 12, item 9): ``--mirror v6=http://[::1]:PORT``,
``--pypi-upstream http://[::1]:PORT/simple/`` and proxied
``http://[::1]:PORT/...`` work end to end, against origins listening on
``::1``.  Skipped only when this machine has no IPv6 loopback.
"""

from __future__ import annotations

import socket

from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI

from buildcache.config import Mirror
from buildcache.engine.keys import cache_key
from buildcache.fetch.fetcher import request_uri
from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import Client, FakeUpstream, GatedBody, listen, start_server
from tests.test_simple_index import PIP_ACCEPT, WHEEL_A2


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


HAS_IPV6 = _has_ipv6_loopback()


class RequestURITests(SynchronousTestCase):
    """
    request_uri: what the agent is given for an upstream URL.
    """

    def test_ipv6_literal_kept(self) -> None:
        for url in ("http://[::1]:8080/x", "http://[::1]/simple/", "https://[2001:db8::1]:8443/a/b?c=d"):
            self.assertEqual(request_uri(url), url.encode("ascii"))
        uri = URI.fromBytes(request_uri("http://[::1]:8080/a b"))
        self.assertEqual((uri.host, uri.port, uri.path), (b"::1", 8080, b"/a%20b"))

    def test_other_hosts_as_before(self) -> None:
        """
        Other URLs are encoded as treq encoded them (non-ASCII
        percent-encoded, names IDNA-encoded).
        """
        self.assertEqual(
            request_uri("http://b\u00fccher.example/caf\u00e9 x"),
            b"http://xn--bcher-kva.example/caf%C3%A9%20x",
        )
        self.assertEqual(request_uri("http://127.0.0.1:81/a%2Fb?x=1"), b"http://127.0.0.1:81/a%2Fb?x=1")

    def test_zone_refused(self) -> None:
        self.assertRaises(ValueError, request_uri, "http://[fe80::1%25lo]/")


class OverIPv6Tests(TestCase):
    if not HAS_IPV6:
        skip = "this machine has no IPv6 loopback"

    def setUp(self) -> None:
        self.files = FakeUpstream()
        self.deb = b"a package over IPv6\n" * 500
        self.files.bodies["/base/pool/a.deb"] = GatedBody(self.deb)
        self.files.bodies["/pool/b.deb"] = GatedBody(self.deb[::-1])
        files_port = listen(self.files, interface="::1")
        self.addCleanup(files_port.stopListening)
        self.files_port = files_port.getHost().port
        self.fixture = build_index(self.mktemp())
        self.index = StaticSimpleIndex(self.fixture)
        index_port = listen(self.index, interface="::1")
        self.addCleanup(index_port.stopListening)
        self.index_port = index_port.getHost().port
        self.client = Client()

    async def test_mirror(self) -> None:
        running = start_server(
            self, {"mirrors": (Mirror("v6", f"http://[::1]:{self.files_port}/base"),)}
        )
        url = f"http://127.0.0.1:{running.proxy_port}/v6/pool/a.deb"
        first = await self.client.get(url)
        self.assertEqual((first.status, first.body), (200, self.deb))
        self.assertEqual(first.header("x-cache"), "MISS")
        second = await self.client.get(url)
        self.assertEqual((second.status, second.header("x-cache")), (200, "HIT"))
        self.assertEqual(self.files.requests["/base/pool/a.deb"], 1)
        self.assertIsNotNone(
            running.store.peek(cache_key(f"http://[::1]:{self.files_port}/base/pool/a.deb"))
        )

    async def test_pypi_upstream(self) -> None:
        running = start_server(
            self, {"pypi_upstreams": (f"http://[::1]:{self.index_port}/simple",)}
        )
        index = f"http://127.0.0.1:{running.index_port}"
        page = await self.client.get(f"{index}/simple/bcdemo-a/", {"accept": PIP_ACCEPT})
        self.assertEqual(page.status, 200, page.body)
        self.assertIn(WHEEL_A2.encode(), page.body)
        wheel = await self.client.get(f"{index}/files/bcdemo-a/{WHEEL_A2}")
        self.assertEqual((wheel.status, wheel.body), (200, self.fixture.content(WHEEL_A2)))
        self.assertEqual(self.index.requests[f"/files/{WHEEL_A2}"], 1)

    async def test_proxied(self) -> None:
        running = start_server(self, {"allow_upstream": ("::1",)})
        proxied = Client(proxy_port=running.proxy_port)
        url = f"http://[::1]:{self.files_port}/pool/b.deb"
        first = await proxied.get(url)
        self.assertEqual((first.status, first.body), (200, self.deb[::-1]))
        second = await proxied.get(url)
        self.assertEqual((second.status, second.header("x-cache")), (200, "HIT"))
        self.assertEqual(self.files.requests["/pool/b.deb"], 1)

    async def test_proxied_refused_unless_allowed(self) -> None:
        """
        A loopback IPv6 literal is still refused without --allow-upstream,
        with nothing connected.
        """
        running = start_server(self)
        proxied = Client(proxy_port=running.proxy_port)
        refused = await proxied.get(f"http://[::1]:{self.files_port}/pool/b.deb")
        self.assertEqual(refused.status, 403)
        self.assertEqual(self.files.requests["/pool/b.deb"], 0)
