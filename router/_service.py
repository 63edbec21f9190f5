"""The ``llmmesh.v1.Router`` servicer: a request's stages, one module each.

How a request flows through :class:`RouterService` (see ARCHITECTURE.md):

1. a request id is assigned when the caller gave none, and bound to every log line of the RPC
   (router/_rpc_scope.py logs, counts and traces the RPC, and turns its errors into statuses);
2. the tenant (metadata ``x-llmmesh-tenant``) and the request are validated before anything else:
   bad input never reaches a worker; the request's use of the cache is decided once, here
   (router/_intake.py); a stream beyond its connection's or tenant's limit of open streams is
   RESOURCE_EXHAUSTED (router/_stream_limits.py);
3. a model no worker has ever reported is NOT_FOUND (router/_intake.py);
4. a cacheable request is looked up under a short timeout; a hit is answered at once (a streaming
   caller gets the cached text as a few chunks), a miss under CACHE_POLICY_ONLY_IF_CACHED is
   NOT_FOUND. Single-flight: a request that reads and writes the cache and finds an identical one
   in flight in this router follows it (router/_single_flight.py) and is given its answer (a
   streaming caller gets it like a cache hit, its summary as the leader's with its own timings);
   otherwise it leads, and its lookup claims the key's fill lock in the cache service, or waits
   there for the router that holds it (router/_cache_client.py), so that identical requests on
   other routers dispatch once too. A refresh never follows but may lead (router/_consult.py);
5. the policy picks a HEALTHY worker of the model with a free batch slot (an ejected worker due
   its probe comes first; no worker at all: UNAVAILABLE, saying why). When every worker of the
   model is full the request waits in the admission queue (router/_admission.py), in priority
   order; the time it waits is added to the summary's ``timings.queue_ms``. The request is sent
   with the caller's remaining deadline at dispatch. Chunks are relayed as they arrive (the
   worker's slot is free once the worker is done, however slowly the caller reads: a caller that
   reads nothing for ``stream_idle_timeout`` is cancelled; router/_drain.py); a caller
   that cancels or runs out of time cancels the worker's call, which aborts the engine request.
   A failure before the first chunk is retried on another worker (bounded, jittered, within the
   deadline); never after (router/_picking.py picks, router/_dispatch.py sends and relays);
6. a finished, cacheable answer is stored in the background, without delaying the caller (with
   the fill lock's token, which releases it), and given to the request's followers. A leader that
   fails or whose caller goes away releases its fill lock in the background; its followers go on
   without it (one leads anew) (router/_completion.py).

The app that runs the servicer (config, discovery, pool, cache client) is router/_app.py.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from datetime import timedelta

import structlog

from llmmesh import errors, logs
from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc
from llmmesh.validation import MAX_REQUEST_ID_CHARS, Limits
from router._admission import AdmissionQueue
from router._balancer import Policy
from router._cache_client import NoCache, ResponseCache
from router._completion import Completion
from router._consult import CacheConsult, Lead, found_chunks, found_response
from router._dispatch import Dispatcher
from router._intake import Accepted, accept_request, request_id_of
from router._pool import WorkerPool
from router._routing_table import routing_table
from router._rpc_scope import Context, RpcScope
from router._single_flight import Flights
from router._stream_limits import StreamLimits


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
        stream_idle_timeout: timedelta = timedelta(seconds=30),
        stream_limits: StreamLimits | None = None,
    ) -> None:
        self.pool = pool
        self.admission = admission or AdmissionQueue()
        pool.subscribe(self.admission.pump)
        self.max_attempts = max_attempts
        self.policy = policy
        self.limits = limits
        self.flights = Flights()
        cache = cache or NoCache()
        self._consult = CacheConsult(
            self.flights,
            cache,
            fill_lock_ttl=fill_lock_ttl.total_seconds(),
            fill_max_wait=fill_max_wait.total_seconds(),
        )
        self._dispatch = Dispatcher(
            pool,
            policy,
            self.admission,
            max_attempts=max_attempts,
            max_request_time=max_request_time.total_seconds(),
            default_max_tokens=limits.default_max_tokens,
            stream_idle_timeout=stream_idle_timeout.total_seconds(),
        )
        self.stream_limits = stream_limits or StreamLimits(per_connection=0, per_tenant=0)
        self._completion = Completion(self.flights, cache)

    @property
    def cache(self) -> ResponseCache:
        """Where answers are looked up and stored. Replaced by :class:`router.RouterApp` once the
        event loop runs (channels need one)."""
        return self._consult.cache

    @cache.setter
    def cache(self, cache: ResponseCache) -> None:
        self._consult.cache = self._completion.cache = cache

    # -- RPCs -------------------------------------------------------------------------------

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: Context
    ) -> generate_pb2.GenerateResponse:
        """Generate a whole answer."""
        request_id = request_id_of(request)
        with logs.bind_request(request_id=request_id[:MAX_REQUEST_ID_CHARS]):
            async with RpcScope("Generate", context) as scope:
                scope.span.set_request(request_id, request.model)
                accepted = self._accept(request, request_id, context, scope)
                lead = Lead()
                try:
                    found = await self._consult.consult(accepted, lead, context, scope)
                    if found is not None:
                        return found_response(accepted, found, scope)
                    response = await self._dispatch.generate(accepted, context, scope)
                    self._completion.finish(accepted, lead, response.text, response.summary)
                    return response
                except errors.MeshError as exc:
                    self._completion.abandon(lead, exc)
                    raise
                finally:
                    self._completion.abandon(lead)

    async def GenerateStream(
        self, request: generate_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        """Generate an answer and relay it as it is produced."""
        request_id = request_id_of(request)
        # Bound without a reset: grpc.aio runs each RPC in a task of its own, so the binding ends
        # with the RPC, whereas a generator suspended at a yield when the caller goes away is
        # closed later from another task, where resetting a context variable fails.
        structlog.contextvars.bind_contextvars(request_id=request_id[:MAX_REQUEST_ID_CHARS])
        async with RpcScope("GenerateStream", context) as scope:
            scope.span.set_request(request_id, request.model)
            accepted = self._accept(request, request_id, context, scope)
            with self.stream_limits.open(connection=context.peer(), tenant=accepted.tenant):
                lead = Lead()
                try:
                    found = await self._consult.consult(accepted, lead, context, scope)
                    if found is not None:
                        for chunk in found_chunks(accepted, found, scope):
                            yield chunk
                        return
                    on_answer = functools.partial(self._completion.finish, accepted, lead)
                    # Closed here, not later by the garbage collector, when the caller goes away.
                    async with contextlib.aclosing(
                        self._dispatch.stream(accepted, context, scope, on_answer)
                    ) as chunks:
                        async for chunk in chunks:
                            yield chunk
                except errors.MeshError as exc:
                    self._completion.abandon(lead, exc)
                    raise
                finally:
                    self._completion.abandon(lead)

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: Context
    ) -> router_pb2.ListWorkersResponse:
        """The routing table, sorted by model then worker id."""
        async with RpcScope("ListWorkers", context, quiet=True):
            return routing_table(self.pool, self.policy, request.model)

    def _accept(
        self,
        request: generate_pb2.GenerateRequest,
        request_id: str,
        context: Context,
        scope: RpcScope,
    ) -> Accepted:
        return accept_request(
            request,
            request_id,
            context,
            started=scope.started,
            limits=self.limits,
            pool=self.pool,
        )
