"""The simulated engine, driven directly (no gRPC): text, limits, batching, abort, KV budget and
FIFO queue, prefix reuse, the calibrated timing model (read on the simulated clock), stats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmesh.validation import Sampling
from tests.engine_contract import run, text_of
from tests.harness import assert_eventually
from worker.engines import (
    Completion,
    EngineError,
    EngineRequest,
    SimEngine,
    SimSettings,
    TextDelta,
)

pytestmark = pytest.mark.timeout(30)

FAST = SimSettings(
    capacity=8,
    first_token_delay=timedelta(milliseconds=1),
    prefill_per_1k_tokens=timedelta(0),
    token_delay=timedelta(milliseconds=1),
)
#: Long answers at a slow pace, for requests that must still be running when looked at.
SLOW = replace(
    FAST,
    token_delay=timedelta(milliseconds=20),
    min_answer_tokens=4000,
    max_answer_tokens=4000,
)

GREEDY = Sampling(max_tokens=40, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=())

_ids = iter(range(1, 1_000_000))


def request(prompt: str = "Tell me about meshes.", **sampling: object) -> EngineRequest:
    return EngineRequest(
        request_id=f"r{next(_ids)}",
        prompt=prompt,
        sampling=replace(GREEDY, **sampling),  # type: ignore[arg-type]
    )


EngineFactory = Callable[..., AbstractAsyncContextManager[SimEngine]]


@pytest.fixture
def sim() -> EngineFactory:
    """Start a SimEngine with FAST settings overridden by keyword; stopped afterwards."""

    @asynccontextmanager
    async def start(base: SimSettings = FAST, **overrides: object) -> AsyncIterator[SimEngine]:
        engine = SimEngine(replace(base, **overrides))  # type: ignore[arg-type]
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop()

    return start


class TestDeterminism:
    """A deterministic request (greedy or seeded) always gets the same text; others do not."""

    async def test_same_greedy_request_same_text(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            first = await text_of(engine, request())
            second = await text_of(engine, request())
        assert first
        assert first == second

    async def test_text_depends_on_prompt(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            a = await text_of(engine, request("one prompt"))
            b = await text_of(engine, request("another prompt"))
        assert a != b

    async def test_seed_decides_sampled_text(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            seed1 = await text_of(engine, request(temperature=0.8, seed=1))
            seed1_again = await text_of(engine, request(temperature=0.8, seed=1))
            seed2 = await text_of(engine, request(temperature=0.8, seed=2))
        assert seed1 == seed1_again
        assert seed1 != seed2

    async def test_greedy_text_ignores_seed_top_p_and_top_k(self, sim: EngineFactory) -> None:
        """Like a real engine, greedy decoding depends on the prompt alone."""
        async with sim() as engine:
            plain = await text_of(engine, request(temperature=0.0))
            seeded = await text_of(engine, request(temperature=0.0, seed=7))
            narrowed = await text_of(engine, request(temperature=0.0, top_p=0.5, top_k=3))
        assert plain == seeded == narrowed

    async def test_unseeded_sampling_differs_between_calls(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            texts = {await text_of(engine, request(temperature=0.7)) for _ in range(3)}
        assert len(texts) == 3

    async def test_shorter_max_tokens_gives_a_prefix(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            short = await text_of(engine, request(max_tokens=10))
            long = await text_of(engine, request(max_tokens=30))
        assert long.startswith(short)
        assert len(long) > len(short)


class TestLength:
    """max_tokens ends generation with "length"; the natural answer length with "stop"."""

    async def test_max_tokens_honoured(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            deltas, done = await run(engine, request("count", max_tokens=7))
        assert done.finish_reason == "length"
        assert done.completion_tokens == 7
        assert len("".join(deltas).split()) == 7  # one word per token
        assert done.prompt_tokens == 2  # ceil(len("count") / 4)

    async def test_natural_end_is_stop(self, sim: EngineFactory) -> None:
        async with sim(min_answer_tokens=5, max_answer_tokens=5) as engine:
            _, done = await run(engine, request(max_tokens=100))
        assert done.finish_reason == "stop"
        assert done.completion_tokens == 5

    async def test_prompt_tokens_are_a_quarter_of_the_characters(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            _, done = await run(engine, request("x" * 401, max_tokens=1))
        assert done.prompt_tokens == 101
        assert engine.count_tokens("x" * 401) == 101


class TestStop:
    """Text ends before the first stop string, even one that spans tokens."""

    async def test_stop_across_token_boundary(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            reference = await text_of(engine, request(max_tokens=40))
            words = reference.split(" ")
            # The end of the 4th word, the space, and the start of the 5th: three tokens' text.
            boundary = len(" ".join(words[:4]))
            stop = reference[boundary - 2 : boundary + 3]
            at = reference.find(stop)
            deltas, done = await run(engine, request(max_tokens=40, stop=(stop,)))
        assert done.finish_reason == "stop"
        assert "".join(deltas) == reference[:at]
        assert all(stop not in delta for delta in deltas)
        # Generation went on until the token that completed the stop string.
        tokens_to_cover = next(
            i for i in range(1, len(words) + 1) if len(" ".join(words[:i])) >= at + len(stop)
        )
        assert done.completion_tokens == tokens_to_cover

    async def test_earliest_of_several_stops_wins(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            reference = await text_of(engine, request(max_tokens=40))
            late, early = reference[30:36], reference[10:14]
            text = await text_of(engine, request(max_tokens=40, stop=(late, early)))
        assert text == reference[: min(reference.find(early), reference.find(late))]
        assert len(text) <= 10

    async def test_stop_at_start_gives_empty_text(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            reference = await text_of(engine, request(max_tokens=5))
            deltas, done = await run(engine, request(max_tokens=5, stop=(reference[:3],)))
        assert deltas == []
        assert done.finish_reason == "stop"

    async def test_stop_that_never_occurs_changes_nothing(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            reference = await text_of(engine, request(max_tokens=20))
            deltas, done = await run(engine, request(max_tokens=20, stop=("§never§",)))
        assert "".join(deltas) == reference
        assert done.finish_reason == "length"


#: Quick and short: every answer ends by itself within 40 tokens.
CONTINUE = replace(FAST, speed_factor=50.0, min_answer_tokens=5, max_answer_tokens=30)


def tokens_in(text: str) -> int:
    """The words ``text`` holds, a word cut at its end included (one token per word)."""
    return len(text.split(" ")) if text else 0


async def continued(
    engine: SimEngine, req: EngineRequest, cut: int
) -> tuple[str, Completion, str, Completion]:
    """The whole answer to ``req``, and the answer to ``req`` continued from its first ``cut``
    characters with ``max_tokens`` reduced by the tokens they hold."""
    deltas, whole = await run(engine, req)
    text = "".join(deltas)
    sent = text[:cut]
    rest = replace(
        req,
        request_id=f"r{next(_ids)}",
        continuation=sent,
        sampling=replace(req.sampling, max_tokens=req.sampling.max_tokens - tokens_in(sent)),
    )
    more, done = await run(engine, rest)
    return text, whole, "".join(more), done


class TestContinuation:
    """A request continued from the start of its own answer gets exactly the rest of it."""

    @settings(max_examples=40, deadline=None)
    @given(
        prompt=st.text(min_size=1, max_size=60),
        seed=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
        max_tokens=st.integers(min_value=2, max_value=40),
        fraction=st.floats(min_value=0.0, max_value=1.0),
    )
    def test_continuing_a_prefix_gives_the_rest(
        self, prompt: str, seed: int | None, max_tokens: int, fraction: float
    ) -> None:
        """For any cut of the answer (between words or inside one), greedy or seeded: the
        continued text is the rest of the answer, with the same finish and the rest's tokens."""
        sampling = {"temperature": 0.0} if seed is None else {"temperature": 0.9, "seed": seed}
        req = request(prompt, max_tokens=max_tokens, **sampling)

        async def check() -> None:
            engine = SimEngine(CONTINUE)
            await engine.start()
            try:
                whole_text = await text_of(engine, req)
                cut = int(len(whole_text) * fraction)
                if tokens_in(whole_text[:cut]) >= max_tokens:
                    cut = len(" ".join(whole_text.split(" ")[: max_tokens - 1]))
                text, whole, rest, done = await continued(engine, req, cut)
            finally:
                await engine.stop()
            assert text[:cut] + rest == text
            assert done.finish_reason == whole.finish_reason
            assert done.completion_tokens == whole.completion_tokens - tokens_in(text[:cut])

        asyncio.run(check())

    @pytest.mark.parametrize("words", [1, 2, 5, 11])
    async def test_continuing_after_k_words(self, sim: EngineFactory, words: int) -> None:
        async with sim(CONTINUE) as engine:
            reference = await text_of(engine, request(max_tokens=40))
            cut = len(" ".join(reference.split(" ")[:words]))
            text, whole, rest, done = await continued(engine, request(max_tokens=40), cut)
        assert text == reference
        assert rest.startswith(" ")
        assert reference[:cut] + rest == reference
        assert done.completion_tokens == whole.completion_tokens - words

    async def test_continuing_with_a_stop_string(self, sim: EngineFactory) -> None:
        """Cut anywhere before the stop string: the rest still ends before it."""
        async with sim(CONTINUE, min_answer_tokens=30) as engine:
            reference = await text_of(engine, request(max_tokens=40))
            stop = reference[40:44]
            req = request(max_tokens=40, stop=(stop,))
            for cut in (3, 17, reference.find(stop) - 1):
                text, whole, rest, done = await continued(engine, req, cut)
                assert text == reference[: reference.find(stop)]
                assert text[:cut] + rest == text
                assert (whole.finish_reason, done.finish_reason) == ("stop", "stop")

    async def test_continuation_holding_the_whole_answer_ends_at_once(
        self, sim: EngineFactory
    ) -> None:
        async with sim(CONTINUE) as engine:
            _, whole, rest, done = await continued(engine, request(max_tokens=40), 10**6)
        assert whole.finish_reason == "stop"
        assert (rest, done.finish_reason, done.completion_tokens) == ("", "stop", 0)

    async def test_prompt_tokens_include_the_continuation(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            _, done = await run(engine, replace(request("x" * 40), continuation="y" * 40))
        assert done.prompt_tokens == 20

    async def test_another_continuation_gets_a_fresh_deterministic_answer(
        self, sim: EngineFactory
    ) -> None:
        """Text the engine would not have written: it goes on after it, the same each time."""
        foreign = replace(request(), continuation="Once upon a time")
        async with sim() as engine:
            first = await text_of(engine, foreign)
            again = await text_of(engine, replace(foreign, request_id="again"))
            plain = await text_of(engine, request())
        assert first == again
        assert first.startswith(" ")
        assert first != plain

    async def test_no_continuation_leaves_the_answer_unchanged(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            plain = await text_of(engine, request())
            empty = await text_of(engine, replace(request(), continuation=""))
        assert plain == empty


async def _first_delta(engine: SimEngine, req: EngineRequest) -> asyncio.Task[Completion]:
    """Start consuming ``req`` in a task; return once it has produced text."""
    started = asyncio.Event()

    async def consume() -> Completion:
        async for item in engine.generate(req):
            if isinstance(item, TextDelta):
                started.set()
            else:
                return item
        raise AssertionError("no completion")

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 10)
    return task


async def _submitted(engine: SimEngine, req: EngineRequest) -> asyncio.Task[Completion]:
    """Start consuming ``req`` in a task; return once the engine has it (queued or running)."""
    before = engine.load()
    task = asyncio.create_task(run(engine, req))
    await assert_eventually(
        lambda: engine.load().active + engine.load().queued > before.active + before.queued
    )

    async def completion() -> Completion:
        return (await task)[1]

    return asyncio.create_task(completion())


class TestAbort:
    """abort() ends a queued or running request with "cancelled" and frees what it held."""

    async def test_abort_running_request(self, sim: EngineFactory) -> None:
        async with sim(SLOW) as engine:
            req = request(max_tokens=1000)
            task = await _first_delta(engine, req)
            assert engine.load().active == 1
            assert engine.load().kv_cache_used_fraction > 0
            await engine.abort(req.request_id)
            done = await asyncio.wait_for(task, 5)
            load = engine.load()
        assert done.finish_reason == "cancelled"
        assert 0 < done.completion_tokens < 1000
        assert (load.active, load.queued, load.kv_cache_used_fraction) == (0, 0, 0.0)

    async def test_abort_queued_request(self, sim: EngineFactory) -> None:
        async with sim(SLOW, capacity=1) as engine:
            running = await _first_delta(engine, request(max_tokens=1000))
            queued_req = request(max_tokens=1000)
            queued = await _submitted(engine, queued_req)
            assert (engine.load().active, engine.load().queued) == (1, 1)
            await engine.abort(queued_req.request_id)
            done = await asyncio.wait_for(queued, 5)
            assert done.finish_reason == "cancelled"
            assert done.completion_tokens == 0
            assert (engine.load().active, engine.load().queued) == (1, 0)
            running.cancel()
            await assert_eventually(lambda: engine.load().active == 0)

    async def test_closing_the_stream_aborts(self, sim: EngineFactory) -> None:
        async with sim(SLOW) as engine:
            stream = engine.generate(request(max_tokens=1000))
            assert isinstance(await anext(stream), TextDelta)
            assert engine.load().active == 1
            await stream.aclose()
            assert engine.load().active == 0
            assert engine.load().kv_cache_used_fraction == 0.0

    async def test_abort_of_unknown_id_is_ignored(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            await engine.abort("no-such-request")
            _, done = await run(engine, request(max_tokens=3))
        assert done.finish_reason == "length"


class TestBatching:
    """capacity bounds the running batch; the rest wait in FIFO order; KV blocks are counted."""

    async def test_capacity_two_with_four_requests(self, sim: EngineFactory) -> None:
        async with sim(SLOW, capacity=2) as engine:
            reqs = [request(f"prompt {i}", max_tokens=1000) for i in range(4)]
            tasks = [asyncio.create_task(run(engine, r)) for r in reqs]
            await assert_eventually(lambda: engine.load().active + engine.load().queued == 4)
            load = engine.load()
            assert (load.active, load.queued, load.capacity) == (2, 2, 2)
            assert 0 < load.kv_cache_used_fraction < 1
            for r in reqs:
                await engine.abort(r.request_id)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert {done.finish_reason for _, done in results} == {"cancelled"}
        load = engine.load()
        assert (load.active, load.queued, load.kv_cache_used_fraction) == (0, 0, 0.0)

    async def test_queued_request_runs_when_a_slot_frees(self, sim: EngineFactory) -> None:
        async with sim(capacity=1) as engine:
            (_, first), (_, second) = await asyncio.gather(
                run(engine, request(max_tokens=20)), run(engine, request(max_tokens=20))
            )
        assert first.finish_reason == second.finish_reason == "length"
        assert second.queue_s > first.queue_s
        assert second.queue_s >= 0.015  # waited for most of the first one's 20 tokens

    async def test_kv_budget_limits_the_batch(self, sim: EngineFactory) -> None:
        # 4 blocks of 32 tokens; each request reserves ceil((6 + 50) / 32) = 2 blocks.
        async with sim(SLOW, kv_blocks=4, tokens_per_block=32) as engine:
            tasks = [asyncio.create_task(run(engine, request(max_tokens=50))) for _ in range(3)]
            await assert_eventually(lambda: engine.load().active + engine.load().queued == 3)
            load = engine.load()
            assert (load.active, load.queued) == (2, 1)
            assert load.kv_cache_used_fraction == 0.5  # one block each, in use so far
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert engine.load().active == 0

    async def test_load_change_is_signalled(self, sim: EngineFactory) -> None:
        async with sim(SLOW) as engine:
            assert not await engine.wait_load_change(0.01)
            waiter = asyncio.create_task(engine.wait_load_change(5))
            task = await _first_delta(engine, request(max_tokens=1000))
            assert await waiter
            task.cancel()

    async def test_hundreds_of_streams_are_cheap(self, sim: EngineFactory) -> None:
        async with sim(capacity=400, min_answer_tokens=100) as engine:
            began = time.monotonic()
            results = await asyncio.gather(
                *(run(engine, request(f"p{i}", max_tokens=50)) for i in range(400))
            )
            elapsed = time.monotonic() - began
        assert all(done.completion_tokens == 50 for _, done in results)
        # 50 batch steps of 1 ms; generous bound for a loaded 2-core machine.
        assert elapsed < 8


class TestDeadline:
    """A request whose deadline passes ends with "timeout", queued or running."""

    async def test_running_request_times_out(self, sim: EngineFactory) -> None:
        async with sim(SLOW) as engine:
            req = replace(request(max_tokens=1000), deadline=time.monotonic() + 0.2)
            _, done = await asyncio.wait_for(run(engine, req), 5)
        assert done.finish_reason == "timeout"
        assert engine.load().active == 0

    async def test_queued_request_times_out(self, sim: EngineFactory) -> None:
        async with sim(SLOW, capacity=1) as engine:
            running = await _first_delta(engine, request(max_tokens=1000))
            req = replace(request(max_tokens=1000), deadline=time.monotonic() + 0.1)
            deltas, done = await asyncio.wait_for(run(engine, req), 5)
            assert done.finish_reason == "timeout"
            assert (deltas, done.completion_tokens) == ([], 0)
            assert engine.load().queued == 0
            running.cancel()


class TestTiming:
    """Delays follow the settings; speed_factor divides them."""

    async def test_speed_factor_divides_delays(self, sim: EngineFactory) -> None:
        slow = replace(FAST, token_delay=timedelta(milliseconds=100))
        async with sim(slow, speed_factor=50) as engine:
            began = time.monotonic()
            _, done = await run(engine, request(max_tokens=20))
            elapsed = time.monotonic() - began
        assert done.completion_tokens == 20
        assert elapsed < 1.0  # 2 s at speed 1, 40 ms at speed 50

    async def test_token_delay_paces_generation(self, sim: EngineFactory) -> None:
        async with sim(token_delay=timedelta(milliseconds=10)) as engine:
            began = time.monotonic()
            await run(engine, request(max_tokens=20))
            elapsed = time.monotonic() - began
        assert elapsed >= 0.18  # 1 ms prefill + 19 decode steps of 10 ms


class TestLifecycle:
    """An engine serves between start() and stop(); stop() cancels what is live."""

    async def test_generate_before_start_fails(self) -> None:
        with pytest.raises(EngineError, match="not running"):
            await run(SimEngine(FAST), request())

    async def test_stop_cancels_live_requests(self, sim: EngineFactory) -> None:
        async with sim(SLOW, capacity=1) as engine:
            running = await _first_delta(engine, request(max_tokens=1000))
            queued = await _submitted(engine, request(max_tokens=1000))
            assert engine.load().healthy
            await engine.stop()
            assert not engine.load().healthy
            done = await asyncio.wait_for(asyncio.gather(running, queued), 5)
        assert [d.finish_reason for d in done] == ["cancelled", "cancelled"]
        with pytest.raises(EngineError):
            await run(engine, request())

    async def test_duplicate_live_request_id_is_refused(self, sim: EngineFactory) -> None:
        async with sim(SLOW) as engine:
            req = request(max_tokens=1000)
            task = await _first_delta(engine, req)
            with pytest.raises(EngineError, match="already running"):
                await run(engine, req)
            task.cancel()

    async def test_info_describes_the_engine(self, sim: EngineFactory) -> None:
        async with sim(model="m", model_version="v7", capacity=3) as engine:
            info = engine.info()
        assert (info.engine, info.model, info.model_version, info.capacity) == ("sim", "m", "v7", 3)

    def test_settings_are_validated(self) -> None:
        with pytest.raises(ValueError, match="speed_factor"):
            SimSettings(speed_factor=0)
        with pytest.raises(ValueError, match="min_answer_tokens"):
            SimSettings(min_answer_tokens=10, max_answer_tokens=5)


# -- the calibrated model: KV budget, FIFO admission, prefix reuse, virtual timing -----------------

#: The calibrated defaults, run 50 times faster; timings are read on the simulated clock.
SPEED = 50.0
CALIBRATED = SimSettings(
    capacity=256, speed_factor=SPEED, min_answer_tokens=4000, max_answer_tokens=4000
)
#: Block-sized pieces of prompt text (32 tokens of 4 characters).
BLOCK_CHARS = 32 * 4


def prompt_of(tokens: int, tag: str = "") -> str:
    """A prompt of exactly ``tokens`` simulator tokens, made distinct from its first block by
    ``tag``."""
    text = f"[{tag}] " + "lorem ipsum dolor sit amet " * (tokens // 6 + 2)
    return text[: tokens * 4]


class Timed:
    """One request's completion and its times on the engine's simulated clock, in calibrated
    milliseconds (the simulated seconds times ``SPEED``)."""

    def __init__(self, done: Completion, submitted: float, first: float, last: float) -> None:
        self.done = done
        self.ttft_ms = (first - submitted) * SPEED * 1000
        tokens = done.completion_tokens
        self.tpot_ms = (last - first) * SPEED * 1000 / (tokens - 1) if tokens > 1 else 0.0


async def timed(engine: SimEngine, req: EngineRequest) -> Timed:
    """Run ``req``, stamping submission, first and last text with ``simulated_seconds``.

    The engine's loop hands each iteration's text to consumers before it applies the next one,
    so a stamp taken on receipt is the end of the iteration that produced the text.
    """
    submitted = engine.simulated_seconds
    first = last = -1.0
    done: Completion | None = None
    async for item in engine.generate(req):
        if isinstance(item, TextDelta):
            last = engine.simulated_seconds
            if first < 0:
                first = last
        else:
            done = item
    assert done is not None
    return Timed(done, submitted, first, last)


class TestTimingModel:
    """Iteration times follow the documented model and its calibration to the H100 figures."""

    def test_calibration_points(self) -> None:
        engine = SimEngine(SimSettings())
        ms = 1000
        assert engine.iteration_s(0, 128) * ms == pytest.approx(7.0)  # batch-1 TTFT @128
        assert engine.iteration_s(0, 2048) * ms == pytest.approx(36.0, abs=0.05)  # @2048
        assert engine.decode_step_s(1) * ms == pytest.approx(7.0)
        assert engine.decode_step_s(256) * ms == pytest.approx(7.0 + 255 * 0.016)
        assert engine.decode_step_s(0) == 0.0

    def test_prefill_shares_the_iteration_with_decode(self) -> None:
        engine = SimEngine(SimSettings())
        decode = engine.decode_step_s(100)
        # The fixed cost (a pass over the weights) is paid once; prompt tokens add compute.
        assert engine.iteration_s(100, 256) == pytest.approx(decode + 256 * 15.1e-6)
        assert engine.iteration_s(100, 0) == decode

    def test_speed_factor_divides_every_time(self) -> None:
        base, fast = SimEngine(SimSettings()), SimEngine(SimSettings(speed_factor=4))
        for generating, context in ((1, 0), (0, 128), (64, 512), (256, 0)):
            assert fast.iteration_s(generating, context) == pytest.approx(
                base.iteration_s(generating, context) / 4
            )

    async def test_batch_one_request_runs_at_the_calibrated_pace(self, sim: EngineFactory) -> None:
        async with sim(CALIBRATED) as engine:
            result = await timed(engine, request(prompt_of(128), max_tokens=20))
        assert result.done.completion_tokens == 20
        assert result.ttft_ms == pytest.approx(7.0)
        assert result.tpot_ms == pytest.approx(7.0)

    async def test_long_prompt_takes_longer_to_first_token(self, sim: EngineFactory) -> None:
        async with sim(CALIBRATED) as engine:
            result = await timed(engine, request(prompt_of(2048), max_tokens=2))
        assert result.ttft_ms == pytest.approx(36.0, abs=0.05)


class TestThroughputAgainstBatchSize:
    """More concurrent streams: more output tokens per second, more time per output token."""

    @staticmethod
    async def measure(engine: SimEngine, streams: int) -> tuple[float, float]:
        """Output tokens per simulated second and the median time per output token (ms)."""
        began = engine.simulated_seconds
        results = await asyncio.gather(
            *(
                timed(engine, request(prompt_of(128, f"s{i}"), max_tokens=32))
                for i in range(streams)
            )
        )
        elapsed = (engine.simulated_seconds - began) * SPEED
        tokens = sum(r.done.completion_tokens for r in results)
        tpots = sorted(r.tpot_ms for r in results)
        return tokens / elapsed, tpots[len(tpots) // 2]

    async def test_throughput_rises_and_so_does_time_per_token(self, sim: EngineFactory) -> None:
        async with sim(CALIBRATED) as engine:
            points = [await self.measure(engine, streams) for streams in (1, 16, 64, 256)]
        throughputs = [p[0] for p in points]
        tpots = [p[1] for p in points]
        assert throughputs == sorted(throughputs)
        assert throughputs[-1] > 20 * throughputs[0]
        assert tpots == sorted(tpots)
        assert tpots[0] == pytest.approx(7.0)  # one stream: 7 ms per token
        # Requests that arrived together decode together: the decode step of the whole batch.
        assert tpots[1] == pytest.approx(7.0 + 15 * 0.016)
        assert tpots[2] == pytest.approx(7.0 + 63 * 0.016)
        # 256 prompts take four context iterations (8192 tokens each); the first ones decode
        # through the later ones' prefill, which lengthens their time per token.
        assert tpots[3] > 7.0 + 255 * 0.016

    async def test_a_burst_of_prompts_is_prefilled_in_token_budgets(
        self, sim: EngineFactory
    ) -> None:
        # 256 prompts of 128 tokens with 8192 tokens per iteration.
        async with sim(CALIBRATED) as engine:
            results = await asyncio.gather(
                *(timed(engine, request(prompt_of(128, f"b{i}"), max_tokens=2)) for i in range(256))
            )
        ttfts = sorted({round(r.ttft_ms, 3) for r in results})
        assert ttfts[0] == pytest.approx(7.0 - 128 * 0.0151 + 8192 * 0.0151, abs=0.01)  # 128.8
        # Later iterations also decode the earlier prompts' requests, one token each out of the
        # budget, so the last few prompts need a fifth, short iteration.
        assert len(ttfts) == 5
        assert ttfts[-1] - ttfts[-2] < 20


class TestChunkedContext:
    """A prompt longer than max_num_tokens is prefilled over several iterations."""

    async def test_long_prompt_is_prefilled_in_chunks(self, sim: EngineFactory) -> None:
        async with sim(CALIBRATED, max_num_tokens=512) as engine:
            result = await timed(engine, request(prompt_of(2000), max_tokens=1))
            stats = engine.iteration_stats()
        assert stats["iter"] == 4  # 512 + 512 + 512 + 464 tokens
        chunks = 3 * engine.iteration_s(0, 512) + engine.iteration_s(0, 464)
        assert result.ttft_ms == pytest.approx(chunks * SPEED * 1000)

    async def test_generating_requests_take_from_the_token_budget(self, sim: EngineFactory) -> None:
        async with sim(SLOW, max_num_tokens=100) as engine:
            runner = await _first_delta(engine, request(prompt_of(8, "g"), max_tokens=1000))
            long = asyncio.create_task(run(engine, request(prompt_of(400, "l"), max_tokens=1000)))
            await assert_eventually(
                lambda: engine.iteration_stats()["inflightBatchingStats"]["numContextRequests"] == 1
            )
            batch = engine.iteration_stats()["inflightBatchingStats"]
            assert batch["numGenRequests"] == 1
            assert batch["numCtxTokens"] == 99  # 100 minus the generating request's token
            runner.cancel()
            long.cancel()


class TestKvBudgetQueue:
    """Requests wait in FIFO order until their KV blocks fit, and are admitted as blocks free."""

    # 4 blocks of 32 tokens. "Tell me about meshes." is 6 tokens; a request reserves blocks for
    # its prompt plus max_tokens: 80 -> 3 blocks, 50 -> 2 blocks, 10 -> 1 block.

    async def test_head_of_line_blocks_smaller_requests_behind_it(self, sim: EngineFactory) -> None:
        async with sim(SLOW, kv_blocks=4) as engine:
            big = await _first_delta(engine, request(max_tokens=80))
            middle_req, small_req = request(max_tokens=50), request(max_tokens=10)
            middle = await _submitted(engine, middle_req)
            small = await _submitted(engine, small_req)
            # The small request would fit in the one free block, but waits behind the middle one.
            stats = engine.iteration_stats()
            assert (stats["numActiveRequests"], stats["numQueuedRequests"]) == (1, 2)
            assert stats["kvCacheStats"]["usedNumBlocks"] == 1  # the big one's prompt block
            await engine.abort(middle_req.request_id)
            # With the middle one gone, the small one is the head and fits.
            await assert_eventually(lambda: engine.load().active == 2)
            assert engine.load().queued == 0
            assert (await middle).finish_reason == "cancelled"
            for task in (big, small):
                task.cancel()
            await asyncio.gather(big, small, return_exceptions=True)

    async def test_queued_requests_are_admitted_in_order_as_blocks_free(
        self, sim: EngineFactory
    ) -> None:
        async with sim(FAST, kv_blocks=4) as engine:
            results = await asyncio.gather(
                run(engine, request(max_tokens=80)),
                run(engine, request(max_tokens=50)),
                run(engine, request(max_tokens=10)),
            )
        (_, big), (_, middle), (_, small) = results
        assert big.queue_s < 0.01
        # Both waited for the big one's 80 tokens (one 1 ms step each) to free its blocks...
        assert middle.queue_s >= 0.07
        # ... and the small one, though one block was free, did not overtake the middle one.
        assert small.queue_s >= middle.queue_s - 0.005
        assert {d.finish_reason for d in (big, middle, small)} == {"length"}

    async def test_finished_request_returns_its_blocks(self, sim: EngineFactory) -> None:
        async with sim(FAST, kv_blocks=4) as engine:
            await run(engine, request(max_tokens=80))
            stats = engine.iteration_stats()["kvCacheStats"]
        assert (stats["usedNumBlocks"], stats["freeNumBlocks"]) == (0, 4)

    async def test_abort_of_running_request_admits_the_queue(self, sim: EngineFactory) -> None:
        async with sim(SLOW, kv_blocks=4) as engine:
            big_req = request(max_tokens=80)
            big = await _first_delta(engine, big_req)
            waiting = await _submitted(engine, request(max_tokens=50))
            assert engine.load().queued == 1
            await engine.abort(big_req.request_id)
            assert engine.iteration_stats()["kvCacheStats"]["usedNumBlocks"] == 0
            await assert_eventually(lambda: engine.load().active == 1)
            assert (await big).finish_reason == "cancelled"
            waiting.cancel()

    async def test_timeout_of_running_request_admits_the_queue(self, sim: EngineFactory) -> None:
        async with sim(SLOW, kv_blocks=4) as engine:
            timing_out = replace(request(max_tokens=80), deadline=time.monotonic() + 0.15)
            first = asyncio.create_task(run(engine, timing_out))
            await assert_eventually(lambda: engine.load().active == 1)
            waiting = await _submitted(engine, request(max_tokens=50))
            _, done = await asyncio.wait_for(first, 5)
            assert done.finish_reason == "timeout"
            await assert_eventually(lambda: engine.load().active == 1 and engine.load().queued == 0)
            assert engine.iteration_stats()["kvCacheStats"]["usedNumBlocks"] == 1
            waiting.cancel()

    async def test_timeout_of_queued_request_frees_its_place(self, sim: EngineFactory) -> None:
        async with sim(SLOW, kv_blocks=4) as engine:
            big = await _first_delta(engine, request(max_tokens=80))
            queued = replace(request(max_tokens=50), deadline=time.monotonic() + 0.1)
            _, done = await asyncio.wait_for(run(engine, queued), 5)
            assert done.finish_reason == "timeout"
            # The next request that fits is admitted at once: the expired one no longer blocks it.
            small = await _first_delta(engine, request(max_tokens=10))
            assert engine.load().active == 2
            for task in (big, small):
                task.cancel()
            await asyncio.gather(big, small, return_exceptions=True)


class TestPrefixReuse:
    """Full prompt blocks already in the KV cache are shared and cost no prefill."""

    async def test_shared_prefix_cuts_time_to_first_token(self, sim: EngineFactory) -> None:
        document = prompt_of(2048, "doc")  # 64 full blocks
        async with sim(CALIBRATED) as engine:
            first = await timed(engine, request(document + " Question one?", max_tokens=4))
            second = await timed(engine, request(document + " Question two?", max_tokens=4))
            stats = engine.iteration_stats()["kvCacheStats"]
        assert first.ttft_ms == pytest.approx(36.0, abs=0.2)
        assert second.ttft_ms < first.ttft_ms / 5  # ~5.1 ms: only the question is prefilled
        assert stats["reusedBlocks"] == 64
        assert stats["missedBlocks"] == 65 + 1
        assert stats["cacheHitRate"] == pytest.approx(64 / 130)

    async def test_identical_prompt_recomputes_only_its_last_block(
        self, sim: EngineFactory
    ) -> None:
        prompt = prompt_of(256, "same")  # exactly 8 blocks
        async with sim(CALIBRATED) as engine:
            await timed(engine, request(prompt, max_tokens=2))
            again = await timed(engine, request(prompt, max_tokens=2))
            stats = engine.iteration_stats()["kvCacheStats"]
        assert (stats["reusedBlocks"], stats["missedBlocks"]) == (7, 8 + 1)
        assert again.ttft_ms == pytest.approx(engine.iteration_s(0, 32) * SPEED * 1000)

    async def test_reuse_does_not_change_the_text(self, sim: EngineFactory) -> None:
        prompt = prompt_of(300, "text")
        async with sim(CALIBRATED) as engine:
            cold = await text_of(engine, request(prompt, max_tokens=30))
            warm = await text_of(engine, request(prompt, max_tokens=30))
            assert engine.iteration_stats()["kvCacheStats"]["reusedBlocks"] == 9
        assert cold == warm

    async def test_running_requests_share_their_prefix_blocks(self, sim: EngineFactory) -> None:
        document = prompt_of(1024, "shared")  # 32 full blocks
        async with sim(SLOW) as engine:
            a = await _first_delta(engine, request(document + " A?", max_tokens=1000))
            used_by_one = engine.iteration_stats()["kvCacheStats"]["usedNumBlocks"]
            b = await _first_delta(engine, request(document + " B?", max_tokens=1000))
            stats = engine.iteration_stats()["kvCacheStats"]
            a.cancel()
            b.cancel()
            await asyncio.gather(a, b, return_exceptions=True)
        assert used_by_one == 33
        assert stats["usedNumBlocks"] == 34  # the second adds only its own last block
        assert stats["reusedBlocks"] == 32

    async def test_disabled_reuse_prefills_every_time(self, sim: EngineFactory) -> None:
        document = prompt_of(2048, "doc")
        async with sim(CALIBRATED, enable_block_reuse=False) as engine:
            first = await timed(engine, request(document + " one", max_tokens=2))
            second = await timed(engine, request(document + " two", max_tokens=2))
            stats = engine.iteration_stats()["kvCacheStats"]
        assert second.ttft_ms == pytest.approx(first.ttft_ms, rel=0.01)
        assert stats["reusedBlocks"] == 0

    async def test_freed_blocks_are_evicted_leaves_first(self, sim: EngineFactory) -> None:
        # 8 blocks of 4 tokens (16 characters). A: 4 full blocks and one more token.
        a_prompt = "a" * 64 + "?"
        async with sim(FAST, kv_blocks=8, tokens_per_block=4) as engine:
            await run(engine, request(a_prompt, max_tokens=1))
            # B fills 6 blocks: 2 must come from A's cached blocks, the leaves (3rd, 4th) first.
            await run(engine, request("b" * 80, max_tokens=1))
            before = engine.iteration_stats()["kvCacheStats"]["reusedBlocks"]
            await run(engine, request(a_prompt, max_tokens=1))
            after = engine.iteration_stats()["kvCacheStats"]["reusedBlocks"]
        assert (before, after) == (0, 2)


class TestIterationStats:
    """iteration_stats() has TensorRT-LLM's keys; load() agrees with it."""

    async def test_keys_and_values(self, sim: EngineFactory) -> None:
        async with sim(SLOW, capacity=2, kv_blocks=100) as engine:
            runners = [
                await _first_delta(engine, request(f"prompt {i}", max_tokens=1000))
                for i in range(2)
            ]
            queued_req = request(max_tokens=1000)
            queued = await _submitted(engine, queued_req)
            stats = engine.iteration_stats()
            load = engine.load()
            await engine.abort(queued_req.request_id)
            for task in runners:
                task.cancel()
            await asyncio.gather(*runners, queued, return_exceptions=True)
            idle = engine.iteration_stats()
        assert set(stats) >= {
            "numActiveRequests",
            "numQueuedRequests",
            "maxNumActiveRequests",
            "maxBatchSizeRuntime",
            "kvCacheStats",
            "inflightBatchingStats",
        }
        assert set(stats["kvCacheStats"]) >= {
            "maxNumBlocks",
            "freeNumBlocks",
            "usedNumBlocks",
            "tokensPerBlock",
            "reusedBlocks",
            "missedBlocks",
            "cacheHitRate",
        }
        assert stats["numActiveRequests"] == 2
        assert stats["numQueuedRequests"] == 1
        assert stats["maxNumActiveRequests"] == stats["maxBatchSizeRuntime"] == 2
        kv = stats["kvCacheStats"]
        assert (kv["maxNumBlocks"], kv["tokensPerBlock"]) == (100, 32)
        assert kv["usedNumBlocks"] == 2  # one block each so far
        assert kv["freeNumBlocks"] == 98
        assert (kv["reusedBlocks"], kv["missedBlocks"], kv["cacheHitRate"]) == (0, 2, 0.0)
        assert stats["inflightBatchingStats"] == {
            "numScheduledRequests": 2,
            "numContextRequests": 0,
            "numGenRequests": 2,
            "numPausedRequests": 0,
            "numCtxTokens": 0,
        }
        assert stats["iter"] > 0
        assert stats["iterLatencyMS"] == pytest.approx(20 + 0.016)
        assert (load.active, load.queued, load.capacity) == (2, 1, 2)
        assert load.kv_cache_used_fraction == pytest.approx(2 / 100)
        assert idle["numActiveRequests"] == idle["numQueuedRequests"] == 0
        assert idle["inflightBatchingStats"]["numScheduledRequests"] == 0
        assert idle["kvCacheStats"]["usedNumBlocks"] == 0


class TestBatchIndependence:
    """A deterministic request's text does not depend on what else runs beside it."""

    async def test_text_alone_equals_text_in_a_crowd(self, sim: EngineFactory) -> None:
        async with sim() as engine:
            alone = await text_of(engine, request("the one", max_tokens=30))
            crowd = await asyncio.gather(
                text_of(engine, request("the one", max_tokens=30)),
                *(text_of(engine, request(f"other {i}", max_tokens=30)) for i in range(20)),
            )
        assert crowd[0] == alone
