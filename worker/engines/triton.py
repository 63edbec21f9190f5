"""The ``triton`` engine: a Triton Inference Server with the TensorRT-LLM backend, over gRPC.

The worker calls ``ensemble`` or ``tensorrt_llm_bls`` of Triton's ``inflight_batcher_llm`` model
repository (``--triton-model``) with ``tritonclient.grpc.aio``. Its ``tensorrt_llm`` model runs in
decoupled mode, so answers stream on the bidirectional ``ModelStreamInfer`` RPC, one stream per
request::

    generate(request)
      └─ stream_infer(one request; then the request side closes)
           ├─ (InferResult, None) ─ text_output: the new text ─▶ TextDelta (stop strings cut here)
           ├─ (None, error)       ─ the model failed the request ▶ RequestFailed
           └─ the end of the answer: the first response flagged triton_final_response, or the
              server ending the stream
    abort(), aclose(), the deadline ─▶ call.cancel(): Triton cancels the request (slot, KV freed)

Decisions worth knowing:

- **The end of an answer.** Triton flags every streamed response with ``triton_final_response``.
  The ensemble sets it on its last response with data; ``tensorrt_llm_bls`` sets it only on an
  extra *empty* response, which Triton sends only to a request that asked with the parameter
  ``triton_enable_empty_final_response``. The aio client cannot ask: its request dicts have no
  such key (only the sync client's ``async_stream_infer(enable_empty_final_response=True)`` sets
  it) and ``parameters`` refuses ``triton_*`` names. Nor does it need to: the request side of each
  stream closes after its one request, and Triton ends a stream whose requests have all completed
  (``ModelStreamInferHandler::Finish``), so the end of the stream is the end of the answer. A
  response flagged final (the ensemble's, or an empty one) ends the answer at once.
- **Inputs** follow the model's metadata, read once at start: the leading batch dimension (shape
  ``[1, 1]``; ``stop_words`` ``[1, N]``), each input's datatype as the model declares it, and the
  optional inputs (``top_k``, ``seed``, ``stop_words``, ``return_num_input_tokens``, ...) only
  when the model has them. Greedy decoding (temperature 0) is sent as ``top_k=1``.
- **Continuation.** ``text_input`` is the request's prompt followed by its continuation, and
  ``exclude_input_in_output`` keeps both out of the text that comes back.
- **Finish reason.** Triton does not say why generation ended: "length" when the output tokens
  reached ``max_tokens``, else "stop" (an end-of-sequence token or a stop word).
- **Token counts** come from the ``num_input_tokens``/``num_output_tokens`` outputs when the model
  has them (a streamed response counts the tokens it carries, as the ``tensorrt_llm`` model
  reports them; a sum beyond ``max_tokens`` can only be cumulative counts, and the largest is
  taken). Without them the prompt is estimated at four characters a token (there is no tokenizer
  on this side; :meth:`TritonEngine.count_tokens` estimates the same way) and every response with
  data counts one token.
- **Queue time** comes from the ``arrival_time_ns``/``first_scheduled_time_ns`` outputs
  (``return_perf_metrics``) when the model has them, else it is reported as 0.
- **Stop strings** are sent as ``stop_words`` and enforced again here: TensorRT-LLM matches them
  on tokens and returns the stop word with the text. The text never includes a stop string; text
  that may begin one is held back until it cannot.
- **Failures.** An error response in the stream (``error_message``: the TensorRT-LLM backend
  sends one for a request the executor refused or failed, as ``TRITONBACKEND_ResponseSend`` with
  an error for that request) and a stream that ends with a status that is not about the
  connection (``INVALID_ARGUMENT`` and the like, with ``triton_grpc_error``) fail that request
  alone: :class:`~llmmesh.errors.RequestFailed` (INVALID_ARGUMENT for Triton's, else INTERNAL),
  and the engine stays healthy. Whether the server is down is for the health checks to say
  (an error response makes the next one come at once); a connection failure makes the engine
  unhealthy (:class:`EngineError`).
- **Health**: ``is_model_ready`` every second, and soon after a connection failure or an error
  response; a failed stream's ``UNAVAILABLE`` makes the engine unhealthy until the model is ready
  again.
- **Load** from Triton's Prometheus metrics, polled every half second (see
  :class:`TritonMetrics`); while they are unavailable, from this engine's requests in flight.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import math
import re
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
import structlog

from llmmesh.errors import RequestFailed
from worker.engines._base import (
    Completion,
    EngineError,
    EngineInfo,
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    TextDelta,
    wait_event,
)

if TYPE_CHECKING:
    from worker._config import WorkerConfig

log = structlog.get_logger(__name__)

#: Prompt tokens are estimated at this many characters a token (no tokenizer on this side).
CHARS_PER_TOKEN = 4
#: The model whose ``nv_trt_llm_*`` metrics the ensemble and tensorrt_llm_bls both drive.
TRTLLM_MODEL = "tensorrt_llm"
#: Inputs every TensorRT-LLM text model has; outputs the same.
REQUIRED_INPUTS = ("text_input", "max_tokens")
REQUIRED_OUTPUTS = ("text_output",)
#: A metrics page larger than this is refused.
MAX_METRICS_BYTES = 8 * 1024 * 1024
#: gRPC status codes that mean Triton is unreachable or failing, not that the request was bad.
_CONNECTION_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
#: Channel options: Triton's message limits, and quick reconnection to a server that came back.
_CHANNEL_ARGS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True, kw_only=True)
class TritonSettings:
    """Where the Triton server is, what it serves, and how the engine watches it."""

    #: gRPC address of the Triton server.
    url: str = "127.0.0.1:8001"
    #: The Triton model called: ``ensemble`` or ``tensorrt_llm_bls``.
    triton_model: str = "ensemble"
    #: Prometheus metrics URL (plain HTTP); empty: load from this engine's requests in flight.
    metrics_url: str = "http://127.0.0.1:8002/metrics"
    #: The model name the worker serves (what requests name), and its version.
    model: str = "llama"
    model_version: str = "1"
    #: Most requests running at once, until the metrics report Triton's own maximum.
    capacity: int = 64
    max_prompt_tokens: int = 32_768
    #: The model whose ``nv_trt_llm_*`` metrics describe the batch.
    trtllm_model: str = TRTLLM_MODEL
    #: :meth:`TritonEngine.start` waits this long for the server and the model to be ready.
    ready_timeout: float = 30.0
    #: How often readiness is checked, and metrics polled, in seconds.
    health_interval: float = 1.0
    metrics_interval: float = 0.5
    #: Time limit of one readiness or metadata call, and of one metrics request, in seconds.
    rpc_timeout: float = 2.0
    metrics_timeout: float = 2.0
    #: After the final response, how long to wait for Triton to end the stream.
    drain_timeout: float = 1.0

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("url: must name the Triton server's gRPC address")
        if self.metrics_url and urllib.parse.urlsplit(self.metrics_url).scheme != "http":
            raise ValueError(f"metrics_url: must be an http:// URL (got {self.metrics_url!r})")
        if self.capacity < 1 or self.max_prompt_tokens < 1:
            raise ValueError("capacity, max_prompt_tokens: must be >= 1")
        for name in (
            "ready_timeout",
            "health_interval",
            "metrics_interval",
            "rpc_timeout",
            "metrics_timeout",
            "drain_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")


# -- Prometheus metrics --------------------------------------------------------------------------

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_PENDING = "nv_inference_pending_request_count"
_REQUESTS = "nv_trt_llm_request_metrics"
_KV_BLOCKS = "nv_trt_llm_kv_cache_block_metrics"


def parse_prometheus(text: str, names: Iterable[str]) -> list[tuple[str, dict[str, str], float]]:
    """The samples of the metric families ``names`` in Prometheus text: (name, labels, value)."""
    wanted = frozenset(names)
    samples: list[tuple[str, dict[str, str], float]] = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line.strip())
        if match is None or match["name"] not in wanted:
            continue
        try:
            value = float(match["value"])
        except ValueError:
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        samples.append((match["name"], labels, value))
    return samples


@dataclass(frozen=True, kw_only=True)
class TritonMetrics:
    """The load figures of one Triton metrics page.

    - ``nv_trt_llm_request_metrics{request_type=...}`` of the ``tensorrt_llm`` model: ``active``,
      ``max``, ``scheduled``, ``context`` and ``waiting`` requests (TensorRT-LLM's iteration
      statistics, as the backend fills them in ``triton_backend/inflight_batcher_llm/src/
      model_instance_state.cc``, ``WaitForStats``: ``active`` is ``numActiveRequests``, every
      request the executor holds, scheduled or not; ``scheduled`` is ``numScheduledRequests``,
      those in this iteration's batch; ``waiting`` is ``numActiveRequests -
      numScheduledRequests``, and exists only in newer backends);
    - ``nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=...}``: ``max``, ``free``, ``used``
      blocks, ``tokens_per`` block, used ``fraction``;
    - ``nv_inference_pending_request_count`` of the called model and of ``tensorrt_llm``: requests
      in Triton's scheduler queues, not yet handed to the model.
    """

    active: int = 0
    max_requests: int = 0
    scheduled: int = 0
    context: int = 0
    waiting: int = 0
    pending: int = 0
    kv_max_blocks: int = 0
    kv_free_blocks: int = 0
    kv_used_blocks: int = 0
    kv_tokens_per_block: int = 0
    kv_fraction: float | None = None

    #: Which of ``scheduled`` and ``waiting`` the page had (older backends lack ``waiting``).
    has_scheduled: bool = False
    has_waiting: bool = False

    @property
    def running(self) -> int:
        """Requests in the running batch: ``scheduled``. Not ``active``, which counts the
        waiting ones too (so reporting it as active counted them twice: once there, once in
        :attr:`queued`)."""
        if self.has_scheduled:
            return self.scheduled
        return max(0, self.active - self.waiting)

    @property
    def queued(self) -> int:
        """Requests waiting: in TensorRT-LLM for a batch slot (``waiting``, else ``active -
        scheduled``) and in Triton's scheduler queues (``pending``)."""
        if self.has_waiting:
            waiting = self.waiting
        elif self.has_scheduled:
            waiting = max(0, self.active - self.scheduled)
        else:
            waiting = 0
        return waiting + self.pending

    @property
    def kv_cache_used_fraction(self) -> float:
        """Used KV blocks over all blocks, in [0, 1] (the reported fraction when blocks are not)."""
        if self.kv_max_blocks > 0:
            fraction = self.kv_used_blocks / self.kv_max_blocks
        else:
            fraction = self.kv_fraction or 0.0
        return min(1.0, max(0.0, fraction)) if math.isfinite(fraction) else 0.0

    @classmethod
    def parse(
        cls, text: str, *, triton_model: str, trtllm_model: str = TRTLLM_MODEL
    ) -> TritonMetrics:
        """The figures in ``text``, a metrics page of a server that serves ``triton_model``."""
        samples = parse_prometheus(text, (_PENDING, _REQUESTS, _KV_BLOCKS))
        trtllm = [s for s in samples if s[0] != _PENDING and s[1].get("model") == trtllm_model]
        if not trtllm:  # a server that names its TensorRT-LLM model otherwise: take what is there
            trtllm = [s for s in samples if s[0] != _PENDING]
        requests: dict[str, float] = {}
        blocks: dict[str, float] = {}
        for name, labels, value in trtllm:
            if name == _REQUESTS and "request_type" in labels:
                kind = labels["request_type"]
                requests[kind] = requests.get(kind, 0.0) + value
            elif name == _KV_BLOCKS and "kv_cache_block_type" in labels:
                kind = labels["kv_cache_block_type"]
                blocks[kind] = blocks.get(kind, 0.0) + value
        pending = sum(
            value
            for name, labels, value in samples
            if name == _PENDING and labels.get("model") in (triton_model, trtllm_model)
        )

        def count(table: dict[str, float], key: str) -> int:
            value = table.get(key, 0.0)
            return max(0, int(value)) if math.isfinite(value) else 0

        return cls(
            active=count(requests, "active"),
            max_requests=count(requests, "max"),
            scheduled=count(requests, "scheduled"),
            context=count(requests, "context"),
            waiting=count(requests, "waiting"),
            pending=max(0, int(pending)) if math.isfinite(pending) else 0,
            has_scheduled="scheduled" in requests,
            has_waiting="waiting" in requests,
            kv_max_blocks=count(blocks, "max"),
            kv_free_blocks=count(blocks, "free"),
            kv_used_blocks=count(blocks, "used"),
            kv_tokens_per_block=count(blocks, "tokens_per"),
            kv_fraction=blocks.get("fraction"),
        )


