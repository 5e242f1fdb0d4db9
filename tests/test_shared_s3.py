"""
:class:`buildcache.shared.s3.ObjectStore` against a real S3 store
(SeaweedFS, :mod:`tests.seaweed_parts`): what each operation sends and
what comes back, streamed uploads from a file descriptor, the conditional
PUT, and errors that never carry a presigned URL.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Coroutine
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from buildcache.fetch.client import upstream_client
from buildcache.shared.location import S3Location
from buildcache.shared.s3 import ObjectStore, SharedStoreError, object_store
from tests.seaweed_parts import SeaweedCase, credentials_env
from tests.support import pattern_bytes

reactor: Any = _reactor


def with_credentials(case: Any) -> None:
    """The dummy keys in this process's environment for ``case``'s test."""
    saved = {k: os.environ.get(k) for k in credentials_env()}
    os.environ.update(credentials_env())

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    case.addCleanup(restore)


def make_objects(case: Any, endpoint: str, bucket: str, prefix: str = "pre/") -> ObjectStore:
    with_credentials(case)
    pool = HTTPConnectionPool(reactor, persistent=True)
    case.addCleanup(pool.closeCachedConnections)
    http = upstream_client(Agent(reactor, pool=pool))
    return object_store(S3Location(bucket, prefix, endpoint), http, reactor, timeout=10.0)


class ObjectStoreTests(SeaweedCase):
    def objects(self, prefix: str = "pre/") -> ObjectStore:
        bucket = self.bucket()
        self.bucket_name = bucket
        return make_objects(self, self.store.endpoint, bucket, prefix)

    def run_d(self, coro: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coro)

    def test_small_objects(self) -> Deferred[Any]:
        objects = self.objects()

        async def go() -> None:
            self.assertIsNone(await objects.get_small("records/x.json", 100))
            self.assertIsNone(await objects.head("records/x.json"))
            self.assertTrue(await objects.put_small("records/x.json", b'{"a":1}'))
            self.assertEqual(await objects.get_small("records/x.json", 100), b'{"a":1}')
            # Under the prefix in the bucket.
            self.assertEqual(
                self.store.get_object(self.bucket_name, "pre/records/x.json"), b'{"a":1}'
            )
            info = await objects.head("records/x.json")
            assert info is not None
            self.assertEqual((info.name, info.size), ("records/x.json", 7))
            self.assertGreater(info.last_modified, 1.7e9)
            with self.assertRaises(SharedStoreError) as raised:
                await objects.get_small("records/x.json", 3)
            self.assertIn("larger than 3 bytes", str(raised.exception))
            await objects.delete("records/x.json")
            await objects.delete("records/x.json")
            self.assertIsNone(await objects.get_small("records/x.json", 100))

        return self.run_d(go())

    def test_if_absent(self) -> Deferred[Any]:
        objects = self.objects()

        async def go() -> None:
            self.assertTrue(await objects.put_small("leases/keys/k", b"one", if_absent=True))
            self.assertFalse(await objects.put_small("leases/keys/k", b"two", if_absent=True))
            self.assertEqual(await objects.get_small("leases/keys/k", 10), b"one")
            self.assertTrue(await objects.put_small("leases/keys/k", b"three"))
            self.assertEqual(await objects.get_small("leases/keys/k", 10), b"three")

        return self.run_d(go())

    def test_put_file_streams_from_fd(self) -> Deferred[Any]:
        objects = self.objects()
        body = pattern_bytes(3 * 1024 * 1024 + 17, b"blob")
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(body + b"trailing bytes not part of the object")
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        os.lseek(fd, 100, os.SEEK_SET)
        digest = hashlib.sha256(body).hexdigest()

        async def go() -> None:
            await objects.put_file(f"blobs/sha256/{digest}", fd, len(body))
            got = self.store.get_object(self.bucket_name, f"pre/blobs/sha256/{digest}")
            assert got is not None
            self.assertEqual(hashlib.sha256(got).hexdigest(), digest)
            # The descriptor's own offset is left alone (pread).
            self.assertEqual(os.lseek(fd, 0, os.SEEK_CUR), 100)
            info = await objects.head(f"blobs/sha256/{digest}")
            assert info is not None
            self.assertEqual(info.size, len(body))
            # The presigned GET reads it through the same client.
            response = await objects.http.request("GET", objects.get_url(f"blobs/sha256/{digest}"))
            self.assertEqual(response.code, 200)
            from buildcache.fetch.client import read_bounded

            read, complete = await read_bounded(response, len(body) + 1)
            self.assertTrue(complete)
            self.assertEqual(read, body)

        return self.run_d(go())

    def test_put_file_shorter_than_said(self) -> Deferred[Any]:
        objects = self.objects()
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"x" * 1000)
        fd = os.open(path, os.O_RDONLY)
        self.addCleanup(os.close, fd)

        async def go() -> None:
            with self.assertRaises(SharedStoreError):
                await objects.put_file("blobs/sha256/short", fd, 5000)
            self.assertIsNone(await objects.head("blobs/sha256/short"))

        return self.run_d(go())

    def test_list_pages(self) -> Deferred[Any]:
        objects = self.objects()
        names = [f"access/n1/{i:04d}.json" for i in range(1005)]

        async def go() -> None:
            from twisted.internet.defer import gatherResults

            for start in range(0, len(names), 50):
                await gatherResults([
                    Deferred.fromCoroutine(objects.put_small(n, b"{}"))
                    for n in names[start:start + 50]
                ])
            await objects.put_small("records/r.json", b"{}")
            page, token = await objects.list_page("access/")
            self.assertEqual(len(page), 1000)
            self.assertIsNotNone(token)
            rest, token2 = await objects.list_page("access/", token)
            self.assertIsNone(token2)
            self.assertEqual(sorted(o.name for o in page + rest), names)
            self.assertEqual({o.size for o in page + rest}, {2})
            everything, _ = await objects.list_page("records/")
            self.assertEqual([o.name for o in everything], ["records/r.json"])

        return self.run_d(go())

    def test_errors_never_carry_the_url(self) -> Deferred[Any]:
        # A bucket that does not exist, then a store that is not there.
        objects = make_objects(self, self.store.endpoint, "no-such-bucket-here")
        closed = make_objects(self, "http://127.0.0.1:9", "bucket")

        async def go() -> None:
            failures = []
            for store in (objects, closed):
                calls: list[Coroutine[Any, Any, object]] = [
                    store.get_small("records/a.json", 10)
                ]
                if store is closed:
                    # (SeaweedFS makes a bucket on PUT; a HEAD in a
                    # missing bucket is a 404 without a body.)
                    calls += [
                        store.put_small("records/a.json", b"x"),
                        store.list_page("records/"),
                        store.head("records/a.json"),
                        store.delete("records/a.json"),
                    ]
                for call in calls:
                    try:
                        await call
                    except SharedStoreError as e:
                        failures.append(str(e))
            self.assertEqual(len(failures), 6, failures)
            for text in failures:
                self.assertNotIn("X-Amz", text)
                self.assertNotIn("Signature", text)
                self.assertNotIn("buildcache-test-key", text)
            self.assertIn("NoSuchBucket", failures[0])
            self.assertIn("GET records/a.json: ConnectionRefusedError", failures[1])

        return self.run_d(go())

    def test_repr_has_no_credentials(self) -> None:
        objects = self.objects()
        text = repr(objects)
        self.assertNotIn("buildcache-test", text)
        self.assertIn("S3Location", text)
