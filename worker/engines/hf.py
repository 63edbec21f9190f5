"""Hugging Face transformers from a local model directory, on CPU or CUDA.

torch and transformers are imported at :meth:`HfEngine.start`, never at worker import time, and
typed as ``Any`` here (``pip install 'llm-mesh[hf]'`` installs them). Nothing is downloaded: the
tokenizer and model load with ``local_files_only=True`` from directories that must exist.

- **Concurrency.** Each request runs its own ``model.generate`` (batch of one) in a worker thread;
  at most ``capacity`` run at once and the rest wait in FIFO order. torch releases the GIL inside
  its kernels, so generations overlap; transformers has no continuous batching across threads.
- **Streaming.** A streamer (transformers' ``BaseStreamer`` protocol: ``put``/``end``) receives
  each token in the generating thread, decodes incrementally (a character split over several
  byte-level tokens is held back until complete) and hands text to the event loop with
  ``call_soon_threadsafe``.
- **Stop strings** are found in the decoded text: the text ends before the first occurrence, and
  text that may begin a stop string is held back until it cannot (never emitted across deltas).
  Finding one, or an abort or the deadline, sets the request's interrupt event, which a stopping
  criterion checks after every token. An aborted or timed-out stream ends at once; its thread
  ends within one decoding step, and only then frees its slot.
- **Finish reasons.** A stop string or an end-of-sequence token: "stop"; ``max_tokens`` (or the
  model's context length) reached: "length"; :meth:`HfEngine.abort` or closing the stream:
  "cancelled"; the request's deadline: "timeout". ``completion_tokens`` counts generated tokens,
  not the end-of-sequence token.
- **Sampling.** ``temperature == 0`` is greedy decoding. transformers' ``generate`` takes no
  ``torch.Generator`` (it samples with ``torch.multinomial`` on the global RNG, checked up to
  5.23), and seeding the global RNG would make a seeded request's tokens depend on every other
  sampling request running beside it. So the engine samples itself, in a logits processor:
  transformers' temperature, top-k (0: off) and top-p warpers, then one draw from a per-request
  ``torch.Generator`` (seeded from ``seed``, else from the OS), every other token masked, and
  ``generate`` runs greedily so that it takes the drawn token. A seeded request is reproducible
  whatever runs beside it (on the same device and library versions).
- **Load.** ``active``: generating threads (an aborted one counts until its thread has ended);
  ``queued``: waiting for a slot. transformers has no paged KV cache to measure, so
  ``kv_cache_used_fraction`` is the tokens held by running requests (prompt + generated) over
  ``capacity * the model's context length``: the share of the worst-case KV cache in use.
- **Continuation.** The input is the prompt's tokens followed by the continuation's (encoded
  without special tokens); only the tokens after them are decoded and streamed, with the input's
  last tokens as the decoder's context. Greedy decoding thus continues its own answer where the
  continuation's tokens re-encode as they were generated. Prompt tokens include the
  continuation's.
- **Failure.** An unexpected error in ``generate`` (CUDA out of memory, a crashed kernel) marks the
  engine unhealthy and fails every live request with :class:`EngineError`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import gc
import importlib
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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

if TYPE_CHECKING:
    from worker._config import WorkerConfig

log = structlog.get_logger(__name__)

#: Prompt tokens decoded before the first generated one, so that tokenizers that drop a leading
#: space at the start of a decode (SentencePiece) give the first token its space.
_DECODE_CONTEXT_TOKENS = 5
#: transformers renamed from_pretrained's ``torch_dtype`` to ``dtype`` in this version.
_DTYPE_KWARG_SINCE = (4, 56)


@dataclass(frozen=True, kw_only=True)
class HfSettings:
    """How the transformers engine loads and serves its model."""

    #: Local model directory (config.json and weights).
    model_path: str
    #: Tokenizer directory; empty: ``model_path``.
    tokenizer_path: str = ""
    #: Name of the model served; empty: the model directory's name.
    model: str = ""
    #: Version reported in :class:`EngineInfo`; empty: the checkpoint's commit hash when it has
    #: one (a Hugging Face cache snapshot), else the model directory's name.
    model_version: str = ""
    #: Most generations running at once; more wait in FIFO order.
    capacity: int = 4
    #: Largest prompt accepted, in tokens (also bounded by the model's context length).
    max_prompt_tokens: int = 32_768
    #: "auto": cuda when torch sees a GPU, else cpu.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: "auto": bfloat16 on cuda (float16 where unsupported), float32 on cpu.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("model_path: the hf engine needs a local model directory")
        if self.capacity < 1:
            raise ValueError(f"capacity: must be >= 1 (got {self.capacity})")
        if self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens: must be >= 1 (got {self.max_prompt_tokens})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: must be auto, cpu or cuda (got {self.device!r})")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(
                f"dtype: must be auto, float32, float16 or bfloat16 (got {self.dtype!r})"
            )


class IncrementalDecoder:
    """Token ids in, new text out, never splitting a character over two pieces.

    Decodes a short window of tokens (the previous piece's tokens and the new ones) and returns
    the text beyond the previous piece, holding it back while it ends in U+FFFD (a character
    whose bytes have not all arrived). Each step costs a window, not the whole output.
    """

    def __init__(self, tokenizer: Any, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context)
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def push(self, token_id: int) -> str:
        """Add a token; the text it completes (often empty while a character is incomplete)."""
        self._ids.append(token_id)
        return self._next(final=False)

    def flush(self) -> str:
        """Whatever text is still held back (at the end of the generation)."""
        return self._next(final=True)

    def _next(self, *, final: bool) -> str:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        text: str = self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        return text


class _Live(Outbox):
    """A request inside the engine, from submission to completion (owned by the event loop,
    except ``generated``, which its generating thread updates)."""

    __slots__ = (
        "generated",
        "id",
        "interrupt",
        "max_new_tokens",
        "prompt_ids",
        "request",
        "scheduled_at",
        "submitted_at",
        "timer",
    )

    def __init__(self, request: EngineRequest, prompt_ids: list[int], max_new_tokens: int) -> None:
        super().__init__()
        self.request = request
        self.id = request.request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.submitted_at = time.monotonic()
        self.scheduled_at: float | None = None
        #: Tokens generated so far (written by the generating thread).
        self.generated = 0
        #: Set to end the generation at the next token (abort, deadline, stop string).
        self.interrupt = threading.Event()
        self.timer: asyncio.TimerHandle | None = None


class _TokenStream:
    """The streamer of one generation (transformers' ``BaseStreamer`` protocol), run in its
    generating thread: decodes tokens, applies stop strings, hands text to ``emit``."""

    def __init__(
        self,
        live: _Live,
        tokenizer: Any,
        eos_ids: frozenset[int],
        emit: Callable[[str], None],
    ) -> None:
        self._live = live
        self._eos_ids = eos_ids
        self._emit = emit
        self._decoder = IncrementalDecoder(tokenizer, live.prompt_ids[-_DECODE_CONTEXT_TOKENS:])
        self._stop = live.request.sampling.stop
        self._max_stop_chars = max((len(s) for s in self._stop), default=0)
        self._prompt_seen = False
        self._text = ""
        self._emitted = 0
        self.stop_found = False
        self.last_token: int | None = None

    # -- BaseStreamer ----------------------------------------------------------------------------

    def put(self, value: Any) -> None:
        """Called by ``generate`` with the prompt first, then with each new token."""
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.stop_found or self._live.interrupt.is_set():
                return  # tokens decoded after the end (one step late in some versions)
            token_id = int(token)
            self.last_token = token_id
            if token_id not in self._eos_ids:
                self._live.generated += 1
            self._add(self._decoder.push(token_id))

    def end(self) -> None:
        """Called by ``generate`` when it is done."""

    # -- ours ------------------------------------------------------------------------------------

    def finish(self) -> None:
        """Hand over what was held back (a natural end: no stop string can complete now)."""
        if self.stop_found or self._live.interrupt.is_set():
            return
        self._add(self._decoder.flush())
        if not self.stop_found:
            self._send(len(self._text))

    def finish_reason(self) -> FinishReason:
        """Why the generation ended, once ``generate`` has returned."""
        if self.stop_found or (self.last_token is not None and self.last_token in self._eos_ids):
            return "stop"
        if self._live.interrupt.is_set():
            return "cancelled"  # the event loop has already ended the request as it wanted
        if self._live.generated >= self._live.max_new_tokens:
            return "length"
        return "stop"  # the model's own stopping criteria (generation config)

    def _add(self, text: str) -> None:
        if not text:
            return
        before = len(self._text)
        self._text += text
        safe = len(self._text)
        if self._stop:
            start = max(0, before - self._max_stop_chars + 1)
            found = [at for at in (self._text.find(s, start) for s in self._stop) if at >= 0]
            if found:
                self._text = self._text[: min(found)]
                self.stop_found = True
                self._live.interrupt.set()
                self._send(len(self._text))
                return
            # Hold back what could be the start of a stop string split across tokens.
            safe = max(self._emitted, safe - self._max_stop_chars + 1)
        self._send(safe)

    def _send(self, end: int) -> None:
        if end > self._emitted:
            self._emit(self._text[self._emitted : end])
            self._emitted = end


class _Interrupt:
    """A stopping criterion (transformers' ``StoppingCriteria`` protocol): true once the
    request's interrupt event is set, so ``generate`` stops after the current token."""

    def __init__(self, torch: Any, event: threading.Event) -> None:
        self._torch = torch
        self._event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return self._torch.full(
            (input_ids.shape[0],),
            self._event.is_set(),
            dtype=self._torch.bool,
            device=input_ids.device,
        )

    def __deepcopy__(self, memo: dict[int, Any]) -> _Interrupt:
        return self  # holds a threading.Event; transformers may deep-copy criteria lists


class _SeededSampler:
    """A logits processor that samples the next token itself with a per-request generator.

    Applies transformers' temperature, top-k and top-p warpers, draws one token from the
    resulting distribution with ``generator`` and returns scores where every other token is
    -inf, so that greedy decoding picks the drawn one (see the module docstring for why).
    """

    def __init__(self, torch: Any, warpers: Sequence[Any], generator: Any) -> None:
        self._torch = torch
        self._warpers = warpers
        self._generator = generator

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self._torch
        for warper in self._warpers:
            scores = warper(input_ids, scores)
        probs = torch.softmax(scores.float(), dim=-1)
        token = torch.multinomial(probs, num_samples=1, generator=self._generator)
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, token, 0.0)


@dataclass(frozen=True)
class _Loaded:
    """What :meth:`HfEngine.start` loads."""

    torch: Any
    transformers: Any
    tokenizer: Any
    model: Any
    device: str
    dtype: str
    #: Longest sequence (prompt + generated) the model takes.
    max_seq_len: int
    eos_ids: frozenset[int]
    pad_id: int | None
    version: str


class HfEngine(OutboxEngine[_Live]):
    """Hugging Face transformers (see the module docstring). Implements :class:`Engine`."""

    def __init__(self, settings: HfSettings) -> None:
        self.settings = settings
        self._loaded: _Loaded | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: collections.deque[_Live] = collections.deque()
        self._running: dict[str, _Live] = {}
        self._live: dict[str, _Live] = {}
        self._load_changed = asyncio.Event()
        self._started = False
        self._stopped = False
        self._failure: EngineError | None = None

    @classmethod
    def from_config(cls, config: WorkerConfig) -> HfEngine:
        """The engine the worker's configuration describes (``--engine hf``)."""
        return cls(
            HfSettings(
                model_path=config.model_path,
                tokenizer_path=config.tokenizer_path,
                model=config.model,
                model_version=config.model_version,
                capacity=config.capacity,
                max_prompt_tokens=config.max_prompt_tokens,
                device=config.hf_device,
                dtype=config.hf_dtype,
            )
        )

    # -- Engine interface ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("hf engine already started")
        self._started = True
        self._loop = asyncio.get_running_loop()
        s = self.settings
        began = time.monotonic()
        self._loaded = loaded = await asyncio.to_thread(self._load)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=s.capacity, thread_name_prefix="hf-generate"
        )
        log.info(
            "engine started",
            engine="hf",
            model=self._model_name(),
            model_path=s.model_path,
            model_version=loaded.version,
            device=loaded.device,
            dtype=loaded.dtype,
            capacity=s.capacity,
            max_seq_len=loaded.max_seq_len,
            torch_version=str(loaded.torch.__version__),
            transformers_version=str(loaded.transformers.__version__),
            load_s=round(time.monotonic() - began, 3),
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for live in list(self._live.values()):
            self._finish(live, "cancelled")
        if self._executor is not None:
            # Interrupted generations end within one decoding step.
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            cuda = loaded.device.startswith("cuda")
            del loaded
            gc.collect()
            if cuda:
                importlib.import_module("torch").cuda.empty_cache()
        self._notify_load()

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def load(self) -> LoadSnapshot:
        capacity = self.settings.capacity
        kv_fraction = 0.0
        if self._loaded is not None and self._running:
            held = sum(len(live.prompt_ids) + live.generated for live in self._running.values())
            kv_fraction = min(1.0, held / (capacity * self._loaded.max_seq_len))
        return LoadSnapshot(
            active=len(self._running),
            queued=len(self._queue),
            capacity=capacity,
            kv_cache_used_fraction=kv_fraction,
            healthy=self._loaded is not None and not self._stopped and self._failure is None,
        )

    async def wait_load_change(self, timeout: float) -> bool:
        return await wait_event(self._load_changed, timeout)

    def info(self) -> EngineInfo:
        s = self.settings
        max_prompt_tokens = s.max_prompt_tokens
        version = s.model_version
        if self._loaded is not None:
            max_prompt_tokens = min(max_prompt_tokens, self._loaded.max_seq_len - 1)
            version = version or self._loaded.version
        return EngineInfo(
            engine="hf",
            model=self._model_name(),
            model_version=version,
            capacity=s.capacity,
            max_prompt_tokens=max_prompt_tokens,
        )

    # -- loading -------------------------------------------------------------------------------

    def _model_name(self) -> str:
        return self.settings.model or Path(self.settings.model_path).name

    def _load(self) -> _Loaded:
        """Import torch and transformers and load the tokenizer and model (in a thread)."""
        s = self.settings
        try:
            torch = importlib.import_module("torch")
            transformers = importlib.import_module("transformers")
        except ImportError as exc:
            raise EngineError(
                f"the hf engine needs torch and transformers ({exc}); install the hf extra: "
                "pip install 'llm-mesh[hf]'"
            ) from None
        model_dir = Path(s.model_path)
        tokenizer_dir = Path(s.tokenizer_path or s.model_path)
        for what, path in (("model", model_dir), ("tokenizer", tokenizer_dir)):
            if not path.is_dir():
                raise EngineError(f"hf {what} directory {str(path)!r} does not exist")
        if not (model_dir / "config.json").is_file():
            raise EngineError(f"hf model directory {str(model_dir)!r} has no config.json")
        device = s.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise EngineError("hf_device is cuda but torch sees no CUDA device")
        dtype = s.dtype
        if dtype == "auto":
            if device == "cpu":
                dtype = "float32"
            else:
                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        dtype_kwarg = (
            "dtype"
            if _version_tuple(transformers.__version__) >= _DTYPE_KWARG_SINCE
            else "torch_dtype"
        )
        # The worker logs its own JSON lines; progress bars would only interleave with them.
        transformers.utils.logging.disable_progress_bar()
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                str(tokenizer_dir), local_files_only=True
            )
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(model_dir), local_files_only=True, **{dtype_kwarg: getattr(torch, dtype)}
            )
            model.to(device)
            model.eval()
        except Exception as exc:
            raise EngineError(
                f"could not load the hf model from {str(model_dir)!r}: {exc}"
            ) from exc
        config = model.config
        max_seq_len = next(
            (
                int(value)
                for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
                if isinstance(value := getattr(config, name, None), int) and value > 1
            ),
            None,
        )
        if max_seq_len is None:
            model_max_length = getattr(tokenizer, "model_max_length", None)
            if isinstance(model_max_length, int) and 1 < model_max_length < 10**8:
                max_seq_len = model_max_length
            else:
                max_seq_len = s.max_prompt_tokens + 1
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad_id = tokenizer.pad_token_id
        if pad_id is None:
            pad_id = model.generation_config.pad_token_id
        if pad_id is None and eos_ids:
            pad_id = min(eos_ids)
        commit = getattr(config, "_commit_hash", None)
        version = commit if isinstance(commit, str) and commit else model_dir.resolve().name
        return _Loaded(
            torch=torch,
            transformers=transformers,
            tokenizer=tokenizer,
            model=model,
            device=device,
            dtype=dtype,
            max_seq_len=max_seq_len,
            eos_ids=eos_ids,
            pad_id=pad_id,
            version=version,
        )

    def _encode(self, text: str) -> list[int]:
        if self._loaded is None:
            raise EngineError("hf engine is not running")
        ids: list[int] = self._loaded.tokenizer.encode(text)
        return ids

    def _input_ids(self, request: EngineRequest) -> list[int]:
        """The prompt's tokens followed by the continuation's, encoded on its own (no special
        tokens) as the answer's tokens followed the prompt's when they were generated, rather
        than merged with the prompt's last token."""
        ids = self._encode(request.prompt)
        if request.continuation and self._loaded is not None:
            more: list[int] = self._loaded.tokenizer.encode(
                request.continuation, add_special_tokens=False
            )
            ids.extend(more)
        return ids

    # -- scheduling (event loop) -----------------------------------------------------------------

    def _submit(self, request: EngineRequest) -> _Live:
        if self._failure is not None:
            raise EngineError(f"hf engine failed: {self._failure}")
        if self._loaded is None or self._stopped:
            raise EngineError("hf engine is not running")
        if request.request_id in self._live:
            raise EngineError(f"request id {request.request_id!r} is already running")
        prompt_ids = self._input_ids(request)
        if not prompt_ids:
            if self._loaded.tokenizer.bos_token_id is None:
                raise EngineError("the prompt encodes to no tokens")
            prompt_ids = [int(self._loaded.tokenizer.bos_token_id)]
        room = self._loaded.max_seq_len - len(prompt_ids)
        if room < 1:
            raise EngineError(
                f"the prompt is {len(prompt_ids)} tokens; the model takes at most "
                f"{self._loaded.max_seq_len - 1}"
            )
        live = _Live(request, prompt_ids, min(request.sampling.max_tokens, room))
        self._live[live.id] = live
        self._queue.append(live)
        deadline = request.deadline
        if deadline is not None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, deadline - time.monotonic())
            live.timer = loop.call_later(delay, self._finish, live, "timeout")
        self._admit()
        self._notify_load()
        return live

    def _admit(self) -> None:
        """Start queued requests, oldest first, while slots are free."""
        if self._executor is None or self._stopped or self._failure is not None:
            return
        while self._queue and len(self._running) < self.settings.capacity:
            live = self._queue.popleft()
            live.scheduled_at = time.monotonic()
            self._running[live.id] = live
            self._executor.submit(self._run_generation, live)

    def _finish(self, live: _Live, reason: FinishReason) -> None:
        """End ``live`` with ``reason``; a running generation stops at its next token."""
        if live.done is not None or live.error is not None:
            return
        live.interrupt.set()
        if live.timer is not None:
            live.timer.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(live)
        self._live.pop(live.id, None)
        started = live.scheduled_at if live.scheduled_at is not None else time.monotonic()
        live.done = Completion(
            finish_reason=reason,
            prompt_tokens=len(live.prompt_ids),
            completion_tokens=live.generated,
            queue_s=started - live.submitted_at,
        )
        live.wake.set()
        self._notify_load()

    def _deliver(self, live: _Live, text: str) -> None:
        if live.done is None and live.error is None:
            live.pending.append(text)
            live.wake.set()

    def _on_generation_end(self, live: _Live, outcome: FinishReason | BaseException) -> None:
        self._running.pop(live.id, None)
        if isinstance(outcome, BaseException):
            self._fail(outcome)
        else:
            self._finish(live, outcome)
        self._admit()
        self._notify_load()

    def _fail(self, exc: BaseException) -> None:
        """A generation crashed: the engine is unhealthy and every live request fails."""
        if self._failure is None:
            log.error("hf engine failed", exc_info=exc)
            self._failure = EngineError(f"hf generation failed: {exc!r}")
        for live in list(self._live.values()):
            if live.done is None and live.error is None:
                live.interrupt.set()
                if live.timer is not None:
                    live.timer.cancel()
                live.error = self._failure
                live.wake.set()
        self._live.clear()
        self._queue.clear()

    def _notify_load(self) -> None:
        self._load_changed.set()
        self._load_changed = asyncio.Event()

    # -- generation (worker threads) -----------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback(*args)`` on the event loop, from a generating thread."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
            self._loop.call_soon_threadsafe(callback, *args)

    def _run_generation(self, live: _Live) -> None:
        outcome: FinishReason | BaseException
        try:
            outcome = self._generate_blocking(live)
        except Exception as exc:
            outcome = exc
        self._post(self._on_generation_end, live, outcome)

    def _generate_blocking(self, live: _Live) -> FinishReason:
        loaded = self._loaded
        if loaded is None or live.interrupt.is_set():
            return "cancelled"  # aborted between admission and this thread starting
        torch, transformers = loaded.torch, loaded.transformers
        sampling = live.request.sampling
        stream = _TokenStream(
            live,
            loaded.tokenizer,
            loaded.eos_ids,
            lambda text: self._post(self._deliver, live, text),
        )
        input_ids = torch.tensor([live.prompt_ids], dtype=torch.long, device=loaded.device)
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "max_new_tokens": live.max_new_tokens,
            # Sampling, when asked for, is done by _SeededSampler; unset the model's defaults.
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "streamer": stream,
            "stopping_criteria": transformers.StoppingCriteriaList(
                [_Interrupt(torch, live.interrupt)]
            ),
        }
        if loaded.pad_id is not None:
            kwargs["pad_token_id"] = loaded.pad_id
        if sampling.temperature > 0:
            warpers: list[Any] = []
            if sampling.temperature != 1.0:
                warpers.append(transformers.TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                warpers.append(transformers.TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                warpers.append(transformers.TopPLogitsWarper(sampling.top_p))
            generator = torch.Generator(device=loaded.device)
            seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
            generator.manual_seed(seed)
            kwargs["logits_processor"] = transformers.LogitsProcessorList(
                [_SeededSampler(torch, warpers, generator)]
            )
        loaded.model.generate(**kwargs)
        stream.finish()
        return stream.finish_reason()


def _version_tuple(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string such as ``5.23.0`` or ``4.57.0.dev0``."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


__all__ = ["HfEngine", "HfSettings", "IncrementalDecoder"]
