"""The cache stores: one contract suite over both, then what is particular to each."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import redis.asyncio

from cache_service.stores import (
    CacheStore,
    MemoryStore,
    RedisStore,
    StoreUnavailable,
    fill_lock_key,
    mask_url,
    model_index,
    tenant_index,
)
from llmmesh.cache_key import cache_key
from llmmesh.errors import Unavailable
from llmmesh.server import free_port
from llmmesh.v1 import generate_pb2
from llmmesh.validation import Limits
from tests.harness import RedisServer, assert_eventually

LIMITS = Limits()
# Generous for a loaded test machine; an unreachable Redis fails far faster than this.
OP_TIMEOUT = 0.25


def key_for(prompt: str, *, tenant: str = "default", model: str = "m1") -> str:
    request = generate_pb2.GenerateRequest(model=model, prompt=prompt)
    request.sampling.temperature = 0.0
    return cache_key(request, tenant=tenant, limits=LIMITS)


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class StoreCase:
    store: CacheStore
    #: Returns once ``key``, stored with a TTL of 1 s, has expired.
    expire: Callable[[str], Awaitable[None]]
    #: Returns once ``seconds`` have passed for the store's expiry of fill locks.
    lapse: Callable[[float], Awaitable[None]]


@pytest.fixture(params=["memory", "redis"])
async def case(request: pytest.FixtureRequest) -> AsyncIterator[StoreCase]:
    store: CacheStore
    if request.param == "memory":
        clock = FakeClock()
        store = MemoryStore(clock=clock)

        async def expire(key: str) -> None:
            clock.advance(1.0)

        async def lapse(seconds: float) -> None:
            clock.advance(seconds)

    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        store = RedisStore(server.url, timeout=OP_TIMEOUT)

        async def expire(key: str) -> None:
            async def gone() -> bool:
                return await store.get(key) is None

            await assert_eventually(gone, timeout=5, message=f"{key} did not expire")

        async def lapse(seconds: float) -> None:
            await asyncio.sleep(seconds)

    try:
        yield StoreCase(store, expire, lapse)
    finally:
        await store.close()


async def put(store: CacheStore, key: str, value: bytes, *, tenant: str, model: str) -> None:
    await store.set(key, value, ttl_s=300, tenant=tenant, model=model)


class TestStoreContract:
    """Both stores keep, expire, index and invalidate entries the same way."""

    async def test_round_trip(self, case: StoreCase) -> None:
        """A stored value comes back byte for byte; storing again replaces it."""
        key = key_for("hello")
        await put(case.store, key, b"\x00first\xff", tenant="t", model="m1")
        assert await case.store.get(key) == b"\x00first\xff"
        await put(case.store, key, b"second", tenant="t", model="m1")
        assert await case.store.get(key) == b"second"

    async def test_miss(self, case: StoreCase) -> None:
        """A key never stored is a miss."""
        assert await case.store.get(key_for("never stored")) is None

    async def test_entry_expires_after_its_ttl(self, case: StoreCase) -> None:
        """An entry is gone once its TTL has passed; one with a longer TTL stays."""
        short, long = key_for("short"), key_for("long")
        await case.store.set(short, b"s", ttl_s=1, tenant="t", model="m1")
        await case.store.set(long, b"l", ttl_s=300, tenant="t", model="m1")
        assert await case.store.get(short) == b"s"
        await case.expire(short)
        assert await case.store.get(short) is None
        assert await case.store.get(long) == b"l"

    async def test_delete_removes_only_that_key(self, case: StoreCase) -> None:
        """Deleting a key removes its entry, counts it once, and leaves the others."""
        a, b = key_for("a"), key_for("b")
        await put(case.store, a, b"a", tenant="t", model="m1")
        await put(case.store, b, b"b", tenant="t", model="m1")
        assert await case.store.delete(a) == 1
        assert await case.store.delete(a) == 0
        assert await case.store.get(a) is None
        assert await case.store.get(b) == b"b"

    async def test_delete_model_removes_exactly_that_models_entries(self, case: StoreCase) -> None:
        """Invalidating a model removes its entries of every tenant and nothing else."""
        keys = {
            (tenant, model): key_for("p", tenant=tenant, model=model)
            for tenant in ("t1", "t2")
            for model in ("m1", "m2")
        }
        for (tenant, model), key in keys.items():
            await put(case.store, key, f"{tenant}/{model}".encode(), tenant=tenant, model=model)
        assert await case.store.delete_model("m1") == 2
        assert await case.store.delete_model("m1") == 0
        for (tenant, model), key in keys.items():
            expected = None if model == "m1" else f"{tenant}/{model}".encode()
            assert await case.store.get(key) == expected
        # The deleted keys left the tenants' indexes: only the m2 entry of t1 is counted now.
        assert await case.store.delete_tenant("t1") == 1
        assert await case.store.get(keys["t2", "m2"]) == b"t2/m2"

    async def test_delete_tenant_removes_exactly_that_tenants_entries(
        self, case: StoreCase
    ) -> None:
        """Invalidating a tenant removes its entries of every model and nothing else."""
        keys = {
            (tenant, model): key_for("p", tenant=tenant, model=model)
            for tenant in ("t1", "t2")
            for model in ("m1", "m2")
        }
        for (tenant, model), key in keys.items():
            await put(case.store, key, b"v", tenant=tenant, model=model)
        assert await case.store.delete_tenant("t2") == 2
        assert await case.store.delete_tenant("t2") == 0
        for (tenant, _model), key in keys.items():
            assert (await case.store.get(key) is None) == (tenant == "t2")
        assert await case.store.delete_model("m1") == 1
        assert await case.store.delete_model("unknown") == 0
        assert await case.store.delete_tenant("unknown") == 0

    async def test_invalidation_does_not_count_expired_entries(self, case: StoreCase) -> None:
        """Entries that expired before an invalidation are tolerated and not counted."""
        gone, live = key_for("gone"), key_for("live")
        await case.store.set(gone, b"g", ttl_s=1, tenant="t", model="m1")
        await case.store.set(live, b"l", ttl_s=300, tenant="t", model="m1")
        await case.expire(gone)
        assert await case.store.delete_model("m1") == 1
        assert await case.store.get(live) is None

    async def test_a_tenant_never_sees_another_tenants_entry(self, case: StoreCase) -> None:
        """The same request has another key under another tenant, where it misses."""
        mine = key_for("same request", tenant="acme")
        theirs = key_for("same request", tenant="evil")
        assert mine != theirs
        await put(case.store, mine, b"acme's answer", tenant="acme", model="m1")
        assert await case.store.get(theirs) is None
        assert await case.store.get(mine) == b"acme's answer"

    async def test_size_counts_entries(self, case: StoreCase) -> None:
        """size() counts live entries and reports bytes in use."""
        assert (await case.store.size()).entries == 0
        for i in range(3):
            await put(case.store, key_for(f"p{i}"), b"x" * 100, tenant="t", model="m1")
        size = await case.store.size()
        assert size.entries == 3
        assert size.bytes >= 300
        await case.store.delete(key_for("p0"))
        assert (await case.store.size()).entries == 2

    async def test_ping(self, case: StoreCase) -> None:
        """ping() returns when the store is reachable."""
        await case.store.ping()


#: Short enough to wait out on a real Redis, long enough not to lapse between two operations.
LOCK_TTL_MS = 300


class TestFillLockContract:
    """Both stores keep fill locks (single-flight across routers) the same way."""

    async def test_a_miss_claims_and_a_second_claim_is_refused(self, case: StoreCase) -> None:
        """The first miss gets a token; while it holds the lock, others get neither."""
        key = key_for("claimed")
        first = await case.store.get_or_claim(key, lock_ttl_ms=5000)
        assert first.value is None
        assert first.token
        assert await case.store.get_or_claim(key, lock_ttl_ms=5000) == (None, None)
        # The lock is not an entry.
        assert await case.store.get(key) is None
        assert (await case.store.size()).entries == 0

    async def test_a_hit_answers_the_entry_and_takes_no_lock(self, case: StoreCase) -> None:
        key = key_for("stored")
        await put(case.store, key, b"answer", tenant="t", model="m1")
        assert await case.store.get_or_claim(key, lock_ttl_ms=5000) == (b"answer", None)
        await case.store.delete(key)
        assert (await case.store.get_or_claim(key, lock_ttl_ms=5000)).token

    async def test_storing_with_the_token_releases_the_lock(self, case: StoreCase) -> None:
        """The owner's store writes the entry and frees the lock: the next claim finds the
        entry, and once the entry is gone, a new claim succeeds."""
        key = key_for("filled")
        token = (await case.store.get_or_claim(key, lock_ttl_ms=5000)).token
        assert token is not None
        stored = await case.store.set(
            key, b"filled", ttl_s=300, tenant="t", model="m1", fill_token=token
        )
        assert stored is True
        assert await case.store.get_or_claim(key, lock_ttl_ms=5000) == (b"filled", None)
        await case.store.delete(key)
        assert (await case.store.get_or_claim(key, lock_ttl_ms=5000)).token not in (None, token)

    async def test_a_waiter_sees_the_stored_entry(self, case: StoreCase) -> None:
        """await_fill waits while the owner generates and returns once it stores."""
        key = key_for("awaited")
        token = (await case.store.get_or_claim(key, lock_ttl_ms=5000)).token
        waiter = asyncio.create_task(case.store.await_fill(key, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await case.store.set(key, b"fresh", ttl_s=300, tenant="t", model="m1", fill_token=token)
        await asyncio.wait_for(waiter, timeout=2)
        assert await case.store.get_or_claim(key, lock_ttl_ms=5000) == (b"fresh", None)

    async def test_a_release_wakes_a_waiter_who_takes_over(self, case: StoreCase) -> None:
        key = key_for("released")
        token = (await case.store.get_or_claim(key, lock_ttl_ms=5000)).token
        assert token is not None
        waiter = asyncio.create_task(case.store.await_fill(key, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        assert await case.store.release_fill(key, token) is True
        await asyncio.wait_for(waiter, timeout=2)
        assert (await case.store.get_or_claim(key, lock_ttl_ms=5000)).token not in (None, token)

    async def test_expiry_lets_a_waiter_take_over(self, case: StoreCase) -> None:
        """An owner that never stores loses the lock after its TTL; a waiter wakes and claims,
        and the dead owner's token then does nothing."""
        key = key_for("abandoned")
        dead = (await case.store.get_or_claim(key, lock_ttl_ms=LOCK_TTL_MS)).token
        assert dead is not None
        waiter = asyncio.create_task(case.store.await_fill(key, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await case.lapse(2 * LOCK_TTL_MS / 1000)
        await asyncio.wait_for(waiter, timeout=2)
        heir = (await case.store.get_or_claim(key, lock_ttl_ms=5000)).token
        assert heir not in (None, dead)
        assert await case.store.release_fill(key, dead) is False
        assert await case.store.extend_fill(key, dead, lock_ttl_ms=5000) is False
        # A late store by the dead owner keeps its entry but leaves the heir's lock alone.
        assert (
            await case.store.set(key, b"late", ttl_s=300, tenant="t", model="m1", fill_token=dead)
            is False
        )
        assert await case.store.get(key) == b"late"
        assert await case.store.release_fill(key, heir) is True

    async def test_a_wrong_token_can_neither_release_nor_extend(self, case: StoreCase) -> None:
        key = key_for("guarded")
        token = (await case.store.get_or_claim(key, lock_ttl_ms=5000)).token
        assert token is not None
        assert await case.store.release_fill(key, "0" * 32) is False
        assert await case.store.extend_fill(key, "0" * 32, lock_ttl_ms=5000) is False
        assert await case.store.get_or_claim(key, lock_ttl_ms=5000) == (None, None)
        assert await case.store.release_fill(key, token) is True
        assert await case.store.release_fill(key, token) is False

    async def test_extending_keeps_the_lock_past_its_first_ttl(self, case: StoreCase) -> None:
        key = key_for("extended")
        token = (await case.store.get_or_claim(key, lock_ttl_ms=LOCK_TTL_MS)).token
        assert token is not None
        assert await case.store.extend_fill(key, token, lock_ttl_ms=10_000) is True
        await case.lapse(2 * LOCK_TTL_MS / 1000)
        assert await case.store.get_or_claim(key, lock_ttl_ms=5000) == (None, None)
        assert await case.store.extend_fill(key, token, lock_ttl_ms=5000) is True

    async def test_waiting_ends_at_its_timeout_while_the_lock_is_held(
        self, case: StoreCase
    ) -> None:
        key = key_for("slow owner")
        await case.store.get_or_claim(key, lock_ttl_ms=10_000)
        started = time.monotonic()
        await asyncio.wait_for(case.store.await_fill(key, timeout_s=0.1), timeout=2)
        assert time.monotonic() - started >= 0.09
        assert await case.store.get_or_claim(key, lock_ttl_ms=5000) == (None, None)

    async def test_waiting_returns_at_once_when_no_lock_is_held(self, case: StoreCase) -> None:
        await asyncio.wait_for(case.store.await_fill(key_for("free"), timeout_s=10), timeout=1)

    async def test_a_store_without_the_token_ends_the_wait(self, case: StoreCase) -> None:
        """An entry written by someone else (a router that took no lock) also ends the wait."""
        key = key_for("filled elsewhere")
        await case.store.get_or_claim(key, lock_ttl_ms=10_000)
        waiter = asyncio.create_task(case.store.await_fill(key, timeout_s=10))
        await asyncio.sleep(0.05)
        assert not waiter.done()
        await put(case.store, key, b"elsewhere", tenant="t", model="m1")
        await asyncio.wait_for(waiter, timeout=2)


class TestMemoryStore:
    """The in-process store is bounded and evicts the least recently used entries."""

    async def test_evicts_least_recently_used_beyond_max_entries(self) -> None:
        """Past max_entries, the entry read or written longest ago goes first."""
        store = MemoryStore(max_entries=2)
        a, b, c = key_for("a"), key_for("b"), key_for("c")
        await put(store, a, b"a", tenant="t", model="m1")
        await put(store, b, b"b", tenant="t", model="m1")
        assert await store.get(a) == b"a"  # a is now more recent than b
        await put(store, c, b"c", tenant="t", model="m1")
        assert await store.get(b) is None
        assert await store.get(a) == b"a"
        assert await store.get(c) == b"c"
        assert (await store.size()).entries == 2

    async def test_evicts_least_recently_used_beyond_max_bytes(self) -> None:
        """Past max_bytes (key plus value lengths), old entries go until the new one fits."""
        key_bytes = len(key_for("a"))
        store = MemoryStore(max_bytes=3 * (key_bytes + 100))
        keys = [key_for(str(i)) for i in range(4)]
        for key in keys[:3]:
            await put(store, key, b"x" * 100, tenant="t", model="m1")
        assert await store.size() == (3, 3 * (key_bytes + 100))
        await put(store, keys[3], b"y" * 150, tenant="t", model="m1")
        assert await store.get(keys[0]) is None
        assert await store.get(keys[1]) is None
        assert await store.get(keys[2]) == b"x" * 100
        assert await store.get(keys[3]) == b"y" * 150
        assert await store.size() == (2, 2 * key_bytes + 250)

    async def test_value_that_can_never_fit_is_not_kept(self) -> None:
        """A value larger than max_bytes is dropped without evicting anything."""
        store = MemoryStore(max_bytes=1000)
        kept, huge = key_for("kept"), key_for("huge")
        await put(store, kept, b"k", tenant="t", model="m1")
        await put(store, huge, b"h" * 1000, tenant="t", model="m1")
        assert await store.get(huge) is None
        assert await store.get(kept) == b"k"

    async def test_evicted_and_expired_entries_leave_the_indexes(self) -> None:
        """Entries evicted or expired are not counted by a later invalidation."""
        clock = FakeClock()
        store = MemoryStore(max_entries=2, clock=clock)
        await store.set(key_for("old"), b"o", ttl_s=1, tenant="t", model="m1")
        await put(store, key_for("a"), b"a", tenant="t", model="m1")
        await put(store, key_for("b"), b"b", tenant="t", model="m1")  # evicts "old"
        clock.advance(5)
        assert await store.size() == (2, 2 * (len(key_for("a")) + 1))
        assert await store.delete_tenant("t") == 2
        assert await store.size() == (0, 0)

    async def test_size_drops_expired_entries(self) -> None:
        """size() does not count entries whose TTL has passed."""
        clock = FakeClock()
        store = MemoryStore(clock=clock)
        await store.set(key_for("a"), b"a", ttl_s=10, tenant="t", model="m1")
        await store.set(key_for("b"), b"b", ttl_s=20, tenant="t", model="m1")
        clock.advance(10)
        assert (await store.size()).entries == 1

    async def test_rejects_a_ttl_below_one_second(self) -> None:
        """A TTL below 1 s is a programming error."""
        with pytest.raises(ValueError, match="ttl_s"):
            await MemoryStore().set(key_for("a"), b"a", ttl_s=0, tenant="t", model="m1")


@pytest.fixture
async def raw_redis(redis_server: RedisServer) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        yield client
    finally:
        await client.aclose()


def restart_on_same_port(old: RedisServer) -> RedisServer:
    new = RedisServer()
    new.port = old.port
    return new.start()


class TestRedisStore:
    """The Redis store's layout, its bounds, and how it rides out Redis going away."""

    async def test_indexes_are_written_with_the_entry_and_outlive_it(
        self, redis_server: RedisServer, raw_redis: redis.asyncio.Redis
    ) -> None:
        """The entry has the TTL asked for; both indexes list it and live at least as long."""
        store = RedisStore(redis_server.url, timeout=OP_TIMEOUT)
        try:
            key = key_for("p", tenant="t1")
            await store.set(key, b"v", ttl_s=100, tenant="t1", model="m1")
            await store.set(key_for("q", tenant="t1"), b"v", ttl_s=10, tenant="t1", model="m1")
            assert 90 < await raw_redis.ttl(key) <= 100
            for index in (model_index("m1"), tenant_index("t1")):
                assert await raw_redis.zcard(index) == 2
                assert await raw_redis.ttl(index) >= 100
        finally:
            await store.close()

    async def test_fill_locks_are_keys_with_a_px_expiry_and_survive_a_script_flush(
        self, redis_server: RedisServer, raw_redis: redis.asyncio.Redis
    ) -> None:
        """The lock is llmmesh:lock:<key> holding the token, with the TTL asked for; the scripts
        are loaded again when Redis forgot them (a restart, SCRIPT FLUSH), in a transaction too."""
        store = RedisStore(redis_server.url, timeout=OP_TIMEOUT)
        try:
            key = key_for("p")
            lock = fill_lock_key(key)
            token = (await store.get_or_claim(key, lock_ttl_ms=5000)).token
            assert token is not None
            assert lock == f"llmmesh:lock:{key}"
            assert await raw_redis.get(lock) == token.encode()
            assert 4000 < await raw_redis.pttl(lock) <= 5000
            await raw_redis.script_flush()
            assert await store.extend_fill(key, token, lock_ttl_ms=8000) is True
            assert 7000 < await raw_redis.pttl(lock) <= 8000
            await raw_redis.script_flush()
            assert await store.set(key, b"v", ttl_s=60, tenant="t", model="m1", fill_token=token)
            assert await raw_redis.exists(lock) == 0
            assert (await store.size()).entries == 1
        finally:
            await store.close()

    async def test_each_write_prunes_index_members_long_expired(
        self, redis_server: RedisServer, raw_redis: redis.asyncio.Redis
    ) -> None:
        """An index keeps members only while their entries may live (plus a slack)."""
        clock = FakeClock()
        store = RedisStore(redis_server.url, timeout=OP_TIMEOUT, clock=clock)
        try:
            await store.set(key_for("old"), b"o", ttl_s=1, tenant="t", model="m1")
            clock.advance(30)
            await store.set(key_for("recent"), b"r", ttl_s=1, tenant="t", model="m1")
            assert await raw_redis.zcard(model_index("m1")) == 2
            clock.advance(3600)
            await store.set(key_for("new"), b"n", ttl_s=1, tenant="t", model="m1")
            assert await raw_redis.zcard(model_index("m1")) == 1
            assert await raw_redis.zcard(tenant_index("t")) == 1
        finally:
            await store.close()

    async def test_fails_fast_while_redis_is_down_and_recovers_when_it_is_back(
        self, redis_server: RedisServer
    ) -> None:
        """Stopped, every operation fails fast; restarted on the same port, the store works."""
        store = RedisStore(redis_server.url, timeout=OP_TIMEOUT)
        key = key_for("p")
        try:
            await put(store, key, b"v", tenant="t", model="m1")
            redis_server.stop()
            operations: list[Callable[[], Awaitable[object]]] = [
                lambda: store.get(key),
                lambda: put(store, key, b"v", tenant="t", model="m1"),
                lambda: store.delete(key),
                lambda: store.delete_model("m1"),
                lambda: store.delete_tenant("t"),
                store.size,
                store.ping,
            ]
            for operation in operations:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as raised:
                    await operation()
                assert time.monotonic() - started < 1.0
                assert isinstance(raised.value, Unavailable)
                # The address is for the logs (where), not for callers (message).
                assert f"127.0.0.1:{redis_server.port}" not in raised.value.message
                assert raised.value.message.startswith("cache store redis unavailable: ")
                assert raised.value.where == f"redis://127.0.0.1:{redis_server.port}/0"

            restarted = restart_on_same_port(redis_server)
            try:
                assert await store.get(key) is None  # a fresh server starts empty
                await put(store, key, b"again", tenant="t", model="m1")
                assert await store.get(key) == b"again"
            finally:
                restarted.close()
        finally:
            await store.close()

    async def test_pooled_connections_survive_a_quick_restart(
        self, redis_server: RedisServer
    ) -> None:
        """After a restart nobody noticed, the first operation reconnects instead of failing."""
        store = RedisStore(redis_server.url, timeout=OP_TIMEOUT, max_connections=4)
        keys = [key_for(str(i)) for i in range(4)]
        try:
            # Open several pooled connections, all of which the restart leaves stale.
            await asyncio.gather(*(put(store, k, b"v", tenant="t", model="m1") for k in keys))
            redis_server.stop()
            restarted = restart_on_same_port(redis_server)
            try:
                values = await asyncio.gather(*(store.get(k) for k in keys))
                assert values == [None] * len(keys)
            finally:
                restarted.close()
        finally:
            await store.close()

    async def test_a_hung_redis_times_out_within_the_operation_timeout(
        self, redis_server: RedisServer
    ) -> None:
        """A Redis that accepts but never answers (SIGSTOP) costs at most about the timeout."""
        assert redis_server.proc is not None
        store = RedisStore(redis_server.url, timeout=OP_TIMEOUT)
        key = key_for("p")
        try:
            await put(store, key, b"v", tenant="t", model="m1")
            redis_server.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="get failed"):
                    await store.get(key)
                assert time.monotonic() - started < 1.0
            finally:
                redis_server.proc.send_signal(signal.SIGCONT)
            assert await store.get(key) == b"v"
        finally:
            await store.close()

    async def test_errors_never_show_the_password(self) -> None:
        """A StoreUnavailable names no address; its ``where`` (for logs) has the password masked."""
        port = free_port()
        store = RedisStore(f"redis://:s3cret@127.0.0.1:{port}/0", timeout=OP_TIMEOUT)
        try:
            with pytest.raises(StoreUnavailable) as raised:
                await store.ping()
            assert "s3cret" not in str(raised.value)
            assert str(port) not in raised.value.message
            assert raised.value.message == (
                "cache store redis unavailable: ping failed: cannot connect (Connection refused)"
            )
            assert raised.value.where == f"redis://:***@127.0.0.1:{port}/0"
        finally:
            await store.close()

    def test_mask_url(self) -> None:
        """mask_url hides passwords in the user info and in a password query parameter."""
        assert mask_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
        assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
        assert mask_url("rediss://user:pw@h:1/0") == "rediss://user:***@h:1/0"
        assert mask_url("unix:///run/redis.sock?db=0&password=pw") == (
            "unix:///run/redis.sock?db=0&password=***"
        )

    async def test_concurrent_operations_share_the_pool(self, redis_server: RedisServer) -> None:
        """More concurrent operations than pooled connections wait for one instead of failing."""
        store = RedisStore(redis_server.url, timeout=2.0, max_connections=2)
        try:
            keys = [key_for(str(i)) for i in range(20)]
            await asyncio.gather(
                *(put(store, key, key.encode(), tenant="t", model="m1") for key in keys)
            )
            values = await asyncio.gather(*(store.get(key) for key in keys))
            assert values == [key.encode() for key in keys]
        finally:
            await store.close()
