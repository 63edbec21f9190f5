"""Single-flight within one router: identical cacheable requests in flight dispatch once.

A :class:`Flight` is one request in progress under a cache key, led by the request that started
it. Identical requests that arrive meanwhile follow it instead of dispatching: they wait for the
leader's final answer (:class:`Answer`: text and summary) and are given it. Only a finished answer
(stopped or at its length limit) lands a flight; anything else (the leader's worker failed, the
leader's caller cancelled or ran out of time, the answer was cut short) aborts it, and the
followers go on without it: the first to wake leads a new flight, the others follow that one. The
leader's error is shared with the followers only when it is INVALID_ARGUMENT from the worker, which
an identical request would get as well. Each follower keeps its own deadline and cancellation.

Which requests lead and follow is router/_consult.py's business (requests that read and write the
cache follow; a refresh leads but never follows). Everything here runs on the event loop without
awaiting, except :meth:`Flights.follow`, so no lock is needed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from llmmesh import errors
from llmmesh.v1 import generate_pb2
from router import _metrics as metrics


@dataclass(frozen=True, slots=True)
class Answer:
    """A leader's finished answer, as its followers are given it."""

    model: str
    text: str
    #: The leader's summary (followers get a copy with their own timings).
    summary: generate_pb2.GenerationSummary


class Flight:
    """One request in flight under a cache key, and the identical requests waiting for it."""

    def __init__(self, key: str) -> None:
        self.key = key
        #: The leader's answer, once it landed.
        self.answer: Answer | None = None
        #: The error every follower gets, when the leader's is one an identical request would get.
        self.error: errors.MeshError | None = None
        #: Requests waiting for it now.
        self.followers = 0
        self._over = asyncio.Event()

    @property
    def over(self) -> bool:
        """True once landed or aborted."""
        return self._over.is_set()


class Flights:
    """The flights in progress in one router, by cache key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def followers(self) -> int:
        """Requests waiting now for a flight."""
        return sum(f.followers for f in self._flights.values())

    def lead_or_join(self, key: str) -> tuple[Flight, bool]:
        """The flight under ``key``, and whether the caller leads it (it started it now)."""
        flight = self._flights.get(key)
        if flight is not None:
            return flight, False
        flight = self._flights[key] = Flight(key)
        return flight, True

    def lead(self, key: str) -> Flight | None:
        """A new flight under ``key`` led by the caller; None when one is in progress."""
        if key in self._flights:
            return None
        flight = self._flights[key] = Flight(key)
        return flight

    def land(self, flight: Flight, answer: Answer) -> None:
        """The leader finished: every follower gets ``answer``."""
        if flight.over:
            return
        flight.answer = answer
        self._end(flight)

    def abort(self, flight: Flight, error: errors.MeshError | None = None) -> None:
        """The leader failed or went away: followers go on without it, or get ``error``. A
        no-op once the flight is over."""
        if flight.over:
            return
        if error is not None and error.code == errors.InvalidArgument.code:
            flight.error = error
        self._end(flight)

    async def follow(self, flight: Flight, *, timeout: float | None) -> Answer | None:
        """Wait for ``flight`` (at most ``timeout`` seconds: DeadlineExceeded after) and return
        its answer; None when it was aborted (then lead or follow anew). Raises the leader's error
        when it is shared."""
        flight.followers += 1
        metrics.FLIGHT_FOLLOWERS.inc()
        try:
            async with asyncio.timeout(timeout):
                await flight._over.wait()
        except TimeoutError:
            raise errors.DeadlineExceeded(
                "the caller's deadline passed while waiting for an identical request in flight"
            ) from None
        finally:
            flight.followers -= 1
            metrics.FLIGHT_FOLLOWERS.dec()
        if flight.error is not None:
            shared = errors.MeshError(flight.error.message)
            shared.code = flight.error.code
            shared.upstream_code = flight.error.upstream_code
            raise shared
        return flight.answer

    def _end(self, flight: Flight) -> None:
        # Out of the table before the followers wake, so that the first of them leads anew.
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        flight._over.set()
