"""A simulated inference engine: continuous batching, a KV block budget, calibrated timings.

The simulator behaves like TensorRT-LLM's in-flight batching executor (capacity scheduler
``GUARANTEED_NO_EVICT``, chunked context, ``enable_block_reuse``) without a model, so that load
balancing measured on it means something. One asyncio task steps the whole batch.

**Scheduling.** A request waits in a FIFO queue until a batch slot (``capacity``) is free and the
KV cache can hold every block it may ever need (prompt plus ``max_tokens``; blocks its prompt
shares with the prefix cache are not counted twice). The queue is strictly first come, first
served: when the head does not fit, nothing behind it is admitted, even a small request that
would. That is what TensorRT-LLM's ``GUARANTEED_NO_EVICT`` scheduler does (it stops at the first
request whose blocks do not fit), and it keeps a long prompt from starving behind a stream of
short ones, at the price of some idle capacity while the head waits.

**Iterations.** Each iteration every request in the generation phase produces one token, and
requests in the context phase prefill up to ``max_num_tokens`` (minus one per generating
request) of their uncached prompt tokens, in admission order; a prompt longer than that budget is
prefilled in chunks over several iterations (chunked context), and its last chunk produces its
first token. Prefill and decode share the iteration, as in TensorRT-LLM, so a newcomer's prefill
slows every running stream. An iteration with ``b`` generating requests and ``n`` context tokens
lasts::

    decode(b)   = token_delay + token_delay_per_request * (b - 1)      (0 when b == 0)
    fixed       = max(0, first_token_delay - 128 * prefill_per_token)  (one pass over the weights)
    iteration   = max(decode(b), fixed if n else 0) + n * prefill_per_token

with ``prefill_per_token = prefill_per_1k_tokens / 1000``: a forward pass pays its fixed cost
once, whether it decodes, prefills or both, and each prompt token adds compute. Every duration is
divided by ``speed_factor`` (10 models a GPU ten times faster).

**Calibration** (defaults; Llama-3.1-8B on one H100, figures in shared/briefs/trtllm-triton.md):

- batch-1 time to first token = ``fixed + n * prefill_per_token``: 7.0 ms at 128 prompt tokens
  and 36.0 ms at 2048 (the published 7 and 36 ms) with ``first_token_delay`` = 7 ms and
  ``prefill_per_1k_tokens`` = (36 - 7) / 1.92 = 15.1 ms, so ``fixed`` = 5.07 ms;
- time per output token ``token_delay`` = 7 ms at batch 1; ``token_delay_per_request`` = 16 us
  is fitted so that 256 streams of 128-in/128-out requests see about 15 ms per output token when
  their arrivals are spread out: each iteration then decodes ~252 requests (11.0 ms) and
  prefills ~2 newcomers (254 tokens, 3.8 ms). Time per output token thus rises from 7.0 ms at 1
  stream through 7.2 at 16 and 8.0 at 64 to 13-15 ms at 256 (13.0 ms when the streams run in
  lockstep, as in ``python -m bench engine``'s closed loop, where most prefill lands in the time
  to first token instead); the brief's "about 7 ms at small batches, rising toward about 15 ms
  near 256 concurrent";
- output throughput at 256 streams is then 256 / 15 ms, about 16-17k tokens/s (16.4-17.0k in the
  benchmark): the order of the published 28,312 tokens/s for 128/128 on H100 FP8 at saturation,
  which runs batches larger than 256 (the linear model's decode ceiling,
  1 / token_delay_per_request, is 62k tokens/s);
- a burst of 95 simultaneous 128-token prompts needs two iterations of at most ``max_num_tokens``
  = 8192 tokens (TensorRT-LLM's default): first tokens after 129 ms and 197 ms, near the
  published TTFT p50 160 ms / p99 232 ms at about 95 concurrent (BF16). The published time per
  output token there is 7.6 ms (BF16, another build); the model gives 9.0 ms.

**KV cache.** ``kv_blocks`` blocks of ``tokens_per_block`` tokens. An admitted request reserves
the blocks for its whole sequence, is given its prompt's blocks at once and one more each time its
generated tokens fill a block. With ``enable_block_reuse`` (TensorRT-LLM's flag of that name),
each full block of a prompt is identified by a hash chained over the prompt's text up to the end
of that block; once a request's context is computed its full prompt blocks enter the prefix
cache. A later request whose prompt starts with the same blocks shares them (while their owners
still run) or takes them back from the free list, which keeps freed cached blocks in LRU order
(leaf blocks first, so a prefix outlives its continuations), evicted only when a fresh block is
needed. Shared blocks cost no prefill and count as ``reusedBlocks``; the prompt's other blocks
as ``missedBlocks``. At least one prompt token is always computed (its logits give the first
token), so a prompt that is a whole number of blocks reuses all but its last block.

**Text.** Words from a fixed vocabulary, one per token, drawn by a PRNG seeded from the SHA-256
of the canonical (prompt, temperature, top_p, top_k, seed), so a deterministic request (greedy
or seeded) always gets the same text; otherwise fresh randomness. Each request has a natural
answer length drawn the same way: reaching it finishes with "stop", reaching ``max_tokens``
first with "length". Stop strings end the text before their first occurrence, even when it spans
tokens (text that may begin a stop string is held back until it cannot).

**Continuation.** A request with a ``continuation`` (text already produced for it) reads the
prompt followed by it and streams what comes after. When the continuation is the start of the
answer the simulator gives the request without it (a deterministic request, which is what a
failed-over stream sends), the simulator replays its PRNG over those words and goes on from
there, so the text is exactly the rest of that answer, with the same natural length; a
continuation cut inside a word resumes with the rest of the word. Any other continuation starts a
fresh answer seeded from the prompt and the continuation together. ``max_tokens`` and the
completion tokens count only the new tokens; the prompt tokens include the continuation.

**Load.** :meth:`SimEngine.iteration_stats` reports TensorRT-LLM's iteration statistics
(``numActiveRequests``, ``kvCacheStats``, ``inflightBatchingStats``, ...); :meth:`SimEngine.load`
is derived from the same state. **Prompt tokens** are ``ceil(len(prompt) / 4)``.
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
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import structlog

from worker.engines._base import (
    Completion,
    EngineError,
    EngineInfo,
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    Outbox,
    OutboxEngine,
    wait_event,
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
    """How the simulated engine behaves (defaults: Llama-3.1-8B on one H100; module docstring)."""

    model: str = "sim-llama-3.1-8b"
    model_version: str = "sim-1"
    #: Most requests running at once (max batch size).
    capacity: int = 64
    #: Largest prompt accepted, in tokens (reported in :class:`EngineInfo`).
    max_prompt_tokens: int = 32_768
    #: Prefill time of a 128-token prompt alone: the batch-1 time to first token.
    first_token_delay: timedelta = timedelta(milliseconds=7)
    #: Prefill time per 1000 uncached prompt tokens (the slope of time to first token).
    prefill_per_1k_tokens: timedelta = timedelta(milliseconds=15.1)
    #: Duration of one decode iteration at batch size 1.
    token_delay: timedelta = timedelta(milliseconds=7)
    #: What each further generating request adds to a decode iteration.
    token_delay_per_request: timedelta = timedelta(microseconds=16)
    #: Most tokens (context chunks plus one per generating request) in one iteration.
    max_num_tokens: int = 8192
    #: Divides every delay: 10 runs ten times faster than the calibrated GPU.
    speed_factor: float = 1.0
    #: KV cache size, in blocks.
    kv_blocks: int = 8192
    #: Tokens per KV cache block.
    tokens_per_block: int = 32
    #: Share the KV blocks of identical prompt prefixes (no prefill for them).
    enable_block_reuse: bool = True
    #: Shortest and longest natural answer, in tokens.
    min_answer_tokens: int = 32
    max_answer_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity: must be >= 1 (got {self.capacity})")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: must be >= 1 (got {self.max_prompt_tokens})")
        if self.max_num_tokens < 1:
            raise ValueError(f"max_num_tokens: must be >= 1 (got {self.max_num_tokens})")
        if not (math.isfinite(self.speed_factor) and self.speed_factor > 0):
            raise ValueError(f"speed_factor: must be > 0 (got {self.speed_factor})")
        for name in (
            "first_token_delay",
            "prefill_per_1k_tokens",
            "token_delay",
            "token_delay_per_request",
        ):
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


def text_rng(request: EngineRequest, *, continuation: str = "") -> random.Random:
    """The PRNG that writes a request's answer: seeded from the request when deterministic.

    Greedy decoding (temperature 0) picks the most likely token whatever the seed, top_p and
    top_k say, as a real engine does, so the answer then depends on the prompt alone. A
    ``continuation`` given here (one that is not the start of the request's own answer) enters
    the seed; the request's own ``continuation`` does not.
    """
    s = request.sampling
    if s.temperature > 0 and s.seed is None:
        return random.Random()  # seeded from os.urandom: a fresh answer every time
    sampled = s.temperature > 0
    doc: dict[str, object] = {
        "prompt": request.prompt,
        "temperature": s.temperature,
        "top_p": s.top_p if sampled else None,
        "top_k": s.top_k if sampled else None,
        "seed": s.seed if sampled else None,
    }
    if continuation:
        doc["continuation"] = continuation
    canonical = json.dumps(
        doc,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return random.Random(int.from_bytes(hashlib.sha256(canonical.encode()).digest()))


def prefix_block_keys(prompt: str, tokens_per_block: int) -> list[bytes]:
    """The prefix-cache key of each full KV block of ``prompt``, in order.

    Key ``i`` hashes the text of blocks ``0..i``, so two prompts share key ``i`` exactly when
    their first ``i + 1`` blocks are the same.
    """
    chars = tokens_per_block * CHARS_PER_TOKEN
    keys: list[bytes] = []
    key = b""
    for start in range(0, len(prompt) - chars + 1, chars):
        key = hashlib.blake2b(key + prompt[start : start + chars].encode(), digest_size=16).digest()
        keys.append(key)
    return keys


class _Block:
    """One KV cache block: shared by ``refs`` running requests; ``key`` once it is cached."""

    __slots__ = ("key", "refs")

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.refs = 1


class _Live(Outbox):
    """A request inside the simulator, from submission to completion."""

    __slots__ = (
        "answer_tokens",
        "blocks",
        "context_left",
        "continued",
        "generated",
        "held",
        "id",
        "lead",
        "max_stop_chars",
        "max_tokens",
        "prefix_keys",
        "prompt_tokens",
        "request",
        "reserved",
        "rng",
        "scheduled_at",
        "sentence_start",
        "stop",
        "submitted_at",
    )

    def __init__(self, request: EngineRequest, settings: SimSettings) -> None:
        super().__init__()
        self.request = request
        self.id = request.request_id
        self.prompt_tokens = count_tokens(request.input_text)
        self.max_tokens = request.sampling.max_tokens
        self.stop = request.sampling.stop
        self.max_stop_chars = max((len(s) for s in self.stop), default=0)
        self.rng = text_rng(request)
        self.answer_tokens = self.rng.randint(
            settings.min_answer_tokens, settings.max_answer_tokens
        )
        self.prefix_keys = (
            prefix_block_keys(request.input_text, settings.tokens_per_block)
            if settings.enable_block_reuse
            else []
        )
        #: KV blocks of the sequence so far: shared prefix blocks first, then its own.
        self.blocks: list[_Block] = []
        #: Blocks reserved for this request's future tokens and not yet taken.
        self.reserved = 0
        #: Prompt tokens still to prefill (set at admission, 0 in the generation phase).
        self.context_left = 0
        self.submitted_at = time.monotonic()
        self.scheduled_at: float | None = None
        self.generated = 0
        #: Generated text not yet handed over (it may begin a stop string).
        self.held = ""
        self.sentence_start = True
        #: What goes before the next word: nothing at the very start of the answer.
        self.lead = ""
        #: Tokens of the answer already in the continuation (not counted as generated).
        self.continued = 0
        if request.continuation:
            self._resume(request, settings)

    def _resume(self, request: EngineRequest, settings: SimSettings) -> None:
        """Go on after the request's continuation (see "Continuation" in the module docstring)."""
        continuation = request.continuation
        s = request.sampling
        if s.temperature == 0 or s.seed is not None:
            text = ""
            while len(text) < len(continuation) and continuation.startswith(text):
                text += self.next_word()
                self.continued += 1
            if text.startswith(continuation):
                self.held = text[len(continuation) :]  # the rest of a word cut in two
                return
        # Not this request's own answer: a fresh one after it, deterministic when the request is.
        self.rng = text_rng(request, continuation=continuation)
        self.continued = len(continuation.split())
        self.answer_tokens = self.continued + self.rng.randint(
            settings.min_answer_tokens, settings.max_answer_tokens
        )
        tail = continuation.rstrip()
        self.sentence_start = not tail or tail.endswith((".", "!", "?"))
        self.lead = "" if continuation[-1].isspace() else " "

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
        lead, self.lead = self.lead, " "
        return lead + word

    def send(self, text: str) -> None:
        """Hand ``text`` to the consumer."""
        if text:
            self.pending.append(text)
            self.wake.set()


@dataclass(frozen=True, slots=True)
class _Plan:
    """One iteration: who decodes, who prefills how many tokens, and how long it lasts."""

    generating: list[_Live]
    context: list[tuple[_Live, int]]
    context_tokens: int
    duration: float


class SimEngine(OutboxEngine[_Live]):
    """The simulated engine (see the module docstring). Implements :class:`Engine`."""

    def __init__(self, settings: SimSettings | None = None) -> None:
        self.settings = s = settings or SimSettings()
        speed = s.speed_factor
        self._token_delay = s.token_delay.total_seconds() / speed
        self._token_delay_per_request = s.token_delay_per_request.total_seconds() / speed
        self._prefill_per_token = s.prefill_per_1k_tokens.total_seconds() / 1000 / speed
        self._first_token_delay = s.first_token_delay.total_seconds() / speed
        self._prefill_fixed = max(
            0.0, self._first_token_delay - REFERENCE_PROMPT_TOKENS * self._prefill_per_token
        )
        self._queue: collections.deque[_Live] = collections.deque()
        #: Admitted requests, in admission order.
        self._running: dict[str, _Live] = {}
        self._live: dict[str, _Live] = {}
        # KV cache: blocks in use (refs > 0), blocks reserved by running requests for later,
        # and the prefix cache (every keyed block) with its free, evictable part in LRU order.
        self._used_blocks = 0
        self._reserved_blocks = 0
        self._cached: dict[bytes, _Block] = {}
        self._evictable: collections.OrderedDict[bytes, _Block] = collections.OrderedDict()
        self._reused_total = 0
        self._missed_total = 0
        self._alloc_new_total = 0
        # Iterations so far and the one running now (or the last one), for iteration_stats().
        self._iterations = 0
        self._simulated_s = 0.0
        self._last_iteration_s = 0.0
        self._scheduled = (0, 0, 0)  # context requests, generating requests, context tokens
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
            tokens_per_block=s.tokens_per_block,
            block_reuse=s.enable_block_reuse,
            token_delay_ms=round(self._token_delay * 1000, 3),
            token_delay_at_capacity_ms=round(self.decode_step_s(s.capacity) * 1000, 3),
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
        return await wait_event(self._load_changed, timeout)

    def info(self) -> EngineInfo:
        s = self.settings
        return EngineInfo(
            engine="sim",
            model=s.model,
            model_version=s.model_version,
            capacity=s.capacity,
            max_prompt_tokens=s.max_prompt_tokens,
        )

    # -- the timing model and statistics -------------------------------------------------------

    def decode_step_s(self, generating: int) -> float:
        """Seconds of a decode iteration with ``generating`` requests (speed_factor applied)."""
        if generating <= 0:
            return 0.0
        return self._token_delay + self._token_delay_per_request * (generating - 1)

    def iteration_s(self, generating: int, context_tokens: int) -> float:
        """Seconds of an iteration that decodes ``generating`` requests and prefills
        ``context_tokens`` prompt tokens (speed_factor applied; see the module docstring)."""
        decode = self.decode_step_s(generating)
        if context_tokens <= 0:
            return decode
        return max(decode, self._prefill_fixed) + context_tokens * self._prefill_per_token

    @property
    def simulated_seconds(self) -> float:
        """Busy time of the simulated GPU so far: the sum of every finished iteration's modelled
        duration (speed_factor applied). Free of the host's scheduling delays; idle time does not
        count."""
        return self._simulated_s

    def iteration_stats(self) -> dict[str, Any]:
        """The load now, keyed as TensorRT-LLM's per-iteration statistics (``LLM.get_stats``).

        ``inflightBatchingStats`` and ``iterLatencyMS`` describe the iteration running now (the
        last one when idle; zeros once nothing runs); ``reusedBlocks``, ``missedBlocks`` and
        ``cacheHitRate`` count every admission so far.
        """
        s = self.settings
        context_requests, generating, context_tokens = self._scheduled
        reused, missed = self._reused_total, self._missed_total
        return {
            "iter": self._iterations,
            "iterLatencyMS": self._last_iteration_s * 1000,
            "numActiveRequests": len(self._running),
            "numQueuedRequests": len(self._queue),
            "maxNumActiveRequests": s.capacity,
            "maxBatchSizeRuntime": s.capacity,
            "kvCacheStats": {
                "maxNumBlocks": s.kv_blocks,
                "freeNumBlocks": s.kv_blocks - self._used_blocks,
                "usedNumBlocks": self._used_blocks,
                "tokensPerBlock": s.tokens_per_block,
                "allocTotalBlocks": self._alloc_new_total + reused,
                "allocNewBlocks": self._alloc_new_total,
                "reusedBlocks": reused,
                "missedBlocks": missed,
                "cacheHitRate": reused / (reused + missed) if reused + missed else 0.0,
            },
            "inflightBatchingStats": {
                "numScheduledRequests": context_requests + generating,
                "numContextRequests": context_requests,
                "numGenRequests": generating,
                "numPausedRequests": 0,
                "numCtxTokens": context_tokens,
            },
        }

    # -- requests ------------------------------------------------------------------------------

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
            self._release_blocks(live)
            if not self._running:
                self._scheduled = (0, 0, 0)
        else:
            with contextlib.suppress(ValueError):
                self._queue.remove(live)
        del self._live[live.id]
        if reason in ("stop", "length"):
            live.send(live.held)
        live.held = ""
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

    def _expire(self, now: float) -> None:
        for live in list(self._live.values()):
            deadline = live.request.deadline
            if deadline is not None and now >= deadline:
                self._finish(live, "timeout")

    # -- KV cache ------------------------------------------------------------------------------

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.settings.tokens_per_block)

    def _cached_prefix(self, live: _Live) -> list[_Block]:
        """The blocks of ``live``'s prompt prefix in the cache (at least one token left over)."""
        reusable = (live.prompt_tokens - 1) // self.settings.tokens_per_block
        found: list[_Block] = []
        for key in live.prefix_keys[:reusable]:
            block = self._cached.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def _try_admit(self, live: _Live) -> bool:
        """Give ``live`` its blocks if the cache can hold its whole sequence."""
        kv_blocks = self.settings.kv_blocks
        prefix = self._cached_prefix(live)
        revived = sum(1 for block in prefix if block.refs == 0)
        # A sequence longer than the whole cache is clamped to it (it then runs alone).
        needed = max(0, min(kv_blocks, self._blocks_for(live.prompt_tokens + live.max_tokens)))
        fresh = max(0, needed - len(prefix))
        if self._used_blocks + self._reserved_blocks + revived + fresh > kv_blocks:
            return False
        for key, block in zip(live.prefix_keys, prefix, strict=False):
            if block.refs == 0:
                del self._evictable[key]
                self._used_blocks += 1
            block.refs += 1
        live.blocks = prefix
        live.reserved = fresh
        self._reserved_blocks += fresh
        prompt_blocks = self._blocks_for(live.prompt_tokens)
        self._reused_total += len(prefix)
        self._missed_total += prompt_blocks - len(prefix)
        live.context_left = live.prompt_tokens - len(prefix) * self.settings.tokens_per_block
        self._take_blocks(live, prompt_blocks - len(prefix))
        return True

    def _take_blocks(self, live: _Live, count: int) -> None:
        """Move ``count`` of ``live``'s reserved blocks into use, evicting cached ones (LRU)."""
        count = min(count, live.reserved)
        if count <= 0:
            return
        live.reserved -= count
        self._reserved_blocks -= count
        self._used_blocks += count
        self._alloc_new_total += count
        overflow = self._used_blocks + len(self._evictable) - self.settings.kv_blocks
        for _ in range(max(0, overflow)):
            key, _block = self._evictable.popitem(last=False)
            del self._cached[key]
        live.blocks.extend(_Block() for _ in range(count))

    def _cache_prompt_blocks(self, live: _Live) -> None:
        """Offer ``live``'s computed full prompt blocks to later requests."""
        for key, block in zip(live.prefix_keys, live.blocks, strict=False):
            if block.key is None and key not in self._cached:
                block.key = key
                self._cached[key] = block

    def _release_blocks(self, live: _Live) -> None:
        """Give back ``live``'s blocks; cached ones stay reusable until evicted (leaves first)."""
        self._reserved_blocks -= live.reserved
        live.reserved = 0
        for block in reversed(live.blocks):
            block.refs -= 1
            if block.refs == 0:
                self._used_blocks -= 1
                if block.key is not None:
                    self._evictable[block.key] = block
        live.blocks = []

    # -- the batch loop ------------------------------------------------------------------------

    def _admit(self, now: float) -> None:
        """Move queued requests into the batch while slots and KV blocks allow (strict FIFO)."""
        capacity = self.settings.capacity
        admitted = False
        while self._queue and len(self._running) < capacity:
            live = self._queue[0]
            if not self._try_admit(live):
                break  # head-of-line waits for KV blocks, as GUARANTEED_NO_EVICT does
            self._queue.popleft()
            live.scheduled_at = now
            self._running[live.id] = live
            admitted = True
        if admitted:
            self._notify_load()

    def _plan(self) -> _Plan:
        """Who runs in the next iteration: every generating request, and context chunks in
        admission order within what ``max_num_tokens`` leaves."""
        generating = [live for live in self._running.values() if live.context_left == 0]
        budget = self.settings.max_num_tokens - len(generating)
        context: list[tuple[_Live, int]] = []
        tokens = 0
        for live in self._running.values():
            if budget <= 0:
                break
            if live.context_left > 0:
                chunk = min(live.context_left, budget)
                context.append((live, chunk))
                tokens += chunk
                budget -= chunk
        return _Plan(generating, context, tokens, self.iteration_s(len(generating), tokens))

    async def _run(self) -> None:
        """Step the batch, one iteration after another, each lasting its modelled time."""
        next_at = time.monotonic()
        while True:
            if not self._running and not self._queue:
                self._work.clear()
                await self._work.wait()
                next_at = time.monotonic()
            now = time.monotonic()
            self._expire(now)
            self._admit(now)
            plan = self._plan()
            if not plan.generating and not plan.context:
                continue  # everything ended (expired): wait for work at the top
            self._scheduled = (len(plan.context), len(plan.generating), plan.context_tokens)
            # Keep a steady cadence despite sleep overshoot, but never burst to catch up.
            start = next_at if next_at >= now - plan.duration else now
            next_at = start + plan.duration
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            self._iterations += 1
            self._simulated_s += plan.duration
            self._last_iteration_s = plan.duration
            self._step(plan)

    def _step(self, plan: _Plan) -> None:
        """Apply an iteration: a token for each generating request, context chunks done."""
        for live in plan.generating:
            if live.done is None:
                self._produce_token(live)
        for live, chunk in plan.context:
            if live.done is not None:
                continue
            live.context_left -= chunk
            if live.context_left == 0:
                self._cache_prompt_blocks(live)
                self._produce_token(live)  # the last context chunk yields the first token

    def _produce_token(self, live: _Live) -> None:
        if live.continued >= live.answer_tokens:  # the continuation held the whole answer
            self._finish(live, "stop")
            return
        word = live.next_word()
        live.generated += 1
        tokens = live.prompt_tokens + live.generated
        if tokens > len(live.blocks) * self.settings.tokens_per_block:
            self._take_blocks(live, 1)
        if live.stop:
            held = live.held + word
            at = self._find_stop(live, held)
            if at >= 0:
                live.send(held[:at])
                live.held = ""
                self._finish(live, "stop")
                return
            keep = live.max_stop_chars - 1  # what could still begin a stop string
            if len(held) > keep:
                live.send(held[: len(held) - keep])
                held = held[len(held) - keep :]
            live.held = held
        else:
            live.send(live.held + word)  # held: the rest of a word the continuation cut
            live.held = ""
        if live.continued + live.generated >= live.answer_tokens:
            self._finish(live, "stop")
        elif live.generated >= live.max_tokens:
            self._finish(live, "length")

    @staticmethod
    def _find_stop(live: _Live, text: str) -> int:
        """Index of the earliest stop string in ``text`` (held text plus the new word), or -1.

        Held text never contains a whole stop string, so only occurrences ending in the new
        word can be found, and the earliest of them is the first in the whole answer.
        """
        found = -1
        for stop in live.stop:
            at = text.find(stop)
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


__all__ = ["SimEngine", "SimSettings", "count_tokens", "prefix_block_keys", "text_rng"]
