"""Fail-open: Redis or the cache service down, killed or hung, and the mesh goes on serving.

In-process (fast): the cache service's store circuit (a store that can be switched off) and the
router's cache circuit (CacheClient against a cache that answers UNAVAILABLE), each refusing at
once while open, without touching the dependency, and closing by itself when it is back.

Real processes under load (slow): redis-server, the cache service, two sim workers and the router,
16 concurrent clients mixing repeated prompts (hits) and unique ones (misses), unary and streamed,
while the test stops and restarts redis-server, SIGKILLs and restarts the cache service, or
SIGSTOPs it for a few seconds. Every client request must succeed; the circuits open during the
outage (metrics), each outage is logged once, and cache hits come back after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import grpc
import grpc.aio
import pytest
import structlog
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from cache_service import CacheApp, CacheConfig, load_config
from cache_service.stores import CacheStore, MemoryStore, StoreUnavailable
from llmmesh.breaker import BreakerSettings, CircuitBreaker, CircuitState
from llmmesh.cache_key import cache_key
from llmmesh.server import ServiceRunner
from llmmesh.v1 import cache_pb2, cache_pb2_grpc, generate_pb2, router_pb2_grpc
from llmmesh.validation import Limits
from router import CacheClient, RouterConfig
from router import load_config as load_router_config
from tests.fakes import FakeCache, FakeServer
from tests.harness import (
    Mesh,
    RedisServer,
    ServiceProcess,
    assert_eventually,
    start_cache,
    start_mesh,
)

MODEL = "sim-llama-3.1-8b"
Context = grpc.aio.ServicerContext[Any, Any]
CACHE_DOWN_EVENT = "cache unavailable; serving without it"
CACHE_BACK_EVENT = "cache available again"
STORE_DOWN_EVENT = "cache store unavailable"
STORE_BACK_EVENT = "cache store recovered"


def entry(text: str) -> cache_pb2.CacheEntry:
    return cache_pb2.CacheEntry(text=text, model=MODEL, tenant="default", worker_id="w1")


def key_for(prompt: str) -> str:
    request = generate_pb2.GenerateRequest(model=MODEL, prompt=prompt)
    return cache_key(request, tenant="default", limits=Limits())


def sample(name: str, **labels: str) -> float:
    """A metric of this process (the in-process services)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def lines(logs: Sequence[Mapping[str, Any]], event: str) -> list[Mapping[str, Any]]:
    return [line for line in logs if line["event"] == event]


def state(breaker: CircuitBreaker) -> CircuitState:
    return breaker.state


class SwitchableStore:
    """A memory store that can be switched off: then every operation fails, as a dead Redis's
    would. ``calls`` counts the operations that reached it."""

    name = "switchable"

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False
        self.calls = 0

    async def close(self) -> None:
        await self.inner.close()

    def __getattr__(self, op: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.inner, op)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.down:
                raise StoreUnavailable("switchable", op, "switched off")
            return await method(*args, **kwargs)

        return call


@contextlib.asynccontextmanager
async def cache_service(
    store: SwitchableStore, **overrides: Any
) -> AsyncIterator[tuple[CacheApp, cache_pb2_grpc.CacheAsyncStub]]:
    config = CacheConfig(port=0, metrics_port=-1, store="memory", grace=timedelta(0), **overrides)
    app = CacheApp(config, store=cast(CacheStore, store), probe_interval_s=0.05)
    runner = ServiceRunner(app, config, name="cache")
    await runner.start()
    try:
        async with grpc.aio.insecure_channel(runner.address) as channel:
            yield app, cache_pb2_grpc.CacheStub(channel)
    finally:
        await runner.shutdown(grace=timedelta(0))


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


async def lookup_error(cache: cache_pb2_grpc.CacheAsyncStub, key: str) -> grpc.aio.AioRpcError:
    return await rpc_error(cache.Lookup(cache_pb2.LookupRequest(key=key), timeout=5))


