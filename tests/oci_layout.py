"""
OCI images built by hand for the registry tests and bench: deterministic
gzip'd tar layers of a given size, configs, image manifests, an optional
multi-platform index, and the ``oci-layout``/``index.json`` of an OCI image
layout that ``skopeo copy oci:DIR:TAG ...`` pushes.  Layers are streamed to
disk, so a 200 MB image costs no memory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from attrs import frozen

OCI_LAYOUT = {"imageLayoutVersion": "1.0.0"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
REF_NAME = "org.opencontainers.image.ref.name"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()



@frozen
class Blob:
    """One content-addressed file of a layout: its descriptor and its path."""

    media_type: str
    digest: str
    size: int
    path: Path

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size, **extra}

    def read(self) -> bytes:
        return self.path.read_bytes()


@frozen
class Manifest:
    """One image manifest of a layout, with its config and layers."""

    blob: Blob
    config: Blob
    layers: tuple[Blob, ...]
    platform: str


@frozen
class OciImage:
    """
    An OCI image layout on disk holding one tag: ``top`` is what the tag
    names (a manifest, or an index for a multi-arch image), ``manifests``
    the image manifests under it.
    """

    layout: Path
    tag: str
    top: Blob
    manifests: tuple[Manifest, ...]

    @property
    def reference(self) -> str:
        """The skopeo source name: ``oci:LAYOUT:TAG``."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def is_index(self) -> bool:
        return self.top.media_type == OCI_INDEX

    def blobs(self) -> dict[str, Blob]:
        """Every config and layer blob, by digest."""
        found: dict[str, Blob] = {}
        for manifest in self.manifests:
            for blob in (manifest.config, *manifest.layers):
                found[blob.digest] = blob
        return found

    @property
    def size(self) -> int:
        return sum(blob.size for blob in self.blobs().values())


class _PatternReader:
    """``size`` deterministic bytes that deflate cannot shrink, read in chunks."""

    def __init__(self, size: int, seed: bytes) -> None:
        self._block = b"".join(
            hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048)
        )
        self._left = size
        self._offset = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = self._left
        n = min(n, self._left)
        out = bytearray()
        while len(out) < n:
            take = min(n - len(out), len(self._block) - self._offset)
            out += self._block[self._offset:self._offset + take]
            self._offset = (self._offset + take) % len(self._block)
        self._left -= n
        return bytes(out)


class _Hashing:
    """A write-only file that hashes and counts what passes to ``inner``."""

    def __init__(self, inner: BinaryIO | None) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        if self.inner is not None:
            self.inner.write(data)
        return len(data)

    def flush(self) -> None:
        pass


def _put_blob(layout: Path, media_type: str, data: bytes) -> Blob:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.write_bytes(data)
    return Blob(media_type, "sha256:" + digest, len(data), path)


def _canonical(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()


def build_layer(layout: Path, size: int, seed: bytes, compresslevel: int = 1) -> tuple[Blob, str]:
    """
    A gzip'd tar layer holding one file of ``size`` bytes (derived from
    ``seed``), written to ``layout``'s blobs without holding it in memory;
    returns the blob and its diff ID (the digest of the tar).  Same
    arguments, same bytes: tar and gzip times are 0.
    """
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=blobs, prefix=".layer-")
    with os.fdopen(fd, "wb") as out:
        compressed = _Hashing(out)
        with gzip.GzipFile(fileobj=compressed, mode="wb",  # type: ignore[arg-type]
                           compresslevel=compresslevel, mtime=0, filename="") as gz:
            plain = _Hashing(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                info = tarfile.TarInfo(f"data/{seed.hex() or 'layer'}.bin")
                info.size, info.mtime, info.mode = size, 0, 0o644
                tar.addfile(info, _PatternReader(size, seed))
    digest = compressed.hash.hexdigest()
    path = blobs / digest
    os.replace(name, path)
    blob = Blob(OCI_LAYER_GZIP, "sha256:" + digest, compressed.size, path)
    return blob, "sha256:" + plain.hash.hexdigest()


def build_manifest(
    layout: Path, layer_sizes: Sequence[int], seed: bytes, platform: str = "linux/amd64",
    compresslevel: int = 1,
) -> Manifest:
    """An image manifest (with its config and layers) in ``layout``'s blobs."""
    os_name, _, architecture = platform.partition("/")
    layers, diff_ids = [], []
    for number, size in enumerate(layer_sizes):
        layer, diff_id = build_layer(
            layout, size, seed + f"/{platform}/{number}".encode(), compresslevel
        )
        layers.append(layer)
        diff_ids.append(diff_id)
    config = _put_blob(layout, OCI_CONFIG, _canonical({
        "architecture": architecture,
        "os": os_name,
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"seed": seed.hex()}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"registry_parts layer {i}"} for i in range(len(layers))],
    }))
    manifest = _put_blob(layout, OCI_MANIFEST, _canonical({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config.descriptor(),
        "layers": [layer.descriptor() for layer in layers],
    }))
    return Manifest(manifest, config, tuple(layers), platform)


def build_image(
    layout: Path,
    tag: str,
    layer_sizes: Sequence[int],
    seed: bytes = b"",
    platforms: Sequence[str] | None = None,
    compresslevel: int = 1,
) -> OciImage:
    """
    An OCI image layout at ``layout`` whose ``tag`` names one image of
    ``layer_sizes`` (bytes of file content per layer), or, with
    ``platforms`` (e.g. ``("linux/amd64", "linux/arm64")``), an image index
    over one such image per platform.  Layers, configs and manifests are
    deterministic in ``seed``: give each test image its own seed.  Push it
    with :meth:`Skopeo.push` (``--all`` is added for an index).
    """
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_bytes(_canonical(OCI_LAYOUT))
    manifests: tuple[Manifest, ...]
    if platforms is None:
        manifests = (build_manifest(layout, layer_sizes, seed, compresslevel=compresslevel),)
        top = manifests[0].blob
    else:
        manifests = tuple(
            build_manifest(layout, layer_sizes, seed, platform, compresslevel)
            for platform in platforms
        )
        entries = []
        for manifest in manifests:
            os_name, _, architecture = manifest.platform.partition("/")
            entries.append(manifest.blob.descriptor(
                platform={"architecture": architecture, "os": os_name}
            ))
        top = _put_blob(layout, OCI_INDEX, _canonical({
            "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries,
        }))
    (layout / "index.json").write_bytes(_canonical({
        "schemaVersion": 2,
        "manifests": [top.descriptor(annotations={REF_NAME: tag})],
    }))
    return OciImage(layout, tag, top, manifests)



def layout_blobs(layout: Path) -> dict[str, int]:
    """Every blob in an OCI layout: digest -> size, each file's digest checked."""
    found = {}
    for path in sorted((layout / "blobs" / "sha256").iterdir()):
        if path.name.startswith("."):
            continue
        digest = sha256_file(path)
        if digest != "sha256:" + path.name:
            raise AssertionError(f"{path} holds {digest}")
        found[digest] = path.stat().st_size
    return found
