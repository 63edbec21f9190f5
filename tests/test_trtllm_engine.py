"""The trtllm engine against the TensorRT-LLM double (tests/doubles/tensorrt_llm), and as a process.

The double reproduces the upstream LLM API the engine relies on; these tests check what the
engine hands TensorRT-LLM (LLM arguments, SamplingParams), what it makes of the answers (deltas,
finish reasons, token counts, stop strings), aborts, deadlines, load from iteration stats, and
failures.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio
import pytest

from llmmesh.errors import RequestFailed
from llmmesh.v1 import generate_pb2, router_pb2, worker_pb2, worker_pb2_grpc
from llmmesh.validation import Sampling
from tests.engine_contract import run
from tests.harness import ServiceProcess, assert_eventually
from tests.one_worker_mesh import WORKER_ID, failure_counts, one_worker_mesh
from worker import WorkerConfig
from worker.engines import Completion, EngineError, EngineRequest, TextDelta, create_engine
from worker.engines.trtllm import (
    TrtllmEngine,
    TrtllmSettings,
    backend_for,
    held_back,
    parse_stats,
)

pytestmark = pytest.mark.timeout(30)

DOUBLES = Path(__file__).resolve().parent / "doubles"
GREEDY = Sampling(max_tokens=40, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=())
PROMPT = "Explain least-loaded routing."

_ids = iter(range(1, 1_000_000))


def request(
    prompt: str = PROMPT, *, deadline: float | None = None, **sampling: Any
) -> EngineRequest:
    return EngineRequest(
        request_id=f"r{next(_ids)}",
        prompt=prompt,
        sampling=replace(GREEDY, **sampling),
        deadline=deadline,
    )


@pytest.fixture
def trtllm(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The TensorRT-LLM double, importable as ``tensorrt_llm`` for one test (fast steps)."""
    monkeypatch.syspath_prepend(str(DOUBLES))
    monkeypatch.delenv("TRTLLM_DOUBLE_STEP_S", raising=False)
    monkeypatch.delenv("TRTLLM_DOUBLE_ANSWER_TOKENS", raising=False)
    module = importlib.import_module("tensorrt_llm")
    assert getattr(module, "IS_DOUBLE", False), f"not the double: {module.__file__}"
    base = module.llmapi.llm.BaseLLM
    base.step_delay_s = 0.002
    try:
        yield module
    finally:
        for name in [
            n for n in sys.modules if n == "tensorrt_llm" or n.startswith("tensorrt_llm.")
        ]:
            del sys.modules[name]


def base_llm(trtllm: ModuleType) -> Any:
    """The double's BaseLLM class, where its knobs live."""
    return trtllm.llmapi.llm.BaseLLM


def the_llm(trtllm: ModuleType) -> Any:
    """The double's LLM the engine built."""
    instances = base_llm(trtllm).instances
    assert len(instances) == 1
    return instances[0]


def settings(model_path: Path, **overrides: Any) -> TrtllmSettings:
    values: dict[str, Any] = {
        "model": "llama-test",
        "model_version": "v1",
        "model_path": str(model_path),
        "capacity": 8,
        "stats_timeout_s": 0.2,
        "stats_idle_s": 0.01,
        **overrides,
    }
    return TrtllmSettings(**values)


@pytest.fixture
async def engine(trtllm: ModuleType, tmp_path: Path) -> AsyncIterator[TrtllmEngine]:
    e = TrtllmEngine(settings(tmp_path))
    await e.start()
    try:
        yield e
    finally:
        await e.stop()


def long_answers(trtllm: ModuleType, tokens: int = 4000, step_s: float | None = None) -> None:
    base = base_llm(trtllm)
    base.min_answer_tokens = base.max_answer_tokens = tokens
    if step_s is not None:
        base.step_delay_s = step_s


async def drain(stream: Any) -> None:
    async for _ in stream:
        pass


async def first_delta(stream: Any) -> str:
    item = await anext(stream)
    assert isinstance(item, TextDelta)
    return item.text


