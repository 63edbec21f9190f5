"""A circuit breaker: stop calling a dependency that keeps failing, and find out when it is back.

::

             N failures in a row                     cool-down over: next call is the trial
    CLOSED ─────────────────────────▶ OPEN ────────────────────────────────────▶ HALF_OPEN
      ▲                                 ▲                                            │
      │                                 └──── trial failed: cool-down grows ─────────┤
      └────────────────────────────────────── trial succeeded ───────────────────────┘

- **Closed**: calls go through. ``failure_threshold`` failures *in a row* open the circuit; any
  success resets the count.
- **Open**: :meth:`CircuitBreaker.acquire` raises :class:`CircuitOpen` at once, without touching
  the dependency, for a cool-down.
- **Half-open**: after the cool-down exactly one call at a time is let through as a trial; the
  others are refused as while open. A successful trial closes the circuit; a failed one opens it
  again with the cool-down doubled (up to ``cooldown_max``). Every cool-down is shortened at
  random by up to a quarter, so that the replicas of a caller do not probe in step.

Why consecutive failures rather than a failure ratio over a window: the dependencies this guards
(Redis behind the cache service, the cache service behind the router) fail all at once, not a
fraction at a time: they are down, restarting or hung, and then every call fails. A count in a
row trips on the N-th call of an outage whatever the traffic (a ratio needs a minimum number of
calls per window, which a quiet router never reaches, and trips later on a busy one), needs no
clock in the closed state, and is simple to reason about. A dependency failing a fraction of calls
is not cut off; each of its calls is bounded by the caller's short timeout anyway.

An outcome counts only for the state its call was admitted in: calls still in flight when the
circuit opens cannot reopen, close or re-count it later, and while half-open only the trial's
outcome decides. A call that ends with neither verdict (cancelled by its own caller, or a failure
that says nothing about the dependency) is :meth:`CircuitBreaker.abandoned`, which frees the trial
slot.

The open and close of the circuit are one outage: each is logged once (warning, then info) with
the dependency's name (and ``log_fields``, e.g. its address) and the cause; the caller names those
two events so that its operators see its own words ("cache store unavailable"). The steps in
between (half-open, a failed trial) are logged at debug. :class:`BreakerMetrics` holds the
Prometheus metrics, created once per service with that service's prefix, labelled by dependency.
The breaker is synchronous and meant for one asyncio event loop.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import NoReturn

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from llmmesh.errors import Unavailable

log = structlog.get_logger(__name__)

#: Each cool-down is shortened at random by up to this fraction.
COOLDOWN_JITTER = 0.25


class CircuitState(enum.IntEnum):
    """The state of a circuit, as the ``..._circuit_state`` gauge shows it."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, kw_only=True)
class BreakerSettings:
    """When a circuit opens and how long it stays open."""

    #: Failures in a row that open the circuit.
    failure_threshold: int = 5
    #: The first cool-down after the circuit opens.
    cooldown: timedelta = timedelta(seconds=1)
    #: The longest cool-down, however many trials failed in a row.
    cooldown_max: timedelta = timedelta(seconds=10)

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError(f"failure_threshold: must be >= 1 (got {self.failure_threshold})")
        if self.cooldown <= timedelta(0):
            raise ValueError("cooldown: must be > 0")
        if self.cooldown_max < self.cooldown:
            raise ValueError("cooldown_max: must be >= cooldown")


@dataclass(frozen=True)
class BreakerMetrics:
    """The Prometheus metrics of every breaker of one service, labelled by ``dependency``."""

    state: Gauge
    short_circuited: Counter
    opened: Counter

    @classmethod
    def create(cls, service: str, registry: CollectorRegistry = REGISTRY) -> BreakerMetrics:
        """Register ``llmmesh_<service>_circuit_*`` (once per service and registry)."""
        prefix = f"llmmesh_{service}_circuit"
        return cls(
            state=Gauge(
                f"{prefix}_state",
                "Circuit breaker state of each dependency: 0 closed, 1 open, 2 half-open.",
                ["dependency"],
                registry=registry,
            ),
            short_circuited=Counter(
                f"{prefix}_short_circuited_total",
                "Calls refused at once, without trying, because the dependency's circuit was open"
                " (or half-open with its one trial call in flight).",
                ["dependency"],
                registry=registry,
            ),
            opened=Counter(
                f"{prefix}_opened_total",
                "Times the dependency's circuit opened from closed (one per outage; failed trials"
                " that reopen it are not counted).",
                ["dependency"],
                registry=registry,
            ),
        )


