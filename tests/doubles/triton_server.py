"""A Triton Inference Server double: Triton's gRPC API with the TensorRT-LLM backend, and metrics.

Built from the stubs that ship in ``tritonclient`` (``service_pb2``, ``service_pb2_grpc``), on
``grpc.aio`` at 127.0.0.1, it serves the two text models of Triton's ``inflight_batcher_llm``
repository, ``ensemble`` and ``tensorrt_llm_bls``, as upstream does:

- ``ServerLive``, ``ServerReady``, ``ModelReady`` (per model; :meth:`TritonDouble.set_model_ready`)
  and ``ModelMetadata`` (the inputs and outputs of the upstream ensemble's config.pbtxt, with the
  leading batch dimension ``-1``).
- ``ModelStreamInfer``: each request is checked as Triton checks it (input names, datatypes, shapes
  with the batch dimension, requested outputs; errors come back as ``error_message``), then
  answered with one response per token: ``text_output`` BYTES ``[1, 1]`` (the new text, 4-byte
  little-endian length-prefixed in ``raw_output_contents``), ``num_input_tokens`` /
  ``num_output_tokens`` INT32 ``[1, 1]`` (the tokens this response carries) when asked for with
  ``return_num_*_tokens``, ``arrival_time_ns`` / ``first_scheduled_time_ns`` with
  ``return_perf_metrics``. Every response carries ``triton_final_response``: the ``ensemble``
  sets it on its last response with data; ``tensorrt_llm_bls`` sends an extra empty response with
  it, and only to a request with ``triton_enable_empty_final_response``, otherwise never. A stream
  ends (status OK) once the client has closed its side and every request of it has completed,
  as Triton's ``ModelStreamInferHandler`` does.
- Text is deterministic: :meth:`TritonDouble.answer` of (prompt, seed), ``answer_tokens`` words
  and then an end-of-sequence token (one token, no text). ``max_tokens`` bounds the tokens,
  ``stop_words`` end the answer after the token that completes one (which is sent, as
  TensorRT-LLM sends it). Prompt tokens are the prompt's words plus one.
- Knobs: ``token_delay``, ``fail_after_tokens`` (an ``error_message`` mid-stream),
  ``max_input_len`` (a longer prompt gets an ``error_message`` for that request alone), per-model
  readiness, ``server_live``/``server_ready``, :meth:`stop_grpc`/:meth:`start_grpc` (the server
  goes away and comes back on the same port), ``honour_stop_words``, ``hold_streams_open`` (a
  stream that stays open after its requests complete), ``metrics_status``, ``metrics_chunked``.
- Records: ``requests`` (every valid request, decoded), ``cancelled`` (ids of requests whose stream
  ended before they completed: the client cancelled it, or the server went down) and
  ``completed``.
- Metrics: ``GET /metrics`` on its own HTTP port, Prometheus text with
  ``nv_inference_pending_request_count``, ``nv_trt_llm_request_metrics{request_type=...}`` and
  ``nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=...}`` from the live counts: up to
  ``max_active`` requests run at once ("scheduled"), the rest wait ("waiting"), and "active" is
  both, as upstream's backend reports them (``active`` = ``scheduled`` + ``waiting``).

Runnable alone: ``python tests/doubles/triton_server.py --port P --metrics-port M`` prints
``{"port": ..., "metrics_port": ...}`` on one line once serving, and runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import random
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

MODELS = ("ensemble", "tensorrt_llm_bls")
MODEL_VERSION = "1"
#: The model behind both, whose nv_trt_llm_* metrics describe the batch.
TRTLLM_MODEL = "tensorrt_llm"
MAX_BATCH_SIZE = 64

_WORDS = """
    alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november
    oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee zulu river stone
    cloud maple cedar harbor lantern meadow orbit prism quartz signal timber valley willow
