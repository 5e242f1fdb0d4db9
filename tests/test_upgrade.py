"""
Upgrades keep the cache: a cache directory written by buildcache as it was
before the hardening issue (index schema version 1, ``tests/fixtures/
cache-v1.tar.gz``, made by ``contrib/make_cache_v1.py`` with that
version's real server) is migrated in place by the real ``twistd
buildcache`` and every entry is served from it, with nothing listening
upstream.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

from twisted.trial.unittest import TestCase

from buildcache.store import MIGRATIONS
from tests.support import Client
from tests.test_service import ServerProcess, free_port, spawn_server

FIXTURES = Path(__file__).parent / "fixtures"


class UpgradeTests(TestCase):
    def unpack(self) -> tuple[str, dict[str, object]]:
        work = Path(self.mktemp())
        work.mkdir()
        with tarfile.open(FIXTURES / "cache-v1.tar.gz") as tar:
            tar.extractall(work, filter="data")
        manifest = json.loads((FIXTURES / "cache-v1.json").read_text())
        return str((work / "cache").absolute()), manifest

    def spawn(self, cache_dir: str, manifest: dict[str, object]) -> tuple[ServerProcess, int, int]:
        index_port = free_port()
        origin = f"http://127.0.0.1:{manifest['apk_port']}"
        process, proxy_port = spawn_server(
            self,
            "--cache-dir", cache_dir,
            "--mirror", f"alpine={origin}/alpine",
            "--allow-upstream", f"127.0.0.1:{manifest['apk_port']}",
            # Stored indexes are served as they are, not revalidated: the
            # origins of the fixture are gone.
            "--index-ttl", "3650d",
            "--prefetch-max-size", "0",
            index_port=index_port,
            pypi_upstream=f"http://127.0.0.1:{manifest['index_port']}/simple",
        )
        return process, proxy_port, index_port

    async def test_version_1_cache_is_migrated_and_served(self) -> None:
        cache_dir, manifest = self.unpack()
        process, proxy_port, index_port = self.spawn(cache_dir, manifest)
        await process.wait_for(b"ProxySite starting on")
        await process.wait_for(b"StrictSite starting on")
        await process.wait_for(b"Migrated the cache index")
        direct, proxied = Client(), Client(proxy_port=proxy_port)
        entries = manifest["entries"]
        assert isinstance(entries, list)
        for entry in entries:
            route, path = entry["route"], entry["path"]
            if route == "proxy":
                received = await proxied.get(path, entry["headers"])
            else:
                port = index_port if route == "index" else proxy_port
                received = await direct.get(f"http://127.0.0.1:{port}{path}", entry["headers"])
            with self.subTest(path=path):
                self.assertEqual(received.status, 200, received.body[:300])
                self.assertEqual(received.headers.getRawHeaders("x-cache"), ["HIT"])
                if path.endswith("/"):
                    # A page is rendered anew from its stored model.
                    files = [f["filename"] for f in json.loads(received.body)["files"]]
                    self.assertIn("bcdemo_a-1.0-py3-none-any.whl", files)
                else:
                    self.assertEqual(
                        (len(received.body), hashlib.sha256(received.body).hexdigest()),
                        (entry["size"], entry["sha256"]),
                    )
        await direct.close()
        await proxied.close()
        # One log line a step, each carrying every row over.
        migrated = [
            line for line in bytes(process.output).decode().splitlines()
            if "Migrated the cache index" in line
        ]
        self.assertEqual(len(migrated), len(MIGRATIONS), migrated)
        for line in migrated:
            self.assertIn("; 0 entries it could not carry over were dropped", line)
