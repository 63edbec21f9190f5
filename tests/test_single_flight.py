"""Single-flight: identical concurrent cache misses dispatch once, within one router and across
router replicas sharing a cache service on a real Redis.

The routers run in-process (tests/test_router.py ``running_router``), the workers are
tests/fakes.py's FakeWorker held at a gate so that requests overlap, and the cache service is a
real process on a real redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest

from llmmesh.cache_key import cache_key
from llmmesh.v1 import cache_pb2, cache_pb2_grpc, generate_pb2
from tests.fakes import FakeWorker
from tests.harness import RedisServer, ServiceProcess, assert_eventually
from tests.test_cache_service import metric as service_metric
from tests.test_router import Router, metric, request, running_router, serving

_Context = grpc.aio.ServicerContext[Any, Any]
PROMPT = "what is single flight"
RPC_TIMEOUT = 30.0
# Generous: a loaded test machine must never turn a lookup into a miss by timing out.
ROUTER_CACHE_TIMEOUT = timedelta(seconds=2)


class FailingWorker(FakeWorker):
    """A FakeWorker whose first ``failures`` requests fail with ``code`` once past the gate."""

    def __init__(
        self, worker_id: str, *, failures: int = 1, code: grpc.StatusCode, **kwargs: Any
    ) -> None:
        super().__init__(worker_id, **kwargs)
        self.failures = failures
        self.code = code

    async def _begin(self, request: generate_pb2.GenerateRequest, context: _Context) -> None:
        await super()._begin(request, context)
        if self.failures > 0:
            self.failures -= 1
            await context.abort(self.code, f"fake worker fails with {self.code.name}")


def gated(*workers: FakeWorker) -> asyncio.Event:
    gate = asyncio.Event()
    for worker in workers:
        worker.gate = gate
    return gate


def dispatched(*workers: FakeWorker) -> int:
    return sum(len(w.requests) for w in workers)


def coalesced(via: str) -> float:
    return metric("llmmesh_router_coalesced_total", via=via)


def followers() -> float:
    return metric("llmmesh_router_flight_followers")


async def ask(
    router: Router,
    req: generate_pb2.GenerateRequest,
    *,
    streaming: bool,
    timeout: float = RPC_TIMEOUT,
) -> tuple[str, generate_pb2.GenerationSummary]:
    """Text and summary of one answer, asked for unary or streaming."""
    if streaming:
        chunks = [c async for c in router.stub.GenerateStream(req, timeout=timeout)]
        assert chunks[-1].HasField("summary")
        assert all(c.request_id == chunks[0].request_id for c in chunks)
        return "".join(c.text for c in chunks), chunks[-1].summary
    response = await router.stub.Generate(req, timeout=timeout)
    return response.text, response.summary


async def eventually(condition: Any, message: str) -> None:
    await assert_eventually(condition, timeout=20, message=message)


@pytest.fixture
def cache_service(redis_server: RedisServer) -> Iterator[ServiceProcess]:
    args = ["--store", "redis", "--redis-url", redis_server.url, "--redis-timeout", "1s"]
    with ServiceProcess("cache_service", [*args, "--metrics-port", "0"]) as service:
        yield service


@contextlib.asynccontextmanager
async def routers(
    count: int, workers: Sequence[str], *, cache: str, **overrides: Any
) -> AsyncIterator[list[Router]]:
    overrides.setdefault("cache_timeout", ROUTER_CACHE_TIMEOUT)
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running_router(workers, cache=cache, **overrides))
            for _ in range(count)
        ]


@contextlib.asynccontextmanager
async def cache_stub(service: ServiceProcess) -> AsyncIterator[cache_pb2_grpc.CacheAsyncStub]:
    async with grpc.aio.insecure_channel(service.address) as channel:
        yield cache_pb2_grpc.CacheStub(channel)


async def cache_stats(service: ServiceProcess) -> cache_pb2.StatsResponse:
    async with cache_stub(service) as stub:
        return await stub.Stats(cache_pb2.StatsRequest(), timeout=RPC_TIMEOUT)


class TestAcrossRouters:
    """Routers that share a cache service dispatch identical concurrent misses once."""

    async def test_100_identical_requests_through_3_routers_dispatch_once(
        self, cache_service: ServiceProcess
    ) -> None:
        """Unary and streaming callers, 1 leader per router, 1 fill lock: one dispatch in all,
        every caller gets the same text; the other two leaders wait in the cache service."""
        w1, w2 = FakeWorker("w1"), FakeWorker("w2")
        gate = gated(w1, w2)
        stats_before = await cache_stats(cache_service)
        via_router, via_cache = coalesced("router"), coalesced("cache")
        async with (
            serving(w1, w2) as servers,
            routers(3, [s.address for s in servers], cache=cache_service.address) as mesh,
        ):
            calls = [
                asyncio.create_task(ask(mesh[i % 3], request(PROMPT), streaming=i % 2 == 1))
                for i in range(100)
            ]

            async def all_waiting() -> bool:
                waiters = await service_metric(cache_service, "llmmesh_cache_fill_waiters")
                return dispatched(w1, w2) == 1 and followers() == 97 and waiters == 2

            await eventually(all_waiting, "the 100 requests never all waited for one dispatch")
            gate.set()
            answers = await asyncio.gather(*calls)
        assert dispatched(w1, w2) == 1
        [worker] = [w for w in (w1, w2) if w.requests]
        assert {text for text, _ in answers} == {worker.answer(PROMPT)}
        assert {summary.worker_id for _, summary in answers} == {worker.worker_id}
        assert not any(summary.cached for _, summary in answers)
        assert all(s.finish_reason == generate_pb2.FINISH_REASON_STOP for _, s in answers)
        stats_after = await cache_stats(cache_service)
        assert stats_after.coalesced - stats_before.coalesced == 2
        assert (coalesced("router") - via_router, coalesced("cache") - via_cache) == (97, 2)

    async def test_a_lock_whose_owner_never_stores_expires_and_a_router_takes_over(
        self, cache_service: ServiceProcess
    ) -> None:
        """A client claims the fill and dies (never stores, never releases): the router waits
        for the lock to expire, then dispatches and answers, and stores the answer."""
        worker = FakeWorker("w1")
        taken_over = await service_metric(
            cache_service, "llmmesh_cache_fill_locks_total", event="taken_over"
        )
        async with (
            serving(worker) as servers,
            routers(1, [servers[0].address], cache=cache_service.address) as [router],
            cache_stub(cache_service) as stub,
        ):
            key = cache_key(request(PROMPT), tenant="default", limits=router.app.config.limits)
            dead = await stub.Lookup(
                cache_pb2.LookupRequest(key=key, claim=True, lock_ttl_ms=600), timeout=RPC_TIMEOUT
            )
            assert dead.fill_token
            started = time.monotonic()
            text, _ = await ask(router, request(PROMPT), streaming=False)
            assert time.monotonic() - started >= 0.4
            assert text == worker.answer(PROMPT)
            assert len(worker.requests) == 1

            async def stored() -> bool:
                reply = await stub.Lookup(cache_pb2.LookupRequest(key=key), timeout=RPC_TIMEOUT)
                return reply.hit and reply.entry.text == text

            await eventually(stored, "the heir's answer was never stored")
        after = await service_metric(
            cache_service, "llmmesh_cache_fill_locks_total", event="taken_over"
        )
        assert after - taken_over == 1

    async def test_the_fill_lock_is_renewed_while_the_leader_generates(
        self, cache_service: ServiceProcess
    ) -> None:
        """A generation lasting several lock TTLs keeps its lock (ExtendFill), so another router
        keeps waiting instead of dispatching the same request again."""
        w1 = FakeWorker("w1")
        gate = gated(w1)
        async with (
            serving(w1) as servers,
            routers(
                2,
                [servers[0].address],
                cache=cache_service.address,
                fill_lock_ttl=timedelta(seconds=1),
            ) as [a, b],
        ):
            first = asyncio.create_task(ask(a, request(PROMPT), streaming=True))
            await eventually(lambda: len(w1.requests) == 1, "the leader never dispatched")
            second = asyncio.create_task(ask(b, request(PROMPT), streaming=False))

            async def waiting() -> bool:
                return await service_metric(cache_service, "llmmesh_cache_fill_waiters") == 1

            await eventually(waiting, "the second router never waited for the fill")
            # Three lock TTLs: without renewals the second router would have taken over.
            await asyncio.sleep(3)
            assert len(w1.requests) == 1
            gate.set()
            (text_a, _), (text_b, _) = await asyncio.gather(first, second)
        assert text_a == text_b == w1.answer(PROMPT)
        assert len(w1.requests) == 1

    async def test_a_leader_that_fails_releases_its_lock_to_the_next_router(
        self, cache_service: ServiceProcess
    ) -> None:
        """The failing leader's router releases the fill lock at once: the waiting router takes
        over long before the lock would have expired."""
        worker = FailingWorker("w1", code=grpc.StatusCode.INTERNAL)
        gate = gated(worker)
        async with (
            serving(worker) as servers,
            routers(
                2,
                [servers[0].address],
                cache=cache_service.address,
                fill_lock_ttl=timedelta(seconds=60),
            ) as [a, b],
        ):
            first = asyncio.create_task(ask(a, request(PROMPT), streaming=False))
            await eventually(lambda: len(worker.requests) == 1, "the leader never dispatched")
            second = asyncio.create_task(ask(b, request(PROMPT), streaming=True))

            async def waiting() -> bool:
                return await service_metric(cache_service, "llmmesh_cache_fill_waiters") == 1

            await eventually(waiting, "the second router never waited for the fill")
            gate.set()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await first
            # A worker's INTERNAL is that request's own failure: its caller gets it as it is.
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            text, _ = await asyncio.wait_for(second, 10)
        assert text == worker.answer(PROMPT)
        assert len(worker.requests) == 2


class TestWithinOneRouter:
    """One router without a cache service still dispatches identical concurrent requests once."""

    async def test_100_identical_requests_dispatch_once_without_a_cache(self) -> None:
        worker = FakeWorker("w1")
        gate = gated(worker)
        via_router = coalesced("router")
        async with serving(worker) as servers, routers(1, [servers[0].address], cache="") as [r]:
            calls = [
                asyncio.create_task(ask(r, request(PROMPT), streaming=i % 2 == 0))
                for i in range(100)
            ]
            await eventually(
                lambda: len(worker.requests) == 1 and followers() == 99,
                "the 100 requests never all waited for one dispatch",
            )
            gate.set()
            answers = await asyncio.gather(*calls)
            assert len(r.app.service.flights) == 0
        assert len(worker.requests) == 1
        assert {text for text, _ in answers} == {worker.answer(PROMPT)}
        summaries = [summary for _, summary in answers]
        words = len(worker.answer(PROMPT).split())
        assert {s.usage.completion_tokens for s in summaries} == {words}
        assert all(not s.cached and s.worker_id == "w1" for s in summaries)
        assert all(0 < s.timings.total_ms < RPC_TIMEOUT * 1000 for s in summaries)
        assert coalesced("router") - via_router == 99
        assert followers() == 0

    async def test_followers_outlive_a_leader_whose_worker_fails(self) -> None:
        """The leader's worker fails before its first token (not retried): its caller gets the
        error, one follower leads anew and every follower gets the answer."""
        worker = FailingWorker("w1", code=grpc.StatusCode.INTERNAL)
        gate = gated(worker)
        async with serving(worker) as servers, routers(1, [servers[0].address], cache="") as [r]:
            leader = asyncio.create_task(ask(r, request(PROMPT), streaming=True))
            await eventually(lambda: len(worker.requests) == 1, "the leader never dispatched")
            rest = [
                asyncio.create_task(ask(r, request(PROMPT), streaming=i % 2 == 0)) for i in range(9)
            ]
            await eventually(lambda: followers() == 9, "the followers never joined")
            gate.set()
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await leader
            # A worker's INTERNAL is that request's own failure: its caller gets it as it is.
            assert failed.value.code() == grpc.StatusCode.INTERNAL
            answers = await asyncio.gather(*rest)
        assert {text for text, _ in answers} == {worker.answer(PROMPT)}
        assert len(worker.requests) == 2

    async def test_followers_outlive_a_leader_whose_caller_cancels(self) -> None:
        worker = FakeWorker("w1")
        gate = gated(worker)
        async with serving(worker) as servers, routers(1, [servers[0].address], cache="") as [r]:
            leader = r.stub.Generate(request(PROMPT), timeout=RPC_TIMEOUT)
            await eventually(lambda: len(worker.requests) == 1, "the leader never dispatched")
            rest = [
                asyncio.create_task(ask(r, request(PROMPT), streaming=i % 2 == 0)) for i in range(5)
            ]
            await eventually(lambda: followers() == 5, "the followers never joined")
            leader.cancel()
            await eventually(lambda: len(worker.requests) == 2, "no follower took over")
            gate.set()
            answers = await asyncio.gather(*rest)
        assert {text for text, _ in answers} == {worker.answer(PROMPT)}
        assert worker.cancellations >= 1
        assert len(worker.requests) == 2

    async def test_a_follower_keeps_its_own_deadline(self) -> None:
        worker = FakeWorker("w1")
        gate = gated(worker)
        async with serving(worker) as servers, routers(1, [servers[0].address], cache="") as [r]:
            leader = asyncio.create_task(ask(r, request(PROMPT), streaming=False))
            await eventually(lambda: len(worker.requests) == 1, "the leader never dispatched")
            with pytest.raises(grpc.aio.AioRpcError) as late:
                await ask(r, request(PROMPT), streaming=True, timeout=0.3)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            gate.set()
            text, _ = await leader
        assert text == worker.answer(PROMPT)
        assert len(worker.requests) == 1
        assert followers() == 0

    async def test_a_refusal_every_identical_request_would_get_is_shared(self) -> None:
        """INVALID_ARGUMENT from the worker is the request's own: followers get it too instead of
        dispatching it again one after the other."""
        worker = FailingWorker("w1", failures=100, code=grpc.StatusCode.INVALID_ARGUMENT)
        gate = gated(worker)
        async with serving(worker) as servers, routers(1, [servers[0].address], cache="") as [r]:
            calls = [
                asyncio.create_task(ask(r, request(PROMPT), streaming=i % 2 == 0)) for i in range(5)
            ]
            await eventually(
                lambda: len(worker.requests) == 1 and followers() == 4, "no flight formed"
            )
            gate.set()
            results = await asyncio.gather(*calls, return_exceptions=True)
        codes = {r.code() for r in results if isinstance(r, grpc.aio.AioRpcError)}
        assert codes == {grpc.StatusCode.INVALID_ARGUMENT}
        assert len([r for r in results if isinstance(r, grpc.aio.AioRpcError)]) == 5
        assert len(worker.requests) == 1

    @pytest.mark.parametrize(
        "fields",
        [
            {"cache_policy": generate_pb2.CACHE_POLICY_BYPASS},
            {"cache_policy": generate_pb2.CACHE_POLICY_REFRESH},
            {"sampling": generate_pb2.SamplingParams(temperature=0.7)},
        ],
        ids=["bypass", "refresh", "sampled"],
    )
    async def test_requests_that_may_not_use_an_answer_never_join(
        self, fields: dict[str, Any]
    ) -> None:
        """Bypass, refresh and sampled requests dispatch themselves while an identical
        cacheable request is in flight."""
        worker = FakeWorker("w1")
        gate = gated(worker)
        async with serving(worker) as servers, routers(1, [servers[0].address], cache="") as [r]:
            leader = asyncio.create_task(ask(r, request(PROMPT), streaming=False))
            await eventually(lambda: len(worker.requests) == 1, "the leader never dispatched")
            others = [
                asyncio.create_task(ask(r, request(PROMPT, **fields), streaming=streaming))
                for streaming in (False, True)
            ]
            await eventually(lambda: len(worker.requests) == 3, "they did not dispatch")
            assert followers() == 0
            gate.set()
            await asyncio.gather(leader, *others)
        assert len(worker.requests) == 3

    async def test_a_refresh_may_lead_a_flight(self) -> None:
        """A refresh dispatches itself, and identical cacheable requests follow it."""
        worker = FakeWorker("w1")
        gate = gated(worker)
        refresh = request(PROMPT, cache_policy=generate_pb2.CACHE_POLICY_REFRESH)
        async with serving(worker) as servers, routers(1, [servers[0].address], cache="") as [r]:
            leader = asyncio.create_task(ask(r, refresh, streaming=True))
            await eventually(lambda: len(worker.requests) == 1, "the refresh never dispatched")
            follower = asyncio.create_task(ask(r, request(PROMPT), streaming=False))
            await eventually(lambda: followers() == 1, "the request did not follow the refresh")
            gate.set()
            (text_a, _), (text_b, _) = await asyncio.gather(leader, follower)
        assert text_a == text_b == worker.answer(PROMPT)
        assert len(worker.requests) == 1
