"""The simulated engine, driven directly (no gRPC): text, limits, batching, abort, KV, timing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import replace
from datetime import timedelta

import pytest

from llmmesh.validation import Sampling
from tests.harness import assert_eventually
from worker.engines import (
    Completion,
    Engine,
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


async def run(engine: Engine, req: EngineRequest) -> tuple[list[str], Completion]:
    """Every text delta of ``req`` and its completion (which must come last, once)."""
    deltas: list[str] = []
    completions: list[Completion] = []
    async for item in engine.generate(req):
        assert not completions, "nothing may follow the completion"
        if isinstance(item, TextDelta):
            assert item.text
            deltas.append(item.text)
        else:
            completions.append(item)
    assert len(completions) == 1
    return deltas, completions[0]


async def text_of(engine: Engine, req: EngineRequest) -> str:
    deltas, _ = await run(engine, req)
    return "".join(deltas)


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