class TestStreaming:
    """Deltas add up to the text; finish reasons and token counts are TensorRT-LLM's."""

    async def test_deltas_concatenate_to_the_final_text(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        deltas, completion = await run(engine, request(max_tokens=30))
        result = the_llm(trtllm).executor.results[-1]
        assert "".join(deltas) == result.outputs[0].text
        assert len(deltas) == 30  # stream_interval 1: one delta per token
        assert completion.finish_reason == "length"
        assert completion.completion_tokens == 30 == len(result.outputs[0].token_ids)
        assert completion.prompt_tokens == len(result.prompt_token_ids) == 4  # <s> and three words
        assert completion.queue_s >= 0

    async def test_natural_end_is_stop_and_counts_the_eos_token(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm, tokens=6)
        deltas, completion = await run(engine, request(max_tokens=30))
        assert completion.finish_reason == "stop"
        text = "".join(deltas)
        assert len(text.split()) == 6  # six words; the EOS token has no text
        assert completion.completion_tokens == 7
        eos = the_llm(trtllm).tokenizer.eos_token_id
        assert the_llm(trtllm).executor.results[-1].outputs[0].token_ids[-1] == eos

    async def test_same_greedy_request_same_text(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        first, _ = await run(engine, request(max_tokens=12))
        second, _ = await run(engine, request(max_tokens=12))
        assert "".join(first) == "".join(second)

    async def test_stream_interval_batches_tokens(self, trtllm: ModuleType, tmp_path: Path) -> None:
        long_answers(trtllm)
        e = TrtllmEngine(settings(tmp_path, stream_interval=4))
        await e.start()
        try:
            deltas, completion = await run(e, request(max_tokens=10))
        finally:
            await e.stop()
        assert [len(d.split()) for d in deltas] == [4, 4, 2]
        assert completion.completion_tokens == 10


class TestContinuation:
    """The prompt given to generate_async is the prompt then the continuation; the text streamed
    is TensorRT-LLM's output only."""

    async def test_continuation_reaches_generate_async_and_not_the_text(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        plain, _ = await run(engine, request(max_tokens=8))
        req = replace(request(max_tokens=8), continuation=" already said")
        deltas, completion = await run(engine, req)
        result = the_llm(trtllm).executor.results[-1]
        assert result.prompt == PROMPT + " already said"
        assert "".join(deltas) == result.outputs[0].text
        assert "already said" not in "".join(deltas)
        assert "".join(deltas) != "".join(plain)  # the model read more than the prompt
        assert completion.prompt_tokens == len(result.prompt_token_ids) == 6  # <s> and 5 words
        assert completion.completion_tokens == 8


class TestSamplingParams:
    """Our sampling maps onto SamplingParams: max_tokens always, top_k 0 as None, stop as a list."""

    async def test_fields_reach_tensorrt_llm(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        req = request(max_tokens=7, temperature=0.7, top_p=0.9, top_k=0, seed=42, stop=("x y", "z"))
        await run(engine, req)
        sp = the_llm(trtllm).executor.results[-1].sampling_params
        assert isinstance(sp, trtllm.SamplingParams)
        assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.seed) == (
            7,
            0.7,
            0.9,
            None,
            42,
        )
        assert sp.stop == ["x y", "z"]
        assert sp.include_stop_str_in_output is False
        assert sp.end_id == the_llm(trtllm).tokenizer.eos_token_id  # set by the LLM, not by us

    async def test_top_k_and_greedy(self, engine: TrtllmEngine, trtllm: ModuleType) -> None:
        await run(engine, request(top_k=5, max_tokens=2))
        sp = the_llm(trtllm).executor.results[-1].sampling_params
        assert sp.top_k == 5
        assert sp.temperature == 0.0
        assert sp.seed is None  # greedy: no seed needed
        assert sp.stop is None

    async def test_max_tokens_beyond_the_upstream_default(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        _, completion = await run(engine, request(max_tokens=50))
        assert completion.completion_tokens == 50  # TensorRT-LLM alone would stop at 32

    async def test_unseeded_sampling_gets_a_fresh_seed(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        first, _ = await run(engine, request(temperature=1.0, max_tokens=20))
        second, _ = await run(engine, request(temperature=1.0, max_tokens=20))
        seeds = [r.sampling_params.seed for r in the_llm(trtllm).executor.results]
        assert None not in seeds
        assert seeds[0] != seeds[1]
        assert first != second  # TensorRT-LLM samples unseeded requests with seed 0

    async def test_seeded_sampling_repeats(self, engine: TrtllmEngine, trtllm: ModuleType) -> None:
        long_answers(trtllm)
        first, _ = await run(engine, request(temperature=1.0, seed=7, max_tokens=20))
        second, _ = await run(engine, request(temperature=1.0, seed=7, max_tokens=20))
        assert first == second


class TestStopStrings:
    """The text never contains a stop string, not even the start of one that spans tokens."""

    async def _words(self, engine: TrtllmEngine, trtllm: ModuleType) -> str:
        long_answers(trtllm)
        deltas, _ = await run(engine, request(max_tokens=12))
        return "".join(deltas)

    async def test_stop_string_spanning_tokens(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        text = await self._words(engine, trtllm)
        words = text.split()
        stop = f"{words[3]} {words[4]}"
        expected = text[: text.find(stop)]
        deltas, completion = await run(engine, request(max_tokens=12, stop=(stop,)))
        assert "".join(deltas) == expected
        assert completion.finish_reason == "stop"
        # TensorRT-LLM itself streamed the first word of the stop string before cutting it:
        raw = await self._raw_text_diffs(trtllm, stop)
        assert "".join(raw) != expected
        assert "".join(raw).startswith(expected + words[3])

    async def test_stop_string_within_a_token(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        text = await self._words(engine, trtllm)
        stop = text.split()[5][1:3]  # two letters inside the sixth word
        deltas, completion = await run(engine, request(max_tokens=12, stop=(stop,)))
        assert "".join(deltas) == text[: text.find(stop)]
        assert stop not in "".join(deltas)
        assert completion.finish_reason == "stop"

    async def test_earliest_of_several_stop_strings(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        text = await self._words(engine, trtllm)
        words = text.split()
        stops = (words[8], words[2], "never-generated")
        expected = text[: min(text.find(words[8]), text.find(words[2]))]
        deltas, _ = await run(engine, request(max_tokens=12, stop=stops))
        assert "".join(deltas) == expected

    @staticmethod
    async def _raw_text_diffs(trtllm: ModuleType, stop: str) -> list[str]:
        llm = the_llm(trtllm)
        sp = trtllm.SamplingParams(max_tokens=12, temperature=0.0, top_p=1.0, stop=[stop])
        diffs = []
        async for out in llm.generate_async(PROMPT, sampling_params=sp, streaming=True):
            diffs.append(out.outputs[0].text_diff)
        return diffs

    def test_held_back_is_the_longest_possible_stop_prefix(self) -> None:
        assert held_back("one two th", ["three"], 0) == 2
        assert held_back("one two th", ["x", "two three"], 0) == 6
        assert held_back("xx ab", ["xx abc"], 0) == 5
        assert held_back("xx ab", ["xx abc"], 3) == 0  # only what was not emitted yet
        assert held_back("one two", ["three"], 0) == 0
        assert held_back("aaa", ["aab"], 0) == 2


class TestAbort:
    """Abort, aclose, a deadline and stop() all abort the request in TensorRT-LLM."""

    async def test_abort_ends_a_running_request_cancelled(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        req = request(max_tokens=1000)
        async with aclosing(engine.generate(req)) as stream:
            await first_delta(stream)
            await engine.abort(req.request_id)
            items = [item async for item in stream]
        completion = items[-1]
        assert isinstance(completion, Completion)
        assert completion.finish_reason == "cancelled"
        assert completion.completion_tokens < 1000
        result = the_llm(trtllm).executor.results[-1]
        assert result.aborted()
        assert the_llm(trtllm).executor.aborted_request_ids == [result.request_id]
        assert engine.load().active == 0

    async def test_abort_of_an_unknown_request_is_ignored(self, engine: TrtllmEngine) -> None:
        await engine.abort("nobody")

    async def test_aclose_aborts(self, engine: TrtllmEngine, trtllm: ModuleType) -> None:
        long_answers(trtllm)
        stream = engine.generate(request(max_tokens=1000))
        await first_delta(stream)
        await stream.aclose()
        result = the_llm(trtllm).executor.results[-1]
        assert result.aborted()
        await assert_eventually(lambda: engine.load().active == 0)

    async def test_deadline_aborts_with_timeout(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        began = time.monotonic()
        deltas, completion = await run(
            engine, request(max_tokens=1000, deadline=time.monotonic() + 0.1)
        )
        assert completion.finish_reason == "timeout"
        assert 0.09 <= time.monotonic() - began < 2
        assert deltas
        assert the_llm(trtllm).executor.results[-1].aborted()

    async def test_finished_request_is_not_aborted(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        _, completion = await run(engine, request(max_tokens=3, deadline=time.monotonic() + 5))
        assert completion.finish_reason == "length"
        assert the_llm(trtllm).executor.aborted_request_ids == []

    async def test_stop_cancels_live_requests_and_is_idempotent(
        self, trtllm: ModuleType, tmp_path: Path
    ) -> None:
        long_answers(trtllm)
        e = TrtllmEngine(settings(tmp_path))
        await e.start()
        async with aclosing(e.generate(request(max_tokens=1000))) as stream:
            await first_delta(stream)
            await e.stop()
            items = [item async for item in stream]
        assert isinstance(items[-1], Completion)
        assert items[-1].finish_reason == "cancelled"
        llm = the_llm(trtllm)
        assert llm.executor.results[-1].aborted()
        assert llm.executor.is_shutdown()
        await e.stop()
        assert not e.load().healthy
        with pytest.raises(EngineError, match="not running"):
            await run(e, request())


class TestLoad:
    """Load comes from TensorRT-LLM's iteration stats, bounded by the requests in flight."""

    async def test_idle_before_the_first_request(self, engine: TrtllmEngine) -> None:
        load = engine.load()
        assert (load.active, load.queued, load.capacity, load.healthy) == (0, 0, 8, True)
        assert load.kv_cache_used_fraction == 0.0

    @pytest.mark.parametrize("as_json_strings", [False, True])
    async def test_active_queued_and_kv_from_stats(
        self, trtllm: ModuleType, tmp_path: Path, as_json_strings: bool
    ) -> None:
        long_answers(trtllm, step_s=0.01)
        base_llm(trtllm).stats_as_json_strings = as_json_strings
        e = TrtllmEngine(settings(tmp_path, capacity=2))
        await e.start()
        streams = [e.generate(request(f"prompt {i}", max_tokens=1000)) for i in range(5)]
        tasks = [asyncio.create_task(drain(s)) for s in streams]
        try:
            await assert_eventually(
                lambda: (e.load().active, e.load().queued) == (2, 3),
                message=f"load never showed 2 active, 3 queued: {e.load()}",
            )
            executor = the_llm(trtllm).executor
            kv = executor.last_stats["kvCacheStats"]
            assert kv["usedNumBlocks"] > 0
            await assert_eventually(
                lambda: abs(e.load().kv_cache_used_fraction - kv["usedNumBlocks"] / 1024) < 0.01
            )
            assert e.load().capacity == 2  # maxNumActiveRequests
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await e.stop()

    async def test_scheduled_requests_without_output_count_as_active(
        self, trtllm: ModuleType, tmp_path: Path
    ) -> None:
        base_llm(trtllm).context_steps = 100_000  # a prefill that never ends
        e = TrtllmEngine(settings(tmp_path, capacity=2))
        await e.start()
        tasks = [asyncio.create_task(drain(e.generate(request(f"p{i}")))) for i in range(3)]
        try:
            await assert_eventually(
                lambda: (e.load().active, e.load().queued) == (2, 1),
                message=f"load never showed 2 active, 1 queued: {e.load()}",
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await e.stop()

    async def test_idle_again_after_requests(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        await run(engine, request(max_tokens=5))
        await assert_eventually(lambda: engine._stats is not None)
        load = engine.load()
        assert (load.active, load.queued, load.kv_cache_used_fraction) == (0, 0, 0.0)

    async def test_wait_load_change_wakes_on_start_and_finish(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        assert not await engine.wait_load_change(0.05)
        waiter = asyncio.create_task(engine.wait_load_change(5))
        stream = engine.generate(request(max_tokens=1000))
        await first_delta(stream)
        assert await waiter
        waiter = asyncio.create_task(engine.wait_load_change(5))
        await asyncio.sleep(0)
        await stream.aclose()
        assert await waiter

    def test_parse_stats(self) -> None:
        stats = {
            "numActiveRequests": 3,
            "numQueuedRequests": 4,
            "maxNumActiveRequests": 0,
            "maxBatchSizeRuntime": 16,
            "kvCacheStats": {"maxNumBlocks": 200, "freeNumBlocks": 150},
        }
        parsed = parse_stats(stats, default_capacity=8)
        assert (parsed.active, parsed.queued, parsed.capacity) == (3, 4, 16)
        assert parsed.kv_cache_used_fraction == 0.25
        empty = parse_stats({}, default_capacity=8)
        assert (empty.active, empty.queued, empty.capacity) == (0, 0, 8)
        assert empty.kv_cache_used_fraction == 0.0


class TestFailures:
    """A failing TensorRT-LLM fails the requests in flight with EngineError and turns unhealthy;
    a request it fails or refuses alone gets RequestFailed and the engine stays healthy."""

    async def test_stats_failure(self, engine: TrtllmEngine, trtllm: ModuleType) -> None:
        long_answers(trtllm)
        async with aclosing(engine.generate(request(max_tokens=1000))) as stream:
            await first_delta(stream)
            base_llm(trtllm).fail_next_stats = RuntimeError("executor worker died")
            with pytest.raises(EngineError, match="executor worker died"):
                async for _ in stream:
                    pass
        assert not engine.load().healthy
        with pytest.raises(EngineError, match="stats failed"):
            await run(engine, request())

    async def test_generation_failure(self, engine: TrtllmEngine, trtllm: ModuleType) -> None:
        long_answers(trtllm)
        async with aclosing(engine.generate(request(max_tokens=1000))) as stream:
            await first_delta(stream)
            base_llm(trtllm).fail_next_step = RuntimeError("CUDA error: an illegal memory access")
            with pytest.raises(EngineError, match="illegal memory access"):
                async for _ in stream:
                    pass
        assert not engine.load().healthy

    async def test_request_error_fails_only_that_request(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        long_answers(trtllm)
        async with aclosing(engine.generate(request(max_tokens=1000))) as stream:
            await first_delta(stream)
            base_llm(trtllm).fail_next_step = trtllm.llmapi.RequestError("bad request")
            with pytest.raises(RequestFailed, match="bad request") as caught:
                async for _ in stream:
                    pass
        assert caught.value.code == grpc.StatusCode.INTERNAL
        assert engine.load().healthy
        _, completion = await run(engine, request(max_tokens=3))
        assert completion.finish_reason == "length"

    async def test_llm_shut_down_behind_the_engine(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        the_llm(trtllm).shutdown()
        with pytest.raises(EngineError, match="LLM is shutting down"):
            await run(engine, request())
        assert not engine.load().healthy

    async def test_refused_request_keeps_the_engine_healthy(
        self, trtllm: ModuleType, tmp_path: Path
    ) -> None:
        e = TrtllmEngine(settings(tmp_path, max_num_tokens=8))
        await e.start()
        try:
            assert e.info().max_prompt_tokens == 8
            with pytest.raises(RequestFailed, match="refused the request") as caught:
                await run(e, request("one two three four five six seven eight nine ten"))
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert e.load().healthy
        finally:
            await e.stop()

    async def test_load_failure(self, trtllm: ModuleType, tmp_path: Path) -> None:
        base_llm(trtllm).fail_load = RuntimeError("CUDA out of memory")
        e = TrtllmEngine(settings(tmp_path))
        with pytest.raises(EngineError, match="CUDA out of memory"):
            await e.start()
        assert not e.load().healthy
        await e.stop()

    async def test_tensorrt_llm_not_installed(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setitem(sys.modules, "tensorrt_llm", None)  # import fails, as when absent
        e = TrtllmEngine(settings(tmp_path))
        with pytest.raises(EngineError, match=r"needs TensorRT-LLM.*install the `trtllm` extra"):
            await e.start()
        assert not e.load().healthy


class TestConfiguration:
    """The worker's trtllm_* settings reach LLM(...), on the backend that can load the model."""

    def config(self, tmp_path: Path, **values: Any) -> WorkerConfig:
        return WorkerConfig(
            engine="trtllm", model="llama-3.1-8b", model_path=str(tmp_path), **values
        )

    async def test_pytorch_backend_arguments(self, trtllm: ModuleType, tmp_path: Path) -> None:
        config = self.config(
            tmp_path,
            tokenizer_path="/tokenizers/llama",
            capacity=16,
            trtllm_tensor_parallel_size=2,
            trtllm_max_num_tokens=4096,
            trtllm_max_seq_len=2048,
            trtllm_kv_cache_free_gpu_memory_fraction=0.5,
            trtllm_enable_block_reuse=False,
            trtllm_dtype="bfloat16",
            trtllm_stream_interval=2,
        )
        e = create_engine(config)
        assert isinstance(e, TrtllmEngine)
        await e.start()
        try:
            llm = the_llm(trtllm)
            assert type(llm) is trtllm.LLM
            args = dict(llm.args)
            kv = args.pop("kv_cache_config")
            assert (kv.free_gpu_memory_fraction, kv.enable_block_reuse) == (0.5, False)
            assert (
                args.items()
                >= {
                    "model": str(tmp_path),
                    "tokenizer": "/tokenizers/llama",
                    "tensor_parallel_size": 2,
                    "dtype": "bfloat16",
                    "max_batch_size": 16,
                    "max_num_tokens": 4096,
                    "max_seq_len": 2048,
                    "enable_iter_perf_stats": True,
                    "stream_interval": 2,
                }.items()
            )
            info = e.info()
            assert (info.engine, info.model, info.capacity) == ("trtllm", "llama-3.1-8b", 16)
            assert info.model_version == tmp_path.name  # unset: the directory's name
            assert info.max_prompt_tokens == 2047  # max_seq_len - 1
        finally:
            await e.stop()

    def test_model_named_after_its_directory(self, tmp_path: Path) -> None:
        snapshot = tmp_path / "models--meta-llama--Llama-3.1-8B" / "snapshots" / "0e9e39f"
        snapshot.mkdir(parents=True)
        (tmp_path / "llama").symlink_to(snapshot)
        info = TrtllmEngine.from_config(
            WorkerConfig(engine="trtllm", model_path=str(tmp_path / "llama"))
        ).info()
        assert (info.model, info.model_version) == ("llama", "0e9e39f")

    async def test_defaults_leave_optional_arguments_out(
        self, trtllm: ModuleType, tmp_path: Path
    ) -> None:
        e = TrtllmEngine.from_config(self.config(tmp_path, model_version="2024-07"))
        await e.start()
        try:
            args = the_llm(trtllm).args
            assert args["tokenizer"] is None
            assert "max_seq_len" not in args
            assert "quant_config" not in args
            assert e.info().model_version == "2024-07"
            assert e.info().max_prompt_tokens == 8192  # max_num_tokens
        finally:
            await e.stop()

    async def test_quantization_builds_on_the_tensorrt_backend(
        self, trtllm: ModuleType, tmp_path: Path
    ) -> None:
        long_answers(trtllm)
        e = TrtllmEngine.from_config(self.config(tmp_path, trtllm_quantization="fp8"))
        await e.start()
        try:
            llm = the_llm(trtllm)
            assert type(llm) is importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
            assert llm.args["quant_config"].quant_algo is trtllm.llmapi.QuantAlgo.FP8
            assert "enable_iter_perf_stats" not in llm.args
            assert "stream_interval" not in llm.args
            deltas, _ = await run(e, request(max_tokens=5))  # and it serves
            assert len(deltas) == 5
            await assert_eventually(lambda: e._stats is not None)  # stats on by default there
        finally:
            await e.stop()

    async def test_unknown_quantization(self, trtllm: ModuleType, tmp_path: Path) -> None:
        e = TrtllmEngine.from_config(self.config(tmp_path, trtllm_quantization="fp7"))
        with pytest.raises(EngineError, match=r"no algorithm 'fp7'.*FP8"):
            await e.start()

    def test_backend_follows_the_checkpoint(self, tmp_path: Path) -> None:
        s = settings(tmp_path)
        assert backend_for(s) == "pytorch"  # no config.json: let TensorRT-LLM say what is wrong
        (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        assert backend_for(s) == "pytorch"  # a Hugging Face checkpoint
        (tmp_path / "config.json").write_text(
            json.dumps({"pretrained_config": {}, "build_config": {}})
        )
        assert backend_for(s) == "tensorrt"  # a built engine
        (tmp_path / "config.json").write_text(json.dumps({"architecture": "x", "dtype": "fp16"}))
        assert backend_for(s) == "tensorrt"  # a TensorRT-LLM checkpoint

    async def test_count_tokens_uses_the_tokenizer(
        self, engine: TrtllmEngine, trtllm: ModuleType
    ) -> None:
        tokenizer = the_llm(trtllm).tokenizer
        assert engine.count_tokens("one two three") == len(tokenizer.encode("one two three")) == 4


class TestDouble:
    """The double keeps the upstream behaviours the engine is built around."""

    def test_pytorch_llm_refuses_tensorrt_backend_arguments(
        self, trtllm: ModuleType, tmp_path: Path
    ) -> None:
        quant = trtllm.llmapi.QuantConfig(quant_algo=trtllm.llmapi.QuantAlgo.FP8)
        with pytest.raises(ValueError, match="specific to TensorRT backend"):
            trtllm.LLM(model=str(tmp_path), quant_config=quant)
        with pytest.raises(ValueError, match="invalid argument: no_such_option"):
            trtllm.LLM(model=str(tmp_path), no_such_option=1)

    async def test_end_id_with_stop_fails_on_submission(
        self, trtllm: ModuleType, tmp_path: Path
    ) -> None:
        with trtllm.LLM(model=str(tmp_path)) as llm:
            sp = trtllm.SamplingParams(end_id=2, stop=["x"])
            with pytest.raises(RuntimeError, match="not processed by tokenizer"):
                llm.generate_async("hello", sampling_params=sp)

    async def test_stats_are_empty_until_the_first_request(
        self, trtllm: ModuleType, tmp_path: Path
    ) -> None:
        with trtllm.LLM(model=str(tmp_path), enable_iter_perf_stats=True) as llm:
            assert [s async for s in llm.get_stats_async(0.01)] == []
            await llm.generate_async("hello", trtllm.SamplingParams(max_tokens=3))
            stats = [s async for s in llm.get_stats_async(0.05)]
            assert [s["numActiveRequests"] for s in stats] == [1, 1, 1]


# -- the worker process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trtllm_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """`python -m worker --engine trtllm` with the double on its PYTHONPATH."""
    model_dir = tmp_path_factory.mktemp("llama-double")
    path = os.pathsep.join(p for p in (str(DOUBLES), os.environ.get("PYTHONPATH", "")) if p)
    args = [
        "--engine", "trtllm",
        "--model", "trtllm-double",
        "--model-path", str(model_dir),
        "--metrics-port", "0",
        "--worker-id", "trtllm-proc",
    ]  # fmt: skip
    env = {
        "PYTHONPATH": path,
        "TRTLLM_DOUBLE_STEP_S": "0.01",
        "TRTLLM_DOUBLE_ANSWER_TOKENS": "4000",
    }
    with ServiceProcess("worker", args, env=env) as proc:
        yield proc


def generate_request(max_tokens: int, request_id: str = "") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model="trtllm-double",
        prompt=PROMPT,
        request_id=request_id,
        sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )


class TestProcess:
    """`python -m worker --engine trtllm` serves over gRPC and aborts what callers cancel."""

    async def test_info_and_generate(self, trtllm_worker: ServiceProcess) -> None:
        async with grpc.aio.insecure_channel(trtllm_worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=5)
            assert (info.engine, info.model, info.capacity) == ("trtllm", "trtllm-double", 64)
            response = await stub.Generate(generate_request(5), timeout=10)
            assert len(response.text.split()) == 5
            assert response.summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH
            assert response.summary.usage.completion_tokens == 5
            chunks = [c async for c in stub.GenerateStream(generate_request(5), timeout=10)]
            assert "".join(c.text for c in chunks[:-1]) == response.text  # greedy: same text
            assert chunks[-1].summary.usage.completion_tokens == 5

    async def test_client_cancel_aborts_in_tensorrt_llm(
        self, trtllm_worker: ServiceProcess
    ) -> None:
        request_id = f"cancel-{uuid.uuid4().hex[:8]}"
        async with grpc.aio.insecure_channel(trtllm_worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            call = stub.GenerateStream(generate_request(1000, request_id))
            first = await call.read()
            assert isinstance(first, generate_pb2.GenerateStreamResponse)
            assert first.text
            call.cancel()
            assert await call.code() == grpc.StatusCode.CANCELLED

            def aborted() -> list[dict[str, Any]]:
                return [
                    r
                    for r in trtllm_worker.log_records()
                    if r.get("event") == "request aborted" and r.get("request_id") == request_id
                ]

            await assert_eventually(lambda: len(aborted()) == 1)
            assert aborted()[0]["reason"] == "cancelled"
            await assert_eventually(
                lambda: "[TensorRT-LLM double] abort request" in trtllm_worker.logs()
            )
            load = stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=50))
            try:
                async for report in load:
                    if report.active_requests == 0 and report.queued_requests == 0:
                        assert report.serving
                        break
            finally:
                load.cancel()


class TestRequestFailureThroughTheMesh:
    """TensorRT-LLM failing one request (RequestError) fails that request alone: the caller gets
    INTERNAL with the engine's message, and the worker stays in rotation for the next one."""

    @pytest.mark.parametrize("streaming", [False, True])
    async def test_request_error_is_the_requests_not_the_workers(
        self, trtllm: ModuleType, tmp_path: Path, streaming: bool
    ) -> None:
        async with one_worker_mesh(TrtllmEngine(settings(tmp_path))) as mesh:
            await assert_eventually(lambda: mesh.pooled().worker_id == WORKER_ID)
            ejections, retries = failure_counts()
            # As upstream: the executor answers this one request with an error response.
            base_llm(trtllm).fail_next_step = trtllm.llmapi.RequestError(
                "Encountered an error in forwardAsync for request 7: invalid token id"
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await mesh.generate("llama-test", PROMPT, streaming=streaming)
            assert caught.value.code() == grpc.StatusCode.INTERNAL
            details = caught.value.details() or ""
            assert "invalid token id" in details
            assert WORKER_ID in details
            assert mesh.address not in details  # internal addresses are for logs
            assert (mesh.pooled().consecutive_failures, mesh.pooled().last_error) == (0, "")
            # The next good request, sent at once, is served by the same worker.
            text = await mesh.generate("llama-test", PROMPT, streaming=streaming)
            assert len(text.split()) == 5
            worker = mesh.pooled()
            assert (worker.consecutive_failures, worker.last_error) == (0, "")
            assert failure_counts() == (ejections, retries)
            assert await mesh.state() == router_pb2.WORKER_STATE_HEALTHY
            assert mesh.worker.engine.load().healthy
