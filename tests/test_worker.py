"""The worker service over real gRPC on loopback: in-process servers, and whole processes."""

from __future__ import annotations

import asyncio
import json
import math
import signal
import time
import urllib.request
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import grpc
import grpc.aio
import prometheus_client
import pytest
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

import llmmesh
from llmmesh import errors
from llmmesh.server import ServiceRunner
from llmmesh.v1 import generate_pb2, worker_pb2, worker_pb2_grpc
from tests.harness import ServiceProcess, assert_eventually
from worker import WorkerApp, WorkerConfig, load_config
from worker.engines import (
    Completion,
    Engine,
    EngineError,
    EngineRequest,
    LoadSnapshot,
    SimEngine,
    SimSettings,
    TextDelta,
    create_engine,
)

pytestmark = pytest.mark.timeout(60)

MODEL = "sim-llama-3.1-8b"
FAST: dict[str, Any] = {
    "sim_token_delay": timedelta(milliseconds=1),
    "sim_first_token_delay": timedelta(milliseconds=1),
    "sim_prefill_per_1k_tokens": timedelta(0),
}
#: Requests that run until max_tokens, 20 ms per token: still running when looked at.
SLOW: dict[str, Any] = {
    **FAST,
    "sim_token_delay": timedelta(milliseconds=20),
    "sim_min_answer_tokens": 4000,
    "sim_max_answer_tokens": 4000,
}
SLOW_FLAGS = [
    "--sim-token-delay", "20ms",
    "--sim-first-token-delay", "1ms",
    "--sim-min-answer-tokens", "4000",
    "--sim-max-answer-tokens", "4000",
]  # fmt: skip
LIFECYCLE_EVENTS = {
    "engine started",
    "worker started",
    "serving",
    "signal received",
    "draining",
    "stopped",
}


def generate_request(
    prompt: str = "Explain least-loaded routing.", *, request_id: str = "", **sampling: Any
) -> generate_pb2.GenerateRequest:
    params = {"temperature": 0.0, "max_tokens": 30, **sampling}
    return generate_pb2.GenerateRequest(
        model=MODEL,
        prompt=prompt,
        request_id=request_id,
        sampling=generate_pb2.SamplingParams(**params),
    )


@dataclass
class Served:
    app: WorkerApp
    runner: ServiceRunner
    stub: worker_pb2_grpc.WorkerAsyncStub

    def load(self) -> tuple[int, int]:
        snapshot = self.app.engine.load()
        return snapshot.active, snapshot.queued


@asynccontextmanager
async def serve(*, engine: Engine | None = None, **overrides: Any) -> AsyncIterator[Served]:
    """A worker on 127.0.0.1, port 0, in this process, with a channel to it."""
    settings: dict[str, Any] = {
        "port": 0,
        "metrics_port": -1,
        "worker_id": "w-test",
        "grace": timedelta(seconds=5),
        **FAST,
        **overrides,
    }
    config = WorkerConfig(**settings)
    app = WorkerApp(config, engine=engine)
    runner = ServiceRunner(app, config, name="worker")
    async with runner, grpc.aio.insecure_channel(runner.address) as channel:
        yield Served(app, runner, worker_pb2_grpc.WorkerStub(channel))


def aborted_count(reason: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "llmmesh_worker_aborted_requests_total", {"reason": reason}
    )
    return value or 0.0


M = TypeVar("M", bound=Message)


async def next_message(call: Any, cls: type[M], timeout: float = 5) -> M | None:
    """The next message of a server stream read with ``read()``; None at its end."""
    message = await asyncio.wait_for(call.read(), timeout)
    return message if isinstance(message, cls) else None  # else: grpc.aio.EOF


async def first_chunk(call: Any) -> generate_pb2.GenerateStreamResponse:
    chunk = await next_message(call, generate_pb2.GenerateStreamResponse, 10)
    assert chunk is not None
    return chunk


async def read_all(call: Any) -> list[generate_pb2.GenerateStreamResponse]:
    """The rest of a stream read with ``read()`` (which cannot be mixed with iteration)."""
    chunks = []
    while (chunk := await next_message(call, generate_pb2.GenerateStreamResponse, 10)) is not None:
        chunks.append(chunk)
    return chunks


async def next_report(call: Any, timeout: float = 2) -> worker_pb2.WatchLoadResponse:
    report = await next_message(call, worker_pb2.WatchLoadResponse, timeout)
    assert report is not None, "the WatchLoad stream ended"
    return report


