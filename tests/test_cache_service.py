"""The cache service as a real process: llmmesh.v1.Cache over gRPC, on Redis and in memory."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta

import grpc
import grpc.aio
import pytest
import redis.asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from cache_service import REQUEST_ID_METADATA_KEY, CacheConfig, load_config
from llmmesh.cache_key import cache_key
from llmmesh.server import free_port
from llmmesh.v1 import cache_pb2, cache_pb2_grpc, generate_pb2
from llmmesh.validation import Limits
from tests.harness import RedisServer, ServiceProcess, assert_eventually

LIMITS = Limits()
RPC_TIMEOUT = 5.0
# Small bounds so that the tests can cross them; a loaded machine still answers well within.
POLICY_ARGS = ["--default-ttl", "10m", "--max-ttl", "2h", "--max-value-bytes", "2048"]
POLICY_ARGS += ["--redis-timeout", "250ms", "--metrics-port", "0"]
POLICY_ARGS += ["--fill-lock-ttl", "4s", "--fill-lock-max-ttl", "10s", "--fill-max-wait", "20s"]
UNAVAILABLE_EVENT = "cache store unavailable"
RECOVERED_EVENT = "cache store recovered"


def key_for(prompt: str, *, tenant: str = "default", model: str = "m1") -> str:
    request = generate_pb2.GenerateRequest(model=model, prompt=prompt)
    request.sampling.seed = 7
    return cache_key(request, tenant=tenant, limits=LIMITS)


def entry(text: str, *, model: str = "m1", tenant: str = "default") -> cache_pb2.CacheEntry:
    return cache_pb2.CacheEntry(
        text=text,
        finish_reason=generate_pb2.FINISH_REASON_STOP,
        usage=generate_pb2.Usage(prompt_tokens=3, completion_tokens=5),
        created_at_ms=1_700_000_000_000,
        model_version="v1",
        worker_id="worker-1",
        model=model,
        tenant=tenant,
    )


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def events(service: ServiceProcess, event: str) -> list[dict[str, object]]:
    return [r for r in service.log_records() if r.get("event") == event]


@pytest.fixture(scope="module")
def memory_service() -> Iterator[ServiceProcess]:
    with ServiceProcess("cache_service", ["--store", "memory", *POLICY_ARGS]) as service:
        yield service


@pytest.fixture(scope="module")
def redis_service() -> Iterator[ServiceProcess]:
    server = RedisServer().start()
    try:
        args = ["--store", "redis", "--redis-url", server.url, *POLICY_ARGS]
        with ServiceProcess("cache_service", args) as service:
            yield service
    finally:
        server.close()


@pytest.fixture(params=["memory", "redis"])
def service(request: pytest.FixtureRequest) -> ServiceProcess:
    process: ServiceProcess = request.getfixturevalue(f"{request.param}_service")
    return process


@pytest.fixture
async def cache(service: ServiceProcess) -> AsyncIterator[cache_pb2_grpc.CacheAsyncStub]:
    async with grpc.aio.insecure_channel(service.address) as channel:
        yield cache_pb2_grpc.CacheStub(channel)


async def store(
    cache: cache_pb2_grpc.CacheAsyncStub, key: str, value: cache_pb2.CacheEntry, ttl: int = 0
) -> cache_pb2.StoreResponse:
    request = cache_pb2.StoreRequest(key=key, entry=value, ttl_seconds=ttl)
    return await cache.Store(request, timeout=RPC_TIMEOUT)


async def lookup(cache: cache_pb2_grpc.CacheAsyncStub, key: str) -> cache_pb2.LookupResponse:
    return await cache.Lookup(cache_pb2.LookupRequest(key=key), timeout=RPC_TIMEOUT)


async def stats(cache: cache_pb2_grpc.CacheAsyncStub) -> cache_pb2.StatsResponse:
    return await cache.Stats(cache_pb2.StatsRequest(), timeout=RPC_TIMEOUT)


async def invalidate(cache: cache_pb2_grpc.CacheAsyncStub, **selector: str) -> int:
    request = cache_pb2.InvalidateRequest(**selector)
    response = await cache.Invalidate(request, timeout=RPC_TIMEOUT)
    return response.removed


async def metric(service: ServiceProcess, name: str, **labels: str) -> float:
    url = f"http://127.0.0.1:{service.metrics_port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=RPC_TIMEOUT) as response:
            text: str = response.read().decode()
            return text

    for family in text_string_to_metric_families(await asyncio.to_thread(scrape)):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels}")


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


class TestCacheRpcs:
    """Lookup, Store, Invalidate and Stats behave the same over both stores."""

    async def test_stored_entry_is_found_and_others_miss(
        self, cache: cache_pb2_grpc.CacheAsyncStub
    ) -> None:
        """An entry stored under a key comes back whole; another key misses."""
        key = key_for(unique("p"))
        response = await store(cache, key, entry("the answer"))
        assert response.stored
        found = await lookup(cache, key)
        assert found.hit
        assert found.entry == entry("the answer")
        assert not (await lookup(cache, key_for(unique("other")))).hit

    async def test_stats_counters_move_exactly(
        self, cache: cache_pb2_grpc.CacheAsyncStub, service: ServiceProcess
    ) -> None:
        """Each lookup counts once as a hit or a miss; entries follow stores and invalidations."""
        before = await stats(cache)
        key = key_for(unique("p"))
        await lookup(cache, key)
        await store(cache, key, entry("a"))
        await lookup(cache, key)
        await lookup(cache, key)
        after = await stats(cache)
        assert (after.hits - before.hits, after.misses - before.misses) == (2, 1)
        assert after.errors == before.errors
        assert after.entries == before.entries + 1
        assert after.hit_ratio == pytest.approx(after.hits / (after.hits + after.misses))
        assert after.coalesced == before.coalesced
        assert after.store == ("redis" if "redis" in service.args else "memory")
        await invalidate(cache, key=key)
        assert (await stats(cache)).entries == before.entries

    async def test_ttl_defaults_and_is_capped(self, cache: cache_pb2_grpc.CacheAsyncStub) -> None:
        """ttl_seconds 0 gets the default TTL; a TTL above the maximum gets the maximum."""
        assert (await store(cache, key_for(unique("a")), entry("a"), ttl=0)).ttl_seconds == 600
        assert (await store(cache, key_for(unique("b")), entry("b"), ttl=300)).ttl_seconds == 300
        capped = await store(cache, key_for(unique("c")), entry("c"), ttl=10**6)
        assert (capped.stored, capped.ttl_seconds) == (True, 7200)

    async def test_value_larger_than_the_maximum_is_not_stored(
        self, cache: cache_pb2_grpc.CacheAsyncStub, service: ServiceProcess
    ) -> None:
        """An entry over max_value_bytes is refused, counted, and not found afterwards."""
        too_large_before = await metric(service, "llmmesh_cache_stores_total", result="too_large")
        key = key_for(unique("p"))
        response = await store(cache, key, entry("x" * 3000))
        assert not response.stored
        assert not (await lookup(cache, key)).hit
        too_large_after = await metric(service, "llmmesh_cache_stores_total", result="too_large")
        assert too_large_after == too_large_before + 1
        assert (await store(cache, key, entry("x" * 1000))).stored

    async def test_invalidate_by_key_model_and_tenant(
        self, cache: cache_pb2_grpc.CacheAsyncStub
    ) -> None:
        """Each selector removes exactly its entries and says how many."""
        models, tenants = (unique("m"), unique("m")), (unique("t"), unique("t"))
        keys = {}
        for model in models:
            for tenant in tenants:
                keys[model, tenant] = key_for("p", tenant=tenant, model=model)
                await store(cache, keys[model, tenant], entry("v", model=model, tenant=tenant))

        async def present() -> set[tuple[str, str]]:
            return {mt for mt, key in keys.items() if (await lookup(cache, key)).hit}

        assert await invalidate(cache, key=keys[models[0], tenants[0]]) == 1
        assert await invalidate(cache, key=keys[models[0], tenants[0]]) == 0
        assert await present() == set(keys) - {(models[0], tenants[0])}
        assert await invalidate(cache, model=models[0]) == 1
        assert await present() == {(models[1], tenants[0]), (models[1], tenants[1])}
        assert await invalidate(cache, tenant=tenants[1]) == 1
        assert await present() == {(models[1], tenants[0])}

    async def test_log_lines_carry_the_callers_request_id(
        self, cache: cache_pb2_grpc.CacheAsyncStub, service: ServiceProcess
    ) -> None:
        """A request id sent as x-llmmesh-request-id is on the lines logged for that RPC."""
        tenant, request_id = unique("t"), unique("req")
        await cache.Invalidate(
            cache_pb2.InvalidateRequest(tenant=tenant),
            metadata=((REQUEST_ID_METADATA_KEY, request_id),),
            timeout=RPC_TIMEOUT,
        )

        def logged() -> list[dict[str, object]]:
            return [r for r in events(service, "cache invalidated") if r.get("tenant") == tenant]

        await assert_eventually(lambda: len(logged()) == 1, timeout=5)
        assert logged()[0]["request_id"] == request_id
        assert logged()[0]["rpc"] == "Invalidate"

    async def test_invalidate_needs_exactly_one_selector(
        self, cache: cache_pb2_grpc.CacheAsyncStub
    ) -> None:
        """No selector, or two, is INVALID_ARGUMENT naming the fields."""
        none = await rpc_error(cache.Invalidate(cache_pb2.InvalidateRequest(), timeout=5))
        assert none.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "key, model, tenant" in (none.details() or "")
        two = await rpc_error(
            cache.Invalidate(cache_pb2.InvalidateRequest(key=key_for("p"), model="m"), timeout=5)
        )
        assert two.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (two.details() or "").startswith("key, model:")

    @pytest.mark.parametrize(
        ("key", "problem"),
        [
            ("", "key: is empty"),
            ("llmmesh:v1:" + "a" * 250, "key: is 261 characters"),
            ("llmmesh:idx:model:m1", "key: is not a cache key"),
        ],
    )
    async def test_malformed_key_is_invalid_argument(
        self, cache: cache_pb2_grpc.CacheAsyncStub, key: str, problem: str
    ) -> None:
        """A key that is empty, too long or not shaped like a cache key is refused by every RPC."""
        calls: list[Callable[[], Awaitable[object]]] = [
            lambda: cache.Lookup(cache_pb2.LookupRequest(key=key), timeout=5),
            lambda: cache.Store(cache_pb2.StoreRequest(key=key, entry=entry("v")), timeout=5),
        ]
        if key:  # an empty key is no selector at all (see the test above)
            calls.append(lambda: cache.Invalidate(cache_pb2.InvalidateRequest(key=key), timeout=5))
        for call in calls:
            error = await rpc_error(call())
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (error.details() or "").startswith(problem)

    async def test_store_needs_an_entry_with_a_model(
        self, cache: cache_pb2_grpc.CacheAsyncStub
    ) -> None:
        """A Store without an entry, or with an entry naming no model, is INVALID_ARGUMENT."""
        missing = await rpc_error(cache.Store(cache_pb2.StoreRequest(key=key_for("p")), timeout=5))
        assert (missing.code(), missing.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "entry: is required",
        )
        no_model = await rpc_error(store(cache, key_for("p"), entry("v", model="")))
        assert (no_model.details() or "").startswith("entry.model:")


async def claim(
    cache: cache_pb2_grpc.CacheAsyncStub,
    key: str,
    *,
    wait_ms: int = 0,
    lock_ttl_ms: int = 0,
    timeout: float = RPC_TIMEOUT,
) -> cache_pb2.LookupResponse:
    request = cache_pb2.LookupRequest(key=key, claim=True, wait_ms=wait_ms, lock_ttl_ms=lock_ttl_ms)
    return await cache.Lookup(request, timeout=timeout)


async def release(cache: cache_pb2_grpc.CacheAsyncStub, key: str, token: str) -> bool:
    request = cache_pb2.ReleaseFillRequest(key=key, fill_token=token)
    return (await cache.ReleaseFill(request, timeout=RPC_TIMEOUT)).released


async def waiting(service: ServiceProcess, count: int = 1) -> None:
    """Return once ``count`` lookups wait for a fill in the service."""

    async def there() -> bool:
        return await metric(service, "llmmesh_cache_fill_waiters") >= count

    await assert_eventually(there, timeout=5, message=f"{count} lookup(s) never started waiting")


class TestSingleFlightRpcs:
    """Lookup with claim, Store with a fill token, ReleaseFill and ExtendFill, on both stores."""

    async def test_first_claim_owns_the_fill_and_its_store_answers_the_waiter(
        self, cache: cache_pb2_grpc.CacheAsyncStub, service: ServiceProcess
    ) -> None:
        """The first miss gets a token with the default expiry; an identical lookup waits and gets
        the owner's entry, flagged coalesced and counted in Stats and the metric."""
        key = key_for(unique("p"))
        before = await stats(cache)
        coalesced_before = await metric(service, "llmmesh_cache_coalesced_total")
        owner = await claim(cache, key)
        assert (owner.hit, owner.lock_ttl_ms, owner.fill_held) == (False, 4000, False)
        assert owner.fill_token
        assert not owner.coalesced
        waiter = asyncio.create_task(claim(cache, key, wait_ms=10_000))
        await waiting(service)
        assert not waiter.done()
        request = cache_pb2.StoreRequest(key=key, entry=entry("one"), fill_token=owner.fill_token)
        assert (await cache.Store(request, timeout=RPC_TIMEOUT)).stored
        answer = await asyncio.wait_for(waiter, RPC_TIMEOUT)
        assert (answer.hit, answer.coalesced, answer.fill_token) == (True, True, "")
        assert answer.entry == entry("one")
        after = await stats(cache)
        assert after.coalesced - before.coalesced == 1
        assert (after.hits - before.hits, after.misses - before.misses) == (1, 1)
        coalesced_after = await metric(service, "llmmesh_cache_coalesced_total")
        assert coalesced_after - coalesced_before == 1
        # The lock went with the store: a later claim is a plain hit.
        later = await claim(cache, key)
        assert (later.hit, later.coalesced, later.fill_token) == (True, False, "")

    async def test_a_lookup_that_does_not_wait_gets_neither(
        self, cache: cache_pb2_grpc.CacheAsyncStub
    ) -> None:
        key = key_for(unique("p"))
        assert (await claim(cache, key)).fill_token
        other = await claim(cache, key)
        assert (other.hit, other.fill_token, other.fill_held) == (False, "", True)
        started = time.monotonic()
        timed_out = await claim(cache, key, wait_ms=150)
        assert time.monotonic() - started >= 0.14
        assert (timed_out.hit, timed_out.fill_token, timed_out.fill_held) == (False, "", True)
        assert not timed_out.coalesced
        # A plain lookup neither claims nor says anything about the lock.
        plain = await lookup(cache, key)
        assert (plain.hit, plain.fill_token, plain.fill_held) == (False, "", False)

    async def test_a_wait_ends_within_the_calls_deadline(
        self, cache: cache_pb2_grpc.CacheAsyncStub
    ) -> None:
        """wait_ms beyond the caller's deadline is cut to it: the answer is a miss, not
        DEADLINE_EXCEEDED."""
        key = key_for(unique("p"))
        assert (await claim(cache, key)).fill_token
        response = await claim(cache, key, wait_ms=15_000, timeout=0.5)
        assert (response.hit, response.fill_token, response.fill_held) == (False, "", True)

    async def test_an_owner_that_dies_loses_the_lock_to_a_waiter(
        self, cache: cache_pb2_grpc.CacheAsyncStub
    ) -> None:
        """Nobody stores or releases: after lock_ttl_ms the waiter takes the lock over."""
        key = key_for(unique("p"))
        dead = await claim(cache, key, lock_ttl_ms=300)
        assert dead.lock_ttl_ms == 300
        started = time.monotonic()
        heir = await claim(cache, key, wait_ms=10_000)
        assert time.monotonic() - started >= 0.2
        assert heir.fill_token not in ("", dead.fill_token)
        assert not heir.hit
        assert await release(cache, key, dead.fill_token) is False
        assert await release(cache, key, heir.fill_token) is True

    async def test_release_hands_the_fill_to_a_waiter_at_once(
        self, cache: cache_pb2_grpc.CacheAsyncStub, service: ServiceProcess
    ) -> None:
        key = key_for(unique("p"))
        owner = await claim(cache, key, lock_ttl_ms=10_000)
        waiter = asyncio.create_task(claim(cache, key, wait_ms=10_000))
        await waiting(service)
        assert await release(cache, key, owner.fill_token) is True
        heir = await asyncio.wait_for(waiter, 2)
        assert heir.fill_token not in ("", owner.fill_token)
        assert await release(cache, key, owner.fill_token) is False

    async def test_a_refused_store_releases_the_lock(
        self, cache: cache_pb2_grpc.CacheAsyncStub, service: ServiceProcess
    ) -> None:
        """An entry too large to keep still ends the fill: waiters take over at once."""
        key = key_for(unique("p"))
        owner = await claim(cache, key, lock_ttl_ms=10_000)
        waiter = asyncio.create_task(claim(cache, key, wait_ms=10_000))
        await waiting(service)
        request = cache_pb2.StoreRequest(
            key=key, entry=entry("x" * 4096), fill_token=owner.fill_token
        )
        assert not (await cache.Store(request, timeout=RPC_TIMEOUT)).stored
        heir = await asyncio.wait_for(waiter, 2)
        assert heir.fill_token not in ("", owner.fill_token)

    async def test_extend_renews_only_for_the_owner_and_is_capped(
        self, cache: cache_pb2_grpc.CacheAsyncStub
    ) -> None:
        key = key_for(unique("p"))
        owner = await claim(cache, key, lock_ttl_ms=300)
        extend = cache_pb2.ExtendFillRequest(key=key, fill_token=owner.fill_token)
        extend.lock_ttl_ms = 3_600_000
        renewed = await cache.ExtendFill(extend, timeout=RPC_TIMEOUT)
        assert (renewed.owned, renewed.lock_ttl_ms) == (True, 10_000)
        await asyncio.sleep(0.5)
        assert (await claim(cache, key)).fill_token == ""
        extend.fill_token = "f" * 32
        assert (await cache.ExtendFill(extend, timeout=RPC_TIMEOUT)).owned is False
        assert await release(cache, key, owner.fill_token) is True
        extend.fill_token = owner.fill_token
        stale = await cache.ExtendFill(extend, timeout=RPC_TIMEOUT)
        assert (stale.owned, stale.lock_ttl_ms) == (False, 0)

    @pytest.mark.parametrize(
        ("call", "field"),
        [
            ("wait_without_claim", "wait_ms"),
            ("release_without_token", "fill_token"),
            ("extend_with_a_bad_key", "key"),
            ("store_with_a_huge_token", "fill_token"),
        ],
    )
    async def test_bad_requests_are_invalid_argument(
        self, cache: cache_pb2_grpc.CacheAsyncStub, call: str, field: str
    ) -> None:
        key = key_for(unique("p"))
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "wait_without_claim": lambda: cache.Lookup(
                cache_pb2.LookupRequest(key=key, wait_ms=100), timeout=RPC_TIMEOUT
            ),
            "release_without_token": lambda: cache.ReleaseFill(
                cache_pb2.ReleaseFillRequest(key=key), timeout=RPC_TIMEOUT
            ),
            "extend_with_a_bad_key": lambda: cache.ExtendFill(
                cache_pb2.ExtendFillRequest(key="nope", fill_token="t"), timeout=RPC_TIMEOUT
            ),
            "store_with_a_huge_token": lambda: cache.Store(
                cache_pb2.StoreRequest(key=key, entry=entry("a"), fill_token="t" * 65),
                timeout=RPC_TIMEOUT,
            ),
        }
        error = await rpc_error(calls[call]())
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith(f"{field}:")


