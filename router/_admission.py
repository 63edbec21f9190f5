"""The admission queue: requests wait here, per model, while every worker of the model is full.

A request first tries to get a worker at once (``try_pick``: a lease on a worker with a free
batch slot, None when every candidate is full, or an exception when there is no candidate at
all). When it gets none, or when other requests of the model are already waiting, it joins the
model's queue, which is bounded (``max_size``; beyond it: RESOURCE_EXHAUSTED "admission queue
full (N waiting)") and ordered by priority: PRIORITY_HIGH before PRIORITY_NORMAL (and
UNSPECIFIED) before PRIORITY_LOW, first come first served within a level.

The queue is pumped (:meth:`AdmissionQueue.pump`) whenever capacity for the model may have freed
up: a load report, a request of this router ending, a worker becoming routable. A pump offers
the free slots to the waiters in order; each admitted waiter gets its lease at once, so the next
one sees the worker's load with it.

A waiter leaves the queue when it is admitted, when its caller cancels, when the caller's deadline
passes (DEADLINE_EXCEEDED) or when it has waited ``max_wait`` (RESOURCE_EXHAUSTED: the fleet is
overloaded; the caller may try again later), or when its model has no worker left to wait for
(the ``try_pick`` error, UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from llmmesh import errors
from llmmesh.v1 import generate_pb2
from router import _metrics as metrics
from router._pool import Lease

#: Order of service: lower first.
_RANK: dict[int, int] = {
    generate_pb2.PRIORITY_HIGH: 0,
    generate_pb2.PRIORITY_NORMAL: 1,
    generate_pb2.PRIORITY_UNSPECIFIED: 1,
    generate_pb2.PRIORITY_LOW: 2,
}
_LEVELS = 3

#: Returns a lease on a worker with a free slot, None when every candidate is full; raises a
#: MeshError when the request has no candidate at all.
TryPick = Callable[[], Lease | None]


def rank(priority: int) -> int:
    """Where a priority is served: 0 first (HIGH), 2 last (LOW); unknown values as NORMAL."""
    return _RANK.get(int(priority), 1)


@dataclass(eq=False)
class _Waiter:
    try_pick: TryPick
    #: True when the request was tried on some worker already (its candidates differ).
    retrying: bool
    future: asyncio.Future[Lease] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AdmissionQueue:
    """Bounded, priority-ordered queues of requests waiting for a free worker, one per model."""

    def __init__(
        self, *, max_size: int = 1024, max_wait: timedelta = timedelta(seconds=30)
    ) -> None:
        self.max_size = max_size
        self.max_wait = max_wait.total_seconds()
        self._queues: dict[str, tuple[deque[_Waiter], ...]] = {}

    def waiting(self, model: str) -> int:
        """How many requests for ``model`` are waiting."""
        levels = self._queues.get(model)
        return 0 if levels is None else sum(len(level) for level in levels)

    async def admit(
        self,
        model: str,
        priority: int,
        try_pick: TryPick,
        *,
        remaining: float | None,
        retrying: bool = False,
        front: bool = False,
    ) -> tuple[Lease, float]:
        """A lease on a worker for the request, and the seconds it waited for it.

        ``remaining`` is the caller's remaining deadline (None: none). Raises ResourceExhausted
        (queue full, or ``max_wait`` spent), DeadlineExceeded (the deadline passed while
        waiting), or what ``try_pick`` raises. ``front``: the request had a slot and lost it
        (its worker was taken by another router first); it waits ahead of its priority level.
        """
        if not self.waiting(model):
            lease = try_pick()
            if lease is not None:
                return lease, 0.0
        waiting = self.waiting(model)
        if waiting >= self.max_size:
            metrics.REJECTED.labels("queue_full").inc()
            raise errors.ResourceExhausted(
                f"every worker of model {model!r} is busy and the admission queue is full "
                f"({waiting} waiting)"
            )
        waiter = _Waiter(try_pick, retrying)
        levels = self._queues.setdefault(model, tuple(deque() for _ in range(_LEVELS)))
        if front:
            levels[rank(priority)].appendleft(waiter)
        else:
            levels[rank(priority)].append(waiter)
        metrics.QUEUE_DEPTH.labels(model).set(self.waiting(model))
        started = time.monotonic()
        try:
            self.pump(model)
            timeout = self.max_wait if remaining is None else min(self.max_wait, remaining)
            await asyncio.wait({waiter.future}, timeout=max(0.0, timeout))
            if not waiter.future.done():
                waited_ms = (time.monotonic() - started) * 1000.0
                if remaining is not None and remaining <= self.max_wait:
                    metrics.REJECTED.labels("deadline").inc()
                    raise errors.DeadlineExceeded(
                        f"the deadline passed after {waited_ms:.0f} ms waiting for a free worker "
                        f"of model {model!r} (every worker busy)"
                    )
                metrics.REJECTED.labels("max_wait").inc()
                raise errors.ResourceExhausted(
                    f"no worker of model {model!r} had a free slot within "
                    f"{self.max_wait:g} s (every worker busy)"
                )
            return waiter.future.result(), time.monotonic() - started
        except BaseException:
            # Cancelled (or timed out) just as it was admitted: give the slot back.
            if waiter.future.done() and not waiter.future.cancelled():
                if waiter.future.exception() is None:
                    waiter.future.result().release()
            else:
                waiter.future.cancel()
            raise
        finally:
            metrics.QUEUE_WAIT.observe(time.monotonic() - started)
            self._remove(model, waiter)

    def pump(self, model: str) -> None:
        """Offer the free slots of ``model``'s workers to its waiters, in priority order."""
        levels = self._queues.get(model)
        if levels is None:
            return
        # Once a waiter that has tried no worker finds every candidate full, so will every other
        # such waiter; only retrying ones (which skip workers they tried) may still find a slot.
        blocked = False
        for level in levels:
            for waiter in list(level):
                if waiter.future.done() or (blocked and not waiter.retrying):
                    continue
                try:
                    lease = waiter.try_pick()
                except errors.MeshError as exc:
                    level.remove(waiter)
                    waiter.future.set_exception(exc)
                    continue
                if lease is None:
                    blocked = blocked or not waiter.retrying
                    continue
                level.remove(waiter)
                waiter.future.set_result(lease)
        metrics.QUEUE_DEPTH.labels(model).set(self.waiting(model))

    def _remove(self, model: str, waiter: _Waiter) -> None:
        levels = self._queues.get(model)
        if levels is None:
            return
        for level in levels:
            if waiter in level:
                level.remove(waiter)
        if not self.waiting(model):
            del self._queues[model]
        metrics.QUEUE_DEPTH.labels(model).set(self.waiting(model))
