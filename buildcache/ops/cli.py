"""
The ``buildcache`` administration command: ``stats``, ``purge``, ``verify``
and ``warm``: argument parsing and the report of each.

``stats``, ``purge`` and ``verify`` work on the cache directory whether or
not a server uses it, through the store's offline operations
(:class:`buildcache.store.OfflineIndex`): they never touch ``tmp/``, take
the server's lock only for a moment (to migrate an index of an older
schema that no server holds), and keep every transaction short.  What a
key means to people (:mod:`buildcache.ops.cli_keys`) and the checks
against stored indexes (:mod:`buildcache.ops.cli_verify`) come from the
ecosystems; ``warm`` (:mod:`buildcache.ops.warm`) talks only HTTP to a
running server.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO

from buildcache import __version__
from buildcache.config import DEFAULT_INDEX_PORT, default_cache_dir
from buildcache.ops.cli_keys import (
    KINDS,
    distribution_project,
    entry_kind,
    key_matcher,
)
from buildcache.ops.cli_output import AdminError, Progress, human_size, render_stats
from buildcache.ops.cli_verify import VerifyResult, verify
from buildcache.ops.registry_keys import ImageName, parse_image
from buildcache.ops.warm import (
    DEFAULT_HTTP_TIMEOUT,
    DEFAULT_INDEX,
    DEFAULT_SERVER,
    ServerClient,
    WarmResult,
    default_alpine_arch,
    index_beside,
    resolve_apk_closure,
    warm_apk,
    warm_requirements,
)
from buildcache.store import OfflineIndex, StoreError, collect_stats, purge

__all__ = [
    "AdminError",
    "KINDS",
    "Progress",
    "VerifyResult",
    "WarmResult",
    "distribution_project",
    "entry_kind",
    "human_size",
    "index_beside",
    "key_matcher",
    "main",
    "resolve_apk_closure",
    "verify",
    "warm_apk",
    "warm_requirements",
]


def _parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="buildcache",
        description=(
            "Administer a buildcache cache directory (whether or not the"
            " server is running) and warm a running server."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cache_dir = argparse.ArgumentParser(add_help=False)
    cache_dir.add_argument(
        "--cache-dir", default=default_cache_dir(environ),
        help="the server's cache directory (default: %(default)s)",
    )

    stats = commands.add_parser(
        "stats", parents=[cache_dir], help="entries, size and kinds of what is stored",
    )
    stats.add_argument("--json", action="store_true", help="print JSON for machines")

    purge_command = commands.add_parser(
        "purge", parents=[cache_dir],
        help="remove entries by key glob, project or image name",
        description=(
            "Remove entries whose cache key matches a glob. Keys are upstream"
            " URLs (scheme://host[:port]/path[?query]), as 'stats' lists"
            " them, e.g. '*/alpine/v3.19/*' or '*.apk'; a glob without a"
            " scheme matches http and https alike. The registry's keys are"
            " oci:REGISTRY/REPOSITORY/..., e.g. 'oci:docker.io/library/*'."
        ),
    )
    purge_command.add_argument("patterns", nargs="*", metavar="PATTERN", help="key glob")
    purge_command.add_argument(
        "--project", action="append", default=[], metavar="NAME",
        help="a Python project: its index pages and distribution files (repeatable)",
    )
    purge_command.add_argument(
        "--image", action="append", default=[], metavar="IMAGE",
        help=(
            "a container image of the registry port, named as docker names it:"
            " REGISTRY/REPOSITORY removes the repository (its manifests, tag"
            " lists and referrers; layers are shared by every image, kept as"
            " oci:blobs/DIGEST, and left to the LRU), REPOSITORY:TAG the manifests stored"
            " under that tag (for every client's Accept), REPOSITORY@DIGEST"
            " those of that digest; a name without a registry is on docker.io,"
            " 'alpine' is docker.io/library/alpine (repeatable)"
        ),
    )
    purge_command.add_argument(
        "--dry-run", action="store_true", help="list what would be removed, remove nothing",
    )

    commands.add_parser(
        "verify", parents=[cache_dir],
        help="re-hash every entry, remove the corrupt ones (exit 1 if any)",
    )

    warm = commands.add_parser(
        "warm", help="fetch packages into the cache through a running server",
        description=(
            "Fetch a requirements file's closure (through the server's pip"
            " index) and/or Alpine packages with their dependencies (through"
            " the server's proxy port), so that later builds find them cached."
        ),
    )
    warm.add_argument(
        "--server", type=_http_url, default=DEFAULT_SERVER,
        help="the server's proxy port URL (default: %(default)s)",
    )
    warm.add_argument(
        "--index", type=_http_url, default=None,
        help=(
            "the server's simple index URL (default: port"
            f" {DEFAULT_INDEX_PORT} of --server's host, {DEFAULT_INDEX})"
        ),
    )
    warm.add_argument(
        "--requirements", "-r", action="append", default=[], metavar="FILE",
        help="pip requirements file to resolve and download (repeatable)",
    )
    warm.add_argument(
        "--pip-arg", action="append", default=[], metavar="ARG",
        help="extra argument for pip download, e.g. --pip-arg=--only-binary=:all: (repeatable)",
    )
    warm.add_argument(
        "--python", default=sys.executable,
        help="the interpreter whose pip resolves requirements (default: %(default)s)",
    )
    warm.add_argument("--apk", nargs="+", default=[], metavar="PACKAGE", help="Alpine packages")
    warm.add_argument(
        "--alpine-repo", action="append", default=[], metavar="URL",
        help=(
            "Alpine repository through the server: a mirror-route URL such as"
            f" {DEFAULT_SERVER}/alpine/v3.20/main, a path on the server, or an"
            " http repository reached through the server as a proxy (repeatable)"
        ),
    )
    warm.add_argument(
        "--arch", default=default_alpine_arch(),
        help="Alpine architecture (default: %(default)s)",
    )
    warm.add_argument(
        "--timeout", type=_positive_seconds, default=DEFAULT_HTTP_TIMEOUT,
        help="seconds the server may stay silent (default: %(default)s)",
    )
    return parser


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http:// URL (e.g. {DEFAULT_SERVER})"
        )
    return text


def _positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return seconds


def _run_stats(options: argparse.Namespace, stdout: TextIO) -> int:
    with OfflineIndex.open(options.cache_dir) as index:
        stats = collect_stats(index, KINDS, entry_kind)
    if options.json:
        stdout.write(json.dumps(stats.as_json(), indent=2) + "\n")
    else:
        stdout.write(render_stats(stats))
    return 0


def _run_purge(options: argparse.Namespace, stdout: TextIO) -> int:
    if not options.patterns and not options.project and not options.image:
        raise AdminError("purge needs a PATTERN or --project NAME or --image IMAGE")
    images = _images(options.image)
    for given, image in zip(options.image, images):
        if str(image) != given:
            # "team/app" is docker.io's: say how a short name was read.
            stdout.write(f"--image {given} is {image}\n")
    matches = key_matcher(options.patterns, options.project, images)
    with OfflineIndex.open(options.cache_dir) as index:
        result = purge(index, matches, dry_run=options.dry_run)
    verb = "would remove" if result.dry_run else "removed"
    for row in result.rows:
        stdout.write(f"{verb} {row.key}  {human_size(row.size)}\n")
    summary = "Would remove" if result.dry_run else "Removed"
    freed = "" if result.dry_run else " freed"
    stdout.write(
        f"{summary} {len(result.rows)} {'entry' if len(result.rows) == 1 else 'entries'},"
        f" {human_size(result.bytes)}{freed}"
        f" ({result.bytes} bytes)\n"
    )
    return 0


def _images(names: Sequence[str]) -> list[ImageName]:
    images = []
    for name in names:
        try:
            images.append(parse_image(name))
        except ValueError as error:
            hint = (
                "; for a glob give a PATTERN over the keys, such as"
                " 'oci:docker.io/library/*'" if any(c in name for c in "*?[") else ""
            )
            raise AdminError(f"--image {name!r}: {error}{hint}") from None
    return images


def _run_verify(options: argparse.Namespace, stdout: TextIO, stderr: TextIO) -> int:
    with OfflineIndex.open(options.cache_dir) as index:
        count, size = index.totals(with_digest_only=True)
        progress = Progress.on(stderr, count, size)
        # A line per file only helps on a terminal; a log gets the summary.
        result = verify(index, progress if progress.interactive else None)
        progress.close()
    bodies = result.bodies
    for row, reason in bodies.corrupt:
        stdout.write(f"corrupt, removed: {row.key} ({reason})\n")
    for row in bodies.missing:
        stdout.write(f"file missing, row removed: {row.key}\n")
    for row, reason in result.stale:
        stdout.write(f"disagrees with its index, removed: {row.key} ({reason})\n")
    stdout.write(
        f"Checked {bodies.checked} entries, {human_size(bodies.checked_bytes)}"
        f" ({bodies.checked_bytes} bytes): {len(bodies.corrupt)} corrupt,"
        f" {len(bodies.missing)} missing, {len(result.stale)} disagreeing with"
        f" their index, {bodies.without_digest} without a digest\n"
    )
    return 0 if result.clean else 1



def _run_warm(
    options: argparse.Namespace, stdout: TextIO, stderr: TextIO,
    environ: Mapping[str, str],
) -> int:
    if not options.requirements and not options.apk:
        raise AdminError("warm needs --requirements FILE and/or --apk PACKAGE...")
    if options.apk and not options.alpine_repo:
        raise AdminError(
            "--apk needs --alpine-repo, e.g."
            f" --alpine-repo {DEFAULT_SERVER}/alpine/v3.20/main"
        )
    if options.index is None:
        options.index = index_beside(options.server)
    results: list[WarmResult] = []
    if options.requirements:
        result = warm_requirements(
            options.requirements, options.index, options.pip_arg, options.python,
            stderr, environ,
        )
        stdout.write(
            f"pip: {len(result.fetched)} files, {human_size(result.bytes)} through"
            f" {options.index}\n"
        )
        results.append(result)
    if options.apk:
        client = ServerClient(options.server, options.timeout)
        result = warm_apk(client, options.alpine_repo, options.apk, options.arch, stderr)
        statuses: dict[str, int] = {}
        for _, _, status in result.fetched:
            statuses[status or "unknown"] = statuses.get(status or "unknown", 0) + 1
        described = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
        stdout.write(
            f"apk: {len(result.fetched)} packages, {human_size(result.bytes)}"
            f"{f' ({described})' if described else ''}\n"
        )
        if result.unresolved:
            stderr.write(
                "apk: not resolved (satisfied by packages' provides, which this"
                " command does not read; name the providing packages to warm"
                f" them): {' '.join(result.unresolved)}\n"
            )
        if result.not_found:
            stderr.write(f"apk: no such package in the repositories: {' '.join(result.not_found)}\n")
        results.append(result)
    failed = False
    for result in results:
        for what, reason in result.failed:
            stderr.write(f"failed: {what}: {reason}\n")
        failed = failed or bool(result.failed or result.not_found)
    return 1 if failed else 0


def main(
    argv: Sequence[str] | None = None,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """
    Run the ``buildcache`` command; returns the exit status (0 success, 1
    a check or a warm-up failed, 2 unusable arguments or cache).
    """
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    env = os.environ if environ is None else environ
    parser = _parser(env)
    try:
        options = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 2
    try:
        if options.command == "stats":
            return _run_stats(options, out)
        if options.command == "purge":
            return _run_purge(options, out)
        if options.command == "verify":
            return _run_verify(options, out, err)
        return _run_warm(options, out, err, env)
    except (AdminError, StoreError) as error:
        err.write(f"buildcache {options.command}: {error}\n")
        return 2
    except sqlite3.Error as error:
        err.write(
            f"buildcache {options.command}: the cache index failed: {error}"
            " (run as the user that owns the cache directory, or root)\n"
        )
        return 2
    except KeyboardInterrupt:
        err.write(f"\nbuildcache {options.command}: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
