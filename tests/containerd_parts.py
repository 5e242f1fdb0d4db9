"""
containerd for the registry tests: a private ``containerd`` (its own
config, root, state and sockets; CRI off) and ``ctr`` run against it, and
the ``hosts.toml`` files that make the box a mirror (``?ns=`` on every
request).  Every hosts.toml is parsed and must name loopback hosts only,
and every process runs with :data:`tests.registry_parts.LOOPBACK_ONLY`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from attrs import define

from tests.registry_parts import (
    CONTAINERD_BINARY,
    CTR_BINARY,
    LOOPBACK_ONLY,
    ChildProcess,
    missing_binaries,
    require_loopback,
    run_process,
    spawn_child,
)


def check_hosts_toml(text: str) -> None:
    """
    Refuse a hosts.toml that does not parse or that names a host not on
    loopback: containerd falls back to the registry's own host (Docker
    Hub's for ``docker.io``) when it cannot decode the file.
    """
    document = tomllib.loads(text)
    if "server" not in document:
        raise ValueError("a test's hosts.toml must name its server (on loopback)")
    for location in [document["server"], *document.get("host", {})]:
        require_loopback(location)


def write_hosts_toml(hosts_dir: Path, registry: str, server: str, mirror: str | None) -> Path:
    """
    containerd's ``hosts_dir/REGISTRY/hosts.toml``: pull ``registry`` from
    ``server`` (``http://127.0.0.1:PORT``) after trying ``mirror``
    (``http://127.0.0.1:PORT``), which gets ``?ns=REGISTRY`` on every request.
    """
    require_loopback(server)
    lines = [f'server = "{server}"', ""]
    if mirror is not None:
        require_loopback(mirror)
        lines += [f'[host."{mirror}"]', '  capabilities = ["pull", "resolve"]', ""]
    return write_checked_hosts_toml(hosts_dir, registry, "\n".join(lines))


def write_checked_hosts_toml(hosts_dir: Path, registry: str, text: str) -> Path:
    """``hosts_dir/REGISTRY/hosts.toml`` holding ``text``, checked first."""
    check_hosts_toml(text)
    directory = hosts_dir / registry
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "hosts.toml"
    path.write_text(text)
    return path


@define
class RunningContainerd:
    """A private ``containerd`` (root, state and sockets in ``directory``)."""

    directory: Path
    child: ChildProcess

    @property
    def address(self) -> str:
        return str(self.directory / "c.sock")

    @property
    def environment(self) -> dict[str, str]:
        """``ctr``'s environment: :data:`LOOPBACK_ONLY`."""
        return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **LOOPBACK_ONLY}

    async def ctr(self, *arguments: str) -> tuple[bytes, bytes, int]:
        """Run ``ctr`` on this containerd (loopback only): (stdout, stderr, exit code)."""
        return await run_process(self.ctr_argv(*arguments), env=self.environment)

    def ctr_argv(self, *arguments: str) -> list[str]:
        return [shutil.which(CTR_BINARY) or CTR_BINARY, "--address", self.address,
                "--namespace", "registry-parts", *arguments]

    def pull_arguments(self, reference: str, hosts_dir: Path) -> list[str]:
        """``ctr images pull`` of ``reference`` over plain HTTP through ``hosts_dir``."""
        return ["images", "pull", "--plain-http", "--hosts-dir", str(hosts_dir),
                "--snapshotter", "native", reference]


def containerd_unavailable() -> str | None:
    """Why containerd cannot run here, or None."""
    missing = missing_binaries(CONTAINERD_BINARY, CTR_BINARY)
    if missing:
        return f"not installed: {', '.join(missing)} (Debian package containerd)"
    if os.geteuid() != 0:
        return "containerd needs root"
    return None


async def start_containerd(testcase: Any) -> RunningContainerd:
    """
    ``containerd`` with a private config (version 2; root, state, gRPC and
    ttrpc sockets in a fresh directory under /tmp, short enough for a unix
    socket path; CRI off; no debug or metrics listener), ready when this
    returns; stopped by PID and its directory removed in cleanup.
    """
    directory = Path(tempfile.mkdtemp(prefix="bc-ctd-"))
    testcase.addCleanup(shutil.rmtree, directory, True)
    config = directory / "config.toml"
    config.write_text("\n".join([
        "version = 2",
        f'root = "{directory}/root"',
        f'state = "{directory}/state"',
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
        "[grpc]",
        f'  address = "{directory}/c.sock"',
        "[ttrpc]",
        f'  address = "{directory}/c.ttrpc.sock"',
        "[debug]",
        '  address = ""',
        "[metrics]",
        '  address = ""',
        "",
    ]))
    argv = [shutil.which(CONTAINERD_BINARY) or CONTAINERD_BINARY, "--config", str(config)]
    environment = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **LOOPBACK_ONLY}
    child = spawn_child(testcase, "containerd", argv, env=environment)
    await child.wait_for(b"containerd successfully booted")
    return RunningContainerd(directory, child)
