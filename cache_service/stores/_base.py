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

Each key also has a **fill lock** for single-flight across routers: :meth:`CacheStore.get_or_claim`
answers the entry when there is one and otherwise takes the lock (a random owner token, an expiry
in milliseconds) when nobody holds it, in one atomic step, so that an entry stored between a miss
and a claim is never missed. The owner stores with its token (:meth:`CacheStore.set` releases the
lock in the same step as it writes the entry), gives the lock up (:meth:`CacheStore.release_fill`)
or renews it (:meth:`CacheStore.extend_fill`); only the current owner's token does anything. Other
callers wait with :meth:`CacheStore.await_fill` until the entry exists or the lock is gone
(stored, released or expired), then ask again.

Any failure of the backing store (unreachable, timed out, an error reply) surfaces as
:class:`StoreUnavailable`, never as the client library's own exception.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from llmmesh.errors import Unavailable


class StoreUnavailable(Unavailable):
    """The backing store could not complete an operation; the message names store and cause.

    The message goes to callers, so it names no address: ``where`` (e.g. Redis' URL, password
    masked) is for the logs.
    """

    def __init__(self, store: str, op: str, cause: str, *, where: str = "") -> None:
        super().__init__(f"cache store {store} unavailable: {op} failed: {cause}")
        self.store = store
        self.op = op
        self.cause = cause
        self.where = where


class StoreSize(NamedTuple):
    """How much a store holds."""

    #: Entries currently stored.
    entries: int
    #: Bytes used, as the store measures them (see each store's ``size``).
    bytes: int


class Claim(NamedTuple):
    """What :meth:`CacheStore.get_or_claim` found: at most one of the two is set."""

    #: The entry, when there is one.
    value: bytes | None
    #: The owner token of the fill lock just taken; None on a hit or when another caller holds it.
    token: str | None


class CacheStore(Protocol):
    """Where the cache service keeps entries."""

    #: Short name reported in Stats and metrics: ``"redis"`` or ``"memory"``.
    name: str

    async def get(self, key: str) -> bytes | None:
        """The value under ``key``, or None when there is none or it has expired."""
        ...

    async def set(
        self,
        key: str,
        value: bytes,
        *,
        ttl_s: int,
        tenant: str,
        model: str,
        fill_token: str | None = None,
    ) -> bool:
        """Store ``value`` under ``key`` for ``ttl_s`` seconds, indexed by tenant and model.

        With ``fill_token``, the key's fill lock is released in the same atomic step when that
        token owns it. Returns whether a lock was released (always False without a token).
        """
        ...

    async def get_or_claim(self, key: str, *, lock_ttl_ms: int) -> Claim:
        """The value under ``key``; on a miss, take the key's fill lock for ``lock_ttl_ms`` when
        nobody holds it. Atomic: an entry and a lock are never both missed or both answered."""
        ...

    async def release_fill(self, key: str, token: str) -> bool:
        """Release the fill lock of ``key`` if ``token`` owns it; returns whether it did."""
        ...

    async def extend_fill(self, key: str, token: str, *, lock_ttl_ms: int) -> bool:
        """Make the fill lock of ``key`` expire ``lock_ttl_ms`` from now if ``token`` owns it;
        returns whether it does."""
        ...

    async def await_fill(self, key: str, *, timeout_s: float) -> None:
        """Return once ``key`` has an entry or its fill lock is gone (stored, released, expired),
        or after ``timeout_s``, whichever comes first. Never raises on the timeout."""
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
