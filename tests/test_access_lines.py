"""
The access log's lines made for less (issue 16): the main process's own
lines and a hit worker's (sent as records, not log events) reach the log
as before, the text byte for byte and the JSON field for field; the
worker's lines stay bounded and counted when the main process does not
read; twistd's observers are buildcache's cheaper ones, which write what
twistd's and Twisted's wrote.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from typing import Any

import attrs
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import (
    Logger,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from buildcache.engine.events import Exchange
from buildcache.ops import logs
from buildcache.ops.activity import Activity
from buildcache.options import Options
from buildcache.workers.control import LOG_BATCH_MAX, LogForwarder, MainLink, WorkerLink
from tests.workers_parts import Joined

EXCHANGE = Exchange(
    front_end="proxy", client="10.1.2.3", method="GET",
    url="http://dl-cdn.example.org/alpine/v3.19/main/x86_64/zlib-1.3.1-r0.apk",
    status=200, cache="HIT", bytes_sent=20480, duration=0.000412, completed=True,
    name="zlib",
)
#: A few exchanges whose lines differ in every way a line can.
EXCHANGES = [
    EXCHANGE,
    attrs.evolve(EXCHANGE, completed=False, cache="MISS", duration=1.25),
    attrs.evolve(EXCHANGE, shared=True),
    attrs.evolve(EXCHANGE, url="http://alice:s3cret@127.0.0.1:9/x", status=400, cache=None),
    attrs.evolve(EXCHANGE, front_end="index", method="HEAD", url="/simple/zlib/"),
]
#: Before, the line of EXCHANGES[0] at this time (UTC) as twistd wrote it.
WHEN = 1765000000.25


def old_event(exchange: Exchange, source: object) -> dict[str, Any]:
    """
    The event the access line was before (``Activity._write_lines`` called
    ``Logger.info`` with these fields), for comparison.
    """
    from buildcache.credentials import redact

    events: list[dict[str, Any]] = []
    log = Logger(namespace="buildcache.ops.activity.Activity", source=source,
                 observer=events.append)
    url = redact(exchange.url)
    cache_status = exchange.cache or "none"
    incomplete = "" if exchange.completed else " (client or upstream ended early)"
    shared = exchange.shared and exchange.cache == "HIT"
    line = (
        f"{exchange.client} {exchange.method} {url} {exchange.status}"
        f" {exchange.bytes_sent} {cache_status}"
        f" {exchange.duration:.3f}s{incomplete}"
        + (" (from the shared tier)" if shared else "")
    )
    log.info(
        "{line}", line=line, log_system="access", client=exchange.client,
        method=exchange.method, url=url, status=exchange.status,
        bytes=exchange.bytes_sent, cache=cache_status,
        duration=exchange.duration, front_end=exchange.front_end,
        shared=shared,
    )
    return events[0]


def old_worker_event(exchange: Exchange, number: int) -> dict[str, Any]:
    """A worker's access line as the main process took it in before."""
    event = eventFromJSON(eventAsJSON(old_event(exchange, object())))
    event["worker"] = number
    event["log_system"] = f"worker-{number},{event['log_system']}"
    return event


def comparable(event: dict[str, Any]) -> dict[str, Any]:
    """``event`` with its time (which no test controls) at :data:`WHEN`."""
    return {**event, "log_time": WHEN}


def as_json(event: dict[str, Any]) -> str:
    return eventAsJSON(dict(event))


@attrs.define
class MainLog:
    """The main process's Activity, its lines caught."""

    testcase: SynchronousTestCase
    clock: Clock = attrs.Factory(Clock)
    events: list[dict[str, Any]] = attrs.Factory(list)
    activity: Activity = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.activity = Activity(self.clock)
        # Activity's logger, observed by this test alone (the global one
        # also feeds trial's, which adds its own keys to the events).
        self.testcase.patch(Activity, "log", Logger(observer=self.events.append))

    def finish(self, *exchanges: Exchange) -> None:
        for exchange in exchanges:
            self.activity.exchange_finished(exchange)
        self.clock.advance(0)
        self.clock.advance(0)


@attrs.define
class WorkerLog:
    """A worker's Activity sending its lines to a main side over a joined channel."""

    clock: Clock = attrs.Factory(Clock)
    events: list[dict[str, Any]] = attrs.Factory(list)
    activity: Activity = attrs.field(init=False)
    link: MainLink = attrs.field(init=False)
    main: WorkerLink = attrs.field(init=False)
    forwarder: LogForwarder = attrs.field(init=False)
    joined: Joined = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.activity = Activity(self.clock)
        self.link = MainLink(snapshot=dict, drain=lambda: None)
        self.main = WorkerLink(1, None, lambda accesses: None, publisher=self.events.append)
        self.joined = Joined(self.main.protocol, self.link.protocol)
        self.forwarder = LogForwarder(self.clock, self.link.send_log)
        # As the worker's start does.
        self.activity.access_sink = self.forwarder.access

    def finish(self, *exchanges: Exchange) -> None:
        for exchange in exchanges:
            self.activity.exchange_finished(exchange)
        for _ in range(3):
            self.clock.advance(0)
        self.joined.pump()


