"""Persistent kernel cache (sqlite) and the look-ups schedule reuse needs."""
from autocomp_compile.kernels_cache.store import CacheEntry, CacheError, KernelCache, cache_key

__all__ = ["CacheEntry", "CacheError", "KernelCache", "cache_key"]
