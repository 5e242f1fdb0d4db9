"""
What the ``buildcache`` command shows people: its error, sizes in binary
units, the ``stats`` report, and a progress display for batches of files.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from typing import TextIO

from attrs import Factory, define

from buildcache.store import CacheStats


class AdminError(Exception):
    """
    The command cannot do what was asked; the message says why and what
    to do.
    """



def human_size(size: float) -> str:
    """
    ``size`` bytes in binary units for people: ``"512 B"``, ``"1.5 MiB"``.
    """
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def render_stats(stats: CacheStats) -> str:
    lines = [
        f"Cache directory  {stats.cache_dir}",
        f"Entries          {stats.entries}",
        f"Stored           {human_size(stats.bytes)} ({stats.bytes} bytes,"
        f" {stats.metadata_bytes} of them index rows)",
    ]
    if stats.oldest is not None and stats.newest is not None:
        lines += [
            f"Oldest entry     {_timestamp(stats.oldest.fetched_at)}  {stats.oldest.key}",
            f"Newest entry     {_timestamp(stats.newest.fetched_at)}  {stats.newest.key}",
        ]
    lines += ["", f"{'Kind':<8} {'entries':>9} {'stored':>11}"]
    for kind, total in stats.kinds.items():
        lines.append(f"{kind:<8} {total.entries:>9} {human_size(total.bytes):>11}")
    if stats.largest:
        lines += ["", "Largest entries"]
        lines += [f"{human_size(row.size):>11}  {row.key}" for row in stats.largest]
    return "\n".join(lines) + "\n"


@define
class Progress:
    """
    Progress of a batch of files on a text stream.

    On a terminal, one bar redrawn in place (``\\r``) at most ten times a
    second; otherwise (a log, a CI job) one line per finished file.
    """

    stream: TextIO
    total_files: int
    total_bytes: int
    interactive: bool
    files_done: int = 0
    bytes_done: int = 0
    current: str = ""
    _drawn_at: float = 0.0
    _width: int = Factory(lambda: shutil.get_terminal_size((80, 24)).columns)

    @classmethod
    def on(cls, stream: TextIO, total_files: int, total_bytes: int) -> Progress:
        try:
            interactive = stream.isatty()
        except (AttributeError, ValueError):
            interactive = False
        return cls(stream, total_files, total_bytes, interactive)

    def start(self, name: str) -> None:
        self.current = name
        self._draw(force=True)

    def advance(self, count: int) -> None:
        self.bytes_done += count
        self._draw()

    def finished(self, name: str, size: int, note: str = "") -> None:
        self.files_done += 1
        if self.interactive:
            self._draw(force=True)
        else:
            suffix = f"  {note}" if note else ""
            self.stream.write(
                f"[{self.files_done}/{self.total_files}] {name}  {human_size(size)}{suffix}\n"
            )
            self.stream.flush()

    def close(self) -> None:
        if self.interactive and self.total_files:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, force: bool = False) -> None:
        if not self.interactive:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < 0.1:
            return
        self._drawn_at = now
        fraction = min(self.bytes_done / self.total_bytes, 1.0) if self.total_bytes else 1.0
        bar_width = 24
        filled = int(fraction * bar_width)
        line = (
            f"[{'#' * filled}{'.' * (bar_width - filled)}] {fraction * 100:3.0f}%"
            f"  {self.files_done}/{self.total_files}"
            f"  {human_size(self.bytes_done)}/{human_size(self.total_bytes)}"
            f"  {self.current}"
        )
        width = max(self._width - 1, 20)
        self.stream.write("\r" + line[:width].ljust(width))
        self.stream.flush()