class TestGenerate:
    """Unary and streaming generation give the same answer and a full summary."""

    async def test_unary_and_stream_agree(self) -> None:
        request = generate_request(request_id="req-1")
        async with serve() as w:
            response = await w.stub.Generate(request, timeout=10)
            chunks = [chunk async for chunk in w.stub.GenerateStream(request, timeout=10)]
        assert response.request_id == "req-1"
        assert response.model == MODEL
        assert response.text
        summary = response.summary
        assert summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert summary.usage.completion_tokens == 30
        assert summary.usage.prompt_tokens == math.ceil(len(request.prompt) / 4)
        assert (summary.worker_id, summary.model_version, summary.cached) == (
            "w-test",
            "sim-1",
            False,
        )
        timings = summary.timings
        assert 0 <= timings.queue_ms <= timings.time_to_first_token_ms <= timings.total_ms
        assert timings.total_ms >= 29  # 30 tokens, 1 ms a step

        assert len(chunks) > 2
        assert all(chunk.request_id == "req-1" for chunk in chunks)
        assert not any(chunk.HasField("summary") for chunk in chunks[:-1])
        assert chunks[-1].HasField("summary")
        assert "".join(chunk.text for chunk in chunks) == response.text
        final = chunks[-1].summary
        assert final.finish_reason == summary.finish_reason
        assert final.usage == summary.usage

    async def test_stream_interval_groups_outputs_after_the_first(self) -> None:
        """--stream-interval 4: the first token alone (time to first token is not delayed),
        then messages of 4 tokens, the rest at the end; the same text as one token a message."""
        request = generate_request(max_tokens=14)
        slow_steps = {**FAST, "sim_token_delay": timedelta(milliseconds=10)}
        async with serve(stream_interval=4, **slow_steps) as w:
            grouped = [c async for c in w.stub.GenerateStream(request, timeout=10)]
        async with serve(**slow_steps) as w:
            single = [c async for c in w.stub.GenerateStream(request, timeout=10)]
        texts = [c.text for c in grouped if c.text]
        # 14 tokens: 1, then 4 + 4 + 4, then the last 1 flushed with the completion.
        assert len(texts) == 5
        assert "".join(texts) == "".join(c.text for c in single)
        assert len([c for c in single if c.text]) == 14
        assert grouped[-1].summary.usage.completion_tokens == 14

    async def test_request_id_assigned_when_empty(self) -> None:
        async with serve() as w:
            first = await w.stub.Generate(generate_request(), timeout=10)
            second = await w.stub.Generate(generate_request(), timeout=10)
        assert first.request_id
        assert first.request_id != second.request_id

    async def test_stop_string_ends_the_text(self) -> None:
        async with serve() as w:
            reference = (await w.stub.Generate(generate_request(), timeout=10)).text
            stop = reference[12:17]
            request = generate_request()
            request.sampling.stop.append(stop)
            response = await w.stub.Generate(request, timeout=10)
        assert response.text == reference[: reference.find(stop)]
        assert response.summary.finish_reason == generate_pb2.FINISH_REASON_STOP

    async def test_chat_messages_are_rendered(self) -> None:
        chat = generate_pb2.GenerateRequest(
            model=MODEL,
            messages=[
                generate_pb2.ChatMessage(role="system", content="Be brief."),
                generate_pb2.ChatMessage(role="user", content="Hello"),
            ],
            sampling=generate_pb2.SamplingParams(temperature=0, max_tokens=10),
        )
        async with serve() as w:
            response = await w.stub.Generate(chat, timeout=10)
            again = await w.stub.Generate(chat, timeout=10)
            plain = await w.stub.Generate(generate_request("Hello", max_tokens=10), timeout=10)
        assert response.text == again.text
        assert response.text != plain.text
        assert response.summary.usage.prompt_tokens > plain.summary.usage.prompt_tokens


