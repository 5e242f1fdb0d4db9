"""
Logs: one structured access event per request, credentials never logged,
and ``--log-format json`` handing twistd a JSON observer.
"""

from __future__ import annotations

import json

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.credentials import redact
from buildcache.ops import logs
from buildcache.options import Options
from buildcache.turns import after_io
from tests.support import Client, FakeUpstream, GatedBody, reactor, start_server
from tests.test_proxy import raw_connection, raw_request, until


class AccessLogTests(TestCase):
    def access_events(self) -> EventLoggingObserver:
        return EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    async def test_one_line_per_request(self) -> None:
        events = self.access_events()
        upstream = FakeUpstream()
        upstream.bodies["/pool/a.deb"] = GatedBody(b"x" * 1234)
        running = start_server(self, upstream=upstream)
        client = Client()
        url = f"http://127.0.0.1:{running.proxy_port}/up/pool/a.deb"
        await client.get(url)
        await client.get(url)
        # Access lines are written after the response has gone out.
        await after_io(reactor)
        access = [e for e in events if e.get("log_system") == "access"]
        self.assertEqual(
            [(e["method"], e["url"], e["status"], e["bytes"], e["cache"], e["front_end"])
             for e in access],
            [("GET", "/up/pool/a.deb", 200, 1234, "MISS", "mirror"),
             ("GET", "/up/pool/a.deb", 200, 1234, "HIT", "mirror")],
        )
        for event in access:
            self.assertEqual(event["client"], "127.0.0.1")
            self.assertGreaterEqual(event["duration"], 0)

    async def test_credentials_redacted(self) -> None:
        """
        A URL with user information is refused, and neither the access line
        nor any other event carries the password.
        """
        events = self.access_events()
        running = start_server(self)
        connection = await raw_connection(self, running.proxy_port)
        connection.send(raw_request("GET", "http://alice:s3cret@127.0.0.1:9/x", "127.0.0.1:9"))
        await until(lambda: any(e.get("log_system") == "access" for e in events))
        access = [e for e in events if e.get("log_system") == "access"]
        self.assertEqual(access[0]["status"], 400)
        self.assertEqual(access[0]["url"], "http://***@127.0.0.1:9/x")
        for event in events:
            self.assertNotIn("s3cret", formatEvent(event))
            self.assertNotIn("s3cret", repr(event))


class RedactTests(SynchronousTestCase):
    def test_redact(self) -> None:
        self.assertEqual(redact("http://u:p@host:81/a?b"), "http://***@host:81/a?b")
        self.assertEqual(redact("https://token@[::1]/x"), "https://***@[::1]/x")
        self.assertEqual(redact("/alpine/v3.20/x@y"), "/alpine/v3.20/x@y")
        self.assertEqual(redact("http://host/x"), "http://host/x")


class JSONFormatTests(SynchronousTestCase):
    def test_option_sets_twistd_logger(self) -> None:
        parent = usage.Options()
        parent["logfile"] = self.mktemp()
        options = Options({})
        options.parent = parent
        options.parseOptions(
            ["--cache-dir", self.mktemp(), "--log-format", "json",
             "--pypi-upstream", "http://127.0.0.1:9/simple"]
        )
        self.assertEqual(parent["logger"], logs.JSON_OBSERVER)
        observer = logs.json_observer()
        observer({"log_format": "hello {name}", "name": "world", "log_time": 1.0})
        observer._outFile.close()  # type: ignore[attr-defined]
        with open(parent["logfile"]) as f:
            (line,) = f.read().splitlines()
        self.assertEqual(json.loads(line)["name"], "world")

    def test_daemon_without_logfile_writes_twistd_log(self) -> None:
        """
        Daemonized without --logfile, twistd's own output is twistd.log
        (standard output is gone): the JSON lines go there too.
        """
        for nodaemon, expected in ((False, "twistd.log"), (True, None)):
            parent = usage.Options()
            parent["logfile"] = None
            parent["nodaemon"] = nodaemon
            options = Options({})
            options.parent = parent
            options.parseOptions(
                ["--cache-dir", self.mktemp(), "--log-format", "json",
                 "--pypi-upstream", "http://127.0.0.1:9/simple"]
            )
            self.addCleanup(logs.use_logfile, None)
            self.assertEqual(logs._logfile, expected)

    def test_text_to_syslog_leaves_twistd_alone(self) -> None:
        # Text otherwise goes through buildcache's observer: see
        # tests/test_access_lines.py.
        parent = usage.Options()
        parent["syslog"] = True
        options = Options({})
        options.parent = parent
        options.parseOptions(
            ["--cache-dir", self.mktemp(), "--pypi-upstream", "http://127.0.0.1:9/simple"]
        )
        self.assertNotIn("logger", parent)