class CircuitOpen(Unavailable):
    """A call refused without trying, because the circuit is open or its trial is in flight."""

    def __init__(self, dependency: str, detail: str, retry_in_s: float) -> None:
        super().__init__(f"{dependency} unavailable ({detail})")
        self.dependency = dependency
        #: Why, e.g. "circuit open for 0.80 s after 5 failures in a row; last: <the cause>".
        self.detail = detail
        #: Seconds until the next trial may be let through (0 while a trial is in flight).
        self.retry_in_s = retry_in_s


@dataclass(frozen=True)
class Ticket:
    """Permission for one call, returned by :meth:`CircuitBreaker.acquire`; hand it back with
    exactly one of ``succeeded``, ``failed`` or ``abandoned``."""

    epoch: int
    trial: bool = field(default=False)


class CircuitBreaker:
    """The circuit of one dependency (see the module docstring)."""

    def __init__(
        self,
        dependency: str,
        *,
        settings: BreakerSettings | None = None,
        metrics: BreakerMetrics | None = None,
        opened_event: str = "circuit opened",
        closed_event: str = "circuit closed",
        log_fields: Mapping[str, object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.dependency = dependency
        self.settings = settings or BreakerSettings()
        self._metrics = metrics
        self._opened_event = opened_event
        self._closed_event = closed_event
        #: On every log line. (Not a bound logger: this may run before logging is configured.)
        self._log_fields = {"dependency": dependency, **(log_fields or {})}
        self._clock = clock
        self._rng = rng or random.Random()
        self._state = CircuitState.CLOSED
        #: Bumped on every change of state; a ticket of an older epoch no longer counts.
        self._epoch = 0
        self._failures = 0
        self._last_cause = ""
        #: How the circuit came to open ("5 failures in a row"; "" when tripped).
        self._open_reason = ""
        self._opened_at = 0.0
        self._open_until = 0.0
        #: Trials failed since the circuit opened (the cool-down doubles with each).
        self._reopens = 0
        self._trial_in_flight = False
        if metrics is not None:
            metrics.state.labels(dependency).set(CircuitState.CLOSED)
            metrics.short_circuited.labels(dependency)
            metrics.opened.labels(dependency)

    @property
    def state(self) -> CircuitState:
        """The state now. An open circuit whose cool-down is over turns half-open only when the
        next call asks (:meth:`acquire`), so until then it still reads OPEN."""
        return self._state

    @property
    def last_cause(self) -> str:
        """The last failure's cause ("" when none was recorded yet)."""
        return self._last_cause

    def retry_in(self) -> float:
        """Seconds until an open circuit lets a trial through (0 when it would now)."""
        if self._state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def acquire(self, *, may_trial: bool = True) -> Ticket:
        """Permission for one call, or :class:`CircuitOpen` at once.

        A call that may take long for reasons of its own (waiting for something) should pass
        ``may_trial=False``: it is then refused while the circuit is half-open rather than hold
        the one trial slot, and recovery is left to a short call.
        """
        if self._state is CircuitState.OPEN:
            remaining = self._open_until - self._clock()
            if remaining > 0:
                self._refuse(
                    f"circuit open for {remaining:.2f} s after {self._why_open()}", remaining
                )
            self._transition(CircuitState.HALF_OPEN)
            log.debug("circuit half-open", **self._log_fields)
        if self._state is CircuitState.HALF_OPEN:
            if not may_trial:
                self._refuse(
                    f"circuit half-open, waiting for a trial, after {self._why_open()}", 0.0
                )
            if self._trial_in_flight:
                self._refuse(
                    f"circuit half-open, its one trial call in flight, after {self._why_open()}",
                    0.0,
                )
            self._trial_in_flight = True
            return Ticket(self._epoch, trial=True)
        return Ticket(self._epoch)

    def succeeded(self, ticket: Ticket) -> None:
        """The call answered: the dependency works."""
        if ticket.epoch != self._epoch:
            return
        if self._state is CircuitState.CLOSED:
            self._failures = 0
        elif ticket.trial:
            down_for = self._clock() - self._opened_at
            self._trial_in_flight = False
            self._failures = 0
            self._reopens = 0
            self._transition(CircuitState.CLOSED)
            log.info(
                self._closed_event,
                **self._log_fields,
                circuit="closed",
                down_for_s=round(down_for, 3),
            )

    def failed(self, ticket: Ticket, cause: str) -> None:
        """The call failed in a way that says the dependency is unwell (unreachable, timed out)."""
        if ticket.epoch != self._epoch:
            return
        self._last_cause = cause
        if self._state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures >= self.settings.failure_threshold:
                plural = "s" if self._failures > 1 else ""
                self._open(cause, f"{self._failures} failure{plural} in a row")
        elif ticket.trial:
            self._trial_in_flight = False
            self._reopens += 1
            cooldown = self._start_cooldown()
            self._transition(CircuitState.OPEN)
            log.debug(
                "circuit reopened",
                **self._log_fields,
                cause=cause,
                cooldown_s=round(cooldown, 3),
            )

    def abandoned(self, ticket: Ticket) -> None:
        """The call ended with no verdict on the dependency (e.g. its own caller cancelled it)."""
        if ticket.trial and ticket.epoch == self._epoch:
            self._trial_in_flight = False
            self._epoch += 1

    def trip(self, cause: str, **context: object) -> None:
        """Open the circuit now, without waiting for N failures (e.g. the dependency did not
        answer at start). ``context`` goes on the log line. No-op while already open."""
        self._last_cause = cause
        if self._state is CircuitState.CLOSED:
            self._open(cause, "", **context)

    def _open(self, cause: str, reason: str, **context: object) -> None:
        self._open_reason = reason
        self._failures = 0
        self._reopens = 0
        self._opened_at = self._clock()
        cooldown = self._start_cooldown()
        self._transition(CircuitState.OPEN)
        if self._metrics is not None:
            self._metrics.opened.labels(self.dependency).inc()
        log.warning(
            self._opened_event,
            **self._log_fields,
            circuit="open",
            cause=cause,
            after=reason or "tripped",
            cooldown_s=round(cooldown, 3),
            **context,
        )

    def _start_cooldown(self) -> float:
        settings = self.settings
        ceiling = min(
            settings.cooldown_max.total_seconds(),
            settings.cooldown.total_seconds() * 2.0**self._reopens,
        )
        cooldown = ceiling * self._rng.uniform(1.0 - COOLDOWN_JITTER, 1.0)
        self._open_until = self._clock() + cooldown
        return cooldown

    def _transition(self, state: CircuitState) -> None:
        self._state = state
        self._epoch += 1
        if self._metrics is not None:
            self._metrics.state.labels(self.dependency).set(state)

    def _why_open(self) -> str:
        # A tripped circuit has no count of failures in a row, only its failed trials.
        parts = [self._open_reason] if self._open_reason else []
        if self._reopens:
            parts.append(f"{self._reopens} failed trial{'s' if self._reopens > 1 else ''}")
        why = " and ".join(parts)
        return f"{why}; last: {self._last_cause}" if why else self._last_cause

    def _refuse(self, detail: str, retry_in_s: float) -> NoReturn:
        if self._metrics is not None:
            self._metrics.short_circuited.labels(self.dependency).inc()
        raise CircuitOpen(self.dependency, detail, retry_in_s)
