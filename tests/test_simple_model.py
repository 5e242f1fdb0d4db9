"""
Tests for :func:`buildcache.ecosystems.pypi.model` and the :func:`tests.pyindex` fixture.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from base64 import urlsafe_b64encode
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.server import Site

from buildcache.ecosystems.pypi.model import (
    MEDIA_TYPE_HTML,
    MEDIA_TYPE_JSON,
    MEDIA_TYPE_LEGACY_HTML,
    UPSTREAM_ACCEPT,
    Hashes,
    ProjectFile,
    ProjectPage,
    SimplePageError,
    is_valid_project_name,
    normalize_project_name,
)
from buildcache.ecosystems.pypi.parse import (
    parse_html_page,
    parse_json_page,
    parse_page,
)
from buildcache.ecosystems.pypi.render import (
    choose_media_type,
    render_html,
    render_json,
    render_page,
    render_root_html,
    render_root_json,
)
from tests.pyindex import IndexFixture, StaticSimpleIndex, build_index

PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html; q=0.1, text/html; q=0.01"
)
UV_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html; q=0.2, text/html; q=0.01"
)
BROWSER_ACCEPT = (
    "text/html,application/xhtml+xml,application/xml;q=0.9,"
    "image/avif,image/webp,*/*;q=0.8"
)

PAGE_URL = "http://127.0.0.1:9/simple/demo/"
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_M = "c" * 64

UPSTREAM_JSON = json.dumps(
    {
        "meta": {"api-version": "1.1", "_last-serial": 42},
        "name": "demo",
        "versions": ["1.0", "2.0"],
        "files": [
            {
                "filename": "demo-1.0.tar.gz",
                "url": "../../packages/demo-1.0.tar.gz",
                "hashes": {"sha256": SHA_A},
                "requires-python": "<4,>=3.8",
                "yanked": "broken \"quoted\" & <odd>",
                "size": 100,
                "upload-time": "2024-01-01T00:00:00.000000Z",
            },
            {
                "filename": "demo-2.0-py3-none-any.whl",
                "url": "http://127.0.0.2/files/demo-2.0-py3-none-any.whl",
                "hashes": {"sha256": SHA_B, "md5": "d" * 32},
                "core-metadata": {"sha256": SHA_M},
                "dist-info-metadata": {"sha256": SHA_M},
                "yanked": True,
                "size": 200,
                "upload-time": "2024-01-02T00:00:00.000000Z",
            },
            {
                "filename": "demo-2.0.tar.gz",
                "url": "/abs/demo-2.0.tar.gz#sha256=ignored",
                "hashes": {},
                "dist-info-metadata": True,
                "yanked": False,
                "size": 300,
            },
        ],
    }
).encode()

UPSTREAM_HTML = f"""<!DOCTYPE html>
<html>
  <head>
    <meta name="pypi:repository-version" content="1.0">
    <base href="../../mirror/">
    <title>Links for demo</title>
  </head>
  <body>
    <h1>Links for demo</h1>
    <a href="demo-1.0.tar.gz#sha256={SHA_A}" data-requires-python="&lt;4,&gt;=3.8" data-yanked="">demo-1.0.tar.gz</a><br/>
    <a href="/x/demo-2.0-py3-none-any.whl#md5=ddd&amp;sha256={SHA_B}" data-core-metadata="sha256={SHA_M}" data-dist-info-metadata="true" data-yanked="bad &amp; &quot;quoted&quot;">demo-2.0-py3-none-any.whl</a><br/>
    <a href="http://127.0.0.2/demo-2.0.tar.gz" data-dist-info-metadata="true" data-yanked>demo-2.0.tar.gz</a>
    <a href="demo%2B1.0-3.0.zip">demo+1.0-3.0.zip</a>
    <a>no href</a>
    <a href="../evil/..">..</a>
  </body>