class MainLinesTests(SynchronousTestCase):
    def test_event_as_before(self) -> None:
        """The main process's access event has the fields (and order) it had."""
        main = MainLog(self)
        main.finish(*EXCHANGES)
        self.assertEqual(len(main.events), len(EXCHANGES))
        for event, exchange in zip(main.events, EXCHANGES):
            before = old_event(exchange, main.activity)
            self.assertEqual(list(event), list(before))
            # Each its own Logger (one per access then, one per turn now).
            logger = event.pop("log_logger")
            self.assertEqual(
                (logger.namespace, logger.source),
                (before.pop("log_logger").namespace, main.activity),
            )
            self.assertEqual(comparable(event), comparable(before))
            self.assertIs(event["log_source"], main.activity)
            self.assertEqual(as_json(comparable(event)), as_json(comparable(before)))

    def test_text_byte_identical(self) -> None:
        """
        The text line of a sample exchange, as twistd wrote it before and
        as buildcache's observer writes it.
        """
        main = MainLog(self)
        main.finish(*EXCHANGES)
        text = logs.ClassicText()
        lines = [text(comparable(event)) for event in main.events]
        for line, exchange in zip(lines, EXCHANGES):
            before = formatEventAsClassicLogText(
                comparable(old_event(exchange, None)),
                formatTime=lambda when: formatTime(when),
            )
            self.assertEqual(line, before)
        stamp = formatTime(WHEN)
        self.assertEqual(lines[0], (
            f"{stamp} [access] 10.1.2.3 GET"
            " http://dl-cdn.example.org/alpine/v3.19/main/x86_64/zlib-1.3.1-r0.apk"
            " 200 20480 HIT 0.000s\n"
        ))
        self.assertEqual(lines[1], (
            f"{stamp} [access] 10.1.2.3 GET"
            " http://dl-cdn.example.org/alpine/v3.19/main/x86_64/zlib-1.3.1-r0.apk"
            " 200 20480 MISS 1.250s (client or upstream ended early)\n"
        ))
        self.assertTrue(lines[2].endswith(" HIT 0.000s (from the shared tier)\n"))
        self.assertEqual(
            lines[3], f"{stamp} [access] 10.1.2.3 GET http://***@127.0.0.1:9/x 400 20480 none 0.000s\n"
        )
        self.assertNotIn("s3cret", "".join(lines))


