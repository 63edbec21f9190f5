"""The hf engine on a tiny GPT-2 built on the spot: text, sampling, limits, aborts, a process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, aclosing, asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from llmmesh.v1 import generate_pb2, worker_pb2, worker_pb2_grpc
from llmmesh.validation import Sampling
from tests.engine_contract import run, text_of
from tests.harness import ServiceProcess, assert_eventually
from tests.tiny_model import N_POSITIONS, build_tiny_model
from worker import WorkerConfig
from worker.engines import Completion, EngineError, EngineRequest, TextDelta, create_engine
from worker.engines.hf import HfEngine, HfSettings, IncrementalDecoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

pytestmark = pytest.mark.timeout(60)

MODEL = "tiny-gpt2"
PROMPT = "The router sends"
GREEDY = Sampling(max_tokens=24, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=())
#: Long enough (about a millisecond per token here) to still be running when looked at.
LONG = N_POSITIONS - 24

_ids = iter(range(1, 1_000_000))


@dataclass(frozen=True)
class TinyModels:
    #: Never ends by itself under greedy decoding: answers run to max_tokens.
    model: Path
    #: Ends every answer at once with its end-of-sequence token.
    always_eos: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """The tiny model directories, built once per test session."""
    root = tmp_path_factory.mktemp("hf-models")
    return TinyModels(
        model=build_tiny_model(root / "tiny-gpt2"),
        always_eos=build_tiny_model(root / "always-eos", always_eos=True),
    )


def request(
    prompt: str = PROMPT, *, deadline: float | None = None, **sampling: Any
) -> EngineRequest:
    return EngineRequest(
        request_id=f"r{next(_ids)}",
        prompt=prompt,
        sampling=replace(GREEDY, **sampling),
        deadline=deadline,
    )


EngineFactory = Callable[..., AbstractAsyncContextManager[HfEngine]]


@pytest.fixture
def hf(tiny: TinyModels) -> EngineFactory:
    """Start an HfEngine on the tiny model (settings overridden by keyword); stopped afterwards."""

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[HfEngine]:
        settings: dict[str, Any] = {
            "model_path": str(tiny.model),
            "model": MODEL,
            "device": "cpu",
            "capacity": 4,
            **overrides,
        }
        engine = HfEngine(HfSettings(**settings))
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop()

    return start


def reference_greedy(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """transformers' own greedy answer, decoded in one go."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    input_ids = torch.tensor([tokenizer.encode(prompt)])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    text: str = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return text


class TestLoading:
    """The engine loads a local directory only, and describes what it serves."""

    async def test_missing_model_directory_is_an_engine_error(self, tmp_path: Path) -> None:
        missing = tmp_path / "no-such-model"
        engine = HfEngine(HfSettings(model_path=str(missing), device="cpu"))
        with pytest.raises(EngineError, match="no-such-model"):
            await engine.start()
        assert not engine.load().healthy
        await engine.stop()

    async def test_directory_without_config_is_an_engine_error(self, tmp_path: Path) -> None:
        engine = HfEngine(HfSettings(model_path=str(tmp_path), device="cpu"))
        with pytest.raises(EngineError, match=r"config\.json"):
            await engine.start()

    async def test_info(self, hf: EngineFactory, tiny: TinyModels) -> None:
        async with hf(capacity=3) as engine:
            info = engine.info()
            load = engine.load()
        assert (info.engine, info.model, info.capacity) == ("hf", MODEL, 3)
        assert info.model_version == tiny.model.name  # a local directory has no commit hash
        assert info.max_prompt_tokens == N_POSITIONS - 1  # the model's context bounds the prompt
        assert (load.active, load.queued, load.capacity, load.healthy) == (0, 0, 3, True)
        assert load.kv_cache_used_fraction == 0.0

    async def test_from_worker_config(self, tiny: TinyModels) -> None:
        config = WorkerConfig(
            engine="hf",
            model_path=str(tiny.model),
            model="served-name",
            model_version="v7",
            hf_device="cpu",
            capacity=2,
            max_prompt_tokens=100,
        )
        engine = create_engine(config)
        assert isinstance(engine, HfEngine)
        await engine.start()
        try:
            info = engine.info()
        finally:
            await engine.stop()
        assert (info.model, info.model_version, info.capacity) == ("served-name", "v7", 2)
        assert info.max_prompt_tokens == 100

    async def test_count_tokens_uses_the_tokenizer(
        self, hf: EngineFactory, tiny: TinyModels
    ) -> None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny.model))
        async with hf() as engine:
            for text in ("The worker streams tokens", "naïve 日本語 €", "x"):
                assert engine.count_tokens(text) == len(tokenizer.encode(text))
            _, done = await run(engine, request())
        assert done.prompt_tokens == len(tokenizer.encode(PROMPT))


