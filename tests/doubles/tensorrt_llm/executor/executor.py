"""``tensorrt_llm.executor.executor``: the double's in-flight batching executor.

Upstream runs the model in background threads or processes; the double runs one asyncio task on
the event loop of the first request. Every ``step_delay_s`` it admits waiting requests (FIFO, up
to ``max_batch_size``), gives every running request one token, streams tokens to each result
every ``stream_interval`` tokens (or once, at the end, when not streaming), and records one
iteration-stats dict with upstream's keys.

Text is deterministic: words drawn by a PRNG seeded from the prompt token ids and, when the
request samples, its seed (upstream uses seed 0 when none is given, so unseeded sampling repeats
itself too). Each request has a natural length in ``[min_answer_tokens, max_answer_tokens]``
words, after which it emits the end-of-sequence token and finishes with ``"stop"`` (the EOS
token is in ``token_ids``, not in ``text``), unless ``max_tokens`` comes first (``"length"``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import math
import random
import sys
import time
from typing import TYPE_CHECKING, Any

from .result import FinishReason, GenerationResult, IterationResult, Response
from .utils import RequestError

if TYPE_CHECKING:
    from ..llmapi.llm import BaseLLM

WORDS = (
    "alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "light", "north", "quiet",
    "amber", "cedar", "ember", "frost", "grove", "harbor", "island", "jade", "kettle", "lantern",
    "meadow", "nickel", "orchard", "pebble", "quartz", "raven", "saddle", "timber", "umber",
    "valley", "willow", "yarrow", "zephyr", "anchor", "bramble", "copper", "dune", "fable",
    "garnet", "heron", "ivory", "juniper", "kestrel", "lilac", "maple", "nectar", "opal",
    "prairie",
)  # fmt: skip


class _Sequence:
    """One request inside the executor."""

    def __init__(
        self, result: GenerationResult, word_ids: list[int], end_id: int, answer_tokens: int
    ) -> None:
        sp = result.sampling_params
        self.result = result
        self.word_ids = word_ids
        self.end_id = end_id
        self.max_tokens = sp.max_tokens
        self.ignore_eos = sp.ignore_eos
        self.answer_tokens = answer_tokens
        self.rng = random.Random(_seed(result))
        self.generated = 0
        #: Iterations left in the context phase (prefill) before the first token.
        self.context_steps = 0
        self.scheduled = False
        self.buffer: list[int] = []

    def next_token(self) -> tuple[int, FinishReason | None]:
        finish: FinishReason | None = None
        if self.generated == self.answer_tokens and not self.ignore_eos:
            token, finish = self.end_id, "stop"
        else:
            token = self.word_ids[self.rng.randrange(len(self.word_ids))]
        self.generated += 1
        if finish is None and self.generated >= self.max_tokens:
            finish = "length"
        return token, finish


def _seed(result: GenerationResult) -> int:
    sp = result.sampling_params
    how = "greedy" if sp._greedy_decoding else f"seed={sp.seed or 0}"
    key = json.dumps([result.prompt_token_ids, how]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8])


class GenerationExecutor:
    """Schedules and runs the requests of one ``LLM`` (see the module docstring)."""

    def __init__(
        self,
        *,
        owner: BaseLLM,
        tokenizer: Any,
        max_batch_size: int,
        max_num_tokens: int,
        tokens_per_block: int,
        kv_blocks: int,
        stream_interval: int,
        stats_enabled: bool,
    ) -> None:
        self._owner = owner
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.tokens_per_block = tokens_per_block
        self.kv_blocks = kv_blocks
        self.stream_interval = stream_interval
        self.stats_enabled = stats_enabled
        self.doing_shutdown = False
        self._last_client_id = 1
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._running: dict[int, _Sequence] = {}
        self._by_id: dict[int, _Sequence] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._work: asyncio.Event | None = None
        self._iter_stats_result: IterationResult | None = None
        self._iteration = 0
        #: Every result submitted, in order (for tests to inspect).
        self.results: list[GenerationResult] = []
        #: Every request id ``abort_request`` was called with.
        self.aborted_request_ids: list[int] = []
        #: The most recent iteration-stats dict recorded.
        self.last_stats: dict[str, Any] | None = None

    @property
    def stats_as_json_strings(self) -> bool:
        return self._owner.stats_as_json_strings

    def is_shutdown(self) -> bool:
        return self.doing_shutdown

    def next_request_id(self) -> int:
        self._last_client_id = (self._last_client_id + 1) & ((1 << 64) - 1)
        return self._last_client_id

    def submit(self, result: GenerationResult) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("the TensorRT-LLM double needs a running asyncio loop") from None
        if self._loop is None:
            self._loop = loop
            self._work = asyncio.Event()
            self._task = loop.create_task(self._run(), name="tensorrt-llm-double-executor")
        self._maybe_initialize_iteration_results()
        owner = self._owner
        lo, hi = owner.min_answer_tokens, owner.max_answer_tokens
        tok = self.tokenizer
        word_ids = [tok.piece_id(" " + w) for w in WORDS]
        end_id = result.sampling_params.end_id
        seq = _Sequence(
            result,
            word_ids,
            tok.eos_token_id if end_id is None else end_id,
            random.Random(_seed(result) ^ 0x5EED).randint(lo, hi),
        )
        self._by_id[result.request_id] = seq
        self._waiting.append(seq)
        self.results.append(result)
        assert self._work is not None
        self._work.set()

    def abort_request(self, request_id: int) -> None:
        self.aborted_request_ids.append(request_id)
        print(f"[TensorRT-LLM double] abort request {request_id}", file=sys.stderr, flush=True)
        seq = self._by_id.pop(request_id, None)
        if seq is None:
            return  # finished already: nothing to cancel
        if self._running.pop(request_id, None) is None:
            self._waiting.remove(seq)
        seq.result._deliver(Response(seq.buffer, "cancelled", True))
        seq.buffer = []

    def shutdown(self) -> None:
        if self.doing_shutdown:
            return
        self.doing_shutdown = True
        print("[TensorRT-LLM double] shutdown", file=sys.stderr, flush=True)
        task, loop = self._task, self._loop
        if task is None or loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            task.cancel()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(task.cancel)

    def aget_stats(self, timeout: float | None) -> Any:
        if self._iter_stats_result is None:
            from .result import empty_async_iterable

            return empty_async_iterable()
        self._iter_stats_result.set_timeout(timeout)
        return self._iter_stats_result

    def get_stats(self, timeout: float | None) -> list[dict[str, Any]]:
        if self._iter_stats_result is None:
            return []
        self._iter_stats_result.set_timeout(timeout)
        return self._iter_stats_result.get_results()

    # -- internals -----------------------------------------------------------------------------

    def _maybe_initialize_iteration_results(self) -> None:
        if self._iter_stats_result is None:
            self._iter_stats_result = IterationResult(self)
        else:
            self._iter_stats_result.mark_undone()

    def _raise_stats_failure(self) -> None:
        failure = self._owner.fail_next_stats
        if failure is not None:
            self._owner.fail_next_stats = None
            raise failure

    async def _run(self) -> None:
        assert self._work is not None
        while True:
            if not self._waiting and not self._running:
                self._work.clear()
                await self._work.wait()
                continue
            await asyncio.sleep(self._owner.step_delay_s)
            self._step()

    def _step(self) -> None:
        started = time.monotonic()
        failure = self._owner.fail_next_step
        if failure is not None:
            self._owner.fail_next_step = None
            self._fail_all(failure)
            return
        context_requests = context_tokens = 0
        while self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting.popleft()
            seq.scheduled = True
            seq.context_steps = self._owner.context_steps
            self._running[seq.result.request_id] = seq
            context_requests += 1
            context_tokens += len(seq.result.prompt_token_ids)
        scheduled = len(self._running)
        used_blocks = 0
        completed = 0
        for request_id, seq in list(self._running.items()):
            used_blocks += math.ceil(
                (len(seq.result.prompt_token_ids) + seq.generated + 1) / self.tokens_per_block
            )
            if seq.context_steps > 0:
                seq.context_steps -= 1
                continue
            token, finish = seq.next_token()
            seq.buffer.append(token)
            streaming = seq.result._streaming
            if finish is not None or (streaming and len(seq.buffer) >= self.stream_interval):
                seq.result._deliver(Response(seq.buffer, finish, finish is not None))
                seq.buffer = []
            if finish is not None:
                del self._running[request_id]
                del self._by_id[request_id]
                completed += 1
        self._record_stats(
            scheduled=scheduled,
            completed=completed,
            used_blocks=min(used_blocks, self.kv_blocks),
            context_requests=context_requests,
            context_tokens=context_tokens,
            latency_ms=(time.monotonic() - started) * 1000 + self._owner.step_delay_s * 1000,
        )

    def _fail_all(self, failure: BaseException) -> None:
        for seq in [*self._running.values(), *self._waiting]:
            seq.result._deliver(failure)
        self._running.clear()
        self._waiting.clear()
        self._by_id.clear()
        if not isinstance(failure, RequestError):
            # Upstream shuts the executor down on a serious background error.
            self.doing_shutdown = True

    def _record_stats(
        self,
        *,
        scheduled: int,
        completed: int,
        used_blocks: int,
        context_requests: int,
        context_tokens: int,
        latency_ms: float,
    ) -> None:
        self._iteration += 1
        stats: dict[str, Any] = {
            "iter": self._iteration,
            "iterLatencyMS": latency_ms,
            "newActiveRequestsQueueLatencyMS": 0.0,
            "timestamp": time.strftime("%m-%d-%Y %H:%M:%S"),
            "numActiveRequests": scheduled,
            "numQueuedRequests": len(self._waiting),
            "numCompletedRequests": completed,
            "maxNumActiveRequests": self.max_batch_size,
            "maxBatchSizeStatic": self.max_batch_size,
            "maxBatchSizeTunerRecommended": self.max_batch_size,
            "maxBatchSizeRuntime": self.max_batch_size,
            "maxNumTokensStatic": self.max_num_tokens,
            "maxNumTokensTunerRecommended": self.max_num_tokens,
            "maxNumTokensRuntime": self.max_num_tokens,
            "gpuMemUsage": 1 << 30,
            "cpuMemUsage": 0,
            "pinnedMemUsage": 0,
            "kvCacheStats": {
                "maxNumBlocks": self.kv_blocks,
                "freeNumBlocks": self.kv_blocks - used_blocks,
                "usedNumBlocks": used_blocks,
                "tokensPerBlock": self.tokens_per_block,
                "allocTotalBlocks": used_blocks,
                "allocNewBlocks": 0,
                "reusedBlocks": 0,
                "missedBlocks": 0,
                "cacheHitRate": 0.0,
            },
            "inflightBatchingStats": {
                "numScheduledRequests": scheduled,
                "numContextRequests": context_requests,
                "numGenRequests": scheduled - context_requests,
                "numPausedRequests": 0,
                "numCtxTokens": context_tokens,
                "microBatchId": 0,
                "avgNumDecodedTokensPerIter": 1.0,
            },
        }
        self.last_stats = stats
        if self.stats_enabled and self._iter_stats_result is not None:
            self._iter_stats_result.put(json.dumps(stats))


__all__ = ["WORDS", "GenerationExecutor"]
