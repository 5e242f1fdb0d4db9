"""
The status page in a real browser: headless Chromium loads the page of a
running server after some cached traffic; the test asserts on the DOM it
rendered and on a screenshot it took (kept in the test's temp directory).
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from buildcache.ops.activity import BUCKETS
from tests.support import reactor
from tests.test_status import (
    PACKAGE,
    PageParser,
    package_upstream,
    start_status_server,
    step_heights,
)

CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)
WINDOW = (1280, 1600)
#: The page's colours of the two series (CSS --cache and --upstream).
CACHE_COLOUR = (0x1A, 0x9E, 0x63)
UPSTREAM_COLOUR = (0xD9, 0x82, 0x2B)


def decode_png(data: bytes) -> tuple[int, int, int, list[bytes]]:
    """
    Width, height, bytes per pixel and unfiltered rows of an 8-bit,
    non-interlaced RGB or RGBA PNG (what Chromium writes).
    """
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    offset = 8
    compressed = b""
    width = height = channels = 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        kind = data[offset + 4:offset + 8]
        chunk = data[offset + 8:offset + 8 + length]
        offset += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour_type, _, _, interlace = struct.unpack(
                ">IIBBBBB", chunk
            )
            if depth != 8 or colour_type not in (2, 6) or interlace:
                raise ValueError(f"unsupported PNG: depth {depth}, type {colour_type}")
            channels = 3 if colour_type == 2 else 4
        elif kind == b"IDAT":
            compressed += chunk
        elif kind == b"IEND":
            break
    raw = zlib.decompress(compressed)
    stride = width * channels
    if len(raw) != height * (stride + 1):
        raise ValueError(f"{len(raw)} bytes of pixel data for {width}x{height}")
    # "Up" rows, the most common, are a bytewise sum without carries: done
    # on whole rows as integers, which keeps the decoder fast enough.
    low = int.from_bytes(b"\x7f" * stride, "big")
    high = int.from_bytes(b"\x80" * stride, "big")
    previous = bytes(stride)
    rows: list[bytes] = []
    position = 0
    for _ in range(height):
        filter_type = raw[position]
        line = raw[position + 1:position + 1 + stride]
        position += 1 + stride
        if filter_type == 2:
            x = int.from_bytes(line, "big")
            y = int.from_bytes(previous, "big")
            line = (((x & low) + (y & low)) ^ ((x ^ y) & high)).to_bytes(stride, "big")
        elif filter_type in (1, 3, 4):
            line = _unfilter(filter_type, bytearray(line), previous, channels)
        elif filter_type != 0:
            raise ValueError(f"unknown PNG filter {filter_type}")
        previous = line
        rows.append(line)
    return width, height, channels, rows


def _unfilter(filter_type: int, out: bytearray, up: bytes, channels: int) -> bytes:
    stride = len(out)
    if filter_type == 1:
        for i in range(channels, stride):
            out[i] = (out[i] + out[i - channels]) & 0xFF
    elif filter_type == 3:
        for i in range(stride):
            left = out[i - channels] if i >= channels else 0
            out[i] = (out[i] + (left + up[i]) // 2) & 0xFF
    else:
        for i in range(channels):
            out[i] = (out[i] + up[i]) & 0xFF
        for i in range(channels, stride):
            a, b, c = out[i - channels], up[i], up[i - channels]
            pa = b - c if b > c else c - b
            pb = a - c if a > c else c - a
            pc = abs(a + b - c - c)
            out[i] = (out[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
    return bytes(out)


def count_colour(rows: list[bytes], channels: int, colour: tuple[int, int, int]) -> int:
    """
    How many pixels of ``rows`` have exactly ``colour``.
    """
    wanted = bytes(colour)
    found = 0
    for row in rows:
        start = row.find(wanted)
        while start >= 0:
            if start % channels == 0:
                found += 1
            start = row.find(wanted, start + 1)
    return found


class BrowserTests(TestCase):
    """
    The page as Chromium renders it.
    """

    if CHROMIUM is None:
        skip = (
            "headless Chromium is not installed: install Debian's chromium"
            " package (.ci/run does) to run the browser test"
        )

    timeout = 120

    async def chromium(self, profile: str, *arguments: str) -> bytes:
        assert CHROMIUM is not None
        environment = dict(os.environ, HOME=profile)
        out, err, code = await getProcessOutputAndValue(
            CHROMIUM,
            (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments),
            env=environment,
            reactor=reactor,
        )
        self.assertEqual(code, 0, f"chromium failed:\n{err.decode(errors='replace')}")
        return out

    async def test_status_page_rendered(self) -> None:
        """
        After a miss and three hits Chromium shows a 75% hit ratio and the
        traffic chart with both series, and a full-size screenshot of the
        page is painted in the chart's colours.
        """
        status = start_status_server(self, package_upstream())
        for _ in range(4):
            await status.get(PACKAGE)
        url = status.status_url("/")
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)

        dom = await self.chromium(profile, "--dump-dom", url)
        page = PageParser()
        page.feed(dom.decode("utf-8"))
        page.close()
        self.assertEqual(page.text("hit-ratio"), "Hit ratio: 75.0%")
        self.assertEqual(page.by_id["traffic-chart"][0], "svg")
        cache = step_heights(page.attribute("chart-from-cache", "d"))
        upstream = step_heights(page.attribute("chart-from-upstream", "d"))
        self.assertEqual(len(cache), BUCKETS)
        # Three bodies from the cache, one from upstream, in the last
        # bucket or, when a 5-minute bucket turned meanwhile, the last two
        # (so at least two cache bodies in one): the cache line's peak is
        # the higher one (smaller y).
        self.assertLess(min(cache[-2:]), min(upstream[-2:]))
        self.assertLess(min(upstream[-2:]), 1000)
        self.assertEqual(cache[:-2], upstream[:-2])
        self.assertIn("curl-8.5.0-r0.apk", page.text("top-mirror"))

        screenshot = os.path.join(os.path.abspath(self.mktemp()), "status.png")
        os.makedirs(os.path.dirname(screenshot))
        await self.chromium(
            profile,
            f"--screenshot={screenshot}",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            url,
        )
        self.assertTrue(os.path.exists(screenshot), "no screenshot written")
        with open(screenshot, "rb") as file:
            data = file.read()
        self.assertGreater(len(data), 20_000)
        width, height, channels, rows = decode_png(data)
        self.assertEqual((width, height), WINDOW)
        self.assertGreater(len(set(rows)), 100, "the screenshot is blank")
        # The page's CSS coloured the chart: its legend swatches alone are
        # 12 by 12 pixels of each series' colour.
        self.assertGreaterEqual(count_colour(rows, channels, CACHE_COLOUR), 144)
        self.assertGreaterEqual(count_colour(rows, channels, UPSTREAM_COLOUR), 144)