class TestContinuation:
    """A request continued from the start of its answer gets the rest of it, unary or streamed."""

    @pytest.mark.parametrize("words", [1, 7, 19])
    async def test_unary_and_stream_continue_the_answer(self, words: int) -> None:
        async with serve() as w:
            whole = await w.stub.Generate(generate_request(), timeout=10)
            sent = " ".join(whole.text.split(" ")[:words])
            request = generate_request(max_tokens=30 - words)
            request.continuation = sent
            unary = await w.stub.Generate(request, timeout=10)
            chunks = [c async for c in w.stub.GenerateStream(request, timeout=10)]
        assert sent + unary.text == whole.text
        assert "".join(c.text for c in chunks) == unary.text
        for summary in (unary.summary, chunks[-1].summary):
            assert summary.finish_reason == whole.summary.finish_reason
            assert summary.usage.completion_tokens == 30 - words
            assert summary.usage.prompt_tokens == math.ceil(
                len(request.prompt + request.continuation) / 4
            )

    async def test_chat_continuation_follows_the_generation_prompt(self) -> None:
        chat = generate_pb2.GenerateRequest(
            model=MODEL,
            messages=[generate_pb2.ChatMessage(role="user", content="Hello")],
            sampling=generate_pb2.SamplingParams(temperature=0, max_tokens=12),
        )
        async with serve() as w:
            whole = await w.stub.Generate(chat, timeout=10)
            sent = " ".join(whole.text.split(" ")[:4])
            chat.continuation = sent
            chat.sampling.max_tokens = 8
            rest = await w.stub.Generate(chat, timeout=10)
        assert sent + rest.text == whole.text

    async def test_engine_is_given_the_continuation(self) -> None:
        seen: list[EngineRequest] = []

        class Recording(SimEngine):
            def _submit(self, request: EngineRequest) -> Any:
                seen.append(request)
                return super()._submit(request)

        engine = Recording(SimSettings(token_delay=timedelta(milliseconds=1)))
        async with serve(engine=engine) as w:
            request = generate_request()
            request.continuation = "Already said"
            await w.stub.Generate(request, timeout=10)
        assert (seen[0].prompt, seen[0].continuation) == (request.prompt, "Already said")
        assert seen[0].input_text == request.prompt + "Already said"


class TestGetInfo:
    """GetInfo describes the worker and its engine."""

    async def test_fields(self) -> None:
        async with serve(capacity=3, max_queued=5, max_prompt_tokens=1000) as w:
            info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
        assert info.worker_id == "w-test"
        assert (info.engine, info.model, info.model_version) == ("sim", MODEL, "sim-1")
        assert (info.capacity, info.max_queued, info.max_prompt_tokens) == (3, 5, 1000)
        assert info.version == llmmesh.__version__

    async def test_default_worker_id_is_host_and_port(self) -> None:
        async with serve(worker_id="") as w:
            info = await w.stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
        assert info.worker_id.endswith(f"-{w.runner.port}")
        assert len(info.worker_id) > len(f"-{w.runner.port}")


def _set(field: str, value: Any) -> Callable[[generate_pb2.GenerateRequest], None]:
    def mutate(request: generate_pb2.GenerateRequest) -> None:
        target: Any = request
        *path, name = field.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, name, value)

    return mutate


def _bad_role(request: generate_pb2.GenerateRequest) -> None:
    request.ClearField("prompt")
    request.messages.append(generate_pb2.ChatMessage(role="robot", content="hi"))


def _long_chat(request: generate_pb2.GenerateRequest) -> None:
    request.ClearField("prompt")
    request.messages.append(generate_pb2.ChatMessage(role="user", content="x" * 800))


