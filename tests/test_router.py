"""Tests of the router through real sockets on 127.0.0.1: the router runs in-process behind
llmmesh.server.ServiceRunner, the workers and the cache are the small fakes of tests/fakes.py."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import prometheus_client
import pytest
import structlog.testing

from llmmesh.discovery import Discovery, Endpoint, StaticDiscovery, parse_address
from llmmesh.server import ServiceRunner, free_port
from llmmesh.settings import ConfigError, from_namespace
from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc
from router import RouterApp, RouterConfig, load_config
from tests.fakes import DEFAULT_MODEL, FakeCache, FakeServer, FakeWorker
from tests.harness import ServiceProcess, assert_eventually

MODEL = DEFAULT_MODEL
HEALTHY = router_pb2.WORKER_STATE_HEALTHY
SUSPECT = router_pb2.WORKER_STATE_SUSPECT


@dataclass
class Router:
    """A router running in-process, with a client stub."""

    runner: ServiceRunner
    app: RouterApp
    stub: router_pb2_grpc.RouterAsyncStub

    async def workers(self, model: str = "") -> list[router_pb2.WorkerStatus]:
        response = await self.stub.ListWorkers(router_pb2.ListWorkersRequest(model=model))
        return list(response.workers)

    async def state_of(self, address: str) -> int:
        return next(w.state for w in await self.workers() if w.address == address)


@contextlib.asynccontextmanager
async def running_router(
    workers: Sequence[str],
    *,
    cache: str = "",
    discovery: Discovery | None = None,
    **overrides: Any,
) -> AsyncIterator[Router]:
    config = RouterConfig(
        port=0,
        metrics_port=-1,
        workers=tuple(workers),
        cache_address=cache,
        grace=timedelta(0),
        **overrides,
    )
    app = RouterApp(config, discovery=discovery)
    runner = ServiceRunner(app, config, name="router")
    await runner.start()
    channel = grpc.aio.insecure_channel(runner.address)
    try:
        yield Router(runner, app, router_pb2_grpc.RouterStub(channel))
    finally:
        await channel.close(None)
        await runner.shutdown(grace=timedelta(0))


@contextlib.asynccontextmanager
async def serving(*workers: FakeWorker) -> AsyncIterator[list[FakeServer]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakeServer.for_worker(w)) for w in workers]


def request(prompt: str = "hello there", **fields: Any) -> generate_pb2.GenerateRequest:
    """A request for MODEL; deterministic (temperature 0) unless fields say otherwise."""
    sampling = fields.pop("sampling", generate_pb2.SamplingParams(temperature=0.0))
    fields.setdefault("model", MODEL)
    return generate_pb2.GenerateRequest(prompt=prompt, sampling=sampling, **fields)


async def collect(
    stream: grpc.aio.UnaryStreamCall[Any, generate_pb2.GenerateStreamResponse],
) -> list[generate_pb2.GenerateStreamResponse]:
    return [chunk async for chunk in stream]


async def generate(
    router: Router, req: generate_pb2.GenerateRequest, *, streaming: bool, timeout: float = 5
) -> str:
    """The text of an answer, asked for unary or streaming."""
    if streaming:
        chunks = await collect(router.stub.GenerateStream(req, timeout=timeout))
        return "".join(c.text for c in chunks)
    return (await router.stub.Generate(req, timeout=timeout)).text


def metric(name: str, **labels: str) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def worker() -> FakeWorker:
    return FakeWorker("w1")


@pytest.fixture
async def router(worker: FakeWorker) -> AsyncIterator[Router]:
    async with serving(worker) as servers, running_router([servers[0].address]) as router:
        yield router


class TestGenerate:
    """Unary and streaming requests reach a worker and come back with the router's summary."""

    async def test_unary(self, router: Router, worker: FakeWorker) -> None:
        response = await router.stub.Generate(request("hello there"), timeout=5)
        assert response.text == "w1 heard: hello there"
        assert response.model == MODEL
        summary = response.summary
        assert summary.finish_reason == generate_pb2.FINISH_REASON_STOP
        assert summary.worker_id == "w1"
        assert summary.model_version == "fake-1"
        assert not summary.cached
        assert summary.usage.completion_tokens == 4
        assert summary.timings.queue_ms == 1.5
        assert summary.timings.total_ms > 0
        assert 0 <= summary.timings.time_to_first_token_ms <= summary.timings.total_ms
        assert len(worker.requests) == 1

    async def test_request_id_assigned_when_empty(self, router: Router, worker: FakeWorker) -> None:
        response = await router.stub.Generate(request(), timeout=5)
        assert len(response.request_id) == 32
        int(response.request_id, 16)
        assert worker.requests[0].request_id == response.request_id
        other = await router.stub.Generate(request(), timeout=5)
        assert other.request_id != response.request_id

    async def test_request_id_echoed(self, router: Router, worker: FakeWorker) -> None:
        response = await router.stub.Generate(request(request_id="caller-42"), timeout=5)
        assert response.request_id == "caller-42"
        assert worker.requests[0].request_id == "caller-42"

    async def test_stream(self, router: Router, worker: FakeWorker) -> None:
        chunks = await collect(router.stub.GenerateStream(request("a b c d"), timeout=5))
        assert len(chunks) > 2
        assert "".join(c.text for c in chunks) == "w1 heard: a b c d"
        assert all(not c.HasField("summary") for c in chunks[:-1])
        summary = chunks[-1].summary
        assert summary.worker_id == "w1"
        assert summary.finish_reason == generate_pb2.FINISH_REASON_STOP
        assert not summary.cached
        assert 0 < summary.timings.time_to_first_token_ms <= summary.timings.total_ms
        request_ids = {c.request_id for c in chunks}
        assert len(request_ids) == 1
        assert request_ids == {worker.requests[0].request_id}
        assert len(request_ids.pop()) == 32
        # The worker's call ended with its own status, not with a cancellation.
        assert worker.cancellations == 0

    async def test_stream_without_summary(self, router: Router, worker: FakeWorker) -> None:
        worker.omit_summary = True
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(router.stub.GenerateStream(request(), timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "ended the stream without a summary" in (info.value.details() or "")

    async def test_stream_relays_chunks_as_they_arrive(self) -> None:
        slow = FakeWorker("w1", chunk_delay=0.2)
        async with serving(slow) as servers, running_router([servers[0].address]) as router:
            started = time.monotonic()
            chunks: list[generate_pb2.GenerateStreamResponse] = []
            async for chunk in router.stub.GenerateStream(request("one two three"), timeout=10):
                if not chunks:
                    first_after = time.monotonic() - started
                chunks.append(chunk)
        assert chunks[0].text == "w1"
        assert first_after < 0.25
        assert chunks[-1].summary.timings.time_to_first_token_ms < 250
        assert chunks[-1].summary.timings.total_ms > 700

    async def test_every_log_line_of_a_request_has_its_id(self) -> None:
        worker = FakeWorker("w1", model="m")
        async with serving(worker) as servers, running_router([servers[0].address]) as router:
            with structlog.testing.capture_logs(
                processors=[structlog.contextvars.merge_contextvars]
            ) as logs:
                with pytest.raises(grpc.aio.AioRpcError):
                    await router.stub.Generate(request(model="nope", request_id="rid-1"))
                worker.fail_with = grpc.StatusCode.INTERNAL
                with pytest.raises(grpc.aio.AioRpcError):
                    await router.stub.Generate(request(model="m", request_id="rid-2"))
                worker.fail_with = None
                await collect(router.stub.GenerateStream(request(model="m", request_id="rid-3")))
        assert len(logs) >= 4
        assert {line.get("request_id") for line in logs} == {"rid-1", "rid-2", "rid-3"}
        assert {line["event"] for line in logs} >= {"request failed", "worker call failed"}


class TestCache:
    """Deterministic answers are stored and served from the cache; nothing else touches it."""

    @pytest.fixture
    async def cache(self) -> FakeCache:
        return FakeCache()

    @pytest.fixture
    async def router(self, worker: FakeWorker, cache: FakeCache) -> AsyncIterator[Router]:
        async with (
            FakeServer.for_cache(cache) as cache_server,
            serving(worker) as servers,
            running_router([servers[0].address], cache=cache_server.address) as router,
        ):
            yield router

    async def test_second_identical_request_is_cached(
        self, router: Router, worker: FakeWorker, cache: FakeCache
    ) -> None:
        req = request("cache me", cache_ttl_seconds=77)
        first = await router.stub.Generate(req, timeout=5)
        assert not first.summary.cached
        await assert_eventually(lambda: len(cache.entries) == 1, timeout=5)
        [(key, entry)] = cache.entries.items()
        assert key.startswith("llmmesh:v1:")
        assert (entry.text, entry.worker_id, entry.model, entry.tenant) == (
            first.text,
            "w1",
            MODEL,
            "default",
        )
        assert entry.finish_reason == generate_pb2.FINISH_REASON_STOP
        assert entry.created_at_ms > 0
        assert cache.ttls[key] == 77

        second = await router.stub.Generate(req, timeout=5)
        assert second.summary.cached
        assert second.text == first.text
        assert second.summary.worker_id == "w1"
        assert second.summary.usage == first.summary.usage
        assert second.summary.model_version == "fake-1"
        assert second.request_id != first.request_id
        assert len(worker.requests) == 1

    async def test_cached_answer_streams_as_chunks(
        self, router: Router, worker: FakeWorker, cache: FakeCache
    ) -> None:
        long_prompt = " ".join(f"word{i}" for i in range(200))
        first = await collect(router.stub.GenerateStream(request(long_prompt), timeout=5))
        await assert_eventually(lambda: len(cache.entries) == 1, timeout=5)
        chunks = await collect(router.stub.GenerateStream(request(long_prompt), timeout=5))
        assert len(chunks) > 2
        assert "".join(c.text for c in chunks) == "".join(c.text for c in first)
        assert chunks[-1].summary.cached
        assert chunks[-1].summary.worker_id == "w1"
        assert len({c.request_id for c in chunks}) == 1
        assert len(worker.requests) == 1

    async def test_tenants_do_not_share_entries(
        self, router: Router, worker: FakeWorker, cache: FakeCache
    ) -> None:
        await router.stub.Generate(request(), metadata=(("x-llmmesh-tenant", "a"),), timeout=5)
        await assert_eventually(lambda: len(cache.entries) == 1, timeout=5)
        other = await router.stub.Generate(
            request(), metadata=(("x-llmmesh-tenant", "b"),), timeout=5
        )
        assert not other.summary.cached
        await assert_eventually(lambda: len(cache.entries) == 2, timeout=5)
        assert {e.tenant for e in cache.entries.values()} == {"a", "b"}

    async def test_sampled_request_never_touches_the_cache(
        self, router: Router, worker: FakeWorker, cache: FakeCache
    ) -> None:
        sampled = request(sampling=generate_pb2.SamplingParams(temperature=0.7))
        for _ in range(2):
            response = await router.stub.Generate(sampled, timeout=5)
            assert not response.summary.cached
        chunks = await collect(router.stub.GenerateStream(sampled, timeout=5))
        assert not chunks[-1].summary.cached
        assert len(worker.requests) == 3
        assert (cache.lookups, cache.stores) == (0, 0)

    async def test_seeded_request_is_cached(
        self, router: Router, worker: FakeWorker, cache: FakeCache
    ) -> None:
        seeded = request(sampling=generate_pb2.SamplingParams(temperature=0.9, seed=5))
        await router.stub.Generate(seeded, timeout=5)
        await assert_eventually(lambda: len(cache.entries) == 1, timeout=5)
        assert (await router.stub.Generate(seeded, timeout=5)).summary.cached

    async def test_bypass_and_refresh(
        self, router: Router, worker: FakeWorker, cache: FakeCache
    ) -> None:
        await router.stub.Generate(request(cache_policy=generate_pb2.CACHE_POLICY_BYPASS))
        assert (cache.lookups, cache.stores) == (0, 0)
        await router.stub.Generate(request(cache_policy=generate_pb2.CACHE_POLICY_REFRESH))
        await assert_eventually(lambda: cache.stores == 1, timeout=5)
        assert cache.lookups == 0
        assert len(worker.requests) == 2

    async def test_only_if_cached(
        self, router: Router, worker: FakeWorker, cache: FakeCache
    ) -> None:
        only = request(cache_policy=generate_pb2.CACHE_POLICY_ONLY_IF_CACHED)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await router.stub.Generate(only, timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no cached answer" in (info.value.details() or "")
        assert worker.requests == []
        await router.stub.Generate(request(), timeout=5)
        await assert_eventually(lambda: len(cache.entries) == 1, timeout=5)
        assert (await router.stub.Generate(only, timeout=5)).summary.cached
        assert cache.stores == 1


class TestCacheOutage:
    """A cache that is down or slow never fails or delays a request; the outage is logged once."""

    async def test_cache_down(self, worker: FakeWorker) -> None:
        nothing_there = f"127.0.0.1:{free_port()}"
        errors_before = metric("llmmesh_router_cache_requests_total", result="error")
        skipped_before = metric("llmmesh_router_cache_requests_total", result="skipped")
        async with (
            serving(worker) as servers,
            running_router([servers[0].address], cache=nothing_there) as router,
        ):
            with structlog.testing.capture_logs() as logs:
                for i in range(4):
                    started = time.monotonic()
                    response = await router.stub.Generate(request(f"p{i}"), timeout=5)
                    assert time.monotonic() - started < 0.5
                    assert response.text == f"w1 heard: p{i}"
                chunks = await collect(router.stub.GenerateStream(request("s"), timeout=5))
                assert chunks[-1].summary.worker_id == "w1"
        outages = [
            line for line in logs if line["event"] == "cache unavailable; serving without it"
        ]
        assert len(outages) == 1
        assert outages[0]["log_level"] == "warning"
        # Every lookup is a miss: tried and failed, or skipped at once once the circuit opened
        # (the failed background stores count towards opening it too).
        errors = metric("llmmesh_router_cache_requests_total", result="error") - errors_before
        skipped = metric("llmmesh_router_cache_requests_total", result="skipped") - skipped_before
        assert errors + skipped == 5
        assert skipped >= 1

    async def test_cache_slow(self, worker: FakeWorker) -> None:
        cache = FakeCache(delay=0.5)
        errors_before = metric("llmmesh_router_cache_requests_total", result="error")
        async with (
            FakeServer.for_cache(cache) as cache_server,
            serving(worker) as servers,
            running_router(
                [servers[0].address],
                cache=cache_server.address,
                cache_timeout=timedelta(milliseconds=50),
            ) as router,
        ):
            for _ in range(2):
                started = time.monotonic()
                response = await router.stub.Generate(request(), timeout=5)
                assert time.monotonic() - started < 0.3
                assert not response.summary.cached
            assert cache.lookups == 2
        assert metric("llmmesh_router_cache_requests_total", result="error") - errors_before == 2

    async def test_cache_recovery_is_logged_once(self, worker: FakeWorker) -> None:
        cache = FakeCache()
        cache_server = FakeServer.for_cache(cache)
        await cache_server.start()
        async with (
            serving(worker) as servers,
            running_router([servers[0].address], cache=cache_server.address) as router,
        ):
            with structlog.testing.capture_logs() as logs:
                await cache_server.stop()
                for i in range(3):
                    await router.stub.Generate(request(f"down {i}"), timeout=5)
                await cache_server.start()

                async def cache_answers() -> bool:
                    await router.stub.Generate(request("up"), timeout=5)
                    return cache.lookups > 0

                await assert_eventually(cache_answers, timeout=5, interval=0.1)
            await cache_server.stop()
        events = [line["event"] for line in logs if line["event"].startswith("cache ")]
        assert events == ["cache unavailable; serving without it", "cache available again"]


class TestDeadlinesAndCancellation:
    """The caller's deadline reaches the worker; a caller that goes away stops the worker."""

    async def test_caller_deadline_reaches_worker(self, router: Router, worker: FakeWorker) -> None:
        await router.stub.Generate(request(), timeout=5)
        await collect(router.stub.GenerateStream(request(), timeout=3))
        [unary, stream] = worker.time_remaining
        # gRPC rounds a deadline up to its timer resolution on each hop, hence the small slack.
        assert unary is not None
        assert 4 < unary <= 5.05
        assert stream is not None
        assert 2 < stream <= 3.05

    async def test_no_deadline_gets_the_router_maximum(self, worker: FakeWorker) -> None:
        async with (
            serving(worker) as servers,
            running_router([servers[0].address], max_request_time=timedelta(seconds=42)) as router,
        ):
            await router.stub.Generate(request())
        [remaining] = worker.time_remaining
        assert remaining is not None
        assert 40 < remaining <= 42.2

    async def test_stream_cancel_reaches_worker(self, router: Router, worker: FakeWorker) -> None:
        worker.chunk_delay = 10.0
        stream = router.stub.GenerateStream(request("one two three"), timeout=30)
        first = await stream.read()
        assert isinstance(first, generate_pb2.GenerateStreamResponse)
        assert first.text == "w1"
        stream.cancel()
        await asyncio.wait_for(worker.cancelled.wait(), timeout=1.0)
        assert worker.cancellations == 1
        await assert_eventually(
            lambda: router.app.pool.workers()[0].in_flight == 0, timeout=2, message="in flight"
        )

    async def test_unary_cancel_reaches_worker(self, router: Router, worker: FakeWorker) -> None:
        worker.delay = 10.0
        call = router.stub.Generate(request(), timeout=30)
        await assert_eventually(lambda: worker.active == 1, timeout=2)
        call.cancel()
        await asyncio.wait_for(worker.cancelled.wait(), timeout=1.0)
        await assert_eventually(lambda: router.app.pool.workers()[0].in_flight == 0, timeout=2)

    @pytest.mark.parametrize("streaming", [False, True])
    async def test_worker_slower_than_deadline(
        self, router: Router, worker: FakeWorker, streaming: bool
    ) -> None:
        worker.delay = 5.0
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(router, request(), streaming=streaming, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 1.5
        await asyncio.wait_for(worker.cancelled.wait(), timeout=1.0)

    @pytest.mark.parametrize(
        ("worker_code", "expected"),
        [
            (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DEADLINE_EXCEEDED),
            (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED),
            # The request's own failure (its engine failed it alone): passed on as it is.
            (grpc.StatusCode.INTERNAL, grpc.StatusCode.INTERNAL),
            (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE),
        ],
    )
    @pytest.mark.parametrize("streaming", [False, True])
    async def test_worker_errors_are_mapped(
        self,
        router: Router,
        worker: FakeWorker,
        worker_code: grpc.StatusCode,
        expected: grpc.StatusCode,
        streaming: bool,
    ) -> None:
        worker.fail_with = worker_code
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(router, request(), streaming=streaming)
        assert info.value.code() == expected
        assert "Traceback" not in (info.value.details() or "")
        assert router.app.pool.workers()[0].in_flight == 0

    @pytest.mark.parametrize("streaming", [False, True])
    async def test_a_requests_own_failure_leaves_the_worker_in_rotation(
        self, router: Router, worker: FakeWorker, streaming: bool
    ) -> None:
        """INTERNAL from a worker is that request's failure: passed on, not retried, not
        counted against the worker, which takes the next request at once."""
        await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 1)
        worker.fail_with = grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await generate(router, request(), streaming=streaming)
        assert info.value.code() == grpc.StatusCode.INTERNAL
        assert info.value.details() == "fake worker fails with INTERNAL"
        assert len(worker.requests) == 1
        [pooled] = router.app.pool.workers()
        assert (pooled.consecutive_failures, pooled.last_error) == (0, "")
        worker.fail_with = None
        assert await generate(router, request(), streaming=streaming) == worker.answer(
            "hello there"
        )
        [status] = await router.workers()
        assert status.state == HEALTHY

    async def test_worker_unavailable_names_it_and_marks_it_suspect(
        self, router: Router, worker: FakeWorker
    ) -> None:
        worker.fail_with = grpc.StatusCode.UNAVAILABLE
        info_calls = worker.info_calls
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await router.stub.Generate(request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "w1" in (info.value.details() or "")
        # It answers GetInfo again, so it is probed back to HEALTHY.
        await assert_eventually(lambda: worker.info_calls > info_calls, timeout=5)
        [status] = await router.workers()
        assert status.state == HEALTHY


class TestBadInput:
    """Bad input gets INVALID_ARGUMENT naming the field, and never reaches a worker."""

    @pytest.mark.parametrize(
        ("req", "field"),
        [
            (generate_pb2.GenerateRequest(model=MODEL, prompt=""), "prompt"),
            (generate_pb2.GenerateRequest(model=MODEL, prompt="   "), "prompt"),
            (generate_pb2.GenerateRequest(prompt="hi"), "model"),
            (request(sampling=generate_pb2.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
            (request(sampling=generate_pb2.SamplingParams(max_tokens=-3)), "sampling.max_tokens"),
            (request(sampling=generate_pb2.SamplingParams(max_tokens=101)), "sampling.max_tokens"),
            (request(sampling=generate_pb2.SamplingParams(temperature=-0.1)), "temperature"),
            (request(sampling=generate_pb2.SamplingParams(temperature=math.nan)), "temperature"),
            (request(sampling=generate_pb2.SamplingParams(top_p=0.0)), "sampling.top_p"),
            (request(sampling=generate_pb2.SamplingParams(top_p=1.5)), "sampling.top_p"),
            (request("x" * 201), "prompt"),
            (request(request_id="x" * 129), "request_id"),
        ],
        ids=[
            "empty-prompt",
            "blank-prompt",
            "no-model",
            "max-tokens-0",
            "max-tokens-negative",
            "max-tokens-above-limit",
            "negative-temperature",
            "nan-temperature",
            "top-p-0",
            "top-p-1.5",
            "prompt-too-long",
            "request-id-too-long",
        ],
    )
    @pytest.mark.parametrize("streaming", [False, True])
    async def test_invalid_request(
        self, worker: FakeWorker, req: generate_pb2.GenerateRequest, field: str, streaming: bool
    ) -> None:
        async with (
            serving(worker) as servers,
            running_router(
                [servers[0].address],
                default_max_tokens=50,
                max_tokens_limit=100,
                max_prompt_chars=200,
            ) as router,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await generate(router, req, streaming=streaming)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (info.value.details() or "")
        assert worker.requests == []

    @pytest.mark.parametrize("tenant", ["x" * 65, "has space", "semi;colon", "slash/es", ""])
    async def test_bad_tenant(self, router: Router, worker: FakeWorker, tenant: str) -> None:
        metadata = (("x-llmmesh-tenant", tenant),)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await router.stub.Generate(request(), metadata=metadata, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "metadata x-llmmesh-tenant" in (info.value.details() or "")
        assert worker.requests == []

    async def test_good_tenant(self, router: Router) -> None:
        metadata = (("x-llmmesh-tenant", "team-a.prod_1"),)
        await router.stub.Generate(request(), metadata=metadata, timeout=5)

    async def test_unknown_model(self, router: Router, worker: FakeWorker) -> None:
        counted = metric("llmmesh_router_requests_total", method="Generate", code="NOT_FOUND")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await router.stub.Generate(request(model="gpt-imaginary"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert info.value.details() == (
            f"model 'gpt-imaginary' is not served here; known models: {MODEL}"
        )
        assert worker.requests == []
        after = metric("llmmesh_router_requests_total", method="Generate", code="NOT_FOUND")
        assert after == counted + 1

    async def test_oversized_message(self, worker: FakeWorker) -> None:
        async with (
            serving(worker) as servers,
            running_router([servers[0].address], max_message_bytes=64 * 1024) as router,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router.stub.Generate(request("x" * 100_000), timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert worker.requests == []


class TestBalancing:
    """Requests go to the least-loaded worker; equally loaded workers share traffic."""

    async def test_busy_worker_is_avoided(self) -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        a.gate, b.gate = asyncio.Event(), asyncio.Event()
        async with serving(a, b) as servers, running_router([s.address for s in servers]) as router:
            held = [
                asyncio.ensure_future(router.stub.Generate(request(f"held {i}"), timeout=10))
                for i in range(6)
            ]
            await assert_eventually(lambda: len(a.requests) + len(b.requests) == 6, timeout=5)
            # Assigned one at a time, each to the least loaded: three each.
            assert (len(a.requests), len(b.requests)) == (3, 3)
            table = {w.worker_id: w for w in await router.workers()}
            assert (table["a"].in_flight, table["b"].in_flight) == (3, 3)
            assert table["a"].score == 0.75
            b.gate.set()
            await assert_eventually(lambda: sum(t.done() for t in held) == 3, timeout=5)
            # a holds three requests, b none: every new request goes to b.
            for i in range(8):
                response = await router.stub.Generate(request(f"new {i}"), timeout=5)
                assert response.summary.worker_id == "b"
            assert len(a.requests) == 3
            a.gate.set()
            assert {(await t).summary.worker_id for t in held} == {"a", "b"}
            assert all(w.in_flight == 0 for w in await router.workers())

    async def test_equal_workers_share_traffic(self) -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        async with serving(a, b) as servers, running_router([s.address for s in servers]) as router:
            served = [
                (await router.stub.Generate(request(f"p{i}"), timeout=5)).summary.worker_id
                for i in range(24)
            ]
        assert set(served) == {"a", "b"}
        assert len(a.requests) + len(b.requests) == 24

    async def test_only_workers_of_the_model_are_used(self) -> None:
        a, b = FakeWorker("a", model="m1"), FakeWorker("b", model="m2")
        async with serving(a, b) as servers, running_router([s.address for s in servers]) as router:
            for _ in range(6):
                response = await router.stub.Generate(request(model="m2"), timeout=5)
                assert response.summary.worker_id == "b"
        assert a.requests == []


class TestListWorkers:
    """ListWorkers shows the routing table, sorted by model then worker id."""

    async def test_table(self) -> None:
        fakes = [
            FakeWorker("w-b", model="m2", capacity=8),
            FakeWorker("w-z", model="m1"),
            FakeWorker("w-a", model="m1", capacity=2),
        ]
        async with (
            serving(*fakes) as servers,
            running_router([s.address for s in servers]) as router,
        ):
            rows = await router.workers()
            assert [(r.model, r.worker_id) for r in rows] == [
                ("m1", "w-a"),
                ("m1", "w-z"),
                ("m2", "w-b"),
            ]
            by_id = {r.worker_id: r for r in rows}
            addresses = {f.worker_id: s.address for f, s in zip(fakes, servers, strict=True)}
            for worker_id, row in by_id.items():
                assert row.address == addresses[worker_id]
                assert row.engine == "fake"
                assert row.state == HEALTHY
                assert row.in_flight == 0
                assert row.score == 0.0
                # -1 before the worker's first load report; the fakes report at once.
                assert row.last_report_age_ms < 1000
            assert (by_id["w-a"].capacity, by_id["w-b"].capacity) == (2, 8)
            only_m2 = await router.workers(model="m2")
            assert [r.worker_id for r in only_m2] == ["w-b"]
            assert await router.workers(model="nothing") == []


class TestWorkerHealth:
    """A worker that goes away becomes SUSPECT and gets no traffic until it answers again."""

    async def test_worker_goes_away_and_comes_back(self, worker: FakeWorker) -> None:
        server = await FakeServer.for_worker(worker).start()
        try:
            async with running_router([server.address]) as router:
                assert await router.state_of(server.address) == HEALTHY
                await server.stop()
                await assert_eventually(
                    _state_is(router, server.address, SUSPECT), timeout=5, message="not SUSPECT"
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await router.stub.Generate(request(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert info.value.details() == f"no healthy worker serves model '{MODEL}'"
                [row] = await router.workers()
                assert (row.worker_id, row.model) == ("w1", MODEL)

                await server.start()
                await assert_eventually(
                    _state_is(router, server.address, HEALTHY), timeout=5, message="not HEALTHY"
                )
                response = await router.stub.Generate(request(), timeout=5)
                assert response.summary.worker_id == "w1"
        finally:
            await server.stop()

    async def test_traffic_moves_to_the_worker_that_remains(self) -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        server_a, server_b = FakeServer.for_worker(a), FakeServer.for_worker(b)
        await server_a.start()
        await server_b.start()
        try:
            async with running_router([server_a.address, server_b.address]) as router:
                await server_a.stop()
                for _ in range(6):
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        await router.stub.Generate(request(), timeout=5)
                await assert_eventually(_state_is(router, server_a.address, SUSPECT), timeout=5)
                for _ in range(6):
                    response = await router.stub.Generate(request(), timeout=5)
                    assert response.summary.worker_id == "b"
        finally:
            await server_a.stop()
            await server_b.stop()

    async def test_worker_not_up_yet(self) -> None:
        worker = FakeWorker("late")
        server = FakeServer.for_worker(worker)
        server.port = free_port()
        async with running_router([server.address]) as router:
            assert await router.state_of(server.address) == SUSPECT
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router.stub.Generate(request(), timeout=5)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            assert "1 worker(s) have not answered yet" in (info.value.details() or "")
            await server.start()
            try:
                await assert_eventually(_state_is(router, server.address, HEALTHY), timeout=5)
                response = await router.stub.Generate(request(), timeout=5)
                assert response.summary.worker_id == "late"
            finally:
                await server.stop()


class ChangingDiscovery:
    """A discovery source whose sets a test pushes."""

    def __init__(self) -> None:
        self.sets: asyncio.Queue[frozenset[Endpoint]] = asyncio.Queue()
        self.closed = False

    def publish(self, *addresses: str) -> None:
        self.sets.put_nowait(frozenset(Endpoint.of(a, {"model": MODEL}) for a in addresses))

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        while True:
            yield await self.sets.get()

    async def close(self) -> None:
        self.closed = True


class TestDiscoveryChanges:
    """The routing table follows the sets discovery yields: new workers join, gone ones leave."""

    async def test_workers_join_and_leave(self) -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        discovery = ChangingDiscovery()
        async with serving(a, b) as (server_a, server_b):
            discovery.publish(server_a.address)
            # Without a discovery grace a dropped worker leaves at once, serving or not.
            async with running_router(
                ["unused:1"], discovery=discovery, discovery_grace=timedelta(0)
            ) as router:
                assert [w.worker_id for w in await router.workers()] == ["a"]
                discovery.publish(server_a.address, server_b.address)
                await assert_eventually(_state_is(router, server_b.address, HEALTHY), timeout=5)
                discovery.publish(server_b.address)

                async def only_b() -> bool:
                    return [w.worker_id for w in await router.workers()] == ["b"]

                await assert_eventually(only_b, timeout=5)
                for _ in range(4):
                    response = await router.stub.Generate(request(), timeout=5)
                    assert response.summary.worker_id == "b"
            assert discovery.closed
        assert len(a.requests) == 0


class TestDiscoveryGrace:
    """A worker that discovery drops while its own load stream is live and serving stays
    routable for --discovery-grace (logged once, counted); it leaves when the grace runs out,
    its stream ends, or it says it no longer serves."""

    GRACE_EVENT = (
        "discovery dropped a worker whose own load stream is live and serving; keeping it "
        "routable for the grace"
    )

    @staticmethod
    async def addresses(router: Router) -> set[str]:
        return {w.address for w in await router.workers()}

    @staticmethod
    async def until_healthy(router: Router, *addresses: str) -> None:
        """Every one of ``addresses`` is HEALTHY and has sent a load report."""
        for address in addresses:
            await assert_eventually(_state_is(router, address, HEALTHY), timeout=5)
        await asyncio.sleep(0.1)  # a load report from each

    async def test_an_empty_passing_set_keeps_live_workers_for_the_grace(self) -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        discovery = ChangingDiscovery()
        async with serving(a, b) as (server_a, server_b):
            discovery.publish(server_a.address, server_b.address)
            async with running_router(
                ["unused:1"], discovery=discovery, discovery_grace=timedelta(seconds=1.5)
            ) as router:
                await self.until_healthy(router, server_a.address, server_b.address)
                await assert_eventually(lambda: a.watch_calls > 0 and b.watch_calls > 0, timeout=5)
                before = metric("llmmesh_router_discovery_grace_total")
                with structlog.testing.capture_logs() as logs:
                    discovery.publish()  # e.g. Consul back from an outage, every check critical
                    discovery.publish()  # a second empty answer changes nothing
                    await asyncio.sleep(0.2)
                    served = {
                        (await router.stub.Generate(request(f"p{i}"), timeout=5)).summary.worker_id
                        for i in range(8)
                    }
                    assert served == {"a", "b"}
                    assert await self.addresses(router) == {server_a.address, server_b.address}
                    assert metric("llmmesh_router_discovery_grace_total") - before == 2
                    assert metric("llmmesh_router_workers_in_discovery_grace") == 2
                    graced = [e for e in logs if e["event"] == self.GRACE_EVENT]
                    assert len(graced) == 2  # once per worker
                    assert graced[0]["log_level"] == "warning"
                    assert graced[0]["grace_s"] == 1.5

                    async def table_empty() -> bool:
                        return not await self.addresses(router)

                    await assert_eventually(table_empty, timeout=5)  # the grace ran out
                assert metric("llmmesh_router_workers_in_discovery_grace") == 0
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await router.stub.Generate(request(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_listed_again_ends_the_grace(self) -> None:
        a = FakeWorker("a")
        discovery = ChangingDiscovery()
        async with serving(a) as (server_a,):
            discovery.publish(server_a.address)
            async with running_router(
                ["unused:1"], discovery=discovery, discovery_grace=timedelta(seconds=0.5)
            ) as router:
                await self.until_healthy(router, server_a.address)
                discovery.publish()
                await asyncio.sleep(0.1)
                discovery.publish(server_a.address)
                await asyncio.sleep(1.0)  # past the grace: it stays, listed again
                assert await self.addresses(router) == {server_a.address}
                assert metric("llmmesh_router_workers_in_discovery_grace") == 0

    async def test_a_worker_that_stops_serving_or_whose_stream_ends_leaves_at_once(
        self,
    ) -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        discovery = ChangingDiscovery()
        async with serving(a, b) as (server_a, server_b):
            discovery.publish(server_a.address, server_b.address)
            async with running_router(
                ["unused:1"], discovery=discovery, discovery_grace=timedelta(seconds=30)
            ) as router:
                await self.until_healthy(router, server_a.address, server_b.address)
                discovery.publish()
                await asyncio.sleep(0.1)
                assert await self.addresses(router) == {server_a.address, server_b.address}
                a.serving = False  # it drains: its stream says so
                a.load_changed()

                async def only(address: str) -> Any:
                    async def check() -> bool:
                        return await self.addresses(router) == {address}

                    return check

                await assert_eventually(await only(server_b.address), timeout=3)
                await server_b.stop()  # its stream ends

                async def table_empty() -> bool:
                    return not await self.addresses(router)

                await assert_eventually(table_empty, timeout=3)

    async def test_a_worker_that_never_reported_leaves_at_once(self) -> None:
        a = FakeWorker("a")
        a.reporting = False
        discovery = ChangingDiscovery()
        async with serving(a) as (server_a,):
            discovery.publish(server_a.address)
            async with running_router(
                ["unused:1"], discovery=discovery, discovery_grace=timedelta(seconds=30)
            ) as router:
                await assert_eventually(_state_is(router, server_a.address, HEALTHY), timeout=5)
                discovery.publish()

                async def table_empty() -> bool:
                    return not await self.addresses(router)

                await assert_eventually(table_empty, timeout=3)


def _state_is(router: Router, address: str, state: int) -> Any:
    async def check() -> bool:
        return await router.state_of(address) == state

    return check


class TestShutdown:
    """On shutdown the router finishes the requests in flight within the grace period."""

    async def test_in_flight_request_finishes(self, worker: FakeWorker) -> None:
        worker.gate = asyncio.Event()
        async with serving(worker) as servers, running_router([servers[0].address]) as router:
            call = asyncio.ensure_future(router.stub.Generate(request(), timeout=10))
            await assert_eventually(lambda: worker.active == 1, timeout=5)
            with structlog.testing.capture_logs() as logs:
                shutdown = asyncio.ensure_future(router.runner.shutdown(grace=timedelta(seconds=5)))
                await assert_eventually(
                    lambda: any(line["event"] == "draining" for line in logs), timeout=5
                )
            worker.gate.set()
            response = await call
            await shutdown
        assert response.text == "w1 heard: hello there"
        assert worker.cancellations == 0


class TestConfig:
    """RouterConfig comes from flags, then LLMMESH_* variables, then defaults, and is checked."""

    def test_defaults(self) -> None:
        config = load_config([], environ={})
        assert (config.port, config.metrics_port) == (50051, 9401)
        assert config.workers == ("127.0.0.1:50061",)
        assert config.cache_address == "127.0.0.1:50071"
        assert config.cache_timeout == timedelta(milliseconds=100)
        assert config.policy == "least-loaded"
        assert config.discovery == "static"
        assert config.limits.max_tokens_limit == 4096
        assert config.discovery_grace == timedelta(seconds=30)

    def test_flags_and_environment(self) -> None:
        config = load_config(
            ["--workers", "a:1,b:2", "--cache-timeout", "20ms"],
            environ={"LLMMESH_CACHE_ADDRESS": "", "LLMMESH_WORKERS": "c:3", "LLMMESH_PORT": "7"},
        )
        assert config.workers == ("a:1", "b:2")
        assert config.cache_address == ""
        assert config.cache_timeout == timedelta(milliseconds=20)
        assert config.port == 7

    @pytest.mark.parametrize(
        ("overrides", "problem"),
        [
            ({"workers": ("nope",)}, "workers"),
            ({"workers": ("a:99999",)}, "workers"),
            ({"workers": ()}, "workers"),
            ({"cache_address": "x"}, "cache_address"),
            ({"cache_timeout": timedelta(0)}, "cache_timeout"),
            ({"default_max_tokens": 10, "max_tokens_limit": 5}, "default_max_tokens"),
            ({"discovery_grace": timedelta(seconds=-1)}, "discovery_grace"),
        ],
    )
    def test_rejected(self, overrides: dict[str, Any], problem: str) -> None:
        with pytest.raises(ValueError, match=problem):
            RouterConfig(**overrides)

    def test_bad_environment_names_the_variable(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            load_config([], environ={"LLMMESH_WORKERS": "no-port"})
        assert "workers: 'no-port' is not host:port" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="LLMMESH_CACHE_TIMEOUT"):
            from_namespace(RouterConfig, argparse.Namespace(), {"LLMMESH_CACHE_TIMEOUT": "soon"})


class TestStaticDiscovery:
    """StaticDiscovery yields its fixed set once; addresses are checked."""

    async def test_yields_the_set(self) -> None:
        discovery = StaticDiscovery(["127.0.0.1:1", "localhost:2", "127.0.0.1:1"])
        sets = [s async for s in discovery.watch()]
        assert sets == [frozenset({Endpoint.of("127.0.0.1:1"), Endpoint.of("localhost:2")})]

    def test_endpoint_metadata(self) -> None:
        endpoint = Endpoint.of("h:1", {"model": "m", "engine": "sim"})
        assert endpoint.meta == {"model": "m", "engine": "sim"}
        assert endpoint == Endpoint.of("h:1", {"engine": "sim", "model": "m"})
        assert hash(endpoint) == hash(Endpoint.of("h:1", {"engine": "sim", "model": "m"}))

    @pytest.mark.parametrize("address", ["h", "h:", ":1", "h:0", "h:70000", "a b:1", "[zz]:1"])
    def test_bad_address(self, address: str) -> None:
        with pytest.raises(ValueError, match="not"):
            parse_address(address)

    @pytest.mark.parametrize("address", ["127.0.0.1:50061", "worker_1:80", "[::1]:9", "a.b-c:1"])
    def test_good_address(self, address: str) -> None:
        host, port = parse_address(address)
        assert f"{host}:{port}" == address


class TestProcess:
    """``python -m router`` serves, logs JSON lines with the request id, and stops on SIGTERM."""

    async def test_python_m_router(self, worker: FakeWorker) -> None:
        async with serving(worker) as servers:
            proc = ServiceProcess(
                "router",
                ["--workers", servers[0].address, "--cache-address", "", "--metrics-port", "-1"],
            )
            await asyncio.to_thread(proc.start)
            try:
                async with grpc.aio.insecure_channel(proc.address) as channel:
                    stub = router_pb2_grpc.RouterStub(channel)
                    response = await stub.Generate(request(request_id="proc-1"), timeout=5)
                    assert response.text == "w1 heard: hello there"
                    with pytest.raises(grpc.aio.AioRpcError):
                        await stub.Generate(request(model="other", request_id="proc-2"))
            finally:
                code = await asyncio.to_thread(proc.stop)
                records = proc.log_records()
                proc.close()
        assert code == 0
        finished = [r for r in records if r.get("event") in ("request finished", "request failed")]
        assert [(r["request_id"], r["code"]) for r in finished] == [
            ("proc-1", "OK"),
            ("proc-2", "NOT_FOUND"),
        ]
        assert all(r["service"] == "router" for r in records)


class TestFailover:
    """A worker that fails before the first token is replaced by another; after it, never."""

    @pytest.mark.parametrize("streaming", [False, True])
    @pytest.mark.parametrize(
        "code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    )
    async def test_failure_before_first_token_is_retried_elsewhere(
        self, streaming: bool, code: grpc.StatusCode
    ) -> None:
        """Every request succeeds on the healthy worker while the other one fails."""
        bad, good = FakeWorker("bad"), FakeWorker("good")
        bad.fail_with = code
        retries = metric("llmmesh_router_retries_total", code=code.name)
        async with (
            serving(bad, good) as servers,
            running_router([s.address for s in servers]) as router,
        ):
            await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 2)
            texts = [
                await generate(router, request(f"q{i}"), streaming=streaming) for i in range(8)
            ]
        assert texts == [good.answer(f"q{i}") for i in range(8)]
        assert len(good.requests) == 8
        assert bad.requests, "the failing worker was never tried: the test proves nothing"
        assert metric("llmmesh_router_retries_total", code=code.name) - retries == len(bad.requests)

    async def test_failure_after_first_token_reaches_the_caller(self) -> None:
        """A stream that broke after its first chunk is UNAVAILABLE, not silently restarted."""
        broken, spare = FakeWorker("broken"), FakeWorker("spare")
        broken.fail_after_chunks = 1
        spare.fail_with = grpc.StatusCode.INTERNAL  # must never be called
        async with (
            serving(broken) as first,
            running_router([first[0].address]) as router,
            serving(spare),
        ):
            chunks: list[generate_pb2.GenerateStreamResponse] = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _read_into(router.stub.GenerateStream(request("tell me"), timeout=5), chunks)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert [c.text for c in chunks] == ["broken"]
        assert spare.requests == []

    async def test_failure_after_first_token_is_not_retried_on_a_healthy_worker(self) -> None:
        """Even with a healthy worker available, a half-streamed answer is not replayed."""
        broken, healthy = FakeWorker("broken"), FakeWorker("healthy")
        broken.fail_after_chunks = 1
        async with (
            serving(broken, healthy) as servers,
            running_router([s.address for s in servers]) as router,
        ):
            await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 2)
            outcomes = []
            for i in range(6):
                try:
                    await generate(router, request(f"q{i}"), streaming=True)
                    outcomes.append("ok")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(exc.code().name)
        assert len(broken.requests) + len(healthy.requests) == 6
        assert outcomes.count("UNAVAILABLE") == len(broken.requests) > 0

    async def test_non_retryable_errors_are_not_retried(self) -> None:
        """A worker's DEADLINE_EXCEEDED or INTERNAL goes straight to the caller."""
        a, b = FakeWorker("a"), FakeWorker("b")
        a.fail_with = b.fail_with = grpc.StatusCode.INTERNAL
        async with (
            serving(a, b) as servers,
            running_router([s.address for s in servers]) as router,
        ):
            await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 2)
            with pytest.raises(grpc.aio.AioRpcError):
                await router.stub.Generate(request(), timeout=5)
        assert len(a.requests) + len(b.requests) == 1

    async def test_attempts_are_bounded(self) -> None:
        """With every worker failing, a request is tried on at most max_attempts of them."""
        fakes = [FakeWorker(f"w{i}") for i in range(4)]
        for fake in fakes:
            fake.fail_with = grpc.StatusCode.UNAVAILABLE
        async with (
            serving(*fakes) as servers,
            running_router([s.address for s in servers], max_attempts=2) as router,
        ):
            await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 4)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router.stub.Generate(request(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sum(len(f.requests) for f in fakes) == 2


async def _read_into(
    call: grpc.aio.UnaryStreamCall[Any, generate_pb2.GenerateStreamResponse],
    chunks: list[generate_pb2.GenerateStreamResponse],
) -> None:
    """Append every chunk of ``call`` to ``chunks`` (so they survive the call's failure)."""
    async for chunk in call:
        chunks.append(chunk)