class WorkerLinesTests(SynchronousTestCase):
    def test_worker_line_as_before(self) -> None:
        """
        A worker's access line reaches the main process's log as the
        event it was before (through eventAsJSON): the same fields, the
        same text, the same JSON, ``[worker-1,access]``.
        """
        worker = WorkerLog()
        worker.finish(*EXCHANGES)
        self.assertEqual(worker.main.log_events, len(EXCHANGES))
        self.assertEqual(worker.main.log_dropped, 0)
        text = logs.ClassicText()
        for event, exchange in zip(worker.events, EXCHANGES):
            before = old_worker_event(exchange, 1)
            self.assertEqual(list(event), list(before))
            self.assertEqual(comparable(event), comparable(before))
            self.assertEqual(as_json(comparable(event)), as_json(comparable(before)))
            self.assertEqual(
                text(comparable(event)), formatEventAsClassicLogText(comparable(before))
            )
            self.assertIn(" [worker-1,access] 10.1.2.3 ", text(event) or "")
        self.assertEqual(worker.events[0]["worker"], 1)
        self.assertEqual(worker.events[0]["log_level"], LogLevel.info)

    def test_lines_are_records_not_events(self) -> None:
        """
        What crosses the channel for a line is its record: no logger, no
        JSON event (that costs the worker and the main process far more),
        and no credential.
        """
        worker = WorkerLog()
        sent: list[tuple[list[Any], int]] = []
        worker.forwarder.send = lambda batch, dropped: bool(sent.append((batch, dropped))) or True
        worker.activity.exchange_finished(EXCHANGES[3])
        for _ in range(3):
            worker.clock.advance(0)
        ((batch, dropped),) = sent
        self.assertEqual(dropped, 0)
        (record,) = batch
        self.assertIsInstance(record, list)
        self.assertEqual(record[1:], [
            "10.1.2.3", "GET", "http://***@127.0.0.1:9/x", 400, 20480, "none",
            0.000412, "proxy", False, True,
        ])
        self.assertEqual(json.loads(json.dumps(record)), record)

    def test_other_events_and_lines_in_order(self) -> None:
        """The worker's other events go in the same batches, in order."""
        worker = WorkerLog()
        log = Logger(observer=worker.forwarder)
        log.warn("before {n}", n=1)
        worker.activity.exchange_finished(EXCHANGE)
        worker.clock.advance(0)
        worker.clock.advance(0)
        log.info("after")
        worker.clock.advance(0)
        worker.joined.pump()
        self.assertEqual(
            [e["log_system"] for e in worker.events],
            ["worker-1,-", "worker-1,access", "worker-1,-"],
        )
        self.assertEqual(worker.events[0]["log_level"], LogLevel.warn)

    def test_dropped_and_counted_while_main_does_not_read(self) -> None:
        """
        While the main process does not read (the channel backed up), the
        worker's lines are dropped, not held, and counted in the next
        batch; the main process counts them.
        """
        worker = WorkerLog()
        assert worker.link.protocol.transport is not None
        producer = worker.joined.b_transport.producer
        assert producer is not None
        producer.pauseProducing()
        worker.finish(*EXCHANGES)
        self.assertEqual(worker.events, [])
        self.assertEqual(worker.joined.b_transport.value(), b"")
        producer.resumeProducing()
        worker.finish(EXCHANGE)
        self.assertEqual(worker.main.log_dropped, len(EXCHANGES))
        self.assertEqual(worker.main.log_events, 1)
        self.assertEqual(len(worker.events), 1)

    def test_batch_bounded(self) -> None:
        """Past LOG_BATCH_MAX lines in one turn, the rest are dropped and counted."""
        clock = Clock()
        sent: list[tuple[int, int]] = []
        forwarder = LogForwarder(
            clock, lambda events, dropped: bool(sent.append((len(events), dropped))) or True
        )
        Logger(observer=forwarder).info("one event")
        forwarder.access([[WHEN, "c", "GET", "/", 200, 0, "HIT", 0.0, "proxy", False, True]]
                         * (LOG_BATCH_MAX + 2))
        forwarder.access([[WHEN, "c", "GET", "/", 200, 0, "HIT", 0.0, "proxy", False, True]])
        clock.advance(0)
        self.assertEqual(sent, [(LOG_BATCH_MAX, 4)])


