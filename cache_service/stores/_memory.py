"""An in-process cache store: a bounded LRU with per-entry TTL and tenant/model indexes.

It has the same semantics as the Redis store, so ``llm-mesh up`` behaves the same on a machine
without Redis:

- an entry lives ``ttl_s`` seconds; expiry is checked on read (an expired entry is a miss and is
  removed then) and by :meth:`MemoryStore.size`;
- at most ``max_entries`` entries and ``max_bytes`` bytes (key plus value lengths) are kept; the
  least recently used entries (read or written) are evicted to make room, and a value that could
  never fit is not kept;
- entries are indexed by model and by tenant for invalidation, and leave both indexes however they
  go (deleted, expired, evicted, replaced);
- fill locks (see :mod:`cache_service.stores._base`) live beside the entries, outside the LRU and
  its byte budget (there is at most one per request in flight); an expired lock is dropped when it
  is next looked at. A waiter wakes at once when a lock is released or stored with, and notices an
  expiry or an entry stored without the token within ``poll_interval_s``.

Everything but the waiting runs on the event loop without awaiting, so no lock is needed. The
clock is injectable so that tests expire entries and fill locks without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from cache_service.stores._base import Claim, StoreSize

MiB = 1024 * 1024


@dataclass(slots=True)
class _Item:
    value: bytes
    expires_at: float
    tenant: str
    model: str
    cost: int


@dataclass(slots=True)
class _FillLock:
    token: str
    expires_at: float
    #: Set when the lock is released (directly or by a store with its token) or found expired.
    gone: asyncio.Event = field(default_factory=asyncio.Event)


class MemoryStore:
    """A bounded in-process LRU with TTL. See the module docstring for the semantics."""

    name = "memory"

    def __init__(
        self,
        *,
        max_entries: int = 100_000,
        max_bytes: int = 256 * MiB,
        clock: Callable[[], float] = time.monotonic,
        poll_interval_s: float = 0.005,
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
        self._locks: dict[str, _FillLock] = {}
        self._poll_interval_s = poll_interval_s

    async def get(self, key: str) -> bytes | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires_at <= self._clock():
            self._remove(key)
            return None
        self._items.move_to_end(key)
        return item.value

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
        if ttl_s < 1:
            raise ValueError(f"ttl_s: {ttl_s} is below 1")
        if key in self._items:
            self._remove(key)
        released = fill_token is not None and self._release(key, fill_token)
        cost = len(key.encode()) + len(value)
        if cost > self.max_bytes:
            return released
        self._items[key] = _Item(value, self._clock() + ttl_s, tenant, model, cost)
        self._bytes += cost
        self._by_model.setdefault(model, set()).add(key)
        self._by_tenant.setdefault(tenant, set()).add(key)
        while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
            self._remove(next(iter(self._items)))
        return released

    async def get_or_claim(self, key: str, *, lock_ttl_ms: int) -> Claim:
        value = await self.get(key)
        if value is not None:
            return Claim(value, None)
        if self._live_lock(key) is not None:
            return Claim(None, None)
        token = secrets.token_hex(16)
        self._locks[key] = _FillLock(token, self._clock() + lock_ttl_ms / 1000.0)
        return Claim(None, token)

    async def release_fill(self, key: str, token: str) -> bool:
        return self._release(key, token)

    async def extend_fill(self, key: str, token: str, *, lock_ttl_ms: int) -> bool:
        lock = self._live_lock(key)
        if lock is None or lock.token != token:
            return False
        lock.expires_at = self._clock() + lock_ttl_ms / 1000.0
        return True

    async def await_fill(self, key: str, *, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            lock = self._live_lock(key)
            if lock is None or self._has_live_entry(key):
                return
            left = deadline - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lock.gone.wait(), min(left, self._poll_interval_s))

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
        for lock in self._locks.values():
            lock.gone.set()
        self._locks.clear()
        self._items.clear()
        self._by_model.clear()
        self._by_tenant.clear()
        self._bytes = 0

    def _has_live_entry(self, key: str) -> bool:
        item = self._items.get(key)
        return item is not None and item.expires_at > self._clock()

    def _live_lock(self, key: str) -> _FillLock | None:
        """The fill lock of ``key`` unless there is none or it has expired (then dropped)."""
        lock = self._locks.get(key)
        if lock is not None and lock.expires_at <= self._clock():
            del self._locks[key]
            lock.gone.set()
            return None
        return lock

    def _release(self, key: str, token: str) -> bool:
        lock = self._live_lock(key)
        if lock is None or lock.token != token:
            return False
        del self._locks[key]
        lock.gone.set()
        return True

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
