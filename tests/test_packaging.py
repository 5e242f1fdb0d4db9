"""
Tests for buildcache's packaging: the wheel ships the twistd plugin, the
plugin is found and has no import-time side effects, the installed
``twistd buildcache`` command works from any directory, and the README's test
command is the one CI runs.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile

from twisted.application.service import IServiceMaker
from twisted.plugin import IPlugin, getPlugins
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from buildcache.options import Options

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_INDEX = "http://127.0.0.1:3999/simple"


def _version(distribution: str) -> tuple[int, ...] | None:
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _can_build_wheels() -> bool:
    """
    Whether this Python can build a wheel without build isolation: setuptools
    70.1 and later have bdist_wheel, older ones need the wheel package.
    (Read from metadata: importing setuptools here would fight the distutils
    already imported.)
    """
    setuptools = _version("setuptools")
    if setuptools is None or setuptools < (64,):
        return False
    return setuptools >= (70, 1) or _version("wheel") is not None


def _twistd_command() -> list[str]:
    """
    The twistd command of this Python: its console script when there is one,
    as a user runs it, else the same entry point through the interpreter.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.access(script, os.X_OK):
        return [script]
    return [
        sys.executable,
        "-c",
        "import sys; sys.argv[0] = 'twistd'; "
        "from twisted.scripts.twistd import run; run()",
    ]


def _is_installed(directory: str, environ: dict[str, str]) -> bool:
    """
    Whether buildcache is installed for this Python as seen from
    ``directory``: checked in a subprocess, because in this process the
    source tree (and any egg-info a build left in it) is on sys.path.
    """
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.metadata as m; m.distribution('buildcache')",
        ],
        cwd=directory,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    return result.returncode == 0


def _isolated_environment(home: str) -> dict[str, str]:
    """
    The current environment with defaults pointed inside ``home`` and a local
    PyPI upstream, so a subprocess neither writes to the real home nor reads
    the machine's pip settings.
    """
    environ = dict(os.environ)
    for name in ("PYTHONPATH", "CACHE_DIRECTORY", "XDG_CACHE_HOME"):
        environ.pop(name, None)
    environ.update(
        {"HOME": home, "PIP_INDEX_URL": LOCAL_INDEX, "COLUMNS": "1000"}
    )
    return environ


class WheelTests(SynchronousTestCase):
    def test_wheel_ships_plugin(self) -> None:
        """
        A wheel built from the project holds twisted/plugins/buildcache_plugin.py
        and the buildcache package, and no __init__.py for twisted or
        twisted.plugins (which would shadow Twisted's own).
        """
        if not _can_build_wheels():
            raise self.skipTest(
                "no setuptools>=64 with bdist_wheel (setuptools>=70.1, or wheel) "
                "is installed: "
                "pip install -e '.[test]' brings them"
            )
        # Build from a clean copy: setuptools reuses build/ in the source
        # tree, where files deleted from the project would linger.
        source = os.path.abspath(self.mktemp())
        shutil.copytree(
            REPOSITORY,
            source,
            ignore=shutil.ignore_patterns(
                ".git",
                ".venv",
                "build",
                "dist",
                "*.egg-info",
                "_trial_temp*",
                "__pycache__",
                "dropin.cache",
                "bench",
            ),
        )
        output = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [
                sys.executable, "-m", "pip", "wheel",
                "--no-deps", "--no-build-isolation", "--no-cache-dir", "-q",
                "-w", output, ".",
            ],
            cwd=source,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        self.assertEqual(result.returncode, 0, result.stdout)
        [wheel] = [name for name in os.listdir(output) if name.endswith(".whl")]
        with zipfile.ZipFile(os.path.join(output, wheel)) as archive:
            names = set(archive.namelist())
        self.assertIn("twisted/plugins/buildcache_plugin.py", names)
        self.assertIn("buildcache/__init__.py", names)
        self.assertIn("buildcache/config.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertEqual(
            [name for name in names if name.startswith("tests/")], []
        )