class TestText:
    """Greedy text is transformers' own, streamed in pieces; seeds make sampling reproducible."""

    async def test_greedy_is_transformers_greedy_and_repeats(
        self, hf: EngineFactory, tiny: TinyModels
    ) -> None:
        expected = reference_greedy(tiny.model, PROMPT, GREEDY.max_tokens)
        async with hf() as engine:
            first = await text_of(engine, request())
            second = await text_of(engine, request())
        assert expected
        assert first == expected
        assert second == expected

    async def test_streams_several_deltas(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            deltas, done = await run(engine, request(max_tokens=60))
            whole = await text_of(engine, request(max_tokens=60))
        assert len(deltas) > 3
        assert "".join(deltas) == whole
        assert done.completion_tokens == 60

    async def test_seeded_sampling_is_reproducible_beside_other_sampling(
        self, hf: EngineFactory
    ) -> None:
        seeded = request(temperature=1.0, seed=42, max_tokens=40)
        async with hf() as engine:
            alone = await text_of(engine, seeded)
            # Concurrent unseeded sampling draws from its own generator, not the seeded one's.
            results = await asyncio.gather(
                text_of(engine, replace(seeded, request_id="again")),
                *(text_of(engine, request(temperature=1.0, max_tokens=40)) for _ in range(3)),
            )
        assert alone
        assert results[0] == alone

    async def test_different_seeds_give_different_text(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            texts = {
                await text_of(engine, request(temperature=1.0, seed=seed, max_tokens=20))
                for seed in range(4)
            }
        assert len(texts) > 1

    async def test_top_k_1_sampling_is_greedy(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            greedy = await text_of(engine, request())
            top1 = await text_of(engine, request(temperature=1.5, top_k=1, seed=3))
            nucleus = await text_of(engine, request(temperature=0.7, top_p=1e-6, seed=4))
        assert top1 == greedy
        assert nucleus == greedy  # a tiny top_p keeps only the most likely token

    def test_incremental_decoding_never_splits_a_character(self, tiny: TinyModels) -> None:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny.model))
        text = "naïve € 日本 done"
        ids = tokenizer.encode(text)
        # The test means something only if some token holds part of a character.
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
        assert all("\ufffd" not in piece for piece in pieces)
        assert "".join(pieces) == text


def reference_greedy_after(model_dir: Path, prompt: str, continuation: str, tokens: int) -> str:
    """transformers' own greedy answer to the prompt's tokens followed by the continuation's
    (encoded alone, without special tokens), decoded in one go."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    ids = tokenizer.encode(prompt) + tokenizer.encode(continuation, add_special_tokens=False)
    input_ids = torch.tensor([ids])
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    text: str = tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return text


class TestContinuation:
    """The model reads the prompt's tokens then the continuation's, and streams only what
    follows, so greedy decoding continues from the continuation as transformers would."""

    @pytest.mark.parametrize("continuation", [" on on", " the router streams", "12"])
    async def test_greedy_goes_on_after_the_continuation(
        self, hf: EngineFactory, tiny: TinyModels, continuation: str
    ) -> None:
        expected = reference_greedy_after(tiny.model, PROMPT, continuation, 16)
        async with hf() as engine:
            plain = await text_of(engine, request(max_tokens=16))
            deltas, done = await run(
                engine, replace(request(max_tokens=16), continuation=continuation)
            )
        assert expected
        assert "".join(deltas) == expected
        assert "".join(deltas) != plain
        assert done.completion_tokens == 16

    async def test_continuation_is_encoded_after_the_prompt_without_merging(
        self, hf: EngineFactory, tiny: TinyModels
    ) -> None:
        """ "The rou" then "ter" are the prompt's tokens and then "ter"'s, as an answer's tokens
        followed its prompt's, not the tokens of "The router"."""
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(tiny.model))
        async with hf() as engine:
            _, done = await run(engine, replace(request("The rou"), continuation="ter"))
        expected = len(tokenizer.encode("The rou")) + len(tokenizer.encode("ter"))
        assert expected != len(tokenizer.encode("The router"))
        assert done.prompt_tokens == expected


