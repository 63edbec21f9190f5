"""The third stage of a request: a worker's answer, with retries, relayed as it comes.

Each attempt goes to the worker that router/_picking.py picks (waiting in the admission queue while
every worker of the model is full), with the caller's remaining deadline at dispatch. Chunks are
relayed as they arrive; a caller slower than its worker has the worker's stream drained into a
buffer, so that the worker's slot is free when the worker is done, however slowly the caller
reads, and a caller that reads nothing for ``stream_idle_timeout`` is cancelled
(router/_drain.py). A caller that cancels or runs out of time cancels the worker's call, which
aborts the engine request. A failure before the first chunk is retried on another worker (bounded,
jittered, within the deadline); never after. A worker that refuses the request as Busy (another
router took its slot first) sends it back to the head of the admission queue. Each attempt's
outcome is told to its :class:`router._pool.Lease`, which counts a worker's failures towards its
ejection (:data:`_FAILURES`).

A worker's INTERNAL or INVALID_ARGUMENT is that request's own failure (the engine failed or
refused this one request: :class:`llmmesh.errors.RequestFailed` on the worker): the caller gets
it as it is, it is not retried, and it counts as the worker's answer, not its failure. Only a
worker that seems gone or broken (UNAVAILABLE: its engine is down, it drains, the connection is
lost) is marked unavailable and counted towards ejection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, cast

import grpc
import grpc.aio
import structlog

from llmmesh import errors, tracing
from llmmesh.v1 import generate_pb2
from router import _metrics as metrics
from router._admission import AdmissionQueue
from router._balancer import Policy
from router._completion import complete_summary
from router._drain import StreamDrain, StreamWatch
from router._intake import Accepted
from router._picking import Attempts, WorkerPicker
from router._pool import Lease, Worker, WorkerPool
from router._rpc_scope import Context, RpcScope

log = structlog.get_logger(__name__)

#: Worker statuses after which a request that has not produced a token goes to another worker:
#: the worker is gone, draining or full. An INTERNAL error is the request's own failure (another
#: worker would fail it the same way), and DEADLINE_EXCEEDED leaves no time, so neither is retried.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Worker statuses that count as the worker's failure towards ejection: it is gone, broken or
#: failing. RESOURCE_EXHAUSTED (full: a load matter, retried elsewhere), and CANCELLED and
#: DEADLINE_EXCEEDED (the caller's doing) are not failures; neither are the statuses by which a
#: working worker fails or refuses one request (INTERNAL: its engine failed that request alone;
#: INVALID_ARGUMENT...), which count as answers: one bad request must not take a healthy worker
#: out of rotation.
_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DATA_LOSS,
    }
)
_NEUTRAL = frozenset(
    {
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
#: A request refused as Busy this many times (each time its worker's slot had just been taken by
#: another router) is treated as a worker failure to retry elsewhere; a bound that is never met in
#: practice, since each refusal waits for a fresh load report.
_MAX_BUSY_REFUSALS = 32
#: Largest jittered pause before the n-th retry is n times this.
_RETRY_BACKOFF_S = 0.02
#: No retry is started with less of the caller's deadline left than this.
_MIN_RETRY_BUDGET_S = 0.05
#: Span name prefix of calls to workers (llmmesh/tracing.py).
_WORKER_SPAN = "llmmesh.v1.Worker/"

#: Told the text and the completed summary of a streamed answer when its summary arrives, before
#: the summary's chunk is relayed.
OnAnswer = Callable[[str, generate_pb2.GenerationSummary], None]


class Dispatcher:
    """Sends accepted requests to the pool's workers, picked by a policy."""

    def __init__(
        self,
        pool: WorkerPool,
        policy: Policy,
        admission: AdmissionQueue,
        *,
        max_attempts: int,
        max_request_time: float,
        default_max_tokens: int = 256,
        stream_idle_timeout: float = 30.0,
    ) -> None:
        self.pool = pool
        self._default_max_tokens = default_max_tokens
        self._stream_idle_timeout = stream_idle_timeout
        self._watch = StreamWatch(stream_idle_timeout)
        self.max_attempts = max_attempts
        self._picker = WorkerPicker(pool, policy, admission)
        self._max_request_time = max_request_time
        # A load-aware policy queues requests in the router until a worker has a free slot;
        # the worker is asked to refuse rather than queue one that finds the slot taken.
        self._worker_metadata: tuple[tuple[str, str], ...] = (
            ((errors.NO_QUEUE_METADATA_KEY, "1"),) if policy.load_aware else ()
        )

    async def generate(
        self, accepted: Accepted, context: Context, scope: RpcScope
    ) -> generate_pb2.GenerateResponse:
        """A worker's whole answer, its summary completed with the router's view."""
        request = accepted.request
        attempts = Attempts()
        while True:
            lease = await self._picker.acquire(accepted, attempts, context)
            worker = lease.worker
            scope.note(worker_id=worker.worker_id)
            with lease, _attempt_span("Generate", attempts, worker) as attempt:
                try:
                    response = await worker.stub.Generate(
                        request,
                        timeout=self._timeout(context),
                        metadata=attempt.outgoing(self._worker_metadata),
                    )
                    lease.succeeded()
                    break
                except grpc.aio.AioRpcError as exc:
                    attempt.set_status(*tracing.status_of(exc))
                    error = self._worker_error(lease, exc)
            # A unary caller has seen nothing yet, so any attempt may be retried.
            await self._before_retry(error, worker, attempts, accepted, context)
        summary = response.summary
        total_ms = accepted.elapsed_ms()
        # The router sees a unary answer only whole; its first token existed as long before the
        # end as the worker says it spent generating after it.
        after_first_ms = max(0.0, summary.timings.total_ms - summary.timings.time_to_first_token_ms)
        complete_summary(
            summary,
            worker,
            queued_ms=attempts.queued_ms,
            total_ms=total_ms,
            first_token_ms=max(0.0, total_ms - after_first_ms),
        )
        metrics.TIME_TO_FIRST_TOKEN.labels("Generate", "false").observe(
            summary.timings.time_to_first_token_ms / 1000.0
        )
        response.request_id = request.request_id
        response.model = response.model or request.model
        return response

    async def stream(
        self, accepted: Accepted, context: Context, scope: RpcScope, on_answer: OnAnswer
    ) -> AsyncGenerator[generate_pb2.GenerateStreamResponse, None]:
        """A worker's answer relayed as it is produced, the summary completed with the router's
        view (and told to ``on_answer`` with the text).

        The relay reads the worker's stream itself while the caller keeps up, and from a buffer
        that a task fills once the caller is slower (router/_drain.py): the worker's slot is free
        once its stream ends, however slowly the caller reads; a caller that reads nothing for
        ``stream_idle_timeout`` is cancelled."""
        attempts = Attempts()
        rpc = asyncio.current_task()
        loop = asyncio.get_running_loop()
        max_tokens = accepted.request.sampling.max_tokens or self._default_max_tokens
        while True:
            lease = await self._picker.acquire(accepted, attempts, context)
            worker = lease.worker
            scope.note(worker_id=worker.worker_id)
            relayed = False
            failure: errors.MeshError | None = None
            with _attempt_span("GenerateStream", attempts, worker) as attempt:
                try:
                    stream = worker.stub.GenerateStream(
                        accepted.request,
                        timeout=self._timeout(context),
                        metadata=attempt.outgoing(self._worker_metadata),
                    )
                    # However the caller's RPC ends (cancelled, out of time, failed), the
                    # worker's call ends with it and the worker aborts the engine request.
                    # Cancelling a finished call is a no-op.
                    context.add_done_callback(_cancel_on_done(stream))
                    drain = StreamDrain(
                        self._relay(accepted, attempts, lease, stream, on_answer),
                        lease,
                        max_tokens=max_tokens,
                        on_idle=functools.partial(self._cancel_idle, scope, context, rpc, stream),
                    )
                except BaseException:
                    lease.release()
                    raise
                self._watch.add(drain)
                try:
                    while (chunk := await drain.next()) is not None:
                        relayed = True
                        drain.waiting_since = loop.time()
                        yield chunk
                        drain.waiting_since = None
                    return
                except errors.MeshError as exc:
                    # After the first chunk the caller has part of an answer: never retried.
                    if relayed:
                        raise
                    attempt.set_status(*tracing.status_of(exc, upstream=True))
                    failure = exc
                finally:
                    self._watch.discard(drain)
                    drain.cancel()
                    stream.cancel()
            # The drain released the failed worker's lease: its slot is free during the pause.
            assert failure is not None
            await self._before_retry(failure, worker, attempts, accepted, context)

    def _cancel_idle(
        self,
        scope: RpcScope,
        context: Context,
        rpc: asyncio.Task[Any] | None,
        call: grpc.aio.Call,
    ) -> None:
        """The caller has read nothing for ``stream_idle_timeout``: end its stream, and the
        worker's call if it is still running."""
        metrics.STREAMS_IDLE_CANCELLED.inc()
        reason = (
            f"the caller read nothing for {self._stream_idle_timeout:g} s (--stream-idle-timeout)"
        )
        scope.cancelled_because(reason)
        log.warning("cancelling an idle stream", reason=reason)
        call.cancel()
        _abort_soon(context, reason, rpc)

    # -- an attempt's end, and the next -----------------------------------------------------

    async def _before_retry(
        self,
        error: errors.MeshError,
        worker: Worker,
        attempts: Attempts,
        accepted: Accepted,
        context: Context,
    ) -> None:
        """Raise ``error`` unless the request may go to another worker; else back off.

        A request is retried when its worker was unavailable (gone, draining, failed) or full,
        at most ``max_attempts`` times in all, on a different healthy worker each time, and only
        while the caller's deadline leaves room for another attempt. Otherwise the caller gets
        the last worker's own error.

        A Busy refusal is none of that: the worker reported a free slot and another router
        replica took it first (replicas share no state; the worker arbitrates). The worker is
        full until its next load report, and the request goes back to the head of the admission
        queue without counting an attempt, so replicas lose no more than a round trip to a race.
        """
        if isinstance(error, errors.Busy) and attempts.busy_refusals < _MAX_BUSY_REFUSALS:
            attempts.busy_refusals += 1
            metrics.BUSY_REFUSALS.inc()
            self.pool.mark_full(worker)
            return
        tried = attempts.tried
        tried.append(worker)
        remaining: float | None = context.time_remaining()
        if (
            error.upstream_code not in _RETRYABLE
            or len(tried) >= self.max_attempts
            or (remaining is not None and remaining < _MIN_RETRY_BUDGET_S)
            or not self._picker.untried(accepted, tried)
        ):
            raise error
        metrics.RETRIES.labels(error.upstream_code.name).inc()
        log.info(
            "retrying on another worker",
            failed_worker=worker.describe(),
            attempt=len(tried) + 1,
            error=error.message,
        )
        await asyncio.sleep(random.uniform(0, _RETRY_BACKOFF_S * len(tried)))

    def _timeout(self, context: Context) -> float:
        """The worker's deadline: the caller's remaining time, or the router's maximum."""
        remaining: float | None = context.time_remaining()
        return self._max_request_time if remaining is None else max(0.0, remaining)

    async def _relay(
        self,
        accepted: Accepted,
        attempts: Attempts,
        lease: Lease,
        stream: grpc.aio.UnaryStreamCall[
            generate_pb2.GenerateRequest, generate_pb2.GenerateStreamResponse
        ],
        on_answer: OnAnswer,
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        """Relay the worker's chunks; complete the final one with the router's view."""
        worker = lease.worker
        parts: list[str] = []
        first_ms: float | None = None
        finished = False
        try:
            # Read on to the end of the stream after the summary, so that the worker's call ends
            # with its status rather than with a cancellation.
            async for chunk in stream:
                if finished:
                    continue
                if chunk.text:
                    parts.append(chunk.text)
                    if first_ms is None:
                        lease.succeeded()
                        first_ms = accepted.elapsed_ms()
                        metrics.TIME_TO_FIRST_TOKEN.labels("GenerateStream", "false").observe(
                            first_ms / 1000.0
                        )
                chunk.request_id = accepted.request.request_id
                if chunk.HasField("summary"):
                    total_ms = accepted.elapsed_ms()
                    complete_summary(
                        chunk.summary,
                        worker,
                        queued_ms=attempts.queued_ms,
                        total_ms=total_ms,
                        first_token_ms=total_ms if first_ms is None else first_ms,
                    )
                    on_answer("".join(parts), chunk.summary)
                    finished = True
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise self._worker_error(lease, exc) from None
        if not finished:
            lease.failed("stream ended without a summary")
            raise errors.Unavailable(f"{_named(worker)} ended the stream without a summary")
        lease.succeeded()

    def _worker_error(self, lease: Lease, exc: grpc.aio.AioRpcError) -> errors.MeshError:
        """What the caller gets for a failed worker call; a worker that seems gone gets no more
        traffic until it answers again, and its failures count towards ejection."""
        worker = lease.worker
        if errors.is_busy(exc):
            return errors.Busy(f"{_named(worker)}: {exc.details()}")
        reason = f"{exc.code().name}: {exc.details()}"
        if exc.code() in _FAILURES:
            lease.failed(reason)
        elif exc.code() not in _NEUTRAL:
            lease.succeeded()
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self.pool.mark_unavailable(worker, reason)
        log.warning(
            "worker call failed",
            worker=worker.describe(),
            code=exc.code().name,
            details=exc.details(),
        )
        return errors.from_rpc_error(exc, peer=_named(worker))


def _named(worker: Worker) -> str:
    """How a message to the caller names a worker: by id, never by address (internal addresses
    are for logs, which use :meth:`Worker.describe`)."""
    return f"worker {worker.worker_id}" if worker.worker_id else "a worker"


def _attempt_span(method: str, attempts: Attempts, worker: Worker) -> tracing.Span:
    """The client span of one call to a worker (``llmmesh.attempt`` counts from 1)."""
    span = tracing.client_span(_WORKER_SPAN + method)
    if span.recording:
        span.set_attribute("llmmesh.attempt", len(attempts.tried) + attempts.busy_refusals + 1)
        span.set_attribute("llmmesh.worker_id", worker.worker_id)
        span.set_attribute("server.address", worker.address)
    return span


def _cancel_on_done(call: grpc.aio.Call) -> grpc.aio.DoneCallback[Any, Any]:
    """A done callback of the caller's RPC that cancels ``call``."""

    def cancel(_: object) -> None:
        call.cancel()

    # grpc-stubs declares the callback type as a class; at run time any callable will do.
    return cast("grpc.aio.DoneCallback[Any, Any]", cancel)


def _abort_soon(context: Context, reason: str, rpc: asyncio.Task[Any] | None) -> None:
    """End a caller's RPC from outside its task: its status, CANCELLED with ``reason``, goes
    out after what the caller's flow-control window already holds (whenever it reads again, or
    never: an HTTP/2 stream cannot be reset from grpc.aio's server API); its task, waiting to
    hand the caller a message, is cancelled at once, which closes the relay."""

    async def abort() -> None:
        with contextlib.suppress(Exception):
            await context.abort(grpc.StatusCode.CANCELLED, reason)

    _ABORTS.add(task := asyncio.ensure_future(abort()))
    task.add_done_callback(_ABORTS.discard)
    if rpc is not None:
        rpc.cancel()


#: The aborts under way (asyncio keeps only weak references to tasks).
_ABORTS: set[asyncio.Future[None]] = set()
