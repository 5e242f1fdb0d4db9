"""
End-to-end: the registry port of the real service (``make_service``, as
twistd runs it) between real clients and a real origin, all on 127.0.0.1.

- The origin is Debian's ``docker-registry`` (the distribution registry)
  with its own config and storage, holding images built by hand
  (:mod:`tests.oci_layout`) and pushed to it with ``skopeo``: an OCI image,
  the same converted to Docker v2 schema 2, and a two-platform index.
- Between the service and the origin a :class:`CountingForwarder` counts
  every upstream request by path: that is how "one upstream GET per blob"
  and "no upstream request at all" are checked.
- The clients are ``skopeo`` (``copy`` and ``inspect --no-tags``) with a
  ``registries.conf`` naming only loopback registries, and containerd's
  ``ctr`` with ``--hosts-dir`` (it sends ``?ns=``).  Each client's own
  upstream (registries.conf ``location``, hosts.toml ``server``) is a
  loopback port where nothing listens, so a pull that succeeds came
  through the service: a client that fell back past its mirror would fail.
- Every test's Config overrides ``docker.io`` with a loopback URL.

The binaries come from Debian (``.ci/run`` installs them); a test is
skipped, with the reason, only when one is missing.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import cast

from twisted.internet.defer import ensureDeferred, gatherResults
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from buildcache.config import Registry
from buildcache.credentials import Credentials
from buildcache.options import Options
from buildcache.service import make_service
from tests.containerd_parts import (
    containerd_unavailable,
    start_containerd,
    write_checked_hosts_toml,
    write_hosts_toml,
)
from tests.registry_parts import (
    CONTAINERD_MANIFEST_ACCEPT,
    DOCKER_MANIFEST,
    OCI_MANIFEST,
    REGISTRY_BINARY,
    SKOPEO_BINARY,
    SKOPEO_MANIFEST_ACCEPT,
    CountingForwarder,
    OciImage,
    RegistryEntry,
    RunningRegistry,
    Skopeo,
    answer_to,
    build_image,
    dead_authority,
    free_port,
    missing_binaries,
    pulled_blobs,
    require_loopback,
    start_buildcache,
    start_registry,
    tls_client_hello,
)
from tests.support import Client, Received, reactor

KB = 1024
MB = 1024 * KB
REPOSITORY = "team/app"


def blob_sizes(image: OciImage) -> dict[str, int]:
    """Digest -> size of every config and layer of ``image``."""
    return {digest: blob.size for digest, blob in image.blobs().items()}


class RegistryE2ETests(TestCase):
    """
    One origin, one service, one skopeo configuration per test; the images
    are pushed straight to the origin (not through the forwarder), so the
    forwarder counts only what the service asked for.
    """

    timeout = 60

    async def setUp(self) -> None:  # type: ignore[override]
        missing = missing_binaries(REGISTRY_BINARY, SKOPEO_BINARY)
        if missing:
            self.skipTest(
                f"not installed: {', '.join(missing)} (Debian packages"
                " docker-registry and skopeo; .ci/run installs them)"
            )
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir(parents=True)
        self.origin: RunningRegistry = await start_registry(self, self.work / "origin")
        self.skopeo = Skopeo(self.work / "skopeo")
        seed = self.id().encode()
        self.image = build_image(
            self.work / "image", "t1", [300 * KB, 2 * MB], seed=seed
        )
        self.multi = build_image(
            self.work / "multi", "multi", [100 * KB], seed=seed + b"/multi",
            platforms=("linux/amd64", "linux/arm64"),
        )
        pushes = [
            self.skopeo.push_arguments(self.image, self.at_origin("t1")),
            self.skopeo.push_arguments(self.image, self.at_origin("v2s2"), format="v2s2"),
            self.skopeo.push_arguments(self.multi, self.at_origin("multi")),
        ]
        for arguments in pushes:
            await self.skopeo_ok(*arguments)
        # The v2s2 conversion rewrites the config (same layers): its blobs
        # as the origin lists them.
        self.client = Client(persistent=False)
        converted = await self.client.get(
            f"{self.origin.url}/v2/{REPOSITORY}/manifests/v2s2",
            {"accept": DOCKER_MANIFEST},
        )
        document = json.loads(converted.body)
        #: (top manifest digest, blob digest -> size) of each tag.
        self.t1 = (self.image.top.digest, blob_sizes(self.image))
        self.v2s2 = (
            converted.header("docker-content-digest") or "",
            {entry["digest"]: entry["size"] for entry in [document["config"], *document["layers"]]},
        )
        self.instances = {m.blob.digest: m.blob.size for m in self.multi.manifests}
        self.forwarder = CountingForwarder(self.origin.url)
        self.forwarder.listen(self)

    def at_origin(self, tag: str) -> str:
        return f"{self.origin.authority}/{REPOSITORY}:{tag}"

    def start_service(
        self, docker_io: str | None = None, index_ttl: float = 300, name: str | None = None
    ) -> str:
        """
        The service with two upstreams, both through the forwarder: the
        origin under ``name`` (default: its own ``127.0.0.1:PORT``) and
        ``docker.io`` (``docker_io``: another URL, e.g. one where nothing
        listens).  Returns the registry port's ``host:port``.
        """
        return start_buildcache(self, self.work / "cache", (
            Registry("docker.io", docker_io or self.forwarder.url),
            Registry(name or self.origin.authority, self.forwarder.url),
        ), index_ttl)

    async def skopeo_ok(self, *arguments: str) -> bytes:
        out, err, code = await self.skopeo.call(*arguments)
        if code != 0:
            self.fail(
                f"skopeo {' '.join(arguments)} exited {code}:\n"
                + err.decode(errors="replace")[-3000:]
            )
        return out

    async def pull(self, source: str, name: str, all_platforms: bool = False) -> Path:
        """``skopeo copy docker://source dir:...`` into a fresh directory; its path."""
        directory = self.work / "pulled" / name
        directory.parent.mkdir(exist_ok=True)
        arguments = self.skopeo.pull_arguments(source, directory)
        if all_platforms:
            arguments.insert(1, "--all")
        await self.skopeo_ok(*arguments)
        return directory

    def assert_same(self, pulled: Path, top: str, blobs: dict[str, int]) -> None:
        """
        What skopeo wrote is byte for byte what the origin holds: the
        manifest it was given (digest ``top``) and every blob (each file's
        digest checked).
        """
        manifest, found = pulled_blobs(pulled)
        self.assertEqual(manifest, top)
        for digest, size in blobs.items():
            self.assertEqual(found.get(digest), size, digest)

    def assert_one_get_per_blob(self, *blob_sets: dict[str, int]) -> None:
        """Each of these blobs went upstream once, and no other blob did."""
        expected = {digest: 1 for blobs in blob_sets for digest in blobs}
        self.assertEqual(dict(self.forwarder.blob_gets()), expected)

    async def raw(self, box: str, path: str, method: bytes = b"GET",
                  headers: dict[str, str] | None = None) -> Received:
        return await self.client.get(f"http://{box}{path}", headers, method=method)

    async def test_copy_through_path_prefix_mirror(self) -> None:
        """
        registries.conf with a path mirror ``BOX/localhost`` (podman's
        form) for images named ``localhost/...``, the service's upstream
        ``localhost`` being the origin: the OCI image, its v2s2 conversion
        and the two-platform index are copied through the service with
        every blob byte-identical and one upstream GET each; a second copy
        of each is served entirely by the service (no upstream request at
        all), and a blob read again says HIT.  (A NAME with a port cannot
        be a path segment: skopeo refuses ``BOX/127.0.0.1:PORT`` as an
        invalid reference.)
        """
        box = self.start_service(docker_io=f"http://{dead_authority()}", name="localhost")
        self.skopeo.write_registries([
            RegistryEntry("localhost", dead_authority(), (f"{box}/localhost",)),
        ])
        origin_name = "localhost"
        first = await self.pull(f"localhost/{REPOSITORY}:t1", "oci")
        self.assert_same(first, *self.t1)
        self.assert_one_get_per_blob(self.t1[1])
        converted = await self.pull(f"localhost/{REPOSITORY}:v2s2", "v2s2")
        self.assert_same(converted, *self.v2s2)
        multi = await self.pull(f"localhost/{REPOSITORY}:multi", "multi", all_platforms=True)
        self.assert_same(multi, self.multi.top.digest, {**blob_sizes(self.multi), **self.instances})
        # The v2s2 manifest names the same layers: not fetched again.
        self.assert_one_get_per_blob(self.t1[1], self.v2s2[1], blob_sizes(self.multi))
        asked = sum(self.forwarder.counts.values())
        inspected = json.loads(await self.skopeo_ok(
            "inspect", "--no-tags", f"docker://localhost/{REPOSITORY}:t1"
        ))
        self.assertEqual(inspected["Digest"], self.image.top.digest)

        again = await self.pull(f"localhost/{REPOSITORY}:t1", "t1-again")
        self.assert_same(again, *self.t1)
        again = await self.pull(f"localhost/{REPOSITORY}:v2s2", "v2s2-again")
        self.assert_same(again, *self.v2s2)
        await self.pull(f"localhost/{REPOSITORY}:multi", "multi-again", all_platforms=True)
        self.assertEqual(sum(self.forwarder.counts.values()), asked)

        layer = self.image.manifests[0].layers[1]
        path = f"/v2/{origin_name}/{REPOSITORY}/blobs/{layer.digest}"
        hit = await self.raw(box, path)
        self.assertEqual((hit.status, hit.header("x-cache")), (200, "HIT"))
        self.assertEqual(hit.body, layer.read())

    async def test_copy_as_docker_io_mirror(self) -> None:
        """
        The plain form (what dockerd's ``registry-mirrors`` can use):
        registries.conf sends ``docker.io/...`` to the mirror ``BOX`` with
        no path; the service's ``docker.io`` is the loopback origin.
        ``skopeo inspect --no-tags`` and ``copy`` work, blobs identical,
        one upstream GET per blob, and nothing upstream the second time.
        """
        box = self.start_service()
        self.skopeo.write_registries([
            RegistryEntry("docker.io", dead_authority(), (box,)),
        ])
        source = f"docker.io/{REPOSITORY}:t1"
        out, err, code = await self.skopeo.call(
            "inspect", "--no-tags", f"docker://{source}", debug=True
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        inspected = json.loads(out)
        self.assertEqual(inspected["Digest"], self.image.top.digest)
        self.assertEqual(len(inspected["Layers"]), 2)
        # skopeo read our registries.conf, and no other file that could
        # send it to a registry (drop-ins of short-name aliases only).
        loaded = re.findall(r'Loading registries configuration \\"([^"\\]+)\\"', err.decode())
        self.assertEqual(loaded[0], str(self.skopeo.directory / "registries.conf"))
        for other in loaded[1:]:
            self.assertNotIn("location", Path(other).read_text(), other)
        pulled = await self.pull(source, "cold")
        self.assert_same(pulled, *self.t1)
        self.assert_one_get_per_blob(self.t1[1])
        asked = sum(self.forwarder.counts.values())
        again = await self.pull(source, "warm")
        self.assert_same(again, *self.t1)
        self.assertEqual(sum(self.forwarder.counts.values()), asked)
        self.assertEqual(self.forwarder.gets(f"/{REPOSITORY}/manifests/t1"), 1)

    async def test_concurrent_cold_pulls_one_get_per_blob(self) -> None:
        """
        Eight ``skopeo copy`` at once of an image nobody pulled yet, with
        the origin sending at 8 MB/s (so the fills overlap): each gets every
        blob intact, and each blob went upstream exactly once.
        """
        self.forwarder.rate = 8 * MB
        box = self.start_service()
        self.skopeo.write_registries([RegistryEntry("docker.io", dead_authority(), (box,))])
        source = f"docker.io/{REPOSITORY}:t1"
        pulls = [
            ensureDeferred(self.pull(source, f"concurrent-{n}")) for n in range(8)
        ]
        await gatherResults(pulls, consumeErrors=True)
        for n in range(8):
            self.assert_same(self.work / "pulled" / f"concurrent-{n}", *self.t1)
        self.assert_one_get_per_blob(self.t1[1])

    async def test_tag_served_stale_when_the_origin_is_stopped(self) -> None:
        """
        With the origin stopped, a tag pulled before (and past its
        freshness: ``index_ttl`` 0) is served ``X-Cache: STALE``: skopeo
        inspects and copies it as before, with the same digests.
        """
        box = self.start_service(index_ttl=0)
        self.skopeo.write_registries([RegistryEntry("docker.io", dead_authority(), (box,))])
        source = f"docker.io/{REPOSITORY}:t1"
        await self.pull(source, "before")
        await self.origin.stop()

        tag = f"/v2/{REPOSITORY}/manifests/t1"
        # As skopeo asks (the copy it stored answers only an Accept as wide).
        accept = {"accept": SKOPEO_MANIFEST_ACCEPT}
        stale = await self.raw(box, tag, headers=accept)
        self.assertEqual((stale.status, stale.header("x-cache")), (200, "STALE"))
        self.assertEqual(stale.header("docker-content-digest"), self.image.top.digest)
        self.assertEqual(stale.body, self.image.top.read())
        head = await self.raw(box, tag, method=b"HEAD", headers=accept)
        self.assertEqual((head.status, head.header("x-cache")), (200, "STALE"))
        self.assertEqual(head.header("content-length"), str(self.image.top.size))

        inspected = json.loads(await self.skopeo_ok("inspect", "--no-tags", f"docker://{source}"))
        self.assertEqual(inspected["Digest"], self.image.top.digest)
        after = await self.pull(source, "after")
        self.assert_same(after, *self.t1)

    async def test_containerd_shaped_requests(self) -> None:
        """
        What containerd's resolver sends to a mirror (as captured from
        ``ctr images pull`` here): a HEAD by tag with ``?ns=REGISTRY`` and
        its Accept header, then GETs by digest with ``?ns=``.  ``docker.io``
        leads nowhere in this service, so only ``?ns=`` can select the
        origin.
        """
        box = self.start_service(docker_io=f"http://{dead_authority()}")
        ns = "?ns=" + self.origin.authority.replace(":", "%3A")
        head = await self.raw(
            box, f"/v2/{REPOSITORY}/manifests/t1{ns}", method=b"HEAD",
            headers={"accept": CONTAINERD_MANIFEST_ACCEPT},
        )
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("docker-content-digest"), self.image.top.digest)
        self.assertEqual(head.header("content-length"), str(self.image.top.size))
        self.assertEqual(head.header("content-type"), OCI_MANIFEST)
        manifest = await self.raw(
            box, f"/v2/{REPOSITORY}/manifests/{self.image.top.digest}{ns}",
            headers={"accept": f"{OCI_MANIFEST}, */*", "accept-encoding": "gzip"},
        )
        self.assertEqual(manifest.body, self.image.top.read())
        for digest, blob in self.image.blobs().items():
            got = await self.raw(
                box, f"/v2/{REPOSITORY}/blobs/{digest}{ns}",
                headers={"accept": f"{blob.media_type}, */*", "accept-encoding": "gzip"},
            )
            self.assertEqual((got.status, got.body), (200, blob.read()))
        self.assert_one_get_per_blob(self.t1[1])

    async def test_ctr_pull_with_hosts_dir(self) -> None:
        """
        ``ctr images pull --hosts-dir`` with the service as the mirror of
        ``127.0.0.1:PORT`` (and a hosts.toml ``server`` where nothing
        listens): the image is pulled and unpacked through the service,
        selected by ``?ns=`` alone (a recorder between ctr and the service
        shows it on every request), one upstream GET per blob; a second
        containerd pulls it again with nothing upstream.
        """
        reason = containerd_unavailable()
        if reason is not None:
            self.skipTest(reason)
        box = self.start_service(docker_io=f"http://{dead_authority()}")
        recorder = CountingForwarder(f"http://{box}")
        recorder.listen(self)
        hosts = self.work / "hosts"
        write_hosts_toml(hosts, self.origin.authority, f"http://{dead_authority()}", recorder.url)
        reference = self.at_origin("t1")
        asked = 0
        for round in ("cold", "warm"):
            containerd = await start_containerd(self)
            out, err, code = await containerd.ctr(*containerd.pull_arguments(reference, hosts))
            if code != 0:
                self.fail(f"ctr pull ({round}) exited {code}:\n{err.decode(errors='replace')}")
            listed, _, _ = await containerd.ctr("images", "ls", "-q")
            self.assertIn(reference, listed.decode().split())
            self.assert_one_get_per_blob(self.t1[1])
            if round == "warm":
                self.assertEqual(sum(self.forwarder.counts.values()), asked)
            asked = sum(self.forwarder.counts.values())
            await containerd.child.stop()
        ns = "ns=" + self.origin.authority.replace(":", "%3A")
        self.assertEqual(
            [seen.uri for seen in recorder.seen if not seen.uri.endswith("?" + ns)], []
        )
        self.assertEqual(
            [seen.method for seen in recorder.seen][:2], ["HEAD", "GET"]
        )

    async def test_readme_snippets(self) -> None:
        """
        The README's registries.conf and containerd hosts.toml, as written
        but for ``BOX:5000`` and each real registry's ``location`` or
        ``server`` (a loopback port where nothing listens, so a client can
        never fall back to a real registry): skopeo pulls ``docker.io/...``
        and ``quay.io/...`` (the path form) through them, and ctr pulls
        ``docker.io/...``; the box's ``docker.io`` and ``quay.io`` are the
        loopback origin.
        """
        box = start_buildcache(self, self.work / "cache", (
            Registry("docker.io", self.forwarder.url),
            Registry("quay.io", self.forwarder.url),
        ))
        lines, table = [], ""
        for line in readme_block("podman, skopeo, buildah", "toml").splitlines():
            table = line if line.startswith("[") else table
            if table == "[[registry]]" and line.startswith("location = "):
                line = f'location = "{dead_authority()}"'
            lines.append(line.replace("BOX:5000", box))
        conf = "\n".join(lines) + "\n"
        for location in re.findall(r'location = "([^"]*)"', conf):
            require_loopback(location)
        self.assertEqual(conf.count(f'"{box}/quay.io"'), 1)
        (self.skopeo.directory / "registries.conf").write_text(conf)
        for name in ("docker.io", "quay.io"):
            pulled = await self.pull(f"{name}/{REPOSITORY}:t1", name)
            self.assert_same(pulled, *self.t1)
        # Two upstreams of the box, one copy of each layer: the second
        # registry's pull took them from the box.
        once = {digest: 1 for digest in self.t1[1]}
        self.assertEqual(dict(self.forwarder.blob_gets()), once)

        reason = containerd_unavailable()
        if reason is not None:
            self.skipTest(reason)
        hosts_toml = readme_block("**containerd**", "toml").replace("BOX:5000", box)
        self.assertNotIn("server", hosts_toml)
        hosts = self.work / "hosts"
        write_checked_hosts_toml(
            hosts, "docker.io", f'server = "http://{dead_authority()}"\n{hosts_toml}'
        )
        containerd = await start_containerd(self)
        reference = f"docker.io/{REPOSITORY}:t1"
        out, err, code = await containerd.ctr(*containerd.pull_arguments(reference, hosts))
        self.assertEqual(code, 0, err.decode(errors="replace"))
        # The copies skopeo's pull stored: no layer fetched again.
        self.assertEqual(dict(self.forwarder.blob_gets()), once)


