"""
A cheaper miss (issue 16): the check of an ``.apk`` against its index
hashes its data stream without inflating it, when ``.PKGINFO`` names the
stream's ``datahash``; a package without one is still inflated to find
where its data stream ends.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from buildcache.ecosystems.apk import verify
from buildcache.ecosystems.apk.verify import ApkVerifier
from buildcache.store import BackgroundHashes
from tests.apkrepo import build_apk
from tests.test_apk import entry_for


class DataStreamNotInflatedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.inflated: list[int] = []
        real = verify._GzipMember.feed

        def counting(member: verify._GzipMember, data: bytes | memoryview) -> bytes:
            self.inflated.append(member.index)
            return real(member, data)

        self.patch(verify._GzipMember, "feed", counting)

    def test_data_stream_hashed_not_inflated(self) -> None:
        """
        Only the signature and control streams go through zlib; the
        package, fed in small chunks, passes its check.
        """
        apk = build_apk("big", "1.0-r0", data_size_pad=300_000, pad_seed=3)
        self.assertIsNotNone(apk.datahash)
        verifier = ApkVerifier(entry_for(apk))
        for at in range(0, apk.size, 4096):
            verifier.update(apk.content[at:at + 4096])
        verifier.finish()
        self.assertEqual(set(self.inflated), {0, 1})
        data_start = apk.signature_length + apk.control_length
        # No chunk of the data stream alone was ever inflated.
        self.assertLess(len(self.inflated), data_start // 4096 + 4)

    def test_data_stream_bytes_still_checked(self) -> None:
        """
        A data stream with one byte changed (valid or not as gzip: it is
        never inflated) fails on its datahash.
        """
        apk = build_apk("big", "1.0-r0", data_size_pad=50_000, pad_seed=4)
        content = bytearray(apk.content)
        content[-1000] ^= 0x01
        verifier = ApkVerifier(entry_for(apk))
        verifier.update(bytes(content))
        with self.assertRaises(verify.ApkMismatch) as caught:
            verifier.finish()
        self.assertIn("datahash", caught.exception.reason)

    def test_empty_data_stream(self) -> None:
        apk = build_apk("big", "1.0-r0", data_size_pad=10, pad_seed=5)
        content = apk.signature_stream + apk.control_stream
        entry = attrs.evolve(entry_for(apk), size=len(content))
        verifier = ApkVerifier(entry)
        verifier.update(content)
        with self.assertRaises(verify.ApkMismatch) as caught:
            verifier.finish()
        self.assertIn("no data stream", caught.exception.reason)


class QuietMatchTests(SynchronousTestCase):
    def test_a_match_logs_nothing(self) -> None:
        """
        A package that matches its entry adds no log event (the access
        line says it was served); a mismatch still logs one.
        """
        apk = build_apk("quiet", "1.0-r0", data_size_pad=1000, pad_seed=6)
        entry = entry_for(apk)
        with capturedLogs() as events:
            verifier = ApkVerifier(entry)
            verifier.update(apk.content)
            verifier.finish()
        self.assertEqual(events, [])
        with capturedLogs() as events:
            verifier = ApkVerifier(entry)
            verifier.update(apk.content[:-1] + bytes([apk.content[-1] ^ 1]))
            self.assertRaises(verify.ApkMismatch, verifier.finish)
        self.assertEqual(len(events), 1)


class DataStreamHashedBesideTests(SynchronousTestCase):
    """
    With the store's hash thread, a package's data stream is hashed there
    (beside the reactor), in order, and checked the same.
    """

    def setUp(self) -> None:
        self.hashes = BackgroundHashes()
        self.addCleanup(self.hashes.close)
        self.threads: list[str] = []
        real = BackgroundHashes._run

        def watching(hashes: BackgroundHashes) -> None:
            self.threads.append(threading.current_thread().name)
            real(hashes)

        self.patch(BackgroundHashes, "_run", watching)

    def feed(self, content: bytes, entry: Any) -> ApkVerifier:
        verifier = ApkVerifier(entry, hashes=self.hashes)
        for at in range(0, len(content), 300_000):
            verifier.update(content[at:at + 300_000])
        return verifier

    def test_matching_package_passes(self) -> None:
        apk = build_apk("big", "1.0-r0", data_size_pad=2_000_000, pad_seed=6)
        self.feed(apk.content, entry_for(apk)).finish()
        self.assertEqual(self.threads, ["buildcache-hash"])

    def test_changed_byte_fails(self) -> None:
        apk = build_apk("big", "1.0-r0", data_size_pad=2_000_000, pad_seed=7)
        content = bytearray(apk.content)
        content[-500_000] ^= 0x01
        verifier = self.feed(bytes(content), entry_for(apk))
        with self.assertRaises(verify.ApkMismatch) as caught:
            verifier.finish()
        self.assertIn("datahash", caught.exception.reason)
        self.assertEqual(self.threads, ["buildcache-hash"])