</html>
<!--SERIAL 77-->
""".encode()


def same_link(file: ProjectFile) -> str:
    return file.url


def strongest_hash_only(page: ProjectPage) -> ProjectPage:
    """
    ``page`` as HTML can carry it: one hash per link fragment.
    """

    def reduce(file: ProjectFile) -> ProjectFile:
        preferred = file.hashes.preferred()
        return attrs.evolve(file, hashes=[] if preferred is None else [preferred])

    return attrs.evolve(page, files=[reduce(f) for f in page.files])


class ProjectNameTests(SynchronousTestCase):
    def test_normalize(self) -> None:
        cases = {
            "Django": "django",
            "foo.bar_baz": "foo-bar-baz",
            "Foo__Bar--.baz": "foo-bar-baz",
            "zope.interface": "zope-interface",
            "a": "a",
        }
        for name, expected in cases.items():
            self.assertEqual(normalize_project_name(name), expected, name)

    def test_validity(self) -> None:
        for name in ["a", "A1", "foo-bar", "foo.bar_Baz", "0x"]:
            self.assertTrue(is_valid_project_name(name), name)
        for name in ["", "-foo", "foo-", "foo bar", "foo/bar", "..", "fo\u00f6", "_x"]:
            self.assertFalse(is_valid_project_name(name), name)

    def test_validity_guard_before_packaging(self) -> None:
        """
        A name that is not printable ASCII is refused before packaging is
        asked: an older packaging (setup.cfg allows 23.2) validated with
        ``re.match``, which accepts "numpy\\n", and without ``re.ASCII``.
        """
        from buildcache.ecosystems.pypi import model

        def lenient(name: str, validate: bool = False) -> str:
            return name.lower()

        self.patch(model, "canonicalize_name", lenient)
        self.assertTrue(is_valid_project_name("numpy"))
        for name in ["numpy\n", "numpy\t", "\u212aelvin", "num\u0131py", "caf\u00e9"]:
            self.assertFalse(is_valid_project_name(name), repr(name))


class ModelTests(SynchronousTestCase):
    def test_hashes_mapping(self) -> None:
        hashes = Hashes({"SHA256": SHA_A, "md5": "d"})
        self.assertEqual(hashes, {"sha256": SHA_A, "md5": "d"})
        self.assertEqual(hash(hashes), hash(Hashes([("md5", "d"), ("sha256", SHA_A)])))
        self.assertEqual(hashes["sha256"], SHA_A)
        self.assertEqual(hashes.preferred(), ("sha256", SHA_A))
        self.assertEqual(Hashes({"md5": "d"}).preferred(), ("md5", "d"))
        self.assertIsNone(Hashes({"blake3": "x"}).preferred())
        self.assertRaises(KeyError, hashes.__getitem__, "sha512")

    def test_file_conversions(self) -> None:
        file = ProjectFile(
            "x.whl", "http://127.0.0.1/x.whl", {"sha256": SHA_A}, yanked="", core_metadata={}
        )
        self.assertEqual(file.yanked, True)
        self.assertTrue(file.is_yanked)
        self.assertIsNone(file.yanked_reason)
        self.assertIs(file.core_metadata, True)
        self.assertEqual(file.core_metadata_hashes, {})
        self.assertEqual(file.sha256, SHA_A)
        self.assertEqual(file.metadata_url, "http://127.0.0.1/x.whl.metadata")
        reasoned = attrs.evolve(file, yanked="why", core_metadata={"sha256": SHA_M})
        self.assertEqual(reasoned.yanked_reason, "why")
        self.assertEqual(reasoned.core_metadata_hashes, {"sha256": SHA_M})
        hash(reasoned)

    def test_unsafe_filenames_refused(self) -> None:
        for name in ["", ".", "..", "a/b", "a\\b", "a\x00b", "a\nb"]:
            self.assertRaises(ValueError, ProjectFile, name, "http://127.0.0.1/x")

    def test_file_named(self) -> None:
        first = ProjectFile("x.whl", "http://127.0.0.1/1/x.whl")
        page = ProjectPage("x", [first, ProjectFile("x.whl", "http://127.0.0.1/2/x.whl")])
        self.assertIs(page.file_named("x.whl"), first)
        self.assertIsNone(page.file_named("y.whl"))


class ParseJsonTests(SynchronousTestCase):
    def test_fields(self) -> None:
        page = parse_json_page(UPSTREAM_JSON, PAGE_URL)
        self.assertEqual(page.name, "demo")
        self.assertEqual(page.versions, ("1.0", "2.0"))
        self.assertEqual(page.api_version, "1.1")
        self.assertEqual(page.last_serial, 42)
        sdist, wheel, other = page.files
        self.assertEqual(
            sdist,
            ProjectFile(
                filename="demo-1.0.tar.gz",
                url="http://127.0.0.1:9/packages/demo-1.0.tar.gz",
                hashes={"sha256": SHA_A},
                requires_python="<4,>=3.8",
                yanked='broken "quoted" & <odd>',
                size=100,
                upload_time="2024-01-01T00:00:00.000000Z",
            ),
        )
        self.assertEqual(wheel.url, "http://127.0.0.2/files/demo-2.0-py3-none-any.whl")
        self.assertEqual(wheel.core_metadata, {"sha256": SHA_M})
        self.assertIs(wheel.yanked, True)
        self.assertEqual(wheel.hashes, {"sha256": SHA_B, "md5": "d" * 32})
        # The fragment is dropped; dist-info-metadata is the PEP 714 fallback.
        self.assertEqual(other.url, "http://127.0.0.1:9/abs/demo-2.0.tar.gz")
        self.assertIs(other.core_metadata, True)
        self.assertIs(other.yanked, False)
        self.assertIsNone(other.upload_time)

    def test_minimal(self) -> None:
        page = parse_json_page(
            b'{"meta": {"api-version": "1.0"}, "name": "x", "files": '
            b'[{"filename": "x-1.whl", "url": "x-1.whl"}]}',
            "http://127.0.0.1/simple/x/",
        )
        self.assertEqual(page.files[0].hashes, {})
        self.assertIs(page.files[0].core_metadata, False)
        self.assertIsNone(page.versions)
        self.assertEqual(page.files[0].url, "http://127.0.0.1/simple/x/x-1.whl")

    def test_missing_name_taken_from_url(self) -> None:
        page = parse_json_page(b'{"files": []}', "http://127.0.0.1/simple/Foo_Bar/")
        self.assertEqual(page.name, "foo-bar")
        self.assertEqual(page.api_version, "1.0")

    def test_unsafe_file_skipped(self) -> None:
        page = parse_json_page(
            b'{"name": "x", "files": [{"filename": "../x.whl", "url": "x.whl"},'
            b' {"filename": "ok.whl", "url": "ok.whl"}]}',
            PAGE_URL,
        )
        self.assertEqual([f.filename for f in page.files], ["ok.whl"])

    def test_garbage(self) -> None:
        bad: list[Any] = [
            b"not json",
            b"\xff\xfe\x00",
            b"[]",
            {"name": "x"},
            {"name": "x", "files": "nope"},
            {"name": "x", "files": ["nope"]},
            {"name": "x", "files": [{"filename": "a.whl"}]},
            {"name": "x", "files": [{"filename": "a.whl", "url": "a", "hashes": []}]},
            {"name": "x", "files": [{"filename": "a.whl", "url": "a", "hashes": {"sha256": 1}}]},
            {"name": "x", "files": [{"filename": "a.whl", "url": "a", "size": True}]},
            {"name": "x", "files": [{"filename": "a.whl", "url": "a", "size": -1}]},
            {"name": "x", "files": [{"filename": "a.whl", "url": "a", "yanked": 1}]},
            {"name": "x", "files": [{"filename": "a.whl", "url": "a", "core-metadata": "yes"}]},
            {"name": "x", "files": [{"filename": "a.whl", "url": "a", "requires-python": 3}]},
            {"name": "x", "files": [], "versions": "1.0"},
            {"name": 3, "files": []},
            {"meta": {"api-version": "2.0"}, "name": "x", "files": []},
            {"meta": "1.0", "name": "x", "files": []},
        ]
        for document in bad:
            data = document if isinstance(document, bytes) else json.dumps(document).encode()
            self.assertRaises(SimplePageError, parse_json_page, data, PAGE_URL)


class ParseHtmlTests(SynchronousTestCase):
    def test_fields(self) -> None:
        page = parse_html_page(UPSTREAM_HTML, PAGE_URL)
        self.assertEqual(page.name, "demo")
        self.assertEqual(page.last_serial, 77)
        self.assertEqual(page.api_version, "1.0")
        self.assertIsNone(page.versions)
        first, second, third, fourth = page.files
        # <base href> is itself relative to the page URL.
        self.assertEqual(
            first,
            ProjectFile(
                filename="demo-1.0.tar.gz",
                url="http://127.0.0.1:9/mirror/demo-1.0.tar.gz",
                hashes={"sha256": SHA_A},
                requires_python="<4,>=3.8",
                yanked=True,
            ),
        )
        self.assertEqual(second.url, "http://127.0.0.1:9/x/demo-2.0-py3-none-any.whl")
        self.assertEqual(second.hashes, {"sha256": SHA_B, "md5": "ddd"})
        # data-core-metadata wins over the legacy attribute.
        self.assertEqual(second.core_metadata, {"sha256": SHA_M})
        self.assertEqual(second.yanked, 'bad & "quoted"')
        self.assertEqual(third.url, "http://127.0.0.2/demo-2.0.tar.gz")
        self.assertIs(third.core_metadata, True)
        self.assertIs(third.yanked, True)
        self.assertEqual(third.hashes, {})
        # The file name is the unquoted last path segment of the link.
        self.assertEqual(fourth.filename, "demo+1.0-3.0.zip")
        self.assertIs(fourth.yanked, False)
        self.assertIs(fourth.core_metadata, False)

    def test_explicit_name_and_no_base(self) -> None:
        page = parse_html_page(
            b'<a href="f-1.whl">f-1.whl</a>', "http://127.0.0.1/s/other/", name="f"
        )
        self.assertEqual(page.name, "f")
        self.assertEqual(page.files[0].url, "http://127.0.0.1/s/other/f-1.whl")

    def test_empty_project(self) -> None:
        page = parse_html_page(b"<html><body></body></html>", PAGE_URL)
        self.assertEqual(page.files, ())

    def test_core_metadata_values(self) -> None:
        cases = {
            'data-core-metadata="true"': True,
            'data-core-metadata="SHA256=abc"': {"sha256": "abc"},
            'data-core-metadata="junk"': True,
            'data-dist-info-metadata="sha256=abc"': {"sha256": "abc"},
            "": False,
        }
        for attribute, expected in cases.items():
            page = parse_html_page(
                f'<a href="x.whl" {attribute}>x.whl</a>'.encode(), PAGE_URL
            )
            self.assertEqual(page.files[0].core_metadata, expected, attribute)

    def test_garbage(self) -> None:
        for data in [
            b"\xff\xfe<a>",
            b"just some text",
            b"",
            b'{"files": []}',
            b'<meta name="pypi:repository-version" content="2.0"><a href="x">x</a>',
        ]:
            self.assertRaises(SimplePageError, parse_html_page, data, PAGE_URL)

    def test_charset(self) -> None:
        page = parse_page(
            '<a href="x.whl" data-yanked="caf\u00e9">x.whl</a>'.encode("latin-1"),
            b"text/html; charset=ISO-8859-1",
            PAGE_URL,
        )
        self.assertEqual(page.files[0].yanked, "caf\u00e9")


class ParsePageTests(SynchronousTestCase):
    def test_dispatch(self) -> None:
        self.assertEqual(
            parse_page(UPSTREAM_JSON, MEDIA_TYPE_JSON, PAGE_URL),
            parse_json_page(UPSTREAM_JSON, PAGE_URL),
        )
        html_types: list[bytes | str] = [MEDIA_TYPE_HTML, "Text/HTML; charset=utf-8", b"text/html"]
        for content_type in html_types:
            self.assertEqual(
                parse_page(UPSTREAM_HTML, content_type, PAGE_URL),
                parse_html_page(UPSTREAM_HTML, PAGE_URL),
            )
        for other_type in ["application/json", None, "text/plain"]:
            self.assertRaises(
                SimplePageError, parse_page, UPSTREAM_JSON, other_type, PAGE_URL
            )


def anchors(html: bytes) -> list[tuple[str, str]]:
    return re.findall(r'<a href="([^"]*)"[^>]*>([^<]*)</a>', html.decode())


class RenderTests(SynchronousTestCase):
    def test_json_round_trip(self) -> None:
        page = parse_json_page(UPSTREAM_JSON, PAGE_URL)
        rendered = render_json(page, same_link)
        self.assertEqual(parse_json_page(rendered, "http://127.0.0.3/elsewhere/"), page)

    def test_html_round_trip(self) -> None:
        page = parse_html_page(UPSTREAM_HTML, PAGE_URL)
        rendered = render_html(page, same_link)
        self.assertEqual(parse_html_page(rendered, PAGE_URL), strongest_hash_only(page))
        again = render_html(parse_html_page(rendered, PAGE_URL), same_link)
        self.assertEqual(again, rendered)

    def test_json_to_html(self) -> None:
        page = parse_json_page(UPSTREAM_JSON, PAGE_URL)
        rendered = render_html(page, same_link)
        expected = attrs.evolve(
            strongest_hash_only(page),
            versions=None,
            api_version="1.1",
            files=[
                attrs.evolve(f, size=None, upload_time=None)
                for f in strongest_hash_only(page).files
            ],
        )
        self.assertEqual(parse_html_page(rendered, PAGE_URL), expected)

    def test_html_to_json(self) -> None:
        page = parse_html_page(UPSTREAM_HTML, PAGE_URL)
        self.assertEqual(parse_json_page(render_json(page, same_link), PAGE_URL), page)

    def test_links_replaced_and_resolved(self) -> None:
        page = parse_json_page(UPSTREAM_JSON, PAGE_URL)

        def relative(file: ProjectFile) -> str:
            return f"../../files/demo/{file.filename}"

        served_at = "http://10.0.0.1:3141/simple/demo/"
        html = render_html(page, relative)
        self.assertEqual(
            anchors(html),
            [
                (f"../../files/demo/demo-1.0.tar.gz#sha256={SHA_A}", "demo-1.0.tar.gz"),
                (
                    f"../../files/demo/demo-2.0-py3-none-any.whl#sha256={SHA_B}",
                    "demo-2.0-py3-none-any.whl",
                ),
                ("../../files/demo/demo-2.0.tar.gz", "demo-2.0.tar.gz"),
            ],
        )
        from_html = parse_html_page(html, served_at)
        from_json = parse_json_page(render_json(page, relative), served_at)
        for reparsed in [from_html, from_json]:
            self.assertEqual(
                [f.url for f in reparsed.files],
                [f"http://10.0.0.1:3141/files/demo/{f.filename}" for f in page.files],
            )
        # HTML fragments hold one hash, the strongest; JSON keeps them all.
        self.assertEqual(
            [f.hashes for f in from_html.files],
            [{"sha256": SHA_A}, {"sha256": SHA_B}, {}],
        )
        self.assertEqual(
            [f.hashes for f in from_json.files], [f.hashes for f in page.files]
        )

    def test_html_escaping(self) -> None:
        page = ProjectPage(
            "demo",
            [
                ProjectFile(
                    "demo-1.0.tar.gz",
                    "http://127.0.0.1/demo-1.0.tar.gz?x=1&y=2",
                    {"sha256": SHA_A},
                    requires_python="<4,>=3.8",
                    yanked='no <b>"good"</b> & done',
                )
            ],
        )
        html = render_html(page, same_link).decode()
        self.assertIn('data-requires-python="&lt;4,&gt;=3.8"', html)
        self.assertIn(
            'data-yanked="no &lt;b&gt;&quot;good&quot;&lt;/b&gt; &amp; done"', html
        )
        self.assertIn(
            f'href="http://127.0.0.1/demo-1.0.tar.gz?x=1&amp;y=2#sha256={SHA_A}"', html
        )
        self.assertNotIn("<4", html)
        self.assertEqual(parse_html_page(html.encode(), PAGE_URL), page)

    def test_yanked(self) -> None:
        base = ProjectFile("x-1.whl", "http://127.0.0.1/x-1.whl")
        cases: list[tuple[bool | str, str | None, Any]] = [
            (False, None, None),
            (True, 'data-yanked=""', True),
            ("security", 'data-yanked="security"', "security"),
        ]
        for yanked, attribute, json_value in cases:
            page = ProjectPage("x", [attrs.evolve(base, yanked=yanked)])
            html = render_html(page, same_link).decode()
            document = json.loads(render_json(page, same_link))
            if attribute is None:
                self.assertNotIn("data-yanked", html)
                self.assertNotIn("yanked", document["files"][0])
            else:
                self.assertIn(attribute, html)
                self.assertEqual(document["files"][0]["yanked"], json_value)
            self.assertEqual(parse_html_page(html.encode(), PAGE_URL).files[0].yanked, yanked)

    def test_core_metadata(self) -> None:
        base = ProjectFile("x-1.whl", "http://127.0.0.1/x-1.whl")
        cases: list[tuple[Any, str | None, Any]] = [
            (False, None, None),
            (True, "true", True),
            ({"sha256": SHA_M}, f"sha256={SHA_M}", {"sha256": SHA_M}),
        ]
        for metadata, html_value, json_value in cases:
            page = ProjectPage("x", [attrs.evolve(base, core_metadata=metadata)])
            html = render_html(page, same_link).decode()
            entry = json.loads(render_json(page, same_link))["files"][0]
            if html_value is None:
                self.assertNotIn("metadata", html)
                self.assertNotIn("core-metadata", entry)
                self.assertNotIn("dist-info-metadata", entry)
            else:
                self.assertIn(f'data-core-metadata="{html_value}"', html)
                self.assertIn(f'data-dist-info-metadata="{html_value}"', html)
                self.assertEqual(entry["core-metadata"], json_value)
                self.assertEqual(entry["dist-info-metadata"], json_value)
            # Never advertised when the caller cannot serve it.
            refused = render_html(page, same_link, metadata_available=lambda f: False)
            entry = json.loads(
                render_json(page, same_link, metadata_available=lambda f: False)
            )["files"][0]
            self.assertNotIn(b"metadata", refused)
            self.assertNotIn("core-metadata", entry)
            self.assertNotIn("dist-info-metadata", entry)

    def test_metadata_available_called_per_file(self) -> None:
        page = ProjectPage(
            "x",
            [
                ProjectFile("x-1.whl", "http://127.0.0.1/x-1.whl", core_metadata=True),
                ProjectFile("x-2.whl", "http://127.0.0.1/x-2.whl", core_metadata=True),
            ],
        )
        only_second = render_json(
            page, same_link, metadata_available=lambda f: f.filename == "x-2.whl"
        )
        files = parse_json_page(only_second, PAGE_URL).files
        self.assertEqual([f.core_metadata for f in files], [False, True])

    def test_api_version_and_pep700(self) -> None:
        sized = ProjectFile("x-1.whl", "http://127.0.0.1/x-1.whl", size=5, upload_time="t")
        complete = ProjectPage("x", [sized], versions=["1"])
        document = json.loads(render_json(complete, same_link))
        self.assertEqual(document["meta"], {"api-version": "1.1"})
        self.assertEqual(document["versions"], ["1"])
        self.assertEqual(document["files"][0]["size"], 5)
        self.assertEqual(document["files"][0]["upload-time"], "t")
        self.assertIn(b'content="1.1"', render_html(complete, same_link))
        for incomplete in [
            attrs.evolve(complete, versions=None),
            attrs.evolve(complete, files=[attrs.evolve(sized, size=None)]),
        ]:
            document = json.loads(render_json(incomplete, same_link))
            self.assertEqual(document["meta"]["api-version"], "1.0")
        serial = json.loads(render_json(attrs.evolve(complete, last_serial=9), same_link))
        self.assertEqual(serial["meta"]["_last-serial"], 9)

    def test_deterministic(self) -> None:
        first = parse_json_page(UPSTREAM_JSON, PAGE_URL)
        second = parse_json_page(UPSTREAM_JSON, PAGE_URL)
        self.assertEqual(render_json(first, same_link), render_json(second, same_link))
        self.assertEqual(render_html(first, same_link), render_html(second, same_link))
        reordered = json.loads(UPSTREAM_JSON)
        for entry in reordered["files"]:
            entry["hashes"] = dict(reversed(list(entry["hashes"].items())))
        third = parse_json_page(json.dumps(reordered).encode(), PAGE_URL)
        self.assertEqual(render_json(third, same_link), render_json(first, same_link))

    def test_anchor_text_is_filename(self) -> None:
        page = parse_json_page(UPSTREAM_JSON, PAGE_URL)
        for href, text in anchors(render_html(page, same_link)):
            self.assertEqual(href.split("#")[0].rsplit("/", 1)[1], text)

    def test_render_page(self) -> None:
        page = parse_json_page(UPSTREAM_JSON, PAGE_URL)
        self.assertEqual(
            render_page(page, MEDIA_TYPE_JSON, same_link), render_json(page, same_link)
        )
        for media_type in [MEDIA_TYPE_HTML, MEDIA_TYPE_LEGACY_HTML]:
            self.assertEqual(
                render_page(page, media_type, same_link), render_html(page, same_link)
            )
        self.assertRaises(ValueError, render_page, page, "application/json", same_link)


class RootTests(SynchronousTestCase):
    def test_html(self) -> None:
        names = ["Foo.Bar", "b<c"] + [f"p{i}" for i in range(1100)]
        chunks = list(render_root_html(names))
        self.assertGreater(len(chunks), 3)
        html = b"".join(chunks)
        links = anchors(html)
        self.assertEqual(links[0], ("foo-bar/", "Foo.Bar"))
        self.assertEqual(links[1], ("b&lt;c/", "b&lt;c"))
        self.assertEqual(len(links), 1102)

    def test_json(self) -> None:
        for names in [[], ["a"], [f"p{i}" for i in range(1100)]]:
            document = json.loads(b"".join(render_root_json(iter(names))))
            self.assertEqual(document["meta"], {"api-version": "1.0"})
            self.assertEqual([p["name"] for p in document["projects"]], names)


class NegotiationTests(SynchronousTestCase):
    def test_table(self) -> None:
        table: list[tuple[bytes | str | None, str | None]] = [
            (PIP_ACCEPT, MEDIA_TYPE_JSON),
            (PIP_ACCEPT.encode(), MEDIA_TYPE_JSON),
            (UV_ACCEPT, MEDIA_TYPE_JSON),
            (UPSTREAM_ACCEPT, MEDIA_TYPE_JSON),
            (None, MEDIA_TYPE_LEGACY_HTML),
            ("", MEDIA_TYPE_LEGACY_HTML),
            ("*/*", MEDIA_TYPE_LEGACY_HTML),
            (BROWSER_ACCEPT, MEDIA_TYPE_LEGACY_HTML),
            ("text/html", MEDIA_TYPE_LEGACY_HTML),
            ("text/*", MEDIA_TYPE_LEGACY_HTML),
            ("application/*", MEDIA_TYPE_JSON),
            ("application/vnd.pypi.simple.v1+html", MEDIA_TYPE_HTML),
            ("application/vnd.pypi.simple.latest+html", MEDIA_TYPE_HTML),
            ("application/vnd.pypi.simple.latest+json", MEDIA_TYPE_JSON),
            ("Application/VND.PyPI.Simple.V1+JSON", MEDIA_TYPE_JSON),
            (
                "application/vnd.pypi.simple.v1+json;q=0.5, text/html",
                MEDIA_TYPE_LEGACY_HTML,
            ),
            # Equal quality: the type the client listed first.
            (
                "application/vnd.pypi.simple.v1+html, application/vnd.pypi.simple.v1+json",
                MEDIA_TYPE_HTML,
            ),
            # An explicit mention beats a wildcard of the same quality.
            ("*/*, application/vnd.pypi.simple.v1+html", MEDIA_TYPE_HTML),
            # q=0 excludes, even when a wildcard would accept.
            ("*/*, text/html;q=0", MEDIA_TYPE_JSON),
            ("text/html;q=0", None),
            ("*/*;q=0", None),
            ("application/json", None),
            ("image/png, application/xml", None),
            ("garbage", None),
            ("text/html;q=lots", None),
            ("text/html;q=2", None),
        ]
        for accept, expected in table:
            self.assertEqual(choose_media_type(accept), expected, accept)


class FixtureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.fixture = build_index(self.directory)

    def test_files_match_model(self) -> None:
        self.assertEqual(sorted(self.fixture.projects), ["bcdemo-a", "bcdemo-b"])
        for page in self.fixture.projects.values():
            self.assertEqual(page.api_version, "1.1")
            self.assertIsNotNone(page.versions)
            for file in page.files:
                data = self.fixture.content(file.filename)
                self.assertEqual(file.sha256, hashlib.sha256(data).hexdigest())
                self.assertEqual(file.size, len(data))
                if file.filename.endswith(".whl"):
                    metadata = self.fixture.path_for(file.filename + ".metadata").read_bytes()
                    self.assertEqual(
                        file.core_metadata, {"sha256": hashlib.sha256(metadata).hexdigest()}
                    )
                    with zipfile.ZipFile(self.fixture.path_for(file.filename)) as wheel:
                        dist_info = next(
                            n.split("/")[0] for n in wheel.namelist() if ".dist-info/" in n
                        )
                        self.assertEqual(wheel.read(f"{dist_info}/METADATA"), metadata)
                else:
                    self.assertIs(file.core_metadata, False)
        b = self.fixture.projects["bcdemo-b"]
        self.assertEqual(b.versions, ("0.5", "1.0", "2.0"))
        self.assertEqual(
            [f.yanked for f in b.files], [True, False, False, "broken build"]
        )
        a3 = self.fixture.file("bcdemo_a-3.0-py3-none-any.whl")
        self.assertEqual(a3.requires_python, ">=4")

    def test_wheel_records(self) -> None:
        for filename in os.listdir(self.fixture.files_directory):
            if not filename.endswith(".whl"):
                continue
            with zipfile.ZipFile(self.fixture.path_for(filename)) as wheel:
                record_name = next(n for n in wheel.namelist() if n.endswith("/RECORD"))
                rows = [
                    line.split(",")
                    for line in wheel.read(record_name).decode().splitlines()
                ]
                self.assertEqual(
                    sorted(row[0] for row in rows), sorted(wheel.namelist())
                )
                for path, digest, size in rows:
                    if path == record_name:
                        self.assertEqual((digest, size), ("", ""))
                        continue
                    data = wheel.read(path)
                    expected = urlsafe_b64encode(hashlib.sha256(data).digest())
                    self.assertEqual(digest, "sha256=" + expected.rstrip(b"=").decode())
                    self.assertEqual(int(size), len(data))

    def test_reproducible(self) -> None:
        again = build_index(Path(self.mktemp()))
        self.assertEqual(again.projects, self.fixture.projects)

    def test_without_metadata(self) -> None:
        bare = build_index(Path(self.mktemp()), with_metadata=False)
        for page in bare.projects.values():
            for file in page.files:
                self.assertIs(file.core_metadata, False)
                self.assertFalse(bare.path_for(file.filename + ".metadata").exists())

    def test_pip_installs_fixture_wheels(self) -> None:
        target = Path(self.mktemp())
        result = subprocess.run(
            [
                sys.executable, "-m", "pip", "install", "--no-index", "--no-cache-dir",
                "--disable-pip-version-check", "--only-binary", ":all:",
                "--find-links", str(self.fixture.files_directory),
                "--target", str(target), "bcdemo-a",
            ],
            env=clean_pip_environment(),
            capture_output=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        installed = sorted(os.listdir(target))
        # Without an index pip cannot see yanks: it takes bcdemo-b 2.0; the
        # Requires-Python of bcdemo-a 3.0 makes it fall back to 2.0.
        self.assertEqual(
            installed,
            ["bcdemo_a", "bcdemo_a-2.0.dist-info", "bcdemo_b", "bcdemo_b-2.0.dist-info"],
        )
        self.assertEqual(
            (target / "bcdemo_b" / "__init__.py").read_text(), '__version__ = "2.0"\n'
        )


def clean_pip_environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    environment["PIP_CONFIG_FILE"] = os.devnull
    return environment


class StaticSimpleIndexTests(TestCase):
    def setUp(self) -> None:
        from twisted.internet import reactor as global_reactor

        # The global reactor is untyped for mypy without the zope plugin.
        reactor: Any = global_reactor
        self.reactor = reactor
        self.fixture: IndexFixture = build_index(Path(self.mktemp()))
        self.index = StaticSimpleIndex(self.fixture)
        port = reactor.listenTCP(0, Site(self.index), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.root = f"http://127.0.0.1:{port.getHost().port}/"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)

    async def fetch(
        self, path: str, method: str = "GET", **headers: str
    ) -> tuple[int, dict[str, str], bytes]:
        response = await treq.request(
            method,
            self.root + path.lstrip("/"),
            headers=Headers({k.replace("_", "-"): [v] for k, v in headers.items()}),
            pool=self.pool,
            allow_redirects=False,
        )
        body = await response.content()
        flat = {
            name.decode().lower(): values[0].decode()
            for name, values in response.headers.getAllRawHeaders()
        }
        return response.code, flat, body

    def run_async(self, coroutine: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(coroutine)

    def test_json_page(self) -> Deferred[Any]:
        async def check() -> None:
            code, headers, body = await self.fetch("/simple/bcdemo-a/", Accept=PIP_ACCEPT)
            self.assertEqual(code, 200)
            self.assertEqual(headers["content-type"], MEDIA_TYPE_JSON)
            self.assertEqual(headers["vary"], "Accept")
            self.assertIn("etag", headers)
            self.assertIn("last-modified", headers)
            page = parse_json_page(body, self.root + "simple/bcdemo-a/")
            self.assertEqual(page, self.fixture.page("bcdemo-a", self.root))
            self.assertTrue(json.loads(body)["files"][0]["url"].startswith("../../files/"))

        return self.run_async(check())

    def test_html_page(self) -> Deferred[Any]:
        async def check() -> None:
            for accept, media_type in [
                (None, MEDIA_TYPE_LEGACY_HTML),
                ("application/vnd.pypi.simple.v1+html", MEDIA_TYPE_HTML),
            ]:
                extra = {} if accept is None else {"Accept": accept}
                code, headers, body = await self.fetch("/simple/bcdemo-b/", **extra)
                self.assertEqual((code, headers["content-type"]), (200, media_type))
                page = parse_html_page(body, self.root + "simple/bcdemo-b/")
                expected = self.fixture.page("bcdemo-b", self.root)
                self.assertEqual(
                    [attrs.evolve(f, size=None, upload_time=None) for f in expected.files],
                    list(page.files),
                )

        return self.run_async(check())

    def test_html_only_and_absolute(self) -> Deferred[Any]:
        self.index.json = False
        self.index.absolute_urls = True

        async def check() -> None:
            code, headers, body = await self.fetch("/simple/bcdemo-a/", Accept=PIP_ACCEPT)
            self.assertEqual(headers["content-type"], MEDIA_TYPE_LEGACY_HTML)
            self.assertIn(f'href="{self.root}files/'.encode(), body)
            page = parse_html_page(body, "http://127.0.0.9/unrelated/")
            self.assertEqual(
                [f.url for f in page.files],
                [f.url for f in self.fixture.page("bcdemo-a", self.root).files],
            )

        return self.run_async(check())

    def test_negotiation_failure_and_routes(self) -> Deferred[Any]:
        async def check() -> None:
            code, _, _ = await self.fetch("/simple/bcdemo-a/", Accept="image/png")
            self.assertEqual(code, 406)
            code, headers, _ = await self.fetch("/simple/BCDemo_A/")
            self.assertEqual((code, headers["location"]), (301, "/simple/bcdemo-a/"))
            code, headers, _ = await self.fetch("/simple/bcdemo-a")
            self.assertEqual((code, headers["location"]), (301, "/simple/bcdemo-a/"))
            code, _, _ = await self.fetch("/simple/nothing-here/")
            self.assertEqual(code, 404)
            code, _, _ = await self.fetch("/files/..")
            self.assertEqual(code, 404)
            code, _, _ = await self.fetch("/files/bcdemo_b-1.0.tar.gz.metadata")
            self.assertEqual(code, 404)
            code, headers, body = await self.fetch("/simple/", Accept=PIP_ACCEPT)
            self.assertEqual(
                [p["name"] for p in json.loads(body)["projects"]], ["bcdemo-a", "bcdemo-b"]
            )
            code, headers, body = await self.fetch("/simple/")
            self.assertEqual(headers["content-type"], MEDIA_TYPE_LEGACY_HTML)
            self.assertIn(b'<a href="bcdemo-a/">bcdemo-a</a>', body)

        return self.run_async(check())

    def test_files_metadata_and_conditional(self) -> Deferred[Any]:
        wheel = "bcdemo_a-2.0-py3-none-any.whl"

        async def check() -> None:
            code, headers, body = await self.fetch(f"/files/{wheel}")
            self.assertEqual(code, 200)
            self.assertEqual(body, self.fixture.content(wheel))
            # treq's gzip decoder leaves an empty header; the server sent none.
            self.assertEqual(headers.get("content-encoding", ""), "")
            code, head_headers, head_body = await self.fetch(f"/files/{wheel}", "HEAD")
            self.assertEqual((code, head_body), (200, b""))
            self.assertEqual(head_headers["content-length"], str(len(body)))
            code, _, metadata = await self.fetch(f"/files/{wheel}.metadata")
            self.assertEqual(metadata, self.fixture.metadata[wheel])
            code, _, body = await self.fetch(
                f"/files/{wheel}", If_None_Match=f'"other", {headers["etag"]}'
            )
            self.assertEqual((code, body), (304, b""))
            code, _, _ = await self.fetch(
                f"/files/{wheel}", If_Modified_Since=headers["last-modified"]
            )
            self.assertEqual(code, 304)
            code, _, _ = await self.fetch(f"/files/{wheel}", If_None_Match='"other"')
            self.assertEqual(code, 200)
            self.index.serve_metadata = False
            code, _, _ = await self.fetch(f"/files/{wheel}.metadata")
            self.assertEqual(code, 404)
            self.assertEqual(self.index.requests[f"/files/{wheel}"], 5)
            self.assertEqual(self.index.requests[f"/files/{wheel}.metadata"], 2)
            self.assertEqual(self.index.request_log[1].method, "HEAD")

        return self.run_async(check())

    def test_page_etag_follows_content(self) -> Deferred[Any]:
        async def check() -> None:
            _, headers, _ = await self.fetch("/simple/bcdemo-b/", Accept=PIP_ACCEPT)
            code, _, _ = await self.fetch(
                "/simple/bcdemo-b/", Accept=PIP_ACCEPT, If_None_Match=headers["etag"]
            )
            self.assertEqual(code, 304)
            # Each representation has its own tag.
            code, _, _ = await self.fetch("/simple/bcdemo-b/", If_None_Match=headers["etag"])
            self.assertEqual(code, 200)
            page = self.index.projects["bcdemo-b"]
            self.index.projects["bcdemo-b"] = attrs.evolve(
                page, files=[attrs.evolve(f, yanked=False) for f in page.files]
            )
            code, _, body = await self.fetch(
                "/simple/bcdemo-b/", Accept=PIP_ACCEPT, If_None_Match=headers["etag"]
            )
            self.assertEqual(code, 200)
            self.assertNotIn(b"yanked", body)
            self.assertEqual(self.index.requests["/simple/bcdemo-b/"], 4)

        return self.run_async(check())

    def test_broken(self) -> Deferred[Any]:
        self.index.broken = True

        async def check() -> None:
            for path in ["/simple/bcdemo-a/", "/files/bcdemo_b-1.0.tar.gz"]:
                code, _, _ = await self.fetch(path)
                self.assertEqual(code, 503)
            self.assertEqual(self.index.requests["/simple/bcdemo-a/"], 1)

        return self.run_async(check())

    async def pip_install(self, *arguments: str) -> tuple[str, Path]:
        target = Path(self.mktemp())
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [
                "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
                "--index-url", self.root + "simple/", "--target", str(target),
                *arguments,
            ],
            env=clean_pip_environment(),
            reactor=self.reactor,
        )
        self.assertEqual(code, 0, err.decode())
        return out.decode(), target

    def test_pip_resolves_through_index(self) -> Deferred[Any]:
        async def check() -> None:
            _, target = await self.pip_install("bcdemo-a")
            # The index hides bcdemo-a 3.0 (Requires-Python) and bcdemo-b 2.0
            # and 0.5 (yanked).
            self.assertEqual(
                sorted(os.listdir(target)),
                ["bcdemo_a", "bcdemo_a-2.0.dist-info", "bcdemo_b", "bcdemo_b-1.0.dist-info"],
            )
            self.assertEqual(self.index.requests["/files/bcdemo_a-3.0-py3-none-any.whl"], 0)
            self.assertEqual(
                self.index.requests["/files/bcdemo_a-2.0-py3-none-any.whl.metadata"], 1
            )
            self.assertEqual(self.index.requests["/files/bcdemo_b-1.0-py3-none-any.whl"], 1)
            page_request = next(
                r for r in self.index.request_log if r.path == "/simple/bcdemo-a/"
            )
            self.assertEqual(choose_media_type(page_request.headers["accept"]), MEDIA_TYPE_JSON)

        return self.run_async(check())

    def test_pip_through_html_only_index(self) -> Deferred[Any]:
        self.index.json = False

        async def check() -> None:
            _, target = await self.pip_install("bcdemo-a")
            self.assertIn("bcdemo_b-1.0.dist-info", os.listdir(target))
            self.assertIn("bcdemo_a-2.0.dist-info", os.listdir(target))

        return self.run_async(check())