class TestLimits:
    """max_tokens ends with "length", end-of-sequence and stop strings with "stop"."""

    async def test_max_tokens_is_length(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            _, done = await run(engine, request(max_tokens=7))
        assert done.finish_reason == "length"
        assert done.completion_tokens == 7

    async def test_context_length_bounds_max_tokens(self, hf: EngineFactory) -> None:
        prompt = "The worker streams tokens " * 40
        async with hf() as engine:
            prompt_tokens = engine.count_tokens(prompt)
            _, done = await run(engine, request(prompt, max_tokens=N_POSITIONS))
        assert done.finish_reason == "length"
        assert done.completion_tokens == N_POSITIONS - prompt_tokens

    async def test_end_of_sequence_is_stop(self, hf: EngineFactory, tiny: TinyModels) -> None:
        async with hf(model_path=str(tiny.always_eos)) as engine:
            deltas, done = await run(engine, request(max_tokens=10))
            sampled, done_sampled = await run(engine, request(temperature=1.0, seed=1))
        assert deltas == sampled == []
        assert done.finish_reason == done_sampled.finish_reason == "stop"
        assert done.completion_tokens == 0  # the end-of-sequence token is not counted

    async def test_stop_string_truncates_the_text(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            full = await text_of(engine, request(max_tokens=40))
            # A stop string from the middle of the answer, first seen there.
            at = next(
                i
                for i in range(len(full) // 4, len(full) // 2)
                if "\ufffd" not in full[i : i + 3] and full.find(full[i : i + 3]) == i
            )
            stop = full[at : at + 3]
            deltas, done = await run(engine, request(max_tokens=40, stop=("never-there", stop)))
        assert "".join(deltas) == full[:at]
        assert all(stop not in delta for delta in deltas)
        assert done.finish_reason == "stop"
        assert done.completion_tokens < 40

    async def test_stop_string_at_the_start_gives_no_text(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            full = await text_of(engine, request(max_tokens=10))
            deltas, done = await run(engine, request(max_tokens=10, stop=(full[:2],)))
        assert deltas == []
        assert done.finish_reason == "stop"


class TestAbort:
    """Abort, closing the stream and the deadline stop the generation and free its slot."""

    async def test_abort_mid_generation(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            req = request(max_tokens=LONG)
            stream = engine.generate(req)
            first = await anext(stream)
            assert isinstance(first, TextDelta)
            assert engine.load().active == 1
            assert engine.load().kv_cache_used_fraction > 0
            await engine.abort(req.request_id)
            rest = [item async for item in stream]
            done = rest[-1]
            assert isinstance(done, Completion)
            assert done.finish_reason == "cancelled"
            assert done.completion_tokens < LONG
            await assert_eventually(lambda: engine.load().active == 0)
            assert engine.load().healthy

    async def test_closing_the_stream_aborts(self, hf: EngineFactory) -> None:
        async with hf(capacity=1) as engine:
            async with aclosing(engine.generate(request(max_tokens=LONG))) as stream:
                await anext(stream)
            await assert_eventually(lambda: engine.load().active == 0)
            # The freed slot serves the next request.
            _, done = await run(engine, request(max_tokens=5))
        assert done.finish_reason == "length"

    async def test_deadline_is_timeout(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            started = time.monotonic()
            _, done = await run(engine, request(max_tokens=LONG, deadline=started + 0.2))
            elapsed = time.monotonic() - started
            await assert_eventually(lambda: engine.load().active == 0)
        assert done.finish_reason == "timeout"
        assert done.completion_tokens < LONG
        assert 0.2 <= elapsed < 5

    async def test_past_deadline_times_out_at_once(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            deltas, done = await run(engine, request(deadline=time.monotonic() - 1))
        assert deltas == []
        assert (done.finish_reason, done.completion_tokens) == ("timeout", 0)

    async def test_capacity_queues_in_fifo_order(self, hf: EngineFactory) -> None:
        async with hf(capacity=1) as engine:
            running = request(max_tokens=LONG)
            first_stream = engine.generate(running)
            await anext(first_stream)
            order: list[str] = []

            async def queued(name: str) -> Completion:
                _, done = await run(engine, request(max_tokens=5))
                order.append(name)
                return done

            second = asyncio.create_task(queued("second"))
            await assert_eventually(lambda: engine.load().queued == 1)
            third = asyncio.create_task(queued("third"))
            await assert_eventually(lambda: engine.load().queued == 2)
            assert engine.load().active == 1
            await engine.abort(running.request_id)
            done_second, done_third = await asyncio.gather(second, third)
            await first_stream.aclose()
        assert order == ["second", "third"]
        assert done_second.queue_s > 0
        assert done_third.queue_s > 0

    async def test_abort_of_a_queued_request(self, hf: EngineFactory) -> None:
        async with hf(capacity=1) as engine:
            running = request(max_tokens=LONG)
            waiting = request(max_tokens=LONG)
            async with aclosing(engine.generate(running)) as first:
                await anext(first)
                task = asyncio.create_task(run(engine, waiting))
                await assert_eventually(lambda: engine.load().queued == 1)
                await engine.abort(waiting.request_id)
                deltas, done = await task
                assert engine.load().queued == 0
        assert deltas == []
        assert (done.finish_reason, done.completion_tokens) == ("cancelled", 0)

    async def test_stop_cancels_live_requests(self, hf: EngineFactory) -> None:
        async with hf() as engine:
            stream = engine.generate(request(max_tokens=LONG))
            await anext(stream)
            await engine.stop()
            rest = [item async for item in stream]
            assert isinstance(rest[-1], Completion)
            assert rest[-1].finish_reason == "cancelled"
            assert not engine.load().healthy
            with pytest.raises(EngineError):
                await run(engine, request())


class TestFailure:
    """A generation that crashes makes the engine unhealthy and fails its requests."""

    async def test_crash_fails_requests_and_marks_unhealthy(
        self, hf: EngineFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        async with hf() as engine:
            loaded = engine._loaded
            assert loaded is not None

            def crash(**kwargs: Any) -> None:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            monkeypatch.setattr(loaded.model, "generate", crash)
            with pytest.raises(EngineError, match="illegal memory access"):
                await run(engine, request())
            assert not engine.load().healthy
            with pytest.raises(EngineError):
                await run(engine, request())


@pytest.fixture(scope="module")
def hf_worker(tiny: TinyModels) -> Iterator[ServiceProcess]:
    """`python -m worker --engine hf` on the tiny model."""
    args = [
        "--engine", "hf",
        "--model-path", str(tiny.model),
        "--model", MODEL,
        "--hf-device", "cpu",
        "--metrics-port", "0",
    ]  # fmt: skip
    with ServiceProcess("worker", args, startup_timeout=90) as proc:
        yield proc


class TestProcess:
    """`python -m worker --engine hf` serves Generate and GenerateStream over gRPC."""

    async def test_generate_and_stream(self, hf_worker: ServiceProcess, tiny: TinyModels) -> None:
        expected = reference_greedy(tiny.model, PROMPT, 16)
        grpc_request = generate_pb2.GenerateRequest(
            model=MODEL,
            prompt=PROMPT,
            sampling=generate_pb2.SamplingParams(temperature=0.0, max_tokens=16),
        )
        async with grpc.aio.insecure_channel(hf_worker.address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            info = await stub.GetInfo(worker_pb2.GetInfoRequest(), timeout=10)
            response = await stub.Generate(grpc_request, timeout=30)
            chunks = [chunk async for chunk in stub.GenerateStream(grpc_request, timeout=30)]
        assert (info.engine, info.model, info.max_prompt_tokens) == ("hf", MODEL, N_POSITIONS - 1)
        assert response.text == expected
        assert response.summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert response.summary.usage.completion_tokens == 16
        assert "".join(chunk.text for chunk in chunks) == expected
        assert chunks[-1].HasField("summary")
        assert chunks[-1].summary.usage.completion_tokens == 16
