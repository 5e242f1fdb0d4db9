"""
The shared tier's configuration and wiring: ``--shared-store``,
``--shared-secret-file``, ``--shared-max-size`` and ``--shared-wait``; the
store's endpoint allowed like a mirror; the tier built over the server's
upstream client and store, handed to the fetcher, started and stopped with
the service; and what the logs and the status page say of it (the
endpoint, never a credential nor the secret).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase

from buildcache.access import AccessPolicy
from buildcache.config import DEFAULT_SHARED_WAIT, Config, read_shared_secret
from buildcache.ops.page import render_page
from buildcache.options import Options
from buildcache.service import (
    BuildcacheService,
    Server,
    configured_upstreams,
    make_service,
)
from buildcache.shared.location import parse_shared_store
from buildcache.store import Store, StoreError
from tests.support import reactor, start_server
from tests.test_status import parse_page

SECRET = "correct-horse-battery-staple-0123456789"
#: Dummy keys: what a node reads from the standard AWS environment.
AWS_KEY_ID = "AKIDSHAREDCONFIGTEST"
AWS_SECRET = "dummy-aws-secret-never-shown-0123"
#: A private address: allowed because it is configured, as a mirror is.
ENDPOINT = "http://10.20.30.40:8333"
STORE = f"s3://builds/office/?endpoint={ENDPOINT}"
PYPI = {"PIP_INDEX_URL": "http://127.0.0.1:1/simple"}


def dummy_aws_environment(testcase: SynchronousTestCase) -> None:
    """
    The standard AWS variables set to dummy keys (and no AWS file read)
    for the test, as a node's environment would give them.
    """
    values = {
        "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    testcase.addCleanup(restore)


def secret_file(testcase: SynchronousTestCase, content: bytes, mode: int = 0o600) -> str:
    path = os.path.abspath(testcase.mktemp())
    with open(path, "wb") as f:
        f.write(content)
    os.chmod(path, mode)
    return path


def parse(testcase: SynchronousTestCase, *arguments: str) -> Config:
    options = Options(environ=PYPI)
    options.parseOptions(["--cache-dir", testcase.mktemp(), *arguments])
    config: Config = options.config
    return config


class OptionsTests(SynchronousTestCase):
    def test_all_options(self) -> None:
        """
        The four options make the configuration's shared fields; the
        secret is read from its file, stripped, and kept out of ``repr``.
        """
        path = secret_file(self, f"  {SECRET}\n".encode())
        config = parse(
            self, "--shared-store", STORE, "--shared-secret-file", path,
            "--shared-max-size", "200G", "--shared-wait", "30s",
        )
        self.assertEqual(config.shared_store, parse_shared_store(STORE))
        self.assertEqual(config.shared_secret, SECRET.encode())
        self.assertEqual(config.shared_secret_file, path)
        self.assertEqual(config.shared_max_size, 200 * 1024**3)
        self.assertEqual(config.shared_wait, 30.0)
        self.assertNotIn(SECRET, repr(config))

    def test_defaults(self) -> None:
        """
        Without the options there is no tier; with only --shared-store,
        records are unsigned, the bucket unbounded, and a download waits
        10 s at most (under pip's 15 s read timeout) for another node's.
        """
        config = parse(self)
        self.assertEqual(
            (config.shared_store, config.shared_secret, config.shared_max_size),
            (None, None, None),
        )
        config = parse(self, "--shared-store", STORE)
        self.assertEqual(config.shared_store, parse_shared_store(STORE))
        self.assertEqual((config.shared_secret, config.shared_max_size), (None, None))
        self.assertEqual(config.shared_wait, DEFAULT_SHARED_WAIT)
        self.assertEqual(DEFAULT_SHARED_WAIT, 10.0)

    def test_help(self) -> None:
        """
        ``--help`` lists the options with their defaults.
        """
        usage = " ".join(Options(environ=PYPI).getUsage(width=400).split())
        for text in (
            "--shared-store=", "s3://BUCKET/PREFIX?endpoint=URL",
            "--shared-secret-file=", "--shared-max-size=", "--shared-wait=",
            "[default: 10s]",
        ):
            self.assertIn(text, usage)

    def test_refusals_name_the_option(self) -> None:
        """
        A bad value stops the command line with a message naming its
        option, and never quoting a credential.
        """
        short = secret_file(self, b"tooshort")
        for arguments, option in (
            (["--shared-store", "http://10.0.0.1:8333/bucket"], "--shared-store"),
            (
                ["--shared-store", "s3://b/p?endpoint=http://key:hunter2@10.0.0.1:8333"],
                "--shared-store",
            ),
            (["--shared-store", STORE, "--shared-secret-file", short],
             "--shared-secret-file"),
            (["--shared-store", STORE, "--shared-secret-file", self.mktemp()],
             "--shared-secret-file"),
            (["--shared-store", STORE, "--shared-max-size", "lots"], "--shared-max-size"),
            (["--shared-store", STORE, "--shared-wait", "soon"], "--shared-wait"),
        ):
            with self.assertRaises(UsageError) as raised:
                parse(self, *arguments)
            message = str(raised.exception)
            self.assertTrue(message.startswith(option), message)
            for secret in ("hunter2", "tooshort"):
                self.assertNotIn(secret, message)

    def test_tier_options_need_a_store(self) -> None:
        """
        A secret or a size limit without --shared-store is a mistake, not
        silently ignored.
        """
        path = secret_file(self, SECRET.encode())
        for arguments in (
            ["--shared-secret-file", path], ["--shared-max-size", "10G"],
        ):
            with self.assertRaises(UsageError) as raised:
                parse(self, *arguments)
            self.assertIn("without --shared-store", str(raised.exception))


class SecretFileTests(SynchronousTestCase):
    def test_bytes_stripped(self) -> None:
        """
        The secret is the file's bytes, surrounding white space (a final
        newline) taken off; any bytes, not only text.
        """
        raw = b"\x00\xff" + os.urandom(30)
        path = secret_file(self, b"\n" + raw + b"\r\n")
        self.assertEqual(read_shared_secret(path), (path, raw.strip()))

    def test_refused_without_quoting(self) -> None:
        """
        A file too short, too large or unreadable is refused with its path,
        never its content.
        """
        for content in (b"short-secret\n", b"x" * (64 * 1024 + 1), b"   \n"):
            path = secret_file(self, content)
            with self.assertRaises(ValueError) as raised:
                read_shared_secret(path)
            self.assertIn(path, str(raised.exception))
            self.assertNotIn("short-secret", str(raised.exception))
            self.assertLess(len(str(raised.exception)), 300)
        missing = os.path.abspath(self.mktemp())
        with self.assertRaises(ValueError) as raised:
            read_shared_secret(missing)
        self.assertIn("cannot read", str(raised.exception))


class UpstreamTests(SynchronousTestCase):
    def test_endpoint_allowed_like_a_mirror(self) -> None:
        """
        The store's endpoint is a configured upstream: allowed on its
        private address, even when --allow-upstream lists other hosts
        only; without the tier it is not.
        """
        config = Config(
            cache_dir=self.mktemp(), shared_store=parse_shared_store(STORE),
            allow_upstream=("*.example.org",),
        )
        self.assertIn(ENDPOINT, configured_upstreams(config))

        def allowed(config: Config) -> bool:
            policy = AccessPolicy.from_config(
                config.allow_from, config.allow_upstream, configured_upstreams(config)
            )
            return bool(policy.host_allowed("10.20.30.40", 8333)) and bool(
                policy.address_allowed("10.20.30.40", 8333, "10.20.30.40")
            )

        self.assertTrue(allowed(config))
        self.assertFalse(allowed(attrs.evolve(config, shared_store=None)))


class WiringTests(TestCase):
    def setUp(self) -> None:
        dummy_aws_environment(self)

    def test_fetcher_asks_the_tier(self) -> None:
        """
        A server with a shared store builds one tier and hands it to its
        fetcher; its status page has the tier's section and names the
        store by its endpoint, never by a key or the secret.
        """
        running = start_server(self, {
            "shared_store": parse_shared_store(STORE),
            "shared_secret": SECRET.encode(),
        })
        server: Server = running.server
        self.assertIsNotNone(server.shared)
        self.assertIs(server.fetcher.shared, server.shared)
        snapshot = server.status.snapshot()
        shared = snapshot["shared"]
        assert shared is not None
        self.assertEqual(
            (shared["endpoint"], shared["bucket"], shared["prefix"], shared["signed"]),
            (ENDPOINT, "builds", "office/", True),
        )
        for document in (render_page(snapshot).decode(), json.dumps(snapshot)):
            self.assertIn(ENDPOINT, document)
            for secret in (SECRET, AWS_SECRET, AWS_KEY_ID):
                self.assertNotIn(secret, document)

    def test_size_limit_reaches_the_tier(self) -> None:
        """
        --shared-max-size bounds the tier (its evictor), as the status
        page shows.
        """
        running = start_server(self, {
            "shared_store": parse_shared_store(STORE), "shared_max_size": 7 * 1024**3,
        })
        snapshot = running.server.status.snapshot()
        shared = snapshot["shared"]
        assert shared is not None
        self.assertEqual((shared["max_size"], shared["signed"]), (7 * 1024**3, False))
        self.assertIn(
            "Evictions 0 (0 B) under 7 GiB",
            parse_page(self, render_page(snapshot)).text("shared-tier"),
        )

    def test_no_store_no_tier(self) -> None:
        running = start_server(self)
        self.assertIsNone(running.server.shared)
        self.assertIsNone(running.server.fetcher.shared)
        self.assertIsNone(running.server.status.snapshot()["shared"])

    def test_start_up_logs_name_the_store_only(self) -> None:
        """
        make_service logs which store the tier uses, with its endpoint and
        what it shares; a secret file others can read is warned about;
        no line carries a key or the secret.
        """
        path = secret_file(self, SECRET.encode(), mode=0o644)
        config = Config(
            cache_dir=self.mktemp(), shared_store=parse_shared_store(STORE),
            shared_secret=SECRET.encode(), shared_secret_file=path,
        )
        with capturedLogs() as events:
            service = make_service(config, reactor)
        assert isinstance(service, BuildcacheService)
        service.server.store.close()
        (configured,) = [e for e in events if e.get("event") == "shared_tier_configured"]
        self.assertEqual(configured["store"], f"s3://builds/office/?endpoint={ENDPOINT}")
        self.assertIn("signed", configured["what"])
        (warning,) = [
            e for e in events if e.get("event") == "shared_secret_readable_by_others"
        ]
        self.assertEqual(warning["path"], path)
        logged = repr(events)
        for secret in (SECRET, AWS_SECRET, AWS_KEY_ID):
            self.assertNotIn(secret, logged)

    def test_unsigned_says_what_is_shared(self) -> None:
        config = Config(cache_dir=self.mktemp(), shared_store=parse_shared_store(STORE))
        with capturedLogs() as events:
            service = make_service(config, reactor)
        assert isinstance(service, BuildcacheService)
        service.server.store.close()
        (configured,) = [e for e in events if e.get("event") == "shared_tier_configured"]
        self.assertIn("only files with a digest of their own", configured["what"])
        self.assertEqual(
            [e for e in events if e.get("event") == "shared_secret_readable_by_others"], []
        )


@attrs.define
class RecordingTier:
    """
    The tier as the service drives it: what was called, and a stop the
    test ends.
    """

    calls: list[str] = attrs.Factory(list)
    stopped: Deferred[None] | None = None
    uploaded: Deferred[None] | None = None

    def start(self) -> None:
        self.calls.append("start")

    def when_idle(self) -> Deferred[None]:
        self.calls.append("when_idle")
        self.uploaded = Deferred()
        return self.uploaded

    def stop(self) -> Deferred[None]:
        self.calls.append("stop")
        self.stopped = Deferred()
        return self.stopped


def store_open(directory: str) -> bool:
    """
    Whether a server still holds the store in ``directory`` (its lock).
    """
    try:
        Store.open(directory, 1024**2, Clock()).close()
    except StoreError:
        return True
    return False


class LifecycleTests(TestCase):
    def service(
        self, changes: Mapping[str, object] | None = None
    ) -> tuple[BuildcacheService, RecordingTier, Clock]:
        running = start_server(self, changes)
        tier = RecordingTier()
        clock = Clock()
        server = attrs.evolve(running.server, shared=tier)
        return BuildcacheService(server, clock, grace=10), tier, clock

    async def test_started_and_stopped_with_the_service(self) -> None:
        """
        The tier starts with the service; stopping waits for the tier's
        last uploads, then for its stop (its leases released, its access
        records written), before the store closes.
        """
        service, tier, _ = self.service()
        service.startService()
        self.assertEqual(tier.calls, ["start"])
        stopping = service.stopService()
        self.assertEqual(tier.calls, ["start", "when_idle"])
        assert tier.uploaded is not None
        tier.uploaded.callback(None)
        self.assertEqual(tier.calls, ["start", "when_idle", "stop"])
        self.assertFalse(stopping.called)
        self.assertTrue(store_open(service.server.config.cache_dir))
        assert tier.stopped is not None
        tier.stopped.callback(None)
        await stopping
        self.assertFalse(store_open(service.server.config.cache_dir))

    async def test_a_stuck_store_does_not_hold_the_stop(self) -> None:
        """
        A tier whose store does not answer is given the grace, then the
        service stops without it, with a warning.
        """
        service, tier, clock = self.service()
        service.startService()
        with capturedLogs() as events:
            stopping = service.stopService()
            self.assertFalse(stopping.called)
            clock.advance(10)
            self.assertEqual(tier.calls, ["start", "when_idle", "stop"])
            self.assertFalse(stopping.called)
            clock.advance(10)
            await stopping
        self.assertFalse(store_open(service.server.config.cache_dir))
        self.assertEqual(
            [e["what"] for e in events if e.get("event") == "shared_tier_stop_timeout"],
            ["its uploads", "stopping"],
        )

