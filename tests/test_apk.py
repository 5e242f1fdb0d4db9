"""
Tests for :func:`buildcache.ecosystems.apk.index` (index parsing, streaming package verification,
index URLs) and for the test-support module :func:`tests.apkrepo` other test
modules build on.
"""

from __future__ import annotations

import functools
import io
import os
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http
from twisted.web.iweb import IAgent

from buildcache.ecosystems.apk.check import ApkIndexes
from buildcache.ecosystems.apk.index import (
    ApkIndex,
    ApkIndexEntry,
    ApkIndexError,
    ApkMismatch,
    package_filename,
    parse_apkindex,
    repository_index_url,
)
from buildcache.ecosystems.apk.verify import ApkVerifier
from buildcache.engine.keys import cache_key
from buildcache.store import Store
from tests.apkrepo import (
    SIGNATURE_NAME,
    BuiltApk,
    RepositoryResource,
    build_apk,
    build_apkindex,
    gzip_stream,
    gzip_tar,
    index_block,
    listen_on_loopback,
    write_repository,
)
from tests.support import HeldRunner


@functools.lru_cache(maxsize=None)
def signed_package() -> BuiltApk:
    return build_apk(
        "hello",
        "2.12.1-r0",
        data_files={
            "usr/bin/hello": b"\x7fELF" + bytes(range(256)) * 8,
            "usr/share/doc/hello/README": b"hello, world\n" * 50,
        },
        depends=("so:libc.musl-x86_64.so.1",),
    )


@functools.lru_cache(maxsize=None)
def unsigned_package() -> BuiltApk:
    return build_apk("zlib", "1.3.1-r1", signed=False, data_size_pad=5000)


def entry_for(apk: BuiltApk) -> ApkIndexEntry:
    index = parse_apkindex(io.BytesIO(build_apkindex([apk])))
    return index[apk.filename]


def gzip_members(content: bytes) -> list[bytes]:
    """Split concatenated gzip streams (test oracle, whole-buffer)."""
    members = []
    while content:
        decompressor = zlib.decompressobj(wbits=31)
        decompressor.decompress(content)
        assert decompressor.eof
        end = len(content) - len(decompressor.unused_data)
        members.append(content[:end])
        content = content[end:]
    return members


def inflate_all(content: bytes) -> bytes:
    return b"".join(zlib.decompress(member, wbits=31) for member in gzip_members(content))


def verify(entry: ApkIndexEntry, chunks: Iterator[bytes] | Sequence[bytes]) -> None:
    verifier = ApkVerifier(entry)
    for chunk in chunks:
        verifier.update(chunk)
    verifier.finish()


