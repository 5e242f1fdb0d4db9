"""
The ``Vary`` rule of URL keys (RFC 9111 section 4.1), as the fetcher uses
it: :data:`URL_VARIANTS` is the
:class:`buildcache.fetch.request.VariantRule` a front end puts on an
:class:`buildcache.fetch.request.UpstreamRequest` whose key is a URL.  The
rules themselves are in :mod:`buildcache.engine.freshness` (which request
headers a response varies on) and :mod:`buildcache.engine.keys` (the key
of each variant, and which variants are kept).
"""

from __future__ import annotations

from collections.abc import Mapping

from attrs import frozen
from twisted.logger import Logger

from buildcache.engine.freshness import same_variant, sent_headers
from buildcache.engine.keys import VARIANT_MARK, stored_key_for, variants_to_drop
from buildcache.store import Store


@frozen
class UrlVariants:
    """
    One entry per ``Vary`` variant of a URL, at most
    :data:`buildcache.engine.keys.VARIANTS_KEPT` of them.
    """

    log = Logger()

    def stored_key(
        self, family: str, secret: bytes, response_headers: Mapping[str, str],
        sent: Mapping[str, str],
    ) -> str | None:
        return stored_key_for(family, secret, response_headers, sent)

    def same_variant(
        self, response_headers: Mapping[str, str], sent: Mapping[str, str],
        other_sent: Mapping[str, str],
    ) -> bool:
        return same_variant(response_headers, sent_headers(sent), sent_headers(other_sent))

    def stored(self, store: Store, family: str, stored_key: str) -> None:
        """
        Keep the variants of ``family`` to what may still answer someone
        (see :func:`buildcache.engine.keys.variants_to_drop`).
        """
        siblings = [
            (entry.key, entry.last_access)
            for entry in store.entries_under(family + VARIANT_MARK, limit=64)
        ]
        base = store.peek(family)
        if base is not None:
            siblings.append((base.key, base.last_access))
        for key in variants_to_drop(family, stored_key, siblings):
            self.log.info("Dropping variant {key} of {family}", key=key, family=family)
            store.remove(key)


#: The rule of every URL key.
URL_VARIANTS = UrlVariants()
