"""The second stage of a request: the cache, and identical requests in flight, before dispatching.

A request that reads the cache is looked up under a short timeout (router/_cache_client.py); a
hit is answered at once (a streaming caller gets the cached text as a few chunks), a miss under
CACHE_POLICY_ONLY_IF_CACHED is NOT_FOUND. Single-flight: a request that reads and writes the cache
and finds an identical one in flight in this router follows it (router/_single_flight.py) and is
given its answer (a streaming caller gets it like a cache hit, its summary as the leader's with
its own timings); otherwise it leads, and its lookup claims the key's fill lock in the cache
service, or waits there for the router that holds it, so that identical requests on other routers
dispatch once too. A refresh never follows but may lead. What a leader holds (:class:`Lead`) is
ended by the last stage, router/_completion.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from llmmesh import errors
from llmmesh.v1 import cache_pb2, generate_pb2
from router import _metrics as metrics
from router._cache_client import FillLease, ResponseCache
from router._intake import Accepted
from router._rpc_scope import Context, RpcScope
from router._single_flight import Answer, Flight, Flights

#: An answer found before dispatching: a cache entry, or the answer of the flight the request
#: followed.
Found: TypeAlias = cache_pb2.CacheEntry | Answer
# A cached answer is streamed in pieces of this many characters.
_CACHED_CHUNK_CHARS = 256


@dataclass(slots=True)
class Lead:
    """What a request that goes on to dispatch holds for the identical requests that wait for it
    (set while consulting, ended by router/_completion.py)."""

    #: The flight this request leads in this router (single-flight), if any.
    flight: Flight | None = None
    #: The cache fill lock this request holds (single-flight across routers), if any.
    fill: FillLease | None = None


class CacheConsult:
    """Finds a request's answer before it is dispatched: in the cache, or in flight."""

    def __init__(
        self,
        flights: Flights,
        cache: ResponseCache,
        *,
        fill_lock_ttl: float,
        fill_max_wait: float,
    ) -> None:
        self.flights = flights
        self.cache = cache
        self._fill_lock_ttl = fill_lock_ttl
        self._fill_max_wait = fill_max_wait

    async def consult(
        self, accepted: Accepted, lead: Lead, context: Context, scope: RpcScope
    ) -> Found | None:
        """Before dispatching: the cached answer, or an identical request's answer (single-flight,
        see the module docstring), or None: dispatch, with ``lead.flight`` and ``lead.fill`` set
        when the request leads and holds the fill lock."""
        request = accepted.request
        plan = accepted.cache
        if not plan.writes:
            return await self._lookup(accepted, context)
        if not plan.reads:
            # A refresh dispatches itself; identical requests may follow it.
            lead.flight = self.flights.lead(plan.key)
            return None
        while True:
            flight, leading = self.flights.lead_or_join(plan.key)
            if leading:
                lead.flight = flight
                break
            remaining: float | None = context.time_remaining()
            answer = await self.flights.follow(flight, timeout=remaining)
            if answer is not None:
                metrics.COALESCED.labels("router").inc()
                scope.note(coalesced=True)
                return answer
        fill = await self.cache.lookup_or_claim(
            plan.key,
            wait=self._fill_max_wait,
            lock_ttl=self._fill_lock_ttl,
            timeout=context.time_remaining(),
        )
        lead.fill = fill.lease
        if fill.entry is None:
            return None
        answer = Answer(request.model, fill.entry.text, cached_summary(fill.entry, 0.0))
        self.flights.land(lead.flight, answer)
        if not fill.coalesced:
            return fill.entry
        # Generated for this burst of identical requests by another router: not a cached answer.
        answer.summary.cached = False
        metrics.COALESCED.labels("cache").inc()
        scope.note(coalesced=True)
        return answer

    async def _lookup(self, accepted: Accepted, context: Context) -> cache_pb2.CacheEntry | None:
        """The cached answer, if the request may use one and there is one."""
        plan = accepted.cache
        if not plan.reads:
            return None
        remaining: float | None = context.time_remaining()
        entry = await self.cache.lookup(plan.key, timeout=remaining)
        if entry is None and plan.only_if_cached:
            raise errors.NotFound(
                "no cached answer for this request (cache_policy is CACHE_POLICY_ONLY_IF_CACHED)"
            )
        return entry


def found_response(
    accepted: Accepted, found: Found, scope: RpcScope
) -> generate_pb2.GenerateResponse:
    """An answer found before dispatching, as a unary response."""
    text, summary, model = _found(accepted, found, scope, "Generate")
    return generate_pb2.GenerateResponse(
        request_id=accepted.request.request_id, model=model, text=text, summary=summary
    )


def found_chunks(
    accepted: Accepted, found: Found, scope: RpcScope
) -> list[generate_pb2.GenerateStreamResponse]:
    """An answer found before dispatching, as a stream: the text in a few pieces, then the
    summary."""
    text, summary, _ = _found(accepted, found, scope, "GenerateStream")
    request_id = accepted.request.request_id
    chunks = [
        generate_pb2.GenerateStreamResponse(
            request_id=request_id, text=text[i : i + _CACHED_CHUNK_CHARS]
        )
        for i in range(0, len(text), _CACHED_CHUNK_CHARS)
    ]
    chunks.append(generate_pb2.GenerateStreamResponse(request_id=request_id, summary=summary))
    return chunks


def cached_summary(
    entry: cache_pb2.CacheEntry, elapsed_ms: float
) -> generate_pb2.GenerationSummary:
    """The summary of a cached answer, served in ``elapsed_ms``."""
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


def _found(
    accepted: Accepted, found: Found, scope: RpcScope, method: str
) -> tuple[str, generate_pb2.GenerationSummary, str]:
    """Text, summary (with this request's timings) and model of an answer found before
    dispatching: a cache entry, or the answer of the flight the request followed."""
    elapsed_ms = accepted.elapsed_ms()
    if isinstance(found, Answer):
        summary = generate_pb2.GenerationSummary()
        summary.CopyFrom(found.summary)
        summary.timings.CopyFrom(
            generate_pb2.Timings(time_to_first_token_ms=elapsed_ms, total_ms=elapsed_ms)
        )
        text, model = found.text, found.model
    else:
        summary = cached_summary(found, elapsed_ms)
        text, model = found.text, accepted.request.model
    scope.note(cached=summary.cached, worker_id=summary.worker_id)
    metrics.TIME_TO_FIRST_TOKEN.labels(method, "true" if summary.cached else "false").observe(
        elapsed_ms / 1000.0
    )
    return text, summary, model