README = Path(__file__).resolve().parent.parent / "README.md"


def readme_block(after: str, language: str) -> str:
    """The README's first ``language`` code block after the text ``after``."""
    text = README.read_text()
    start = text.index(after)
    found = re.search(rf"```{language}\n(.*?)```", text[start:], re.S)
    assert found is not None, f"no {language} block after {after!r} in the README"
    return textwrap.dedent(found.group(1))


class PlainPortTests(TestCase):
    timeout = 20

    async def test_tls_hello_answered_at_once(self) -> None:
        """
        podman and skopeo try https first on an ``insecure = true``
        registry: the registry port answers the TLS client hello with a
        plain HTTP 400 and closes, so the client falls back to http at
        once (waiting for a request line held skopeo for its 10 s
        handshake timeout, on every pull).
        """
        box = start_buildcache(self, Path(self.mktemp()), (
            Registry("docker.io", f"http://{dead_authority()}"),
        ))
        answer = await answer_to(box, tls_client_hello())
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])
        self.assertIn(b"plain HTTP", answer)


class AuthenticatedOriginTests(TestCase):
    """
    An origin that needs HTTP Basic credentials (``docker-registry`` with
    htpasswd), given to the service with ``--registry-auth NAME=FILE`` on
    its real command line (:class:`buildcache.options.Options`).
    """

    timeout = 60

    async def test_registry_auth_shared_with_clients_and_never_printed(self) -> None:
        """
        skopeo pulls anonymously through the box from an origin that needs
        credentials: the box sends its own (and never a client's), the same
        registry without them gets the origin's 401 as ``UNAUTHORIZED``, and
        the password is in no log event, nor on the status page,
        ``/-/stats.json`` or the metrics.
        """
        missing = missing_binaries(REGISTRY_BINARY, SKOPEO_BINARY)
        if missing:
            self.skipTest(f"not installed: {', '.join(missing)} (.ci/run installs them)")
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        user, password = "puller", "pw-" + "7f3c9a1e5b"
        origin = await start_registry(self, work / "origin", htpasswd=(user, password))
        skopeo = Skopeo(work / "skopeo")
        image = build_image(work / "image", "t1", [200 * KB], seed=b"auth")
        out, err, code = await skopeo.call(*skopeo.push_arguments(
            image, f"{origin.authority}/{REPOSITORY}:t1", credentials=(user, password)
        ))
        self.assertEqual(code, 0, err.decode(errors="replace"))
        forwarder = CountingForwarder(origin.url)
        forwarder.listen(self)
        # The same origin under another URL (credentials go by origin).
        other = CountingForwarder(origin.url)
        other.listen(self)
        secret = work / "registry-auth"
        secret.write_text(f"{user}:{password}\n")
        secret.chmod(0o600)

        events: list[dict[str, object]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        box_port, proxy_port = free_port(), free_port()
        options = Options(environ={})
        options.parseOptions([
            "--cache-dir", str(work / "cache"),
            "--port", f"tcp:{proxy_port}:interface=127.0.0.1",
            "--pypi-port", f"tcp:{free_port()}:interface=127.0.0.1",
            "--pypi-upstream", f"http://{dead_authority()}/simple",
            "--registry-port", f"tcp:{box_port}:interface=127.0.0.1",
            "--registry", f"docker.io=http://{dead_authority()}",
            "--registry", f"localhost={forwarder.url}",
            "--registry", f"anonymous.test={other.url}",
            "--registry-auth", f"localhost={secret}",
            "--allow-upstream", "127.0.0.1",
        ])
        service = make_service(options.config, reactor)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(service.stopService)
        box = f"127.0.0.1:{box_port}"

        skopeo.write_registries([
            RegistryEntry("localhost", dead_authority(), (f"{box}/localhost",)),
        ])
        pulled = work / "pulled"
        out, err, code = await skopeo.call(
            *skopeo.pull_arguments(f"localhost/{REPOSITORY}:t1", pulled)
        )
        self.assertEqual(code, 0, err.decode(errors="replace"))
        manifest, blobs = pulled_blobs(pulled)
        self.assertEqual(manifest, image.top.digest)
        self.assertEqual(
            {digest: blobs.get(digest) for digest in image.blobs()},
            blob_sizes(image),
        )

        client = Client()
        # A client's own Authorization is ignored: the box's copy answers.
        stranger = await client.get(
            f"http://{box}/v2/localhost/{REPOSITORY}/manifests/t1",
            {"accept": SKOPEO_MANIFEST_ACCEPT, "authorization": "Basic c3RyYW5nZXI6eA=="},
        )
        self.assertEqual((stranger.status, stranger.header("x-cache")), (200, "HIT"))
        refused = await client.get(
            f"http://{box}/v2/anonymous.test/{REPOSITORY}/manifests/t1",
            {"accept": SKOPEO_MANIFEST_ACCEPT, "authorization": "Basic c3RyYW5nZXI6eA=="},
        )
        self.assertEqual(refused.status, 401)
        self.assertIn(b"UNAUTHORIZED", refused.body)
        # Upstream: the box's credentials on every authenticated request,
        # never the client's.
        sent = {seen.headers.get("authorization") for seen in forwarder.seen}
        self.assertNotIn("Basic c3RyYW5nZXI6eA==", sent)
        self.assertIn(Credentials(user, password).authorization().decode(), sent)

        pages = [
            await client.get(f"http://127.0.0.1:{proxy_port}{path}")
            for path in ("/", "/-/stats.json", "/-/metrics")
        ]
        for page in pages:
            self.assertNotIn(password.encode(), page.body)
        self.assertEqual(pages[1].status, 200)
        for event in events:
            self.assertNotIn(password, formatEvent(event) + repr(event))
        self.assertNotEqual(events, [])
