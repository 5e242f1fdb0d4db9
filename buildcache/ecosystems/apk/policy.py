"""
Alpine repositories as the engine serves them: the apk policy.

``APKINDEX.tar.gz`` is an index (revalidated after the TTL); a package
(``NAME-VERSION-rN.apk``) is immutable, but only as its current index
describes it: a private repository may rebuild a package under the same
name.  So, around the engine's flow:

- before a package is looked up, an index just fetched is waited for, and
  the stored packages the index now lists differently are dropped
  (:meth:`ApkPolicy.before_lookup`);
- a package fetched is checked against its index entry (size, control
  checksum, data hash) before it is stored; an index never fetched, or
  older than the package, is fetched or revalidated first, and a package
  no index lists is served but not stored (:meth:`ApkPolicy.expect`);
- a stored package is no hit when the index held in memory lists another
  build than the one recorded with it (:meth:`ApkPolicy.answers`);
- an ``https://`` package is taken over from its plain-http twin when the
  index fetched over https vouches for the twin's bytes
  (:meth:`ApkPolicy.vouches_for`; the engine moves it);
- a package that fails its check is tried once more with a freshly
  revalidated index, which may be newer than the one it was checked
  against (:meth:`ApkPolicy.recheck`).

Every index read is the one the client would be served: the ``Vary``
variant its headers select, among its own credentials' entries.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import attrs
from attrs import frozen
from twisted.logger import Logger

from buildcache.ecosystems.apk.check import (
    ApkIndexes,
    stored_package_matches,
    verifier_for,
)
from buildcache.ecosystems.apk.index import ApkFacts, repository_index_url, stale_reason
from buildcache.ecosystems.apk.indexcheck import ApkIndexCheck
from buildcache.engine.core import Engine
from buildcache.engine.errors import IntegrityError
from buildcache.engine.freshness import Kind
from buildcache.engine.policy import Expectation, GenericPolicy, PathRule, Target, rule
from buildcache.fetch.fetcher import STREAM_CHECKED_ABOVE
from buildcache.store import BackgroundHashes, Entry

__all__ = ["RULES", "ApkExpectation", "ApkPolicy"]

RULES: tuple[PathRule, ...] = (
    # The repository index.
    rule(r"(?:^|/)APKINDEX\.tar\.gz$", Kind.INDEX),
    # NAME-VERSION-rN.apk: Alpine never rebuilds under the same name.
    rule(r"[^/]\.apk$", Kind.IMMUTABLE),
)

_log = Logger()


@frozen
class ApkExpectation(Expectation):
    """
    A package's expectation, with the index entry it came from.
    """

    facts: ApkFacts | None = None


def expectation_for(
    facts: ApkFacts, hashes: BackgroundHashes | None = None
) -> ApkExpectation:
    """
    What a package listed as ``facts`` must be (its data stream hashed on
    ``hashes``, the store's thread, if given).
    """
    return ApkExpectation(
        verify=verifier_for(facts, hashes),
        verify_covers_body=True,
        source_digest=facts.control_checksum,
        # Small packages wait for their check (a mismatch is a clean
        # 502); large ones stream, all but their tail, so that many
        # clients of one cold package finish with the download.
        stream_before_check=facts.size > STREAM_CHECKED_ABOVE,
        facts=facts,
    )


#: A package whose index does not list it: served, never stored
#: (immutable once stored: an error page sent as 200 would stay).
_UNVOUCHED = ApkExpectation(vouched=False)

#: An APKINDEX: gzip that inflates whole to a tar (see
#: :class:`buildcache.ecosystems.apk.indexcheck.ApkIndexCheck`).
_INDEX_CHECKED = ApkExpectation(verify=lambda headers: ApkIndexCheck())


@frozen
class ApkPolicy(GenericPolicy):
    """
    See the module docstring.  ``indexes`` holds the parsed indexes.
    """

    indexes: ApkIndexes = attrs.field(kw_only=True)
    rules: tuple[PathRule, ...] = RULES

    def _index_target(self, target: Target, index_url: str) -> Target:
        return target.for_url(index_url)

    def _index_keys(self, target: Target, engine: Engine) -> Callable[[str], str]:
        """
        Where the index at a URL is stored for ``target``'s client: the
        variant it would be served, among its credentials' entries.
        """
        def stored_key(index_url: str) -> str:
            index_target = self._index_target(target, index_url)
            found = engine.find(index_target)
            return engine.family(index_target) if found is None else found.key

        return stored_key

    async def before_lookup(self, target: Target, engine: Engine) -> None:
        index_url = repository_index_url(target.url) if ".apk" in target.url else None
        if index_url is None:
            return
        # An index just fetched may be being stored (apk asks for packages
        # right after their index); once it is, the packages it now lists
        # differently are dropped (once per version of it) before one of
        # them is served or checked against it.
        await engine.fetcher.stored(engine.family(self._index_target(target, index_url)))
        await self.indexes.current(target.url, self._index_keys(target, engine))

    async def expect(self, target: Target, engine: Engine) -> Expectation:
        if self.kind(target) is Kind.INDEX:
            # Checked before it may replace the stored index: a captive
            # portal's 200 or a body cut short is refused (and the stored
            # one served stale, on a revalidation).
            return _INDEX_CHECKED
        index_url = repository_index_url(target.url)
        facts = await self.indexes.entry_for(target.url, self._index_keys(target, engine))
        if index_url is not None and facts is None:
            # Its index was never fetched here, or is older than the
            # package: fetch or revalidate it, to check the package.
            facts = await self._refreshed_entry(target, engine, index_url)
        if facts is not None:
            return expectation_for(facts, self.indexes.store.hashes)
        if index_url is not None:
            return _UNVOUCHED
        return await super().expect(target, engine)

    async def _refreshed_entry(
        self, target: Target, engine: Engine, index_url: str
    ) -> ApkFacts | None:
        """
        The package's entry in its index once the index has been fetched
        or revalidated (and stored), as the client would get it.
        """
        await engine.refresh(self._index_target(target, index_url), self)
        return await self.indexes.entry_for(target.url, self._index_keys(target, engine))

    def answers(self, target: Target, entry: Entry) -> bool:
        """
        A stored package is no hit when the index held in memory for it
        (the version stored now) lists another build than the one recorded
        with it: it is fetched again, checked against that entry.  Nothing
        held, or nothing recorded: it answers (the process that writes
        drops the packages an index disowns, see :meth:`before_lookup`).
        """
        if entry.source_digest is None:
            return True
        if self.indexes.store.read_only:
            # A hit worker holds no index: a package answers once the
            # writing process has checked the stored packages against the
            # index stored now (it drops those a new index disowns);
            # until then the request goes to it.
            index_url = repository_index_url(target.url)
            return index_url is None or self.indexes.checked_for_workers(
                self._index_target(target, index_url).key
            )
        facts = self.indexes.held_entry(entry.key)
        if facts is None:
            return True
        reason = stale_reason(facts, entry.size, entry.source_digest)
        if reason is not None:
            _log.info(
                "Not serving {key}: its index now describes another build ({reason})",
                key=entry.key, reason=reason,
            )
        return reason is None

    async def vouches_for(
        self, target: Target, engine: Engine, twin: Entry, expected: Expectation
    ) -> bool:
        """
        Whether the plain-http ``twin`` of an ``https://`` package is the
        build the index, fetched over https, lists (size, control
        checksum, data hash: the check a download gets).
        """
        facts = expected.facts if isinstance(expected, ApkExpectation) else None
        # A recorded checksum that differs rules it out without a read.
        if facts is None or stale_reason(facts, twin.size, twin.source_digest):
            return False
        store = engine.store
        path = store.object_path(twin.key)
        if path is None or not await store.run_blocking(
            partial(stored_package_matches, path, facts)
        ):
            _log.info(
                "Not adopting {twin} for {url}: it is not the build its index lists",
                twin=twin.key, url=target.url,
            )
            return False
        return True

    async def recheck(
        self, target: Target, engine: Engine, expected: Expectation, error: Exception
    ) -> Expectation | None:
        """
        The index may just be older than the package: revalidate it once
        and try again with its new entry; if the entry is unchanged the
        package is bad.
        """
        old = expected.facts if isinstance(expected, ApkExpectation) else None
        index_url = repository_index_url(target.url)
        if old is None or index_url is None:
            return None
        new = await self._refreshed_entry(target, engine, index_url)
        if new is None or new == old:
            _log.error(
                "Refusing {url}: it does not match its index entry: {why}",
                url=target.url, why=str(error),
            )
            raise IntegrityError(f"package does not match its index entry: {error}")
        return expectation_for(new, self.indexes.store.hashes)
