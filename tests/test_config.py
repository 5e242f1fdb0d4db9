"""
Tests for :mod:`buildcache.config` and :mod:`buildcache.options`: option
parsing, defaults and usage errors.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat

import attrs
from hypothesis import given
from hypothesis import strategies as st
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from buildcache.config import (
    DEFAULT_ALLOW_FROM,
    DEFAULT_MIRRORS,
    DEFAULT_REGISTRIES,
    Config,
    Mirror,
    default_cache_dir,
    default_workers,
    format_duration,
    format_size,
    parse_duration,
    parse_endpoint,
    parse_network,
    parse_size,
    parse_upstream_pattern,
)
from buildcache.options import (
    NoPyPIUpstream,
    Options,
    default_pypi_upstreams,
    pip_builtin_index_url,
    pip_configured_index_url,
    prepare_cache_dir,
)

LOCAL_INDEX = "http://127.0.0.1:3999/simple"
ALL_OPTIONS = {
    "workers",
    "port",
    "pypi-port",
    "cache-dir",
    "max-size",
    "max-object-size",
    "index-ttl",
    "upstream-timeout",
    "prefetch-max-size",
    "mirror",
    "allow-from",
    "allow-upstream",
    "pypi-upstream",
    "registry-port",
    "registry",
    "registry-auth",
    "log-format",
    "max-connections-per-client",
    "netrc",
    "shared-store",
    "shared-secret-file",
    "shared-max-size",
    "shared-wait",
}


class ParseSizeTests(SynchronousTestCase):
    def test_units(self) -> None:
        """
        Sizes take K, M, G, T suffixes in powers of 1024, fractions, an
        optional B or iB, in any case; a bare number is bytes.
        """
        cases = {
            "500M": 500 * 1024**2,
            "20G": 20 * 1024**3,
            "1.5T": 3 * 1024**4 // 2,
            "1024K": 1024**2,
            "1048576": 1048576,
            "10GB": 10 * 1024**3,
            "10GiB": 10 * 1024**3,
            "10gib": 10 * 1024**3,
            "100B": 100,
            " 2 M ": 2 * 1024**2,
            "12345678901234567": 12345678901234567,
        }
        for text, expected in cases.items():
            self.assertEqual(parse_size(text), expected, text)

    def test_invalid(self) -> None:
        """
        Words, negative numbers, zero, unknown units and a lone unit are not
        sizes.
        """
        for text in ["ten", "", "-1", "0", "0K", "10X", "G", "1.2.3G", "5 GB B"]:
            self.assertRaises(ValueError, parse_size, text)

    @given(st.integers(min_value=1, max_value=2**62))
    def test_format_round_trip(self, size: int) -> None:
        """
        :func:`format_size` writes what :func:`parse_size` reads back exactly.
        """
        self.assertEqual(parse_size(format_size(size)), size)

    def test_format_largest_whole_unit(self) -> None:
        self.assertEqual(format_size(10 * 1024**3), "10G")
        self.assertEqual(format_size(1536 * 1024**3), "1536G")
        self.assertEqual(format_size(1000), "1000")


class ParseDurationTests(SynchronousTestCase):
    def test_units(self) -> None:
        cases = {
            "300": 300.0,
            "30s": 30.0,
            "5m": 300.0,
            "1h": 3600.0,
            "1.5h": 5400.0,
            "1d": 86400.0,
            "0": 0.0,
            "2M": 120.0,
        }
        for text, expected in cases.items():
            self.assertEqual(parse_duration(text), expected, text)

    def test_invalid(self) -> None:
        for text in ["five", "", "-1", "5x", "m", "1h30m"]:
            self.assertRaises(ValueError, parse_duration, text)

    def test_format_round_trip(self) -> None:
        for seconds in [300.0, 30.0, 0.5, 86400.0]:
            self.assertEqual(parse_duration(format_duration(seconds)), seconds)


class ParseEndpointTests(SynchronousTestCase):
    def test_bare_port(self) -> None:
        """
        A bare port number becomes a TCP endpoint on all interfaces.
        """
        self.assertEqual(parse_endpoint("8899"), "tcp:8899")
        self.assertEqual(parse_endpoint("1"), "tcp:1")
        self.assertEqual(parse_endpoint("65535"), "tcp:65535")

    def test_descriptions_kept(self) -> None:
        """
        Endpoint descriptions come back unchanged.
        """
        for description in [
            "tcp:8899:interface=127.0.0.1",
            "tcp:port=8899",
            r"tcp6:port=8899:interface=\:\:1",
            "unix:/run/buildcache.sock",
            "unix:address=/run/buildcache.sock:mode=660",
            "systemd:domain=INET:index=0",
        ]:
            self.assertEqual(parse_endpoint(description), description)

    def test_ports_out_of_range(self) -> None:
        """
        Port 0 and ports above 65535 are refused, bare or inside a
        description.
        """
        for text in ["0", "70000", "tcp:0", "tcp:70000", "tcp:port=0", "tcp6:99999"]:
            error = self.assertRaises(ValueError, parse_endpoint, text)
            self.assertIn("between 1 and 65535", str(error))

    def test_malformed(self) -> None:
        for text in ["", "tcp", "tcp:", "tcp:http", "unix:", "nosuchtype:80", "-1"]:
            self.assertRaises(ValueError, parse_endpoint, text)


class UpstreamPatternTests(SynchronousTestCase):
    def test_valid_patterns(self) -> None:
        """
        Patterns are checked by buildcache.access (whose tests cover
        matching) and returned stripped.
        """
        for text in ["*.Example.org", " mirror.local:8080", "127.0.0.1", "10.0.0.0/8", "[::1]:8080"]:
            self.assertEqual(parse_upstream_pattern(text), text.strip(), text)

    def test_invalid_patterns(self) -> None:
        for text in ["", "a b", "http://mirror.local", "mirror.local:0", "[::1", "10.0.0.0/33", "*"]:
            self.assertRaises(ValueError, parse_upstream_pattern, text)


class NetworkTests(SynchronousTestCase):
    def test_networks(self) -> None:
        self.assertEqual(parse_network("10.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))
        self.assertEqual(parse_network("10.1.2.3/8"), ipaddress.ip_network("10.0.0.0/8"))
        self.assertEqual(parse_network("::1"), ipaddress.ip_network("::1/128"))
        for text in ["1.2.3", "10.0.0.0/40", "localhost", ""]:
            self.assertRaises(ValueError, parse_network, text)


class DefaultCacheDirTests(SynchronousTestCase):
    def test_systemd_cache_directory(self) -> None:
        """
        systemd's CACHE_DIRECTORY wins, used as it is; of several, the
        first.
        """
        environ = {"CACHE_DIRECTORY": "/var/cache/bc", "XDG_CACHE_HOME": "/x"}
        self.assertEqual(default_cache_dir(environ), "/var/cache/bc")
        environ["CACHE_DIRECTORY"] = "/var/cache/one:/var/cache/two"
        self.assertEqual(default_cache_dir(environ), "/var/cache/one")

    def test_xdg_cache_home(self) -> None:
        environ = {"XDG_CACHE_HOME": "/srv/cache", "HOME": "/home/u"}
        self.assertEqual(default_cache_dir(environ), "/srv/cache/buildcache")

    def test_home(self) -> None:
        """
        Without XDG_CACHE_HOME, or with a relative one (invalid per the XDG
        spec), it is ~/.cache/buildcache.
        """
        self.assertEqual(
            default_cache_dir({"HOME": "/home/u"}), "/home/u/.cache/buildcache"
        )
        self.assertEqual(
            default_cache_dir({"HOME": "/home/u", "XDG_CACHE_HOME": "rel"}),
            "/home/u/.cache/buildcache",
        )
        self.assertEqual(
            default_cache_dir({"HOME": "/home/u", "CACHE_DIRECTORY": ""}),
            "/home/u/.cache/buildcache",
        )


class PrepareCacheDirTests(SynchronousTestCase):
    def test_created(self) -> None:
        """
        A missing directory is created, parents included, and its absolute
        path returned; no probe file is left behind.
        """
        path = os.path.join(self.mktemp(), "a", "b")
        result = prepare_cache_dir(path)
        self.assertEqual(result, os.path.abspath(path))
        self.assertTrue(os.path.isdir(path))
        self.assertEqual(os.listdir(path), [])

    def test_existing(self) -> None:
        path = self.mktemp()
        os.makedirs(path)
        with open(os.path.join(path, "kept"), "w") as f:
            f.write("x")
        self.assertEqual(prepare_cache_dir(path), os.path.abspath(path))
        self.assertEqual(os.listdir(path), ["kept"])

    def test_under_a_file(self) -> None:
        parent = self.mktemp()
        with open(parent, "w") as f:
            f.write("not a directory")
        self.assertRaises(ValueError, prepare_cache_dir, os.path.join(parent, "c"))

    def test_is_a_file(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a directory")
        self.assertRaises(ValueError, prepare_cache_dir, path)

    def test_unwritable(self) -> None:
        if os.geteuid() == 0:
            raise self.skipTest("root writes to read-only directories")
        path = self.mktemp()
        os.makedirs(path)
        os.chmod(path, stat.S_IRUSR | stat.S_IXUSR)
        self.addCleanup(os.chmod, path, stat.S_IRWXU)
        self.assertRaises(ValueError, prepare_cache_dir, path)


class DefaultPyPIUpstreamTests(SynchronousTestCase):
    def test_environment_first(self) -> None:
        """
        PIP_INDEX_URL wins over pip's configuration; the trailing slash is
        dropped.
        """
        self.assertEqual(
            default_pypi_upstreams(
                {"PIP_INDEX_URL": LOCAL_INDEX + "/"},
                configured_index_url=lambda: "http://127.0.0.2/simple",
                builtin_index_url=lambda: "http://127.0.0.3/simple",
            ),
            (LOCAL_INDEX,),
        )

    def test_configured_then_builtin(self) -> None:
        self.assertEqual(
            default_pypi_upstreams(
                {},
                configured_index_url=lambda: "http://127.0.0.2/simple",
                builtin_index_url=lambda: "http://127.0.0.3/simple",
            ),
            ("http://127.0.0.2/simple",),
        )
        self.assertEqual(
            default_pypi_upstreams(
                {"PIP_INDEX_URL": ""},
                configured_index_url=lambda: None,
                builtin_index_url=lambda: "http://127.0.0.3/simple",
            ),
            ("http://127.0.0.3/simple",),
        )

    def test_none(self) -> None:
        """
        Without pip and PIP_INDEX_URL there is no default.
        """
        self.assertRaises(
            NoPyPIUpstream,
            default_pypi_upstreams,
            {},
            configured_index_url=lambda: None,
            builtin_index_url=lambda: None,
        )

    def test_not_http(self) -> None:
        """
        An index pip reads from disk cannot be mirrored over HTTP: it is an
        error, not a silent fallback to another index.
        """
        error = self.assertRaises(
            NoPyPIUpstream,
            default_pypi_upstreams,
            {"PIP_INDEX_URL": "file:///srv/simple"},
            builtin_index_url=lambda: "http://127.0.0.3/simple",
        )
        self.assertIn("PIP_INDEX_URL", str(error))

    def test_pip_builtin(self) -> None:
        """
        pip's built-in index, read from pip, is an https URL.
        """
        try:
            import pip  # noqa: F401
        except ImportError:
            raise self.skipTest("pip is not installed in this Python")
        url = pip_builtin_index_url()
        assert url is not None
        self.assertTrue(url.startswith("https://"), url)

    def test_pip_configuration_file(self) -> None:
        """
        pip's configured index-url is read, [install] before [global].
        """
        try:
            import pip  # noqa: F401
        except ImportError:
            raise self.skipTest("pip is not installed in this Python")
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("[global]\nindex-url = http://127.0.0.2/simple\n")
        self.patch(os, "environ", {"PIP_CONFIG_FILE": path})
        self.assertEqual(pip_configured_index_url(), "http://127.0.0.2/simple")
        with open(path, "a") as f:
            f.write("[install]\nindex-url = http://127.0.0.4/simple\n")
        self.assertEqual(pip_configured_index_url(), "http://127.0.0.4/simple")


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        """
        Only the cache directory is required; a relative one is made
        absolute; there is no PyPI upstream unless one is given.
        """
        config = Config(cache_dir="cache")
        self.assertEqual(config.cache_dir, os.path.abspath("cache"))
        self.assertEqual(config.proxy_endpoint, "tcp:8899")
        self.assertEqual(config.index_endpoint, "tcp:3141")
        self.assertEqual(config.max_size, 10 * 1024**3)
        self.assertEqual(config.prefetch_max_size, 32 * 1024**2)
        self.assertEqual(config.index_ttl, 300.0)
        self.assertEqual(config.upstream_timeout, 30.0)
        self.assertEqual(config.mirrors, DEFAULT_MIRRORS)
        self.assertEqual(config.allow_from, DEFAULT_ALLOW_FROM)
        self.assertEqual(config.allow_upstream, ())
        self.assertEqual(config.pypi_upstreams, ())
        self.assertEqual(config.log_format, "text")

    def test_frozen_and_tuples(self) -> None:
        config = Config(
            cache_dir="/c",
            pypi_upstreams=[LOCAL_INDEX],
            mirrors=[Mirror(name="m", url="http://127.0.0.1/m/")],
        )
        self.assertEqual(config.pypi_upstreams, (LOCAL_INDEX,))
        self.assertEqual(config.mirrors, (Mirror("m", "http://127.0.0.1/m"),))
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, config, "max_size", 1)

    def test_invalid(self) -> None:
        self.assertRaises(ValueError, Config, cache_dir="/c", log_format="xml")
        self.assertRaises(ValueError, Config, cache_dir="/c", max_size=0)
        self.assertRaises(ValueError, Config, cache_dir="/c", upstream_timeout=0)
        self.assertRaises(ValueError, Mirror, name="Bad", url="http://127.0.0.1")
        self.assertRaises(ValueError, Mirror, name="ok", url="ftp://127.0.0.1")

    def test_default_alpine_mirror(self) -> None:
        self.assertEqual(
            DEFAULT_MIRRORS,
            (Mirror(name="alpine", url="https://dl-cdn.alpinelinux.org/alpine"),),
        )

    def test_default_allow_from(self) -> None:
        self.assertEqual(
            [str(network) for network in DEFAULT_ALLOW_FROM],
            [
                "127.0.0.0/8",
                "::1/128",
                "10.0.0.0/8",
                "172.16.0.0/12",
                "192.168.0.0/16",
                "fc00::/7",
            ],
        )


class OptionsTests(SynchronousTestCase):
    """
    :class:`Options` on an environment whose defaults stay inside the test's
    temporary directory and never consult the machine's pip settings.
    """

    def environ(self, **extra: str) -> dict[str, str]:
        home = os.path.abspath(self.mktemp())
        environ = {"HOME": home, "PIP_INDEX_URL": LOCAL_INDEX}
        environ.update(extra)
        return environ

    def parse(self, *arguments: str, **environ: str) -> Config:
        options = Options(self.environ(**environ))
        options.parseOptions(list(arguments))
        config: Config = options.config
        return config

    def usage_error(self, *arguments: str, **environ: str) -> str:
        options = Options(self.environ(**environ))
        try:
            options.parseOptions(list(arguments))
        except UsageError as error:
            return str(error)
        raise AssertionError(f"{arguments!r} parsed without error")

    def test_defaults(self) -> None:
        """
        With no arguments, every field has its documented default, the cache
        directory follows the environment and is created, and the PyPI
        upstream is the one pip would use.
        """
        environ = self.environ()
        options = Options(environ)
        options.parseOptions([])
        cache_dir = os.path.join(environ["HOME"], ".cache", "buildcache")
        self.assertEqual(
            options.config,
            Config(
                cache_dir=cache_dir, pypi_upstreams=(LOCAL_INDEX,),
                registry_endpoint="tcp:5000", registries=DEFAULT_REGISTRIES,
                workers=default_workers(),
            ),
        )
        self.assertTrue(os.path.isdir(cache_dir))

    def test_cache_directory_environment(self) -> None:
        cache = os.path.abspath(self.mktemp())
        config = self.parse(CACHE_DIRECTORY=f"{cache}:/elsewhere")
        self.assertEqual(config.cache_dir, cache)
        self.assertTrue(os.path.isdir(cache))

    def test_cache_dir_option(self) -> None:
        path = self.mktemp()
        config = self.parse("--cache-dir", path)
        self.assertEqual(config.cache_dir, os.path.abspath(path))
        self.assertTrue(os.path.isdir(path))

    def test_every_field(self) -> None:
        config = self.parse(
            "--port", "tcp:8080:interface=127.0.0.1",
            "--pypi-port", "3142",
            "--max-size", "1.5T",
            "--index-ttl", "5m",
            "--upstream-timeout", "1h",
            "--mirror", "debian=http://127.0.0.1:9000/debian/",
            "--allow-from", "10.1.0.0/16",
            "--allow-from", "::1",
            "--allow-upstream", "*.Example.org",
            "--allow-upstream", "127.0.0.1",
            "--pypi-upstream", "http://127.0.0.1:4000/simple/",
            "--pypi-upstream", "https://127.0.0.1:4001/root/simple",
            "--log-format", "json",
        )  # fmt: skip
        self.assertEqual(config.proxy_endpoint, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(config.index_endpoint, "tcp:3142")
        self.assertEqual(config.max_size, 3 * 1024**4 // 2)
        self.assertEqual(config.index_ttl, 300.0)
        self.assertEqual(self.parse("--prefetch-max-size", "0").prefetch_max_size, 0)
        self.assertEqual(self.parse("--prefetch-max-size", "8M").prefetch_max_size, 8 * 1024**2)
        self.assertEqual(
            self.parse("--max-connections-per-client", "1000").max_connections_per_client,
            1000,
        )
        self.assertEqual(self.parse().max_connections_per_client, 256)
        self.assertEqual(self.parse().max_object_size, 0)
        self.assertEqual(self.parse("--max-object-size", "2G").max_object_size, 2 * 1024**3)
        self.assertEqual(config.upstream_timeout, 3600.0)
        self.assertEqual(
            config.mirrors,
            DEFAULT_MIRRORS + (Mirror("debian", "http://127.0.0.1:9000/debian"),),
        )
        self.assertEqual(
            config.allow_from,
            (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("::1/128")),
        )
        self.assertEqual(config.allow_upstream, ("*.Example.org", "127.0.0.1"))
        self.assertEqual(
            config.pypi_upstreams,
            ("http://127.0.0.1:4000/simple", "https://127.0.0.1:4001/root/simple"),
        )
        self.assertEqual(config.log_format, "json")

    def test_mirror_overrides_builtin(self) -> None:
        """
        A --mirror named alpine replaces the built-in one.
        """
        config = self.parse("--mirror", "alpine=http://127.0.0.1:9/alpine")
        self.assertEqual(config.mirrors, (Mirror("alpine", "http://127.0.0.1:9/alpine"),))

    def test_given_pypi_upstream_ignores_environment(self) -> None:
        config = self.parse(
            "--pypi-upstream", "http://127.0.0.1:4000/simple", PIP_INDEX_URL="not a url"
        )
        self.assertEqual(config.pypi_upstreams, ("http://127.0.0.1:4000/simple",))

    def test_every_option_listed_with_default(self) -> None:
        """
        --help lists every option, each with a default in a form the option
        accepts.
        """
        options = Options(self.environ())
        # Wide enough that no long path is broken across lines.
        help_text = " ".join(options.getUsage(width=1000).split())
        self.assertEqual(
            {name.rstrip("=") for name in options.longOpt} - {"help", "version"},
            ALL_OPTIONS,
        )
        for expected in [
            "--port= Endpoint of the HTTP proxy and mirror routes. [default: tcp:8899]",
            "[default: tcp:3141]",
            "[default: tcp:5000]",
            "[default: 10G]",
            "[default: 300s]",
            "[default: 30s]",
            "[default: text]",
            "[default: 32M]",
            "one more is answered 503 (counted across --workers). [default: 256]",
            "[default: alpine=https://dl-cdn.alpinelinux.org/alpine]",
            "[default: 127.0.0.0/8 ::1/128 10.0.0.0/8 172.16.0.0/12 "
            "192.168.0.0/16 fc00::/7]",
            "[default: any public host]",
            f"[default: {LOCAL_INDEX}]",
            f"[default: {options['cache-dir']}]",
        ]:
            self.assertIn(expected, help_text)
        self.assertEqual(help_text.count("[default: "), len(ALL_OPTIONS))

    def test_help_resolves_no_pypi_default(self) -> None:
        """
        --help still works when there is no default upstream, and says why.
        """
        options = Options(self.environ(PIP_INDEX_URL="file:///srv/simple"))
        self.assertIn("[default: none (PIP_INDEX_URL", " ".join(str(options).split()))

    def test_usage_errors_name_their_option(self) -> None:
        """
        Each bad value raises a UsageError whose message starts with the
        option's name.
        """
        blocker = os.path.abspath(self.mktemp())
        with open(blocker, "w") as f:
            f.write("a file where a directory should be")
        cases = [
            ("--port", "0"),
            ("--port", "70000"),
            ("--port", "tcp:0:interface=127.0.0.1"),
            ("--port", "nosuchtype:80"),
            ("--pypi-port", "0"),
            ("--pypi-port", "tcp:70000"),
            ("--cache-dir", os.path.join(blocker, "cache")),
            ("--cache-dir", blocker),
            ("--max-size", "ten"),
            ("--max-size", "0"),
            ("--index-ttl", "soon"),
            ("--index-ttl", "-5"),
            ("--upstream-timeout", "0"),
            ("--upstream-timeout", "1y"),
            ("--mirror", "alpine"),
            ("--mirror", "Alpine=http://127.0.0.1/a"),
            ("--mirror", "-x=http://127.0.0.1/a"),
            ("--mirror", "a=ftp://127.0.0.1/a"),
            ("--mirror", "a=http://"),
            ("--mirror", "a=http://127.0.0.1:99999/"),
            ("--allow-from", "10.0.0.0/33"),
            ("--allow-from", "everyone"),
            ("--allow-upstream", "a b"),
            ("--allow-upstream", "host:0"),
            ("--pypi-upstream", "file:///srv/simple"),
            ("--pypi-upstream", "127.0.0.1/simple"),
            ("--log-format", "xml"),
            ("--prefetch-max-size", "-1"),
            ("--prefetch-max-size", "lots"),
            ("--max-connections-per-client", "0"),
            ("--max-connections-per-client", "-3"),
            ("--max-connections-per-client", "2.5"),
            ("--max-object-size", "-1"),
            ("--max-object-size", "big"),
            ("--mirror", "a=http://127.0.0.1:0/"),
            ("--pypi-upstream", "http://u:t@127.0.0.1:0/simple"),
        ]
        for option, value in cases:
            message = self.usage_error(option, value)
            self.assertTrue(message.startswith(option + ": "), (option, value, message))

    def test_usage_errors_spell_options_as_typed(self) -> None:
        """
        An error message names options as a user types them
        (``--allow-upstream``), never as the code spells them
        (``allow_upstream``).
        """
        internal = re.compile(
            r"(?<![-\w])(allow_upstream|allow_from|pypi_upstream|max_size|index_ttl"
            r"|upstream_timeout|prefetch_max_size|log_format|cache_dir)"
        )
        cases = [
            ("--allow-upstream", "*"),
            ("--allow-upstream", "example.*"),
            ("--allow-upstream", " "),
            ("--allow-upstream", "127.1"),
            ("--allow-from", "everyone"),
            ("--max-size", "0"),
            ("--mirror", "Alpine=http://127.0.0.1/a"),
            ("--pypi-upstream", "file:///srv/simple"),
        ]
        for option, value in cases:
            message = self.usage_error(option, value)
            self.assertIsNone(internal.search(message), message)
        self.assertIn(
            "leave --allow-upstream empty", self.usage_error("--allow-upstream", "*")
        )
        self.assertIn(
            "empty --allow-upstream entry", self.usage_error("--allow-upstream", " ")
        )

    def test_object_larger_than_the_cache(self) -> None:
        """
        --max-object-size over --max-size could never be kept: refused,
        naming both (before: accepted without a word).
        """
        message = self.usage_error("--max-size", "1G", "--max-object-size", "3G")
        self.assertTrue(message.startswith("--max-object-size 3G"), message)
        self.assertIn("--max-size 1G", message)
        self.assertEqual(
            self.parse("--max-size", "1G", "--max-object-size", "1G").max_object_size,
            1 << 30,
        )

    def test_duplicate_mirror(self) -> None:
        message = self.usage_error(
            "--mirror", "a=http://127.0.0.1/a", "--mirror", "a=http://127.0.0.1/b"
        )
        self.assertTrue(message.startswith("--mirror: "), message)
        self.assertIn("twice", message)

    def test_no_pypi_default(self) -> None:
        """
        An unusable default PyPI upstream is a usage error naming
        --pypi-upstream.
        """
        message = self.usage_error(PIP_INDEX_URL="file:///srv/simple")
        self.assertTrue(message.startswith("--pypi-upstream: "), message)
        self.assertIn("PIP_INDEX_URL", message)

    def test_bad_value_creates_no_cache_dir(self) -> None:
        """
        A bad option is reported before the cache directory is created.
        """
        environ = self.environ()
        options = Options(environ)
        self.assertRaises(UsageError, options.parseOptions, ["--max-size", "ten"])
        self.assertFalse(os.path.exists(environ["HOME"]))
