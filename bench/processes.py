"""
What every benchmark does with the processes it starts: free loopback
ports, waiting for a server to listen, stopping it by PID, and reading its
memory and CPU from /proc.  Imported by the scripts beside it.
"""

from __future__ import annotations

import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 60,
    workers: int = 1,
) -> None:
    """
    Return once something listens on 127.0.0.1:``port`` and, for a
    buildcache of ``workers`` processes, once its log shows every hit
    worker serving (a bench measures the server running, not starting:
    a worker's start-up takes a core for a while); fail with the tail of
    ``log`` if ``process`` exits or ``timeout`` passes first, ``process``
    stopped (also on Ctrl-C meanwhile).
    """
    try:
        _wait_for_port(port, process, log, timeout, workers)
    except BaseException:
        stop(process)
        raise


def _wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float, workers: int,
) -> None:
    deadline = time.monotonic() + timeout

    def failed() -> bool:
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise RuntimeError(f"{log.parent.name}: server did not start on {port}:\n{tail}")
        time.sleep(0.05)
        return True

    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            failed()
    while workers > 1:
        text = log.read_text(errors="replace") if log.exists() else ""
        if len(serving_workers(text)) >= workers - 1:
            return
        failed()


def serving_workers(log_text: str) -> set[str]:
    """
    The hit workers a buildcache log shows serving: its text lines
    ("Worker 1 serving (pid ...)") or its JSON ones (``--log-format json``:
    the ``worker_serving`` event).
    """
    found = set(re.findall(r"Worker (\d+) serving", log_text))
    for line in log_text.splitlines():
        if '"event": "worker_serving"' in line:
            number = re.search(r'"worker": (\d+)', line)
            if number is not None:
                found.add(number.group(1))
    return found


def expected_workers(command: Sequence[str]) -> int:
    """
    The processes a ``twistd buildcache`` command line runs: its
    ``--workers``, else the server's default.
    """
    for at, word in enumerate(command):
        if word == "--workers" and at + 1 < len(command):
            return int(command[at + 1])
        if word.startswith("--workers="):
            return int(word.split("=", 1)[1])
    from buildcache.config import default_workers

    return default_workers()


def stop(process: subprocess.Popen[bytes], grace: float = 30) -> None:
    """Stop one process the bench started, by its PID."""
    if process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(15)


def status_kb(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in kB (``VmHWM``, ``VmRSS``), 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name == field:
                    return int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def buildcache_command(
    log: Path | str, proxy_port: int, index_port: int, cache_dir: Path | str,
    *options: str, registry_port: int | None = None,
) -> list[str]:
    """
    The ``twistd buildcache`` command line of this Python's virtualenv,
    listening on 127.0.0.1 only (the registry port on ``registry_port``,
    else a free one: its default, 5000 on every interface, would collide),
    with ``options`` appended.
    """
    return [
        os.path.join(os.path.dirname(sys.executable), "twistd"),
        "--nodaemon", "--pidfile=", "--logfile", str(log), "buildcache",
        "--port", f"tcp:{proxy_port}:interface=127.0.0.1",
        "--pypi-port", f"tcp:{index_port}:interface=127.0.0.1",
        "--registry-port",
        f"tcp:{registry_port or free_port()}:interface=127.0.0.1",
        "--cache-dir", str(cache_dir),
        *options,
    ]


def machine_and_versions(tools: dict[str, list[str]]) -> dict[str, str]:
    """
    What a bench's JSON records of where it ran: the first line each of
    ``tools`` (name -> command) prints ("missing" when it cannot run),
    Python's version, the CPUs and the load when the run started.
    """

    def first_line(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return "missing"
        return ((done.stdout or done.stderr).strip().splitlines() or ["?"])[0]

    facts = {name: first_line(command) for name, command in tools.items()}
    with open("/proc/loadavg") as loadavg:
        facts.update({
            "python": platform.python_version(),
            "cpus": str(os.cpu_count()),
            "loadavg_at_start": loadavg.read().strip(),
        })
    return facts
