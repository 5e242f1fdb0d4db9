"""
The registry port's configuration: ``--registry-port``, ``--registry``,
``--registry-auth`` (their files, their secrecy) and the service that
listens on the port.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from buildcache.config import Registry
from tests.oci_origin import ALL_MANIFESTS, OciOrigin, start_origin
from tests.support import Client, reactor


class OptionsTests(TestCase):
    def test_registry_auth_file_mode_and_secrecy(self) -> None:
        from buildcache.options import Options

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("alice:s3cret-pw\n")
        os.chmod(path, 0o600)
        options = Options(environ={"PIP_INDEX_URL": "http://127.0.0.1:1/simple"})
        options.parseOptions([
            "--cache-dir", self.mktemp(),
            "--registry", "docker.io=http://127.0.0.1:2",
            "--registry", "127.0.0.1:5001=http://127.0.0.1:5001",
            "--registry-auth", f"127.0.0.1:5001={path}",
        ])
        config = options.config
        self.assertEqual(config.registry_endpoint, "tcp:5000")
        by_name = {r.name: r for r in config.registries}
        self.assertEqual(by_name["docker.io"].url, "http://127.0.0.1:2")
        self.assertEqual(by_name["127.0.0.1:5001"].credentials.password, "s3cret-pw")
        self.assertNotIn("s3cret", repr(config))

    def test_bad_registry_names(self) -> None:
        from twisted.python.usage import UsageError

        from buildcache.options import Options

        for value in ("team=http://127.0.0.1:1", "Docker.io", "x.io=ftp://h", "x.io=http://u:p@h"):
            options = Options(environ={"PIP_INDEX_URL": "http://127.0.0.1:1/simple"})
            with self.assertRaises(UsageError):
                options.parseOptions(["--cache-dir", self.mktemp(), "--registry", value])
        options = Options(environ={"PIP_INDEX_URL": "http://127.0.0.1:1/simple"})
        with self.assertRaises(UsageError):
            options.parseOptions([
                "--cache-dir", self.mktemp(), "--registry-auth", f"quay.io={self.mktemp()}",
            ])

    def test_credentials_in_a_registry_url_point_to_registry_auth(self) -> None:
        from twisted.python.usage import UsageError

        from buildcache.options import Options

        options = Options(environ={"PIP_INDEX_URL": "http://127.0.0.1:1/simple"})
        with self.assertRaises(UsageError) as raised:
            options.parseOptions(
                ["--cache-dir", self.mktemp(), "--registry", "x.io=http://u:s3cret@h"]
            )
        message = str(raised.exception)
        self.assertIn("--registry-auth x.io=FILE", message)
        self.assertNotIn("s3cret", message)


class RegistryAuthFileTests(TestCase):
    def write(self, content: bytes) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_first_line_user_password(self) -> None:
        from buildcache.config import parse_registry_auth

        path = self.write(b"alice:pa:ss word\nignored\n")
        name, read_path, credentials = parse_registry_auth(f"Quay.io={path}")
        self.assertEqual((name, read_path), ("quay.io", path))
        self.assertEqual((credentials.username, credentials.password), ("alice", "pa:ss word"))

    def test_bad_files_never_quoted(self) -> None:
        from buildcache.config import parse_registry_auth

        for content in (b"", b"no-colon-s3cret\n", b":s3cret\n", b"\xffs3cret:\xfe\n"):
            path = self.write(content)
            with self.assertRaises(ValueError) as caught:
                parse_registry_auth(f"quay.io={path}")
            self.assertNotIn("s3cret", str(caught.exception))
            self.assertIn(path, str(caught.exception))
        with self.assertRaises(ValueError):
            parse_registry_auth(f"quay.io={self.mktemp()}")
        with self.assertRaises(ValueError):
            parse_registry_auth("team=/dev/null")


class ServiceTests(TestCase):
    async def test_make_service_listens_on_registry_port(self) -> None:
        from buildcache.config import Config
        from buildcache.service import BuildcacheService, make_service

        origin = OciOrigin()
        image = origin.push_image("library/alpine", "3.20", [b"alpine"])
        url = start_origin(self, origin)
        config = Config(
            cache_dir=self.mktemp(),
            proxy_endpoint="tcp:0:interface=127.0.0.1",
            index_endpoint="tcp:0:interface=127.0.0.1",
            registry_endpoint="tcp:0:interface=127.0.0.1",
            registries=(Registry("docker.io", url),),
        )
        service = make_service(config, reactor)
        assert isinstance(service, BuildcacheService)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        (registry,) = [
            s for s in service if getattr(s, "_option", None) == "--registry-port"
        ]
        port = registry.port.getHost().port  # type: ignore[attr-defined]
        client = Client()
        got = await client.get(
            f"http://127.0.0.1:{port}/v2/alpine/manifests/3.20", {"accept": ALL_MANIFESTS}
        )
        await client.close()
        self.assertEqual((got.status, got.body), (200, image.manifest))

    def test_registry_auth_readable_by_others_warned(self) -> None:
        from twisted.logger import capturedLogs

        from buildcache.config import Config
        from buildcache.service import BuildcacheService, make_service

        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("alice:s3cret-pw\n")
        os.chmod(path, 0o644)
        config = Config(cache_dir=self.mktemp(), registry_auth_files=(path,))
        with capturedLogs() as events:
            service = make_service(config, reactor)
        assert isinstance(service, BuildcacheService)
        service.server.store.close()
        (warning,) = [
            e for e in events if e.get("event") == "registry_auth_readable_by_others"
        ]
        self.assertEqual(warning["path"], path)
        self.assertNotIn("s3cret", repr(events))
