"""Load-balancing policies: which of the routable workers of a model gets the next request.

A policy is pure: it looks at what the routing table knows of each candidate (its load) and picks
one. It neither dials nor waits, so it is tested without a network (tests/test_balancer.py,
tests/test_router_lb.py).

**The load score** (:func:`load_score`, lower is preferred) of a worker is::

    max(active + queued + sent_since_report, in_flight) / capacity  +  kv_cache_used_fraction

from the worker's last ``WatchLoad`` report (``active``, ``queued``, ``kv_cache_used_fraction``
and ``capacity``), plus ``sent_since_report``: the requests *this* router has sent it since that
report (reset when a newer report arrives). The first term is how full its batch is, counting
what is on its way to it; the KV term steers requests away from a worker whose KV cache is nearly
full (it would have to queue or preempt) even while it has free batch slots. Because the load
comes from the worker, several router replicas that share nothing still see each other's
requests, and only their own in-transit ones are added locally. A slot is seen free only through
a report, by every replica alike: a router does not reuse the slot of its own request that ended
before the worker says so, which would let it take slots ahead of replicas that queued earlier.

``in_flight`` (this router's requests on the worker) is a floor: every one of them is on the
worker or on its way there. It matters for a report that was written before requests this router
had already sent reached the worker but arrived after they were sent: resetting
``sent_since_report`` would forget them until the next report.

Replicas that see the same free slot in the same report all claim it. The worker settles the
race: a load-aware router asks the worker not to queue its requests (``x-llmmesh-no-queue``), and
a worker with no free slot refuses one at once (``errors.Busy``); the loser counts the worker full
until its next report (:meth:`~router._pool.WorkerPool.mark_full`) and goes back to the head of
its admission queue.

A worker that has not reported yet (freshly healthy, or one that does not implement
``WatchLoad``) is scored on this router's in-flight requests alone: ``in_flight / capacity``, so
that a starting router is never stuck waiting for reports.

A worker is **full** (:func:`is_full`) when that count of requests (``max(active + queued +
sent_since_report, in_flight)``, or ``in_flight`` before a report) reaches its capacity: it has
no free batch slot. Under a load-aware policy (``Policy.load_aware``) the router sends nothing to
a full worker while it can queue the request itself (router/_admission.py), binding a request to
a worker only when one has a free slot.

Policies: ``least-loaded`` (lowest score, ties at random; the default) and ``power-of-two`` (the
lower score of two random candidates) are load-aware; ``round-robin`` and ``random`` are blind to
load, as a plain balancer is: they send to any healthy worker and leave queueing to the workers
(for comparison and benchmarks).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar, get_args

#: The policies that can be named in configuration.
PolicyName = Literal["least-loaded", "power-of-two", "round-robin", "random"]
POLICY_NAMES: tuple[str, ...] = get_args(PolicyName)


@dataclass(frozen=True)
class LoadReport:
    """A worker's last ``WatchLoad`` report, as the router keeps it."""

    active: int
    queued: int
    capacity: int
    kv_cache_used_fraction: float = 0.0
    serving: bool = True
    #: time.monotonic() when the router received it.
    received: float = 0.0
    sequence: int = 0


class Loaded(Protocol):
    """What a policy knows of a candidate worker."""

    @property
    def in_flight(self) -> int:
        """Requests this router has on the worker."""
        ...

    @property
    def capacity(self) -> int:
        """How many requests the worker runs at once (at least 1)."""
        ...

    @property
    def report(self) -> LoadReport | None:
        """The worker's last load report (None before the first)."""
        ...

    @property
    def sent_since_report(self) -> int:
        """Requests this router has sent the worker since its last report."""
        ...


W = TypeVar("W", bound=Loaded)


def capacity_of(worker: Loaded) -> int:
    """How many requests the worker runs at once: its last report's, else its description's."""
    report = worker.report
    if report is not None and report.capacity > 0:
        return report.capacity
    return max(1, worker.capacity)


def requests_on(worker: Loaded) -> int:
    """The requests the worker has or is about to get, as this router best knows."""
    report = worker.report
    if report is None:
        return worker.in_flight
    return max(report.active + report.queued + worker.sent_since_report, worker.in_flight)


def load_score(worker: Loaded) -> float:
    """The worker's load score (see the module doc); lower is preferred."""
    report = worker.report
    score = requests_on(worker) / capacity_of(worker)
    if report is not None:
        score += report.kv_cache_used_fraction
    return score


def is_full(worker: Loaded) -> bool:
    """True when the worker has no free batch slot."""
    return requests_on(worker) >= capacity_of(worker)


class Policy(Protocol):
    """Picks a worker among candidates."""

    #: The name used in configuration and logs.
    name: str
    #: True when the policy looks at load: the router then binds a request to a worker only
    #: once one has a free slot, queueing it itself meanwhile.
    load_aware: bool

    def score(self, worker: Loaded) -> float:
        """The worker's score as shown in the routing table (lower is preferred)."""
        ...

    def choose(self, candidates: Sequence[W]) -> W:
        """Pick one of ``candidates`` (never empty)."""
        ...


def _check(candidates: Sequence[object]) -> None:
    if not candidates:
        raise ValueError("no candidates to choose from")


class _ScoredPolicy:
    """What every policy has: the load score (shown in the routing table, whether or not the
    policy uses it) and its own random source (seedable for tests)."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def score(self, worker: Loaded) -> float:
        """See :func:`load_score`."""
        return load_score(worker)


class LeastLoaded(_ScoredPolicy):
    """The candidate with the lowest :func:`load_score`; ties broken at random.

    Random tie-breaking makes equally loaded workers share traffic instead of the first one in
    the table taking everything while the others idle.
    """

    name = "least-loaded"
    load_aware = True

    def choose(self, candidates: Sequence[W]) -> W:
        """The least loaded candidate, a random one among equals."""
        _check(candidates)
        scores = [self.score(c) for c in candidates]
        best = min(scores)
        tied = [c for c, s in zip(candidates, scores, strict=True) if s == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


class PowerOfTwo(_ScoredPolicy):
    """Two distinct candidates at random; the one with the lower score (either on a tie)."""

    name = "power-of-two"
    load_aware = True

    def choose(self, candidates: Sequence[W]) -> W:
        """The less loaded of two random candidates."""
        _check(candidates)
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        score_a, score_b = self.score(a), self.score(b)
        if score_a == score_b:
            return self._rng.choice((a, b))
        return a if score_a < score_b else b


class RoundRobin(_ScoredPolicy):
    """Each candidate in turn, blind to load.

    The turn is a counter over calls, so with a changing candidate set it still visits every
    candidate of a stable set equally often.
    """

    name = "round-robin"
    load_aware = False

    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def choose(self, candidates: Sequence[W]) -> W:
        """The next candidate in turn."""
        _check(candidates)
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


class Random(_ScoredPolicy):
    """A uniformly random candidate, blind to load."""

    name = "random"
    load_aware = False

    def choose(self, candidates: Sequence[W]) -> W:
        """Any candidate, with equal chances."""
        _check(candidates)
        return self._rng.choice(list(candidates))


def make_policy(name: PolicyName, *, rng: random.Random | None = None) -> Policy:
    """The policy configured by ``name``."""
    if name == "least-loaded":
        return LeastLoaded(rng)
    if name == "power-of-two":
        return PowerOfTwo(rng)
    if name == "round-robin":
        return RoundRobin()
    if name == "random":
        return Random(rng)
    raise ValueError(f"policy: unknown policy {name!r}")
