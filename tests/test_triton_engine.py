"""The triton engine against the Triton double (real gRPC and HTTP on loopback), and a worker
process that serves through it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import replace
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from llmmesh.errors import RequestFailed
from llmmesh.v1 import generate_pb2, router_pb2, worker_pb2, worker_pb2_grpc
from llmmesh.validation import Sampling
from tests.doubles.triton_server import TritonDouble
from tests.engine_contract import run
from tests.harness import ServiceProcess, assert_eventually
from tests.one_worker_mesh import WORKER_ID, failure_counts, one_worker_mesh
from worker.engines import Completion, EngineError, EngineRequest, TextDelta
from worker.engines.triton import (
    TritonEngine,
    TritonMetrics,
    TritonSettings,
    fetch_text,
    parse_prometheus,
)

pytestmark = pytest.mark.timeout(30)

MODEL = "llama-3.1-8b-trtllm"
MODELS = ("ensemble", "tensorrt_llm_bls")
PROMPT = "Explain in-flight batching in one paragraph."
GREEDY = Sampling(max_tokens=40, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=())

_ids = iter(range(1, 1_000_000))


def request(
    prompt: str = PROMPT, *, deadline: float | None = None, **sampling: Any
) -> EngineRequest:
    return EngineRequest(
        request_id=f"req-{next(_ids)}",
        prompt=prompt,
        sampling=replace(GREEDY, **sampling),
        deadline=deadline,
    )


async def consume(
    stream: AsyncIterator[TextDelta | Completion], deltas: list[str] | None = None
) -> None:
    """Read ``stream`` to its end (within 5 s), which must hold only text deltas."""
    async with asyncio.timeout(5):
        async for item in stream:
            assert isinstance(item, TextDelta), f"unexpected {item!r}"
            if deltas is not None:
                deltas.append(item.text)


@asynccontextmanager
async def serving(**knobs: Any) -> AsyncIterator[TritonDouble]:
    async with TritonDouble(**knobs) as double:
        yield double


@asynccontextmanager
async def engine_for(
    double: TritonDouble, model: str = "ensemble", **settings: Any
) -> AsyncIterator[TritonEngine]:
    options: dict[str, Any] = {
        "url": double.url,
        "metrics_url": double.metrics_url,
        "triton_model": model,
        "model": MODEL,
        "model_version": "engine-7",
        "health_interval": 0.05,
        "metrics_interval": 0.05,
        "ready_timeout": 5.0,
        **settings,
    }
    engine = TritonEngine(TritonSettings(**options))
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


@pytest.mark.parametrize("model", MODELS)
class TestGenerate:
    """Text streams as deltas; usage and finish reason come from the model's outputs."""

    async def test_deltas_concatenate_to_the_answer(self, model: str) -> None:
        async with serving() as triton, engine_for(triton, model) as engine:
            deltas, done = await run(engine, req := request())
            assert "".join(deltas) == triton.expected_text(PROMPT)
            assert len(deltas) == triton.answer_tokens  # one delta per token
            assert done.finish_reason == "stop"
            assert done.prompt_tokens == triton.prompt_tokens(PROMPT)  # the server's count
            assert done.completion_tokens == triton.answer_tokens + 1  # with the EOS token
            assert done.queue_s >= 0
            assert triton.completed == [req.request_id]
            assert triton.cancelled == []

    async def test_max_tokens_ends_with_length(self, model: str) -> None:
        async with serving() as triton, engine_for(triton, model) as engine:
            deltas, done = await run(engine, request(max_tokens=5))
            assert "".join(deltas) == triton.expected_text(PROMPT, max_tokens=5)
            assert (done.finish_reason, done.completion_tokens) == ("length", 5)

    async def test_inputs_carry_the_batch_dimension_and_model_datatypes(self, model: str) -> None:
        async with serving() as triton, engine_for(triton, model) as engine:
            stops = ("zebra crossing", "\n\n")
            await run(
                engine, req := request(temperature=0.7, top_p=0.9, top_k=40, seed=7, stop=stops)
            )
            sent = triton.requests[-1]
            assert (sent.model, sent.request_id) == (model, req.request_id)
            shapes = {name: (t.datatype, t.shape) for name, t in sent.inputs.items()}
            assert shapes == {
                "text_input": ("BYTES", (1, 1)),
                "max_tokens": ("INT32", (1, 1)),
                "stream": ("BOOL", (1, 1)),
                "exclude_input_in_output": ("BOOL", (1, 1)),
                "temperature": ("FP32", (1, 1)),
                "top_p": ("FP32", (1, 1)),
                "top_k": ("INT32", (1, 1)),
                "seed": ("UINT64", (1, 1)),
                "stop_words": ("BYTES", (1, 2)),
                "return_num_input_tokens": ("BOOL", (1, 1)),
                "return_num_output_tokens": ("BOOL", (1, 1)),
                "return_perf_metrics": ("BOOL", (1, 1)),
            }
            values = {name: t.value for name, t in sent.inputs.items()}
            assert values["text_input"] == PROMPT.encode()
            assert values["max_tokens"] == 40
            assert values["stream"]
            assert values["exclude_input_in_output"]
            assert values["temperature"] == pytest.approx(0.7)
            assert values["top_p"] == pytest.approx(0.9)
            assert (values["top_k"], values["seed"]) == (40, 7)
            assert list(sent.inputs["stop_words"].array[0]) == [s.encode() for s in stops]
            assert set(sent.outputs) == {
                "text_output",
                "num_input_tokens",
                "num_output_tokens",
                "arrival_time_ns",
                "first_scheduled_time_ns",
            }

    async def test_greedy_is_top_k_1_and_optional_inputs_are_left_out(self, model: str) -> None:
        async with serving() as triton, engine_for(triton, model) as engine:
            await run(engine, request(temperature=0.0, top_k=0))
            sent = triton.requests[-1].inputs
            assert sent["top_k"].value == 1
            assert not {"temperature", "top_p", "seed", "stop_words"} & set(sent)

    async def test_an_older_model_without_token_counts_is_counted_here(self, model: str) -> None:
        async with serving(token_counts=False) as triton, engine_for(triton, model) as engine:
            deltas, done = await run(engine, request())
            assert "".join(deltas) == triton.expected_text(PROMPT)
            assert not {"return_num_input_tokens", "return_perf_metrics"} & set(
                triton.requests[-1].inputs
            )
            assert done.prompt_tokens == engine.count_tokens(PROMPT)  # the estimate
            assert done.completion_tokens == triton.answer_tokens + 1  # one per response
            assert done.queue_s == 0.0


