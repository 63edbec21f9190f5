"""The ``llmmesh.v1.Worker`` service: admission, validation, deadlines and cancellation around
one :class:`~worker.engines.Engine`.

One request, as the worker sees it::

    Generate / GenerateStream
      ├─ draining? ─────────────────────────────▶ UNAVAILABLE "worker is draining"
      ├─ validate (Limits, model, prompt tokens) ▶ INVALID_ARGUMENT naming the field / NOT_FOUND
      ├─ capacity + max_queued in flight? ──────▶ RESOURCE_EXHAUSTED
      └─ engine.generate(prompt + continuation, deadline = the caller's)
           ├─ text deltas ──▶ caller (one chunk each when streaming)
           ├─ Completion stop/length ──▶ summary
           ├─ Completion timeout, or the caller's deadline passes ─▶ abort ▶ DEADLINE_EXCEEDED
           └─ the caller cancels ──▶ engine.abort(), "request aborted" logged and counted

Engine failures (:class:`~worker.engines.EngineError`: the engine is down) become UNAVAILABLE in
:meth:`WorkerApp._engine_errors`, the one place they are translated; a request the engine failed
on its own (:class:`~llmmesh.errors.RequestFailed`) gets INTERNAL or INVALID_ARGUMENT with the
engine's message there too, and leaves the worker SERVING. A request's ``continuation`` (text
already produced for it) goes to the engine with the prompt: the engine reads the prompt followed
by it and the worker returns only the text generated after it. The streaming RPCs use
gRPC's reader/writer API (``context.write``) rather than async generators, so a cancellation
always arrives inside the handler's own code, where the engine request can be aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import grpc
import grpc.aio
import structlog

import llmmesh
from llmmesh import logs, tracing
from llmmesh.errors import (
    NO_QUEUE_METADATA_KEY,
    Busy,
    DeadlineExceeded,
    InvalidArgument,
    MeshError,
    NotFound,
    RequestFailed,
    ResourceExhausted,
    Unavailable,
    cancelled_status,
    grpc_errors,
)
from llmmesh.server import ServiceRunner
from llmmesh.v1 import generate_pb2, worker_pb2, worker_pb2_grpc
from llmmesh.validation import effective_sampling, validate_request
from worker import _metrics as metrics
from worker._chat import prompt_of
from worker._config import WorkerConfig
from worker._registration import ConsulRegistration
from worker.engines import (
    Completion,
    Engine,
    EngineError,
    EngineRequest,
    TextDelta,
    create_engine,
    wait_event,
)

log = structlog.get_logger(__name__)

SERVICE_NAME = "llmmesh.v1.Worker"
#: Span name prefix of the RPCs (llmmesh/tracing.py).
_WORKER_SPAN = SERVICE_NAME + "/"
#: Load reports triggered by a change come at most this often (per stream).
MIN_REPORT_GAP_S = 0.005
#: The shortest report interval a caller may ask for.
MIN_REPORT_INTERVAL_S = 0.01
#: How often engine load gauges and engine health are checked when nothing changes.
GAUGE_REFRESH_S = 0.5

_FINISH_REASONS = {
    "stop": generate_pb2.FINISH_REASON_STOP,
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "cancelled": generate_pb2.FINISH_REASON_CANCELLED,
    "timeout": generate_pb2.FINISH_REASON_TIMEOUT,
}

_Context = grpc.aio.ServicerContext[Any, Any]


def _no_queue(context: _Context) -> bool:
    """The caller (a router that queues requests itself) asked for :class:`Busy` rather than a
    place in the engine's queue."""
    return any(key == NO_QUEUE_METADATA_KEY for key, _ in context.invocation_metadata() or ())


def new_request_id() -> str:
    """A request id for a caller that gave none."""
    return uuid.uuid4().hex