class TestValidation:
    """Bad input gets INVALID_ARGUMENT naming the field (or NOT_FOUND for a model)."""

    @pytest.mark.parametrize(
        ("mutate", "field"),
        [
            (_set("prompt", ""), "prompt"),
            (_set("prompt", "   "), "prompt"),
            (_set("sampling.max_tokens", 0), "sampling.max_tokens"),
            (_set("sampling.max_tokens", -3), "sampling.max_tokens"),
            (_set("sampling.max_tokens", 4097), "sampling.max_tokens"),
            (_set("sampling.temperature", -0.5), "sampling.temperature"),
            (_set("sampling.temperature", math.nan), "sampling.temperature"),
            (_set("sampling.top_p", 0.0), "sampling.top_p"),
            (_set("sampling.top_p", 1.5), "sampling.top_p"),
            (_set("prompt", "x" * 801), "prompt: is 201 tokens"),
            (_set("prompt", "x" * 5000), "prompt: is 5000 characters"),
            (_long_chat, "messages: is"),
            (_bad_role, "messages[0].role"),
            (_set("request_id", "bad id with spaces"), "request_id"),
            (_set("continuation", "x" * 5000), "continuation: is 5000 characters"),
            (_set("continuation", "x" * 800), "continuation: makes the prompt 208 tokens"),
            (_set("failover", 9), "failover"),
        ],
    )
    async def test_invalid_argument_names_the_field(
        self, mutate: Callable[[generate_pb2.GenerateRequest], None], field: str
    ) -> None:
        request = generate_request()
        mutate(request)
        async with serve(max_prompt_tokens=200) as w:
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await w.stub.Generate(request, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as stream:
                await w.stub.GenerateStream(request, timeout=5).read()
            assert w.load() == (0, 0)
        for caught in (unary, stream):
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (caught.value.details() or "")

    async def test_unknown_model_is_not_found(self) -> None:
        request = generate_request()
        request.model = "gpt-imaginary"
        async with serve() as w:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(request, timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "gpt-imaginary" in (caught.value.details() or "")


class TestWatchLoad:
    """WatchLoad reports at once, on every interval and change, and ends on drain."""

    async def test_first_report_is_immediate(self) -> None:
        async with serve(capacity=3, max_queued=7) as w:
            call = w.stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=60_000))
            report = await next_report(call)
            call.cancel()
        assert report.worker_id == "w-test"
        assert report.sequence == 1
        assert (report.active_requests, report.queued_requests) == (0, 0)
        assert (report.capacity, report.max_queued) == (3, 7)
        assert report.serving
        assert abs(report.timestamp_ms - time.time() * 1000) < 5000

    async def test_reports_an_active_request_promptly(self) -> None:
        async with serve(**SLOW) as w:
            # A long interval: the second report can only come from the change.
            call = w.stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=60_000))
            first = await next_report(call)
            generation = w.stub.GenerateStream(generate_request(max_tokens=1000))
            reports = [first]
            while not reports[-1].active_requests:
                reports.append(await next_report(call))
            generation.cancel()
            while reports[-1].active_requests:
                reports.append(await next_report(call))
            call.cancel()
        sequences = [r.sequence for r in reports]
        assert sequences == list(range(1, len(reports) + 1))
        assert max(r.kv_cache_used_fraction for r in reports) > 0

    async def test_reports_every_interval(self) -> None:
        async with serve() as w:
            call = w.stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=20))
            began = time.monotonic()
            reports = [await next_report(call) for _ in range(5)]
            elapsed = time.monotonic() - began
            call.cancel()
        assert [r.sequence for r in reports] == [1, 2, 3, 4, 5]
        assert elapsed >= 0.07  # four intervals of 20 ms after the first report

    async def test_drain_ends_the_stream_after_a_not_serving_report(self) -> None:
        async with serve() as w:
            call = w.stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=60_000))
            assert (await next_report(call)).serving
            await w.app.drain()
            assert not (await next_report(call)).serving
            assert await next_message(call, worker_pb2.WatchLoadResponse) is None
            assert await call.code() == grpc.StatusCode.OK


class TestCancellationAndDeadlines:
    """A cancelled or expired call aborts its engine request, freeing the slot at once."""

    async def test_client_cancel_aborts_engine_request(self) -> None:
        before = aborted_count("cancelled")
        async with serve(**SLOW) as w:
            call = w.stub.GenerateStream(generate_request(max_tokens=1000))
            await first_chunk(call)
            assert w.load() == (1, 0)
            call.cancel()
            await assert_eventually(lambda: w.load() == (0, 0))
            await assert_eventually(lambda: aborted_count("cancelled") == before + 1)

    async def test_unary_deadline_exceeded(self) -> None:
        before = aborted_count("deadline")
        async with serve(**SLOW) as w:
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(generate_request(max_tokens=1000), timeout=0.3)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - began < 3
            await assert_eventually(lambda: w.load() == (0, 0))
            await assert_eventually(lambda: aborted_count("deadline") == before + 1)

    async def test_stream_deadline_exceeded(self) -> None:
        async with serve(**SLOW) as w:
            call = w.stub.GenerateStream(generate_request(max_tokens=1000), timeout=0.3)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await assert_eventually(lambda: w.load() == (0, 0))


