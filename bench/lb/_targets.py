"""Issue 5's targets at 80% load, judged on the TTFT p99 of a run's results."""

from __future__ import annotations

from typing import Any

from bench._common import ratio, rounded
from bench.lb._options import (
    LL,
    ORACLE,
    TARGET_LOAD,
    TARGET_ORACLE_RATIO,
    TARGET_REPLICA_RATIO,
    TARGET_ROUND_ROBIN_FACTOR,
)
from bench.lb._run import Run, one_router_label, replica_label
from bench.lb._workload import load_label


def ttft_p99(run: Run, key: str, policy: str) -> float | None:
    result = run.results.get(key, {}).get(policy)
    if result is None:
        return None
    value = result.figures()["ttft_p99_ms"]
    return float(value) if value is not None else None


def targets(run: Run) -> dict[str, Any]:
    """Issue 5's targets at 80% load, each with pass (True/False) or None when not measured."""
    key = load_label(TARGET_LOAD)
    ll = ttft_p99(run, key, "least-loaded")
    oracle = ttft_p99(run, key, ORACLE)
    rr = ttft_p99(run, key, "round-robin")
    replicas = (
        ttft_p99(run, replica_label(run.options), LL)
        if run.options.replica_load == TARGET_LOAD
        else None
    )
    one = ttft_p99(run, one_router_label(run.options), LL) if replicas is not None else None
    if one is None:
        one = ll

    vs_oracle = ratio(ll, oracle)
    vs_rr = ratio(rr, ll)
    vs_one = ratio(replicas, one)
    return {
        "load": key,
        "metric": "ttft_p99_ms",
        "least_loaded_within_15pct_of_oracle": {
            "least_loaded": ll,
            "oracle": oracle,
            "ratio": rounded(vs_oracle),
            "limit": TARGET_ORACLE_RATIO,
            "pass": None if vs_oracle is None else vs_oracle <= TARGET_ORACLE_RATIO,
        },
        "least_loaded_3x_better_than_round_robin": {
            "least_loaded": ll,
            "round_robin": rr,
            "factor": rounded(vs_rr),
            "required": TARGET_ROUND_ROBIN_FACTOR,
            "pass": None if vs_rr is None else vs_rr >= TARGET_ROUND_ROBIN_FACTOR,
        },
        "three_routers_within_20pct_of_one": {
            "one_router": one,
            "routers": run.options.replicas,
            "rounds": sum(1 for k in run.rounds if k.startswith(replica_label(run.options))),
            "replicas": replicas,
            "ratio": rounded(vs_one),
            "limit": TARGET_REPLICA_RATIO,
            "pass": None if vs_one is None else vs_one <= TARGET_REPLICA_RATIO,
        },
    }
