"""Tests of streams whose callers read slowly or not at all, and of the limits on open streams:
a router on 127.0.0.1 in front of the fake workers of tests/fakes.py (tests/test_router.py)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest

from llmmesh.cache_key import TENANT_METADATA_KEY
from llmmesh.v1 import generate_pb2, router_pb2_grpc
from tests.fakes import FakeWorker
from tests.harness import assert_eventually
from tests.test_router import collect, metric, request, running_router, serving

#: A prompt whose answer (one word per chunk) is larger than an HTTP/2 stream's flow-control
#: window (64 KiB), so that a caller that reads nothing stops the router's relay.
_WORDS = 30
BIG_PROMPT = " ".join(f"{i:04d}" + "x" * 4000 for i in range(_WORDS))
#: A client whose windows stay at 64 KiB (gRPC's BDP probing would widen them to a few MiB, so
#: that the same would take answers of megabytes).
SMALL_WINDOWS = [("grpc.http2.bdp_probe", 0)]


def big_request(prompt: str = BIG_PROMPT) -> generate_pb2.GenerateRequest:
    """A request for a large answer, its max_tokens enough for its chunks (sampled: no cache)."""
    return request(
        prompt,
        sampling=generate_pb2.SamplingParams(temperature=0.7, max_tokens=_WORDS + 8),
    )


def unread(
    stub: router_pb2_grpc.RouterAsyncStub, count: int, **kwargs: Any
) -> list[grpc.aio.UnaryStreamCall[Any, generate_pb2.GenerateStreamResponse]]:
    """Open ``count`` streams and read none of them."""
    return [
        stub.GenerateStream(big_request(f"{n} {BIG_PROMPT}"), timeout=30, **kwargs)
        for n in range(count)
    ]


class TestSlowReaders:
    """A worker's slot is held while it generates, not while its caller dawdles."""

    async def test_unread_streams_do_not_hold_the_fleet(self) -> None:
        a, b = FakeWorker("a", capacity=2), FakeWorker("b", capacity=2)
        async with (
            serving(a, b) as servers,
            running_router(
                [s.address for s in servers], admission_max_wait=timedelta(seconds=2)
            ) as router,
        ):
            # As many unread streams as the fleet has slots, on one connection.
            slow = grpc.aio.insecure_channel(router.runner.address, options=SMALL_WINDOWS)
            calls = unread(router_pb2_grpc.RouterStub(slow), 4)
            await assert_eventually(lambda: len(a.requests) + len(b.requests) == 4, timeout=5)
            # The workers finish; the router frees their slots although nobody reads.
            await assert_eventually(lambda: a.active + b.active == 0, timeout=5)
            async with grpc.aio.insecure_channel(router.runner.address) as channel:
                other = router_pb2_grpc.RouterStub(channel)
                started = time.monotonic()
                chunks = await collect(other.GenerateStream(request("me too"), timeout=5))
                assert chunks[-1].summary.worker_id in {"a", "b"}
                assert time.monotonic() - started < 1.5
            assert all(w.in_flight == 0 for w in await router.workers())
            # Read at last, the unread streams have their whole answers.
            for n, call in enumerate(calls):
                chunks = await collect(call)
                text = "".join(c.text for c in chunks)
                worker_id = chunks[-1].summary.worker_id
                assert text == f"{worker_id} heard: {n} {BIG_PROMPT}"
            await slow.close(None)

    async def test_a_caller_that_reads_nothing_is_cancelled(self) -> None:
        worker = FakeWorker("w1")
        before = metric("llmmesh_router_streams_idle_cancelled_total")
        async with (
            serving(worker) as servers,
            running_router(
                [servers[0].address], stream_idle_timeout=timedelta(milliseconds=300)
            ) as router,
            grpc.aio.insecure_channel(router.runner.address, options=SMALL_WINDOWS) as slow,
        ):
            (call,) = unread(router_pb2_grpc.RouterStub(slow), 1)
            await assert_eventually(
                lambda: metric("llmmesh_router_streams_idle_cancelled_total") == before + 1,
                timeout=5,
            )
            assert all(w.in_flight == 0 for w in await router.workers())
            # The caller reads at last: what its window held, then the reason.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.CANCELLED
            assert "read nothing for 0.3 s (--stream-idle-timeout)" in (info.value.details() or "")

    async def test_a_slow_reader_within_the_idle_timeout_gets_everything(self) -> None:
        worker = FakeWorker("w1")
        async with (
            serving(worker) as servers,
            running_router([servers[0].address], stream_idle_timeout=timedelta(seconds=2)) as r,
        ):
            chunks = []
            async with grpc.aio.insecure_channel(r.runner.address, options=SMALL_WINDOWS) as slow:
                stub = router_pb2_grpc.RouterStub(slow)
                async for chunk in stub.GenerateStream(big_request(), timeout=10):
                    chunks.append(chunk)
                    await asyncio.sleep(0.01)
            assert "".join(c.text for c in chunks) == f"w1 heard: {BIG_PROMPT}"