class TestAdmission:
    """Beyond capacity + max_queued a request is refused at once; draining refuses all."""

    async def test_full_queue_is_resource_exhausted(self) -> None:
        async with serve(capacity=1, max_queued=1, **SLOW) as w:
            running = w.stub.GenerateStream(generate_request("one", max_tokens=1000))
            await first_chunk(running)
            queued = w.stub.GenerateStream(generate_request("two", max_tokens=1000))
            await assert_eventually(lambda: w.load() == (1, 1))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(generate_request("three"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "full" in (caught.value.details() or "")
            queued.cancel()
            await assert_eventually(lambda: w.load() == (1, 0))
            admitted = w.stub.GenerateStream(generate_request("four", max_tokens=1000))
            await assert_eventually(lambda: w.load() == (1, 1))
            admitted.cancel()
            running.cancel()
            await assert_eventually(lambda: w.load() == (0, 0))

    async def test_no_queue_request_is_refused_busy_when_no_slot_is_free(self) -> None:
        """A router that queues requests itself asks not to be queued: it gets RESOURCE_EXHAUSTED
        with the busy trailer at once, while a plain caller still queues."""
        no_queue = ((errors.NO_QUEUE_METADATA_KEY, "1"),)
        async with serve(capacity=1, max_queued=4, **SLOW) as w:
            running = w.stub.GenerateStream(generate_request("one", max_tokens=1000))
            await first_chunk(running)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(generate_request("two"), timeout=5, metadata=no_queue)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert errors.is_busy(caught.value)
            assert "no free batch slot" in (caught.value.details() or "")
            assert w.load() == (1, 0)
            queued = w.stub.GenerateStream(generate_request("three", max_tokens=1000))
            await assert_eventually(lambda: w.load() == (1, 1))
            queued.cancel()
            running.cancel()
            await assert_eventually(lambda: w.load() == (0, 0))
            # With the slot free again the same request is served.
            answer = await w.stub.Generate(generate_request("two"), timeout=5, metadata=no_queue)
            assert answer.text

    async def test_plain_full_refusal_is_not_busy(self) -> None:
        async with serve(capacity=1, max_queued=0, **SLOW) as w:
            running = w.stub.GenerateStream(generate_request("one", max_tokens=1000))
            await first_chunk(running)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(generate_request("two"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert not errors.is_busy(caught.value)
            running.cancel()

    async def test_draining_worker_refuses_requests(self) -> None:
        async with serve() as w:
            await w.app.drain()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(generate_request(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in (caught.value.details() or "")


class FailingEngine(SimEngine):
    """A simulator whose requests fail after their first text with ``error``."""

    def __init__(self, error: Exception) -> None:
        super().__init__(SimSettings(token_delay=timedelta(milliseconds=1)))
        self.error = error

    async def generate(
        self, request: EngineRequest
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        async with aclosing(super().generate(request)) as stream:
            async for item in stream:
                yield item
                raise self.error


class UnhealthyEngine(SimEngine):
    """A simulator that reports itself unhealthy."""

    def load(self) -> LoadSnapshot:
        return replace(super().load(), healthy=False)


class FlakyEngine(SimEngine):
    """A simulator whose health a test switches off and on."""

    def __init__(self) -> None:
        super().__init__(SimSettings(token_delay=timedelta(milliseconds=1)))
        self.healthy = True

    def load(self) -> LoadSnapshot:
        return replace(super().load(), healthy=self.healthy)


class TestEngineFailures:
    """An engine that is down makes a request UNAVAILABLE; a request it failed alone gets
    INTERNAL or INVALID_ARGUMENT with the engine's message and the worker serves on; never a
    traceback."""

    async def test_engine_error_is_unavailable(self) -> None:
        engine = FailingEngine(EngineError("GPU fell off the bus"))
        async with serve(engine=engine) as w:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(generate_request(), timeout=5)
            assert w.load() == (0, 0)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "GPU fell off the bus" in (caught.value.details() or "")

    @pytest.mark.parametrize(
        ("error", "code"),
        [
            (errors.RequestFailed("TensorRT-LLM failed the request: bad token"), "INTERNAL"),
            (
                errors.RequestFailed("Triton refused it: bad shape", invalid=True),
                "INVALID_ARGUMENT",
            ),
        ],
    )
    async def test_a_requests_own_failure_is_its_error_and_the_worker_serves_on(
        self, error: errors.RequestFailed, code: str
    ) -> None:
        async with (
            serve(engine=FailingEngine(error)) as w,
            grpc.aio.insecure_channel(w.runner.address) as channel,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(generate_request(), timeout=5)
            assert caught.value.code().name == code
            details = caught.value.details() or ""
            assert error.message in details
            assert "w-test" in details
            assert w.runner.address not in details
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            call = w.stub.WatchLoad(worker_pb2.WatchLoadRequest())
            assert (await next_report(call)).serving
            call.cancel()

    async def test_unexpected_error_is_internal_without_details(self) -> None:
        async with serve(engine=FailingEngine(RuntimeError("secret internals"))) as w:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read_all(w.stub.GenerateStream(generate_request(), timeout=5))
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        details = caught.value.details() or ""
        assert "secret" not in details
        assert "Traceback" not in details

    async def test_unhealthy_engine_is_not_serving(self) -> None:
        async with serve(engine=UnhealthyEngine()) as w:
            call = w.stub.WatchLoad(worker_pb2.WatchLoadRequest())
            assert not (await next_report(call)).serving
            call.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await w.stub.Generate(generate_request(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unhealthy" in (caught.value.details() or "")

    async def test_engine_failure_turns_health_not_serving_until_it_recovers(self) -> None:
        """gRPC health follows the engine: NOT_SERVING while it is unhealthy, then SERVING."""
        engine = FlakyEngine()
        async with (
            serve(engine=engine) as w,
            grpc.aio.insecure_channel(w.runner.address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)

            async def status() -> int:
                reply = await health.Check(
                    health_pb2.HealthCheckRequest(service="llmmesh.v1.Worker"), timeout=5
                )
                return int(reply.status)

            assert await status() == health_pb2.HealthCheckResponse.SERVING
            engine.healthy = False
            await assert_eventually(
                lambda: _equals(status(), health_pb2.HealthCheckResponse.NOT_SERVING),
                timeout=5,
                message="health never became NOT_SERVING",
            )
            assert prometheus_client.REGISTRY.get_sample_value("llmmesh_worker_engine_healthy") == 0
            engine.healthy = True
            await assert_eventually(
                lambda: _equals(status(), health_pb2.HealthCheckResponse.SERVING),
                timeout=5,
                message="health never came back to SERVING",
            )


async def _equals(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


class TestConfig:
    """Flags and LLMMESH_* variables configure the worker; bad values are refused."""

    def test_defaults(self) -> None:
        config = load_config([], environ={})
        assert (config.port, config.metrics_port, config.engine) == (50061, 9402, "sim")
        assert (config.model, config.capacity, config.max_queued) == ("", 64, 256)
        assert config.load_report_interval == timedelta(milliseconds=200)

    def test_sim_serves_its_default_model_when_none_is_named(self) -> None:
        """An unnamed model on the sim engine is sim-llama-3.1-8b, version sim-1."""
        info = create_engine(load_config([], environ={})).info()
        assert (info.model, info.model_version) == (MODEL, "sim-1")

    def test_flags_and_environment(self) -> None:
        config = load_config(
            ["--capacity", "8", "--sim-token-delay", "2ms"],
            environ={"LLMMESH_MAX_QUEUED": "3", "LLMMESH_CAPACITY": "99"},
        )
        assert (config.capacity, config.max_queued) == (8, 3)
        assert config.sim_token_delay == timedelta(milliseconds=2)

    def test_bad_value_is_refused(self) -> None:
        with pytest.raises(SystemExit):
            load_config(["--capacity", "0"], environ={})
        with pytest.raises(ValueError, match="default_max_tokens"):
            WorkerConfig(default_max_tokens=10, max_tokens_limit=5)
        with pytest.raises(ValueError, match="stream_interval"):
            WorkerConfig(stream_interval=0)


# -- whole processes ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker_process() -> Iterator[ServiceProcess]:
    """One `python -m worker` with slow, long answers, shared by this module's process tests."""
    with ServiceProcess(
        "worker", ["--metrics-port", "0", "--worker-id", "proc-worker", *SLOW_FLAGS]
    ) as proc:
        yield proc


async def _health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(response.status)


class TestProcess:
    """`python -m worker` serves health, metrics and JSON logs, and aborts cancelled work."""

    async def test_health_serving_after_start(self, worker_process: ServiceProcess) -> None:
        for service in ("", "llmmesh.v1.Worker"):
            status = await _health(worker_process.address, service)
            assert status == health_pb2.HealthCheckResponse.SERVING

    async def test_client_cancel_is_logged_and_frees_the_slot(
        self, worker_process: ServiceProcess
    ) -> None:
        request_id = f"cancel-{uuid.uuid4().hex[:8]}"
        async with grpc.aio.insecure_channel(worker_process.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            load = stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=50))
            call = stub.GenerateStream(generate_request(max_tokens=1000, request_id=request_id))
            await first_chunk(call)
            while not (await next_report(load, 5)).active_requests:
                pass
            call.cancel()

            def aborted() -> list[dict[str, Any]]:
                return [
                    r
                    for r in worker_process.log_records()
                    if r.get("event") == "request aborted" and r.get("request_id") == request_id
                ]

            await assert_eventually(lambda: len(aborted()) == 1)
            assert aborted()[0]["reason"] == "cancelled"
            while (await next_report(load, 5)).active_requests:
                pass
            load.cancel()

    async def test_metrics_are_exported(self, worker_process: ServiceProcess) -> None:
        async with grpc.aio.insecure_channel(worker_process.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            await stub.Generate(generate_request(max_tokens=2), timeout=10)
        url = f"http://127.0.0.1:{worker_process.metrics_port}/metrics"
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())
        text = body.decode()
        assert 'llmmesh_worker_requests_total{code="OK",method="Generate"}' in text
        for name in (
            "llmmesh_worker_active_requests",
            "llmmesh_worker_queued_requests",
            "llmmesh_worker_kv_cache_used_ratio",
            "llmmesh_worker_generated_tokens_total",
            "llmmesh_worker_time_to_first_token_seconds_bucket",
        ):
            assert name in text

    async def test_logs_are_json_with_request_ids(self, worker_process: ServiceProcess) -> None:
        ids = [f"log-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
        async with grpc.aio.insecure_channel(worker_process.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            await stub.Generate(generate_request(max_tokens=2, request_id=ids[0]), timeout=10)
            async for _ in stub.GenerateStream(
                generate_request(max_tokens=2, request_id=ids[1]), timeout=10
            ):
                pass
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.Generate(generate_request("", request_id=ids[2]), timeout=10)

        def ours() -> list[dict[str, Any]]:
            return [r for r in worker_process.log_records() if r.get("request_id") in ids]

        await assert_eventually(lambda: len(ours()) >= 3)
        lines = [line for line in worker_process.logs().splitlines() if line.strip()]
        records = [json.loads(line) for line in lines]  # every line is one JSON object
        for record in records:
            assert {"event", "level", "timestamp", "service"} <= record.keys()
            if record["event"] not in LIFECYCLE_EVENTS:
                assert record.get("request_id"), record
        events = {(r["request_id"], r["event"]) for r in ours()}
        assert (ids[0], "request finished") in events
        assert (ids[1], "request finished") in events
        assert (ids[2], "request failed") in events


class TestGracefulShutdown:
    """SIGTERM: health goes NOT_SERVING, in-flight streams finish, the process exits 0."""

    async def test_sigterm_finishes_in_flight_stream(self) -> None:
        args = ["--metrics-port", "-1", *SLOW_FLAGS, "--sim-token-delay", "10ms"]
        with ServiceProcess("worker", args) as proc:
            async with grpc.aio.insecure_channel(proc.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                health = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="llmmesh.v1.Worker")
                )
                first = await next_message(health, health_pb2.HealthCheckResponse)
                assert first is not None
                assert first.status == health_pb2.HealthCheckResponse.SERVING
                load = stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=50))
                assert (await next_report(load)).serving
                stream = stub.GenerateStream(generate_request(max_tokens=100), timeout=20)
                await first_chunk(stream)

                proc.signal(signal.SIGTERM)
                while True:
                    update = await next_message(health, health_pb2.HealthCheckResponse)
                    assert update is not None
                    if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        break
                health.cancel()  # an open Watch would hold the server for the whole grace

                # WatchLoad streams end by themselves, after a serving=false report.
                reports = []
                while (
                    report := await next_message(load, worker_pb2.WatchLoadResponse)
                ) is not None:
                    reports.append(report)
                    assert len(reports) < 100, "WatchLoad did not end on drain"
                assert not reports[-1].serving
                assert await load.code() == grpc.StatusCode.OK

                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Generate(generate_request(), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

                chunks = await read_all(stream)
                assert chunks[-1].summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH
                assert chunks[-1].summary.usage.completion_tokens == 100
                assert await stream.code() == grpc.StatusCode.OK
            assert await asyncio.to_thread(proc.wait, 20) == 0