async def fetch_text(url: str, *, timeout: float, limit: int = MAX_METRICS_BYTES) -> str:
    """GET ``url`` (plain HTTP/1.1) within ``timeout`` seconds: the body of a 200 answer.

    Raises OSError for a connection failure or another status, TimeoutError, ValueError for a
    malformed or oversized answer.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"not an http:// URL: {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = (
        f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nAccept: text/plain\r\n"
        "Accept-Encoding: identity\r\nConnection: close\r\nUser-Agent: llm-mesh\r\n\r\n"
    )
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
        try:
            writer.write(request.encode("ascii"))
            await writer.drain()
            status = (await reader.readline()).split(None, 2)
            if len(status) < 2 or not status[0].startswith(b"HTTP/"):
                raise ValueError(f"not an HTTP answer from {url}")
            headers: dict[str, str] = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
            if status[1] != b"200":
                raise OSError(f"{url} answered HTTP {status[1].decode('latin-1')}")
            body = await _read_body(reader, headers, limit)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return body.decode("utf-8", errors="replace")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> bytes:
    body = bytearray()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            if len(body) + size > limit:
                raise ValueError(f"metrics page larger than {limit} bytes")
            body += await reader.readexactly(size)
            await reader.readexactly(2)  # the CRLF after each chunk
        return bytes(body)
    if "content-length" in headers:
        length = int(headers["content-length"])
        if length > limit:
            raise ValueError(f"metrics page larger than {limit} bytes")
        return await reader.readexactly(length)
    while chunk := await reader.read(65536):
        body += chunk
        if len(body) > limit:
            raise ValueError(f"metrics page larger than {limit} bytes")
    return bytes(body)


# -- one request ---------------------------------------------------------------------------------


class _StopFilter:
    """Cuts the text before the first stop string, holding back what may begin one."""

    __slots__ = ("emitted", "hold", "stops", "text")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        """The text that is safe to hand on now, and whether a stop string ended the answer."""
        if not self.stops:
            return delta, False
        start = max(0, len(self.text) - self.hold)  # a new match ends inside ``delta``
        self.text += delta
        found = -1
        for stop in self.stops:
            at = self.text.find(stop, start)
            if at >= 0 and (found < 0 or at < found):
                found = at
        if found >= 0:
            out = self.text[self.emitted : found]
            self.emitted = found
            return out, True
        safe = max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : safe]
        self.emitted = safe
        return out, False

    def flush(self) -> str:
        """The held-back text, once the answer has ended without a stop string."""
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


class _Usage:
    """Token counts and queue time gathered from a request's responses."""

    __slots__ = (
        "arrival_ns",
        "data_responses",
        "max_reported",
        "prompt",
        "reported",
        "scheduled_ns",
    )

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.reported: int | None = None
        self.max_reported = 0
        self.data_responses = 0
        self.arrival_ns = 0
        self.scheduled_ns = 0

    def add(self, result: Any) -> None:
        self.data_responses += 1
        prompt = _scalar(result, "num_input_tokens")
        if prompt is not None:
            self.prompt = int(prompt)
        output = _scalar(result, "num_output_tokens")
        if output is not None:
            self.reported = (self.reported or 0) + int(output)
            self.max_reported = max(self.max_reported, int(output))
        arrival = _scalar(result, "arrival_time_ns")
        scheduled = _scalar(result, "first_scheduled_time_ns")
        if arrival and scheduled and not self.scheduled_ns:
            self.arrival_ns, self.scheduled_ns = int(arrival), int(scheduled)

    def completion_tokens(self, max_tokens: int) -> int:
        if self.reported is None:
            return self.data_responses
        return self.reported if self.reported <= max_tokens else self.max_reported

    @property
    def queue_s(self) -> float:
        return max(0.0, (self.scheduled_ns - self.arrival_ns) / 1e9) if self.scheduled_ns else 0.0