class TestStreamLimits:
    """One caller cannot hold more streams than a limit allows; the refusal names the limit."""

    async def test_per_tenant(self) -> None:
        worker = FakeWorker("w1", capacity=8)
        worker.gate = asyncio.Event()
        before = metric("llmmesh_router_streams_refused_total", limit="tenant")
        async with (
            serving(worker) as servers,
            running_router([servers[0].address], max_streams_per_tenant=2) as router,
        ):
            tenant = ((TENANT_METADATA_KEY, "t1"),)
            held = [
                router.stub.GenerateStream(request(f"held {i}"), timeout=10, metadata=tenant)
                for i in range(2)
            ]
            await assert_eventually(lambda: len(worker.requests) == 2, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(router.stub.GenerateStream(request(), timeout=5, metadata=tenant))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-streams-per-tenant" in (info.value.details() or "")
            assert metric("llmmesh_router_streams_refused_total", limit="tenant") == before + 1
            # Another tenant is not affected.
            other = router.stub.GenerateStream(
                request("other"), timeout=10, metadata=((TENANT_METADATA_KEY, "t2"),)
            )
            await assert_eventually(lambda: len(worker.requests) == 3, timeout=5)
            worker.gate.set()
            for call in [*held, other]:
                assert (await collect(call))[-1].HasField("summary")
            # Closed streams count no more.
            await collect(router.stub.GenerateStream(request(), timeout=5, metadata=tenant))

    async def test_per_connection(self) -> None:
        worker = FakeWorker("w1", capacity=8)
        worker.gate = asyncio.Event()
        before = metric("llmmesh_router_streams_refused_total", limit="connection")
        async with (
            serving(worker) as servers,
            running_router([servers[0].address], max_streams_per_connection=2) as router,
        ):
            held = [
                router.stub.GenerateStream(
                    request(f"held {i}"), timeout=10, metadata=((TENANT_METADATA_KEY, f"t{i}"),)
                )
                for i in range(2)
            ]
            await assert_eventually(lambda: len(worker.requests) == 2, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(router.stub.GenerateStream(request(), timeout=5))
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-streams-per-connection" in (info.value.details() or "")
            assert metric("llmmesh_router_streams_refused_total", limit="connection") == (
                before + 1
            )
            # Another connection is not affected (channels of one process share connections
            # unless told otherwise).
            async with grpc.aio.insecure_channel(
                router.runner.address, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                other = router_pb2_grpc.RouterStub(channel).GenerateStream(request(), timeout=10)
                await assert_eventually(lambda: len(worker.requests) == 3, timeout=5)
                worker.gate.set()
                assert (await collect(other))[-1].HasField("summary")
            for call in held:
                assert (await collect(call))[-1].HasField("summary")


class TestDrainBound:
    """The buffer of a worker's stream is bounded by the request's max_tokens."""

    async def test_a_worker_that_sends_far_more_than_max_tokens_is_cut_off(self) -> None:
        worker = FakeWorker("w1")
        async with serving(worker) as servers, running_router([servers[0].address]) as router:
            many_words = " ".join(f"w{i}" for i in range(40))
            req = request(many_words, sampling=generate_pb2.SamplingParams(max_tokens=4))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(router.stub.GenerateStream(req, timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "more than 20 messages for a request of max_tokens 4" in (
                info.value.details() or ""
            )
            assert all(w.in_flight == 0 for w in await router.workers())
