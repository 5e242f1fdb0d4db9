"""
End-to-end: real C{pip install} and C{uv pip install} subprocesses against
L{buildcache.simple_index.IndexResource} on 127.0.0.1, in front of an
in-process upstream serving the demo index of L{tests.pyindex}.

Each test installs C{bcdemo-a} cold (one upstream request per page and per
file), stops the upstream, and installs again into a fresh directory: the
warm install must succeed without a single upstream request.  The clients
run with a scrubbed environment (no C{PIP_*}, C{UV_*} or proxy variables,
no configuration files, no download cache) so nothing but this index can
feed them.  The reactor keeps serving while they run
(C{getProcessOutputAndValue}).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.pyindex import StaticSimpleIndex, build_index
from tests.support import reactor
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
    The uv binary of the test extra: from the C{uv} package, else next to
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
