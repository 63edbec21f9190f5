"""A simulated inference engine: continuous batching, a KV block budget, deterministic text.

The simulator behaves like an in-flight-batching engine (TensorRT-LLM's scheduler with
``GUARANTEED_NO_EVICT``) without a model:

- **Scheduling.** Requests wait in a FIFO queue until a batch slot (``capacity``) and enough KV
  blocks for their prompt plus ``max_tokens`` are free. One asyncio task steps the whole batch:
  every iteration each running request produces one token. An iteration lasts ``token_delay``
  plus the prefill time of the requests that joined it, so a newcomer's prefill slows the batch
  as it does on a GPU. Defaults follow published TensorRT-LLM figures for an 8B model on one
  H100 (7 ms to the first token at 128 prompt tokens, 36 ms at 2048, about 7 ms per token);
  ``speed_factor`` divides every delay.
- **Text.** Words from a fixed vocabulary, drawn by a PRNG seeded from the SHA-256 of the
  canonical (prompt, temperature, top_p, top_k, seed), so a deterministic request (greedy or
  seeded) always gets the same text; otherwise fresh randomness. Each request has a natural
  answer length drawn the same way: reaching it finishes with "stop", reaching ``max_tokens``
  first with "length". Stop strings end the text before their first occurrence, even when it
  spans tokens (text that may begin a stop string is held back until it cannot).
- **KV cache.** Blocks of ``tokens_per_block`` tokens out of ``kv_blocks``; a running request
  uses the blocks its prompt and generated tokens fill, which drives ``kv_cache_used_fraction``.
- **Prompt tokens** are ``ceil(len(prompt) / 4)``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import math
import random
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import timedelta

import structlog

from worker.engines._base import (
    Completion,
    EngineError,
    EngineInfo,
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    TextDelta,
)

log = structlog.get_logger(__name__)

CHARS_PER_TOKEN = 4
#: Prompt length at which ``first_token_delay`` is measured.
REFERENCE_PROMPT_TOKENS = 128

_WORDS = """
    the a an of to and in that is for it as with was on be by this are from at or which
    model token answer request worker router cache engine batch stream latency throughput
    memory kernel tensor layer attention query key value prompt context sequence decode
    prefill block page schedule queue slot node cluster mesh service network packet signal
    system design data result value function method pattern process thread task event state
    light river mountain garden window morning evening quiet bright gentle distant ancient
    simple careful clear open steady quick slow warm cold deep wide small large early late
    first second next last every each other many most some few more less new old good great
    make take give find know think see come go use work seem feel keep leave begin show hear
    run move live believe hold bring happen write provide stand lose pay meet include learn
    change lead understand watch follow stop create speak read allow add spend grow offer
    time year people way day man thing woman life child world school family student group
    country problem hand part place case week company number point home water room area
    story fact month lot right study book eye job word business issue side kind head house
    friend hour game line end member law car city community name team minute idea body
    information back parent face level office door health person art war history party