class ObserverTests(SynchronousTestCase):
    def test_time_stamp_as_twisted_formats_it(self) -> None:
        """The stamp made once per second is formatTime's, across seconds and zones."""
        previous = os.environ.get("TZ")

        def restore() -> None:
            if previous is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = previous
            time.tzset()

        self.addCleanup(restore)
        # A daylight-saving change (Europe/Paris, 2026-03-29 01:00 UTC).
        change = 1774746000.0
        for zone in ("UTC", "Europe/Paris", "America/St_Johns"):
            os.environ["TZ"] = zone
            time.tzset()
            text = logs.ClassicText()
            for when in (change - 1.5, change - 0.5, change - 0.01, change, change + 0.99,
                         change + 1, 0.5, 1.0, WHEN, WHEN + 0.7, WHEN - 0.3):
                self.assertEqual(text.time(when), formatTime(when), (zone, when))
        self.assertEqual(logs.ClassicText().time(None), "-")

    def test_other_events_as_twistd_formats_them(self) -> None:
        """Every other event is formatEventAsClassicLogText's."""
        text = logs.ClassicText()
        try:
            1 / 0
        except ZeroDivisionError:
            failure = Failure()
        for event in [
            {"log_format": "hello {who}", "who": "x", "log_time": WHEN,
             "log_namespace": "n", "log_level": LogLevel.warn},
            {"log_format": "{line}", "line": "a\nb", "log_system": "access", "log_time": WHEN},
            {"log_format": "{line}", "line": "", "log_system": "access", "log_time": WHEN},
            {"log_format": "{line}", "line": 5, "log_system": "access", "log_time": WHEN},
            {"log_format": "{line}", "line": "x", "log_time": WHEN},
            {"log_format": "{line}", "line": "x", "log_system": "access"},
            {"log_format": "{line} {n}", "line": "x", "n": 1, "log_system": "s"},
            {"log_format": "{line}", "line": "x", "log_system": "s", "log_failure": failure},
            {"log_format": "bad {", "log_time": WHEN},
            {"message": ("legacy",), "log_time": WHEN},
        ]:
            self.assertEqual(text(event), formatEventAsClassicLogText(event), event)

    def test_json_as_twisted_writes_it(self) -> None:
        """Every event's JSON line is what jsonFileLogObserver wrote."""
        main, worker = MainLog(self), WorkerLog()
        main.finish(*EXCHANGES)
        worker.finish(*EXCHANGES)
        lines = logs.JSONLines()
        others: list[dict[str, Any]] = [
            {"log_format": "{line}", "line": "x", "log_level": LogLevel.info, "o": object()},
            {"log_format": "{line}", "line": "x", "log_level": LogLevel.warn},
            {"log_format": "{line}", "line": "x", "log_level": LogLevel.info,
             "log_flattened": {"line!s:": "y", "line!:": "y"}},
            {"log_format": "hi {n}", "n": 1, "log_level": LogLevel.info, "b": b"\xff"},
        ]
        # A logger's source may be anything, JSON's own values included.
        for source in (None, "s", 3, b"\xff", LogLevel.warn, Failure(ValueError("x")),
                       {"a": 1}, [1], object()):
            others.append({**main.events[0], "log_source": source})
        for event in main.events + worker.events + others:
            self.assertEqual(lines(dict(event)), eventAsJSON(dict(event)) + "\n")

    def test_text_observer_writes_the_logfile(self) -> None:
        """``--log-format text``'s observer appends twistd's lines to the --logfile."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("earlier\n")
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(logs.use_logfile, None)
        logs.use_logfile(path)
        observer = logs.text_observer()
        main = MainLog(self)
        main.finish(EXCHANGE)
        observer(main.events[0])
        observer({"log_format": "Server Shut Down.", "log_time": WHEN,
                  "log_namespace": "twisted", "log_level": LogLevel.info})
        with open(path) as f:
            written = f.read()
        self.assertEqual(written, "earlier\n" + formatEventAsClassicLogText(main.events[0])
                         + f"{formatTime(WHEN)} [twisted#info] Server Shut Down.\n")
        # As twistd did: SIGUSR1 rotates the file.
        self.assertNotEqual(signal.getsignal(signal.SIGUSR1), signal.SIG_DFL)

    def test_text_observer_to_standard_output(self) -> None:
        self.addCleanup(logs.use_logfile, None)
        for logfile in (None, "-"):
            logs.use_logfile(logfile)
            stdout = io.StringIO()
            self.patch(logs.sys, "stdout", stdout)
            logs.text_observer()({"log_format": "{line}", "line": "x", "log_system": "access"})
            self.assertEqual(stdout.getvalue(), "- [access] x\n")


class OptionsTests(SynchronousTestCase):
    def parse(self, **parent_options: Any) -> usage.Options:
        parent = usage.Options()
        parent.update(parent_options)
        options = Options({})
        options.parent = parent
        self.addCleanup(logs.use_logfile, None)
        options.parseOptions(
            ["--cache-dir", self.mktemp(), "--pypi-upstream", "http://127.0.0.1:9/simple"]
        )
        return parent

    def test_text_points_twistd_at_buildcache_observer(self) -> None:
        for given, nodaemon, written in (
            ("b.log", False, "b.log"), (None, False, "twistd.log"), (None, True, None),
            ("-", True, "-"),
        ):
            parent = self.parse(logfile=given, nodaemon=nodaemon, logger=None, syslog=False)
            self.assertEqual(parent["logger"], logs.TEXT_OBSERVER)
            self.assertEqual(logs._logfile, written)

    def test_left_to_twistd(self) -> None:
        """Syslog, one's own --logger, a daemon's "-" (which twistd refuses)."""
        for given in (
            {"syslog": True, "logger": None, "logfile": None},
            {"syslog": False, "logger": "my.observer", "logfile": None},
            {"syslog": False, "logger": None, "logfile": "-", "nodaemon": False},
        ):
            parent = self.parse(**given)
            self.assertEqual(parent["logger"], given["logger"])


class TranscriptTests(SynchronousTestCase):
    def test_a_turn_in_both_processes(self) -> None:
        """
        One turn's lines, written by the main process for itself and for a
        worker through buildcache's text observer: each line as before.
        """
        out = StringTransport()

        class File:
            def write(self, data: str) -> None:
                out.write(data.encode())

            def flush(self) -> None:
                pass

        from twisted.logger import FileLogObserver

        observer = FileLogObserver(File(), logs.ClassicText())  # type: ignore[arg-type]
        main, worker = MainLog(self), WorkerLog()
        main.finish(EXCHANGE)
        worker.finish(EXCHANGE)
        for event in main.events + worker.events:
            observer(comparable(event))
        stamp = formatTime(WHEN).encode()
        path = b"http://dl-cdn.example.org/alpine/v3.19/main/x86_64/zlib-1.3.1-r0.apk"
        self.assertEqual(out.value(), (
            stamp + b" [access] 10.1.2.3 GET " + path + b" 200 20480 HIT 0.000s\n"
            + stamp + b" [worker-1,access] 10.1.2.3 GET " + path + b" 200 20480 HIT 0.000s\n"
        ))
