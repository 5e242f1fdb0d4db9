"""
Fetching from upstreams, below the engine and above the store:

- :mod:`~buildcache.fetch.fetcher`: single flight (:class:`Fetcher`), and
  the names other packages import;
- :mod:`~buildcache.fetch.request`: what a caller asks for
  (``UpstreamRequest``, its join rule and ``VariantRule``) and gets back
  (``UpstreamAnswer``);
- :mod:`~buildcache.fetch.download`: the download state machine;
  :mod:`~buildcache.fetch.receiver`: the protocol its body arrives on;
  :mod:`~buildcache.fetch.reader`: one client's view of a download;
- :mod:`~buildcache.fetch.client`: the HTTP client and header rules;
- :mod:`~buildcache.fetch.connect`: guarded connections;
  :mod:`~buildcache.fetch.headlimit`: bounded response heads;
- :mod:`~buildcache.fetch.errors`: failures and their statuses;
  :mod:`~buildcache.fetch.events`: what operations is told.
"""
