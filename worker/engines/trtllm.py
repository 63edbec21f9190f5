"""The ``trtllm`` engine: TensorRT-LLM in-process, through its ``LLM`` API (TensorRT-LLM 1.x).

How the engine drives TensorRT-LLM::

    start()     LLM(model, tokenizer, tensor_parallel_size, dtype, max_batch_size=capacity,
                    max_num_tokens, max_seq_len, kv_cache_config=KvCacheConfig(...),
                    enable_iter_perf_stats=True, stream_interval)     in a thread: loads weights
    generate()  llm.generate_async(prompt, SamplingParams(max_tokens=..., ...), streaming=True)
                  └─ a pump task per request iterates the RequestOutput (one object, mutated at
                     each step) and wakes the caller's generator, which streams new text
    abort()     RequestOutput.abort(); at EngineRequest.deadline a timer does the same
    load()      a background task drains llm.get_stats_async(): one stats dict per iteration
    stop()      abort what is live, then llm.shutdown() in a thread

**Backends.** ``tensorrt_llm.LLM`` is the PyTorch backend: it loads a Hugging Face checkpoint
(a pre-quantized ModelOpt checkpoint included) and refuses the TensorRT backend's arguments,
``quant_config`` among them. Quantizing an unquantized checkpoint (``trtllm_quantization``), a
TensorRT-LLM checkpoint and a built engine directory need the TensorRT backend,
``tensorrt_llm._tensorrt_engine.LLM``, which takes ``quant_config=QuantConfig(quant_algo=...)``
but not ``enable_iter_perf_stats`` or ``stream_interval`` (it keeps iteration stats anyway).
:func:`backend_for` picks one.

**What the engine reports, and why:**

- *Text.* ``outputs[0].text`` is cumulative; the engine streams what is new since the last
  delta (what ``text_diff`` holds, but robust to steps it coalesced).
- *Stop strings* are TensorRT-LLM's (``SamplingParams.stop``; the text excludes them). It
  notices a stop string only once it is complete in the text, after streaming the beginning of
  one that spans tokens, so the engine holds back a tail of text that could begin a stop string
  until it cannot, and cuts at a stop string itself should one ever get through.
- *Continuation.* The prompt given to ``generate_async`` is the request's prompt followed by its
  continuation; TensorRT-LLM's output text holds only what it generates after it.
- *Token counts.* ``prompt_tokens`` is ``len(prompt_token_ids)``; ``completion_tokens`` is
  ``len(outputs[0].token_ids)``, which includes the end-of-sequence token when the model ended
  by itself (the text does not show it): generating it took a decode step like any other.
- *Queue time.* TensorRT-LLM reports none per request unless perf metrics are on, so
  ``queue_s`` is the time from submission to the first output: the wait for a batch slot plus the
  prefill of the first streamed step, an upper bound on the queueing.
- *Seeds.* TensorRT-LLM samples with seed 0 when none is given, so every unseeded sampled
  request would get the same text; a request that samples (temperature > 0) without a seed gets
  a fresh random seed, as the engine contract expects.
- *Load.* From the latest iteration stats (``get_stats_async(timeout)`` returns an async
  iterable of dicts, or JSON strings in some versions, that ends when no iteration came within
  the timeout), bounded by the requests this engine has live (stats stop arriving when
  TensorRT-LLM idles, so the last ones are stale): ``numActiveRequests``,
  ``numQueuedRequests`` plus requests submitted since, ``maxNumActiveRequests`` (else
  ``maxBatchSizeRuntime``, else the configured capacity) and KV blocks used / max.

**Failures.** A request's own failure is that request's error, :class:`RequestFailed`, and
leaves the engine healthy: ``generate_async`` raising ``ValueError`` or ``TypeError`` (a request
TensorRT-LLM refuses, e.g. longer than ``max_num_tokens``: INVALID_ARGUMENT), and
``RequestError`` while streaming (INTERNAL; ``tensorrt_llm/executor/result.py`` raises it for a
response whose ``has_error()`` is true, with the executor's ``error_msg``, for that request
alone). Anything else (``RuntimeError`` after a shutdown, an error from the executor, the stats
stream dying) means the engine failed: every request in flight gets :class:`EngineError` and
:meth:`load` reports ``healthy=False`` from then on.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import math
import secrets
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from llmmesh.errors import RequestFailed
from llmmesh.validation import Sampling
from worker.engines._base import (
    Completion,
    EngineError,
    EngineInfo,
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    TextDelta,
)

if TYPE_CHECKING:
    from worker._config import WorkerConfig

log = structlog.get_logger(__name__)

ENGINE = "trtllm"
#: Token estimate (characters per token) when no tokenizer is loaded.
CHARS_PER_TOKEN = 4
INSTALL_HINT = (
    "install the `trtllm` extra on a GPU node: pip install 'llm-mesh[trtllm]' "
    "(TensorRT-LLM's wheels come from NVIDIA's index, https://pypi.nvidia.com)"
)
_FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "cancelled": "cancelled",
    "timeout": "timeout",
}

Backend = Literal["pytorch", "tensorrt"]


@dataclass(frozen=True, kw_only=True)
class TrtllmSettings:
    """How the ``trtllm`` engine loads and serves its model."""

    #: Name of the model served (requests must name it).
    model: str
    #: Version reported with every answer.
    model_version: str
    #: Hugging Face checkpoint, TensorRT-LLM checkpoint or engine directory (or a hub model id).
    model_path: str
    #: Tokenizer directory; empty: the model's own.
    tokenizer_path: str = ""
    #: Most requests running at once: TensorRT-LLM's ``max_batch_size``.
    capacity: int = 64
    #: Largest prompt accepted, in tokens (further bounded by max_num_tokens and max_seq_len).
    max_prompt_tokens: int = 32_768
    tensor_parallel_size: int = 1
    #: Most tokens (prefill and decode) in one iteration.
    max_num_tokens: int = 8192
    #: Longest sequence, prompt plus output; 0: the model's own.
    max_seq_len: int = 0
    kv_cache_free_gpu_memory_fraction: float = 0.9
    enable_block_reuse: bool = True
    dtype: str = "auto"
    #: A ``QuantAlgo`` name (FP8, NVFP4, W4A16_AWQ, ...) to quantize the checkpoint with; empty:
    #: none, or what a pre-quantized checkpoint says.
    quantization: str = ""
    #: Tokens generated per streamed step (PyTorch backend).
    stream_interval: int = 1
    #: How long one read of the iteration stats waits for the next iteration.
    stats_timeout_s: float = 2.0
    #: Pause between reads of the iteration stats while TensorRT-LLM has none to give.
    stats_idle_s: float = 0.05

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("model_path: the trtllm engine needs a model directory")
        for name in ("capacity", "max_prompt_tokens", "tensor_parallel_size", "max_num_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.max_seq_len < 0:
            raise ValueError(f"max_seq_len: must be >= 0 (got {self.max_seq_len})")
        if not 0 < self.kv_cache_free_gpu_memory_fraction <= 1:
            raise ValueError("kv_cache_free_gpu_memory_fraction: must be in (0, 1]")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval: must be >= 1 (got {self.stream_interval})")
        if self.stats_timeout_s <= 0 or self.stats_idle_s <= 0:
            raise ValueError("stats_timeout_s, stats_idle_s: must be > 0")


def backend_for(settings: TrtllmSettings) -> Backend:
    """The TensorRT-LLM backend that can load ``settings.model_path`` as configured.

    The TensorRT backend for quantizing while building, and for a TensorRT-LLM checkpoint or
    engine directory (told apart by their ``config.json`` as TensorRT-LLM does); otherwise the
    PyTorch backend, which also reports a directory it cannot read.
    """
    if settings.quantization:
        return "tensorrt"
    try:
        config = json.loads((Path(settings.model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return "pytorch"
    if isinstance(config, dict) and (
        {"pretrained_config", "build_config"} <= config.keys()
        or {"architecture", "dtype"} <= config.keys()
    ):
        return "tensorrt"
    return "pytorch"


def llm_kwargs(settings: TrtllmSettings, backend: Backend, llmapi: Any) -> dict[str, Any]:
    """The keyword arguments of ``LLM(...)`` (``llmapi`` is ``tensorrt_llm.llmapi``)."""
    kwargs: dict[str, Any] = {
        "model": settings.model_path,
        "tokenizer": settings.tokenizer_path or None,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "dtype": settings.dtype,
        "max_batch_size": settings.capacity,
        "max_num_tokens": settings.max_num_tokens,
        "kv_cache_config": llmapi.KvCacheConfig(
            free_gpu_memory_fraction=settings.kv_cache_free_gpu_memory_fraction,
            enable_block_reuse=settings.enable_block_reuse,
        ),
    }
    if settings.max_seq_len > 0:
        kwargs["max_seq_len"] = settings.max_seq_len
    if backend == "pytorch":
        kwargs["enable_iter_perf_stats"] = True
        kwargs["stream_interval"] = settings.stream_interval
    elif settings.quantization:
        kwargs["quant_config"] = llmapi.QuantConfig(
            quant_algo=quant_algo(llmapi, settings.quantization)
        )
    return kwargs


def quant_algo(llmapi: Any, name: str) -> Any:
    """The ``QuantAlgo`` member called ``name`` (any case)."""
    try:
        return llmapi.QuantAlgo[name.strip().upper()]
    except KeyError:
        known = ", ".join(member.name for member in llmapi.QuantAlgo)
        raise EngineError(
            f"trtllm_quantization: TensorRT-LLM has no algorithm {name!r} (it has {known})"
        ) from None


def sampling_kwargs(sampling: Sampling) -> dict[str, Any]:
    """Keyword arguments of ``SamplingParams`` for ``sampling``.

    ``max_tokens`` is always set (TensorRT-LLM's default is 32); ``top_k`` 0 (no limit) becomes
    None; ``end_id`` is never set, because TensorRT-LLM then ignores (and fails on) ``stop``.
    """
    seed = sampling.seed
    if seed is None and sampling.temperature > 0:
        seed = secrets.randbits(63)  # TensorRT-LLM would sample every unseeded request with 0
    kwargs: dict[str, Any] = {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k or None,
        "seed": seed,
    }
    if sampling.stop:
        kwargs["stop"] = list(sampling.stop)
    return kwargs


def find_stop(text: str, stops: Sequence[str], start: int) -> int:
    """Index of the earliest occurrence of a stop string at or after ``start``, or -1."""
    found = -1
    for stop in stops:
        at = text.find(stop, start)
        if at >= 0 and (found < 0 or at < found):
            found = at
    return found


def held_back(text: str, stops: Sequence[str], start: int) -> int:
    """Length of the longest tail of ``text[start:]`` that is a proper prefix of a stop string."""
    held = 0
    for stop in stops:
        span = min(len(stop) - 1, len(text) - start)
        if span <= held:
            continue
        tail = text[len(text) - span :]
        at = tail.find(stop[0])
        while at >= 0 and span - at > held:
            if stop.startswith(tail[at:]):
                held = span - at
                break
            at = tail.find(stop[0], at + 1)
    return held


@dataclass(frozen=True)
class _Loaded:
    """What :func:`_load` hands back from its thread."""

    llm: Any
    backend: Backend
    sampling_params: Any
    request_error: type[BaseException]


class _NoRequestError(Exception):
    """Stands for ``RequestError`` in a TensorRT-LLM that has none."""


def _load(settings: TrtllmSettings) -> _Loaded:
    """Import TensorRT-LLM and build the ``LLM`` (slow: run it in a thread)."""
    try:
        trtllm = importlib.import_module("tensorrt_llm")
        llmapi = importlib.import_module("tensorrt_llm.llmapi")
    except (ImportError, OSError) as exc:
        raise EngineError(
            f"the trtllm engine needs TensorRT-LLM, which cannot be imported ({exc}); "
            + INSTALL_HINT
        ) from exc
    backend = backend_for(settings)
    kwargs = llm_kwargs(settings, backend, llmapi)
    try:
        if backend == "tensorrt":
            llm_class = importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
        else:
            llm_class = trtllm.LLM
        llm = llm_class(**kwargs)
    except Exception as exc:
        raise EngineError(
            f"TensorRT-LLM could not load {settings.model_path!r} ({backend} backend): {exc}"
        ) from exc
    request_error = getattr(llmapi, "RequestError", None)
    if not (isinstance(request_error, type) and issubclass(request_error, BaseException)):
        request_error = _NoRequestError
    return _Loaded(llm, backend, llmapi.SamplingParams, request_error)


@dataclass(frozen=True)
class _Stats:
    """The fields of one iteration-stats dict that make up the load."""

    active: int
    queued: int
    capacity: int
    kv_cache_used_fraction: float


def parse_stats(stats: Mapping[str, Any], default_capacity: int) -> _Stats:
    """The load fields of a TensorRT-LLM iteration-stats dict (missing fields count as 0)."""

    def number(mapping: Mapping[str, Any], key: str) -> float:
        value = mapping.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return 0.0
        return float(value) if math.isfinite(value) else 0.0

    kv = stats.get("kvCacheStats")
    fraction = 0.0
    if isinstance(kv, Mapping):
        total = number(kv, "maxNumBlocks")
        used = number(kv, "usedNumBlocks") if "usedNumBlocks" in kv else 0.0
        if "usedNumBlocks" not in kv and "freeNumBlocks" in kv:
            used = total - number(kv, "freeNumBlocks")
        if total > 0:
            fraction = min(1.0, max(0.0, used / total))
    capacity = int(number(stats, "maxNumActiveRequests")) or int(
        number(stats, "maxBatchSizeRuntime")
    )
    return _Stats(
        active=max(0, int(number(stats, "numActiveRequests"))),
        queued=max(0, int(number(stats, "numQueuedRequests"))),
        capacity=capacity if capacity > 0 else default_capacity,
        kv_cache_used_fraction=fraction,
    )


class _Live:
    """A request between its submission to TensorRT-LLM and the end of its stream."""

    __slots__ = (
        "aborted",
        "completed",
        "emitted",
        "ended",
        "ending",
        "error",
        "first_output_at",
        "max_stop_chars",
        "pump",
        "request",
        "result",
        "stops",
        "submitted_at",
        "timer",
        "wake",
    )

    def __init__(self, request: EngineRequest, result: Any) -> None:
        self.request = request
        #: TensorRT-LLM's RequestOutput: the same object, mutated at each step.
        self.result = result
        self.submitted_at = time.monotonic()
        self.first_output_at: float | None = None
        self.stops = request.sampling.stop
        self.max_stop_chars = max((len(s) for s in self.stops), default=0)
        #: Characters of the cumulative text handed to the caller so far.
        self.emitted = 0
        #: TensorRT-LLM finished the request (its stream ended).
        self.ended = False
        #: Why this engine ended the request, when it did: "cancelled", "timeout" or "stop".
        self.ending: FinishReason | None = None
        #: The caller got its Completion.
        self.completed = False
        #: ``abort()`` was called on the RequestOutput.
        self.aborted = False
        self.error: EngineError | RequestFailed | None = None
        self.wake = asyncio.Event()
        self.pump: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None


class TrtllmEngine:
    """TensorRT-LLM's ``LLM`` API behind :class:`~worker.engines.Engine` (module docstring)."""

    def __init__(self, settings: TrtllmSettings) -> None:
        self.settings = settings
        self._llm: Any = None
        self._tokenizer: Any = None
        self._backend: Backend | None = None
        self._sampling_params: Any = None
        self._request_error: type[BaseException] = _NoRequestError
        self._live: dict[str, _Live] = {}
        #: Live requests submitted since the latest stats, without output yet.
        self._unseen: set[str] = set()
        #: Live requests that have produced output (so are, or were, in the batch).
        self._streaming: set[str] = set()
        self._stats: _Stats | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._load_changed = asyncio.Event()
        self._load_key: tuple[int, int, int, bool, int] | None = None
        self._started = False
        self._stopped = False
        self._failure: EngineError | None = None
        self._tokenizer_failed = False

    @classmethod
    def from_config(cls, config: WorkerConfig) -> TrtllmEngine:
        """The engine the worker's configuration describes (``--engine trtllm``).

        Unless configured, the model is named after its directory, and its version is the
        directory's real name (a Hugging Face cache snapshot is named after its commit).
        """
        path = Path(config.model_path)
        return cls(
            TrtllmSettings(
                model=config.model or path.name or config.model_path,
                model_version=config.model_version or path.resolve().name or config.model_path,
                model_path=config.model_path,
                tokenizer_path=config.tokenizer_path,
                capacity=config.capacity,
                max_prompt_tokens=config.max_prompt_tokens,
                tensor_parallel_size=config.trtllm_tensor_parallel_size,
                max_num_tokens=config.trtllm_max_num_tokens,
                max_seq_len=config.trtllm_max_seq_len,
                kv_cache_free_gpu_memory_fraction=config.trtllm_kv_cache_free_gpu_memory_fraction,
                enable_block_reuse=config.trtllm_enable_block_reuse,
                dtype=config.trtllm_dtype,
                quantization=config.trtllm_quantization,
                stream_interval=config.trtllm_stream_interval,
            )
        )

    # -- Engine interface ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("trtllm engine already started")
        self._started = True
        s = self.settings
        began = time.monotonic()
        loaded = await asyncio.to_thread(_load, s)
        if self._stopped:  # stopped while loading
            await asyncio.to_thread(loaded.llm.shutdown)
            raise EngineError("the trtllm engine was stopped while loading")
        self._llm = loaded.llm
        self._tokenizer = getattr(loaded.llm, "tokenizer", None)
        self._backend = loaded.backend
        self._sampling_params = loaded.sampling_params
        self._request_error = loaded.request_error
        if loaded.backend == "tensorrt" and s.stream_interval != 1:
            log.warning(
                "stream_interval ignored: the TensorRT backend streams every token",
                stream_interval=s.stream_interval,
            )
        self._stats_task = asyncio.create_task(self._poll_stats(), name="trtllm-stats")
        self._refresh_load()
        log.info(
            "engine started",
            engine=ENGINE,
            model=s.model,
            model_path=s.model_path,
            backend=loaded.backend,
            capacity=s.capacity,
            quantization=s.quantization or None,
            load_s=round(time.monotonic() - began, 3),
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._stats_task is not None:
            self._stats_task.cancel()
            await asyncio.gather(self._stats_task, return_exceptions=True)
        for live in list(self._live.values()):
            self._end(live, "cancelled")
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                await asyncio.to_thread(llm.shutdown)
            except Exception as exc:
                log.warning("TensorRT-LLM shutdown failed", engine=ENGINE, error=repr(exc))
        self._refresh_load()

    async def generate(
        self, request: EngineRequest
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        live = self._submit(request)
        try:
            while True:
                live.wake.clear()
                if live.error is not None:
                    raise live.error
                text, completion = self._advance(live)
                if text:
                    yield TextDelta(text)
                if completion is not None:
                    live.completed = True
                    yield completion
                    return
                if not text:
                    await live.wake.wait()
        finally:
            self._release(live)

    async def abort(self, request_id: str) -> None:
        live = self._live.get(request_id)
        if live is not None:
            self._end(live, "cancelled")

    def count_tokens(self, text: str) -> int:
        tokenizer = self._tokenizer
        if tokenizer is not None:
            try:
                return len(tokenizer.encode(text))
            except Exception as exc:
                if not self._tokenizer_failed:
                    self._tokenizer_failed = True
                    log.warning(
                        "tokenizer failed; estimating prompt tokens", engine=ENGINE, error=repr(exc)
                    )
        return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))

    def load(self) -> LoadSnapshot:
        live = len(self._live)
        stats = self._stats
        unseen = len(self._unseen)
        if stats is None:
            active = len(self._streaming)
            queued = min(unseen, live - active)
            capacity = self.settings.capacity
            kv = 0.0
        else:
            active = min(live, max(stats.active, len(self._streaming)))
            queued = min(stats.queued + unseen, live - active)
            capacity = stats.capacity
            # Stats stop when TensorRT-LLM idles: the last ones still show the last batch.
            kv = stats.kv_cache_used_fraction if live else 0.0
        return LoadSnapshot(
            active=active,
            queued=max(0, queued),
            capacity=capacity,
            kv_cache_used_fraction=kv,
            healthy=self._healthy(),
        )

    async def wait_load_change(self, timeout: float) -> bool:
        changed = self._load_changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    def info(self) -> EngineInfo:
        s = self.settings
        return EngineInfo(
            engine=ENGINE,
            model=s.model,
            model_version=s.model_version,
            capacity=s.capacity,
            max_prompt_tokens=self._max_prompt_tokens(),
        )

    # -- requests ------------------------------------------------------------------------------

    def _submit(self, request: EngineRequest) -> _Live:
        if self._failure is not None:
            raise self._failure
        if self._llm is None or self._stopped:
            raise EngineError("the trtllm engine is not running")
        if request.request_id in self._live:
            raise EngineError(f"request id {request.request_id!r} is already running")
        try:
            params = self._sampling_params(**sampling_kwargs(request.sampling))
            result = self._llm.generate_async(
                request.input_text, sampling_params=params, streaming=True
            )
        except (ValueError, TypeError) as exc:
            # TensorRT-LLM checks the request on submission (prompt length, sampling values):
            # the request's input is at fault, not the engine.
            raise RequestFailed(f"TensorRT-LLM refused the request: {exc}", invalid=True) from exc
        except Exception as exc:
            raise self._fail("TensorRT-LLM could not take a request", exc) from exc
        live = _Live(request, result)
        rid = request.request_id
        self._live[rid] = live
        self._unseen.add(rid)
        live.pump = asyncio.create_task(self._pump(live), name=f"trtllm-request-{rid}")
        if request.deadline is not None:
            delay = max(0.0, request.deadline - time.monotonic())
            live.timer = asyncio.get_running_loop().call_later(delay, self._end, live, "timeout")
        self._refresh_load()
        return live

    async def _pump(self, live: _Live) -> None:
        """Follow TensorRT-LLM's stream of ``live``, waking its caller at each step."""
        try:
            async for _ in live.result:
                if live.first_output_at is None:
                    live.first_output_at = time.monotonic()
                    rid = live.request.request_id
                    self._unseen.discard(rid)
                    self._streaming.add(rid)
                    self._refresh_load()
                live.wake.set()
            live.ended = True
        except Exception as exc:
            if isinstance(exc, self._request_error):
                # This request's failure alone (see the module doc): the engine stays healthy.
                live.error = RequestFailed(f"TensorRT-LLM failed the request: {exc}")
            else:
                failure = self._fail("TensorRT-LLM failed while generating", exc)
                if live.ending is None and live.error is None:
                    live.error = failure
        finally:
            live.wake.set()

    def _advance(self, live: _Live) -> tuple[str, Completion | None]:
        """New text for the caller, and the completion once the request is over."""
        if live.ending in ("cancelled", "timeout"):
            return "", self._completion(live, live.ending)
        output = live.result.outputs[0]
        text = str(output.text)
        start = live.emitted
        if len(text) <= start:
            delta, stopped = "", False
        elif not live.stops:
            delta, stopped = text[start:], False
        else:
            at = find_stop(text, live.stops, max(0, start - live.max_stop_chars + 1))
            stopped = at >= 0
            if stopped:
                end = max(at, start)
            elif live.ended:
                end = len(text)
            else:
                end = len(text) - held_back(text, live.stops, start)
            delta = text[start:end] if end > start else ""
        live.emitted += len(delta)
        if stopped:  # a stop string TensorRT-LLM let through: end the request here
            self._end(live, "stop")
            return delta, self._completion(live, "stop")
        if not live.ended:
            return delta, None
        reason = _FINISH_REASONS.get(str(output.finish_reason))
        if reason is None:
            raise EngineError(f"TensorRT-LLM ended a request with {output.finish_reason!r}")
        return delta, self._completion(live, reason)

    def _completion(self, live: _Live, reason: FinishReason) -> Completion:
        result = live.result
        started = live.first_output_at if live.first_output_at is not None else time.monotonic()
        return Completion(
            finish_reason=reason,
            prompt_tokens=len(result.prompt_token_ids or ()),
            completion_tokens=len(result.outputs[0].token_ids or ()),
            queue_s=started - live.submitted_at,
        )

    def _end(self, live: _Live, reason: FinishReason) -> None:
        """End ``live`` now with ``reason``, aborting it in TensorRT-LLM."""
        if live.ending is not None or live.ended or live.completed:
            return
        live.ending = reason
        self._abort_result(live)
        live.wake.set()

    def _abort_result(self, live: _Live) -> None:
        if live.aborted:
            return
        live.aborted = True
        try:
            live.result.abort()
        except Exception as exc:
            log.warning(
                "TensorRT-LLM abort failed",
                engine=ENGINE,
                engine_request_id=live.request.request_id,
                error=repr(exc),
            )

    def _release(self, live: _Live) -> None:
        """Forget ``live`` once its caller is done with it, aborting it if unfinished."""
        if not (live.completed or live.ended):
            self._abort_result(live)
        if live.timer is not None:
            live.timer.cancel()
        if live.pump is not None and not live.pump.done():
            live.pump.cancel()
        rid = live.request.request_id
        if self._live.get(rid) is live:
            del self._live[rid]
            self._unseen.discard(rid)
            self._streaming.discard(rid)
        self._refresh_load()

    # -- load and health -----------------------------------------------------------------------

    async def _poll_stats(self) -> None:
        """Keep the latest iteration stats, draining TensorRT-LLM's stats queue."""
        s = self.settings
        task = asyncio.current_task()
        while not self._stopped:
            got = False
            try:
                async for item in self._llm.get_stats_async(timeout=s.stats_timeout_s):
                    got = True
                    self._apply_stats(item)
            except TimeoutError:
                pass
            except Exception as exc:
                self._fail("TensorRT-LLM iteration stats failed", exc)
                return
            if task is not None and task.cancelling():
                # A cancellation that met the stats queue's own timeout can be swallowed there
                # (asyncio.wait_for in Python 3.11); honour it.
                raise asyncio.CancelledError
            if not got:  # idle, or before the first request: nothing until the next submission
                await asyncio.sleep(s.stats_idle_s)

    def _apply_stats(self, item: Any) -> None:
        if isinstance(item, str | bytes):
            try:
                item = json.loads(item)
            except ValueError:
                log.warning("unreadable TensorRT-LLM stats", engine=ENGINE, stats=repr(item)[:200])
                return
        if not isinstance(item, Mapping):
            return
        self._stats = parse_stats(item, self.settings.capacity)
        self._unseen.clear()
        self._refresh_load()

    def _healthy(self) -> bool:
        return self._llm is not None and not self._stopped and self._failure is None

    def _fail(self, context: str, exc: BaseException) -> EngineError:
        """Mark the engine failed (once), failing every request in flight; the error."""
        if self._failure is None:
            self._failure = EngineError(f"{context}: {exc!r}")
            log.error(
                "trtllm engine failed",
                engine=ENGINE,
                error=repr(exc),
                live_requests=len(self._live),
            )
            for live in self._live.values():
                if live.error is None and live.ending is None and not live.ended:
                    live.error = self._failure  # requests already over keep their outcome
                live.wake.set()
            self._refresh_load()
        return self._failure

    def _refresh_load(self) -> None:
        """Wake :meth:`wait_load_change` callers when the load moved enough to report."""
        load = self.load()
        key = (
            load.active,
            load.queued,
            load.capacity,
            load.healthy,
            int(load.kv_cache_used_fraction * 50),
        )
        if key != self._load_key:
            self._load_key = key
            self._load_changed.set()
            self._load_changed = asyncio.Event()

    def _max_prompt_tokens(self) -> int:
        s = self.settings
        limit = min(s.max_prompt_tokens, s.max_num_tokens)  # no chunked prefill: one iteration
        if s.max_seq_len > 0:
            limit = min(limit, s.max_seq_len - 1)
        return max(1, limit)


__all__ = [
    "TrtllmEngine",
    "TrtllmSettings",
    "backend_for",
    "find_stop",
    "held_back",
    "llm_kwargs",
    "parse_stats",
    "sampling_kwargs",
]