async def health_status(channel: grpc.aio.Channel) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="llmmesh.v1.Cache"), timeout=RPC_TIMEOUT
    )
    status: int = response.status
    return status


@contextlib.contextmanager
def redis_on_port(port: int) -> Iterator[RedisServer]:
    """A fresh redis-server on ``port`` (where an earlier one was stopped)."""
    server = RedisServer()
    server.port = port
    try:
        yield server.start()
    finally:
        server.close()


@pytest.fixture
def redis_backed(redis_server: RedisServer) -> Iterator[ServiceProcess]:
    args = ["--store", "redis", "--redis-url", redis_server.url, *POLICY_ARGS]
    with ServiceProcess("cache_service", args) as service:
        yield service


class TestRedisOutage:
    """A Redis that goes away makes the service answer UNAVAILABLE fast, never hang or exit."""

    async def test_outage_answers_unavailable_fast_and_recovers_on_restart(
        self, redis_server: RedisServer, redis_backed: ServiceProcess
    ) -> None:
        """Redis stopped: UNAVAILABLE in < 1 s, counted, logged once; back: hits again."""
        service = redis_backed
        async with grpc.aio.insecure_channel(service.address) as channel:
            cache = cache_pb2_grpc.CacheStub(channel)
            key = key_for(unique("p"))
            await store(cache, key, entry("before"))
            assert (await lookup(cache, key)).hit
            redis_server.stop()

            failures = 0
            for _ in range(5):
                started = time.monotonic()
                error = await rpc_error(lookup(cache, key))
                assert time.monotonic() - started < 1.0
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                # Internal addresses are for the logs, not for callers.
                assert f"127.0.0.1:{redis_server.port}" not in (error.details() or "")
                assert "cache store redis unavailable" in (error.details() or "")
                failures += 1
            error = await rpc_error(store(cache, key, entry("during")))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            failures += 1
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
            [unavailable] = events(service, UNAVAILABLE_EVENT)
            assert unavailable["redis_url"] == redis_server.url

            async def stored_again() -> bool:
                nonlocal failures
                try:
                    return (await store(cache, key, entry("after"))).stored
                except grpc.aio.AioRpcError:
                    failures += 1
                    return False

            with redis_on_port(redis_server.port):
                await assert_eventually(stored_again, timeout=10)
                found = await lookup(cache, key)
                assert (found.hit, found.entry.text) == (True, "after")
                assert (await stats(cache)).errors == failures
                await assert_eventually(
                    lambda: len(events(service, RECOVERED_EVENT)) == 1, timeout=5
                )
                assert len(events(service, UNAVAILABLE_EVENT)) == 1
                assert await metric(service, "llmmesh_cache_lookups_total", result="error") == 5
                assert await metric(service, "llmmesh_cache_store_up") == 1

    async def test_starts_while_redis_is_down_and_never_logs_the_password(self) -> None:
        """Redis down at start: the service serves UNAVAILABLE, then the store once it is up."""
        port = free_port()
        url = f"redis://:s3cret@127.0.0.1:{port}/0"
        env = {"LLMMESH_REDIS_URL": url}
        with ServiceProcess("cache_service", POLICY_ARGS, env=env) as service:
            async with grpc.aio.insecure_channel(service.address) as channel:
                cache = cache_pb2_grpc.CacheStub(channel)
                key = key_for(unique("p"))
                started = time.monotonic()
                error = await rpc_error(lookup(cache, key))
                assert time.monotonic() - started < 1.0
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert "s3cret" not in (error.details() or "")
                [outage] = events(service, UNAVAILABLE_EVENT)
                assert outage["at_start"] is True

                async def stored() -> bool:
                    try:
                        return (await store(cache, key, entry("v"))).stored
                    except grpc.aio.AioRpcError:
                        return False

                with redis_on_port(port) as server:
                    admin = redis.asyncio.Redis.from_url(server.url)
                    try:
                        await admin.config_set("requirepass", "s3cret")
                    finally:
                        await admin.aclose()
                    await assert_eventually(stored, timeout=10)
                    assert (await lookup(cache, key)).hit
            assert len(events(service, UNAVAILABLE_EVENT)) == 1
            assert "s3cret" not in service.logs()
            assert "redis://:***@127.0.0.1" in service.logs()
            assert service.stop() == 0


