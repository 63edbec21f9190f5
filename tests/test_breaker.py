"""The circuit breaker's logic, on a fake clock, without a network (llmmesh/breaker.py).

The services' use of it against real processes is in tests/test_cache_faults.py.
"""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
import structlog
from prometheus_client import CollectorRegistry

from llmmesh.breaker import (
    COOLDOWN_JITTER,
    BreakerMetrics,
    BreakerSettings,
    CircuitBreaker,
    CircuitOpen,
    CircuitState,
)
from llmmesh.errors import Unavailable

CAUSE = "redis at redis://127.0.0.1:1/0: ConnectionError: refused"


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class NoJitter(random.Random):
    """Draws every cool-down at its full length."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Harness:
    """A breaker on a fake clock with its own metrics registry."""

    def __init__(
        self,
        *,
        failures: int = 3,
        cooldown: float = 1.0,
        cooldown_max: float = 8.0,
        rng: random.Random | None = None,
    ) -> None:
        self.clock = FakeClock()
        self.registry = CollectorRegistry()
        self.breaker = CircuitBreaker(
            "redis",
            settings=BreakerSettings(
                failure_threshold=failures,
                cooldown=timedelta(seconds=cooldown),
                cooldown_max=timedelta(seconds=cooldown_max),
            ),
            metrics=BreakerMetrics.create("test", self.registry),
            opened_event="store unavailable",
            closed_event="store recovered",
            clock=self.clock,
            rng=rng or random.Random(7),
        )

    def state(self) -> CircuitState:
        return self.breaker.state

    def metric(self, name: str) -> float:
        value = self.registry.get_sample_value(name, {"dependency": "redis"})
        assert value is not None, name
        return value

    def fail(self, times: int = 1, cause: str = CAUSE) -> None:
        for _ in range(times):
            self.breaker.failed(self.breaker.acquire(), cause)

    def open(self) -> None:
        self.fail(self.breaker.settings.failure_threshold)
        assert self.breaker.state is CircuitState.OPEN

    def wait_out_cooldown(self) -> None:
        self.clock.advance(self.breaker.retry_in() + 0.001)

    def refused(self) -> CircuitOpen:
        with pytest.raises(CircuitOpen) as info:
            self.breaker.acquire()
        return info.value


class TestClosed:
    """Closed: calls pass; N failures in a row open the circuit, a success resets the count."""

    def test_opens_after_threshold_failures_in_a_row(self) -> None:
        h = Harness(failures=3)
        h.fail(2)
        assert h.state() is CircuitState.CLOSED
        assert h.metric("llmmesh_test_circuit_state") == CircuitState.CLOSED
        h.fail()
        assert h.state() is CircuitState.OPEN
        assert h.metric("llmmesh_test_circuit_state") == CircuitState.OPEN
        assert h.metric("llmmesh_test_circuit_opened_total") == 1

    def test_a_success_resets_the_count(self) -> None:
        h = Harness(failures=3)
        for _ in range(5):
            h.fail(2)
            h.breaker.succeeded(h.breaker.acquire())
        assert h.state() is CircuitState.CLOSED
        assert h.metric("llmmesh_test_circuit_opened_total") == 0

    def test_abandoned_calls_do_not_count(self) -> None:
        h = Harness(failures=2)
        h.fail()
        for _ in range(5):
            h.breaker.abandoned(h.breaker.acquire())
        assert h.state() is CircuitState.CLOSED
        h.fail()
        assert h.state() is CircuitState.OPEN

    def test_calls_in_flight_when_it_opens_do_not_count_later(self) -> None:
        """16 calls admitted together all fail: the circuit opens once; the late failures do not
        restart its cool-down and a late success does not close it."""
        h = Harness(failures=3)
        tickets = [h.breaker.acquire() for _ in range(16)]
        for ticket in tickets[:3]:
            h.breaker.failed(ticket, CAUSE)
        retry_in = h.breaker.retry_in()
        h.clock.advance(0.1)
        for ticket in tickets[3:15]:
            h.breaker.failed(ticket, CAUSE)
        h.breaker.succeeded(tickets[15])
        assert h.state() is CircuitState.OPEN
        assert h.breaker.retry_in() == pytest.approx(retry_in - 0.1)
        assert h.metric("llmmesh_test_circuit_opened_total") == 1


class TestOpen:
    """Open: every call is refused at once, with a message that says why, and counted."""

    def test_refuses_during_the_cooldown(self) -> None:
        h = Harness(failures=2, cooldown=1.0)
        h.open()
        for _ in range(4):
            error = h.refused()
            h.clock.advance(0.1)
        assert isinstance(error, Unavailable)
        assert error.dependency == "redis"
        assert error.message.startswith("redis unavailable (circuit open for ")
        assert f"after 2 failures in a row; last: {CAUSE})" in error.message
        assert 0 < error.retry_in_s <= 1.0
        assert h.metric("llmmesh_test_circuit_short_circuited_total") == 4
        assert h.state() is CircuitState.OPEN

    def test_the_cooldown_is_jittered_below_the_configured_one(self) -> None:
        cooldowns = set()
        for seed in range(20):
            h = Harness(failures=1, cooldown=2.0, rng=random.Random(seed))
            h.open()
            cooldowns.add(round(h.breaker.retry_in(), 6))
        assert all(2.0 * (1 - COOLDOWN_JITTER) <= c <= 2.0 for c in cooldowns)
        assert len(cooldowns) == 20

    def test_trip_opens_at_once_and_is_a_no_op_when_open(self) -> None:
        h = Harness(failures=5)
        with structlog.testing.capture_logs() as logs:
            h.breaker.trip(CAUSE, at_start=True)
            h.breaker.trip("again")
        assert h.state() is CircuitState.OPEN
        [opened] = [line for line in logs if line["event"] == "store unavailable"]
        assert (opened["at_start"], opened["cause"], opened["after"]) == (True, CAUSE, "tripped")
        assert h.refused().detail.endswith("after again")
        assert h.metric("llmmesh_test_circuit_opened_total") == 1


class TestHalfOpen:
    """After the cool-down exactly one trial call goes through; its outcome decides."""

    def test_one_trial_at_a_time(self) -> None:
        h = Harness(failures=1)
        h.open()
        h.wait_out_cooldown()
        trial = h.breaker.acquire()
        assert trial.trial
        assert h.state() is CircuitState.HALF_OPEN
        assert h.metric("llmmesh_test_circuit_state") == CircuitState.HALF_OPEN
        error = h.refused()
        assert "trial call in flight" in error.message
        assert error.retry_in_s == 0
        h.breaker.succeeded(trial)
        assert h.state() is CircuitState.CLOSED
        assert h.metric("llmmesh_test_circuit_state") == CircuitState.CLOSED
        assert not h.breaker.acquire().trial

    def test_a_call_that_may_not_be_the_trial_is_refused_while_half_open(self) -> None:
        h = Harness(failures=1)
        h.open()
        h.wait_out_cooldown()
        with pytest.raises(CircuitOpen, match="waiting for a trial"):
            h.breaker.acquire(may_trial=False)
        trial = h.breaker.acquire()
        assert trial.trial
        h.breaker.succeeded(trial)
        assert not h.breaker.acquire(may_trial=False).trial

    def test_an_abandoned_trial_frees_the_slot(self) -> None:
        h = Harness(failures=1)
        h.open()
        h.wait_out_cooldown()
        first = h.breaker.acquire()
        h.breaker.abandoned(first)
        second = h.breaker.acquire()
        assert second.trial
        h.breaker.succeeded(first)
        assert h.state() is CircuitState.HALF_OPEN
        h.breaker.succeeded(second)
        assert h.state() is CircuitState.CLOSED

    def test_a_failed_trial_reopens_with_a_doubled_cooldown_up_to_the_max(self) -> None:
        h = Harness(failures=1, cooldown=1.0, cooldown_max=5.0, rng=NoJitter())
        h.open()
        cooldowns = [h.breaker.retry_in()]
        for _ in range(4):
            h.wait_out_cooldown()
            h.breaker.failed(h.breaker.acquire(), "still down")
            assert h.state() is CircuitState.OPEN
            cooldowns.append(h.breaker.retry_in())
        assert cooldowns == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])
        assert "after 1 failure in a row and 4 failed trials; last: still down" in (
            h.refused().message
        )
        assert h.metric("llmmesh_test_circuit_opened_total") == 1

    def test_a_tripped_circuit_with_failed_trials_says_so_in_words(self) -> None:
        h = Harness(failures=5, rng=NoJitter())
        h.breaker.trip(CAUSE)
        for _ in range(2):
            h.wait_out_cooldown()
            h.breaker.failed(h.breaker.acquire(), "still down")
        detail = h.refused().detail
        assert detail.startswith("circuit open for "), detail
        assert detail.endswith(" s after 2 failed trials; last: still down"), detail
        assert "  " not in detail

    def test_closing_resets_the_cooldown_growth(self) -> None:
        h = Harness(failures=1, cooldown=1.0, cooldown_max=8.0)
        h.open()
        for _ in range(3):
            h.wait_out_cooldown()
            h.breaker.failed(h.breaker.acquire(), CAUSE)
        h.wait_out_cooldown()
        h.breaker.succeeded(h.breaker.acquire())
        h.open()
        assert h.breaker.retry_in() <= 1.0
        assert h.metric("llmmesh_test_circuit_opened_total") == 2

    def test_only_the_trials_outcome_counts(self) -> None:
        """A call admitted while closed that ends during the trial decides nothing."""
        h = Harness(failures=2)
        old = h.breaker.acquire()
        h.open()
        h.wait_out_cooldown()
        trial = h.breaker.acquire()
        h.breaker.failed(old, "old failure")
        assert h.state() is CircuitState.HALF_OPEN
        h.breaker.succeeded(old)
        assert h.state() is CircuitState.HALF_OPEN
        h.breaker.succeeded(trial)
        assert h.state() is CircuitState.CLOSED


class TestLogging:
    """One outage is one warning (with the cause) and one info line; the steps between are debug."""

    def test_an_outage_logs_once_when_it_starts_and_once_when_it_ends(self) -> None:
        h = Harness(failures=2, cooldown=1.0)
        with structlog.testing.capture_logs() as logs:
            h.fail(2)
            h.refused()
            for _ in range(3):
                h.wait_out_cooldown()
                h.breaker.failed(h.breaker.acquire(), "still down")
                h.refused()
            h.wait_out_cooldown()
            h.breaker.succeeded(h.breaker.acquire())
            h.breaker.succeeded(h.breaker.acquire())
        loud = [line for line in logs if line["log_level"] != "debug"]
        assert [(line["event"], line["log_level"]) for line in loud] == [
            ("store unavailable", "warning"),
            ("store recovered", "info"),
        ]
        opened, closed = loud
        assert opened["dependency"] == "redis"
        assert opened["cause"] == CAUSE
        assert opened["after"] == "2 failures in a row"
        assert 0.75 <= opened["cooldown_s"] <= 1.0
        assert closed["down_for_s"] > 7
        debug = [line["event"] for line in logs if line["log_level"] == "debug"]
        assert debug.count("circuit reopened") == 3
        assert debug.count("circuit half-open") == 4


class TestSettings:
    """Settings are checked when made."""

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"failure_threshold": 0}, "failure_threshold"),
            ({"cooldown": timedelta(0)}, "cooldown: must be > 0"),
            ({"cooldown": timedelta(seconds=20)}, "cooldown_max: must be >= cooldown"),
        ],
    )
    def test_rejects_nonsense(self, kwargs: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            BreakerSettings(**kwargs)  # type: ignore[arg-type]
