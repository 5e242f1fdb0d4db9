"""
End-to-end: real ``pip install`` and ``uv pip install`` subprocesses against
:func:`buildcache.ecosystems.pypi.index.IndexResource` on 127.0.0.1, in front of an
in-process upstream serving the demo index of :func:`tests.pyindex`.

Each test installs ``bcdemo-a`` cold (one upstream request per page and per
file), stops the upstream, and installs again into a fresh directory: the
warm install must succeed without a single upstream request.  The clients
run with a scrubbed environment (no ``PIP_*``, ``UV_*`` or proxy variables,
no configuration files, no download cache) so nothing but this index can
feed them.  The reactor keeps serving while they run
(``getProcessOutputAndValue``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from twisted.internet import ssl
from twisted.internet.error import CannotListenError
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.server import Site

from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import listen, reactor, start_server, url_of
from tests.test_simple_index import Harness

#: Environment variables that could point a client at another index, a
#: proxy, a configuration file or a cache.
_PROXY_VARIABLES = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy"}


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(("PIP_", "UV_"))
        and name.lower() not in _PROXY_VARIABLES
    }
    environment.update(extra)
    return environment


def find_uv() -> str | None:
    """
    The uv binary of the test extra: from the ``uv`` package, else next to
    this interpreter.
    """
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        try:
            return str(find_uv_bin())
        except FileNotFoundError:
            pass
    candidate = Path(sys.executable).parent / "uv"
    return str(candidate) if candidate.is_file() else None


class InstallTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.fixture = build_index(Path(self.mktemp()))
        self.harness = Harness(self, [StaticSimpleIndex(self.fixture)], clock=reactor)
        self.upstream = self.harness.upstreams[0]
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir()

    @property
    def index_url(self) -> str:
        return self.harness.url("/simple/")

    async def run_client(
        self, argv: Sequence[str], environment: Mapping[str, str]
    ) -> None:
        out, err, code = await getProcessOutputAndValue(
            argv[0], list(argv[1:]), env=dict(environment), path=str(self.work),
            reactor=reactor,
        )
        if code != 0:
            self.fail(
                f"{' '.join(argv)} exited {code}\n--- stdout\n"
                f"{out.decode(errors='replace')}\n--- stderr\n"
                f"{err.decode(errors='replace')}"
            )

    def assert_installed(self, target: Path) -> None:
        self.assertEqual(
            (target / "bcdemo_a" / "__init__.py").read_text(), '__version__ = "2.0"\n'
        )
        self.assertEqual(
            (target / "bcdemo_b" / "__init__.py").read_text(), '__version__ = "1.0"\n'
        )

    def assert_one_request_each(self) -> None:
        requests = self.upstream.index.requests
        self.assertEqual(requests["/simple/bcdemo-a/"], 1)
        self.assertEqual(requests["/simple/bcdemo-b/"], 1)
        self.assertEqual(requests["/files/bcdemo_a-2.0-py3-none-any.whl"], 1)
        self.assertEqual(requests["/files/bcdemo_b-1.0-py3-none-any.whl"], 1)
        self.assertEqual(
            {path: count for path, count in requests.items() if count != 1}, {}
        )

    async def cold_then_warm(self, command: Sequence[str], environment: Mapping[str, str]) -> None:
        cold = self.work / "cold"
        await self.run_client([*command, str(cold), "bcdemo-a"], environment)
        self.assert_installed(cold)
        self.assert_one_request_each()
        asked = len(self.harness.http.urls)
        await self.upstream.stop()
        warm = self.work / "warm"
        await self.run_client([*command, str(warm), "bcdemo-a"], environment)
        self.assert_installed(warm)
        self.assertEqual(len(self.harness.http.urls), asked)

    async def test_pip(self) -> None:
        """
        pip installs through the index cold, then warm with the upstream
        stopped.
        """
        environment = clean_environment({"PIP_CONFIG_FILE": os.devnull})
        command = [
            sys.executable, "-m", "pip", "install",
            "--no-cache-dir", "--disable-pip-version-check", "--no-input",
            "--index-url", self.index_url, "--target",
        ]
        await self.cold_then_warm(command, environment)

    async def test_uv(self) -> None:
        """
        uv installs through the index cold, then warm with the upstream
        stopped.
        """
        uv = find_uv()
        if uv is None:
            raise SkipTest("uv is not installed (it comes with the test extra: pip install -e '.[test]')")
        environment = clean_environment(
            {
                "UV_NO_CACHE": "1",
                "UV_NO_CONFIG": "1",
                "UV_PYTHON_DOWNLOADS": "never",
                "UV_INDEX_URL": self.index_url,
            }
        )
        command = [
            uv, "pip", "install", "--no-cache", "--python", sys.executable,
            "--index-url", self.index_url, "--target",
        ]
        await self.cold_then_warm(command, environment)


def self_signed(directory: Path, host: str) -> tuple[Path, Path]:
    """
    A certificate for ``host`` (and 127.0.0.1) and its key, made with the
    openssl command; the certificate is its own CA.
    """
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={host}", "-addext", f"subjectAltName=DNS:{host},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


class ThroughProxyTests(TestCase):
    """
    pip pointed at the proxy port with HTTP_PROXY (or HTTPS_PROXY) and at
    the box's index: no ``no_proxy`` needed.
    """

    timeout = 120

    def setUp(self) -> None:
        self.fixture = build_index(Path(self.mktemp()))
        self.upstream = StaticSimpleIndex(self.fixture)
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir()

    async def pip(self, index_url: str, environment: Mapping[str, str], *extra: str) -> Path:
        target = self.work / "target"
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            ["-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
             "--no-input", "--index-url", index_url, *extra, "--target", str(target),
             "bcdemo-a"],
            env=clean_environment({"PIP_CONFIG_FILE": os.devnull, **environment}),
            path=str(self.work), reactor=reactor,
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        self.assertEqual(
            (target / "bcdemo_a" / "__init__.py").read_text(), '__version__ = "2.0"\n'
        )
        return target

    async def test_http_proxy_to_own_index(self) -> None:
        """
        Requests for the box's own index port that arrive at the proxy (as
        absolute URIs, by whatever name the client used) are served by the
        index: the install succeeds and is cached.
        """
        up = listen(self.upstream)
        self.addCleanup(up.stopListening)
        running = start_server(
            self, {"pypi_upstreams": (url_of(up, "/simple"),)}
        )
        proxy = f"http://127.0.0.1:{running.proxy_port}"
        await self.pip(
            f"http://localhost:{running.index_port}/simple/",
            {"HTTP_PROXY": proxy, "http_proxy": proxy},
        )
        totals = running.server.activity.totals
        self.assertGreater(totals["index"].requests, 0)
        self.assertEqual(totals["proxy"].requests, 0)
        self.assertEqual(self.upstream.requests["/files/bcdemo_a-2.0-py3-none-any.whl"], 1)

    async def test_https_proxy_connect(self) -> None:
        """
        With HTTPS_PROXY pointing at the proxy port, pip reaches an https
        index through CONNECT (tunnelled, not cached).
        """
        if shutil.which("openssl") is None:
            raise SkipTest("the openssl command is not installed")
        cert, key = self_signed(self.work, "localhost")
        context = ssl.DefaultOpenSSLContextFactory(str(key), str(cert))
        try:
            tls_port = reactor.listenSSL(443, Site(self.upstream), context, interface="127.0.0.1")
        except CannotListenError as e:
            raise SkipTest(f"cannot listen on 127.0.0.1:443 for the https index: {e}")
        self.addCleanup(tls_port.stopListening)
        running = start_server(self, {"allow_upstream": ("localhost",)})
        proxy = f"http://127.0.0.1:{running.proxy_port}"
        await self.pip(
            "https://localhost/simple/",
            # requests lets REQUESTS_CA_BUNDLE override pip's --cert.
            {"HTTPS_PROXY": proxy, "https_proxy": proxy,
             "REQUESTS_CA_BUNDLE": str(cert)},
            "--cert", str(cert),
        )
        self.assertEqual(self.upstream.requests["/files/bcdemo_a-2.0-py3-none-any.whl"], 1)
