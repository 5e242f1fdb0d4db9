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

from tests.support import reactor
from tests.test_status import (
    PACKAGE,
    PageParser,
    package_upstream,
    start_status_server,
    step_heights,
)
from buildcache.activity import BUCKETS

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


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """
    Width, height and RGB rows of an 8-bit, non-interlaced RGB or RGBA PNG
    (what Chromium writes).
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
    rows: list[bytes] = []
    previous = bytearray(stride)
    position = 0
    for _ in range(height):
        kind = raw[position]
        line = bytearray(raw[position + 1:position + 1 + stride])
        position += 1 + stride
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            up_left = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 0xFF
            elif kind == 2:
                line[i] = (line[i] + up) & 0xFF
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                estimate = left + up - up_left
                distances = (abs(estimate - left), abs(estimate - up), abs(estimate - up_left))
                predictor = (left, up, up_left)[distances.index(min(distances))]
                line[i] = (line[i] + predictor) & 0xFF
        previous = line
        rgb = bytearray()
        for i in range(0, stride, channels):
            rgb += line[i:i + 3]
        rows.append(bytes(rgb))
    return width, height, rows


def count_colour(rows: list[bytes], colour: tuple[int, int, int]) -> int:
    wanted = bytes(colour)
    return sum(
        1 for row in rows for i in range(0, len(row), 3) if row[i:i + 3] == wanted
    )


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
        page shows the chart's colours.
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
        # Three bodies from the cache, one from upstream, all in the last
        # bucket: the cache line is the higher one (smaller y).
        self.assertLess(cache[-1], upstream[-1])
        self.assertLess(upstream[-1], 1000)
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
        width, height, rows = decode_png(data)
        self.assertEqual((width, height), WINDOW)
        self.assertGreater(len({row for row in rows}), 100, "the screenshot is blank")
        self.assertGreater(count_colour(rows, CACHE_COLOUR), 100)
        self.assertGreater(count_colour(rows, UPSTREAM_COLOUR), 100)
