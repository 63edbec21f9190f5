"""One fault's figures from what the load saw and when the benchmark did what (pure: no
processes, so the tests check it on made-up outcomes)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench._common import percentile, rounded
from bench.chaos._load import Load, Outcome

#: The shortest "during" window: a fault undone at once (a restart) still counts what follows.
MIN_DURING_S = 2.0


@dataclass
class Marks:
    """When a fault was injected and undone (``time.monotonic()``), when the fleet was whole
    again (None: not within the wait), how long a dead or frozen worker stayed in rotation, and
    when a killed router had exited (the kill itself is ``injected``)."""

    injected: float = 0.0
    undone: float = 0.0
    whole: float | None = None
    out_of_rotation_s: float | None = None
    router_died: float | None = None
    error: str | None = None
    #: Figures of the fault's own (reported as they are).
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FaultRun:
    """One fault: its name, its marks and the load that ran through it."""

    name: str
    marks: Marks
    load: Load


def on_killed_router(outcome: Outcome, marks: Marks) -> bool:
    """Whether ``outcome`` failed while in flight on a router being killed: sent before the
    router had exited, ended after the kill."""
    if marks.router_died is None or outcome.ended is None or outcome.ok:
        return False
    return outcome.started <= marks.router_died and outcome.ended >= marks.injected


def p99_ttft(outcomes: list[Outcome]) -> float | None:
    return rounded(percentile([o.ttft_ms for o in outcomes if o.ttft_ms is not None], 99), 1)


def p99_by_kind(outcomes: list[Outcome]) -> dict[str, float | None]:
    """p99 TTFT of each kind of request: unary or stream, cacheable or not."""
    out: dict[str, float | None] = {}
    for stream in (False, True):
        for cacheable in (True, False):
            kind = f"{'stream' if stream else 'unary'}_{'cacheable' if cacheable else 'uncached'}"
            out[kind] = p99_ttft(
                [o for o in outcomes if o.stream == stream and o.cacheable == cacheable]
            )
    return out


def summarize(run: FaultRun) -> dict[str, Any]:
    """The fault's figures. Failed requests are counted by whether the caller had seen a first
    token; on a router kill, failures of requests sent before the router had exited are counted
    apart (clients retry them: gRPC cannot say which router a request went to, so a request
    that failed on the surviving router in that moment would be counted there too). The
    baseline is the load before the fault; "during" is the requests started from the fault until
    the fleet was whole again (or the load ended), and at least ``MIN_DURING_S``."""
    marks, outcomes = run.marks, run.load.outcomes
    apart = [o for o in outcomes if on_killed_router(o, marks)]
    failed = [o for o in outcomes if not o.ok and not on_killed_router(o, marks)]
    end = marks.whole if marks.whole is not None else run.load.ended
    end = max(end, marks.undone, marks.injected + MIN_DURING_S)
    baseline = [o for o in outcomes if o.started < marks.injected]
    during = [o for o in outcomes if marks.injected <= o.started <= end]
    return {
        "requests": len(outcomes),
        "streams": sum(o.stream for o in outcomes),
        "cacheable": sum(o.cacheable for o in outcomes),
        "failed_before_first_token": sum(o.first_token is None for o in failed),
        "failed_after_first_token": sum(o.first_token is not None for o in failed),
        "failed_streams_after_first_token": sum(
            o.stream and o.first_token is not None for o in failed
        ),
        "failed_in_flight_on_killed_router": len(apart),
        "failure_codes": dict(Counter(o.code for o in failed + apart)),
        "failure_examples": sorted({f"{o.code}: {o.detail}"[:200] for o in failed})[:5],
        "baseline_requests": len(baseline),
        "during_requests": len(during),
        "p99_ttft_baseline_ms": p99_ttft(baseline),
        "p99_ttft_during_ms": p99_ttft(during),
        "p99_ttft_baseline_by_kind_ms": p99_by_kind(baseline),
        "p99_ttft_during_by_kind_ms": p99_by_kind(during),
        "fault_s": rounded(marks.undone - marks.injected, 2),
        "out_of_rotation_s": rounded(marks.out_of_rotation_s, 2),
        "whole_again_s": None if marks.whole is None else rounded(marks.whole - marks.undone, 2),
        "whole_again_after_injection_s": (
            None if marks.whole is None else rounded(marks.whole - marks.injected, 2)
        ),
        "error": marks.error,
        **marks.extra,
    }
