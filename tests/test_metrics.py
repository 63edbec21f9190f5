"""Every service's Prometheus metrics, scraped over HTTP after real traffic.

The mesh is real processes (Redis, the cache service, two ``sim`` workers, the router), each with
its own metrics port. Each ``/metrics`` is scraped before and after a known mix of requests
(unique unary and streaming misses, repeats that hit the cache, a bad request, an unknown model),
the exposition text is parsed with prometheus-client's parser, and every counter whose movement
the traffic decides is checked to have moved by exactly that much, across services where two of
them count the same thing (the router's cache hits and the cache service's). Gauges are checked
for presence and their resting values.

The router's per-worker series are also checked in process against a routing table whose
discovery set a test changes: they follow the table, and go when a worker leaves it.
"""

from __future__ import annotations

import asyncio
import math
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import grpc
import grpc.aio
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmmesh.discovery import Endpoint
from llmmesh.v1 import generate_pb2, router_pb2_grpc
from router._pool import WorkerPool
from tests.fakes import DEFAULT_MODEL, FakeServer, FakeWorker
from tests.harness import Mesh, RedisServer, ServiceProcess, assert_eventually, start_mesh

MODEL = "sim-llama-3.1-8b"
WORKER_IDS = ("w1", "w2")
N_UNARY, N_STREAM, N_REPEAT = 4, 3, 3
WORKER_ARGS = ["--engine", "sim", "--sim-speed-factor", "8", "--metrics-port", "0"]

#: One scrape: (sample name, labels) -> value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def mesh(redis_server: RedisServer) -> Iterator[Mesh]:
    # Lookups must not time out on a busy machine: every hit and miss is counted.
    m = start_mesh(
        redis_server,
        worker_args=WORKER_ARGS,
        worker_ids=WORKER_IDS,
        router_args=["--cache-timeout", "5s"],
    )
    try:
        yield m
    finally:
        m.close()


@pytest.fixture
async def router(mesh: Mesh) -> AsyncIterator[router_pb2_grpc.RouterAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.router.address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def scrape_now(proc: ServiceProcess) -> Samples:
    url = f"http://127.0.0.1:{proc.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def scrape(proc: ServiceProcess) -> Samples:
    return await asyncio.to_thread(scrape_now, proc)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample with exactly these labels (0 when absent)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of every sample of ``name`` whose labels include these."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def moved_total(before: list[Samples], after: list[Samples], name: str, **labels: str) -> float:
    """How much ``name`` moved, summed over several services (the workers) and label sets."""
    return sum(
        total(a, name, **labels) - total(b, name, **labels)
        for b, a in zip(before, after, strict=True)
    )


def bucket_range(samples: Samples, name: str, **labels: str) -> tuple[float, float]:
    """The smallest and the largest finite bucket bound of one histogram series."""
    bounds = sorted(
        float(dict(ls)["le"])
        for (n, ls), _ in samples.items()
        if n == f"{name}_bucket" and ls - {("le", dict(ls)["le"])} == set(labels.items())
        and dict(ls)["le"] != "+Inf"
    )  # fmt: skip
    return bounds[0], bounds[-1]


async def routable(mesh: Mesh) -> bool:
    """The router has both workers in its table, healthy."""
    samples = await scrape(mesh.router)
    return value(samples, "llmmesh_router_workers", state="healthy") == 2


def request(prompt: str) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model=MODEL,
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=12, temperature=0.0),
    )


