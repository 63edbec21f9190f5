"""Picking the worker for a request's next attempt at dispatch (router/_dispatch.py).

The policy picks a HEALTHY worker of the model with a free batch slot (an ejected worker due its
probe comes first; no worker at all: UNAVAILABLE, saying why). When every worker of the model is
full the request waits in the admission queue (router/_admission.py), in priority order, and a
request a worker refused as Busy waits at the head of its priority level; the time it waits is
added to the summary's ``timings.queue_ms``. A worker that failed the request is not picked for
it again.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import structlog

from llmmesh import errors
from router._admission import AdmissionQueue
from router._balancer import Policy, is_full
from router._intake import Accepted
from router._pool import Lease, Worker, WorkerPool, WorkerState
from router._rpc_scope import Context

log = structlog.get_logger(__name__)


@dataclass
class Attempts:
    """One request's attempts at dispatching."""

    #: The workers that failed it (each is tried once).
    tried: list[Worker] = field(default_factory=list)
    #: Times a worker refused the request as Busy (see router/_dispatch.py).
    busy_refusals: int = 0
    #: Milliseconds spent in the router's admission queue (all attempts together).
    queued_ms: float = 0.0


class WorkerPicker:
    """Leases a worker for each attempt of a request, from the pool, by a policy."""

    def __init__(self, pool: WorkerPool, policy: Policy, admission: AdmissionQueue) -> None:
        self.pool = pool
        self.policy = policy
        self.admission = admission

    async def acquire(self, accepted: Accepted, attempts: Attempts, context: Context) -> Lease:
        """A lease on the worker for the next attempt, after waiting in the admission queue
        while every candidate is full."""
        remaining: float | None = context.time_remaining()
        lease, waited = await self.admission.admit(
            accepted.request.model,
            accepted.request.priority,
            lambda: self._try_pick(accepted, attempts.tried),
            remaining=remaining,
            retrying=bool(attempts.tried),
            front=attempts.busy_refusals > 0,
        )
        attempts.queued_ms += waited * 1000.0
        return lease

    def _try_pick(self, accepted: Accepted, tried: list[Worker]) -> Lease | None:
        """A lease on the worker for the request: an ejected worker due its probe if there is
        one, else the policy's choice among the HEALTHY workers (with a free slot, for a
        load-aware policy); None when there is none. Only workers not tried yet by the request
        are considered."""
        candidates = self.untried(accepted, tried)
        if not candidates:
            raise errors.Unavailable(self._no_worker_message(accepted.request.model))
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

    def untried(self, accepted: Accepted, tried: list[Worker]) -> list[Worker]:
        """The workers of the request's model that have not failed it."""
        return [w for w in self.pool.candidates(accepted.request.model) if w not in tried]

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