"""
VOCABULARY = tuple(dict.fromkeys(_WORDS.split()))


@dataclass(frozen=True, kw_only=True)
class SimSettings:
    """How the simulated engine behaves."""

    model: str = "sim-llama-3.1-8b"
    model_version: str = "sim-1"
    #: Most requests running at once (max batch size).
    capacity: int = 64
    #: Largest prompt accepted, in tokens (reported in :class:`EngineInfo`).
    max_prompt_tokens: int = 32_768
    #: Prefill time of a 128-token prompt: the batch-1 time to first token.
    first_token_delay: timedelta = timedelta(milliseconds=7)
    #: Prefill time per 1000 prompt tokens beyond (or short of) 128.
    prefill_per_1k_tokens: timedelta = timedelta(milliseconds=15.1)
    #: Duration of one decode iteration (one token for every running request).
    token_delay: timedelta = timedelta(milliseconds=7)
    #: Divides every delay: 10 runs ten times faster than the calibrated GPU.
    speed_factor: float = 1.0
    #: KV cache size, in blocks.
    kv_blocks: int = 8192
    #: Tokens per KV cache block.
    tokens_per_block: int = 32
    #: Shortest and longest natural answer, in tokens.
    min_answer_tokens: int = 32
    max_answer_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity: must be >= 1 (got {self.capacity})")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: must be >= 1 (got {self.max_prompt_tokens})")
        if not (math.isfinite(self.speed_factor) and self.speed_factor > 0):
            raise ValueError(f"speed_factor: must be > 0 (got {self.speed_factor})")
        for name in ("first_token_delay", "prefill_per_1k_tokens", "token_delay"):
            if getattr(self, name) < timedelta(0):
                raise ValueError(f"{name}: must not be negative")
        if self.kv_blocks < 1 or self.tokens_per_block < 1:
            raise ValueError("kv_blocks, tokens_per_block: must be >= 1")
        if not 1 <= self.min_answer_tokens <= self.max_answer_tokens:
            raise ValueError(
                "min_answer_tokens, max_answer_tokens: need 1 <= min <= max "
                f"(got {self.min_answer_tokens}, {self.max_answer_tokens})"
            )


def count_tokens(text: str) -> int:
    """The simulator's token count of ``text``: one token per four characters, at least one."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def text_rng(request: EngineRequest) -> random.Random:
    """The PRNG that writes a request's answer: seeded from the request when deterministic."""
    s = request.sampling
    if s.temperature > 0 and s.seed is None:
        return random.Random()  # seeded from os.urandom: a fresh answer every time
    canonical = json.dumps(
        {
            "prompt": request.prompt,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "top_k": s.top_k,
            "seed": s.seed,
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return random.Random(int.from_bytes(hashlib.sha256(canonical.encode()).digest()))


class _Live:
    """A request inside the simulator, from submission to completion."""

    __slots__ = (
        "answer_tokens",
        "done",
        "emitted",
        "error",
        "generated",
        "id",
        "max_stop_chars",
        "max_tokens",
        "pending",
        "prompt_tokens",
        "request",
        "reserved_blocks",
        "rng",
        "scheduled_at",
        "sentence_start",
        "stop",
        "submitted_at",
        "text",
        "used_blocks",
        "wake",
    )

    def __init__(self, request: EngineRequest, settings: SimSettings) -> None:
        self.request = request
        self.id = request.request_id
        self.prompt_tokens = count_tokens(request.prompt)
        self.max_tokens = request.sampling.max_tokens
        self.stop = request.sampling.stop
        self.max_stop_chars = max((len(s) for s in self.stop), default=0)
        self.rng = text_rng(request)
        self.answer_tokens = self.rng.randint(
            settings.min_answer_tokens, settings.max_answer_tokens
        )
        wanted = self.prompt_tokens + self.max_tokens
        self.reserved_blocks = min(
            settings.kv_blocks, math.ceil(wanted / settings.tokens_per_block)
        )
        self.used_blocks = 0
        self.submitted_at = time.monotonic()
        self.scheduled_at: float | None = None
        self.generated = 0
        self.text = ""
        self.emitted = 0
        self.sentence_start = True
        self.pending: list[str] = []
        self.done: Completion | None = None
        self.error: EngineError | None = None
        self.wake = asyncio.Event()

    def next_word(self) -> str:
        """The next token's text (a word with its leading space and punctuation)."""
        rng = self.rng
        word = VOCABULARY[rng.randrange(len(VOCABULARY))]
        if self.sentence_start:
            word = word.capitalize()
        roll = rng.random()
        self.sentence_start = roll < 0.08
        if roll < 0.08:
            word += "."
        elif roll < 0.14:
            word += ","
        return word if self.generated == 0 else " " + word

    def flush(self, end: int) -> None:
        """Hand text up to ``end`` to the consumer."""
        if end > self.emitted:
            self.pending.append(self.text[self.emitted : end])
            self.emitted = end
            self.wake.set()


class SimEngine:
    """The simulated engine (see the module docstring). Implements :class:`Engine`."""

    def __init__(self, settings: SimSettings | None = None) -> None:
        self.settings = s = settings or SimSettings()
        self._token_delay = s.token_delay.total_seconds() / s.speed_factor
        self._first_token_delay = s.first_token_delay.total_seconds() / s.speed_factor
        self._prefill_per_token = s.prefill_per_1k_tokens.total_seconds() / 1000 / s.speed_factor
        self._queue: collections.deque[_Live] = collections.deque()
        self._running: dict[str, _Live] = {}
        self._live: dict[str, _Live] = {}
        self._reserved_blocks = 0
        self._used_blocks = 0
        self._work = asyncio.Event()
        self._load_changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._stopped = False
        self._failure: EngineError | None = None

    # -- Engine interface ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("sim engine already started")
        self._started = True
        self._task = asyncio.create_task(self._run(), name="sim-engine")
        self._task.add_done_callback(self._on_task_done)
        s = self.settings
        log.info(
            "engine started",
            engine="sim",
            model=s.model,
            capacity=s.capacity,
            kv_blocks=s.kv_blocks,
            token_delay_ms=round(self._token_delay * 1000, 3),
            first_token_delay_ms=round(self._first_token_delay * 1000, 3),
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for live in list(self._live.values()):
            self._finish(live, "cancelled")

    async def generate(
        self, request: EngineRequest
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        live = self._submit(request)
        try:
            while True:
                if not live.pending and live.done is None and live.error is None:
                    live.wake.clear()
                    await live.wake.wait()
                if live.pending:
                    text = "".join(live.pending)
                    live.pending.clear()
                    yield TextDelta(text)
                elif live.error is not None:
                    raise live.error
                elif live.done is not None:
                    yield live.done
                    return
        finally:
            if live.done is None and live.error is None:
                self._finish(live, "cancelled")

    async def abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:
            self._finish(live, "cancelled")

    def count_tokens(self, text: str) -> int:
        return count_tokens(text)

    def load(self) -> LoadSnapshot:
        return LoadSnapshot(
            active=len(self._running),
            queued=len(self._queue),
            capacity=self.settings.capacity,
            kv_cache_used_fraction=min(1.0, self._used_blocks / self.settings.kv_blocks),
            healthy=self._started and not self._stopped and self._failure is None,
        )

    async def wait_load_change(self, timeout: float) -> bool:
        changed = self._load_changed
        try:
            await asyncio.wait_for(changed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def info(self) -> EngineInfo:
        s = self.settings
        return EngineInfo(
            engine="sim",
            model=s.model,
            model_version=s.model_version,
            capacity=s.capacity,
            max_prompt_tokens=s.max_prompt_tokens,
        )

    # -- internals -----------------------------------------------------------------------------

    def _submit(self, request: EngineRequest) -> _Live:
        if self._failure is not None:
            raise EngineError(f"sim engine failed: {self._failure}")
        if not self._started or self._stopped:
            raise EngineError("sim engine is not running")
        if request.request_id in self._live:
            raise EngineError(f"request id {request.request_id!r} is already running")
        live = _Live(request, self.settings)
        self._live[live.id] = live
        self._queue.append(live)
        self._work.set()
        self._notify_load()
        return live

    def _finish(self, live: _Live, reason: FinishReason) -> None:
        """End ``live`` (queued or running) with ``reason``, freeing what it holds."""
        if live.done is not None:
            return
        if self._running.pop(live.id, None) is not None:
            self._reserved_blocks -= live.reserved_blocks
            self._used_blocks -= live.used_blocks
        else:
            with contextlib.suppress(ValueError):
                self._queue.remove(live)
        del self._live[live.id]
        if reason in ("stop", "length"):
            live.flush(len(live.text))
        started = live.scheduled_at if live.scheduled_at is not None else time.monotonic()
        live.done = Completion(
            finish_reason=reason,
            prompt_tokens=live.prompt_tokens,
            completion_tokens=live.generated,
            queue_s=started - live.submitted_at,
        )
        live.wake.set()
        self._notify_load()

    def _notify_load(self) -> None:
        self._load_changed.set()
        self._load_changed = asyncio.Event()

    def _prefill_s(self, prompt_tokens: int) -> float:
        extra = (prompt_tokens - REFERENCE_PROMPT_TOKENS) * self._prefill_per_token
        return max(0.0, self._first_token_delay + extra)

    def _expire(self, now: float) -> None:
        for live in list(self._live.values()):
            deadline = live.request.deadline
            if deadline is not None and now >= deadline:
                self._finish(live, "timeout")

    def _admit(self, now: float) -> list[_Live]:
        """Move queued requests into the batch while slots and KV blocks allow (FIFO)."""
        admitted: list[_Live] = []
        capacity, budget = self.settings.capacity, self.settings.kv_blocks
        tokens_per_block = self.settings.tokens_per_block
        while self._queue and len(self._running) < capacity:
            live = self._queue[0]
            if self._reserved_blocks + live.reserved_blocks > budget:
                break  # head-of-line waits for KV blocks, as GUARANTEED_NO_EVICT does
            self._queue.popleft()
            live.scheduled_at = now
            live.used_blocks = math.ceil(live.prompt_tokens / tokens_per_block)
            self._reserved_blocks += live.reserved_blocks
            self._used_blocks += live.used_blocks
            self._running[live.id] = live
            admitted.append(live)
        if admitted:
            self._notify_load()
        return admitted

    async def _run(self) -> None:
        """Step the batch: one iteration per ``token_delay`` (plus newcomers' prefill)."""
        next_at = time.monotonic()
        while True:
            if not self._running and not self._queue:
                self._work.clear()
                await self._work.wait()
                next_at = time.monotonic()
            now = time.monotonic()
            self._expire(now)
            decoding = len(self._running)
            admitted = self._admit(now)
            if not self._running:
                continue
            duration = (self._token_delay if decoding else 0.0) + sum(
                self._prefill_s(live.prompt_tokens) for live in admitted
            )
            # Keep a steady cadence despite sleep overshoot, but never burst to catch up.
            start = next_at if next_at >= now - duration else now
            next_at = start + duration
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self._step()

    def _step(self) -> None:
        """Every running request produces one token."""
        tokens_per_block = self.settings.tokens_per_block
        for live in list(self._running.values()):
            before = len(live.text)
            live.text += live.next_word()
            live.generated += 1
            blocks = math.ceil((live.prompt_tokens + live.generated) / tokens_per_block)
            if blocks > live.used_blocks:
                self._used_blocks += blocks - live.used_blocks
                live.used_blocks = blocks
            safe = len(live.text)
            if live.stop:
                at = self._find_stop(live, max(0, before - live.max_stop_chars + 1))
                if at >= 0:
                    live.flush(at)
                    live.text = live.text[:at]
                    self._finish(live, "stop")
                    continue
                # Hold back what could be the start of a stop string split across tokens.
                safe = max(live.emitted, safe - live.max_stop_chars + 1)
            if live.generated >= live.answer_tokens:
                self._finish(live, "stop")
            elif live.generated >= live.max_tokens:
                self._finish(live, "length")
            else:
                live.flush(safe)

    @staticmethod
    def _find_stop(live: _Live, start: int) -> int:
        """Index of the earliest stop string occurrence at or after ``start``, or -1."""
        found = -1
        for stop in live.stop:
            at = live.text.find(stop, start)
            if at >= 0 and (found < 0 or at < found):
                found = at
        return found

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        log.error("sim engine failed", exc_info=exc)
        self._failure = EngineError(f"sim engine failed: {exc!r}")
        for live in list(self._live.values()):
            live.error = self._failure
            live.wake.set()
        self._notify_load()


__all__ = ["SimEngine", "SimSettings", "count_tokens", "text_rng"]
