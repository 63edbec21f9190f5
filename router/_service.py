"""The ``llmmesh.v1.Router`` servicer, and the :class:`RouterApp` that runs it.

How a request flows through :class:`RouterService` (see ARCHITECTURE.md):

1. a request id is assigned when the caller gave none, and bound to every log line of the RPC;
2. the tenant (metadata ``x-llmmesh-tenant``) and the request are validated before anything else:
   bad input never reaches a worker;
3. a model no worker has ever reported is NOT_FOUND;
4. a cacheable request is looked up under a short timeout; a hit is answered at once (a streaming
   caller gets the cached text as a few chunks), a miss under CACHE_POLICY_ONLY_IF_CACHED is
   NOT_FOUND. Single-flight: a request that reads and writes the cache and finds an identical one
   in flight in this router follows it (router/_single_flight.py) and is given its answer (a
   streaming caller gets it like a cache hit, its summary as the leader's with its own timings);
   otherwise it leads, and its lookup claims the key's fill lock in the cache service, or waits
   there for the router that holds it (router/_cache_client.py), so that identical requests on
   other routers dispatch once too. A refresh never follows but may lead;
5. the policy picks a HEALTHY worker of the model with a free batch slot (an ejected worker due
   its probe comes first; no worker at all: UNAVAILABLE, saying why). When every worker of the
   model is full the request waits in the admission queue (router/_admission.py), in priority
   order; the time it waits is added to the summary's ``timings.queue_ms``. The request is sent
   with the caller's remaining deadline at dispatch. Chunks are relayed as they arrive; a caller
   that cancels or runs out of time cancels the worker's call, which aborts the engine request.
   A failure before the first chunk is retried on another worker (bounded, jittered, within the
   deadline); never after;
6. a finished, cacheable answer is stored in the background, without delaying the caller (with
   the fill lock's token, which releases it), and given to the request's followers. A leader that
   fails or whose caller goes away releases its fill lock in the background; its followers go on
   without it (one leads anew).
"""

from __future__ import annotations

import asyncio
import collections
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any, cast

import grpc
import grpc.aio
import structlog

from llmmesh import consul, errors, logs, tracing
from llmmesh.cache_key import (
    DEFAULT_TENANT,
    TENANT_METADATA_KEY,
    cache_key,
    reads_cache,
    writes_cache,
)
from llmmesh.discovery import ConsulDiscovery, Discovery, DiscoveryStatus, StaticDiscovery
from llmmesh.server import ServiceRunner
from llmmesh.v1 import cache_pb2, generate_pb2, router_pb2, router_pb2_grpc
from llmmesh.validation import MAX_REQUEST_ID_CHARS, Limits, validate_request
from router import _metrics as metrics
from router._admission import AdmissionQueue
from router._balancer import Policy, is_full, make_policy
from router._cache_client import FillLease, NoCache, ResponseCache, open_cache
from router._config import RouterConfig
from router._pool import Lease, Worker, WorkerPool, WorkerState
from router._single_flight import Answer, Flight, Flights

log = structlog.get_logger(__name__)

_Context = grpc.aio.ServicerContext[Any, Any]
_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")
_FINISHED = frozenset({generate_pb2.FINISH_REASON_STOP, generate_pb2.FINISH_REASON_LENGTH})
#: Worker statuses after which a request that has not produced a token goes to another worker:
#: the worker is gone, draining or full. An INTERNAL error may be the request's own doing, and
#: DEADLINE_EXCEEDED leaves no time, so neither is retried.
_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
#: Worker statuses that count as the worker's failure towards ejection: it is gone, broken or
#: failing. RESOURCE_EXHAUSTED (full: a load matter, retried elsewhere), and CANCELLED and
#: DEADLINE_EXCEEDED (the caller's doing) are not failures; neither are the statuses by which a
#: working worker refuses a request (INVALID_ARGUMENT...), which count as answers.
_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
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
# A cached answer is streamed in pieces of this many characters.
_CACHED_CHUNK_CHARS = 256
#: Span name prefixes (llmmesh/tracing.py).
_ROUTER_SPAN = "llmmesh.v1.Router/"
_WORKER_SPAN = "llmmesh.v1.Worker/"