class TestConfig:
    """Configuration comes from flags and LLMMESH_* variables and is checked."""

    def test_defaults(self) -> None:
        """The defaults are the documented ones."""
        config = load_config([], environ={})
        assert (config.port, config.metrics_port, config.store) == (50071, 9403, "redis")
        assert config.redis_url == "redis://127.0.0.1:6379/0"
        assert config.redis_timeout == timedelta(milliseconds=100)
        assert (config.default_ttl_s, config.max_ttl_s) == (3600, 86400)
        assert config.max_value_bytes == 1024 * 1024
        assert (config.fill_lock_ttl, config.fill_lock_max_ttl) == (
            timedelta(seconds=5),
            timedelta(seconds=30),
        )
        assert config.fill_max_wait == timedelta(seconds=60)
        assert config.fill_poll_interval == timedelta(milliseconds=5)
        # A lock asks for its expiry, or gets the default, and never more than the maximum.
        assert [config.fill_lock_ttl_ms(ms) for ms in (0, 200, 90_000)] == [5000, 200, 30_000]

    def test_flags_win_over_environment(self) -> None:
        """A flag beats its environment variable, which beats the default."""
        environ = {"LLMMESH_STORE": "memory", "LLMMESH_MAX_TTL": "2h", "LLMMESH_DEFAULT_TTL": "5m"}
        config = load_config(["--max-ttl", "3h"], environ=environ)
        assert (config.store, config.max_ttl_s, config.default_ttl_s) == ("memory", 10800, 300)

    def test_password_stays_out_of_repr(self) -> None:
        """The Redis URL is not in the config's repr and is masked where it is shown."""
        config = CacheConfig(redis_url="redis://:s3cret@h:6379/0")
        assert "s3cret" not in repr(config)
        assert config.redis_url_masked == "redis://:***@h:6379/0"

    @pytest.mark.parametrize(
        ("settings", "field"),
        [
            ({"default_ttl": timedelta(hours=3), "max_ttl": timedelta(hours=2)}, "max_ttl"),
            ({"redis_url": "http://:s3cret@h/"}, "redis_url"),
            ({"redis_timeout": timedelta(0)}, "redis_timeout"),
            ({"store": "memory", "memory_max_bytes": 1000}, "memory_max_bytes"),
            ({"fill_lock_ttl": timedelta(0)}, "fill_lock_ttl"),
            ({"fill_lock_max_ttl": timedelta(seconds=1)}, "fill_lock_max_ttl"),
            ({"fill_max_wait": timedelta(hours=2)}, "fill_max_wait"),
            ({"fill_poll_interval": timedelta(0)}, "fill_poll_interval"),
        ],
    )
    def test_rejects_unusable_values(self, settings: dict[str, object], field: str) -> None:
        """A bad value is a ValueError naming its field (and never showing a password)."""
        with pytest.raises(ValueError, match=f"^{field}:") as raised:
            CacheConfig(**settings)  # type: ignore[arg-type]
        assert "s3cret" not in str(raised.value)
