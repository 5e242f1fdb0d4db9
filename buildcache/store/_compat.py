"""
Running totals the store used to keep for the status page; they are
events to the observer now.  This module lets the code that still bumps
them run until it is merged.  # removed after merge
"""

from __future__ import annotations

from attrs import define


@define
class Counters:  # removed after merge
    hits: int = 0
    misses: int = 0
    revalidations: int = 0
    bytes_from_cache: int = 0
    bytes_from_upstream: int = 0
    evictions: int = 0
    prefetches: int = 0
    prefetch_hits: int = 0