class TestStoreCircuit:
    """The cache service stops calling a failing store, answers UNAVAILABLE at once, and notices
    by itself (its probe is the trial) when the store is back."""

    async def test_opens_refuses_without_calling_and_recovers_without_traffic(self) -> None:
        store = SwitchableStore()
        key = key_for("store circuit")
        with structlog.testing.capture_logs() as logs:
            async with cache_service(
                store,
                store_breaker_failures=3,
                store_breaker_cooldown=timedelta(milliseconds=300),
                store_breaker_cooldown_max=timedelta(milliseconds=600),
            ) as (app, cache):
                await cache.Store(cache_pb2.StoreRequest(key=key, entry=entry("v")), timeout=5)
                opened_before = sample(
                    "llmmesh_cache_circuit_opened_total", dependency="switchable"
                )
                store.down = True
                for _ in range(3):
                    error = await lookup_error(cache, key)
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    assert "switched off" in (error.details() or "")
                assert state(app.health.breaker) is CircuitState.OPEN
                calls = store.calls
                for _ in range(10):
                    error = await lookup_error(cache, key)
                    assert error.code() == grpc.StatusCode.UNAVAILABLE
                    details = error.details() or ""
                    assert details.startswith("cache store switchable unavailable (circuit open")
                    assert "after 3 failures in a row; last: " in details
                    assert "switched off" in details
                assert store.calls == calls
                assert sample("llmmesh_cache_circuit_state", dependency="switchable") == float(
                    CircuitState.OPEN
                )
                assert (
                    sample("llmmesh_cache_circuit_opened_total", dependency="switchable")
                    == opened_before + 1
                )
                assert sample(
                    "llmmesh_cache_circuit_short_circuited_total", dependency="switchable"
                )
                error = await rpc_error(cache.Stats(cache_pb2.StatsRequest(), timeout=5))
                assert "circuit open" in (error.details() or "")

                store.down = False
                await assert_eventually(
                    lambda: state(app.health.breaker) is CircuitState.CLOSED, timeout=5
                )
                found = await cache.Lookup(cache_pb2.LookupRequest(key=key), timeout=5)
                assert (found.hit, found.entry.text) == (True, "v")
                assert (await cache.Stats(cache_pb2.StatsRequest(), timeout=5)).errors == 14
        assert len(lines(logs, STORE_DOWN_EVENT)) == 1
        assert lines(logs, STORE_DOWN_EVENT)[0]["log_level"] == "warning"
        assert len(lines(logs, STORE_BACK_EVENT)) == 1

    async def test_a_store_down_at_start_opens_the_circuit_at_once(self) -> None:
        store = SwitchableStore()
        store.down = True
        with structlog.testing.capture_logs() as logs:
            async with cache_service(
                store,
                store_breaker_cooldown=timedelta(seconds=30),
                store_breaker_cooldown_max=timedelta(seconds=30),
            ) as (app, cache):
                assert state(app.health.breaker) is CircuitState.OPEN
                calls = store.calls
                error = await lookup_error(cache, key_for("down at start"))
                assert (error.details() or "").startswith(
                    "cache store switchable unavailable (circuit open for "
                )
                assert store.calls == calls
        [opened] = lines(logs, STORE_DOWN_EVENT)
        assert opened["at_start"] is True


