"""
The README's commands, as written: the set-up commands are the ones CI
runs (tests/test_packaging.py), and the quick start's "check that it works"
commands run here against a real ``twistd buildcache`` on the default
ports, with its Alpine mirror route and pip upstream pointed at in-process
repositories on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.apkrepo import RepositoryResource, build_apk, write_repository
from tests.pyindex import DemoRelease, StaticSimpleIndex, build_index
from tests.support import listen, reactor, url_of
from tests.test_service import TWISTD, ServerProcess

README = Path(__file__).resolve().parent.parent / "README.md"


def check_commands() -> list[str]:
    """
    The shell commands of the README's "Check that it works" block.
    """
    text = README.read_text()
    start = text.index("Check that it works")
    block = re.search(r"```sh\n(.*?)```", text[start:], re.S)
    assert block is not None, "no ```sh block after 'Check that it works'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class QuickStartTests(TestCase):
    timeout = 120

    async def test_check_commands(self) -> None:
        if not (port_free(8899) and port_free(3141) and port_free(5000)):
            raise SkipTest(
                "ports 8899, 3141 or 5000 are in use; the README's commands need them"
            )
        if not os.access(TWISTD, os.X_OK):
            raise SkipTest("twistd of this Python is not installed")
        work = Path(self.mktemp()).resolve()
        # An Alpine-style repository at /alpine/v3.20/main/x86_64/ and a
        # simple index with a project "six".
        packages = [build_apk("busybox", "1.36.1-r29", data_files={"bin/busybox": b"x" * 4000})]
        write_repository(work / "repo" / "alpine" / "v3.20" / "main", packages)
        apk_port = listen(RepositoryResource(work / "repo"))
        self.addCleanup(apk_port.stopListening)
        index = build_index(work / "pypi", releases=(DemoRelease("six", "1.16.0"),))
        pypi_port = listen(StaticSimpleIndex(index))
        self.addCleanup(pypi_port.stopListening)

        process = ServerProcess()
        environ = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
        transport = reactor.spawnProcess(
            process, TWISTD,
            [TWISTD, "--nodaemon", "--pidfile=", "--logfile=-", "buildcache",
             "--port", "tcp:8899:interface=127.0.0.1",
             "--pypi-port", "tcp:3141:interface=127.0.0.1",
             "--registry-port", "tcp:5000:interface=127.0.0.1",
             "--registry", "docker.io=http://127.0.0.1:1",
             "--cache-dir", str(work / "cache"),
             "--mirror", f"alpine={url_of(apk_port, '/alpine')}",
             "--pypi-upstream", url_of(pypi_port, "/simple")],
            env=environ,
        )
        def stop() -> object:
            if process.ended.called:
                return None
            transport.signalProcess("TERM")
            return process.ended

        self.addCleanup(stop)
        await process.wait_for(b"Site starting on 3141")

        shell_environ = {
            k: v for k, v in os.environ.items()
            if not k.upper().startswith("PIP_") and k.lower() not in ("http_proxy", "https_proxy")
        }
        shell_environ["PIP_CONFIG_FILE"] = os.devnull
        shell_environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        outputs = []
        for command in check_commands():
            out, err, code = await getProcessOutputAndValue(
                "/bin/bash", ["-c", command], env=shell_environ, path=str(work),
                reactor=reactor,
            )
            self.assertEqual(code, 0, f"{command}\n{out.decode()}\n{err.decode()}")
            outputs.append(out.decode())
        # Up and configured before anything was fetched.
        before = json.loads(outputs[0])
        self.assertEqual(before["store"]["entries"], 0)
        self.assertEqual(outputs[1].strip().lower(), "x-cache: miss")
        self.assertEqual(outputs[2].strip().lower(), "x-cache: hit")
        self.assertIn("six-1.16.0", outputs[3])
        self.assertEqual(outputs[4].strip(), "{}")
        out, err, code = await getProcessOutputAndValue(
            "/bin/bash", ["-c", check_commands()[0]], env=shell_environ,
            path=str(work), reactor=reactor,
        )
        self.assertEqual(code, 0, err.decode())
        stats = json.loads(out)
        # The APKINDEX, and pip's page, core metadata and wheel; one hit.
        # The core metadata is read ahead with the page, the wheel once pip
        # has the metadata (each unless pip asks first); pip's request for
        # each is a MISS either way: its bytes crossed the line for it.
        self.assertEqual(stats["store"]["entries"], 4)
        self.assertEqual(stats["by_status"]["HIT"], 1)
        self.assertIn(stats["store"]["prefetches"], (0, 1, 2))
        self.assertEqual(stats["store"]["prefetch_hits"], stats["store"]["prefetches"])
        self.assertEqual(stats["front_ends"]["mirror"]["requests"], 2)
