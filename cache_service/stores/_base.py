"""The interface every cache store implements, and the one error a store raises.

A store keeps opaque values (serialized ``CacheEntry`` protobufs) under cache keys, each with a
time to live, and indexes every entry by the model that produced it and the tenant that owns it so
that :meth:`CacheStore.delete_model` and :meth:`CacheStore.delete_tenant` can find them. Two
implementations share the contract (tests/test_cache_stores.py runs one suite over both):

- :class:`~cache_service.stores.RedisStore`: Redis through redis-py asyncio, for deployments;
- :class:`~cache_service.stores.MemoryStore`: an in-process bounded LRU, for ``llm-mesh up`` on a
  machine without Redis, and for tests.

A key is assumed to belong to one (tenant, model) pair, which :func:`llmmesh.cache_key.cache_key`
guarantees (both are hashed into it).

Any failure of the backing store (unreachable, timed out, an error reply) surfaces as
:class:`StoreUnavailable`, never as the client library's own exception.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from llmmesh.errors import Unavailable


class StoreUnavailable(Unavailable):
    """The backing store could not complete an operation; the message names store and cause."""

    def __init__(self, store: str, op: str, cause: str) -> None:
        super().__init__(f"cache store {store} unavailable: {op} failed: {cause}")
        self.store = store
        self.op = op
        self.cause = cause


class StoreSize(NamedTuple):
    """How much a store holds."""

    #: Entries currently stored.
    entries: int
    #: Bytes used, as the store measures them (see each store's ``size``).
    bytes: int


class CacheStore(Protocol):
    """Where the cache service keeps entries."""

    #: Short name reported in Stats and metrics: ``"redis"`` or ``"memory"``.
    name: str

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None when there is none or it has expired."""
        ...

    async def set(self, key: str, value: bytes, *, ttl_s: int, tenant: str, model: str) -> None:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds, indexed by tenant and model."""
        ...

    async def delete(self, key: str) -> int:
        """Remove the entry under ``key``; returns how many live entries were removed (0 or 1)."""
        ...

    async def delete_model(self, model: str) -> int:
        """Remove every entry produced by ``model``; returns how many live entries were removed."""
        ...

    async def delete_tenant(self, tenant: str) -> int:
        """Remove every entry of ``tenant``; returns how many live entries were removed."""
        ...

    async def size(self) -> StoreSize:
        """Entries and bytes held now. May be O(entries): meant for Stats, not the hot path."""
        ...

    async def ping(self) -> None:
        """Return when the store is reachable; raise StoreUnavailable otherwise."""
        ...

    async def close(self) -> None:
        """Release connections. The store is unusable afterwards."""
        ...
