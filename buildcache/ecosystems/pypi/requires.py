"""
What a client will ask for after reading a distribution's core metadata:
the projects its ``Requires-Dist`` names that apply to that client.

The client's environment (for environment markers, PEP 508) is taken from
the JSON that pip and uv append to their ``User-Agent`` (the "linehaul"
data: Python and implementation versions, system, CPU).  What that JSON
does not say is left empty, so a marker that depends on it is false: a
page nobody asks for crosses the line for nothing, while a page missed
only costs the round trip read-ahead would have saved.  Without that JSON,
only requirements without a marker count.  Requirements that apply only
under an ``extra`` never count: pip asks for an extra's dependencies only
when the extra is requested, which the metadata does not say.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping

from packaging.markers import InvalidMarker, UndefinedComparison
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from buildcache.ecosystems.pypi.model import (
    ProjectFile,
    ProjectPage,
    normalize_project_name,
)

__all__ = [
    "client_environment", "dependencies", "requirements", "best_pure_wheel",
    "MAX_METADATA_BYTES",
]

#: Larger core metadata is not parsed for read-ahead (the headers come
#: first; a long description follows them).
MAX_METADATA_BYTES = 1024 * 1024
#: User-Agent headers longer than this are not parsed.
_MAX_USER_AGENT = 8192

#: ``platform.system()`` to ``sys.platform`` for the systems pip runs on.
_SYS_PLATFORMS = {
    "Linux": "linux", "Darwin": "darwin", "Windows": "win32",
    "FreeBSD": "freebsd", "OpenBSD": "openbsd", "AIX": "aix",
}

#: Every marker variable, empty unless the client said: a marker on an
#: unknown value is false (and never falls back to this server's own
#: environment, which ``packaging`` would use for a missing name).
_UNKNOWN: Mapping[str, str] = {
    name: "" for name in (
        "implementation_name", "implementation_version", "os_name",
        "platform_machine", "platform_release", "platform_system",
        "platform_version", "python_full_version", "platform_python_implementation",
        "python_version", "sys_platform",
    )
}


def _text(value: object) -> str:
    return value if isinstance(value, str) and len(value) < 256 else ""


def client_environment(user_agent: str | None) -> dict[str, str] | None:
    """
    The marker environment of the client that sent ``user_agent``, from
    its JSON part (pip, uv); None when it has none.
    """
    if not user_agent or len(user_agent) > _MAX_USER_AGENT:
        return None
    start = user_agent.find("{")
    if start < 0:
        return None
    try:
        data = json.loads(user_agent[start:])
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    environment = dict(_UNKNOWN)
    python = _text(data.get("python"))
    if python:
        environment["python_full_version"] = python
        environment["python_version"] = ".".join(python.split(".")[:2])
    implementation = data.get("implementation")
    if isinstance(implementation, dict):
        name = _text(implementation.get("name"))
        environment["platform_python_implementation"] = name
        environment["implementation_name"] = name.lower()
        environment["implementation_version"] = _text(implementation.get("version"))
    system = data.get("system")
    if isinstance(system, dict):
        system_name = _text(system.get("name"))
        environment["platform_system"] = system_name
        environment["platform_release"] = _text(system.get("release"))
        environment["sys_platform"] = _SYS_PLATFORMS.get(system_name, "")
        if system_name:
            environment["os_name"] = "nt" if system_name == "Windows" else "posix"
    environment["platform_machine"] = _text(data.get("cpu"))
    return environment


def dependencies(
    metadata: bytes, environment: Mapping[str, str] | None, limit: int,
) -> list[str]:
    """
    The normalised names of the projects ``metadata`` (core metadata, PEP
    566) requires for a client of ``environment`` (see the module
    docstring), in the order given, without duplicates, at most ``limit``.
    Unreadable requirements are skipped.
    """
    return [name for name, _ in requirements(metadata, environment, limit)]


def requirements(
    metadata: bytes, environment: Mapping[str, str] | None, limit: int,
) -> list[tuple[str, str]]:
    """
    As :func:`dependencies`, with each name's version specifier (as
    written, ``""`` for any), the first one given for a name.
    """
    if len(metadata) > MAX_METADATA_BYTES:
        return []
    names: list[str] = []
    found: list[tuple[str, str]] = []
    for line in _requires_dist(metadata):
        if len(names) >= limit:
            break
        if _for_an_extra_only(line):
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement:
            continue
        if requirement.url is not None:
            # Not from an index.
            continue
        marker = requirement.marker
        if marker is not None:
            if environment is None:
                continue
            try:
                # "extra" empty: a requirement of an extra does not apply.
                if not marker.evaluate({**environment, "extra": ""}):
                    continue
            except (InvalidMarker, UndefinedComparison, ValueError, TypeError):
                continue
        name = normalize_project_name(requirement.name)
        if name not in names:
            names.append(name)
            found.append((name, str(requirement.specifier)))
    return found


#: A marker comparing ``extra`` with a named extra (either way round).
_EXTRA_NAMED = re.compile(
    r"""\bextra\s*==\s*(['"])[^'"]+\1|(['"])[^'"]+\2\s*==\s*extra\b"""
)
_OR = re.compile(r"\bor\b")


