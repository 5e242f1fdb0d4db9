"""
The durable cache store: object files under a cache directory, their
metadata in an SQLite index, LRU eviction under a size limit, start-up
reconciliation, a read-only view for other processes, and the offline
operations on a whole directory.

The store knows nothing of the front ends: keys are opaque strings, and
headers stored with an entry an opaque mapping they replay.  It keeps no
counters; it tells :attr:`Store.on_evicted` of evictions.

The parts, bottom up: :mod:`~buildcache.store.layout` (where files live),
:mod:`~buildcache.store.schema` (the index, its migrations, the secret),
:mod:`~buildcache.store.objects` (writing a body),
:mod:`~buildcache.store.reader` (look-ups, the read-only store),
:mod:`~buildcache.store.core` (the writing :class:`Store`) and
:mod:`~buildcache.store.maintenance` (removal order, reconciliation, and
the offline :class:`OfflineIndex` the ``buildcache`` command works on).
"""

from buildcache.store.batch import COMMIT_DELAY
from buildcache.store.core import Store
from buildcache.store.layout import INDEX_NAME, SECRET_NAME, object_name
from buildcache.store.maintenance import (
    BodyCheck,
    CacheStats,
    KindTotal,
    OfflineIndex,
    PurgeResult,
    check_body,
    collect_stats,
    purge,
    verify_bodies,
)
from buildcache.store.objects import (
    SPARE_TEMP_FILES,
    UNCOUNTED_LIMIT,
    BackgroundHashes,
    BlockingRunner,
    DigestBeside,
    IntegrityError,
    NoRoom,
    ObjectWriter,
    StoredObject,
    in_thread_pool,
    mismatch,
    object_limit,
    run_here,
    uncounted_limit,
)
from buildcache.store.reader import (
    ROWS_BYTES_KEPT,
    ROWS_KEPT,
    ReadOnlyStore,
    StoreReader,
    StoreStats,
)
from buildcache.store.schema import (
    APPLICATION_ID,
    MAX_STORED_HEADERS,
    MIGRATIONS,
    ROW_OVERHEAD,
    SCHEMA_VERSION,
    SECRET_SIZE,
    Entry,
    Migration,
    StoreError,
    cache_secret,
    headers_storable,
    metadata_size,
    migrate_index,
    open_index,
    open_index_read_only,
)

__all__ = [
    "COMMIT_DELAY",
    "BackgroundHashes",
    "DigestBeside",
    "APPLICATION_ID",
    "BlockingRunner",
    "BodyCheck",
    "CacheStats",
    "Entry",
    "INDEX_NAME",
    "IntegrityError",
    "KindTotal",
    "MAX_STORED_HEADERS",
    "MIGRATIONS",
    "Migration",
    "NoRoom",
    "ObjectWriter",
    "OfflineIndex",
    "PurgeResult",
    "ROWS_BYTES_KEPT",
    "ROWS_KEPT",
    "ROW_OVERHEAD",
    "ReadOnlyStore",
    "SCHEMA_VERSION",
    "SECRET_NAME",
    "SECRET_SIZE",
    "SPARE_TEMP_FILES",
    "Store",
    "StoreError",
    "StoreReader",
    "StoreStats",
    "StoredObject",
    "UNCOUNTED_LIMIT",
    "cache_secret",
    "check_body",
    "collect_stats",
    "headers_storable",
    "in_thread_pool",
    "metadata_size",
    "migrate_index",
    "mismatch",
    "object_limit",
    "object_name",
    "open_index",
    "open_index_read_only",
    "purge",
    "run_here",
    "uncounted_limit",
    "verify_bodies",
]