@pytest.mark.slow
class TestMeshMetrics:
    """The three services' counters after a known mix of real requests."""

    async def test_counters_move_as_the_traffic_says(
        self, mesh: Mesh, router: router_pb2_grpc.RouterAsyncStub
    ) -> None:
        await assert_eventually(
            lambda: routable(mesh), timeout=20, message="both workers never healthy"
        )
        r0 = await scrape(mesh.router)
        w0 = [await scrape(w) for w in mesh.workers]
        c0 = await scrape(mesh.cache)

        misses = [
            f"metrics test prompt {i}: what is a KV cache?" for i in range(N_UNARY + N_STREAM)
        ]
        summaries: list[generate_pb2.GenerationSummary] = []
        for prompt in misses[:N_UNARY]:
            reply = await router.Generate(request(prompt), timeout=30)
            summaries.append(reply.summary)
        for prompt in misses[N_UNARY:]:
            chunks = [c async for c in router.GenerateStream(request(prompt), timeout=30)]
            summaries.append(chunks[-1].summary)
        assert not any(s.cached for s in summaries)
        generated = sum(s.usage.completion_tokens for s in summaries)
        prompted = sum(s.usage.prompt_tokens for s in summaries)
        assert generated > 0

        # Answers are stored in the background: the repeats must find them there.
        async def stored() -> bool:
            samples = await scrape(mesh.cache)
            return moved(c0, samples, "llmmesh_cache_stores_total", result="stored") >= len(misses)

        await assert_eventually(stored, timeout=20, message="answers never stored")
        for prompt in misses[:N_REPEAT]:
            reply = await router.Generate(request(prompt), timeout=30)
            assert reply.summary.cached

        bad = request("a bad request")
        bad.sampling.top_p = 1.5
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.Generate(bad, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        unknown = request("an unknown model")
        unknown.model = "no-such-model"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await router.Generate(unknown, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        async def at_rest() -> bool:
            samples = await scrape(mesh.router)
            workers = [await scrape(w) for w in mesh.workers]
            return (
                moved(r0, samples, "llmmesh_router_cache_stores_total", result="stored")
                == len(misses)
                and all(value(samples, "llmmesh_router_worker_in_flight", worker_id=w) == 0
                        for w in WORKER_IDS)
                and all(value(w, "llmmesh_worker_active_requests") == 0 for w in workers)
            )  # fmt: skip

        await assert_eventually(at_rest, timeout=20, message="the mesh never came to rest")
        r1 = await scrape(mesh.router)
        w1 = [await scrape(w) for w in mesh.workers]
        c1 = await scrape(mesh.cache)

        # Router: requests by method and code, cache results, time to first token, duration.
        requests = "llmmesh_router_requests_total"
        assert moved(r0, r1, requests, method="Generate", code="OK") == N_UNARY + N_REPEAT
        assert moved(r0, r1, requests, method="GenerateStream", code="OK") == N_STREAM
        assert moved(r0, r1, requests, method="Generate", code="INVALID_ARGUMENT") == 1
        assert moved(r0, r1, requests, method="Generate", code="NOT_FOUND") == 1
        assert moved_total([r0], [r1], requests) == N_UNARY + N_STREAM + N_REPEAT + 2
        cache_requests = "llmmesh_router_cache_requests_total"
        assert moved(r0, r1, cache_requests, result="hit") == N_REPEAT
        assert moved(r0, r1, cache_requests, result="miss") == len(misses)
        assert moved(r0, r1, cache_requests, result="error") == 0
        assert moved(r0, r1, cache_requests, result="skipped") == 0
        assert moved(r0, r1, "llmmesh_router_cache_fill_locks_total", event="claimed") == len(
            misses
        )
        ttft = "llmmesh_router_time_to_first_token_seconds_count"
        assert moved(r0, r1, ttft, method="Generate", cached="false") == N_UNARY
        assert moved(r0, r1, ttft, method="GenerateStream", cached="false") == N_STREAM
        assert moved(r0, r1, ttft, method="Generate", cached="true") == N_REPEAT
        duration = "llmmesh_router_request_duration_seconds_count"
        assert moved(r0, r1, duration, method="Generate") == N_UNARY + N_REPEAT + 2
        assert moved(r0, r1, duration, method="GenerateStream") == N_STREAM
        assert moved_total([r0], [r1], "llmmesh_router_retries_total") == 0
        assert moved_total([r0], [r1], "llmmesh_router_ejections_total") == 0
        assert bucket_range(
            r1, "llmmesh_router_time_to_first_token_seconds", method="Generate", cached="true"
        ) == (0.001, 60.0)
        assert bucket_range(
            r1, "llmmesh_router_request_duration_seconds", method="GenerateStream"
        ) == (0.001, 600.0)

        # Router: routing table and discovery gauges.
        assert value(r1, "llmmesh_router_discovery_up", source="static") == 1
        assert value(r1, "llmmesh_router_workers", state="healthy") == 2
        for worker_id in WORKER_IDS:
            score = value(r1, "llmmesh_router_worker_score", worker_id=worker_id)
            assert ("llmmesh_router_worker_score", frozenset({("worker_id", worker_id)})) in r1
            assert math.isfinite(score)
            assert 0 <= score < 2

        # Workers: every dispatched miss ran on one of them, and nothing else reached them.
        assert moved_total(w0, w1, "llmmesh_worker_requests_total", code="OK") == len(misses)
        assert moved_total(w0, w1, "llmmesh_worker_requests_total") == len(misses)
        assert moved_total(w0, w1, "llmmesh_worker_requests_total", method="Generate") == N_UNARY
        assert (
            moved_total(w0, w1, "llmmesh_worker_requests_total", method="GenerateStream")
            == N_STREAM
        )
        assert moved_total(w0, w1, "llmmesh_worker_generated_tokens_total") == generated
        assert moved_total(w0, w1, "llmmesh_worker_prompt_tokens_total") == prompted
        assert moved_total(w0, w1, "llmmesh_worker_time_to_first_token_seconds_count") == len(
            misses
        )
        assert moved_total(w0, w1, "llmmesh_worker_request_generated_tokens_count") == len(misses)
        assert moved_total(w0, w1, "llmmesh_worker_request_generated_tokens_sum") == generated
        assert moved_total(w0, w1, "llmmesh_worker_request_duration_seconds_count") == len(misses)
        assert moved_total(w0, w1, "llmmesh_worker_aborted_requests_total") == 0
        for samples in w1:
            assert value(samples, "llmmesh_worker_capacity") > 0
            assert value(samples, "llmmesh_worker_queued_requests") == 0
            assert 0 <= value(samples, "llmmesh_worker_kv_cache_used_ratio") <= 1
            assert value(samples, "llmmesh_worker_engine_healthy") == 1
            ttft_range = bucket_range(samples, "llmmesh_worker_time_to_first_token_seconds")
            assert ttft_range == (0.001, 60.0)

        # Cache service: the same hits and misses as the router, every RPC counted and timed.
        for result in ("hit", "miss"):
            assert moved(c0, c1, "llmmesh_cache_lookups_total", result=result) == moved(
                r0, r1, cache_requests, result=result
            )
        lookups = len(misses) + N_REPEAT
        assert moved(c0, c1, "llmmesh_cache_requests_total", method="Lookup", code="OK") == lookups
        assert moved(c0, c1, "llmmesh_cache_requests_total", method="Store", code="OK") == len(
            misses
        )
        assert (
            moved(c0, c1, "llmmesh_cache_request_duration_seconds_count", method="Lookup")
            == lookups
        )
        assert moved(c0, c1, "llmmesh_cache_fill_locks_total", event="claimed") == len(misses)
        assert moved(c0, c1, "llmmesh_cache_fill_locks_total", event="stored") == len(misses)
        assert moved(c0, c1, "llmmesh_cache_coalesced_total") == 0
        assert moved_total([c0], [c1], "llmmesh_cache_store_errors_total") == 0
        assert moved(c0, c1, "llmmesh_cache_operation_duration_seconds_count", op="set") == len(
            misses
        )
        assert value(c1, "llmmesh_cache_store_up") == 1
        assert value(c1, "llmmesh_cache_circuit_state", dependency="redis") == 0

    async def test_a_request_in_flight_shows_in_the_gauges(
        self, mesh: Mesh, router: router_pb2_grpc.RouterAsyncStub
    ) -> None:
        """While a long answer streams, its worker has it in flight and the higher score; once
        the caller cancels, the gauges are back at rest and the cancellation is counted."""
        await assert_eventually(
            lambda: routable(mesh), timeout=20, message="both workers never healthy"
        )
        r0 = await scrape(mesh.router)
        w0 = [await scrape(w) for w in mesh.workers]
        long = request("tell me a very long story")
        long.sampling.max_tokens = 4000
        long.cache_policy = generate_pb2.CACHE_POLICY_BYPASS
        call = router.GenerateStream(long, timeout=60)
        first = await call.read()
        assert isinstance(first, generate_pb2.GenerateStreamResponse)
        assert first.text

        r1 = await scrape(mesh.router)
        w1 = [await scrape(w) for w in mesh.workers]
        in_flight = [value(r1, "llmmesh_router_worker_in_flight", worker_id=w) for w in WORKER_IDS]
        assert sorted(in_flight) == [0, 1]
        busy, idle = (0, 1) if in_flight[0] == 1 else (1, 0)
        capacity = value(w1[busy], "llmmesh_worker_capacity")
        assert capacity >= 2
        busy_score = value(r1, "llmmesh_router_worker_score", worker_id=WORKER_IDS[busy])
        idle_score = value(r1, "llmmesh_router_worker_score", worker_id=WORKER_IDS[idle])
        # One request of `capacity`, plus the KV cache use of a report sent before the scrape of
        # the worker (it only grows while the request generates).
        kv_now = value(w1[busy], "llmmesh_worker_kv_cache_used_ratio")
        assert 1 / capacity <= busy_score <= 1 / capacity + kv_now + 1e-9
        assert idle_score < busy_score

        call.cancel()

        async def at_rest() -> bool:
            routed = await scrape(mesh.router)
            for worker_id, proc in zip(WORKER_IDS, mesh.workers, strict=True):
                served = await scrape(proc)
                score = value(routed, "llmmesh_router_worker_score", worker_id=worker_id)
                if (
                    value(routed, "llmmesh_router_worker_in_flight", worker_id=worker_id) != 0
                    or value(served, "llmmesh_worker_active_requests") != 0
                    or abs(score - value(served, "llmmesh_worker_kv_cache_used_ratio")) > 1e-9
                ):
                    return False
            return True

        await assert_eventually(at_rest, timeout=20, message="the gauges never came to rest")
        r2 = await scrape(mesh.router)
        w2 = [await scrape(w) for w in mesh.workers]
        assert (
            moved(
                r0, r2, "llmmesh_router_requests_total", method="GenerateStream", code="CANCELLED"
            )
            == 1
        )
        assert moved_total(w0, w2, "llmmesh_worker_aborted_requests_total", reason="cancelled") == 1
        assert moved_total(w0, w2, "llmmesh_worker_generated_tokens_total") == 0


class ChangingDiscovery:
    """A discovery source whose sets a test pushes."""

    def __init__(self) -> None:
        self.sets: asyncio.Queue[frozenset[Endpoint]] = asyncio.Queue()

    def publish(self, *addresses: str) -> None:
        self.sets.put_nowait(frozenset(Endpoint.of(a, {"model": DEFAULT_MODEL}) for a in addresses))

    async def watch(self) -> AsyncIterator[frozenset[Endpoint]]:
        while True:
            yield await self.sets.get()

    async def close(self) -> None:
        pass


def sample(name: str, worker_id: str) -> float | None:
    return prometheus_client.REGISTRY.get_sample_value(name, {"worker_id": worker_id})


class TestPerWorkerSeries:
    """The router's per-worker series follow the routing table (in process)."""

    async def test_series_follow_the_table(self) -> None:
        a = FakeWorker("metrics-a", capacity=4)
        b = FakeWorker("metrics-b", capacity=4)
        a.kv_cache_used_fraction = 0.5
        discovery = ChangingDiscovery()
        # No discovery grace: a worker that discovery drops leaves the table at once.
        pool = WorkerPool(discovery, eject_after_failures=1, discovery_grace=timedelta(0))
        async with FakeServer.for_worker(a) as server_a, FakeServer.for_worker(b) as server_b:
            discovery.publish(server_a.address, server_b.address)
            await pool.start()
            try:
                await assert_eventually(
                    lambda: (
                        sample("llmmesh_router_worker_score", "metrics-a") == 0.5
                        and sample("llmmesh_router_worker_score", "metrics-b") == 0.0
                    ),
                    timeout=10,
                    message="scores never exported",
                )
                worker_a = next(w for w in pool.workers() if w.worker_id == "metrics-a")
                lease = pool.lease(worker_a)
                # Read at scrape time: one request more is one more in flight, 1/4 more score.
                assert sample("llmmesh_router_worker_in_flight", "metrics-a") == 1
                assert sample("llmmesh_router_worker_score", "metrics-a") == 0.75
                lease.failed("a test failure")
                lease.release()
                assert sample("llmmesh_router_worker_in_flight", "metrics-a") == 0
                assert sample("llmmesh_router_ejections_total", "metrics-a") == 1

                discovery.publish(server_b.address)
                await assert_eventually(
                    lambda: [w.worker_id for w in pool.workers()] == ["metrics-b"], timeout=10
                )
                for name in (
                    "llmmesh_router_worker_score",
                    "llmmesh_router_worker_in_flight",
                    "llmmesh_router_ejections_total",
                ):
                    assert sample(name, "metrics-a") is None, name
                assert sample("llmmesh_router_worker_in_flight", "metrics-b") == 0
                assert sample("llmmesh_router_worker_score", "metrics-b") == 0.0
            finally:
                await pool.close()
        assert sample("llmmesh_router_worker_score", "metrics-b") is None
