"""
In-memory parts for the shared tier's unit tests: an object store that
answers at once (conditional PUT honoured or not, failures on cue, every
request recorded) and a local store that holds bodies in files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

from attrs import define, field

from buildcache.shared.s3 import ObjectInfo, SharedStoreError
from buildcache.store import Entry, StoredObject


@define
class MemoryObjects:
    """Implements :class:`buildcache.shared.s3.ObjectStoreAPI` in memory."""

    clock: object = None
    conditional: bool = True
    #: Set: every request fails with this message.
    failing: str | None = None
    objects: dict[str, bytes] = field(factory=dict)
    requests: list[tuple[str, str]] = field(factory=list)

    def _request(self, method: str, name: str) -> None:
        self.requests.append((method, name))
        if self.failing is not None:
            raise SharedStoreError(f"{method} {name}: {self.failing}")

    def count(self, method: str, prefix: str = "") -> int:
        return sum(1 for m, n in self.requests if m == method and n.startswith(prefix))

    def get_url(self, name: str) -> str:
        return f"http://127.0.0.1:1/bucket/{name}?X-Amz-Signature=secretsignature"

    async def get_small(self, name: str, limit: int, timeout: float | None = None) -> bytes | None:
        self._request("GET", name)
        data = self.objects.get(name)
        if data is not None and len(data) > limit:
            raise SharedStoreError(f"GET {name}: larger than {limit} bytes")
        return data

    async def put_small(
        self, name: str, data: bytes, *, if_absent: bool = False,
        timeout: float | None = None,
    ) -> bool:
        self._request("PUT", name)
        if if_absent and self.conditional and name in self.objects:
            return False
        self.objects[name] = data
        return True

    async def put_file(self, name: str, fd: int, size: int) -> None:
        self._request("PUT", name)
        data = os.pread(fd, size, 0)
        if len(data) != size:
            raise SharedStoreError(f"PUT {name}: short file")
        self.objects[name] = data

    async def head(self, name: str) -> ObjectInfo | None:
        self._request("HEAD", name)
        data = self.objects.get(name)
        return None if data is None else ObjectInfo(name, len(data), 0.0)

    async def delete(self, name: str, timeout: float | None = None) -> None:
        self._request("DELETE", name)
        self.objects.pop(name, None)

    async def list_page(
        self, prefix: str, token: str | None = None
    ) -> tuple[list[ObjectInfo], str | None]:
        self._request("LIST", prefix)
        return [
            ObjectInfo(n, len(d), 0.0) for n, d in sorted(self.objects.items())
            if n.startswith(prefix)
        ], None


@define
class FileStore:
    """A local store of bodies in files under ``directory``: ``lookup``."""

    directory: str
    entries: dict[str, Entry] = field(factory=dict)
    lookups: int = 0

    def add(self, key: str, body: bytes, headers: Mapping[str, str] | None = None,
            source_digest: str | None = None) -> Entry:
        path = os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest())
        os.makedirs(self.directory, exist_ok=True)
        with open(path, "wb") as f:
            f.write(body)
        entry = Entry(
            key=key, size=len(body), headers=dict(headers or {}),
            sha256=hashlib.sha256(body).hexdigest(), fetched_at=0.0, validated_at=0.0,
            last_access=0.0, file=path, source_digest=source_digest,
        )
        self.entries[key] = entry
        return entry

    def lookup(self, key: str) -> StoredObject | None:
        self.lookups += 1
        entry = self.entries.get(key)
        if entry is None:
            return None
        return StoredObject(entry, os.open(entry.file, os.O_RDONLY))