class UnwellCache(FakeCache):
    """A cache service whose store is down while ``down``: it answers UNAVAILABLE."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: Context
    ) -> cache_pb2.LookupResponse:
        if self.down:
            self.lookups += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "cache store redis unavailable")
        return await super().Lookup(request, context)

    async def Store(
        self, request: cache_pb2.StoreRequest, context: Context
    ) -> cache_pb2.StoreResponse:
        if self.down:
            self.stores += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "cache store redis unavailable")
        return await super().Store(request, context)


def router_cache_sample(result: str, metric: str = "requests") -> float:
    return sample(f"llmmesh_router_cache_{metric}_total", result=result)


class TestRouterCacheCircuit:
    """The router's CacheClient stops calling a cache that answers UNAVAILABLE: lookups are
    misses and stores are dropped at once, counted as skipped; a trial finds it back."""

    async def test_unavailable_answers_open_it_and_a_trial_closes_it(self) -> None:
        cache = UnwellCache()
        settings = BreakerSettings(
            failure_threshold=3,
            cooldown=timedelta(milliseconds=200),
            cooldown_max=timedelta(milliseconds=400),
        )
        key = key_for("router circuit")
        async with FakeServer.for_cache(cache) as server:
            client = CacheClient(server.address, timeout=timedelta(seconds=1), breaker=settings)
            try:
                with structlog.testing.capture_logs() as logs:
                    client.store(key, entry("cached"), ttl_seconds=60)
                    await assert_eventually(lambda: cache.stores == 1, timeout=5)
                    cache.down = True
                    errors = router_cache_sample("error")
                    skipped = router_cache_sample("skipped")
                    stores_skipped = router_cache_sample("skipped", "stores")
                    for _ in range(3):
                        assert await client.lookup(key) is None
                    assert router_cache_sample("error") == errors + 3
                    assert state(client.breaker) is CircuitState.OPEN
                    lookups, stores = cache.lookups, cache.stores
                    for _ in range(5):
                        assert await client.lookup(key) is None
                        client.store(key, entry("dropped"), ttl_seconds=60)
                    await assert_eventually(
                        lambda: router_cache_sample("skipped", "stores") == stores_skipped + 5
                    )
                    assert (cache.lookups, cache.stores) == (lookups, stores)
                    assert router_cache_sample("skipped") == skipped + 5
                    assert sample("llmmesh_router_circuit_state", dependency="cache") == float(
                        CircuitState.OPEN
                    )

                    cache.down = False

                    async def hit() -> bool:
                        found = await client.lookup(key)
                        return found is not None and found.text == "cached"

                    await assert_eventually(hit, timeout=5, interval=0.05)
                    assert state(client.breaker) is CircuitState.CLOSED
            finally:
                await client.close()
        [opened] = lines(logs, CACHE_DOWN_EVENT)
        assert opened["cache"] == server.address
        assert "UNAVAILABLE: cache store redis unavailable" in opened["cause"]
        assert len(lines(logs, CACHE_BACK_EVENT)) == 1

    async def test_lookups_cut_short_by_the_callers_deadline_do_not_count(self) -> None:
        """A lookup timed out under the caller's own tiny deadline says nothing of the cache."""
        cache = FakeCache(delay=0.2)
        settings = BreakerSettings(failure_threshold=2)
        async with FakeServer.for_cache(cache) as server:
            client = CacheClient(server.address, timeout=timedelta(seconds=1), breaker=settings)
            try:
                for _ in range(5):
                    assert await client.lookup(key_for("slow"), timeout=0.01) is None
                assert state(client.breaker) is CircuitState.CLOSED
                for _ in range(2):
                    assert await client.lookup(key_for("slow"), timeout=None) is None
                assert state(client.breaker) is CircuitState.CLOSED
                cache.delay = 2.0
                for _ in range(2):
                    assert await client.lookup(key_for("slow")) is None
                assert state(client.breaker) is CircuitState.OPEN
            finally:
                await client.close()