def split_at(content: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = [0, *sorted(set(cuts)), len(content)]
    return [content[start:end] for start, end in zip(points, points[1:])]


def mismatch_reason(entry: ApkIndexEntry, content: bytes) -> str:
    verifier = ApkVerifier(entry)
    verifier.update(content)
    try:
        verifier.finish()
    except ApkMismatch as mismatch:
        return mismatch.reason
    raise AssertionError("expected ApkMismatch")


class BuildApkTests(SynchronousTestCase):
    """
    :func:`build_apk` writes the layout abuild does, so the verifier is tested
    against realistic bytes.
    """

    def test_signed_package_has_three_streams_reading_as_one_tar(self) -> None:
        """
        Signature, control and data gzip streams concatenate; inflated, they
        read as a single tar (the first two have no end-of-archive blocks).
        """
        apk = signed_package()
        members = gzip_members(apk.content)
        self.assertEqual(
            members, [apk.signature_stream, apk.control_stream, apk.data_stream]
        )
        with tarfile.open(fileobj=io.BytesIO(inflate_all(apk.content))) as archive:
            names = archive.getnames()
        self.assertEqual(
            names,
            [
                SIGNATURE_NAME,
                ".PKGINFO",
                "usr",
                "usr/bin",
                "usr/bin/hello",
                "usr/share",
                "usr/share/doc",
                "usr/share/doc/hello",
                "usr/share/doc/hello/README",
            ],
        )

    def test_control_tar_is_cut(self) -> None:
        """
        The control tar ends right after its last member: no zero blocks.
        """
        control = zlib.decompress(signed_package().control_stream, wbits=31)
        self.assertEqual(len(control) % 512, 0)
        self.assertNotEqual(control[-512:], bytes(512))

    def test_pkginfo_datahash_and_index_fields(self) -> None:
        """
        ``.PKGINFO`` carries the SHA-256 of the compressed data stream, and
        the computed fields match the bytes.
        """
        import hashlib

        apk = signed_package()
        control = zlib.decompress(apk.control_stream, wbits=31)
        with tarfile.open(fileobj=io.BytesIO(control)) as archive:
            extracted = archive.extractfile(".PKGINFO")
            assert extracted is not None
            pkginfo = extracted.read().decode()
        self.assertIn(
            f"datahash = {hashlib.sha256(apk.data_stream).hexdigest()}\n", pkginfo
        )
        self.assertIn("pkgname = hello\n", pkginfo)
        self.assertIn("pkgver = 2.12.1-r0\n", pkginfo)
        self.assertIn("depend = so:libc.musl-x86_64.so.1\n", pkginfo)
        self.assertEqual(apk.control_sha1, hashlib.sha1(apk.control_stream).digest())
        self.assertEqual(apk.filename, "hello-2.12.1-r0.apk")
        self.assertEqual(apk.installed_size, 4 + 256 * 8 + 13 * 50)

    def test_unsigned_package_has_two_streams(self) -> None:
        apk = unsigned_package()
        self.assertEqual(apk.signature_length, 0)
        self.assertEqual(
            gzip_members(apk.content), [apk.control_stream, apk.data_stream]
        )

    def test_padding_is_reproducible_and_incompressible(self) -> None:
        first = build_apk("pad", "1-r0", data_size_pad=100_000, pad_seed=7)
        again = build_apk("pad", "1-r0", data_size_pad=100_000, pad_seed=7)
        other = build_apk("pad", "1-r0", data_size_pad=100_000, pad_seed=8)
        self.assertEqual(first.content, again.content)
        self.assertNotEqual(first.content, other.content)
        self.assertGreater(first.size, 100_000)

    def test_index_block(self) -> None:
        apk = signed_package()
        block = index_block(apk)
        self.assertTrue(block.startswith(f"C:{apk.control_checksum}\nP:hello\n"))
        self.assertIn(f"\nS:{apk.size}\n", block)
        self.assertTrue(block.endswith("D:so:libc.musl-x86_64.so.1\n\n"))


class WriteRepositoryTests(SynchronousTestCase):
    def test_layout_and_mtime(self) -> None:
        directory = self.mktemp()
        arch_directory = write_repository(
            directory, [signed_package(), unsigned_package()], "aarch64", mtime=1e9
        )
        self.assertEqual(arch_directory, Path(directory) / "aarch64")
        self.assertEqual(
            sorted(os.listdir(arch_directory)),
            ["APKINDEX.tar.gz", "hello-2.12.1-r0.apk", "zlib-1.3.1-r1.apk"],
        )
        self.assertEqual(
            (arch_directory / "zlib-1.3.1-r1.apk").read_bytes(),
            unsigned_package().content,
        )
        self.assertEqual(os.stat(arch_directory / "APKINDEX.tar.gz").st_mtime, 1e9)
        with (arch_directory / "APKINDEX.tar.gz").open("rb") as index_file:
            index = parse_apkindex(index_file)
        self.assertEqual(
            sorted(index), ["hello-2.12.1-r0.apk", "zlib-1.3.1-r1.apk"]
        )


class ParseApkIndexTests(SynchronousTestCase):
    def test_signed_index(self) -> None:
        """
        A signed index (signature stream, then the index stream) yields
        every entry with its fields decoded.
        """
        hello, zlib_apk = signed_package(), unsigned_package()
        index = parse_apkindex(
            io.BytesIO(build_apkindex([hello, zlib_apk], description="v3.20.3-1"))
        )
        self.assertIsInstance(index, ApkIndex)
        self.assertTrue(index.signed)
        self.assertEqual(index.description, "v3.20.3-1")
        self.assertEqual(len(index), 2)
        self.assertEqual(
            index["hello-2.12.1-r0.apk"],
            ApkIndexEntry(
                name="hello",
                version="2.12.1-r0",
                size=hello.size,
                control_sha1=hello.control_sha1,
                arch="x86_64",
                installed_size=hello.installed_size,
                depends=("so:libc.musl-x86_64.so.1",),
                description="hello test package",
            ),
        )
        self.assertEqual(index["zlib-1.3.1-r1.apk"].depends, ())
        self.assertEqual(
            index["hello-2.12.1-r0.apk"].control_checksum, hello.control_checksum
        )

    def test_unsigned_index(self) -> None:
        index = parse_apkindex(
            io.BytesIO(build_apkindex([signed_package()], signed=False))
        )
        self.assertFalse(index.signed)
        self.assertEqual(list(index), ["hello-2.12.1-r0.apk"])

    def test_reads_in_small_pieces(self) -> None:
        """
        The source is read incrementally, not in one call; small reads from
        the source do not change the result.
        """
        content = build_apkindex([signed_package(), unsigned_package()])

        class Trickle(io.RawIOBase):
            position = 0

            def readable(self) -> bool:
                return True

            def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
                piece = content[self.position : self.position + 7]
                buffer[: len(piece)] = piece
                self.position += len(piece)
                return len(piece)

        index = parse_apkindex(Trickle())  # type: ignore[arg-type]
        self.assertEqual(len(index), 2)

    def test_crlf_and_missing_trailing_blank_line(self) -> None:
        text = index_block(signed_package()).rstrip("\n").replace("\n", "\r\n")
        index = parse_apkindex(io.BytesIO(gzip_tar({"APKINDEX": text.encode()})))
        self.assertEqual(index["hello-2.12.1-r0.apk"].size, signed_package().size)

    def assertIndexError(self, content: bytes, fragment: str) -> None:
        with self.assertRaises(ApkIndexError) as caught:
            parse_apkindex(io.BytesIO(content))
        self.assertIn(fragment, str(caught.exception))

    def index_with_text(self, text: str) -> bytes:
        return gzip_tar({"DESCRIPTION": b"x", "APKINDEX": text.encode()})

    def test_empty(self) -> None:
        self.assertIndexError(b"", "empty")

    def test_not_gzip(self) -> None:
        self.assertIndexError(b"this is not gzip at all", "corrupt")

    def test_truncated_gzip(self) -> None:
        content = build_apkindex([signed_package()])
        self.assertIndexError(content[:-20], "truncated")

    def test_not_a_tar(self) -> None:
        self.assertIndexError(gzip_stream(b"\x01" * 2000), "not a valid tar")

    def test_no_apkindex_member(self) -> None:
        self.assertIndexError(gzip_tar({"DESCRIPTION": b"x"}), "no APKINDEX member")

    def test_missing_field(self) -> None:
        block = index_block(signed_package())
        without_size = "".join(
            line for line in block.splitlines(True) if not line.startswith("S:")
        )
        self.assertIndexError(self.index_with_text(without_size), "no S: field")

    def test_checksum_not_q1(self) -> None:
        block = index_block(signed_package()).replace("C:Q1", "C:Q2")
        self.assertIndexError(self.index_with_text(block), "not a Q1")

    def test_checksum_bad_base64(self) -> None:
        block = index_block(signed_package())
        checksum = signed_package().control_checksum
        broken = block.replace(checksum, checksum[:-3] + "!!=")
        self.assertIndexError(self.index_with_text(broken), "not valid base64")

    def test_checksum_wrong_length(self) -> None:
        block = index_block(signed_package())
        short = block.replace(signed_package().control_checksum, "Q1AAAA")
        self.assertIndexError(self.index_with_text(short), "decodes to 3 bytes")

    def test_size_not_a_number(self) -> None:
        block = index_block(signed_package())
        broken = block.replace(f"S:{signed_package().size}", "S:12k")
        self.assertIndexError(self.index_with_text(broken), "S: is not a byte count")

    def test_line_without_colon(self) -> None:
        text = index_block(signed_package()) + "garbage line\n"
        self.assertIndexError(self.index_with_text(text), "line 14")

    def test_not_utf8(self) -> None:
        content = gzip_tar({"APKINDEX": b"P:\xff\xfe\n"})
        self.assertIndexError(content, "not UTF-8")

    def test_overlong_line(self) -> None:
        content = self.index_with_text("T:" + "x" * 70_000 + "\n")
        self.assertIndexError(content, "longer than")

    def test_inflation_limit(self) -> None:
        content = build_apkindex([signed_package()])
        with self.assertRaises(ApkIndexError) as caught:
            parse_apkindex(io.BytesIO(content), max_index_bytes=1000)
        self.assertIn("more than 1000 bytes", str(caught.exception))


class ApkVerifierTests(SynchronousTestCase):
    def test_signed_package_matches(self) -> None:
        verify(entry_for(signed_package()), [signed_package().content])

    def test_unsigned_package_matches(self) -> None:
        verify(entry_for(unsigned_package()), [unsigned_package().content])

    def test_one_byte_chunks(self) -> None:
        for apk in (signed_package(), unsigned_package()):
            content = apk.content
            verify(entry_for(apk), [content[i : i + 1] for i in range(len(content))])

    def test_chunks_ending_exactly_at_stream_boundaries(self) -> None:
        apk = signed_package()
        boundaries = [apk.signature_length, apk.signature_length + apk.control_length]
        verify(entry_for(apk), split_at(apk.content, boundaries))

    def test_empty_chunks_are_harmless(self) -> None:
        apk = unsigned_package()
        verify(entry_for(apk), [b"", apk.content[:10], b"", apk.content[10:], b""])

    def test_package_without_datahash(self) -> None:
        """
        Older packages have no ``datahash``: size and control checksum still
        decide.
        """
        apk = build_apk("old", "1.0-r0", include_datahash=False)
        verify(entry_for(apk), [apk.content])

    def test_large_package_in_bounded_memory(self) -> None:
        """
        A 40 MB package verifies streaming, and the verifier's own memory
        stays far below the package size.
        """
        import tracemalloc

        apk = build_apk("big", "1.0-r0", data_size_pad=40_000_000)
        entry = entry_for(apk)
        chunk_size = 256 * 1024
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        baseline = tracemalloc.get_traced_memory()[0]
        verifier = ApkVerifier(entry)
        for start in range(0, apk.size, chunk_size):
            verifier.update(apk.content[start : start + chunk_size])
        verifier.finish()
        peak = tracemalloc.get_traced_memory()[1] - baseline
        self.assertGreater(apk.size, 40_000_000)
        self.assertLess(peak, 4 * 1024 * 1024)

    def test_size_mismatch_from_index(self) -> None:
        apk = signed_package()
        entry = attrs.evolve(entry_for(apk), size=apk.size + 1)
        reason = mismatch_reason(entry, apk.content)
        self.assertIn(f"size is {apk.size} bytes, the index says {apk.size + 1}", reason)

    def test_extra_bytes_detected_early(self) -> None:
        """
        Bytes beyond the index's size are flagged by :meth:`ApkVerifier.mismatch`
        before :meth:`ApkVerifier.finish`, so a download can be abandoned.
        """
        apk = unsigned_package()
        verifier = ApkVerifier(entry_for(apk))
        verifier.update(apk.content)
        self.assertIsNone(verifier.mismatch)
        verifier.update(b"\x00")
        mismatch = verifier.mismatch
        assert mismatch is not None
        self.assertIn("more than the", mismatch.reason)
        self.assertEqual(verifier.bytes_received, apk.size + 1)
        with self.assertRaises(ApkMismatch) as caught:
            verifier.finish()
        self.assertIn("size is", caught.exception.reason)

    def test_truncated_package(self) -> None:
        apk = signed_package()
        reason = mismatch_reason(entry_for(apk), apk.content[:-100])
        self.assertIn("size is", reason)

    def test_truncated_package_with_matching_size(self) -> None:
        """
        Even when the index's size happens to agree, a package whose last
        gzip stream has no end is refused: its data stream, hashed and not
        inflated, no longer matches ``.PKGINFO``'s ``datahash``.
        """
        apk = signed_package()
        truncated = apk.content[:-100]
        entry = attrs.evolve(entry_for(apk), size=len(truncated))
        self.assertIn("datahash", mismatch_reason(entry, truncated))

    def test_missing_data_stream(self) -> None:
        apk = signed_package()
        content = apk.signature_stream + apk.control_stream
        entry = attrs.evolve(entry_for(apk), size=len(content))
        self.assertIn("no data stream", mismatch_reason(entry, content))

    def test_tampered_control_stream(self) -> None:
        """
        A control stream other than the one the index lists (here: same
        data, different description) fails the ``C:`` check.
        """
        apk = signed_package()
        other = build_apk(
            apk.name,
            apk.version,
            data_files={
                "usr/bin/hello": b"\x7fELF" + bytes(range(256)) * 8,
                "usr/share/doc/hello/README": b"hello, world\n" * 50,
            },
            depends=apk.depends,
            description="something else",
        )
        self.assertEqual(other.data_stream, apk.data_stream)
        self.assertNotEqual(other.control_stream, apk.control_stream)
        content = apk.signature_stream + other.control_stream + apk.data_stream
        entry = attrs.evolve(entry_for(apk), size=len(content))
        reason = mismatch_reason(entry, content)
        self.assertIn("control stream checksum", reason)
        self.assertIn(apk.control_checksum, reason)

    def test_tampered_data_stream(self) -> None:
        """
        A data stream that is valid gzip but not the one ``.PKGINFO``'s
        ``datahash`` names fails, even though ``C:`` matches.
        """
        apk = signed_package()
        other = build_apk(apk.name, apk.version, data_files={"evil": b"payload"})
        content = apk.signature_stream + apk.control_stream + other.data_stream
        entry = attrs.evolve(entry_for(apk), size=len(content))
        reason = mismatch_reason(entry, content)
        self.assertIn("datahash", reason)
        self.assertIn(apk.datahash, reason)

    def test_corrupt_gzip(self) -> None:
        apk = signed_package()
        content = bytearray(apk.content)
        # Inside the compressed body of the data stream: CRC or inflate fails.
        content[apk.signature_length + apk.control_length + 40] ^= 0xFF
        reason = mismatch_reason(entry_for(apk), bytes(content))
        self.assertTrue("corrupt" in reason or "datahash" in reason, reason)

    def test_not_gzip(self) -> None:
        content = b"<html>upstream error page</html>"
        entry = attrs.evolve(entry_for(signed_package()), size=len(content))
        self.assertIn("gzip stream 0 is corrupt", mismatch_reason(entry, content))

    def test_extra_stream_after_data(self) -> None:
        apk = unsigned_package()
        content = apk.content + gzip_tar({"extra": b"x"})
        entry = attrs.evolve(entry_for(apk), size=len(content))
        # Everything after the control stream is the data stream's, which
        # the datahash names.
        self.assertIn("datahash", mismatch_reason(entry, content))

    def test_first_stream_neither_signature_nor_control(self) -> None:
        apk = unsigned_package()
        content = gzip_tar({"README": b"hi"}, end_of_archive=False) + apk.content
        entry = attrs.evolve(entry_for(apk), size=len(content))
        self.assertIn("neither .PKGINFO nor", mismatch_reason(entry, content))

    def test_no_pkginfo_after_signature(self) -> None:
        apk = signed_package()
        content = apk.signature_stream + apk.data_stream
        entry = attrs.evolve(entry_for(apk), size=len(content))
        self.assertIn("no .PKGINFO", mismatch_reason(entry, content))

    def test_oversized_leading_stream_fails_early(self) -> None:
        """
        A leading stream inflating past the control cap (a data stream where
        the control stream should be, or a gzip bomb) is refused as soon as
        the cap is passed, without keeping its contents.
        """
        bomb = gzip_stream(bytes(5_000_000))
        entry = attrs.evolve(entry_for(signed_package()), size=len(bomb))
        verifier = ApkVerifier(entry, max_control_bytes=100_000)
        verifier.update(bomb[: len(bomb) // 2])
        mismatch = verifier.mismatch
        assert mismatch is not None
        self.assertIn("more than 100000 bytes before any .PKGINFO", mismatch.reason)
        verifier.update(bomb[len(bomb) // 2 :])
        self.assertRaises(ApkMismatch, verifier.finish)

    def test_bad_datahash_value(self) -> None:
        pkginfo = b"pkgname = x\npkgver = 1-r0\ndatahash = nothex\n"
        control = gzip_tar({".PKGINFO": pkginfo}, end_of_archive=False)
        content = control + gzip_tar({"f": b"1"})
        entry = attrs.evolve(entry_for(signed_package()), size=len(content))
        self.assertIn("bad .PKGINFO", mismatch_reason(entry, content))

    def test_update_after_finish(self) -> None:
        apk = unsigned_package()
        verifier = ApkVerifier(entry_for(apk))
        verifier.update(apk.content)
        verifier.finish()
        self.assertRaises(RuntimeError, verifier.update, b"x")
        self.assertRaises(RuntimeError, verifier.finish)

    @settings(max_examples=60, deadline=None)
    @given(
        signed=st.booleans(),
        cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=60),
    )
    def test_any_chunking_matches(self, signed: bool, cuts: list[int]) -> None:
        apk = signed_package() if signed else unsigned_package()
        content = apk.content
        verify(entry_for(apk), split_at(content, [cut % (len(content) + 1) for cut in cuts]))

    @settings(max_examples=60, deadline=None)
    @given(
        signed=st.booleans(),
        position=st.integers(min_value=0),
        flip=st.integers(min_value=1, max_value=255),
        cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    )
    def test_any_changed_byte_outside_signature_is_caught(
        self, signed: bool, position: int, flip: int, cuts: list[int]
    ) -> None:
        """
        Changing any byte of the control or data streams is caught, however
        the bytes are chunked.  (The signature stream is apk's to check.)
        """
        apk = signed_package() if signed else unsigned_package()
        content = bytearray(apk.content)
        covered = len(content) - apk.signature_length
        content[apk.signature_length + position % covered] ^= flip
        verifier = ApkVerifier(entry_for(apk))
        for chunk in split_at(bytes(content), [cut % (len(content) + 1) for cut in cuts]):
            verifier.update(chunk)
        self.assertRaises(ApkMismatch, verifier.finish)


class IndexUrlTests(SynchronousTestCase):
    def test_package_url(self) -> None:
        self.assertEqual(
            repository_index_url(
                "http://127.0.0.1:8899/alpine/v3.20/main/x86_64/busybox-1.36.1-r29.apk"
            ),
            "http://127.0.0.1:8899/alpine/v3.20/main/x86_64/APKINDEX.tar.gz",
        )

    def test_query_and_fragment_dropped(self) -> None:
        self.assertEqual(
            repository_index_url("http://h/r/aarch64/a-1-r0.apk?x=1#y"),
            "http://h/r/aarch64/APKINDEX.tar.gz",
        )

    def test_bare_path(self) -> None:
        self.assertEqual(
            repository_index_url("/alpine/edge/community/riscv64/a-1-r0.apk"),
            "/alpine/edge/community/riscv64/APKINDEX.tar.gz",
        )

    def test_not_a_package(self) -> None:
        for url in [
            "http://h/r/x86_64/APKINDEX.tar.gz",
            "http://h/downloads/app-release.apk",
            "http://h/r/x86_64/.apk",
            "http://h/r/x86_64/dir/a-1-r0.apk",
            "x86_64/a-1-r0.apk",
            "http://h/r/x86_64/a-1-r0.apk.sig",
        ]:
            self.assertIsNone(repository_index_url(url), url)

    def test_package_filename(self) -> None:
        self.assertEqual(
            package_filename("http://h/r/x86_64/libstdc%2B%2B-14.2.0-r4.apk"),
            "libstdc++-14.2.0-r4.apk",
        )
        self.assertIsNone(package_filename("http://h/files/app.apk"))


class _CollectUntilClosed(Protocol):
    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed.callback(bytes(self.received))


class RepositoryResourceTests(TestCase):
    """
    :class:`RepositoryResource` over real loopback TCP, as other test modules
    will use it.
    """

    def setUp(self) -> None:
        import treq.client
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool

        self.directory = self.mktemp()
        write_repository(self.directory, [signed_package()], "x86_64", mtime=1_600_000_000)
        self.resource = RepositoryResource(self.directory)
        port, self.base_url = listen_on_loopback(reactor, self.resource)
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        # cast: without the mypy-zope plugin, mypy cannot see that Agent
        # provides IAgent.
        self.client = treq.client.HTTPClient(cast(IAgent, Agent(reactor, pool=pool)))

    def url(self, path: str) -> str:
        return self.base_url + path

    async def get(
        self, path: str, headers: dict[bytes | str, bytes | str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        """
        GET ``path``; the ``content-length`` entry comes from the response's
        length, as Twisted's client keeps connection headers apart.
        """
        import treq

        response = await self.client.get(self.url(path), headers=headers)
        body = await treq.content(response)
        flat = {
            name.decode().lower(): values[0].decode()
            for name, values in response.headers.getAllRawHeaders()
        }
        if isinstance(response.length, int):
            flat["content-length"] = str(response.length)
        return response.code, flat, body

    async def raw_exchange(self, request: bytes) -> tuple[bytes, bytes]:
        """
        Send ``request`` as-is (it must ask for ``Connection: close``) and
        return the raw response head and body, before any client-side
        header handling.
        """
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        port = int(self.base_url.rsplit(":", 1)[1])
        collector = _CollectUntilClosed()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), collector)
        transport: Any = collector.transport
        transport.write(request)
        response = await collector.closed
        head, _, body = response.partition(b"\r\n\r\n")
        return head, body

    def run_async(self, coroutine):  # type: ignore[no-untyped-def]
        return Deferred.fromCoroutine(coroutine)

    def test_serves_bytes_with_validators(self) -> None:
        async def scenario() -> None:
            apk = signed_package()
            code, headers, body = await self.get(f"/x86_64/{apk.filename}")
            self.assertEqual(code, 200)
            self.assertEqual(body, apk.content)
            self.assertEqual(headers["content-length"], str(apk.size))
            self.assertEqual(
                headers["last-modified"], http.datetimeToString(1_600_000_000).decode()
            )
            self.assertIn("etag", headers)
            code, headers, body = await self.get("/x86_64/APKINDEX.tar.gz")
            self.assertEqual(code, 200)
            self.assertIn(apk.filename, parse_apkindex(io.BytesIO(body)))
            self.assertEqual(self.resource.request_counts[f"/x86_64/{apk.filename}"], 1)
            self.assertEqual(self.resource.request_counts["/x86_64/APKINDEX.tar.gz"], 1)

        return self.run_async(scenario())

    def test_conditional_requests(self) -> None:
        async def scenario() -> None:
            path = "/x86_64/APKINDEX.tar.gz"
            code, headers, _ = await self.get(path)
            etag = headers["etag"]
            code, _, body = await self.get(path, {"If-None-Match": etag})
            self.assertEqual((code, body), (304, b""))
            code, _, _ = await self.get(path, {"If-None-Match": '"other"'})
            self.assertEqual(code, 200)
            same_second = http.datetimeToString(1_600_000_000).decode()
            code, _, _ = await self.get(path, {"If-Modified-Since": same_second})
            self.assertEqual(code, 304)
            earlier = http.datetimeToString(1_599_999_999).decode()
            code, _, _ = await self.get(path, {"If-Modified-Since": earlier})
            self.assertEqual(code, 200)
            code, _, _ = await self.get(
                path, {"If-Modified-Since": same_second, "If-None-Match": '"other"'}
            )
            self.assertEqual(code, 200, "If-None-Match takes precedence")
            self.assertEqual(self.resource.request_counts[path], 6)
            self.assertEqual(
                self.resource.requests[1].headers["if-none-match"], etag
            )

        return self.run_async(scenario())

    def test_missing_file_and_forced_status(self) -> None:
        async def scenario() -> None:
            code, _, _ = await self.get("/x86_64/nope-1-r0.apk")
            self.assertEqual(code, 404)
            code, _, _ = await self.get("/x86_64/../x86_64/APKINDEX.tar.gz")
            self.assertEqual(code, 404)
            self.resource.set_status("/x86_64/APKINDEX.tar.gz", 503)
            code, _, _ = await self.get("/x86_64/APKINDEX.tar.gz")
            self.assertEqual(code, 503)
            self.resource.set_status("/x86_64/APKINDEX.tar.gz", None)
            code, _, _ = await self.get("/x86_64/APKINDEX.tar.gz")
            self.assertEqual(code, 200)
            self.assertEqual(self.resource.request_counts["/x86_64/nope-1-r0.apk"], 1)

        return self.run_async(scenario())

    def test_raw_response_headers(self) -> None:
        """
        On the wire: ``Content-Length`` on GET and HEAD, and no
        ``Content-Encoding`` for a ``.tar.gz``.
        """

        async def scenario() -> None:
            index = (Path(self.directory) / "x86_64" / "APKINDEX.tar.gz").read_bytes()
            for method in (b"GET", b"HEAD"):
                head, body = await self.raw_exchange(
                    method + b" /x86_64/APKINDEX.tar.gz HTTP/1.1\r\n"
                    b"Host: 127.0.0.1\r\nUser-Agent: libfetch/2.0\r\n"
                    b"Connection: close\r\n\r\n"
                )
                lines = head.lower().split(b"\r\n")
                self.assertEqual(lines[0], b"http/1.1 200 ok")
                self.assertIn(b"content-length: %d" % len(index), lines)
                self.assertFalse(
                    [line for line in lines if line.startswith(b"content-encoding")]
                )
                self.assertEqual(body, index if method == b"GET" else b"")
            self.assertEqual(
                [request.method for request in self.resource.requests], ["GET", "HEAD"]
            )

        return self.run_async(scenario())

    def test_hold_and_release(self) -> None:
        """
        A held path sends its headers and half its body, then waits for
        :func:`RepositoryResource.release`.
        """

        async def scenario() -> None:
            import treq

            apk = build_apk("slow", "1-r0", data_size_pad=300_000)
            write_repository(self.directory, [apk], "x86_64")
            path = f"/x86_64/{apk.filename}"
            self.resource.hold(path)
            response = await self.client.get(self.url(path))
            received: list[bytes] = []
            half_arrived: Deferred[None] = Deferred()

            def collect(data: bytes) -> None:
                received.append(data)
                if (
                    sum(map(len, received)) >= apk.size // 2
                    and not half_arrived.called
                ):
                    half_arrived.callback(None)

            done = treq.collect(response, collect)
            await half_arrived
            self.assertEqual(sum(map(len, received)), apk.size // 2)
            self.assertFalse(done.called)
            self.resource.release(path)
            await done
            self.assertEqual(b"".join(received), apk.content)

        return self.run_async(scenario())


class StoredIndexTests(SynchronousTestCase):
    """
    :class:`buildcache.ecosystems.apk.check.ApkIndexes` parses a stored index through
    the store's ``run_blocking`` (a thread in the server), once per
    version however many packages ask meanwhile.
    """

    def test_one_parse_off_the_caller_for_concurrent_packages(self) -> None:
        runner = HeldRunner()
        store = Store.open(self.mktemp(), 1 << 24, cast(Any, Clock()), run_blocking=runner)
        store.spare_temp_files = 0
        self.addCleanup(store.close)
        hello, zlib_ = signed_package(), unsigned_package()
        base = "http://mirror.test/alpine/v3.20/main/x86_64"
        writer = store.writer(cache_key(f"{base}/APKINDEX.tar.gz"))
        writer.write(build_apkindex([hello, zlib_]))
        writer.commit({})
        indexes = ApkIndexes(store)
        asked = [
            Deferred.fromCoroutine(indexes.entry_for(f"{base}/{apk.filename}", cache_key))
            for apk in (hello, zlib_, hello)
        ]
        for waiting in asked:
            self.assertNoResult(waiting)
        self.assertEqual(len(runner.calls), 1)
        runner.run_all()
        self.assertEqual(
            [self.successResultOf(d) for d in asked],
            [entry_for(hello).facts, entry_for(zlib_).facts, entry_for(hello).facts],
        )
        # Parsed once: the next package needs no parse.
        again = Deferred.fromCoroutine(indexes.entry_for(f"{base}/{zlib_.filename}", cache_key))
        self.assertEqual(self.successResultOf(again), entry_for(zlib_).facts)
        self.assertEqual(runner.calls, [])