def _scalar(result: Any, name: str) -> Any:
    """The first element of output ``name`` of an InferResult, or None."""
    array = result.as_numpy(name)
    if array is None or array.size == 0:
        return None
    return array.reshape(-1)[0]


def _is_final(result: Any) -> bool:
    parameters = result.get_response().parameters
    return "triton_final_response" in parameters and bool(
        parameters["triton_final_response"].bool_param
    )


def _has_data(result: Any) -> bool:
    return len(result.get_response().outputs) > 0


async def _single(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The request side of a stream: one request, then closed."""
    yield request


def _really_cancelled() -> bool:
    """True when the current task is being cancelled (not only a gRPC call of ours)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _timeout_at(deadline: float | None) -> contextlib.AbstractAsyncContextManager[Any]:
    """A timeout at ``deadline`` (``time.monotonic()`` seconds), or none."""
    if deadline is None:
        return contextlib.nullcontext()
    loop = asyncio.get_running_loop()
    return asyncio.timeout_at(loop.time() + (deadline - time.monotonic()))


@dataclass(frozen=True)
class _ModelIO:
    """The inputs (name: datatype) and outputs of the Triton model, from its metadata."""

    inputs: dict[str, str]
    outputs: frozenset[str]

    @classmethod
    def from_metadata(cls, model: str, metadata: Any) -> _ModelIO:
        inputs = {tensor.name: tensor.datatype for tensor in metadata.inputs}
        outputs = frozenset(tensor.name for tensor in metadata.outputs)
        missing = [f"input {n}" for n in REQUIRED_INPUTS if n not in inputs]
        missing += [f"output {n}" for n in REQUIRED_OUTPUTS if n not in outputs]
        if missing:
            raise EngineError(
                f"Triton model {model!r} has no {', '.join(missing)}: it is not a TensorRT-LLM "
                "text model (use ensemble or tensorrt_llm_bls of inflight_batcher_llm)"
            )
        return cls(inputs, outputs)


class _Stream:
    """A request's stream, and why this side ended it (abort, stop), if it did."""

    __slots__ = ("call", "ended_by")

    def __init__(self, call: Any) -> None:
        self.call = call
        self.ended_by: FinishReason | None = None

    def cancel(self, reason: FinishReason) -> None:
        if self.ended_by is None:
            self.ended_by = reason
        self.call.cancel()


# -- the engine ----------------------------------------------------------------------------------


class TritonEngine:
    """A Triton server with the TensorRT-LLM backend (see the module docstring). An Engine."""

    def __init__(self, settings: TritonSettings) -> None:
        self.settings = settings
        self._client: Any = None
        self._grpcclient: Any = None
        self._triton_to_np_dtype: Any = None
        self._io: _ModelIO | None = None
        self._streams: dict[str, _Stream] = {}
        self._metrics: TritonMetrics | None = None
        self._metrics_ok: bool | None = None
        self._healthy = False
        self._recheck = asyncio.Event()
        self._load_changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = False
        self._stopped = False

    @classmethod
    def from_config(cls, config: WorkerConfig) -> TritonEngine:
        """The engine a worker's configuration describes."""
        return cls(
            TritonSettings(
                url=config.triton_url,
                triton_model=config.triton_model,
                metrics_url=config.triton_metrics_url,
                model=config.model or config.triton_model,
                model_version=config.model_version or config.triton_model,
                capacity=config.capacity,
                max_prompt_tokens=config.max_prompt_tokens,
            )
        )

    # -- Engine interface ----------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("triton engine already started")
        self._started = True
        try:
            import tritonclient.grpc.aio as grpcclient
            import tritonclient.utils as triton_utils
        except ImportError as exc:
            raise EngineError(
                f"the triton engine needs tritonclient ({exc}); install the triton extra: "
                "pip install 'llm-mesh[triton]'"
            ) from exc
        s = self.settings
        self._grpcclient = grpcclient
        self._triton_to_np_dtype = triton_utils.triton_to_np_dtype
        self._client = grpcclient.InferenceServerClient(url=s.url, channel_args=_CHANNEL_ARGS)
        try:
            await self._wait_ready()
            try:
                metadata = await self._client.get_model_metadata(
                    s.triton_model, client_timeout=s.rpc_timeout
                )
            except Exception as exc:
                raise EngineError(
                    f"Triton at {s.url}: no metadata for model {s.triton_model!r}: {exc}"
                ) from exc
            self._io = _ModelIO.from_metadata(s.triton_model, metadata)
        except BaseException:
            await self._client.close()
            self._stopped = True
            raise
        self._healthy = True
        if s.metrics_url:
            await self._refresh_metrics()
            self._spawn(self._poll_metrics(), "triton-metrics")
        self._spawn(self._watch_health(), "triton-health")
        log.info(
            "engine started",
            engine="triton",
            url=s.url,
            triton_model=s.triton_model,
            metrics_url=s.metrics_url,
            model=s.model,
            capacity=self._capacity(),
        )

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for stream in list(self._streams.values()):
            stream.cancel("cancelled")  # each ends with "cancelled" at its next read
        if self._client is not None:
            await self._client.close()
        self._notify_load()

    async def generate(
        self, request: EngineRequest
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        if not self._started or self._stopped or self._client is None or self._io is None:
            raise EngineError("triton engine is not running")
        if request.request_id in self._streams:
            raise EngineError(f"request id {request.request_id!r} is already running")
        sampling = request.sampling
        if request.deadline is not None and time.monotonic() >= request.deadline:
            yield Completion(
                finish_reason="timeout",
                prompt_tokens=self.count_tokens(request.input_text),
                completion_tokens=0,
                queue_s=0.0,
            )
            return
        inputs, outputs = self._request_tensors(request)
        call = self._client.stream_infer(
            inputs_iterator=_single(
                {
                    "model_name": self.settings.triton_model,
                    "inputs": inputs,
                    "outputs": outputs,
                    "request_id": request.request_id,
                }
            )
        )
        stream = self._streams[request.request_id] = _Stream(call)
        self._notify_load()
        stops = _StopFilter(sampling.stop)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        usage = _Usage()
        reason: FinishReason | None = None
        final = False
        handed_off = False  # to a task that reads the stream to its end
        try:
            while True:
                try:
                    async with _timeout_at(request.deadline):
                        item = await anext(call, None)
                except TimeoutError:
                    reason = "timeout"
                    break
                except asyncio.CancelledError:
                    if stream.ended_by is None or _really_cancelled():
                        raise
                    reason = stream.ended_by  # abort() or stop() cancelled the call
                    break
                except grpc.RpcError as exc:
                    raise self._stream_failed(exc) from None
                if item is None:  # Triton ended the stream: the request has completed
                    break
                result, error = item
                if error is not None:
                    # This request's error response (module doc): the server serves on; a
                    # health check at once tells whether the model itself went down.
                    self._recheck.set()
                    raise RequestFailed(
                        f"Triton model {self.settings.triton_model!r} failed the request: "
                        f"{error.message()}"
                    )
                final = _is_final(result)
                if _has_data(result):
                    usage.add(result)
                    raw = _scalar(result, "text_output")
                    text = raw if isinstance(raw, str) else decoder.decode(raw or b"")
                    out, stopped = stops.feed(text)
                    if out:
                        yield TextDelta(out)
                    if stopped:
                        reason = "stop"
                        break
                if final:
                    break
            if reason is None:
                out, stopped = stops.feed(decoder.decode(b"", final=True))
                out += "" if stopped else stops.flush()
                if out:
                    yield TextDelta(out)
                completion_tokens = usage.completion_tokens(sampling.max_tokens)
                reason = "length" if completion_tokens >= sampling.max_tokens else "stop"
            if final and not self._stopped:
                # The answer is complete; Triton ends the stream in a moment. Let it, rather than
                # cancel a finished request, without holding the caller's last chunk.
                self._spawn(self._drain(call), f"triton-drain-{request.request_id}")
                handed_off = True
            yield Completion(
                finish_reason=reason,
                prompt_tokens=usage.prompt
                if usage.prompt is not None
                else self.count_tokens(request.input_text),
                completion_tokens=usage.completion_tokens(sampling.max_tokens),
                queue_s=usage.queue_s,
            )
        finally:
            if not handed_off:
                call.cancel()  # a no-op when Triton has ended the stream
            del self._streams[request.request_id]
            self._notify_load()

    async def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel("cancelled")

    def count_tokens(self, text: str) -> int:
        """An estimate: one token per four characters (Triton tokenizes; this side cannot)."""
        return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))

    def load(self) -> LoadSnapshot:
        metrics = self._metrics
        capacity = self._capacity()
        if metrics is not None:
            active, queued = metrics.running, metrics.queued
            kv = metrics.kv_cache_used_fraction
        else:
            in_flight = len(self._streams)
            active, queued, kv = min(in_flight, capacity), max(0, in_flight - capacity), 0.0
        return LoadSnapshot(
            active=active,
            queued=queued,
            capacity=capacity,
            kv_cache_used_fraction=kv,
            healthy=self._started and not self._stopped and self._healthy,
        )

    async def wait_load_change(self, timeout: float) -> bool:
        return await wait_event(self._load_changed, timeout)

    def info(self) -> EngineInfo:
        s = self.settings
        return EngineInfo(
            engine="triton",
            model=s.model,
            model_version=s.model_version,
            capacity=self._capacity(),
            max_prompt_tokens=s.max_prompt_tokens,
        )

    # -- requests ------------------------------------------------------------------------------

    def _request_tensors(self, request: EngineRequest) -> tuple[list[Any], list[Any]]:
        """The request's input tensors (batch of one) and requested outputs, for this model."""
        import numpy as np

        assert self._io is not None
        io, grpcclient = self._io, self._grpcclient
        s = request.sampling
        rows: dict[str, list[Any]] = {
            "text_input": [request.input_text.encode()],  # the prompt, then the continuation
            "max_tokens": [s.max_tokens],
            "stream": [True],
            "exclude_input_in_output": [True],
        }
        if s.temperature == 0:
            rows["top_k"] = [1]  # greedy; TensorRT-LLM wants a positive temperature
        else:
            rows["temperature"] = [s.temperature]
            rows["top_p"] = [s.top_p]
            if s.top_k > 0:
                rows["top_k"] = [s.top_k]
        if s.seed is not None:
            rows["seed"] = [s.seed % 2**64]
        if s.stop:
            rows["stop_words"] = [stop.encode() for stop in s.stop]  # shape [1, N]
        outputs = list(REQUIRED_OUTPUTS)
        for flag, wanted in (
            ("return_num_input_tokens", ("num_input_tokens",)),
            ("return_num_output_tokens", ("num_output_tokens",)),
            ("return_perf_metrics", ("arrival_time_ns", "first_scheduled_time_ns")),
        ):
            if flag in io.inputs and io.outputs.issuperset(wanted):
                rows[flag] = [True]
                outputs += wanted
        inputs = []
        for name, row in rows.items():
            datatype = io.inputs.get(name)
            if datatype is None:
                continue  # an optional input this model does not have
            try:
                dtype = np.object_ if datatype == "BYTES" else self._triton_to_np_dtype(datatype)
                array = np.array([row], dtype=dtype)
                tensor = grpcclient.InferInput(name, list(array.shape), datatype)
                tensor.set_data_from_numpy(array)
            except Exception as exc:
                raise EngineError(
                    f"Triton model {self.settings.triton_model!r}: cannot send input {name!r} "
                    f"as {datatype}: {exc}"
                ) from exc
            inputs.append(tensor)
        return inputs, [grpcclient.InferRequestedOutput(name) for name in outputs]

    def _stream_failed(self, exc: grpc.RpcError) -> EngineError | RequestFailed:
        """The error for a stream that failed with gRPC status: a connection failure makes the
        engine unhealthy until the model is ready again (EngineError); any other status is
        Triton's answer to this request alone (RequestFailed, without Triton's address)."""
        s = self.settings
        if isinstance(exc, grpc.aio.AioRpcError):
            code, details = exc.code(), exc.details() or ""
        else:  # pragma: no cover - grpc.aio raises AioRpcError
            code, details = grpc.StatusCode.UNKNOWN, str(exc)
        if code in _CONNECTION_CODES:
            self._set_healthy(False, f"stream failed with {code.name}: {details}")
            self._recheck.set()
            return EngineError(f"Triton at {s.url} ({s.triton_model}): {code.name}: {details}")
        return RequestFailed(
            f"Triton model {s.triton_model!r} refused the request: {code.name}: {details}",
            invalid=code == grpc.StatusCode.INVALID_ARGUMENT,
        )

    async def _drain(self, call: Any) -> None:
        """Read to the end of a stream whose answer is complete, so it ends uncancelled."""
        try:
            async with asyncio.timeout(self.settings.drain_timeout):
                while await anext(call, None) is not None:
                    pass
        except Exception:
            pass  # the answer is complete: how the stream ends no longer matters
        finally:
            call.cancel()  # a no-op once the stream has ended

    # -- health and load -----------------------------------------------------------------------

    async def _wait_ready(self) -> None:
        """Wait until the server is live and ready and the model is ready (bounded)."""
        s = self.settings
        client = self._client
        deadline = time.monotonic() + s.ready_timeout
        why = ""
        while True:
            limit = max(0.05, min(s.rpc_timeout, deadline - time.monotonic()))
            try:
                if not await client.is_server_live(client_timeout=limit):
                    why = "the server is not live"
                elif not await client.is_server_ready(client_timeout=limit):
                    why = "the server is not ready"
                elif not await client.is_model_ready(s.triton_model, client_timeout=limit):
                    why = f"model {s.triton_model!r} is not ready"
                else:
                    return
            except Exception as exc:
                why = f"the server is unreachable ({exc})"
            if time.monotonic() >= deadline:
                raise EngineError(
                    f"Triton at {s.url}: model {s.triton_model!r} not ready within "
                    f"{s.ready_timeout:g}s: {why}"
                )
            await asyncio.sleep(min(0.1, max(0.0, deadline - time.monotonic())))

    async def _probe(self) -> tuple[bool, str]:
        """Whether the model is ready now, and why not."""
        s = self.settings
        try:
            ready = await self._client.is_model_ready(s.triton_model, client_timeout=s.rpc_timeout)
        except Exception as exc:
            return False, f"the server is unreachable ({exc})"
        return bool(ready), "" if ready else f"model {s.triton_model!r} is not ready"

    async def _watch_health(self) -> None:
        while True:
            await wait_event(self._recheck, self.settings.health_interval)
            self._recheck.clear()
            ready, why = await self._probe()
            self._set_healthy(ready, why)

    def _set_healthy(self, healthy: bool, why: str) -> None:
        if healthy == self._healthy:
            return
        self._healthy = healthy
        s = self.settings
        if healthy:
            log.info("triton model ready", url=s.url, triton_model=s.triton_model)
        else:
            log.error("triton model unavailable", url=s.url, triton_model=s.triton_model, why=why)
        self._notify_load()

    async def _poll_metrics(self) -> None:
        while True:
            await asyncio.sleep(self.settings.metrics_interval)
            await self._refresh_metrics()

    async def _refresh_metrics(self) -> None:
        s = self.settings
        try:
            text = await fetch_text(s.metrics_url, timeout=s.metrics_timeout)
            metrics = TritonMetrics.parse(
                text, triton_model=s.triton_model, trtllm_model=s.trtllm_model
            )
        except Exception as exc:  # the load falls back to the requests in flight
            if self._metrics_ok is not False:
                log.warning("triton metrics unavailable", url=s.metrics_url, error=repr(exc))
            self._metrics_ok = False
            if self._metrics is not None:
                self._metrics = None
                self._notify_load()
            return
        if self._metrics_ok is False:
            log.info("triton metrics available", url=s.metrics_url)
        self._metrics_ok = True
        if metrics != self._metrics:
            self._metrics = metrics
            self._notify_load()

    def _capacity(self) -> int:
        metrics = self._metrics
        if metrics is not None and metrics.max_requests > 0:
            return metrics.max_requests
        return self.settings.capacity

    def _notify_load(self) -> None:
        self._load_changed.set()
        self._load_changed = asyncio.Event()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._on_task_done)
        self._tasks.add(task)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        log.error("triton engine task failed", task=task.get_name(), exc_info=task.exception())
        self._set_healthy(False, f"{task.get_name()} failed")


__all__ = [
    "TritonEngine",
    "TritonMetrics",
    "TritonSettings",
    "fetch_text",
    "parse_prometheus",
]