class PluginTests(SynchronousTestCase):
    def test_discovered(self) -> None:
        """
        Twisted's plugin scan finds the buildcache service maker, and it
        provides IServiceMaker with buildcache's Options.
        """
        import twisted.plugins

        makers = [
            maker
            for maker in getPlugins(IServiceMaker, twisted.plugins)
            if maker.tapname == "buildcache"
        ]
        self.assertEqual(len(makers), 1)
        [maker] = makers
        self.assertTrue(verifyObject(IServiceMaker, maker))
        self.assertTrue(IPlugin.providedBy(maker))
        self.assertIs(maker.options, Options)
        self.assertTrue(maker.description)

    def test_no_import_side_effects(self) -> None:
        """
        Importing the plugin module installs no reactor and imports no
        server code.
        """
        script = (
            "import sys\n"
            "import twisted.plugins.buildcache_plugin\n"
            "loaded = sorted(m for m in sys.modules if m == 'twisted.internet.reactor'"
            " or m == 'buildcache.service')\n"
            "print(loaded)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPOSITORY,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.strip(), "[]")


class InstalledCommandTests(SynchronousTestCase):
    """
    ``twistd buildcache``, run from an unrelated directory, as an installed
    package is.
    """

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.environ = _isolated_environment(os.path.join(self.directory, "home"))
        if not _is_installed(self.directory, self.environ):
            raise self.skipTest(
                "buildcache is not installed in this Python: "
                "run pip install -e '.[test]' first"
            )

    def twistd(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_twistd_command(), "buildcache", *arguments],
            cwd=self.directory,
            env=self.environ,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def test_help(self) -> None:
        """
        --help lists every option with its default.
        """
        result = self.twistd("--help")
        self.assertEqual(result.returncode, 0, result.stdout)
        help_text = " ".join(result.stdout.split())
        names = {name.rstrip("=") for name in Options().longOpt} - {"help", "version"}
        for name in names:
            match = re.search(rf"--{name}= (.*?)(?= --[a-z-]+=? |$)", help_text)
            assert match is not None, f"--{name} missing from {help_text!r}"
            self.assertIn("[default: ", match.group(1), name)
        self.assertIn("[default: tcp:8899]", help_text)
        self.assertIn("[default: tcp:3141]", help_text)
        self.assertIn("[default: 10G]", help_text)
        self.assertIn(f"[default: {LOCAL_INDEX}]", help_text)
        cache_dir = os.path.join(self.directory, "home", ".cache", "buildcache")
        self.assertIn(f"[default: {cache_dir}]", help_text)
        self.assertFalse(os.path.exists(cache_dir))

    def test_bad_option(self) -> None:
        """
        A bad value fails with a message naming its option.
        """
        result = self.twistd("--max-size", "ten")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--max-size: 'ten' is not a size", result.stdout)
        self.assertFalse(os.path.exists(os.path.join(self.directory, "twistd.pid")))


class CommandTests(SynchronousTestCase):
    def test_readme_test_command_is_ci(self) -> None:
        """
        The README's test command is, verbatim, the one .ci/run runs.
        """
        with open(os.path.join(REPOSITORY, ".ci", "run")) as f:
            ci = f.read()
        match = re.search(r'^TEST_COMMAND="(.+)"$', ci, re.MULTILINE)
        assert match is not None, 'TEST_COMMAND="..." not found in .ci/run'
        self.assertIn('bash -c "$TEST_COMMAND"', ci)
        with open(os.path.join(REPOSITORY, "README.md")) as f:
            readme = f.read()
        self.assertIn("\n" + match.group(1) + "\n", readme)

    def test_ci_waits_for_the_dpkg_lock(self) -> None:
        """
        Every apt-get in .ci/run waits for a lock another apt-get holds
        instead of failing the run at once.
        """
        with open(os.path.join(REPOSITORY, ".ci", "run")) as f:
            lines = [line.strip() for line in f if line.strip().startswith("apt-get")]
        self.assertTrue(lines)
        with open(os.path.join(REPOSITORY, ".ci", "run")) as f:
            self.assertIn("APT_WAIT=(-o DPkg::Lock::Timeout=600)", f.read())
        for line in lines:
            self.assertTrue(line.startswith('apt-get "${APT_WAIT[@]}" '), line)

    def test_ci_runs_the_static_checks(self) -> None:
        """
        .ci/run fails on a broken import contract or a type error.
        """
        with open(os.path.join(REPOSITORY, ".ci", "run")) as f:
            ci = f.read()
        self.assertIn(".venv/bin/lint-imports --no-cache", ci)
        self.assertIn(".venv/bin/mypy", ci)
        self.assertIn('echo "lint-imports or mypy failed"', ci)
