"""The last stage of a request: its summary, and what becomes of its answer.

A worker's summary is completed with the router's view (:func:`complete_summary`: the router's
queue time added to the worker's, the router's timings). A finished, cacheable answer is stored in
the background, without delaying the caller (with the fill lock's token, which releases it), and
given to the request's followers (:meth:`Completion.finish`). A leader that fails or whose caller
goes away releases its fill lock in the background; its followers go on without it (one leads
anew) (:meth:`Completion.abandon`).
"""

from __future__ import annotations

import time

from llmmesh import errors
from llmmesh.v1 import cache_pb2, generate_pb2
from router._cache_client import ResponseCache
from router._consult import Lead
from router._intake import Accepted
from router._pool import Worker
from router._single_flight import Answer, Flights

_FINISHED = frozenset({generate_pb2.FINISH_REASON_STOP, generate_pb2.FINISH_REASON_LENGTH})


def complete_summary(
    summary: generate_pb2.GenerationSummary,
    worker: Worker,
    *,
    queued_ms: float,
    total_ms: float,
    first_token_ms: float,
) -> None:
    """The worker's summary with the router's timings (the router's queue time, ``queued_ms``,
    added to the worker's)."""
    summary.cached = False
    summary.timings.queue_ms += queued_ms
    summary.worker_id = summary.worker_id or worker.worker_id
    summary.model_version = summary.model_version or worker.model_version
    summary.timings.time_to_first_token_ms = first_token_ms
    summary.timings.total_ms = total_ms


class Completion:
    """Hands a dispatched request's answer to its followers and the cache, and ends its lead."""

    def __init__(self, flights: Flights, cache: ResponseCache) -> None:
        self.flights = flights
        self.cache = cache

    def finish(
        self,
        accepted: Accepted,
        lead: Lead,
        text: str,
        summary: generate_pb2.GenerationSummary,
    ) -> None:
        """A finished answer goes to the request's followers, and is stored in the background
        (with the fill lock's token) when the request allows it."""
        if summary.finish_reason not in _FINISHED:
            return
        if lead.flight is not None:
            landed = generate_pb2.GenerationSummary()
            landed.CopyFrom(summary)
            self.flights.land(lead.flight, Answer(accepted.request.model, text, landed))
        plan = accepted.cache
        if not plan.writes:
            return
        entry = cache_pb2.CacheEntry(
            text=text,
            finish_reason=summary.finish_reason,
            usage=summary.usage,
            created_at_ms=int(time.time() * 1000),
            model_version=summary.model_version,
            worker_id=summary.worker_id,
            model=accepted.request.model,
            tenant=accepted.tenant,
        )
        if lead.fill is not None:
            lead.fill.store(entry, ttl_seconds=plan.ttl_seconds)
        else:
            self.cache.store(plan.key, entry, ttl_seconds=plan.ttl_seconds)

    def abandon(self, lead: Lead, error: errors.MeshError | None = None) -> None:
        """At the end of a request however it ended: abort the flight it leads unless it landed
        (followers go on without it, or share ``error`` when an identical request would get it
        too), and release the fill lock it holds unless the answer was stored with it."""
        if lead.flight is not None:
            self.flights.abort(lead.flight, error)
        if lead.fill is not None:
            lead.fill.release()
