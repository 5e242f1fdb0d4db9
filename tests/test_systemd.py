"""
Tests for ``contrib/buildcache.service``: ``systemd-analyze verify`` accepts
it (where systemd is installed), it carries the hardening it promises, its
``ExecStart`` is a command line twistd and buildcache accept, and the one
protection it leaves off (``MemoryDenyWriteExecute``) is off for the reason
its comment gives.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from buildcache.service import STOP_GRACE

REPO_ROOT = Path(__file__).resolve().parent.parent
UNIT = REPO_ROOT / "contrib" / "buildcache.service"

#: Settings the unit must have, with their exact values.
HARDENING = {
    "DynamicUser": "yes",
    "CacheDirectory": "buildcache",
    "Restart": "on-failure",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "CapabilityBoundingSet": "",
    "KillSignal": "SIGTERM",
    "TimeoutStopSec": "20",
    "LimitNOFILE": "65536",
}

# Under MemoryDenyWriteExecute, builds the TLS client connection the server
# makes for an https upstream.  Exit 77: the kernel cannot enforce it (no
# PR_SET_MDWE, Linux < 6.3); 1: TLS fails; 0: TLS works.
_TLS_UNDER_MDWE = """
import ctypes, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import BrowserLikePolicyForHTTPS
creator = BrowserLikePolicyForHTTPS().creatorForNetloc(b"localhost", 443)
tls = TLSMemoryBIOFactory(creator, True, Factory.forProtocol(Protocol)).buildProtocol(None)
transport = StringTransport()
try:
    tls.makeConnection(transport)
except MemoryError as error:
    print(error)
    sys.exit(1)
print(f"ClientHello of {len(transport.value())} bytes")
"""


def read_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """
    The settings of a unit file, by section, in order (a key may repeat).
    """
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, separator, value = line.partition("=")
        assert separator, f"not KEY=VALUE: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def service_settings() -> dict[str, str]:
    """
    The [Service] settings, the last value of a repeated key winning as
    in systemd.
    """
    return dict(read_unit(UNIT.read_text())["Service"])


class UnitContentTests(SynchronousTestCase):
    def test_hardening(self) -> None:
        """
        The unit runs as a dynamic user in its cache directory with the
        promised protections.
        """
        settings = service_settings()
        self.assertEqual(
            {key: settings.get(key) for key in HARDENING}, HARDENING
        )
        self.assertEqual(
            set(settings["RestrictAddressFamilies"].split()),
            {"AF_INET", "AF_INET6", "AF_UNIX"},
        )

    def test_stop_timeout_covers_grace(self) -> None:
        """
        systemd waits longer than the server lets downloads in flight
        finish, so a SIGTERM never ends in a SIGKILL of a clean stop.
        """
        self.assertGreater(float(service_settings()["TimeoutStopSec"]), STOP_GRACE)

    def test_exec_start(self) -> None:
        """
        ExecStart runs twistd in the foreground without a pid file, and the
        whole command line is accepted by twistd and by buildcache's
        options.
        """
        argv = shlex.split(service_settings()["ExecStart"])
        self.assertEqual(os.path.basename(argv[0]), "twistd")
        self.assertTrue(os.path.isabs(argv[0]))
        self.assertIn("buildcache", argv)
        twistd_options = argv[1 : argv.index("buildcache")]
        self.assertIn("--nodaemon", twistd_options)
        self.assertIn("--pidfile=", twistd_options)

        # twistd's own options for this platform (the name twistd runs with,
        # rather than its private per-platform module).
        from twisted.scripts.twistd import ServerOptions

        cache_dir = os.path.abspath(self.mktemp())
        # The environment systemd gives the service, plus an upstream so
        # that no default is looked up.
        self.patch(os, "environ", {
            "CACHE_DIRECTORY": cache_dir,
            "PIP_INDEX_URL": "http://127.0.0.1:1/simple",
        })
        options = ServerOptions()
        options.parseOptions(argv[1:])
        self.assertEqual(options.subCommand, "buildcache")
        self.assertTrue(options["nodaemon"])
        self.assertEqual(options["pidfile"], "")
        self.assertEqual(options.subOptions.config.cache_dir, cache_dir)

    def test_memory_deny_write_execute(self) -> None:
        """
        The unit leaves MemoryDenyWriteExecute off because the server's
        TLS client cannot work with it (pyOpenSSL's cffi callbacks need
        writable and executable memory).  When that changes, this fails:
        then turn it on.
        """
        self.assertEqual(service_settings()["MemoryDenyWriteExecute"], "no")
        if not sys.platform.startswith("linux"):
            raise SkipTest("PR_SET_MDWE is a Linux prctl")
        result = subprocess.run(
            [sys.executable, "-c", _TLS_UNDER_MDWE],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode == 77:
            raise SkipTest("this kernel has no PR_SET_MDWE (Linux 6.3 or later)")
        self.assertEqual(
            result.returncode, 1,
            "TLS works under MemoryDenyWriteExecute now"
            f" ({result.stdout.strip()}): set MemoryDenyWriteExecute=yes in"
            f" the unit\n{result.stderr}",
        )
        self.assertIn("write+execute memory", result.stdout)


class AnalyzeVerifyTests(SynchronousTestCase):
    def verify(self, unit_text: str) -> tuple[int, list[str]]:
        """
        Run ``systemd-analyze verify`` on ``unit_text`` (with ExecStart
        pointing at this environment's twistd, as verify wants the binary
        to exist); its status and the lines it printed about the unit.
        """
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed (Debian package systemd)")
        twistd = Path(sys.executable).parent / "twistd"
        if not twistd.is_file():
            raise SkipTest(f"no twistd next to {sys.executable}")
        directory = Path(self.mktemp())
        directory.mkdir()
        unit = directory / "buildcache.service"
        unit.write_text(
            unit_text.replace("/opt/buildcache/.venv/bin/twistd", str(twistd))
        )
        result = subprocess.run(
            [analyze, "verify", str(unit)], capture_output=True, text=True,
            timeout=60, env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
        )
        output = (result.stdout + result.stderr).splitlines()
        return result.returncode, [line for line in output if unit.name in line]

    def test_verify(self) -> None:
        """
        ``systemd-analyze verify`` accepts the unit without a complaint.
        """
        status, complaints = self.verify(UNIT.read_text())
        self.assertEqual((status, complaints), (0, []))

    def test_verify_notices_mistakes(self) -> None:
        """
        The check above would see a misspelt setting.
        """
        text = UNIT.read_text().replace("ProtectSystem=", "ProtectSytem=")
        _, complaints = self.verify(text)
        self.assertEqual(len(complaints), 1)
        self.assertIn("ProtectSytem", complaints[0])