def _for_an_extra_only(line: str) -> bool:
    """
    Whether the requirement ``line`` applies only under a named extra:
    its marker requires ``extra == "name"`` in a conjunction (no ``or``),
    so it is false for a client that asked for no extra.  Most
    ``Requires-Dist`` lines are of this kind; telling them by their text
    skips parsing them (the marker of any other line is evaluated).
    """
    _, semicolon, marker = line.partition(";")
    return bool(semicolon) and bool(_EXTRA_NAMED.search(marker)) and not _OR.search(marker)


def _requires_dist(metadata: bytes) -> Iterator[str]:
    """
    The ``Requires-Dist`` values of core metadata's header block (RFC 822
    style: it ends at the first empty line or at a line that is no header;
    an indented line continues the header before it).
    """
    text = metadata.decode("utf-8", "surrogateescape")
    current: list[str] | None = None
    for line in text.splitlines():
        if line[:1] in (" ", "\t"):
            if current is not None:
                current.append(line.strip())
            continue
        if current is not None:
            yield " ".join(current)
            current = None
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            # The empty line before the description, or no header.
            return
        if name.lower() == "requires-dist":
            current = [value.strip()]
    if current is not None:
        yield " ".join(current)


def _version(file: ProjectFile) -> Version | None:
    try:
        if file.filename.endswith(".whl"):
            return parse_wheel_filename(file.filename)[1]
        return parse_sdist_filename(file.filename)[1]
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None


def best_pure_wheel(page: ProjectPage, specifier: str, python: str) -> ProjectFile | None:
    """
    The file of ``page`` whose core metadata pip (running ``python``, a
    full version) reads first for a requirement of ``specifier``, when
    that is certain: the newest version that ``specifier`` and its files'
    ``Requires-Python`` allow (not yanked; pre-releases only as
    ``specifier`` allows them) has exactly one wheel, a pure one
    (``none-any``), with core metadata.  None otherwise (platform wheels:
    which one pip picks depends on tags not known here).
    """
    try:
        wanted = SpecifierSet(specifier)
        running = Version(python)
    except (InvalidSpecifier, InvalidVersion):
        return None
    # As pip: pre-releases only when the specifier names one.
    prereleases = bool(wanted.prereleases)
    by_version: dict[Version, list[ProjectFile]] = {}
    for file in page.files:
        if file.is_yanked:
            continue
        version = _version(file)
        if version is None or not wanted.contains(version, prereleases=prereleases):
            continue
        if file.requires_python:
            try:
                if not SpecifierSet(file.requires_python).contains(running, prereleases=True):
                    continue
            except InvalidSpecifier:
                continue
        by_version.setdefault(version, []).append(file)
    if not by_version:
        return None
    files = by_version[max(by_version)]
    wheels = [file for file in files if file.filename.endswith(".whl")]
    if len(wheels) != 1 or not wheels[0].filename.endswith("-none-any.whl"):
        return None
    wheel = wheels[0]
    return wheel if wheel.has_core_metadata else None