@dataclass
class _Call:
    """A validated request on its way through the router."""

    #: The request as forwarded to a worker (the request id filled in).
    request: generate_pb2.GenerateRequest
    tenant: str
    #: The cache key ("" when the request neither reads nor writes the cache).
    key: str
    #: time.monotonic() when the router received the request.
    started: float
    #: Milliseconds spent in the router's admission queue (all attempts together).
    queued_ms: float = 0.0
    #: Times a worker refused the request as Busy (see :meth:`RouterService._before_retry`).
    busy_refusals: int = 0
    #: The flight this request leads in this router (single-flight), if any.
    flight: Flight | None = None
    #: The cache fill lock this request holds (single-flight across routers), if any.
    fill: FillLease | None = None

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0


class RouterService(router_pb2_grpc.RouterServicer):
    """Answers Generate, GenerateStream and ListWorkers from the pool, the cache and a policy."""

    def __init__(
        self,
        pool: WorkerPool,
        policy: Policy,
        *,
        limits: Limits,
        max_request_time: timedelta,
        max_attempts: int = 3,
        cache: ResponseCache | None = None,
        admission: AdmissionQueue | None = None,
        fill_lock_ttl: timedelta = timedelta(seconds=5),
        fill_max_wait: timedelta = timedelta(seconds=30),
    ) -> None:
        self.pool = pool
        self.admission = admission or AdmissionQueue()
        pool.subscribe(self.admission.pump)
        self.max_attempts = max_attempts
        self.policy = policy
        self.limits = limits
        #: Replaced by :class:`RouterApp` once the event loop runs (channels need one).
        self.cache: ResponseCache = cache or NoCache()
        self.flights = Flights()
        self._fill_lock_ttl = fill_lock_ttl.total_seconds()
        self._fill_max_wait = fill_max_wait.total_seconds()
        self._max_request_time = max_request_time.total_seconds()
        # A load-aware policy queues requests in the router until a worker has a free slot;
        # the worker is asked to refuse rather than queue one that finds the slot taken.
        self._worker_metadata: tuple[tuple[str, str], ...] = (
            ((errors.NO_QUEUE_METADATA_KEY, "1"),) if policy.load_aware else ()
        )

    # -- RPCs -------------------------------------------------------------------------------

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: _Context
    ) -> generate_pb2.GenerateResponse:
        """Generate a whole answer."""
        request_id = request.request_id or uuid.uuid4().hex
        with logs.bind_request(request_id=request_id[:MAX_REQUEST_ID_CHARS]):
            async with _RpcScope("Generate", context) as scope:
                scope.span.set_request(request_id, request.model)
                return await self._generate(request, request_id, context, scope)

    async def GenerateStream(
        self, request: generate_pb2.GenerateRequest, context: _Context
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        """Generate an answer and relay it as it is produced."""
        request_id = request.request_id or uuid.uuid4().hex
        # Bound without a reset: grpc.aio runs each RPC in a task of its own, so the binding ends
        # with the RPC, whereas a generator suspended at a yield when the caller goes away is
        # closed later from another task, where resetting a context variable fails.
        structlog.contextvars.bind_contextvars(request_id=request_id[:MAX_REQUEST_ID_CHARS])
        async with _RpcScope("GenerateStream", context) as scope:
            scope.span.set_request(request_id, request.model)
            call = self._prepare(request, request_id, context, scope.started)
            try:
                found = await self._consult(call, context, scope)
                if found is not None:
                    for chunk in self._found_chunks(call, found, scope):
                        yield chunk
                    return
                tried: list[Worker] = []
                while True:
                    lease = await self._acquire(call, tried, context)
                    worker = lease.worker
                    scope.note(worker_id=worker.worker_id)
                    relayed = False
                    failure: errors.MeshError | None = None
                    with lease, _attempt_span("GenerateStream", call, worker, tried) as attempt:
                        stream = worker.stub.GenerateStream(
                            call.request,
                            timeout=self._timeout(context),
                            metadata=attempt.outgoing(self._worker_metadata),
                        )
                        # However the caller's RPC ends (cancelled, out of time, failed), the
                        # worker's call ends with it and the worker aborts the engine request.
                        # Cancelling a finished call is a no-op.
                        context.add_done_callback(_cancel_on_done(stream))
                        try:
                            async for chunk in self._relay(call, lease, stream):
                                relayed = True
                                yield chunk
                            return
                        except errors.MeshError as exc:
                            # After the first chunk the caller has part of an answer: never
                            # retried.
                            if relayed:
                                raise
                            attempt.set_status(*tracing.status_of(exc, upstream=True))
                            failure = exc
                        finally:
                            stream.cancel()
                    # Out of the lease: the failed worker's slot is free during the pause.
                    assert failure is not None
                    await self._before_retry(failure, worker, tried, call, context)
            except errors.MeshError as exc:
                self._abandon(call, exc)
                raise
            finally:
                self._abandon(call)

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: _Context
    ) -> router_pb2.ListWorkersResponse:
        """The routing table, sorted by model then worker id."""
        async with _RpcScope("ListWorkers", context, quiet=True):
            rows = [
                self._status(w)
                for w in self.pool.workers()
                if not request.model or w.model == request.model
            ]
            rows.sort(key=lambda r: (r.model, r.worker_id, r.address))
            status = self.pool.discovery_status()
            return router_pb2.ListWorkersResponse(
                workers=rows, discovery=None if status is None else _discovery_status(status)
            )

    # -- steps of a generation --------------------------------------------------------------

    async def _generate(
        self,
        request: generate_pb2.GenerateRequest,
        request_id: str,
        context: _Context,
        scope: _RpcScope,
    ) -> generate_pb2.GenerateResponse:
        call = self._prepare(request, request_id, context, scope.started)
        try:
            return await self._generate_once(call, context, scope)
        except errors.MeshError as exc:
            self._abandon(call, exc)
            raise
        finally:
            self._abandon(call)

    async def _generate_once(
        self, call: _Call, context: _Context, scope: _RpcScope
    ) -> generate_pb2.GenerateResponse:
        """Answer a validated unary request: from the cache, a flight, or a worker."""
        request = call.request
        request_id = request.request_id
        found = await self._consult(call, context, scope)
        if found is not None:
            text, summary, model = self._found(call, found, scope, "Generate")
            return generate_pb2.GenerateResponse(
                request_id=request_id, model=model, text=text, summary=summary
            )
        tried: list[Worker] = []
        while True:
            lease = await self._acquire(call, tried, context)
            worker = lease.worker
            scope.note(worker_id=worker.worker_id)
            with lease, _attempt_span("Generate", call, worker, tried) as attempt:
                try:
                    response = await worker.stub.Generate(
                        call.request,
                        timeout=self._timeout(context),
                        metadata=attempt.outgoing(self._worker_metadata),
                    )
                    lease.succeeded()
                    break
                except grpc.aio.AioRpcError as exc:
                    attempt.set_status(*tracing.status_of(exc))
                    error = self._worker_error(lease, exc)
            # A unary caller has seen nothing yet, so any attempt may be retried.
            await self._before_retry(error, worker, tried, call, context)
        summary = response.summary
        total_ms = call.elapsed_ms()
        # The router sees a unary answer only whole; its first token existed as long before the
        # end as the worker says it spent generating after it.
        after_first_ms = max(0.0, summary.timings.total_ms - summary.timings.time_to_first_token_ms)
        self._complete_summary(call, summary, worker, total_ms, max(0.0, total_ms - after_first_ms))
        metrics.TIME_TO_FIRST_TOKEN.labels("Generate", "false").observe(
            summary.timings.time_to_first_token_ms / 1000.0
        )
        response.request_id = request_id
        response.model = response.model or request.model
        self._finish(call, response.text, summary)
        return response

    def _prepare(
        self,
        request: generate_pb2.GenerateRequest,
        request_id: str,
        context: _Context,
        started: float,
    ) -> _Call:
        """Validate and resolve everything that needs no network; raise what the caller gets."""
        tenant = _tenant(context)
        validate_request(request, self.limits)
        known = self.pool.known_models
        if request.model not in known:
            message = (
                f"model {request.model!r} is not served here; known models: "
                f"{', '.join(sorted(known)) or 'none'}"
            )
            waiting = self.pool.never_answered()
            if waiting:
                message += f" ({waiting} worker(s) have not answered yet)"
            raise errors.NotFound(message)
        forward = generate_pb2.GenerateRequest()
        forward.CopyFrom(request)
        forward.request_id = request_id
        key = ""
        if reads_cache(request) or writes_cache(request):
            key = cache_key(request, tenant=tenant, limits=self.limits)
        return _Call(request=forward, tenant=tenant, key=key, started=started)

    async def _consult(
        self, call: _Call, context: _Context, scope: _RpcScope
    ) -> cache_pb2.CacheEntry | Answer | None:
        """Before dispatching: the cached answer, or an identical request's answer (single-flight,
        see the module docstring), or None: dispatch, with ``call.flight`` and ``call.fill`` set
        when the request leads and holds the fill lock."""
        request = call.request
        if not writes_cache(request):
            return await self._lookup(call, context)
        if not reads_cache(request):
            # A refresh dispatches itself; identical requests may follow it.
            call.flight = self.flights.lead(call.key)
            return None
        while True:
            flight, leading = self.flights.lead_or_join(call.key)
            if leading:
                call.flight = flight
                break
            remaining: float | None = context.time_remaining()
            answer = await self.flights.follow(flight, timeout=remaining)
            if answer is not None:
                metrics.COALESCED.labels("router").inc()
                scope.note(coalesced=True)
                return answer
        fill = await self.cache.lookup_or_claim(
            call.key,
            wait=self._fill_max_wait,
            lock_ttl=self._fill_lock_ttl,
            timeout=context.time_remaining(),
        )
        call.fill = fill.lease
        if fill.entry is None:
            return None
        answer = Answer(request.model, fill.entry.text, _cached_summary(fill.entry, 0.0))
        self.flights.land(call.flight, answer)
        if not fill.coalesced:
            return fill.entry
        # Generated for this burst of identical requests by another router: not a cached answer.
        answer.summary.cached = False
        metrics.COALESCED.labels("cache").inc()
        scope.note(coalesced=True)
        return answer

    def _found(
        self,
        call: _Call,
        found: cache_pb2.CacheEntry | Answer,
        scope: _RpcScope,
        method: str,
    ) -> tuple[str, generate_pb2.GenerationSummary, str]:
        """Text, summary (with this request's timings) and model of an answer found before
        dispatching: a cache entry, or the answer of the flight the request followed."""
        elapsed_ms = call.elapsed_ms()
        if isinstance(found, Answer):
            summary = generate_pb2.GenerationSummary()
            summary.CopyFrom(found.summary)
            summary.timings.CopyFrom(
                generate_pb2.Timings(time_to_first_token_ms=elapsed_ms, total_ms=elapsed_ms)
            )
            text, model = found.text, found.model
        else:
            summary = _cached_summary(found, elapsed_ms)
            text, model = found.text, call.request.model
        scope.note(cached=summary.cached, worker_id=summary.worker_id)
        metrics.TIME_TO_FIRST_TOKEN.labels(method, "true" if summary.cached else "false").observe(
            elapsed_ms / 1000.0
        )
        return text, summary, model

    def _found_chunks(
        self, call: _Call, found: cache_pb2.CacheEntry | Answer, scope: _RpcScope
    ) -> list[generate_pb2.GenerateStreamResponse]:
        """An answer found before dispatching, as a stream: the text in a few pieces, then the
        summary."""
        text, summary, _ = self._found(call, found, scope, "GenerateStream")
        request_id = call.request.request_id
        chunks = [
            generate_pb2.GenerateStreamResponse(
                request_id=request_id, text=text[i : i + _CACHED_CHUNK_CHARS]
            )
            for i in range(0, len(text), _CACHED_CHUNK_CHARS)
        ]
        chunks.append(generate_pb2.GenerateStreamResponse(request_id=request_id, summary=summary))
        return chunks

    def _abandon(self, call: _Call, error: errors.MeshError | None = None) -> None:
        """At the end of a request however it ended: abort the flight it leads unless it landed
        (followers go on without it, or share ``error`` when an identical request would get it
        too), and release the fill lock it holds unless the answer was stored with it."""
        if call.flight is not None:
            self.flights.abort(call.flight, error)
        if call.fill is not None:
            call.fill.release()

    async def _lookup(self, call: _Call, context: _Context) -> cache_pb2.CacheEntry | None:
        """The cached answer, if the request may use one and there is one."""
        if not reads_cache(call.request):
            return None
        remaining: float | None = context.time_remaining()
        entry = await self.cache.lookup(call.key, timeout=remaining)
        if entry is None and call.request.cache_policy == generate_pb2.CACHE_POLICY_ONLY_IF_CACHED:
            raise errors.NotFound(
                "no cached answer for this request (cache_policy is CACHE_POLICY_ONLY_IF_CACHED)"
            )
        return entry

    async def _acquire(self, call: _Call, tried: Sequence[Worker], context: _Context) -> Lease:
        """A lease on the worker for the next attempt, after waiting in the admission queue
        while every candidate is full."""
        remaining: float | None = context.time_remaining()
        lease, waited = await self.admission.admit(
            call.request.model,
            call.request.priority,
            lambda: self._try_pick(call, tried),
            remaining=remaining,
            retrying=bool(tried),
            front=call.busy_refusals > 0,
        )
        call.queued_ms += waited * 1000.0
        return lease

    def _try_pick(self, call: _Call, tried: Sequence[Worker] = ()) -> Lease | None:
        """A lease on the worker for the request: an ejected worker due its probe if there is
        one, else the policy's choice among the HEALTHY workers (with a free slot, for a
        load-aware policy); None when there is none. Only workers not tried yet by the request
        are considered."""
        candidates = self._untried(call, tried)
        if not candidates:
            raise errors.Unavailable(self._no_worker_message(call.request.model))
        for worker in candidates:
            if worker.probe_due:
                log.info("probing ejected worker with a request", worker=worker.describe())
                return self.pool.lease(worker, probe=True)
        free = [
            w
            for w in candidates
            if w.state is WorkerState.HEALTHY and not (self.policy.load_aware and is_full(w))
        ]
        if not free:
            return None
        return self.pool.lease(self.policy.choose(free))

    def _untried(self, call: _Call, tried: Sequence[Worker]) -> list[Worker]:
        return [w for w in self.pool.candidates(call.request.model) if w not in tried]

    async def _before_retry(
        self,
        error: errors.MeshError,
        worker: Worker,
        tried: list[Worker],
        call: _Call,
        context: _Context,
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
        if isinstance(error, errors.Busy) and call.busy_refusals < _MAX_BUSY_REFUSALS:
            call.busy_refusals += 1
            metrics.BUSY_REFUSALS.inc()
            self.pool.mark_full(worker)
            return
        tried.append(worker)
        remaining: float | None = context.time_remaining()
        if (
            error.upstream_code not in _RETRYABLE
            or len(tried) >= self.max_attempts
            or (remaining is not None and remaining < _MIN_RETRY_BUDGET_S)
            or not self._untried(call, tried)
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

    def _no_worker_message(self, model: str) -> str:
        """Why a known model has no worker to take a request now."""
        message = f"no healthy worker serves model {model!r}"
        workers = [w for w in self.pool.workers() if w.model == model]
        if not workers:
            message += " now: every worker that served it has left the mesh"
        states = collections.Counter(
            w.state.name.lower() for w in workers if w.state is not WorkerState.SUSPECT
        )
        if states:
            message += " (" + ", ".join(f"{n} {s}" for s, n in sorted(states.items())) + ")"
        status = self.pool.discovery_status()
        if status is not None and not status.healthy:
            message += f"; the worker registry ({status.source}) is unreachable"
        return message

    def _timeout(self, context: _Context) -> float:
        """The worker's deadline: the caller's remaining time, or the router's maximum."""
        remaining: float | None = context.time_remaining()
        return self._max_request_time if remaining is None else max(0.0, remaining)

    async def _relay(
        self,
        call: _Call,
        lease: Lease,
        stream: grpc.aio.UnaryStreamCall[
            generate_pb2.GenerateRequest, generate_pb2.GenerateStreamResponse
        ],
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
                        first_ms = call.elapsed_ms()
                        metrics.TIME_TO_FIRST_TOKEN.labels("GenerateStream", "false").observe(
                            first_ms / 1000.0
                        )
                chunk.request_id = call.request.request_id
                if chunk.HasField("summary"):
                    total_ms = call.elapsed_ms()
                    self._complete_summary(
                        call,
                        chunk.summary,
                        worker,
                        total_ms,
                        total_ms if first_ms is None else first_ms,
                    )
                    self._finish(call, "".join(parts), chunk.summary)
                    finished = True
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise self._worker_error(lease, exc) from None
        if not finished:
            lease.failed("stream ended without a summary")
            raise errors.Unavailable(f"{worker.describe()} ended the stream without a summary")
        lease.succeeded()

    def _complete_summary(
        self,
        call: _Call,
        summary: generate_pb2.GenerationSummary,
        worker: Worker,
        total_ms: float,
        first_token_ms: float,
    ) -> None:
        """The worker's summary with the router's timings (the router's queue time added to the
        worker's)."""
        summary.cached = False
        summary.timings.queue_ms += call.queued_ms
        summary.worker_id = summary.worker_id or worker.worker_id
        summary.model_version = summary.model_version or worker.model_version
        summary.timings.time_to_first_token_ms = first_token_ms
        summary.timings.total_ms = total_ms

    def _finish(self, call: _Call, text: str, summary: generate_pb2.GenerationSummary) -> None:
        """A finished answer goes to the request's followers, and is stored in the background
        (with the fill lock's token) when the request allows it."""
        if summary.finish_reason not in _FINISHED:
            return
        if call.flight is not None:
            landed = generate_pb2.GenerationSummary()
            landed.CopyFrom(summary)
            self.flights.land(call.flight, Answer(call.request.model, text, landed))
        if not writes_cache(call.request):
            return
        entry = cache_pb2.CacheEntry(
            text=text,
            finish_reason=summary.finish_reason,
            usage=summary.usage,
            created_at_ms=int(time.time() * 1000),
            model_version=summary.model_version,
            worker_id=summary.worker_id,
            model=call.request.model,
            tenant=call.tenant,
        )
        ttl_seconds = call.request.cache_ttl_seconds
        if call.fill is not None:
            call.fill.store(entry, ttl_seconds=ttl_seconds)
        else:
            self.cache.store(call.key, entry, ttl_seconds=ttl_seconds)

    def _worker_error(self, lease: Lease, exc: grpc.aio.AioRpcError) -> errors.MeshError:
        """What the caller gets for a failed worker call; a worker that seems gone gets no more
        traffic until it answers again, and its failures count towards ejection."""
        worker = lease.worker
        if errors.is_busy(exc):
            return errors.Busy(f"{worker.describe()}: {exc.details()}")
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
        return errors.from_rpc_error(exc, peer=worker.describe())

    def _status(self, worker: Worker) -> router_pb2.WorkerStatus:
        report = worker.report
        age = worker.report_age()
        return router_pb2.WorkerStatus(
            worker_id=worker.worker_id,
            address=worker.address,
            model=worker.model,
            engine=worker.engine,
            state=worker.state.value,
            in_flight=worker.in_flight,
            active_requests=report.active if report is not None else 0,
            queued_requests=report.queued if report is not None else 0,
            capacity=worker.info.capacity if worker.info is not None else 0,
            kv_cache_used_fraction=report.kv_cache_used_fraction if report is not None else 0.0,
            score=self.policy.score(worker),
            last_report_age_ms=-1.0 if age is None else age * 1000.0,
        )


class _RpcScope:
    """One RPC: its exceptions become statuses (llmmesh.errors.grpc_errors); counted and logged."""

    def __init__(self, method: str, context: _Context, *, quiet: bool = False) -> None:
        self._method = method
        self._context = context
        self._quiet = quiet
        self._errors = errors.grpc_errors(context)
        self._fields: dict[str, Any] = {}
        #: time.monotonic() when the RPC began.
        self.started = time.monotonic()
        #: The RPC's server span (tracing.NO_SPAN while tracing is off, and for quiet RPCs).
        self.span = tracing.NO_SPAN

    def note(self, **fields: Any) -> None:
        """Add fields to the line logged when the RPC ends."""
        self._fields.update(fields)

    async def __aenter__(self) -> _RpcScope:
        self.started = time.monotonic()
        await self._errors.__aenter__()
        if not self._quiet:
            self.span = tracing.server_span(_ROUTER_SPAN + self._method, self._context)
            self.span.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        elapsed = time.monotonic() - self.started
        code, message = self._outcome(exc)
        metrics.REQUESTS.labels(self._method, code).inc()
        metrics.REQUEST_DURATION.labels(self._method).observe(elapsed)
        if message is not None:
            self._fields["error"] = message
        if not self._quiet or code != "OK":
            log.info(
                "request finished" if code == "OK" else "request failed",
                method=self._method,
                code=code,
                ms=round(elapsed * 1000.0, 3),
                **self._fields,
            )
        if self.span.recording:
            self.span.set_attribute("llmmesh.cached", bool(self._fields.get("cached", False)))
            for field in ("worker_id", "coalesced"):
                if field in self._fields:
                    self.span.set_attribute(f"llmmesh.{field}", self._fields[field])
        self.span.__exit__(exc_type, exc, tb)
        await self._errors.__aexit__(exc_type, exc, tb)

    def _outcome(self, exc: BaseException | None) -> tuple[str, str | None]:
        if exc is None:
            return "OK", None
        if isinstance(exc, errors.MeshError):
            return exc.code.name, exc.message
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            if errors.cancelled_status(self._context) is grpc.StatusCode.DEADLINE_EXCEEDED:
                return "DEADLINE_EXCEEDED", "the caller's deadline passed"
            return "CANCELLED", "the caller cancelled"
        return "INTERNAL", type(exc).__name__


def _attempt_span(
    method: str, call: _Call, worker: Worker, tried: Sequence[Worker]
) -> tracing.Span:
    """The client span of one call to a worker (``llmmesh.attempt`` counts from 1)."""
    span = tracing.client_span(_WORKER_SPAN + method)
    if span.recording:
        span.set_attribute("llmmesh.attempt", len(tried) + call.busy_refusals + 1)
        span.set_attribute("llmmesh.worker_id", worker.worker_id)
        span.set_attribute("server.address", worker.address)
    return span


def _cancel_on_done(call: grpc.aio.Call) -> grpc.aio.DoneCallback[Any, Any]:
    """A done callback of the caller's RPC that cancels ``call``."""

    def cancel(_: object) -> None:
        call.cancel()

    # grpc-stubs declares the callback type as a class; at run time any callable will do.
    return cast("grpc.aio.DoneCallback[Any, Any]", cancel)


def _tenant(context: _Context) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA_KEY:
            tenant = value.decode(errors="replace") if isinstance(value, bytes) else value
            if not _TENANT.fullmatch(tenant):
                raise errors.InvalidArgument(
                    f"metadata {TENANT_METADATA_KEY}",
                    "must be 1 to 64 characters among letters, digits, '.', '_' and '-'",
                )
            return tenant
    return DEFAULT_TENANT


def _cached_summary(
    entry: cache_pb2.CacheEntry, elapsed_ms: float
) -> generate_pb2.GenerationSummary:
    return generate_pb2.GenerationSummary(
        finish_reason=entry.finish_reason,
        usage=entry.usage,
        cached=True,
        worker_id=entry.worker_id,
        model_version=entry.model_version,
        timings=generate_pb2.Timings(
            queue_ms=0.0, time_to_first_token_ms=elapsed_ms, total_ms=elapsed_ms
        ),
    )


class RouterApp:
    """The router as a :class:`llmmesh.server.ServiceApp`."""

    service_names: Sequence[str] = (router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,)

    def __init__(
        self,
        config: RouterConfig,
        *,
        discovery: Discovery | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.pool = WorkerPool(
            discovery if discovery is not None else _discovery(config),
            max_message_bytes=config.max_message_bytes,
            close_grace=config.max_request_time,
            load_stale_after=config.load_stale_after,
            eject_after_failures=config.eject_after_failures,
            eject_cooldown=config.eject_cooldown,
            eject_cooldown_max=config.eject_cooldown_max,
        )
        self.service = RouterService(
            self.pool,
            policy if policy is not None else make_policy(config.policy),
            limits=config.limits,
            max_request_time=config.max_request_time,
            max_attempts=config.max_attempts,
            admission=AdmissionQueue(
                max_size=config.admission_queue_size, max_wait=config.admission_max_wait
            ),
            fill_lock_ttl=config.fill_lock_ttl,
            fill_max_wait=config.fill_max_wait,
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the Router servicer."""
        router_pb2_grpc.add_RouterServicer_to_server(self.service, server)

    async def start(self, runner: ServiceRunner) -> None:
        """Connect to the cache, follow discovery, and give the workers a moment to answer."""
        config = self.config
        self.service.cache = open_cache(
            config.cache_address,
            timeout=config.cache_timeout,
            max_message_bytes=config.max_message_bytes,
            breaker=config.cache_breaker,
        )
        await self.pool.start()
        await self.pool.wait_ready(timeout=2.0)
        workers = self.pool.workers()
        log.info(
            "routing",
            workers=len(workers),
            healthy=sum(1 for w in workers if w.state is WorkerState.HEALTHY),
            models=sorted(self.pool.known_models),
            discovery=config.discovery,
            cache=config.cache_address or "disabled",
            policy=self.service.policy.name,
        )

    async def drain(self) -> None:
        """Nothing to deregister: the router is found by its address."""

    async def close(self) -> None:
        """Stop following workers and close every connection."""
        try:
            await self.pool.close()
        finally:
            await self.service.cache.close()


def _discovery(config: RouterConfig) -> Discovery:
    if config.discovery == "static":
        return StaticDiscovery(config.workers)
    if config.discovery == "consul":
        return ConsulDiscovery(
            consul.resolve(config),
            wait=config.consul_watch_wait,
            backoff_max=config.consul_retry_max,
        )
    raise ValueError(f"discovery: unknown discovery {config.discovery!r}")


def _discovery_status(status: DiscoveryStatus) -> router_pb2.DiscoveryStatus:
    now = time.time()
    return router_pb2.DiscoveryStatus(
        source=status.source,
        target=status.target,
        healthy=status.healthy,
        last_error=status.last_error,
        seconds_since_last_success=-1.0
        if status.last_success is None
        else max(0.0, now - status.last_success),
        consecutive_failures=status.consecutive_failures,
        endpoints=status.endpoints,
        seconds_since_last_change=-1.0
        if status.last_change is None
        else max(0.0, now - status.last_change),
    )
