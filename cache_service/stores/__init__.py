"""Where the cache service keeps entries: one :class:`CacheStore` interface, two stores.

- :class:`RedisStore`: Redis through redis-py asyncio (deployments);
- :class:`MemoryStore`: an in-process bounded LRU with TTL (``llm-mesh up`` without Redis, tests).

Both raise :class:`StoreUnavailable` (an :class:`llmmesh.errors.Unavailable`) when they cannot
serve.
"""

from cache_service.stores._base import CacheStore, Claim, StoreSize, StoreUnavailable
from cache_service.stores._memory import MemoryStore
from cache_service.stores._redis import (
    RedisStore,
    fill_lock_key,
    mask_url,
    model_index,
    tenant_index,
)

__all__ = [
    "CacheStore",
    "Claim",
    "MemoryStore",
    "RedisStore",
    "StoreSize",
    "StoreUnavailable",
    "fill_lock_key",
    "mask_url",
    "model_index",
    "tenant_index",
]