class TestConfig:
    """The breakers' settings are flags and LLMMESH_* variables, checked at start."""

    def test_flags_and_environment(self) -> None:
        cache = load_config(
            ["--store-breaker-failures", "7", "--store-breaker-cooldown", "250ms"],
            environ={"LLMMESH_STORE_BREAKER_COOLDOWN_MAX": "3s"},
        )
        assert cache.store_breaker == BreakerSettings(
            failure_threshold=7,
            cooldown=timedelta(milliseconds=250),
            cooldown_max=timedelta(seconds=3),
        )
        router = load_router_config(
            ["--cache-breaker-failures", "2", "--cache-breaker-cooldown-max", "1m"], environ={}
        )
        assert router.cache_breaker == BreakerSettings(
            failure_threshold=2, cooldown_max=timedelta(minutes=1)
        )
        assert RouterConfig().cache_breaker == BreakerSettings()
        assert CacheConfig().store_breaker == BreakerSettings()

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"store_breaker_failures": 0}, "store_breaker_failures"),
            ({"store_breaker_cooldown": timedelta(0)}, "store_breaker_cooldown"),
            ({"store_breaker_cooldown_max": timedelta(milliseconds=10)}, "cooldown_max"),
        ],
    )
    def test_cache_service_rejects_nonsense(self, overrides: dict[str, Any], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            CacheConfig(**overrides)

    @pytest.mark.parametrize(
        ("overrides", "message"),
        [
            ({"cache_breaker_failures": 0}, "cache_breaker_failures"),
            ({"cache_breaker_cooldown": timedelta(0)}, "cache_breaker_cooldown"),
            ({"cache_breaker_cooldown_max": timedelta(milliseconds=10)}, "cooldown_max"),
        ],
    )
    def test_router_rejects_nonsense(self, overrides: dict[str, Any], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            RouterConfig(**overrides)


# --- real processes under load -----------------------------------------------------------------

WORKER_ARGS = ["--engine", "sim", "--metrics-port", "0", "--sim-speed-factor", "8"]
#: Clients sending at once, and a bound on what one scenario sends.
CONCURRENCY = 16
MAX_REQUESTS = 20_000
#: Deadline of each client request: generous, since no request may fail.
REQUEST_TIMEOUT = 30.0
#: How long each outage lasts once the router's circuit has opened.
OUTAGE_S = 2.0


#: Redis calls and cache lookups get time to spare on a busy machine: these tests count outages,
#: and a slow answer under load must not look like one.
CACHE_ARGS = ("--redis-timeout", "250ms")


@dataclass
class FaultMesh(Mesh):
    """A mesh whose cache service can be replaced; the replaced processes are kept to close."""

    retired: list[ServiceProcess] = field(default_factory=list)

    def restart_cache(self) -> None:
        """A new cache service process on the port of the old one."""
        self.retired.append(self.cache)
        self.cache = start_cache(self.redis, *CACHE_ARGS, "--port", str(self.cache.port))


@pytest.fixture
def mesh(redis_server: RedisServer) -> Iterator[FaultMesh]:
    base = start_mesh(
        redis_server,
        worker_args=WORKER_ARGS,
        cache_args=CACHE_ARGS,
        router_args=["--cache-timeout", "250ms"],
    )
    m = FaultMesh(base.redis, base.cache, base.workers, base.router)
    try:
        yield m
    finally:
        for proc in (*m.services(), *m.retired):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.signal(signal.SIGCONT)
            proc.close()


async def scrape(proc: ServiceProcess, name: str, **labels: str) -> float:
    """A metric of a service process (0 when it has no such sample yet)."""
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
            return text

    for family in text_string_to_metric_families(await asyncio.to_thread(get)):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def logged(proc: ServiceProcess, event: str) -> int:
    return sum(1 for r in proc.log_records() if r.get("event") == event)


def circuit_history(proc: ServiceProcess) -> list[str]:
    """The circuit's log lines, for failure messages."""
    return [
        f"{r.get('timestamp')} {r.get('event')} {r.get('cause', '')}"
        for r in proc.log_records()
        if "circuit" in r or str(r.get("event", "")).startswith("circuit")
    ]


@dataclass
class Load:
    """What the clients saw."""

    ok: int = 0
    cached: int = 0
    failures: list[str] = field(default_factory=list)


async def run_load(address: str, stop: asyncio.Event) -> Load:
    """CONCURRENCY clients until ``stop``: half the requests repeat one of 8 prompts (hits once
    stored), half are unique (misses); a third are streamed."""
    load = Load()
    numbers = itertools.count()
    run = uuid.uuid4().hex[:8]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def client() -> None:
            while not stop.is_set() and load.ok + len(load.failures) < MAX_REQUESTS:
                n = next(numbers)
                prompt = f"repeated {n % 8}" if n % 2 else f"unique {run} {n}"
                request = generate_pb2.GenerateRequest(
                    model=MODEL,
                    prompt=prompt,
                    sampling=generate_pb2.SamplingParams(max_tokens=8, temperature=0.0),
                )
                try:
                    if n % 3 == 0:
                        chunks = [
                            c async for c in stub.GenerateStream(request, timeout=REQUEST_TIMEOUT)
                        ]
                        summary = chunks[-1].summary
                    else:
                        summary = (await stub.Generate(request, timeout=REQUEST_TIMEOUT)).summary
                except grpc.aio.AioRpcError as exc:
                    load.failures.append(f"{exc.code().name}: {exc.details()}")
                    continue
                load.ok += 1
                load.cached += summary.cached

        await asyncio.gather(*(client() for _ in range(CONCURRENCY)))
    return load


@contextlib.asynccontextmanager
async def under_load(mesh: FaultMesh) -> AsyncIterator[Load]:
    """Clients running for the duration of the block; none of their requests may fail."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_load(mesh.router.address, stop))
    progress = Load()
    try:
        yield progress
    finally:
        stop.set()
        load = await asyncio.wait_for(task, timeout=REQUEST_TIMEOUT + 10)
        progress.ok, progress.cached, progress.failures = load.ok, load.cached, load.failures


async def router_hits(mesh: FaultMesh) -> float:
    return await scrape(mesh.router, "llmmesh_router_cache_requests_total", result="hit")


async def router_circuit(mesh: FaultMesh, name: str = "state") -> float:
    metric = "llmmesh_router_circuit_state" if name == "state" else f"llmmesh_router_circuit_{name}"
    return await scrape(mesh.router, metric, dependency="cache")


async def cache_stats_hits(mesh: FaultMesh) -> int:
    async with grpc.aio.insecure_channel(mesh.cache.address) as channel:
        stats = await cache_pb2_grpc.CacheStub(channel).Stats(cache_pb2.StatsRequest(), timeout=5)
        return stats.hits


async def wait_for_hits(mesh: FaultMesh) -> None:
    """Cache hits move, as the router and the cache service count them."""
    router_before, cache_before = await router_hits(mesh), await cache_stats_hits(mesh)

    async def moved() -> bool:
        return await router_hits(mesh) > router_before and await cache_stats_hits(mesh) > (
            cache_before
        )

    await assert_eventually(moved, timeout=20, interval=0.2, message="cache hits never resumed")


@dataclass
class Outage:
    """What moved from the start of a fault until the router's circuit closed again."""

    opened: float
    short_circuited: float
    down_lines: int
    back_lines: int


async def outage(mesh: FaultMesh, begin: Callable[[], object], end: Callable[[], object]) -> Outage:
    """Under load: see hits, cause an outage (``begin``), see the router's circuit open, end it
    after a while, see the circuit close and hits come back."""
    await wait_for_hits(mesh)
    await assert_eventually(lambda: _circuit_is(mesh, closed=True), timeout=10)
    opened = await router_circuit(mesh, "opened_total")
    short_circuited = await router_circuit(mesh, "short_circuited_total")
    down, back = logged(mesh.router, CACHE_DOWN_EVENT), logged(mesh.router, CACHE_BACK_EVENT)
    await asyncio.to_thread(begin)
    try:
        await assert_eventually(
            lambda: _circuit_is(mesh, closed=False),
            timeout=10,
            message="the router's circuit never opened",
        )
        await asyncio.sleep(OUTAGE_S)
    finally:
        await asyncio.to_thread(end)
    await assert_eventually(
        lambda: _circuit_is(mesh, closed=True),
        timeout=20,
        message="the router's circuit never closed again",
    )
    moved = Outage(
        opened=await router_circuit(mesh, "opened_total") - opened,
        short_circuited=await router_circuit(mesh, "short_circuited_total") - short_circuited,
        down_lines=logged(mesh.router, CACHE_DOWN_EVENT) - down,
        back_lines=logged(mesh.router, CACHE_BACK_EVENT) - back,
    )
    await wait_for_hits(mesh)
    return moved


async def _circuit_is(mesh: FaultMesh, *, closed: bool) -> bool:
    return (await router_circuit(mesh) == CircuitState.CLOSED) == closed


def assert_no_failures(load: Load) -> None:
    assert load.failures == [], f"{len(load.failures)} failed requests: {load.failures[:5]}"
    assert load.ok > 100, load
    assert load.cached > 0, load


def assert_one_router_outage(mesh: FaultMesh, moved: Outage) -> None:
    """The router's circuit opened once, refused calls, and the outage was logged once."""
    history = circuit_history(mesh.router)
    assert moved.opened == 1, history
    assert moved.short_circuited > 0
    assert (moved.down_lines, moved.back_lines) == (1, 1), history


@pytest.mark.slow
class TestFaultsUnderLoad:
    """16 clients at once, and not one failed request while a dependency goes away and back."""

    async def test_redis_stopped_and_restarted(self, mesh: FaultMesh) -> None:
        redis, cache = mesh.redis, mesh.cache
        async with under_load(mesh) as load:
            await wait_for_hits(mesh)
            opened = await scrape(cache, "llmmesh_cache_circuit_opened_total", dependency="redis")
            moved = await outage(mesh, begin=redis.stop, end=redis.start)
            assert (
                await scrape(cache, "llmmesh_cache_circuit_opened_total", dependency="redis")
                == opened + 1
            )
        assert_no_failures(load)
        assert_one_router_outage(mesh, moved)
        assert logged(cache, STORE_DOWN_EVENT) == 1, circuit_history(cache)
        assert logged(cache, STORE_BACK_EVENT) == 1, circuit_history(cache)

    async def test_cache_service_killed_and_restarted(self, mesh: FaultMesh) -> None:
        def kill() -> None:
            mesh.cache.signal(signal.SIGKILL)
            mesh.cache.wait(10)

        async with under_load(mesh) as load:
            moved = await outage(mesh, begin=kill, end=mesh.restart_cache)
        assert_no_failures(load)
        assert_one_router_outage(mesh, moved)

    async def test_cache_service_hung_then_resumed(self, mesh: FaultMesh) -> None:
        async with under_load(mesh) as load:
            moved = await outage(
                mesh,
                begin=lambda: mesh.cache.signal(signal.SIGSTOP),
                end=lambda: mesh.cache.signal(signal.SIGCONT),
            )
        assert_no_failures(load)
        assert_one_router_outage(mesh, moved)