@pytest.mark.parametrize("model", MODELS)
class TestContinuation:
    """text_input is the prompt then the continuation; the text excludes both."""

    async def test_text_input_carries_the_continuation(self, model: str) -> None:
        said = " In-flight batching"
        async with serving() as triton, engine_for(triton, model) as engine:
            deltas, done = await run(engine, replace(request(), continuation=said))
            sent = triton.requests[-1].inputs
            assert sent["text_input"].value == (PROMPT + said).encode()
            assert sent["exclude_input_in_output"].value
            assert "".join(deltas) == triton.expected_text(PROMPT + said)
            assert "".join(deltas) != triton.expected_text(PROMPT)
            assert done.prompt_tokens == triton.prompt_tokens(PROMPT + said)

    async def test_estimated_prompt_tokens_include_the_continuation(self, model: str) -> None:
        said = " In-flight batching"
        async with serving(token_counts=False) as triton, engine_for(triton, model) as engine:
            _, done = await run(engine, replace(request(), continuation=said))
            assert done.prompt_tokens == engine.count_tokens(PROMPT + said)


class TestFinalResponse:
    """The answer ends at the first final flag, or where Triton ends the stream: never a hang."""

    async def test_ensemble_ends_at_its_final_data_response(self) -> None:
        # The stream stays open: only the flag on the last data response can end the answer.
        async with (
            serving(hold_streams_open=True) as triton,
            engine_for(triton, "ensemble", drain_timeout=20.0) as engine,
        ):
            started = time.monotonic()
            deltas, done = await run(engine, request())
            assert time.monotonic() - started < 5
            assert "".join(deltas) == triton.expected_text(PROMPT)
            assert done.finish_reason == "stop"

    async def test_bls_ends_where_triton_ends_the_stream(self) -> None:
        async with serving() as triton, engine_for(triton, "tensorrt_llm_bls") as engine:
            deltas, done = await asyncio.wait_for(run(engine, request()), 5)
            assert "".join(deltas) == triton.expected_text(PROMPT)
            assert done.finish_reason == "stop"
            # The aio client cannot ask for the empty final response (see the engine's doc).
            assert triton.requests[-1].parameters == {}
            assert triton.cancelled == []

    async def test_an_ensemble_without_the_flag_ends_with_the_stream(self) -> None:
        async with serving(ensemble_final_on_data=False) as triton, engine_for(triton) as engine:
            deltas, _ = await asyncio.wait_for(run(engine, request()), 5)
            assert "".join(deltas) == triton.expected_text(PROMPT)


