"""
Tests for :mod:`buildcache.access`: address classes, host normalisation,
upstream patterns and the policy's four checks.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from buildcache.access import (
    DEFAULT_ALLOW_FROM,
    AccessPolicy,
    AddressClass,
    InvalidHost,
    UpstreamPattern,
    Verdict,
    classify_address,
    normalize_host,
    upstream_endpoint,
)

PUBLIC = AddressClass.PUBLIC
LOOPBACK = AddressClass.LOOPBACK
PRIVATE = AddressClass.PRIVATE
LINK_LOCAL = AddressClass.LINK_LOCAL
MULTICAST = AddressClass.MULTICAST
RESERVED = AddressClass.RESERVED
UNSPECIFIED = AddressClass.UNSPECIFIED


class ClassifyAddressTests(SynchronousTestCase):
    def test_table(self) -> None:
        cases: list[tuple[str, AddressClass]] = [
            # IPv4
            ("8.8.8.8", PUBLIC),
            ("1.1.1.1", PUBLIC),
            ("100.63.255.255", PUBLIC),
            ("100.128.0.0", PUBLIC),
            ("172.32.0.1", PUBLIC),
            ("127.0.0.1", LOOPBACK),
            ("127.255.255.254", LOOPBACK),
            ("10.0.0.1", PRIVATE),
            ("172.16.0.1", PRIVATE),
            ("172.31.255.255", PRIVATE),
            ("192.168.1.1", PRIVATE),
            ("100.64.0.1", PRIVATE),
            ("100.127.255.255", PRIVATE),
            ("169.254.169.254", LINK_LOCAL),
            ("224.0.0.1", MULTICAST),
            ("239.255.255.250", MULTICAST),
            ("0.0.0.0", UNSPECIFIED),
            ("0.1.2.3", RESERVED),
            ("255.255.255.255", RESERVED),
            ("240.0.0.1", RESERVED),
            ("192.0.2.1", RESERVED),
            ("198.51.100.1", RESERVED),
            ("203.0.113.1", RESERVED),
            ("198.18.0.1", RESERVED),
            ("192.0.0.1", RESERVED),
            # IPv6
            ("2606:4700:4700::1111", PUBLIC),
            ("2a00:1450::1", PUBLIC),
            ("::1", LOOPBACK),
            ("[::1]", LOOPBACK),
            ("::", UNSPECIFIED),
            ("fe80::1", LINK_LOCAL),
            ("fe80::1%eth0", LINK_LOCAL),
            ("fd00::1", PRIVATE),
            ("fc00::1", PRIVATE),
            ("fec0::1", PRIVATE),
            ("ff02::1", MULTICAST),
            ("2001:db8::1", RESERVED),
            ("2001::1", RESERVED),
            ("100::1", RESERVED),
            ("3fff::1", RESERVED),
            ("4000::1", RESERVED),
            ("::127.0.0.1", RESERVED),
            # IPv6 carrying IPv4
            ("::ffff:127.0.0.1", LOOPBACK),
            ("[::ffff:127.0.0.1]", LOOPBACK),
            ("::ffff:7f00:1", LOOPBACK),
            ("::ffff:169.254.169.254", LINK_LOCAL),
            ("::ffff:8.8.8.8", PUBLIC),
            ("::ffff:0.0.0.0", UNSPECIFIED),
            ("::ffff:0:10.0.0.1", PRIVATE),
            ("64:ff9b::127.0.0.1", LOOPBACK),
            ("64:ff9b::8.8.8.8", PUBLIC),
            ("64:ff9b:1::1", PRIVATE),
            ("2002:7f00:1::", LOOPBACK),
            ("2002:c0a8:101::1", PRIVATE),
            ("2002:808:808::1", PUBLIC),
        ]
        for text, expected in cases:
            self.assertIs(classify_address(text), expected, text)

    def test_address_objects(self) -> None:
        self.assertIs(classify_address(ipaddress.ip_address("10.1.1.1")), PRIVATE)

    def test_not_an_address(self) -> None:
        for text in ("127.1", "0x7f000001", "2130706433", "localhost", "", "::g"):
            self.assertRaises(ValueError, classify_address, text)


class NormalizeHostTests(SynchronousTestCase):
    def test_valid(self) -> None:
        cases: list[tuple[str, str]] = [
            ("example.org", "example.org"),
            ("Example.ORG", "example.org"),
            ("example.org.", "example.org"),
            (" example.org ", "example.org"),
            ("bücher.example", "xn--bcher-kva.example"),
            ("BÜCHER.example", "xn--bcher-kva.example"),
            ("XN--BCHER-KVA.example", "xn--bcher-kva.example"),
            ("ｅｘａｍｐｌｅ。org", "example.org"),
            ("under_score.local", "under_score.local"),
            ("127.0.0.1", "127.0.0.1"),
            ("127.0.0.1.", "127.0.0.1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("[0:0::1]", "::1"),
            ("[::ffff:127.0.0.1]", str(ipaddress.ip_address("::ffff:127.0.0.1"))),
            ("[FE80::1]", "fe80::1"),
            # Not addresses to ipaddress: they stay names, and DNS decides.
            ("127.1", "127.1"),
            ("0x7f000001", "0x7f000001"),
            ("2130706433", "2130706433"),
            ("0177.0.0.1", "0177.0.0.1"),
            ("a" * 63 + ".example", "a" * 63 + ".example"),
        ]
        for host, expected in cases:
            self.assertEqual(normalize_host(host), expected, host)

    def test_invalid(self) -> None:
        for host in (
            "",
            ".",
            "a..b",
            "ex ample",
            "xn--zz.example",
            "[::1",
            "::1]",
            "[127.0.0.1]",
            "[example.org]",
            "-a.example",
            "a-.example",
            "a" * 64 + ".example",
            ".".join(["a" * 60] * 5),
            "host:80",
            "user@host",
            "ho%73t",
            "bü_cher.example",
            "a/b",
        ):
            self.assertRaises(InvalidHost, normalize_host, host)

    def test_invalid_host_is_a_value_error(self) -> None:
        self.assertTrue(issubclass(InvalidHost, ValueError))


class UpstreamPatternTests(SynchronousTestCase):
    def test_matches_host(self) -> None:
        cases: list[tuple[str, str, int, bool]] = [
            ("*.example.org", "a.example.org", 80, True),
            ("*.example.org", "a.b.example.org", 8080, True),
            ("*.example.org", "example.org", 80, False),
            ("*.example.org", "evilexample.org", 80, False),
            ("*.example.org", "a.example.org.evil", 80, False),
            ("*.Example.ORG.", "a.example.org", 80, True),
            ("mirror.local", "mirror.local", 1234, True),
            ("mirror.local", "a.mirror.local", 80, False),
            ("mirror.local:8080", "mirror.local", 8080, True),
            ("mirror.local:8080", "mirror.local", 80, False),
            ("mirror-*.local", "mirror-1.local", 80, True),
            ("mirror-*.local", "mirror-1.x.local", 80, False),
            ("*.bücher.example", "www.xn--bcher-kva.example", 80, True),
            ("127.0.0.1", "127.0.0.1", 80, True),
            ("127.0.0.1", str(ipaddress.ip_address("::ffff:127.0.0.1")), 80, True),
            ("127.0.0.1:3141", "127.0.0.1", 3141, True),
            ("127.0.0.1:3141", "127.0.0.1", 3142, False),
            ("10.0.0.0/8", "10.2.3.4", 80, True),
            ("10.0.0.0/8", "11.0.0.1", 80, False),
            ("10.0.0.1/8", "10.200.0.1", 80, True),
            ("[::1]", "::1", 80, True),
            ("[::1]:3141", "::1", 3141, True),
            ("[::1]:3141", "::1", 80, False),
            ("::1", "::1", 443, True),
            ("fd00::/8", "fd12::5", 80, True),
            ("[fd00::]/8:8080", "fd12::5", 8080, True),
            # Spellings that are not IP literals never match address patterns…
            ("127.0.0.1", "127.1", 80, False),
            ("127.0.0.0/8", "0x7f000001", 80, False),
            ("127.0.0.0/8", "2130706433", 80, False),
            # …nor name patterns (which cannot be written to look like them).
            ("*.example.org", "127.1.example.org.1", 80, False),
            # Address patterns do not match names, nor names addresses.
            ("10.0.0.0/8", "ten.example", 80, False),
            ("*.example.org", "93.184.216.34", 80, False),
        ]
        for text, host, port, expected in cases:
            self.assertIs(UpstreamPattern.parse(text).matches_host(host, port), expected, (text, host, port))

    def test_matches_address(self) -> None:
        cases: list[tuple[str, str, int, bool]] = [
            ("10.0.0.0/8", "10.9.9.9", 80, True),
            ("10.0.0.0/8", "::ffff:10.9.9.9", 80, True),
            ("10.0.0.0/8", "192.168.0.1", 80, False),
            ("10.0.0.0/8:8080", "10.9.9.9", 80, False),
            ("[::1]", "::1", 80, True),
            ("[::1]", "127.0.0.1", 80, False),
            ("mirror.local", "10.9.9.9", 80, False),
        ]
        for text, ip, port, expected in cases:
            self.assertIs(
                UpstreamPattern.parse(text).matches_address(ipaddress.ip_address(ip), port),
                expected,
                (text, ip, port),
            )

    def test_invalid(self) -> None:
        for text in (
            "",
            "*",
            "*.*",
            "foo.*",
            "foo.*x",
            "*:443",
            "host:0",
            "host:65536",
            "host:abc",
            "host:",
            "[127.0.0.1]",
            "[::1]:x",
            "::zz",
            "bad host",
            "a..b",
            "*.xn--zz.example",
            "mir?or.local",
            "127.1",
            "*.1",
            "0x7f000001",
            "*.0x7f000001:80",
            "2130706433",
            "010.0.0.1",
        ):
            self.assertRaises(ValueError, UpstreamPattern.parse, text)


def _policy(*patterns: str, upstreams: tuple[tuple[str, int], ...] = ()) -> AccessPolicy:
    return AccessPolicy(allow_upstream=patterns, configured_upstreams=upstreams)


class VerdictTests(SynchronousTestCase):
    def test_truthiness(self) -> None:
        self.assertTrue(Verdict.allow("ok"))
        self.assertFalse(Verdict.refuse("no"))
        self.assertEqual(Verdict.refuse("no").reason, "no")


class ClientAllowedTests(SynchronousTestCase):
    def test_default_networks(self) -> None:
        policy = AccessPolicy()
        self.assertEqual(policy.allow_from, DEFAULT_ALLOW_FROM)
        cases: list[tuple[str, bool]] = [
            ("127.0.0.1", True),
            ("::1", True),
            ("10.1.2.3", True),
            ("172.17.0.2", True),
            ("192.168.1.5", True),
            ("::ffff:192.168.1.5", True),
            ("::ffff:127.0.0.1", True),
            ("fd12::1", True),
            ("8.8.8.8", False),
            ("::ffff:8.8.8.8", False),
            ("2606:4700::1", False),
            ("100.64.0.1", False),
            ("fe80::1%eth0", False),
            ("not an ip", False),
            ("", False),
        ]
        for ip, expected in cases:
            verdict = policy.client_allowed(ip)
            self.assertIs(verdict.allowed, expected, ip)
            self.assertTrue(verdict.reason)

    def test_configured_networks(self) -> None:
        policy = AccessPolicy(allow_from=("203.0.113.0/24", "2001:db8::/32"))
        self.assertTrue(policy.client_allowed("203.0.113.9"))
        self.assertTrue(policy.client_allowed("::ffff:203.0.113.9"))
        self.assertTrue(policy.client_allowed("2001:db8::5"))
        self.assertFalse(policy.client_allowed("127.0.0.1"))

    def test_empty_means_nobody(self) -> None:
        self.assertFalse(AccessPolicy(allow_from=()).client_allowed("127.0.0.1"))

    def test_bad_network_refused_at_construction(self) -> None:
        self.assertRaises(ValueError, AccessPolicy, allow_from=("10.0.0.0/33",))


class HostAllowedTests(SynchronousTestCase):
    def test_empty_list_allows_any_valid_host(self) -> None:
        policy = _policy()
        for host in ("example.org", "127.0.0.1", "[::1]", "127.1", "bücher.example", "EXAMPLE.org."):
            self.assertTrue(policy.host_allowed(host, 80), host)

    def test_invalid_hosts_refused_with_reason(self) -> None:
        policy = _policy()
        for host in ("", "xn--zz.example", "ex ample", "[::1", "[127.0.0.1]"):
            verdict = policy.host_allowed(host, 80)
            self.assertFalse(verdict, host)
            self.assertTrue(verdict.reason)

    def test_bad_ports(self) -> None:
        policy = _policy()
        for port in (0, -1, 65536):
            self.assertFalse(policy.host_allowed("example.org", port), port)

    def test_patterns(self) -> None:
        policy = _policy(
            "*.example.org",
            "mirror.local:8080",
            "10.0.0.0/8",
            "[::1]:3141",
            "*.bücher.example",
            upstreams=(("Index.Local.", 3141), ("127.0.0.1", 8000)),
        )
        cases: list[tuple[str, int, bool]] = [
            ("a.example.org", 80, True),
            ("A.EXAMPLE.ORG.", 80, True),
            ("example.org", 80, False),
            ("mirror.local", 8080, True),
            ("MIRROR.LOCAL.", 8080, True),
            ("mirror.local", 80, False),
            ("10.1.2.3", 80, True),
            ("[::ffff:10.1.2.3]", 80, True),
            ("11.1.2.3", 80, False),
            ("[::1]", 3141, True),
            ("::1", 3141, True),
            ("[::1]", 80, False),
            ("www.bücher.example", 80, True),
            ("WWW.BÜCHER.example", 80, True),
            ("index.local", 3141, True),
            ("index.local", 3142, False),
            ("127.0.0.1", 8000, True),
            ("127.0.0.1", 8001, False),
            ("127.1", 8000, False),
            ("0x7f000001", 8000, False),
            ("other.org", 80, False),
            ("xn--zz.example.org", 80, False),
        ]
        for host, port, expected in cases:
            verdict = policy.host_allowed(host, port)
            self.assertIs(verdict.allowed, expected, (host, port, verdict.reason))

    def test_other_protocols_ports_only_when_listed_with_the_port(self) -> None:
        """
        Below 1024 only the web ports, unless a pattern names the port
        itself (squid's Safe_ports): an open proxy to port 25 is a spam
        relay.  From 1024 up, as any other port.
        """
        for policy in (_policy(), _policy("*.example.org")):
            for port in (25, 110, 143, 22, 1023):
                verdict = policy.host_allowed("mail.example.org", port)
                self.assertFalse(verdict, port)
                self.assertIn("not a web port", verdict.reason)
            for port in (80, 443, 1024, 8080):
                self.assertTrue(policy.host_allowed("mail.example.org", port), port)
        listed = _policy("mail.example.org:119", upstreams=(("news.local", 563),))
        self.assertTrue(listed.host_allowed("mail.example.org", 119))
        self.assertFalse(listed.host_allowed("mail.example.org", 25))
        self.assertTrue(listed.host_allowed("news.local", 563))

    def test_reasons(self) -> None:
        policy = _policy("*.example.org", upstreams=(("::1", 3141),))
        self.assertIn("'*.example.org'", policy.host_allowed("a.example.org", 80).reason)
        self.assertIn("not in --allow-upstream", policy.host_allowed("b.org", 80).reason)
        self.assertIn("[::1]:3141", policy.host_allowed("[::1]", 3141).reason)
        self.assertIn("configured upstream", policy.host_allowed("[::1]", 3141).reason)

    def test_bad_pattern_refused_at_construction(self) -> None:
        self.assertRaises(ValueError, _policy, "*")
        self.assertRaises(ValueError, _policy, "ok.example", "bad host")
        self.assertRaises(InvalidHost, _policy, upstreams=(("xn--zz", 80),))


class AddressAllowedTests(SynchronousTestCase):
    def test_any_host_mode(self) -> None:
        """With no allow_upstream, only public addresses are reachable."""
        policy = _policy()
        cases: list[tuple[str, str, bool]] = [
            ("example.org", "93.184.216.34", True),
            ("example.org", "2606:2800:220:1::1", True),
            ("example.org", "::ffff:93.184.216.34", True),
            ("localhost", "127.0.0.1", False),
            ("127.1", "127.0.0.1", False),
            ("0x7f000001", "127.0.0.1", False),
            ("rebind.example", "127.0.0.1", False),
            ("rebind.example", "::ffff:127.0.0.1", False),
            ("[::1]", "::1", False),
            ("metadata.example", "169.254.169.254", False),
            ("lan.example", "10.0.0.5", False),
            ("lan.example", "192.168.0.5", False),
            ("cgnat.example", "100.64.0.1", False),
            ("v6.example", "fe80::1", False),
            ("v6.example", "fd00::1", False),
            ("mcast.example", "224.0.0.1", False),
            ("zero.example", "0.0.0.0", False),
            ("zero.example", "::", False),
            ("bcast.example", "255.255.255.255", False),
            ("nat64.example", "64:ff9b::a00:1", False),
            ("6to4.example", "2002:7f00:1::", False),
            ("example.org", "not-an-ip", False),
        ]
        for host, ip, expected in cases:
            verdict = policy.address_allowed(host, 80, ip)
            self.assertIs(verdict.allowed, expected, (host, ip, verdict.reason))
            self.assertTrue(verdict.reason)

    def test_listed_hosts_and_networks(self) -> None:
        policy = _policy(
            "*.corp.example",
            "mirror.local:8080",
            "10.0.0.0/8",
            "127.0.0.1:3141",
            upstreams=(("index.local", 3141), ("127.0.0.1", 8000)),
        )
        cases: list[tuple[str, int, str, bool]] = [
            ("pkg.corp.example", 80, "192.168.4.4", True),
            ("pkg.corp.example", 80, "127.0.0.1", True),
            ("mirror.local", 8080, "192.168.4.4", True),
            ("mirror.local", 80, "192.168.4.4", False),
            ("anything.example", 80, "10.3.3.3", True),
            ("anything.example", 80, "::ffff:10.3.3.3", True),
            ("anything.example", 80, "192.168.3.3", False),
            ("127.0.0.1", 3141, "127.0.0.1", True),
            ("127.0.0.1", 3142, "127.0.0.1", False),
            ("127.1", 80, "127.0.0.1", False),
            ("index.local", 3141, "192.168.9.9", True),
            ("index.local", 3141, "::1", True),
            ("INDEX.LOCAL.", 3141, "192.168.9.9", True),
            ("index.local", 22, "192.168.9.9", False),
            ("127.0.0.1", 8000, "127.0.0.1", True),
            ("127.0.0.1", 8001, "127.0.0.1", False),
            ("metadata.example", 80, "169.254.169.254", False),
            ("public.example", 80, "8.8.8.8", True),
        ]
        for host, port, ip, expected in cases:
            verdict = policy.address_allowed(host, port, ip)
            self.assertIs(verdict.allowed, expected, (host, port, ip, verdict.reason))

    def test_refusal_reason_names_class(self) -> None:
        verdict = _policy().address_allowed("meta.example", 80, "169.254.169.254")
        self.assertIn("link-local", verdict.reason)
        self.assertIn("169.254.169.254", verdict.reason)


class ConnectAllowedTests(SynchronousTestCase):
    def test_table(self) -> None:
        policy = _policy("*.example.org", "mirror.local:8443")
        cases: list[tuple[str, int, bool]] = [
            ("a.example.org", 443, True),
            ("a.example.org", 80, False),
            ("a.example.org", 22, False),
            ("mirror.local", 8443, False),
            ("other.org", 443, False),
        ]
        for host, port, expected in cases:
            self.assertIs(policy.connect_allowed(host, port).allowed, expected, (host, port))
        self.assertTrue(_policy().connect_allowed("anything.example", 443))
        self.assertIn("443", _policy().connect_allowed("anything.example", 25).reason)


class FromConfigTests(SynchronousTestCase):
    def test_upstream_endpoint(self) -> None:
        cases: list[tuple[str, tuple[str, int]]] = [
            ("http://127.0.0.1:3141/simple/", ("127.0.0.1", 3141)),
            ("https://Mirror.Example./alpine", ("mirror.example", 443)),
            ("http://mirror.example/debian", ("mirror.example", 80)),
            ("http://[::1]:8080/", ("::1", 8080)),
            ("http://user:pw@bücher.example/x", ("xn--bcher-kva.example", 80)),
        ]
        for url, expected in cases:
            self.assertEqual(upstream_endpoint(url), expected, url)
        for url in ("/simple/", "ftp://mirror.example/", "http://mirror.example:99999/"):
            self.assertRaises(ValueError, upstream_endpoint, url)

    def test_from_config(self) -> None:
        policy = AccessPolicy.from_config(
            allow_from=["127.0.0.0/8", ipaddress.ip_network("::1/128")],
            allow_upstream=["*.example.org"],
            upstream_urls=["http://127.0.0.1:3141/simple/", "https://Mirror.Example/alpine"],
        )
        self.assertTrue(policy.client_allowed("::1"))
        self.assertFalse(policy.client_allowed("10.0.0.1"))
        self.assertTrue(policy.host_allowed("mirror.example", 443))
        self.assertFalse(policy.host_allowed("mirror.example", 80))
        self.assertTrue(policy.address_allowed("127.0.0.1", 3141, "127.0.0.1"))
        self.assertFalse(policy.address_allowed("127.0.0.1", 3142, "127.0.0.1"))
        self.assertTrue(policy.host_allowed("a.example.org", 80))

    def test_policies_compare_by_configuration(self) -> None:
        self.assertEqual(_policy("a.example"), _policy("a.example"))
        self.assertNotEqual(_policy("a.example"), _policy("b.example"))
