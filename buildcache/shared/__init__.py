"""
The shared tier: an S3-compatible bucket that several buildcache nodes
share behind their own disks (issue 15).  :func:`make_tier` builds the
:class:`S3Tier` the fetcher asks (:mod:`buildcache.fetch.shared`) from an
:class:`S3Location` (:func:`parse_shared_store`); its state for the status
page is a :class:`SharedTierStatus`.

The parts: :mod:`~buildcache.shared.location` (the ``s3://`` URL),
:mod:`~buildcache.shared.s3` (presigned requests, streamed),
:mod:`~buildcache.shared.records` (object names, signed records, the read
rules), :mod:`~buildcache.shared.leases` (one download across nodes),
:mod:`~buildcache.shared.tier` (the tier itself).
"""

from buildcache.shared.location import S3Location, parse_shared_store
from buildcache.shared.s3 import ObjectInfo, ObjectStore, SharedStoreError, object_store
from buildcache.shared.tier import S3Tier, SharedTierStatus, default_node, make_tier

__all__ = [
    "ObjectInfo",
    "ObjectStore",
    "S3Location",
    "S3Tier",
    "SharedStoreError",
    "SharedTierStatus",
    "default_node",
    "make_tier",
    "object_store",
    "parse_shared_store",
]