class TestDouble:
    """The double flags final responses as upstream Triton does (checked with a raw stub)."""

    @staticmethod
    async def stream(
        triton: TritonDouble, model: str, *, empty_final: bool
    ) -> list[service_pb2.ModelStreamInferResponse]:
        """The responses to one streamed request sent with a raw stub."""
        tensor = service_pb2.ModelInferRequest.InferInputTensor
        message = service_pb2.ModelInferRequest(
            model_name=model,
            id="raw-1",
            inputs=[
                tensor(name="text_input", datatype="BYTES", shape=[1, 1]),
                tensor(name="max_tokens", datatype="INT32", shape=[1, 1]),
                tensor(name="stream", datatype="BOOL", shape=[1, 1]),
            ],
            raw_input_contents=[
                serialize_byte_tensor(np.array([[b"hi there"]], dtype=np.object_)).item(),
                np.array([[4]], dtype=np.int32).tobytes(),
                np.array([[True]], dtype=np.bool_).tobytes(),
            ],
        )
        if empty_final:
            message.parameters["triton_enable_empty_final_response"].bool_param = True

        async def requests() -> AsyncIterator[service_pb2.ModelInferRequest]:
            yield message

        async with grpc.aio.insecure_channel(triton.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            return [r async for r in stub.ModelStreamInfer(requests(), timeout=5)]

    @staticmethod
    def finals(responses: list[service_pb2.ModelStreamInferResponse]) -> list[tuple[bool, bool]]:
        """(has data, final flag) of each response."""
        return [
            (
                len(r.infer_response.outputs) > 0,
                r.infer_response.parameters["triton_final_response"].bool_param,
            )
            for r in responses
        ]

    async def test_ensemble_flags_its_last_data_response(self) -> None:
        async with serving() as triton:
            responses = await self.stream(triton, "ensemble", empty_final=False)
            assert self.finals(responses) == [(True, False)] * 3 + [(True, True)]
            first = responses[0].infer_response
            assert list(first.outputs[0].shape) == [1, 1]
            assert list(deserialize_bytes_tensor(first.raw_output_contents[0])) == [
                triton.answer("hi there")[0].encode()
            ]

    async def test_bls_sends_the_empty_final_response_only_when_asked(self) -> None:
        async with serving() as triton:
            asked = await self.stream(triton, "tensorrt_llm_bls", empty_final=True)
            assert self.finals(asked) == [(True, False)] * 4 + [(False, True)]
            unasked = await self.stream(triton, "tensorrt_llm_bls", empty_final=False)
            assert self.finals(unasked) == [(True, False)] * 4

    async def test_refuses_a_request_without_the_batch_dimension(self) -> None:
        async with serving() as triton:
            text = InferInput("text_input", [1], "BYTES")
            text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
            tokens = InferInput("max_tokens", [1, 1], "INT32")
            tokens.set_data_from_numpy(np.array([[4]], dtype=np.int32))

            async def one() -> AsyncIterator[dict[str, Any]]:
                yield {"model_name": "ensemble", "inputs": [text, tokens], "request_id": "bad"}

            async with grpcclient.InferenceServerClient(triton.url) as client:
                results = [item async for item in client.stream_infer(one())]
            assert len(results) == 1
            assert "unexpected shape for input 'text_input'" in results[0][1].message()
            assert triton.requests == []


class TestStopStrings:
    """Stop strings end the text before their first occurrence, even across deltas."""

    @pytest.mark.parametrize("model", MODELS)
    async def test_the_stop_word_is_never_emitted(self, model: str) -> None:
        async with serving() as triton, engine_for(triton, model) as engine:
            answer = triton.answer(PROMPT)
            stop = answer[3]  # a whole token, with its leading space
            deltas, done = await run(engine, request(stop=(stop,)))
            assert "".join(deltas) == "".join(answer[:3])
            assert done.finish_reason == "stop"
            assert done.completion_tokens == 4  # Triton stopped after the stop word's token
            assert triton.requests[-1].inputs["stop_words"].value == stop.encode()

    async def test_a_stop_string_across_two_deltas_is_cut_before_it_begins(self) -> None:
        async with serving() as triton, engine_for(triton) as engine:
            answer = triton.answer(PROMPT)
            stop = answer[2][-2:] + answer[3][:3]  # ends one token, begins the next
            deltas, done = await run(engine, request(stop=(stop, "never-there")))
            text = "".join(answer)
            assert "".join(deltas) == text[: text.index(stop)]
            assert all(stop not in d for d in deltas)
            assert done.finish_reason == "stop"

    async def test_the_client_stops_a_model_that_missed_the_stop_string(self) -> None:
        async with (
            serving(honour_stop_words=False, token_delay=0.02, answer_tokens=200) as triton,
            engine_for(triton) as engine,
        ):
            answer = triton.answer(PROMPT)
            deltas, done = await run(engine, req := request(stop=(answer[2],), max_tokens=150))
            assert "".join(deltas) == "".join(answer[:2])
            assert done.finish_reason == "stop"
            # The rest of the generation is not wanted: its stream is cancelled.
            await assert_eventually(lambda: req.request_id in triton.cancelled)


class TestFailures:
    """A model's error response fails that request alone (RequestFailed); an unreachable server
    raises EngineError; health follows readiness."""

    @pytest.mark.parametrize("model", MODELS)
    async def test_a_model_error_mid_stream_raises(self, model: str) -> None:
        async with serving(fail_after_tokens=3) as triton, engine_for(triton, model) as engine:
            deltas: list[str] = []
            with pytest.raises(RequestFailed, match="illegal memory access") as caught:
                await consume(engine.generate(request()), deltas)
            assert caught.value.code == grpc.StatusCode.INTERNAL
            assert "".join(deltas) == triton.expected_text(PROMPT, max_tokens=3)
            assert engine.load().healthy  # one request failed; the server is fine

    async def test_a_model_that_is_not_ready_fails_start_naming_it(self) -> None:
        async with serving() as triton:
            triton.set_model_ready("tensorrt_llm_bls", False)
            engine = TritonEngine(
                TritonSettings(url=triton.url, triton_model="tensorrt_llm_bls", ready_timeout=0.3)
            )
            started = time.monotonic()
            with pytest.raises(EngineError, match=r"'tensorrt_llm_bls' is not ready"):
                await engine.start()
            assert time.monotonic() - started < 3
            assert not engine.load().healthy

    @pytest.mark.parametrize(
        ("knob", "why"),
        [("server_live", "the server is not live"), ("server_ready", "the server is not ready")],
    )
    async def test_a_server_not_ready_fails_start(self, knob: str, why: str) -> None:
        async with serving(**{knob: False}) as triton:
            engine = TritonEngine(TritonSettings(url=triton.url, ready_timeout=0.3))
            with pytest.raises(EngineError, match=why):
                await engine.start()

    async def test_an_unreachable_server_fails_start(self) -> None:
        async with serving() as triton:
            url = triton.url
        engine = TritonEngine(TritonSettings(url=url, ready_timeout=0.3))
        with pytest.raises(EngineError, match="unreachable"):
            await engine.start()

    async def test_server_down_makes_it_unhealthy_until_the_model_is_ready(self) -> None:
        async with (
            serving(token_delay=0.02, answer_tokens=500) as triton,
            engine_for(triton) as engine,
        ):
            assert engine.load().healthy
            stream = engine.generate(request(max_tokens=400))
            async with aclosing(stream):
                assert isinstance(await anext(stream), TextDelta)
                await triton.stop_grpc()
                with pytest.raises(EngineError, match=r"UNAVAILABLE|CANCELLED"):
                    await consume(stream)
            assert not engine.load().healthy
            with pytest.raises(EngineError):
                await run(engine, request())
            await triton.start_grpc()
            await assert_eventually(lambda: engine.load().healthy, timeout=10)
            deltas, _ = await run(engine, request(max_tokens=5))
            assert "".join(deltas) == triton.expected_text(PROMPT, max_tokens=5)

    async def test_a_model_unloaded_later_makes_it_unhealthy(self) -> None:
        async with serving() as triton, engine_for(triton) as engine:
            triton.set_model_ready("ensemble", False)
            await assert_eventually(lambda: not engine.load().healthy)
            triton.set_model_ready("ensemble", True)
            await assert_eventually(lambda: engine.load().healthy)


class TestCancellation:
    """abort, closing the stream early and the deadline cancel the request's stream in Triton."""

    SLOW: dict[str, Any] = {"token_delay": 0.02, "answer_tokens": 1000}

    async def test_abort_ends_with_cancelled(self) -> None:
        async with serving(**self.SLOW) as triton, engine_for(triton) as engine:
            req = request(max_tokens=900)
            stream = engine.generate(req)
            assert isinstance(await anext(stream), TextDelta)
            await engine.abort(req.request_id)
            rest = [item async for item in stream]
            assert isinstance(rest[-1], Completion)
            assert rest[-1].finish_reason == "cancelled"
            await assert_eventually(lambda: triton.cancelled == [req.request_id])
            await assert_eventually(lambda: engine.load().active == 0)

    async def test_closing_the_stream_early_cancels(self) -> None:
        async with serving(**self.SLOW) as triton, engine_for(triton, "tensorrt_llm_bls") as engine:
            req = request(max_tokens=900)
            async with aclosing(engine.generate(req)) as stream:
                assert isinstance(await anext(stream), TextDelta)
            await assert_eventually(lambda: triton.cancelled == [req.request_id])

    async def test_the_deadline_ends_with_timeout(self) -> None:
        async with serving(**self.SLOW) as triton, engine_for(triton) as engine:
            req = request(max_tokens=900, deadline=time.monotonic() + 0.2)
            deltas, done = await run(engine, req)
            assert done.finish_reason == "timeout"
            assert 0 < len(deltas) < 900
            await assert_eventually(lambda: triton.cancelled == [req.request_id])

    async def test_a_deadline_already_past_sends_nothing(self) -> None:
        async with serving() as triton, engine_for(triton) as engine:
            _, done = await run(engine, request(deadline=time.monotonic() - 1))
            assert done.finish_reason == "timeout"
            assert triton.requests == []

    async def test_stop_cancels_live_requests(self) -> None:
        async with serving(**self.SLOW) as triton:
            async with engine_for(triton) as engine:
                stream = engine.generate(req := request(max_tokens=900))
                assert isinstance(await anext(stream), TextDelta)
                await engine.stop()
                rest = [item async for item in stream]
                assert isinstance(rest[-1], Completion)
                assert rest[-1].finish_reason == "cancelled"
                assert not engine.load().healthy
            await assert_eventually(lambda: triton.cancelled == [req.request_id])


class TestLoad:
    """Load comes from Triton's metrics: active, queued, capacity and KV blocks."""

    async def test_load_follows_the_metrics(self) -> None:
        async with (
            serving(token_delay=0.02, answer_tokens=1000, max_active=2) as triton,
            engine_for(triton) as engine,
        ):
            assert engine.load().capacity == 2  # Triton's "max", not the configured 64
            assert engine.info().capacity == 2

            async def consume() -> None:
                async for _ in engine.generate(request(max_tokens=900)):
                    pass

            tasks = [asyncio.create_task(consume()) for _ in range(3)]
            changed = asyncio.create_task(engine.wait_load_change(5))
            await assert_eventually(
                lambda: (engine.load().active, engine.load().queued) == (2, 1), timeout=5
            )
            assert await changed
            load = engine.load()
            assert load.kv_cache_used_fraction == pytest.approx(
                triton.kv_used_blocks() / triton.kv_blocks, abs=2 / triton.kv_blocks
            )
            assert load.kv_cache_used_fraction > 0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await assert_eventually(lambda: len(triton.cancelled) == 3)
            await assert_eventually(lambda: (engine.load().active, engine.load().queued) == (0, 0))

    async def test_without_metrics_load_comes_from_requests_in_flight(self) -> None:
        async with (
            serving(token_delay=0.02, answer_tokens=1000, metrics_status=503) as triton,
            engine_for(triton, capacity=1) as engine,
        ):
            streams = [engine.generate(request(max_tokens=900)) for _ in range(2)]
            for stream in streams:
                assert isinstance(await anext(stream), TextDelta)
            load = engine.load()
            assert (load.active, load.queued, load.capacity) == (1, 1, 1)
            assert load.healthy
            for stream in streams:
                await stream.aclose()

    def test_parses_an_upstream_metrics_page(self) -> None:
        page = """\
# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="tensorrt_llm_bls",version="1"} 2
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 1
nv_inference_pending_request_count{model="preprocessing",version="1"} 7
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 5
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 8
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 3
nv_gpu_utilization{gpu_uuid="GPU-1"} 0.5
"""
        for kind, value in (
            ("tokens_per", 64),
            ("used", 300),
            ("free", 900),
            ("max", 1200),
            ("fraction", 0.25),
        ):
            page += (
                f'nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="{kind}",'
                f'model="tensorrt_llm",version="1"}} {value}\n'
            )
        metrics = TritonMetrics.parse(page, triton_model="tensorrt_llm_bls")
        assert (metrics.active, metrics.max_requests, metrics.waiting, metrics.pending) == (
            8,
            512,
            3,
            3,  # the called model's and tensorrt_llm's, not preprocessing's
        )
        assert (metrics.running, metrics.queued) == (5, 6)
        assert metrics.kv_cache_used_fraction == pytest.approx(0.25)
        assert metrics.kv_tokens_per_block == 64
        # Without block counts, the reported fraction; with another model name, what is there.
        renamed = page.replace('model="tensorrt_llm"', 'model="llama_trtllm"')
        renamed = "\n".join(
            line for line in renamed.splitlines() if '"used"' not in line and '"max"' not in line
        )
        other = TritonMetrics.parse(renamed, triton_model="ensemble")
        assert (other.active, other.max_requests, other.pending) == (8, 0, 0)
        assert other.kv_cache_used_fraction == pytest.approx(0.25)
        assert parse_prometheus('a{b="x\\"y"} 1 1700000000\n', ["a"]) == [
            ("a", {"b": 'x\\"y'}, 1.0)
        ]

    async def test_fetch_text_reads_chunked_pages_and_refuses_errors(self) -> None:
        async with serving(metrics_chunked=True) as triton:
            page = await fetch_text(triton.metrics_url, timeout=5)
            assert page == triton.metrics_text()
            triton.metrics_status = 503
            with pytest.raises(OSError, match="HTTP 503"):
                await fetch_text(triton.metrics_url, timeout=5)
            with pytest.raises(OSError, match="HTTP 404"):
                await fetch_text(triton.metrics_url.replace("/metrics", "/other"), timeout=5)


class TestInfo:
    """info() and count_tokens() describe what the worker serves, without a tokenizer."""

    async def test_info_and_token_estimate(self) -> None:
        async with serving() as triton, engine_for(triton, "tensorrt_llm_bls") as engine:
            info = engine.info()
            assert (info.engine, info.model, info.model_version) == ("triton", MODEL, "engine-7")
            assert info.capacity == triton.max_active
            assert info.max_prompt_tokens == 32_768
            assert engine.count_tokens("x" * 10) == 3

    def test_settings_refuse_a_non_http_metrics_url(self) -> None:
        with pytest.raises(ValueError, match="metrics_url"):
            TritonSettings(metrics_url="https://triton:8002/metrics")


class TestWorkerProcess:
    """``python -m worker --engine triton`` serves Generate and GenerateStream through Triton."""

    async def test_serves_through_the_double(self) -> None:
        async with serving() as triton:
            worker = ServiceProcess(
                "worker",
                [
                    "--engine", "triton",
                    "--triton-url", triton.url,
                    "--triton-metrics-url", triton.metrics_url,
                    "--triton-model", "tensorrt_llm_bls",
                    "--metrics-port", "0",
                    "--model", MODEL,
                ],
            )  # fmt: skip
            await asyncio.to_thread(worker.start)  # the double answers from this event loop
            try:
                async with grpc.aio.insecure_channel(worker.address) as channel:
                    stub = worker_pb2_grpc.WorkerStub(channel)
                    info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
                    assert (info.engine, info.model) == ("triton", MODEL)
                    ask = generate_pb2.GenerateRequest(
                        model=MODEL,
                        prompt=PROMPT,
                        sampling=generate_pb2.SamplingParams(max_tokens=30, temperature=0.0),
                    )
                    answer = await stub.Generate(ask, timeout=10)
                    assert answer.text == triton.expected_text(PROMPT)
                    assert answer.summary.finish_reason == generate_pb2.FINISH_REASON_STOP
                    assert answer.summary.usage.prompt_tokens == triton.prompt_tokens(PROMPT)
                    chunks = [c async for c in stub.GenerateStream(ask, timeout=10)]
                    assert "".join(c.text for c in chunks) == answer.text
                    assert chunks[-1].HasField("summary")
                    sent = triton.requests[-1].inputs
                    assert (sent["max_tokens"].value, sent["top_k"].value) == (30, 1)
            finally:
                await asyncio.to_thread(worker.close)


class TestRequestFailureThroughTheMesh:
    """Triton answering one request with an error fails that request alone: the caller gets
    INTERNAL with Triton's message (not UNAVAILABLE), and the worker stays in rotation."""

    @pytest.mark.parametrize("streaming", [False, True])
    @pytest.mark.parametrize("model", MODELS)
    async def test_an_error_response_is_the_requests_not_the_workers(
        self, model: str, streaming: bool
    ) -> None:
        too_long = " ".join(["word"] * 40)  # over max_input_len: the executor refuses it alone
        async with serving(max_input_len=30) as triton:
            engine = TritonEngine(
                TritonSettings(
                    url=triton.url,
                    metrics_url=triton.metrics_url,
                    triton_model=model,
                    model=MODEL,
                    health_interval=0.05,
                    metrics_interval=0.05,
                )
            )
            async with one_worker_mesh(engine) as mesh:
                await assert_eventually(lambda: mesh.pooled().worker_id == WORKER_ID)
                ejections, retries = failure_counts()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await mesh.generate(MODEL, too_long, streaming=streaming)
                assert caught.value.code() == grpc.StatusCode.INTERNAL
                details = caught.value.details() or ""
                assert "Prompt length (41) exceeds maximum input length (30)" in details
                assert WORKER_ID in details
                assert mesh.address not in details
                assert triton.url not in details
                assert (mesh.pooled().consecutive_failures, mesh.pooled().last_error) == (0, "")
                # The next good request, sent at once, is served by the same worker.
                text = await mesh.generate(MODEL, PROMPT, streaming=streaming)
                assert text == triton.expected_text(PROMPT, max_tokens=5)
                assert (mesh.pooled().consecutive_failures, mesh.pooled().last_error) == (0, "")
                assert failure_counts() == (ejections, retries)
                assert await mesh.state() == router_pb2.WORKER_STATE_HEALTHY
                assert engine.load().healthy


class TestLoadMapping:
    """Active and queued mean what they mean to the router, read from Triton's figures as the
    TensorRT-LLM backend defines them (model_instance_state.cc: "active" is the executor's
    numActiveRequests, scheduled and waiting both; "waiting" = active - scheduled)."""

    PAGE = """\
nv_inference_pending_request_count{model="ensemble",version="1"} 3
nv_inference_pending_request_count{model="tensorrt_llm",version="1"} 0
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 12
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 8
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 8
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 2
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 4
"""

    def test_waiting_requests_are_queued_not_active(self) -> None:
        metrics = TritonMetrics.parse(self.PAGE, triton_model="ensemble")
        # 12 in the executor: 8 in the batch, 4 waiting for a slot; 3 more in Triton's queue.
        assert (metrics.running, metrics.queued) == (8, 4 + 3)

    def test_a_backend_without_the_waiting_figure(self) -> None:
        # Backends before "waiting" was added report active, max, scheduled and context only.
        page = "\n".join(line for line in self.PAGE.splitlines() if '"waiting"' not in line)
        metrics = TritonMetrics.parse(page, triton_model="ensemble")
        assert (metrics.running, metrics.queued) == (8, 4 + 3)

    def test_only_the_active_figure(self) -> None:
        page = "\n".join(
            line
            for line in self.PAGE.splitlines()
            if '"scheduled"' not in line and '"waiting"' not in line
        )
        metrics = TritonMetrics.parse(page, triton_model="ensemble")
        assert (metrics.running, metrics.queued) == (12, 3)

    async def test_the_engine_reports_them(self) -> None:
        async with (
            serving(token_delay=0.02, answer_tokens=1000, max_active=8) as triton,
            engine_for(triton) as engine,
        ):
            streams = [engine.generate(request(max_tokens=900)) for _ in range(12)]
            tasks = [asyncio.create_task(consume(stream)) for stream in streams]
            await assert_eventually(lambda: (triton.active, triton.waiting) == (8, 4))
            await assert_eventually(
                lambda: (engine.load().active, engine.load().queued) == (8, 4), timeout=5
            )
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
