"""The llm-mesh cache service: ``llmmesh.v1.Cache`` (Lookup, Store, Invalidate, Stats).

Routers ask it for finished deterministic answers before dispatching, and store them after. It
keeps entries in Redis (``--store redis``, the default) or in an in-process bounded LRU
(``--store memory``); see :mod:`cache_service.stores`. Start it with ``python -m cache_service``.
"""

from cache_service._config import CacheConfig, load_config
from cache_service._service import (
    REQUEST_ID_METADATA_KEY,
    CacheApp,
    CacheServicer,
    StoreHealth,
    open_store,
)
from cache_service.stores import CacheStore, MemoryStore, RedisStore, StoreSize, StoreUnavailable

__all__ = [
    "REQUEST_ID_METADATA_KEY",
    "CacheApp",
    "CacheConfig",
    "CacheServicer",
    "CacheStore",
    "MemoryStore",
    "RedisStore",
    "StoreHealth",
    "StoreSize",
    "StoreUnavailable",
    "load_config",
    "open_store",
]
