"""
The cache engine: lookup, the freshness decision, revalidation, stale
serving, the miss through the fetcher, and the response, for every front
end.

- :mod:`~buildcache.engine.core`: :class:`~buildcache.engine.core.Engine`,
  the flow (``serve``, ``resolve``, ``respond``);
- :mod:`~buildcache.engine.policy`: what an ecosystem tells the engine
  (:class:`~buildcache.engine.policy.Policy`,
  :class:`~buildcache.engine.policy.Target`);
- :mod:`~buildcache.engine.errors`: the failure -> status table;
- :mod:`~buildcache.engine.exchanges`: accounting of client requests;
- :mod:`~buildcache.engine.freshness`, :mod:`~buildcache.engine.conditional`,
  :mod:`~buildcache.engine.fields`: the HTTP rules (RFC 9110/9111);
- :mod:`~buildcache.engine.keys`: store keys, credentials' families,
  ``Vary`` variants;
- :mod:`~buildcache.engine.respond`, :mod:`~buildcache.engine.body`:
  answering a request from the store or a download;
- :mod:`~buildcache.engine.events`: what the engine tells operations.
"""
