"""Tests of router._balancer: the pure load-balancing policies."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from router import LeastLoaded, LoadReport, make_policy


@dataclass
class Candidate:
    """A worker that has not reported its load yet: scored on in-flight requests alone."""

    name: str
    in_flight: int = 0
    capacity: int = 4
    report: LoadReport | None = None
    sent_since_report: int = 0


class TestLeastLoaded:
    """LeastLoaded picks the lowest in_flight / capacity, at random among equals."""

    def test_picks_the_least_loaded(self) -> None:
        policy = LeastLoaded(random.Random(1))
        candidates = [Candidate("a", 3), Candidate("b", 1), Candidate("c", 2)]
        assert all(policy.choose(candidates).name == "b" for _ in range(50))

    def test_load_is_relative_to_capacity(self) -> None:
        policy = LeastLoaded(random.Random(1))
        big = Candidate("big", in_flight=4, capacity=16)  # 0.25
        small = Candidate("small", in_flight=1, capacity=2)  # 0.5
        assert policy.choose([small, big]).name == "big"
        assert policy.score(big) == 0.25
        assert policy.score(small) == 0.5

    def test_ties_are_shared(self) -> None:
        policy = LeastLoaded(random.Random(7))
        candidates = [Candidate("a", 1), Candidate("b", 1), Candidate("c", 1), Candidate("d", 2)]
        picks = Counter(policy.choose(candidates).name for _ in range(3000))
        assert set(picks) == {"a", "b", "c"}
        assert all(800 < n < 1200 for n in picks.values()), picks

    def test_equal_ratios_tie(self) -> None:
        policy = LeastLoaded(random.Random(3))
        candidates = [Candidate("a", 1, capacity=3), Candidate("b", 2, capacity=6)]
        assert {policy.choose(candidates).name for _ in range(200)} == {"a", "b"}

    def test_zero_capacity_counts_as_one(self) -> None:
        policy = LeastLoaded()
        assert policy.score(Candidate("a", in_flight=2, capacity=0)) == 2.0

    def test_single_candidate(self) -> None:
        only = Candidate("only", in_flight=100)
        assert LeastLoaded().choose([only]) is only

    def test_no_candidates_is_an_error(self) -> None:
        with pytest.raises(ValueError, match="no candidates"):
            LeastLoaded().choose([])

    def test_filling_up_balances_exactly(self) -> None:
        """Assigning requests one by one keeps every worker within one request of the others."""
        policy = LeastLoaded(random.Random(11))
        candidates = [Candidate(name) for name in "abc"]
        for _ in range(10):
            policy.choose(candidates).in_flight += 1
        loads = sorted(c.in_flight for c in candidates)
        assert loads == [3, 3, 4]


class TestMakePolicy:
    """make_policy builds the policy a configuration names."""

    def test_least_loaded(self) -> None:
        assert isinstance(make_policy("least-loaded"), LeastLoaded)
        assert make_policy("least-loaded").name == "least-loaded"

    def test_unknown_name(self) -> None:
        with pytest.raises(ValueError, match="policy"):
            make_policy("fastest")  # type: ignore[arg-type]
