"""The Redis cache store, on redis-py asyncio (with the hiredis parser when it is installed).

Layout in Redis::

    llmmesh:v1:<sha256>              STRING  the serialized CacheEntry, SET ... EX <ttl>
    llmmesh:idx:model:<model>        ZSET    members ["<key>", "<tenant>"], score = expiry (unix s)
    llmmesh:idx:tenant:<tenant>      ZSET    members ["<key>", "<model>"],  score = expiry (unix s)
    llmmesh:lock:<key>               STRING  the fill lock: its owner's random token, SET NX PX

An entry and its two index memberships are written in one MULTI/EXEC transaction. Each index's own
TTL is raised to at least the entry's (``EXPIRE NX`` then ``EXPIRE GT``, Redis >= 7), so an index
outlives its members and then goes away. The index sets are sorted by expiry so that every write
also drops members that expired more than ``INDEX_SLACK_S`` ago (``ZREMRANGEBYSCORE``): a model
written to all day keeps an index the size of its live entries, not of its whole history. The
slack absorbs clock skew between this process and Redis. Each member also names the entry's other
index, so invalidating a model removes the deleted keys from their tenants' indexes and the other
way round. Deleting a single key leaves its index members behind until they are pruned; they are
harmless, because invalidation counts what ``DEL`` actually removed.

Every operation is bounded: sockets connect and read under the operation timeout, the pool waits
for a free connection no longer than that, and the whole operation (including one immediate retry
on a fresh connection, which is how a restarted Redis is reconnected to transparently) runs under
:func:`asyncio.timeout`. Bulk operations (invalidation by model or tenant, ``size``) get a longer
bound. All redis and socket errors are translated into :class:`StoreUnavailable` in one place,
:meth:`RedisStore._translating_errors`.

Fill locks (see :mod:`cache_service.stores._base`) are taken by a Lua script that answers the
entry when there is one and otherwise runs ``SET lock token NX PX ttl``, so that a lookup and a
claim are one step; released and renewed by compare-and-delete and compare-and-``PEXPIRE`` scripts
(redis-py's ``register_script``: EVALSHA, loading the script when Redis does not know it); and a
store with the owner's token runs the compare-and-delete inside the entry's MULTI/EXEC. Waiters poll
``EXISTS`` on the lock and the entry every ``poll_interval_s`` (one round trip each), which keeps
Redis free of per-waiter state; with single-flight in each router there is at most one waiter per
key and router. The two keys of a script are not in one hash slot, so this layout needs a single
Redis (or a proxy that routes scripts), not Redis Cluster.

If Redis evicts keys under ``maxmemory``, an evicted index makes invalidation miss entries until
they expire; give Redis the memory the TTLs need, or prefer a ``volatile-*`` eviction policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    BusyLoadingError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cache_service.stores._base import Claim, StoreSize, StoreUnavailable

#: Glob of entry keys (llmmesh/cache_key.py: ``llmmesh:v<N>:<hex>``); index keys do not match it.
ENTRY_KEY_PATTERN = "llmmesh:v[0-9]*"
MODEL_INDEX_PREFIX = "llmmesh:idx:model:"
TENANT_INDEX_PREFIX = "llmmesh:idx:tenant:"
#: Index members are pruned this long after their entry expired, and indexes outlive entries by it.
INDEX_SLACK_S = 60
#: Keys deleted per transaction when invalidating by model or tenant.
DELETE_BATCH = 500
FILL_LOCK_PREFIX = "llmmesh:lock:"

#: KEYS: entry, lock; ARGV: token, ttl ms. {1, value} on a hit, {2} when claimed, {0} when held.
_GET_OR_CLAIM = """
local value = redis.call('GET', KEYS[1])
if value then return {1, value} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""
#: KEYS: lock; ARGV: token. 1 when released, else 0.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
#: KEYS: lock; ARGV: token, ttl ms. 1 when renewed, else 0.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""


def model_index(model: str) -> str:
    """The Redis key of the index of one model's entries."""
    return MODEL_INDEX_PREFIX + model


def tenant_index(tenant: str) -> str:
    """The Redis key of the index of one tenant's entries."""
    return TENANT_INDEX_PREFIX + tenant


