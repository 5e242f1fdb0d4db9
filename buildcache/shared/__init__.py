"""
The shared tier: an S3-compatible bucket that several buildcache nodes
share behind their own disks (issue 15).  :func:`make_tier` builds the
:class:`S3Tier` the fetcher asks (:mod:`buildcache.fetch.shared`).
"""