"""
VOCABULARY = tuple(_WORDS.split())


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a model config: dims without the batch dimension."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = True


#: The upstream ensemble's inputs (triton_backend/all_models/inflight_batcher_llm/ensemble).
INPUTS = (
    TensorSpec("text_input", "BYTES", (1,), optional=False),
    TensorSpec("max_tokens", "INT32", (1,), optional=False),
    TensorSpec("bad_words", "BYTES", (-1,)),
    TensorSpec("stop_words", "BYTES", (-1,)),
    TensorSpec("exclude_input_in_output", "BOOL", (1,)),
    TensorSpec("end_id", "INT32", (1,)),
    TensorSpec("pad_id", "INT32", (1,)),
    TensorSpec("top_k", "INT32", (1,)),
    TensorSpec("top_p", "FP32", (1,)),
    TensorSpec("temperature", "FP32", (1,)),
    TensorSpec("length_penalty", "FP32", (1,)),
    TensorSpec("repetition_penalty", "FP32", (1,)),
    TensorSpec("min_tokens", "INT32", (1,)),
    TensorSpec("presence_penalty", "FP32", (1,)),
    TensorSpec("frequency_penalty", "FP32", (1,)),
    TensorSpec("seed", "UINT64", (1,)),
    TensorSpec("return_log_probs", "BOOL", (1,)),
    TensorSpec("return_perf_metrics", "BOOL", (1,)),
    TensorSpec("return_num_input_tokens", "BOOL", (1,)),
    TensorSpec("return_num_output_tokens", "BOOL", (1,)),
    TensorSpec("beam_width", "INT32", (1,)),
    TensorSpec("stream", "BOOL", (1,)),
)
OUTPUTS = (
    TensorSpec("text_output", "BYTES", (-1,)),
    TensorSpec("cum_log_probs", "FP32", (-1,)),
    TensorSpec("arrival_time_ns", "INT64", (1,)),
    TensorSpec("first_scheduled_time_ns", "INT64", (1,)),
    TensorSpec("num_input_tokens", "INT32", (1,)),
    TensorSpec("num_output_tokens", "INT32", (1,)),
)
#: What a repository from before token counts and perf metrics lacks (``token_counts=False``).
TOKEN_COUNT_TENSORS = frozenset(
    {
        "return_num_input_tokens",
        "return_num_output_tokens",
        "num_input_tokens",
        "num_output_tokens",
        "return_perf_metrics",
        "arrival_time_ns",
        "first_scheduled_time_ns",
    }
)

_Context = grpc.aio.ServicerContext[Any, Any]
_Emit = Callable[[service_pb2.ModelStreamInferResponse], None]
_END = object()


@dataclass(frozen=True)
class RecordedTensor:
    """An input tensor as a request sent it."""

    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray[Any, Any]

    @property
    def value(self) -> Any:
        """The first element (bytes for BYTES, a numpy scalar otherwise)."""
        return self.array.reshape(-1)[0]


@dataclass(frozen=True)
class RecordedRequest:
    """A valid request as the double received it."""

    model: str
    request_id: str
    inputs: dict[str, RecordedTensor]
    outputs: tuple[str, ...]
    parameters: dict[str, Any]


class _Invalid(Exception):
    """A request Triton would refuse (the message is Triton's)."""


@dataclass
class _Request:
    """A validated request, ready to run."""

    model: str
    request_id: str
    prompt: str
    max_tokens: int
    stream: bool
    stops: tuple[str, ...]
    seed: int | None
    exclude_input: bool
    return_input_tokens: bool
    return_output_tokens: bool
    return_perf: bool
    empty_final: bool
    outputs: frozenset[str]
    final_on_data: bool
    key: int = 0
    arrival_ns: int = 0
    scheduled_ns: int = 0


@dataclass
class _Model:
    name: str
    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    ready: bool = True


@dataclass
class _Live:
    """A request holding a batch slot: its KV cache use."""

    prompt_tokens: int
    generated: int = 0
    first_token: bool = False


@dataclass
class TritonDouble:
    """The double (see the module docstring): ``async with TritonDouble() as triton: ...``."""

    #: Seconds between two tokens of a request.
    token_delay: float = 0.002
    #: Words in a natural answer (then the end-of-sequence token).
    answer_tokens: int = 12
    #: Requests running at once (``request_type="max"``); the rest wait.
    max_active: int = 8
    kv_blocks: int = 1024
    tokens_per_block: int = 32
    #: The ensemble flags its last data response final (False: it behaves as tensorrt_llm_bls).
    ensemble_final_on_data: bool = True
    #: The models have num_*_tokens and perf-metric tensors (False: an older repository).
    token_counts: bool = True
    #: After this many tokens of every request, an error_message instead of the next token.
    fail_after_tokens: int | None = None
    fail_message: str = "Executor failed: CUDA error: an illegal memory access was encountered"
    #: A request whose prompt has more tokens than this gets an ``error_message`` before its first
    #: token and the server serves on, as TensorRT-LLM's executor refuses such a request alone
    #: ("Prompt length (N) exceeds maximum input length (M)", sent as that request's error).
    max_input_len: int | None = None
    #: Match stop words (False: a model whose tokens never match the stop string's).
    honour_stop_words: bool = True
    #: Keep each stream open after its requests complete, until the client ends it.
    hold_streams_open: bool = False
    server_live: bool = True
    server_ready: bool = True
    #: Status of GET /metrics, and whether its body is sent with chunked transfer encoding.
    metrics_status: int = 200
    metrics_chunked: bool = False

    requests: list[RecordedRequest] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.models = {name: self._model(name) for name in MODELS}
        self.port = 0
        self.metrics_port = 0
        self.waiting = 0
        self.pending = 0
        self._running: dict[int, _Live] = {}
        self._slots_free = asyncio.Condition()
        self._keys = itertools.count(1)
        self._grpc: grpc.aio.Server | None = None
        self._http: asyncio.Server | None = None

    def _model(self, name: str) -> _Model:
        def keep(spec: TensorSpec) -> bool:
            return self.token_counts or spec.name not in TOKEN_COUNT_TENSORS

        return _Model(
            name,
            {s.name: s for s in INPUTS if keep(s)},
            {s.name: s for s in OUTPUTS if keep(s)},
        )

    # -- lifecycle -----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The gRPC address, as ``--triton-url`` takes it."""
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def start(self, port: int = 0, metrics_port: int = 0) -> TritonDouble:
        self.port = port
        await self.start_grpc()
        self._http = await asyncio.start_server(self._serve_http, "127.0.0.1", metrics_port)
        self.metrics_port = self._http.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        await self.stop_grpc()
        if self._http is not None:
            self._http.close()
            await self._http.wait_closed()
            self._http = None

    async def start_grpc(self) -> None:
        """Serve gRPC (again), on the port of the previous start if there was one."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Servicer(self), server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise OSError(f"cannot listen on 127.0.0.1:{self.port}")
        await server.start()
        self._grpc, self.port = server, port

    async def stop_grpc(self) -> None:
        """Stop serving gRPC at once, cancelling the streams in progress (the server is down)."""
        if self._grpc is not None:
            await self._grpc.stop(None)
            self._grpc = None

    async def __aenter__(self) -> TritonDouble:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def set_model_ready(self, model: str, ready: bool) -> None:
        self.models[model].ready = ready

    # -- answers -------------------------------------------------------------------------------

    def answer(self, prompt: str, seed: int | None = None) -> list[str]:
        """The tokens of the natural answer to ``prompt`` (without the end-of-sequence token)."""
        digest = hashlib.sha256(f"{prompt}\0{seed}".encode()).digest()
        rng = random.Random(int.from_bytes(digest))
        words = [VOCABULARY[rng.randrange(len(VOCABULARY))] for _ in range(self.answer_tokens)]
        return [word if i == 0 else " " + word for i, word in enumerate(words)]

    def expected_text(self, prompt: str, max_tokens: int = 1000, seed: int | None = None) -> str:
        """The text streamed for ``prompt`` without stop words."""
        return "".join(self.answer(prompt, seed)[:max_tokens])

    @staticmethod
    def prompt_tokens(prompt: str) -> int:
        """The prompt's token count as the double reports it: its words plus one."""
        return len(prompt.split()) + 1

    # -- metrics -------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        return len(self._running)

    def kv_used_blocks(self) -> int:
        return sum(
            math.ceil((live.prompt_tokens + live.generated) / self.tokens_per_block)
            for live in self._running.values()
        )

    def metrics_text(self) -> str:
        """The metrics page now."""
        used = min(self.kv_used_blocks(), self.kv_blocks)
        context = sum(1 for live in self._running.values() if not live.first_token)
        lines = [
            "# HELP nv_inference_pending_request_count Instantaneous number of pending requests "
            "awaiting execution per-model.",
            "# TYPE nv_inference_pending_request_count gauge",
        ]
        for model in (*MODELS, TRTLLM_MODEL, "preprocessing", "postprocessing"):
            pending = self.pending if model in MODELS else 0
            lines.append(
                f'nv_inference_pending_request_count{{model="{model}",version="1"}} {pending}'
            )
        lines += [
            "# HELP nv_trt_llm_request_metrics TRT LLM request metrics",
            "# TYPE nv_trt_llm_request_metrics gauge",
        ]
        # As TensorRT-LLM's Triton backend fills them (triton_backend/inflight_batcher_llm/src/
        # model_instance_state.cc, WaitForStats): "active" is the executor's numActiveRequests,
        # which counts the requests waiting for a slot too; "scheduled" those in this iteration's
        # batch; "waiting" is active - scheduled.
        for kind, value in (
            ("context", context),
            ("scheduled", self.active),
            ("max", self.max_active),
            ("active", self.active + self.waiting),
            ("waiting", self.waiting),
        ):
            lines.append(
                f'nv_trt_llm_request_metrics{{model="{TRTLLM_MODEL}",request_type="{kind}",'
                f'version="1"}} {value}'
            )
        lines += [
            "# HELP nv_trt_llm_kv_cache_block_metrics TRT LLM KV cache block metrics",
            "# TYPE nv_trt_llm_kv_cache_block_metrics gauge",
        ]
        for kind, number in (
            ("tokens_per", self.tokens_per_block),
            ("used", used),
            ("free", self.kv_blocks - used),
            ("max", self.kv_blocks),
            ("fraction", used / self.kv_blocks),
        ):
            lines.append(
                f'nv_trt_llm_kv_cache_block_metrics{{kv_cache_block_type="{kind}",'
                f'model="{TRTLLM_MODEL}",version="1"}} {number}'
            )
        return "\n".join(lines) + "\n"

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request_line = await reader.readline()
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass
            parts = request_line.split()
            found = len(parts) >= 2 and parts[1].split(b"?")[0] == b"/metrics"
            status = self.metrics_status if found else 404
            body = self.metrics_text().encode() if status == 200 else b"not found\n"
            reason = {200: "OK", 404: "Not Found"}.get(status, "Error")
            head = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain; version=0.0.4"]
            if self.metrics_chunked:
                head.append("Transfer-Encoding: chunked")
                half = len(body) // 2
                body = b"".join(
                    f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
                    for piece in (body[:half], body[half:])
                    if piece
                )
                body += b"0\r\n\r\n"
            else:
                head.append(f"Content-Length: {len(body)}")
            head.append("Connection: close")
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # -- inference -----------------------------------------------------------------------------

    async def serve_stream(
        self, requests: AsyncIterator[service_pb2.ModelInferRequest], context: _Context
    ) -> None:
        """One ModelStreamInfer call: run its requests, write their responses, end when the
        client has closed its side and every request has completed."""
        queue: asyncio.Queue[Any] = asyncio.Queue()
        in_flight: dict[int, str] = {}
        tasks: list[asyncio.Task[None]] = []
        open_tasks = 1  # the reader, then one per request

        def finished(_: object) -> None:
            queue.put_nowait(_END)

        async def read() -> None:
            nonlocal open_tasks
            with contextlib.suppress(Exception):
                async for request in requests:
                    open_tasks += 1
                    task = asyncio.create_task(self._serve(request, queue.put_nowait, in_flight))
                    task.add_done_callback(finished)
                    tasks.append(task)

        reader = asyncio.create_task(read())
        reader.add_done_callback(finished)
        try:
            while open_tasks:
                item = await queue.get()
                if item is _END:
                    open_tasks -= 1
                else:
                    await context.write(item)
            if self.hold_streams_open:
                await asyncio.Event().wait()  # until the client cancels the call
        finally:
            self.cancelled.extend(in_flight.values())  # the stream ended before they did
            in_flight.clear()
            reader.cancel()
            for task in tasks:
                task.cancel()

    async def _serve(
        self, request: service_pb2.ModelInferRequest, emit: _Emit, in_flight: dict[int, str]
    ) -> None:
        model = self.models.get(request.model_name)
        if model is None or not model.ready:
            why = "is not found" if model is None else "has no available versions"
            emit(_error(request, f"Request for unknown model: '{request.model_name}' {why}"))
            return
        self.pending += 1
        try:
            parsed = self._parse(request, model)
        except _Invalid as exc:
            emit(_error(request, f"[request id: {request.id or '<id_unknown>'}] {exc}"))
            return
        finally:
            self.pending -= 1
        parsed.key = next(self._keys)
        in_flight[parsed.key] = parsed.request_id
        try:
            await self._generate(parsed, emit)
            self.completed.append(parsed.request_id)
        finally:
            in_flight.pop(parsed.key, None)

    def _parse(self, request: service_pb2.ModelInferRequest, model: _Model) -> _Request:
        """Check the request as Triton does; the request to run."""
        name = model.name
        raw = list(request.raw_input_contents)
        if len(raw) != len(request.inputs):
            raise _Invalid(
                f"expected {len(request.inputs)} raw input contents, got {len(raw)} "
                "(the double reads raw_input_contents only)"
            )
        tensors: dict[str, RecordedTensor] = {}
        for tensor, content in zip(request.inputs, raw, strict=True):
            spec = model.inputs.get(tensor.name)
            if spec is None:
                raise _Invalid(f"unexpected inference input '{tensor.name}' for model '{name}'")
            if tensor.datatype != spec.datatype:
                raise _Invalid(
                    f"inference input '{tensor.name}' data-type is '{tensor.datatype}', but "
                    f"model '{name}' expects '{spec.datatype}'"
                )
            shape = tuple(tensor.shape)
            expected = (-1, *spec.dims)
            if len(shape) != len(expected) or any(
                want not in (-1, got) for want, got in zip(expected, shape, strict=True)
            ):
                raise _Invalid(
                    f"unexpected shape for input '{tensor.name}' for model '{name}'. Expected "
                    f"{list(expected)}, got {list(shape)}"
                )
            if not 1 <= shape[0] <= MAX_BATCH_SIZE:
                raise _Invalid(
                    f"inference request batch-size must be <= {MAX_BATCH_SIZE} for '{name}'"
                )
            if shape[0] != 1:
                raise _Invalid(f"the double serves batch size 1 (input '{tensor.name}')")
            try:
                if spec.datatype == "BYTES":
                    array = deserialize_bytes_tensor(content).reshape(shape)
                else:
                    array = np.frombuffer(content, dtype=triton_to_np_dtype(spec.datatype))
                    array = array.reshape(shape)
            except (ValueError, TypeError) as exc:
                raise _Invalid(f"input '{tensor.name}': bad contents ({exc})") from None
            tensors[tensor.name] = RecordedTensor(spec.datatype, shape, array)
        missing = [
            s.name for s in model.inputs.values() if not s.optional and s.name not in tensors
        ]
        if missing:
            raise _Invalid(f"missing required input(s) {missing} for model '{name}'")
        outputs = tuple(o.name for o in request.outputs)
        for output in outputs:
            if output not in model.outputs:
                raise _Invalid(f"unexpected inference output '{output}' for model '{name}'")
        parameters: dict[str, Any] = {
            key: getattr(value, value.WhichOneof("parameter_choice"))
            for key, value in request.parameters.items()
            if value.WhichOneof("parameter_choice")
        }
        self.requests.append(RecordedRequest(name, request.id, tensors, outputs, dict(parameters)))

        def value(key: str, default: Any) -> Any:
            return tensors[key].value if key in tensors else default

        stops = (
            tuple(w.decode() for w in tensors["stop_words"].array[0] if w)
            if "stop_words" in tensors
            else ()
        )
        seed = value("seed", None)
        return _Request(
            model=name,
            request_id=request.id,
            prompt=bytes(value("text_input", b"")).decode(),
            max_tokens=int(value("max_tokens", 1)),
            stream=bool(value("stream", False)),
            stops=stops,
            seed=None if seed is None else int(seed),
            exclude_input=bool(value("exclude_input_in_output", False)),
            return_input_tokens=bool(value("return_num_input_tokens", False)),
            return_output_tokens=bool(value("return_num_output_tokens", False)),
            return_perf=bool(value("return_perf_metrics", False)),
            empty_final=bool(parameters.get("triton_enable_empty_final_response", False)),
            outputs=frozenset(outputs),
            final_on_data=name == "ensemble" and self.ensemble_final_on_data,
        )

    async def _generate(self, request: _Request, emit: _Emit) -> None:
        request.arrival_ns = time.monotonic_ns()
        prompt_tokens = self.prompt_tokens(request.prompt)
        if self.max_input_len is not None and prompt_tokens > self.max_input_len:
            message = (
                f"[request id: {request.request_id}] Prompt length ({prompt_tokens}) exceeds "
                f"maximum input length ({self.max_input_len})."
            )
            emit(_error(request, message, final=request.final_on_data))
            return
        async with self._slot(request) as live:
            request.scheduled_ns = time.monotonic_ns()
            words = self.answer(request.prompt, request.seed)
            text = ""
            for i in range(max(1, request.max_tokens)):
                await asyncio.sleep(self.token_delay)
                if self.fail_after_tokens is not None and i >= self.fail_after_tokens:
                    emit(_error(request, self.fail_message, final=request.final_on_data))
                    break
                token = words[i] if i < len(words) else ""  # then the end-of-sequence token
                before = len(text)
                text += token
                live.generated += 1
                live.first_token = True
                hit = self.honour_stop_words and any(
                    stop in text[max(0, before - len(stop) + 1) :] for stop in request.stops
                )
                last = i >= len(words) or hit or live.generated >= request.max_tokens
                if request.stream:
                    emit(self._data(request, token, 1, final=last and request.final_on_data))
                if last:
                    break
            if not request.stream and live.generated and self.fail_after_tokens is None:
                full = text if request.exclude_input else request.prompt + text
                emit(self._data(request, full, live.generated, final=request.final_on_data))
            if not request.final_on_data and request.empty_final:
                emit(_empty_final(request))

    @contextlib.asynccontextmanager
    async def _slot(self, request: _Request) -> AsyncIterator[_Live]:
        """Wait for a batch slot (counted as waiting), then hold it (counted as active)."""
        self.waiting += 1
        try:
            async with self._slots_free:
                await self._slots_free.wait_for(lambda: len(self._running) < self.max_active)
        finally:
            self.waiting -= 1
        live = self._running[request.key] = _Live(self.prompt_tokens(request.prompt))
        try:
            yield live
        finally:
            del self._running[request.key]
            async with self._slots_free:
                self._slots_free.notify()

    def _data(
        self, request: _Request, text: str, tokens: int, *, final: bool
    ) -> service_pb2.ModelStreamInferResponse:
        values: list[tuple[str, str, np.ndarray[Any, Any]]] = [
            ("text_output", "BYTES", np.array([[text.encode()]], dtype=np.object_))
        ]
        if request.return_input_tokens:
            count = self.prompt_tokens(request.prompt)
            values.append(("num_input_tokens", "INT32", np.array([[count]], dtype=np.int32)))
        if request.return_output_tokens:
            values.append(("num_output_tokens", "INT32", np.array([[tokens]], dtype=np.int32)))
        if request.return_perf:
            for name, ns in (
                ("arrival_time_ns", request.arrival_ns),
                ("first_scheduled_time_ns", request.scheduled_ns),
            ):
                values.append((name, "INT64", np.array([[ns]], dtype=np.int64)))
        response = _response(request.model, request.request_id, final)
        for name, datatype, array in values:
            if request.outputs and name not in request.outputs:
                continue
            output = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            del output  # the contents go in raw_output_contents, in the same order
            if datatype == "BYTES":
                response.raw_output_contents.append(serialize_byte_tensor(array).item())
            else:
                response.raw_output_contents.append(array.tobytes())
        return service_pb2.ModelStreamInferResponse(infer_response=response)


def _response(model: str, request_id: str, final: bool) -> service_pb2.ModelInferResponse:
    response = service_pb2.ModelInferResponse(
        model_name=model, model_version=MODEL_VERSION, id=request_id
    )
    response.parameters["triton_final_response"].bool_param = final
    return response


def _empty_final(request: _Request) -> service_pb2.ModelStreamInferResponse:
    return service_pb2.ModelStreamInferResponse(
        infer_response=_response(request.model, request.request_id, True)
    )


def _error(
    request: service_pb2.ModelInferRequest | _Request, message: str, *, final: bool = False
) -> service_pb2.ModelStreamInferResponse:
    if isinstance(request, _Request):
        model, request_id = request.model, request.request_id
    else:
        model, request_id = request.model_name, request.id
    return service_pb2.ModelStreamInferResponse(
        error_message=message, infer_response=_response(model, request_id, final)
    )


class _Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """The RPCs a TensorRT-LLM client uses; the rest answer UNIMPLEMENTED."""

    def __init__(self, double: TritonDouble) -> None:
        self.double = double

    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: _Context
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=self.double.server_live)

    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: _Context
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self.double.server_ready)

    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: _Context
    ) -> service_pb2.ModelReadyResponse:
        model = self.double.models.get(request.name)
        return service_pb2.ModelReadyResponse(ready=model is not None and model.ready)

    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: _Context
    ) -> service_pb2.ModelMetadataResponse:
        model = self.double.models.get(request.name)
        if model is None or not model.ready:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"Request for unknown model: '{request.name}' is not found",
            )
        assert model is not None

        def metadata(spec: TensorSpec) -> Any:
            return service_pb2.ModelMetadataResponse.TensorMetadata(
                name=spec.name, datatype=spec.datatype, shape=[-1, *spec.dims]
            )

        return service_pb2.ModelMetadataResponse(
            name=model.name,
            versions=[MODEL_VERSION],
            platform="ensemble" if model.name == "ensemble" else "python",
            inputs=[metadata(s) for s in model.inputs.values()],
            outputs=[metadata(s) for s in model.outputs.values()],
        )

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest], context: _Context
    ) -> None:
        await self.double.serve_stream(request_iterator, context)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the double until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--port", type=int, default=0, help="gRPC port (0: a free one)")
    parser.add_argument("--metrics-port", type=int, default=0, help="metrics HTTP port")
    parser.add_argument(
        "--ensemble-final-on-data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the ensemble flags its last data response final (else as tensorrt_llm_bls)",
    )
    parser.add_argument("--token-delay", type=float, default=0.002, help="seconds per token")
    parser.add_argument("--answer-tokens", type=int, default=12, help="words in an answer")
    parser.add_argument("--max-active", type=int, default=8, help="requests running at once")
    parser.add_argument(
        "--not-ready", action="append", default=[], choices=MODELS, help="a model not ready"
    )
    args = parser.parse_args(argv)

    async def run() -> None:
        double = TritonDouble(
            token_delay=args.token_delay,
            answer_tokens=args.answer_tokens,
            max_active=args.max_active,
            ensemble_final_on_data=args.ensemble_final_on_data,
        )
        for model in args.not_ready:
            double.set_model_ready(model, False)
        await double.start(args.port, args.metrics_port)
        print(json.dumps({"port": double.port, "metrics_port": double.metrics_port}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await double.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