class WorkerApp(worker_pb2_grpc.WorkerServicer):
    """The worker: the Worker servicer plus the :class:`~llmmesh.server.ServiceApp` hooks."""

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, config: WorkerConfig, *, engine: Engine | None = None) -> None:
        self.config = config
        self.engine = engine if engine is not None else create_engine(config)
        #: Set at :meth:`start` (from the config, else ``HOSTNAME-PORT``).
        self.worker_id = config.worker_id
        self._limits = config.limits
        self._in_flight = 0
        self._draining = False
        self._load_changed = asyncio.Event()
        self._engine_ids = itertools.count(1)
        self._pump: asyncio.Task[None] | None = None
        self._runner: ServiceRunner | None = None
        self._engine_healthy = True
        #: Set at :meth:`start` when ``discovery`` is ``consul``.
        self.registration: ConsulRegistration | None = None

    # -- ServiceApp ----------------------------------------------------------------------------

    def add_to_server(self, server: grpc.aio.Server) -> None:
        worker_pb2_grpc.add_WorkerServicer_to_server(self, server)

    async def start(self, runner: ServiceRunner) -> None:
        if self._pump is not None:
            raise RuntimeError("worker already started")
        if not self.worker_id:
            self.worker_id = f"{socket.gethostname()}-{runner.port}"
        self._runner = runner
        await self.engine.start()
        self._pump = asyncio.create_task(self._pump_load(), name="worker-load")
        info = self.engine.info()
        if self.config.discovery == "consul":
            self.registration = ConsulRegistration(
                self.config,
                worker_id=self.worker_id,
                port=runner.port,
                info=info,
                is_healthy=self._engine_is_healthy,
            )
            await self.registration.start()
        log.info(
            "worker started",
            worker_id=self.worker_id,
            engine=info.engine,
            model=info.model,
            capacity=info.capacity,
            max_queued=self.config.max_queued,
        )

    async def drain(self) -> None:
        """Leave Consul first (routers stop sending), then refuse new requests and end WatchLoad
        streams (after a serving=false report); in-flight requests go on to the end."""
        if self.registration is not None:
            await self.registration.leave()
        self._draining = True
        self._notify_load()

    async def close(self) -> None:
        if self.registration is not None:
            await self.registration.stop()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await self.engine.stop()

    # -- RPCs ----------------------------------------------------------------------------------

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: _Context
    ) -> generate_pb2.GenerateResponse:
        request_id = request.request_id or new_request_id()
        parts: list[str] = []

        async def collect(text: str) -> None:
            parts.append(text)

        with logs.bind_request(request_id=request_id):
            async with grpc_errors(context):
                with tracing.server_span(_WORKER_SPAN + "Generate", context) as span:
                    span.set_request(request_id, request.model)
                    summary = await self._generate(
                        request, request_id, context, "Generate", collect
                    )
                    span.set_summary(summary)
                    return generate_pb2.GenerateResponse(
                        request_id=request_id,
                        model=request.model,
                        text="".join(parts),
                        summary=summary,
                    )

    async def GenerateStream(  # type: ignore[override]  # reader/writer API: see module doc
        self, request: generate_pb2.GenerateRequest, context: _Context
    ) -> None:
        request_id = request.request_id or new_request_id()

        async def send(text: str) -> None:
            await context.write(
                generate_pb2.GenerateStreamResponse(request_id=request_id, text=text)
            )

        with logs.bind_request(request_id=request_id):
            async with grpc_errors(context):
                with tracing.server_span(_WORKER_SPAN + "GenerateStream", context) as span:
                    span.set_request(request_id, request.model)
                    summary = await self._generate(
                        request, request_id, context, "GenerateStream", send
                    )
                    span.set_summary(summary)
                    await context.write(
                        generate_pb2.GenerateStreamResponse(request_id=request_id, summary=summary)
                    )

    async def WatchLoad(  # type: ignore[override]  # reader/writer API: see module doc
        self, request: worker_pb2.WatchLoadRequest, context: _Context
    ) -> None:
        interval = max(
            MIN_REPORT_INTERVAL_S,
            request.interval_ms / 1000
            if request.interval_ms
            else self.config.load_report_interval.total_seconds(),
        )
        async with grpc_errors(context):
            sequence = 0
            while True:
                changed = self._load_changed  # taken first: a change from now on is reported
                sequence += 1
                await context.write(self._load_report(sequence))
                if self._draining:
                    return  # the final report said serving=false; let shutdown proceed
                sent = time.monotonic()
                if not await wait_event(changed, interval):
                    continue
                gap = min(interval, MIN_REPORT_GAP_S) - (time.monotonic() - sent)
                if gap > 0 and not self._draining:
                    await asyncio.sleep(gap)

    async def GetInfo(
        self, request: worker_pb2.GetInfoRequest, context: _Context
    ) -> worker_pb2.GetInfoResponse:
        async with grpc_errors(context):
            info = self.engine.info()
            return worker_pb2.GetInfoResponse(
                worker_id=self.worker_id,
                engine=info.engine,
                model=info.model,
                model_version=info.model_version,
                capacity=info.capacity,
                max_queued=self.config.max_queued,
                version=llmmesh.__version__,
                max_prompt_tokens=self._max_prompt_tokens(),
            )

    # -- generation ----------------------------------------------------------------------------

    async def _generate(
        self,
        request: generate_pb2.GenerateRequest,
        request_id: str,
        context: _Context,
        method: str,
        emit: Callable[[str], Awaitable[None]],
    ) -> generate_pb2.GenerationSummary:
        """Run one request through the engine, handing its text to ``emit``; the summary."""
        received = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            engine_request = self._admit(request, request_id, context, received)
            summary = await self._run(engine_request, context, emit, received)
        except MeshError as exc:
            code = exc.code
            log.info("request failed", method=method, code=code.name, error=exc.message)
            raise
        except asyncio.CancelledError:
            code = cancelled_status(context)
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            metrics.REQUESTS.labels(method=method, code=code.name).inc()
        return summary

    def _admit(
        self,
        request: generate_pb2.GenerateRequest,
        request_id: str,
        context: _Context,
        received: float,
    ) -> EngineRequest:
        """Check that the request can be served now; the engine request for it."""
        if self._draining:
            raise Unavailable(f"worker {self.worker_id} is draining; retry on another worker")
        validate_request(request, self._limits)
        info = self.engine.info()
        if request.model != info.model:
            raise NotFound(
                f"model {request.model!r} is not served by worker {self.worker_id} "
                f"(it serves {info.model!r})"
            )
        prompt = prompt_of(request)
        tokens = self.engine.count_tokens(prompt)
        limit = self._max_prompt_tokens()
        if tokens > limit:
            field = "messages" if request.messages else "prompt"
            raise InvalidArgument(field, f"is {tokens} tokens, longer than the limit of {limit}")
        if request.continuation:
            tokens = self.engine.count_tokens(prompt + request.continuation)
            if tokens > limit:
                raise InvalidArgument(
                    "continuation",
                    f"makes the prompt {tokens} tokens, longer than the limit of {limit}",
                )
        if not self.engine.load().healthy:
            raise Unavailable(f"the {info.engine} engine of worker {self.worker_id} is unhealthy")
        remaining: float | None = context.time_remaining()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("the deadline passed before the request reached the engine")
        if self._in_flight >= info.capacity and _no_queue(context):
            raise Busy(
                f"worker {self.worker_id} has no free batch slot ({self._in_flight} requests, "
                f"capacity {info.capacity}) and was asked not to queue"
            )
        if self._in_flight >= info.capacity + self.config.max_queued:
            raise ResourceExhausted(
                f"worker {self.worker_id} is full: {info.capacity} requests running and "
                f"{self.config.max_queued} queued; retry later or on another worker"
            )
        return EngineRequest(
            request_id=f"{request_id}#{next(self._engine_ids)}",
            prompt=prompt,
            sampling=effective_sampling(request, self._limits),
            deadline=None if remaining is None else received + remaining,
            continuation=request.continuation,
        )

    async def _run(
        self,
        engine_request: EngineRequest,
        context: _Context,
        emit: Callable[[str], Awaitable[None]],
        received: float,
    ) -> generate_pb2.GenerationSummary:
        first_text_at: float | None = None
        completion: Completion | None = None
        interval = self.config.stream_interval
        # Outputs after the first, held until there are ``stream_interval`` of them.
        held: list[str] = []
        self._in_flight += 1
        try:
            with self._engine_errors():
                async with contextlib.aclosing(self.engine.generate(engine_request)) as stream:
                    async for item in stream:
                        if not isinstance(item, TextDelta):
                            completion = item
                        elif first_text_at is None:
                            first_text_at = time.monotonic()
                            metrics.TIME_TO_FIRST_TOKEN.observe(first_text_at - received)
                            await emit(item.text)
                        elif interval == 1:
                            await emit(item.text)
                        else:
                            held.append(item.text)
                            if len(held) >= interval:
                                await emit("".join(held))
                                held.clear()
                if held:
                    await emit("".join(held))
        except BaseException as exc:
            if completion is None:
                await self._abort(engine_request, self._abort_reason(exc, engine_request))
            raise
        finally:
            self._in_flight -= 1
        if completion is None:
            raise MeshError(f"the {self.engine.info().engine} engine ended without a completion")
        if completion.finish_reason == "timeout":
            metrics.ABORTED_REQUESTS.labels(reason="deadline").inc()
            log.info("request aborted", reason="deadline", tokens=completion.completion_tokens)
            raise DeadlineExceeded(
                f"the deadline passed after {completion.completion_tokens} generated tokens"
            )
        if completion.finish_reason == "cancelled":
            metrics.ABORTED_REQUESTS.labels(reason="engine").inc()
            log.info("request aborted", reason="engine", tokens=completion.completion_tokens)
            raise Unavailable(f"worker {self.worker_id}'s engine cancelled the request")
        end = time.monotonic()
        metrics.record_finished(completion, end - received)
        timings = generate_pb2.Timings(
            queue_ms=completion.queue_s * 1000,
            time_to_first_token_ms=((first_text_at or end) - received) * 1000,
            total_ms=(end - received) * 1000,
        )
        log.info(
            "request finished",
            finish_reason=completion.finish_reason,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            queue_ms=round(timings.queue_ms, 3),
            time_to_first_token_ms=round(timings.time_to_first_token_ms, 3),
            total_ms=round(timings.total_ms, 3),
        )
        return generate_pb2.GenerationSummary(
            finish_reason=_FINISH_REASONS[completion.finish_reason],
            usage=generate_pb2.Usage(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
            ),
            cached=False,
            worker_id=self.worker_id,
            timings=timings,
            model_version=self.engine.info().model_version,
        )

    @staticmethod
    def _abort_reason(exc: BaseException, engine_request: EngineRequest) -> str:
        if isinstance(exc, asyncio.CancelledError):
            deadline = engine_request.deadline
            # gRPC cancels the handler when the caller's deadline passes, as when it cancels.
            if deadline is not None and time.monotonic() >= deadline - 0.005:
                return "deadline"
            return "cancelled"
        return "error"

    async def _abort(self, engine_request: EngineRequest, reason: str) -> None:
        """Abort the engine request (freeing its slot at once); log and count it."""
        try:
            await self.engine.abort(engine_request.request_id)
        except EngineError as exc:
            log.warning("engine abort failed", reason=reason, error=str(exc))
        metrics.ABORTED_REQUESTS.labels(reason=reason).inc()
        log.info("request aborted", reason=reason, engine_request_id=engine_request.request_id)

    @contextlib.contextmanager
    def _engine_errors(self) -> Iterator[None]:
        """Translate engine failures into our error tree (the one place this happens).

        An engine that is down (:class:`EngineError`) makes the request UNAVAILABLE: another
        worker may serve it. A request the engine failed on its own (:class:`RequestFailed`) is
        that request's error, named with this worker's id (never its address); the engine and
        the worker go on serving, so nothing here touches their health.
        """
        try:
            yield
        except RequestFailed as exc:
            log.warning(
                "engine failed the request",
                engine=self.engine.info().engine,
                code=exc.code.name,
                error=exc.message,
            )
            failed = RequestFailed(f"worker {self.worker_id}: {exc.message}")
            failed.code = exc.code
            raise failed from None
        except EngineError as exc:
            log.error("engine failed", engine=self.engine.info().engine, error=str(exc))
            raise Unavailable(f"worker {self.worker_id}'s engine failed: {exc}") from None

    # -- load ----------------------------------------------------------------------------------

    def _max_prompt_tokens(self) -> int:
        return min(self.config.max_prompt_tokens, self.engine.info().max_prompt_tokens)

    def _load_report(self, sequence: int) -> worker_pb2.WatchLoadResponse:
        load = self.engine.load()
        return worker_pb2.WatchLoadResponse(
            worker_id=self.worker_id,
            sequence=sequence,
            active_requests=load.active,
            queued_requests=load.queued,
            capacity=load.capacity,
            max_queued=self.config.max_queued,
            kv_cache_used_fraction=load.kv_cache_used_fraction,
            serving=load.healthy and not self._draining,
            timestamp_ms=int(time.time() * 1000),
        )

    def _engine_is_healthy(self) -> bool:
        """The engine's health now, as the Consul check reports it."""
        try:
            return self.engine.load().healthy
        except EngineError:
            return False

    def _notify_load(self) -> None:
        """Wake every WatchLoad stream."""
        self._load_changed.set()
        self._load_changed = asyncio.Event()

    async def _pump_load(self) -> None:
        """Forward the engine's load changes to WatchLoad streams and the gauges."""
        while True:
            try:
                changed = await self.engine.wait_load_change(GAUGE_REFRESH_S)
            except EngineError as exc:
                log.error("engine load unavailable", error=str(exc))
                changed = True
                await asyncio.sleep(GAUGE_REFRESH_S)
            load = self.engine.load()
            metrics.record_load(load)
            if load.healthy != self._engine_healthy:
                await self._on_engine_health(load.healthy)
                changed = True
            if changed:
                self._notify_load()

    async def _on_engine_health(self, healthy: bool) -> None:
        """An engine that fails makes the worker NOT_SERVING until it recovers."""
        self._engine_healthy = healthy
        info = self.engine.info()
        if healthy:
            log.info("engine recovered", engine=info.engine, model=info.model)
        else:
            log.error(
                "engine unhealthy: reporting NOT_SERVING", engine=info.engine, model=info.model
            )
        metrics.ENGINE_HEALTHY.set(1 if healthy else 0)
        if self.registration is not None:
            self.registration.health_changed()
        if self._runner is not None and not self._draining:
            await self._runner.set_serving(healthy)


__all__ = ["SERVICE_NAME", "WorkerApp", "new_request_id"]