def _plain_cause(exc: BaseException) -> str:
    """What went wrong, in words that name no address: callers see it (redis-py's own messages
    name the host and port; the logs have the URL)."""
    if isinstance(exc, AuthenticationError):
        return "authentication failed"
    if isinstance(exc, BusyLoadingError):
        return "Redis is loading its data set"
    if isinstance(exc, RedisTimeoutError):
        return "timed out"
    if isinstance(exc, RedisConnectionError | OSError):
        reason = exc if isinstance(exc, OSError) else (exc.__cause__ or exc.__context__)
        if not isinstance(reason, OSError):
            return "cannot connect"
        # asyncio's strerror names the address ("Connect call failed ('10.0.0.5', 6379)"); the
        # errno's own words do not. A failed name lookup has a negative errno and plain words.
        errno = reason.errno or 0
        words = os.strerror(errno) if errno > 0 else reason.strerror
        return f"cannot connect ({words})" if words else "cannot connect"
    if isinstance(exc, ResponseError):
        # An error reply from the server (e.g. OOM): its words, which name no address.
        return f"error reply: {exc}"
    return type(exc).__name__


def mask_url(url: str) -> str:
    """``url`` with its password (in the user info or a ``password=`` query) replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    masked = url
    if "@" in parts.netloc:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:
            masked = masked.replace(parts.netloc, f"{user}:***@{hostinfo}", 1)
    if parts.query:
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = urlencode(
            [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*"
        )
        masked = masked.replace("?" + parts.query, "?" + query, 1)
    return masked


def fill_lock_key(key: str) -> str:
    """The Redis key of the fill lock of the entry under ``key``."""
    return FILL_LOCK_PREFIX + key


def _member(key: str, other: str) -> str:
    return json.dumps([key, other], separators=(",", ":"), ensure_ascii=False)


def _parse_member(member: bytes) -> tuple[str, str] | None:
    try:
        key, other = json.loads(member)
    except (ValueError, TypeError):
        return None
    if not isinstance(key, str) or not isinstance(other, str):
        return None
    return key, other


class RedisStore:
    """Cache entries in Redis. See the module docstring for the layout and the bounds."""

    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 0.1,
        bulk_timeout: float = 5.0,
        max_connections: int = 64,
        health_check_interval: float = 15.0,
        clock: Callable[[], float] = time.time,
        poll_interval_s: float = 0.005,
    ) -> None:
        """Configure the client; nothing connects until the first operation.

        ``timeout`` bounds every single-key operation and each socket connect and read (seconds);
        ``bulk_timeout`` bounds invalidation by model or tenant and ``size``. ``clock`` gives the
        unix time used to score index members. ``poll_interval_s`` is how often a waiter for a fill
        lock asks whether it is gone.
        """
        self.url = mask_url(url)
        self.timeout = timeout
        self.bulk_timeout = max(bulk_timeout, timeout)
        self._clock = clock
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            health_check_interval=health_check_interval,
            retry=Retry(NoBackoff(), retries=1),
            client_name="llmmesh-cache",
        )
        self._redis = Redis.from_pool(pool)
        self._poll_interval_s = poll_interval_s
        self._get_or_claim = self._redis.register_script(_GET_OR_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._extend = self._redis.register_script(_EXTEND)

    @contextlib.asynccontextmanager
    async def _translating_errors(self, op: str, timeout: float) -> AsyncIterator[None]:
        """Bound the block by ``timeout`` and turn any store failure into StoreUnavailable."""
        try:
            async with asyncio.timeout(timeout):
                yield
        except TimeoutError as exc:  # asyncio.timeout; redis' own TimeoutError is a RedisError
            cause = f"no answer within {timeout * 1000:g} ms"
            raise StoreUnavailable(self.name, op, cause, where=self.url) from exc
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(self.name, op, _plain_cause(exc), where=self.url) from exc

    async def get(self, key: str) -> bytes | None:
        async with self._translating_errors("get", self.timeout):
            return cast(bytes | None, await self._redis.get(key))

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
        now = self._clock()
        index_ttl = ttl_s + INDEX_SLACK_S
        async with (
            self._translating_errors("set", self.timeout),
            self._redis.pipeline(transaction=True) as pipe,
        ):
            pipe.set(key, value, ex=ttl_s)
            for index, other in ((model_index(model), tenant), (tenant_index(tenant), model)):
                pipe.zadd(index, {_member(key, other): now + ttl_s})
                pipe.zremrangebyscore(index, "-inf", now - INDEX_SLACK_S)
                pipe.expire(index, index_ttl, nx=True)
                pipe.expire(index, index_ttl, gt=True)
            if fill_token is not None:
                await self._release(keys=[fill_lock_key(key)], args=[fill_token], client=pipe)
            results: list[Any] = await pipe.execute()
        return fill_token is not None and int(results[-1]) == 1

    async def get_or_claim(self, key: str, *, lock_ttl_ms: int) -> Claim:
        token = secrets.token_hex(16)
        async with self._translating_errors("get_or_claim", self.timeout):
            reply = cast(
                list[Any],
                await self._get_or_claim(keys=[key, fill_lock_key(key)], args=[token, lock_ttl_ms]),
            )
        if reply[0] == 1:
            return Claim(cast(bytes, reply[1]), None)
        return Claim(None, token if reply[0] == 2 else None)

    async def release_fill(self, key: str, token: str) -> bool:
        async with self._translating_errors("release_fill", self.timeout):
            released = await self._release(keys=[fill_lock_key(key)], args=[token])
        return int(released) == 1

    async def extend_fill(self, key: str, token: str, *, lock_ttl_ms: int) -> bool:
        async with self._translating_errors("extend_fill", self.timeout):
            extended = await self._extend(keys=[fill_lock_key(key)], args=[token, lock_ttl_ms])
        return int(extended) == 1

    async def await_fill(self, key: str, *, timeout_s: float) -> None:
        """Poll the lock and the entry; each poll is bounded by the operation timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        lock = fill_lock_key(key)
        while True:
            async with (
                self._translating_errors("await_fill", self.timeout),
                self._redis.pipeline(transaction=False) as pipe,
            ):
                pipe.exists(lock)
                pipe.exists(key)
                held, stored = await pipe.execute()
            if not held or stored:
                return
            left = deadline - loop.time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, self._poll_interval_s))

    async def delete(self, key: str) -> int:
        async with self._translating_errors("delete", self.timeout):
            removed: int = await self._redis.delete(key)
        return removed

    async def delete_model(self, model: str) -> int:
        return await self._delete_indexed("delete_model", model, model_index, tenant_index)

    async def delete_tenant(self, tenant: str) -> int:
        return await self._delete_indexed("delete_tenant", tenant, tenant_index, model_index)

    async def _delete_indexed(
        self,
        op: str,
        name: str,
        index_of: Callable[[str], str],
        other_index_of: Callable[[str], str],
    ) -> int:
        """Delete the entries listed in ``index_of(name)`` now, and their other index members.

        Members are removed one by one rather than the index dropped, so an entry written while
        this runs stays indexed.
        """
        index = index_of(name)
        removed = 0
        async with self._translating_errors(op, self.bulk_timeout):
            members = cast(list[bytes], await self._redis.zrange(index, 0, -1))
            for start in range(0, len(members), DELETE_BATCH):
                batch = members[start : start + DELETE_BATCH]
                keys: list[str] = []
                by_other: dict[str, list[str]] = {}
                for member in batch:
                    parsed = _parse_member(member)
                    if parsed is None:
                        continue
                    key, other = parsed
                    keys.append(key)
                    by_other.setdefault(other, []).append(_member(key, name))
                async with self._redis.pipeline(transaction=True) as pipe:
                    if keys:
                        pipe.delete(*keys)
                    for other, other_members in by_other.items():
                        pipe.zrem(other_index_of(other), *other_members)
                    pipe.zrem(index, *batch)
                    results: list[Any] = await pipe.execute()
                if keys:
                    removed += int(results[0])
        return removed

    async def size(self) -> StoreSize:
        """Entries by SCAN over entry keys (O(keys in the database): for Stats only) and bytes as
        Redis' ``used_memory`` (the whole database, indexes and overhead included)."""
        async with self._translating_errors("size", self.bulk_timeout):
            entries = 0
            async for _ in self._redis.scan_iter(match=ENTRY_KEY_PATTERN, count=1000):
                entries += 1
            info: dict[str, Any] = await self._redis.info("memory")
        return StoreSize(entries=entries, bytes=int(info["used_memory"]))

    async def ping(self) -> None:
        async with self._translating_errors("ping", self.timeout):
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
