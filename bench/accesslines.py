#!/usr/bin/env python3
"""
The CPU one access-log line costs (issue 16): a micro-bench of the exact
code path, in one process, measured with ``time.process_time()``.

- ``main``: N ``Activity.exchange_finished`` + the turn's flush, the events
  going to the text log observer twistd would install (a ``LogFile``), or
  to the JSON observer (``--json-log``).
- ``worker``: the same in a hit worker: the lines through the worker's
  :class:`~buildcache.workers.control.LogForwarder` onto its control
  channel (a StringTransport); and, apart, the main process's side: the
  bytes read by its :class:`~buildcache.workers.control.WorkerLink` and
  written by the text observer.

The observers are those buildcache installs (``--log-format text`` or,
with ``--json-log``, ``json``), or in a tree from before it had its own,
twistd's and Twisted's: so the same file measures both.

    .venv/bin/python bench/accesslines.py [--lines 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.logger import (  # noqa: E402
    globalLogBeginner,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile  # noqa: E402

from buildcache.engine.events import Exchange  # noqa: E402
from buildcache.ops import logs  # noqa: E402
from buildcache.ops.activity import Activity  # noqa: E402
from buildcache.workers import control  # noqa: E402

EXCHANGE = Exchange(
    front_end="proxy", client="10.1.2.3", method="GET",
    url="http://dl-cdn.example.org/alpine/v3.19/main/x86_64/zlib-1.3.1-r0.apk",
    status=200, cache="HIT", bytes_sent=20480, duration=0.000412, completed=True,
    name="zlib",
)


class Forwarding:
    """Where the global log publisher sends events; swapped per case."""

    def __init__(self) -> None:
        self.observer: Any = lambda event: None

    def __call__(self, event: Any) -> None:
        self.observer(event)


def observer_for(directory: str, json_log: bool) -> Any:
    if json_log:
        path = os.path.join(directory, "log.json")
        if hasattr(logs, "JSONLines"):
            logs.use_logfile(path)
            return logs.json_observer()
        return jsonFileLogObserver(open(path, "a", encoding="utf-8"), recordSeparator="")
    path = os.path.join(directory, "log.txt")
    if hasattr(logs, "text_observer"):
        # What buildcache points twistd's --logger at.
        logs.use_logfile(path)
        return logs.text_observer()
    # Before it did: twistd's own.
    return textFileLogObserver(LogFile.fromFullPath(path))


def turns(activity: Activity, clock: Clock, lines: int, per_turn: int) -> None:
    for _ in range(lines // per_turn):
        for _ in range(per_turn):
            activity.exchange_finished(EXCHANGE)
        clock.advance(0)
        clock.advance(0)


def main_case(forwarding: Forwarding, observer: Any, lines: int, per_turn: int) -> float:
    clock = Clock()
    activity = Activity(clock)
    forwarding.observer = observer
    start = time.process_time()
    turns(activity, clock, lines, per_turn)
    return (time.process_time() - start) / lines


def worker_case(
    forwarding: Forwarding, observer: Any, lines: int, per_turn: int
) -> tuple[float, float]:
    clock = Clock()
    activity = Activity(clock)
    transport = StringTransport()
    link = control.MainLink(snapshot=dict, drain=lambda: None)
    link.protocol.makeConnection(transport)
    forwarder = control.LogForwarder(clock, link.send_log)
    if hasattr(activity, "access_sink"):
        activity.access_sink = forwarder.access  # type: ignore[attr-defined]
    forwarding.observer = forwarder
    start = time.process_time()
    turns(activity, clock, lines, per_turn)
    worker = (time.process_time() - start) / lines
    forwarding.observer = lambda event: None
    sent = transport.value()
    main = control.WorkerLink(1, None, lambda accesses: None, publisher=observer)
    main.protocol.makeConnection(StringTransport())
    start = time.process_time()
    main.protocol.dataReceived(sent)
    taken = (time.process_time() - start) / lines
    assert main.log_events == lines, (main.log_events, lines)
    return worker, taken


def run() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--per-turn", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json-log", action="store_true")
    arguments = parser.parse_args()
    forwarding = Forwarding()
    globalLogBeginner.beginLoggingTo([forwarding], redirectStandardIO=False, discardBuffer=True)
    results: dict[str, list[float]] = {"main": [], "worker": [], "main_for_worker": []}
    with tempfile.TemporaryDirectory() as directory:
        observer = observer_for(directory, arguments.json_log)
        for _ in range(arguments.repeats):
            results["main"].append(main_case(forwarding, observer, arguments.lines, arguments.per_turn))
            worker, taken = worker_case(forwarding, observer, arguments.lines, arguments.per_turn)
            results["worker"].append(worker)
            results["main_for_worker"].append(taken)
    for name, values in results.items():
        print(f"{name:16} {statistics.median(values) * 1e6:7.2f} us/line"
              f"  (min {min(values) * 1e6:.2f})")


if __name__ == "__main__":
    run()
