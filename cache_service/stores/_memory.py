"""An in-process cache store: a bounded LRU with per-entry TTL and tenant/model indexes.

It has the same semantics as the Redis store, so ``llm-mesh up`` behaves the same on a machine
without Redis:

- an entry lives ``ttl_s`` seconds; expiry is checked on read (an expired entry is a miss and is
  removed then) and by :meth:`MemoryStore.size`;
- at most ``max_entries`` entries and ``max_bytes`` bytes (key plus value lengths) are kept; the
  least recently used entries (read or written) are evicted to make room, and a value that could
  never fit is not kept;
- entries are indexed by model and by tenant for invalidation, and leave both indexes however they
  go (deleted, expired, evicted, replaced).

Everything runs on the event loop without awaiting, so no lock is needed. The clock is injectable
so that tests expire entries without waiting.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cache_service.stores._base import StoreSize

MiB = 1024 * 1024


@dataclass(slots=True)
class _Item:
    value: bytes
    expires_at: float
    tenant: str
    model: str
    cost: int


class MemoryStore:
    """A bounded in-process LRU with TTL. See the module docstring for the semantics."""

    name = "memory"

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        max_bytes: int = 256 * MiB,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries: {max_entries} is below 1")
        if max_bytes < 1:
            raise ValueError(f"max_bytes: {max_bytes} is below 1")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        # Least recently used first.
        self._items: OrderedDict[str, _Item] = OrderedDict()
        self._by_model: dict[str, set[str]] = {}
        self._by_tenant: dict[str, set[str]] = {}
        self._bytes = 0

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires_at <= self._clock():
            self._remove(key)
            return None
        self._items.move_to_end(key)
        return item.value

    async def set(self, key: str, value: bytes, *, ttl_s: int, tenant: str, model: str) -> None:
        if ttl_s < 1:
            raise ValueError(f"ttl_s: {ttl_s} is below 1")
        if key in self._items:
            self._remove(key)
        cost = len(key.encode()) + len(value)
        if cost > self.max_bytes:
            return
        self._items[key] = _Item(value, self._clock() + ttl_s, tenant, model, cost)
        self._bytes += cost
        self._by_model.setdefault(model, set()).add(key)
        self._by_tenant.setdefault(tenant, set()).add(key)
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            self._remove(next(iter(self._items)))

    async def delete(self, key: str) -> int:
        return self._remove_counting_live([key])

    async def delete_model(self, model: str) -> int:
        return self._remove_counting_live(list(self._by_model.get(model, ())))

    async def delete_tenant(self, tenant: str) -> int:
        return self._remove_counting_live(list(self._by_tenant.get(tenant, ())))

    async def size(self) -> StoreSize:
        """Entries and key-plus-value bytes, after dropping expired entries (O(entries))."""
        now = self._clock()
        for key in [k for k, item in self._items.items() if item.expires_at <= now]:
            self._remove(key)
        return StoreSize(entries=len(self._items), bytes=self._bytes)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._items.clear()
        self._by_model.clear()
        self._by_tenant.clear()
        self._bytes = 0

    def _remove_counting_live(self, keys: list[str]) -> int:
        now = self._clock()
        removed = 0
        for key in keys:
            item = self._remove(key)
            if item is not None and item.expires_at > now:
                removed += 1
        return removed

    def _remove(self, key: str) -> _Item | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self._bytes -= item.cost
        _discard(self._by_model, item.model, key)
        _discard(self._by_tenant, item.tenant, key)
        return item


def _discard(index: dict[str, set[str]], name: str, key: str) -> None:
    keys = index.get(name)
    if keys is not None:
        keys.discard(key)
        if not keys:
            del index[name]
