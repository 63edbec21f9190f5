"""The whole mesh as real processes on loopback: Redis, cache service, two workers, router.

These are the acceptance tests of the first working mesh: generation through the router, the cache
on a real Redis, deadlines and cancellation reaching the engine, graceful shutdown, health.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import grpc
import grpc.aio
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from llmmesh.v1 import cache_pb2, cache_pb2_grpc, generate_pb2, router_pb2, router_pb2_grpc
from tests.harness import Mesh, RedisServer, ServiceProcess, assert_eventually, start_mesh

MODEL = "sim-llama-3.1-8b"
# Fast enough to keep the suite quick, slow enough that a long answer takes seconds.
WORKER_ARGS = ["--engine", "sim", "--metrics-port", "0", "--sim-speed-factor", "4"]


def _start_mesh(redis: RedisServer, *, router_args: Sequence[str] = ()) -> Mesh:
    return start_mesh(redis, worker_args=WORKER_ARGS, router_args=router_args)


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    redis = RedisServer().start()
    m = _start_mesh(redis)
    try:
        yield m
    finally:
        m.close()
        redis.close()


@pytest.fixture
async def router(mesh: Mesh) -> AsyncIterator[router_pb2_grpc.RouterAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.router.address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


@pytest.fixture
async def cache(mesh: Mesh) -> AsyncIterator[cache_pb2_grpc.CacheAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.cache.address) as channel:
        yield cache_pb2_grpc.CacheStub(channel)


def request(prompt: str, **sampling: object) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model=MODEL,
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


def aborted_ids(worker_procs: list[ServiceProcess]) -> set[str]:
    """Request ids the workers logged as aborted in the engine."""
    return {
        str(r.get("request_id"))
        for w in worker_procs
        for r in w.log_records()
        if r.get("event") == "request aborted"
    }


class TestGeneration:
    """Unary and streaming generation through the router."""

    async def test_unary_and_stream_give_the_same_deterministic_answer(
        self, router: router_pb2_grpc.RouterAsyncStub
    ) -> None:
        """A greedy request answers the same text unary and streamed, with a full summary."""
        req = request("Explain continuous batching", max_tokens=24, temperature=0.0)
        req.cache_policy = generate_pb2.CACHE_POLICY_BYPASS
        unary = await router.Generate(req, timeout=10)
        chunks = [c async for c in router.GenerateStream(req, timeout=10)]
        assert unary.text
        assert "".join(c.text for c in chunks) == unary.text
        assert [c.HasField("summary") for c in chunks][-1] is True
        assert not any(c.HasField("summary") for c in chunks[:-1])
        summary = chunks[-1].summary
        assert summary.worker_id in {"w1", "w2"}
        assert summary.usage.completion_tokens == unary.summary.usage.completion_tokens > 0
        assert summary.finish_reason in (
            generate_pb2.FINISH_REASON_STOP,
            generate_pb2.FINISH_REASON_LENGTH,
        )
        assert 0 < summary.timings.time_to_first_token_ms <= summary.timings.total_ms
        assert len(unary.request_id) >= 16
        assert not unary.summary.cached

    async def test_unknown_model_is_not_found(
        self, router: router_pb2_grpc.RouterAsyncStub
    ) -> None:
        """A model no worker serves is NOT_FOUND, naming the model."""
        req = request("hi", max_tokens=4)
        req.model = "gpt-nonexistent"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.Generate(req, timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "gpt-nonexistent" in (err.value.details() or "")

    @pytest.mark.parametrize(
        ("sampling", "prompt", "field"),
        [
            ({"max_tokens": 0}, "hi", "sampling.max_tokens"),
            ({"max_tokens": 1_000_000}, "hi", "sampling.max_tokens"),
            ({"temperature": -1.0}, "hi", "sampling.temperature"),
            ({"temperature": float("nan")}, "hi", "sampling.temperature"),
            ({"top_p": 0.0}, "hi", "sampling.top_p"),
            ({"top_p": 1.5}, "hi", "sampling.top_p"),
            ({}, "", "prompt"),
            ({}, "x" * 200_000, "prompt"),
        ],
    )
    async def test_bad_input_is_invalid_argument_naming_the_field(
        self,
        mesh: Mesh,
        router: router_pb2_grpc.RouterAsyncStub,
        sampling: dict[str, float],
        prompt: str,
        field: str,
    ) -> None:
        """Bad input never reaches a worker and names the field."""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.Generate(request(prompt, **sampling), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(field)
        assert "Traceback" not in (err.value.details() or "")

    async def test_oversized_message_is_resource_exhausted(
        self, router: router_pb2_grpc.RouterAsyncStub
    ) -> None:
        """A message above the router's max message size is RESOURCE_EXHAUSTED."""
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.Generate(request("x" * (5 * 1024 * 1024)), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    async def test_routing_table_lists_both_workers(
        self, router: router_pb2_grpc.RouterAsyncStub
    ) -> None:
        """ListWorkers shows both workers healthy with their model."""
        table = await router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
        assert sorted(w.worker_id for w in table.workers) == ["w1", "w2"]
        assert {w.model for w in table.workers} == {MODEL}
        assert {w.state for w in table.workers} == {router_pb2.WORKER_STATE_HEALTHY}


class TestReflection:
    """A client with no .proto files can discover the API through server reflection."""

    def test_router_describes_its_api(self, mesh: Mesh) -> None:
        """Reflection lists llmmesh.v1.Router and resolves its request message."""
        with grpc.insecure_channel(mesh.router.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = set(database.get_services())
            assert {"llmmesh.v1.Router", "grpc.health.v1.Health"} <= services
            pool = descriptor_pool.DescriptorPool(database)
            method = pool.FindServiceByName("llmmesh.v1.Router").FindMethodByName("GenerateStream")
            assert method.input_type.full_name == "llmmesh.v1.GenerateRequest"
            assert method.server_streaming


class TestCache:
    """The router consults the cache service, backed by a real Redis."""

    async def test_repeated_deterministic_request_comes_from_the_cache(
        self,
        router: router_pb2_grpc.RouterAsyncStub,
        cache: cache_pb2_grpc.CacheAsyncStub,
    ) -> None:
        """The second identical greedy request is a cache hit with the same text."""
        req = request(f"What is a KV cache? {time.time_ns()}", max_tokens=16, temperature=0.0)
        first = await router.Generate(req, timeout=10)
        assert not first.summary.cached

        async def second_is_cached() -> bool:
            return bool((await router.Generate(req, timeout=10)).summary.cached)

        # The router stores in the background, without delaying the first caller.
        await assert_eventually(second_is_cached, timeout=5, message="never served from cache")
        hit = await router.Generate(req, timeout=10)
        assert hit.summary.cached
        assert hit.text == first.text
        assert hit.summary.worker_id == first.summary.worker_id
        streamed = [c async for c in router.GenerateStream(req, timeout=10)]
        assert "".join(c.text for c in streamed) == first.text
        assert streamed[-1].summary.cached
        stats = await cache.Stats(cache_pb2.StatsRequest(), timeout=5)
        assert stats.store == "redis"
        assert stats.hits >= 2
        assert stats.entries >= 1

    async def test_one_tenant_never_reads_another_tenants_answer(
        self,
        router: router_pb2_grpc.RouterAsyncStub,
        cache: cache_pb2_grpc.CacheAsyncStub,
    ) -> None:
        """Tenant b's identical request misses tenant a's cached answer (and stores its own);
        invalidating tenant a leaves b's entry alone."""
        req = request(f"Our secret plan {time.time_ns()}", max_tokens=8, temperature=0.0)
        as_a = (("x-llmmesh-tenant", "tenant-a"),)
        as_b = (("x-llmmesh-tenant", "tenant-b"),)
        await router.Generate(req, metadata=as_a, timeout=10)

        async def cached_for(metadata: tuple[tuple[str, str], ...]) -> bool:
            answer = await router.Generate(req, metadata=metadata, timeout=10)
            return bool(answer.summary.cached)

        await assert_eventually(lambda: cached_for(as_a), timeout=5, message="a never cached")
        assert not await cached_for(as_b)
        await assert_eventually(lambda: cached_for(as_b), timeout=5, message="b never cached")
        removed = await cache.Invalidate(cache_pb2.InvalidateRequest(tenant="tenant-a"), timeout=5)
        assert removed.removed == 1
        assert not await cached_for(as_a)
        assert await cached_for(as_b)

    async def test_sampled_request_is_never_cached(
        self,
        router: router_pb2_grpc.RouterAsyncStub,
        cache: cache_pb2_grpc.CacheAsyncStub,
    ) -> None:
        """temperature > 0 without a seed neither reads nor writes the cache."""
        before = await cache.Stats(cache_pb2.StatsRequest(), timeout=5)
        req = request("Write a poem", max_tokens=8, temperature=0.8)
        answers = [await router.Generate(req, timeout=10) for _ in range(3)]
        assert not any(a.summary.cached for a in answers)
        after = await cache.Stats(cache_pb2.StatsRequest(), timeout=5)
        assert (after.hits, after.misses, after.entries) == (
            before.hits,
            before.misses,
            before.entries,
        )


class TestDeadlinesAndCancellation:
    """A caller's deadline and cancellation reach the engine through the router."""

    async def test_expired_deadline_aborts_the_engine_request(
        self, mesh: Mesh, router: router_pb2_grpc.RouterAsyncStub
    ) -> None:
        """A request outliving its deadline is DEADLINE_EXCEEDED and aborted on the worker."""
        req = request("A very long essay", max_tokens=4000, temperature=0.0)
        req.cache_policy = generate_pb2.CACHE_POLICY_BYPASS
        req.request_id = f"deadline-{time.time_ns()}"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.Generate(req, timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await assert_eventually(
            lambda: req.request_id in aborted_ids(mesh.workers),
            timeout=5,
            message="the worker never aborted the engine request",
        )

    async def test_client_cancel_aborts_the_engine_request(
        self, mesh: Mesh, router: router_pb2_grpc.RouterAsyncStub
    ) -> None:
        """Cancelling a stream mid-way aborts the engine request on the worker."""
        req = request("Another very long essay", max_tokens=4000, temperature=0.0)
        req.cache_policy = generate_pb2.CACHE_POLICY_BYPASS
        req.request_id = f"cancel-{time.time_ns()}"
        call = router.GenerateStream(req, timeout=30)
        first = await call.read()
        assert isinstance(first, generate_pb2.GenerateStreamResponse)
        call.cancel()
        await assert_eventually(
            lambda: req.request_id in aborted_ids(mesh.workers),
            timeout=5,
            message="the worker never aborted the engine request",
        )


class TestLifecycle:
    """Health and graceful shutdown of the router in a mesh."""

    async def test_sigterm_finishes_in_flight_streams_then_exits_zero(self) -> None:
        """On SIGTERM the router reports NOT_SERVING, finishes the stream in flight, exits 0."""
        redis = RedisServer().start()
        mesh = _start_mesh(redis, router_args=["--grace", "20s"])
        try:
            async with grpc.aio.insecure_channel(mesh.router.address) as channel:
                router: router_pb2_grpc.RouterAsyncStub = router_pb2_grpc.RouterStub(channel)
                health = health_pb2_grpc.HealthStub(channel)
                check = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                watch = health.Watch(
                    health_pb2.HealthCheckRequest(service="llmmesh.v1.Router"), timeout=30
                )
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

                req = request("An essay that takes a while", max_tokens=300, temperature=0.0)
                req.cache_policy = generate_pb2.CACHE_POLICY_BYPASS
                call = router.GenerateStream(req, timeout=30)
                first = await call.read()
                assert isinstance(first, generate_pb2.GenerateStreamResponse)
                mesh.router.signal(signal.SIGTERM)
                assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
                rest = []
                while (chunk := await call.read()) is not grpc.aio.EOF:  # type: ignore[attr-defined]
                    assert isinstance(chunk, generate_pb2.GenerateStreamResponse)
                    rest.append(chunk)
                assert rest[-1].HasField("summary")
                assert rest[-1].summary.finish_reason != generate_pb2.FINISH_REASON_CANCELLED
            code = await asyncio.to_thread(mesh.router.wait, 30)
            assert code == 0
        finally:
            mesh.close()
            redis.close()


class TestWorkerLoss:
    """A worker killed under load fails no request that had not started streaming."""

    async def test_sigkill_under_concurrent_load(self) -> None:
        """Unary callers never fail; streaming callers fail only after their first chunk."""
        workers = [
            ServiceProcess("worker", [*WORKER_ARGS, "--worker-id", f"w{i}"]).start() for i in (1, 2)
        ]
        router = ServiceProcess(
            "router",
            ["--workers", ",".join(w.address for w in workers), "--cache-address", ""],
        ).start()
        try:
            async with grpc.aio.insecure_channel(router.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                outcomes: list[tuple[str, int, str]] = []

                async def one(i: int, streaming: bool) -> None:
                    req = request(f"question {i}", max_tokens=120, temperature=0.0)
                    req.cache_policy = generate_pb2.CACHE_POLICY_BYPASS
                    chunks = 0
                    try:
                        if streaming:
                            async for chunk in stub.GenerateStream(req, timeout=30):
                                chunks += bool(chunk.text)
                        else:
                            await stub.Generate(req, timeout=30)
                        outcomes.append(("stream" if streaming else "unary", chunks, "OK"))
                    except grpc.aio.AioRpcError as exc:
                        kind = "stream" if streaming else "unary"
                        outcomes.append((kind, chunks, exc.code().name))

                tasks = [asyncio.create_task(one(i, i % 2 == 0)) for i in range(80)]

                async def w1_is_busy() -> bool:
                    table = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
                    return any(w.worker_id == "w1" and w.in_flight >= 10 for w in table.workers)

                await assert_eventually(w1_is_busy, timeout=10, message="w1 never got traffic")
                workers[0].kill()
                # Requests arriving after the kill must fail over too.
                tasks += [asyncio.create_task(one(100 + i, i % 2 == 0)) for i in range(40)]
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        finally:
            router.close()
            for w in workers:
                w.close()
        assert len(outcomes) == 120
        failed_before_streaming = [o for o in outcomes if o[2] != "OK" and o[1] == 0]
        assert failed_before_streaming == []
        assert all(code == "UNAVAILABLE" for _, _, code in outcomes if code != "OK")
        assert all(code == "OK" for kind, _, code in outcomes if kind == "unary")
        assert any(kind == "stream" and code != "OK" for kind, _, code in outcomes), (
            "no stream was cut by the kill: the test did not exercise a mid-stream loss"
        )
