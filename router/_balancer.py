"""Load-balancing policies: which of the healthy workers of a model gets the next request.

A policy is pure: it looks at what the routing table knows of each candidate (its load) and picks
one. It neither dials nor waits, so it is tested without a network (tests/test_balancer.py).

Today the load a router knows is its own in-flight count per worker. When workers report their
load on ``WatchLoad`` (a later addition), a candidate's load becomes the last report plus the
requests sent since it, and the same policies apply unchanged.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal, Protocol, TypeVar

#: The policies that can be named in configuration.
PolicyName = Literal["least-loaded"]


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


W = TypeVar("W", bound=Loaded)


class Policy(Protocol):
    """Picks a worker among candidates."""

    #: The name used in configuration and logs.
    name: str

    def score(self, worker: Loaded) -> float:
        """The worker's score as shown in the routing table (lower is preferred)."""
        ...

    def choose(self, candidates: Sequence[W]) -> W:
        """Pick one of ``candidates`` (never empty)."""
        ...


class LeastLoaded:
    """The candidate with the lowest ``in_flight / capacity``; ties broken at random.

    Random tie-breaking makes equally loaded workers share traffic instead of the first one in
    the table taking everything while the others idle.
    """

    name = "least-loaded"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def score(self, worker: Loaded) -> float:
        """Fraction of the worker's capacity this router keeps busy."""
        return worker.in_flight / max(1, worker.capacity)

    def choose(self, candidates: Sequence[W]) -> W:
        """The least loaded candidate, a random one among equals."""
        if not candidates:
            raise ValueError("no candidates to choose from")
        scores = [self.score(c) for c in candidates]
        best = min(scores)
        tied = [c for c, s in zip(candidates, scores, strict=True) if s == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


def make_policy(name: PolicyName, *, rng: random.Random | None = None) -> Policy:
    """The policy configured by ``name``."""
    if name == "least-loaded":
        return LeastLoaded(rng)
    raise ValueError(f"policy: unknown policy {name!r}")
