"""What a run says: the notes on what limited it, the printed report, the results file and the
plot of TTFT p99 by load."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench._common import (
    fmt,
    format_table,
    machine_info,
    machine_line,
    notes_section,
    results_header,
    rounded,
    verdict,
)
from bench.lb._options import OUTPUT_TOKENS, PROMPT_TOKENS, SATURATED_SHARE
from bench.lb._run import Run, one_router_label, replica_label
from bench.lb._targets import targets, ttft_p99
from bench.lb._workload import load_label


def notes(run: Run) -> list[str]:
    out: list[str] = []
    cpus = machine_info()["usable_cpus"] or 1
    for key, by_policy in run.results.items():
        for policy, result in by_policy.items():
            total = sum(v or 0 for v in result.cpu_percent.values())
            if total >= SATURATED_SHARE * 100 * cpus:
                out.append(
                    f"{key} {policy}: the processes used {total:.0f}% of a core on {cpus} CPUs; "
                    "the machine was saturated and host delays are part of these figures"
                )
            if result.max_send_lag_s > 0.05:
                out.append(
                    f"{key} {policy}: the load generator sent up to "
                    f"{result.max_send_lag_s * 1000:.0f} ms late (latency is still measured "
                    "from the scheduled arrival)"
                )
            if result.errors:
                out.append(
                    f"{key} {policy}: {result.error_count} of {result.requests} requests failed "
                    f"({result.first_error}); percentiles are over completed requests"
                )
    return out


def report(run: Run) -> str:
    o, m = run.options, run.model
    speeds = ", ".join(f"{s:g}" for s in o.speeds)
    lines = [
        f"llm-mesh load-balancing benchmark: {len(o.speeds)} sim workers (speeds {speeds}, "
        f"x{o.time_scale:g} time scale), capacity {o.capacity} + {o.max_queued} queued each",
        f"fleet capacity (sim timing model): {m.fleet_rps:.1f} requests/s; prompts mean "
        f"{m.mean_prompt_tokens:.0f} tokens, outputs mean {m.mean_output_tokens:.0f} tokens "
        "(lognormal, clipped); open-loop Poisson arrivals, seed "
        f"{o.seed}",
        machine_line(),
        "",
    ]
    headers = [
        "load",
        "policy",
        "requests",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "E2E p50 ms",
        "E2E p99 ms",
        "offered rps",
        "done rps",
        "errors",
    ]
    rows = []
    rounds = sum(1 for k in run.rounds if k.startswith(replica_label(run.options)))
    names = {
        (key, policy): policy + (f" x{result.routers} routers" if result.routers > 1 else "")
        for key, by_policy in run.results.items()
        for policy, result in by_policy.items()
    }
    for key in (one_router_label(run.options), replica_label(run.options)):
        for policy in run.results.get(key, {}):
            one = key == one_router_label(run.options)
            names[key, policy] = (
                f"{policy} x{1 if one else run.options.replicas} "
                f"router{'' if one else 's'}, {rounds} round{'s' if rounds != 1 else ''}"
            )
    width = max((len(n) for n in names.values()), default=0)
    for key, by_policy in run.results.items():
        for policy, result in by_policy.items():
            f = result.figures()
            rows.append(
                [
                    key.split("-")[0],
                    names[key, policy].ljust(width),
                    str(result.requests),
                    fmt(f["ttft_p50_ms"]),
                    fmt(f["ttft_p99_ms"]),
                    fmt(f["e2e_p50_ms"]),
                    fmt(f["e2e_p99_ms"]),
                    fmt(result.offered_rps, 2),
                    fmt(f["throughput_rps"], 2),
                    str(f["errors"]),
                ]
            )
    lines.append(format_table(headers, rows))
    t = targets(run)
    lines += ["", f"Targets at {t['load']} (TTFT p99):"]

    a = t["least_loaded_within_15pct_of_oracle"]
    b = t["least_loaded_3x_better_than_round_robin"]
    c = t["three_routers_within_20pct_of_one"]
    lines += [
        f"- least-loaded within 15% of the oracle: {fmt(a['least_loaded'])} vs "
        f"{fmt(a['oracle'])} ms, ratio {fmt(a['ratio'], 2)} (<= {a['limit']}): "
        f"{verdict(a['pass'])}",
        f"- least-loaded >= 3x better than round-robin: {fmt(b['least_loaded'])} vs "
        f"{fmt(b['round_robin'])} ms, factor {fmt(b['factor'], 2)} (>= {b['required']}): "
        f"{verdict(b['pass'])}",
        f"- {c['routers']} routers within 20% of one: {fmt(c['replicas'])} vs "
        f"{fmt(c['one_router'])} ms, ratio {fmt(c['ratio'], 2)} (<= {c['limit']}): "
        f"{verdict(c['pass'])}",
    ]
    lines += notes_section(notes(run))
    return "\n".join(lines)


def results(run: Run, argv: Sequence[str]) -> dict[str, Any]:
    o, m = run.options, run.model
    return {
        **results_header("lb", argv),
        "settings": {
            "policies": list(o.policies),
            "loads": [load_label(ld) for ld in o.loads],
            "worker_speeds": list(o.speeds),
            "time_scale": o.time_scale,
            "sim_speed_factors": list(o.speed_factors),
            "capacity_per_worker": o.capacity,
            "max_queued_per_worker": o.max_queued,
            "duration_s": o.duration_s if o.requests is None else None,
            "requests_per_run": dict(run.trace_sizes),
            "deadline_s": o.deadline_s,
            "replicas": o.replicas,
            "replica_load": load_label(o.replica_load),
            "replica_rounds": o.replica_rounds,
            "seed": o.seed,
            "workload": {
                "arrivals": "open-loop Poisson",
                "prompt_tokens": dict(
                    zip(("median", "sigma", "min", "max"), PROMPT_TOKENS, strict=True),
                    distribution="lognormal, clipped",
                ),
                "output_tokens": dict(
                    zip(("median", "sigma", "min", "max"), OUTPUT_TOKENS, strict=True),
                    distribution="lognormal, clipped",
                ),
                "sampling": "temperature 0.7, no seed, CACHE_POLICY_BYPASS, unique prompts",
            },
            "capacity_model": {
                "method": "sim timing model at full batch: per request k*d/C + n*prefill; "
                "worker rps = speed factor / that; fleet = sum",
                "mean_prompt_tokens": rounded(m.mean_prompt_tokens, 1),
                "mean_output_tokens": rounded(m.mean_output_tokens, 1),
                "request_s_at_speed_1": rounded(m.request_s_at_speed_1, 5),
                "worker_rps": [rounded(r, 2) for r in m.worker_rps],
                "fleet_rps": rounded(m.fleet_rps, 2),
            },
            "oracle": "join-shortest-queue in the load generator: fewest outstanding requests "
            "(true counts, this process is the only client), ties at random, no router hop; "
            "while every worker's batch is full, requests wait in a central FIFO queue",
        },
        "results": {
            key: {policy: r.result() for policy, r in by_policy.items()}
            for key, by_policy in run.results.items()
        },
        "replica_rounds": {key: r.result() for key, r in run.rounds.items()},
        "targets": targets(run),
        "notes": notes(run),
    }


def plot(run: Run, path: Path) -> str:
    """Draw TTFT p99 by load level per policy at ``path``; what was done, in a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    o = run.options
    fig, ax = plt.subplots(figsize=(7, 4.5))
    loads = [ld for ld in o.loads if load_label(ld) in run.results]
    for policy in o.policies:
        xs, ys = [], []
        for ld in loads:
            value = ttft_p99(run, load_label(ld), policy)
            if value is not None:
                xs.append(ld * 100)
                ys.append(value)
        if xs:
            ax.plot(xs, ys, marker="o", label=policy)
    replicas = ttft_p99(run, replica_label(o), "least-loaded")
    if replicas is not None:
        ax.plot(
            [o.replica_load * 100],
            [replicas],
            marker="*",
            markersize=14,
            linestyle="none",
            label=f"least-loaded, {o.replicas} routers",
        )
    ax.set_yscale("log")
    ax.set_xlabel("offered load (% of fleet capacity)")
    ax.set_ylabel("time to first token, p99 (ms)")
    speeds = ", ".join(f"{s:g}" for s in o.speeds)
    ax.set_title(f"llm-mesh load balancing: sim workers at speeds {speeds}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"
