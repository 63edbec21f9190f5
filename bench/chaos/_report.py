"""The printed table and the results file."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from bench._common import fmt, format_table, machine_line, notes_section, results_header, verdict
from bench.chaos._measure import summarize
from bench.chaos._options import FAULTS, NOT_BUILT, ROUTERS, WORKERS
from bench.chaos._run import Run
from bench.chaos._targets import overall, targets

HEADERS = (
    "fault",
    "requests",
    "failed<1st",
    "failed>1st",
    "router in-flight",
    "p99 TTFT base ms",
    "p99 TTFT fault ms",
    "out of rotation s",
    "whole again s",
    "targets",
)


def judged(run: Run) -> dict[str, dict[str, Any]]:
    """Each fault run's figures and targets, by fault."""
    out: dict[str, dict[str, Any]] = {}
    for fault in run.faults:
        figures = summarize(fault)
        out[fault.name] = {"figures": figures, "targets": targets(fault.name, figures)}
    return out


def targets_cell(by_target: dict[str, Any]) -> str:
    failed = [name for name, t in by_target.items() if t["pass"] is False]
    unmeasured = [name for name, t in by_target.items() if t["pass"] is None]
    if failed:
        return "FAIL: " + ", ".join(failed)
    return "PASS" if not unmeasured else "not measured: " + ", ".join(unmeasured)


def table(by_fault: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, result in by_fault.items():
        f = result["figures"]
        whole = f["whole_again_s"]
        rows.append(
            [
                name,
                str(f["requests"]),
                str(f["failed_before_first_token"]),
                str(f["failed_after_first_token"]),
                str(f["failed_in_flight_on_killed_router"]) if name == "router-sigkill" else "-",
                fmt(f["p99_ttft_baseline_ms"]),
                fmt(f["p99_ttft_during_ms"]),
                fmt(f["out_of_rotation_s"], 2),
                "never" if whole is None else fmt(whole, 2),
                targets_cell(result["targets"]),
            ]
        )
    return format_table(HEADERS, rows)


def not_run(run: Run) -> dict[str, str]:
    """Every fault of issue 12 this run did not measure, and why."""
    out = {name: f"not yet built: {what}" for name, what in NOT_BUILT.items()}
    out |= {name: f"not chosen (--faults): {FAULTS[name]}" for name in FAULTS}
    for name in run.options.faults:
        out.pop(name, None)
    return out | run.skipped


def notes(run: Run, by_fault: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for name, result in by_fault.items():
        f = result["figures"]
        if f["error"]:
            out.append(f"{name}: the fault did not complete: {f['error']}")
        if f["failure_examples"]:
            out.append(f"{name}: failures like {'; '.join(f['failure_examples'][:2])}")
        if f["failed_streams_after_first_token"]:
            out.append(
                f"{name}: {f['failed_streams_after_first_token']} streams failed after their "
                "first token (mid-stream failover is not built yet)"
            )
    return out


def report(run: Run) -> str:
    by_fault = judged(run)
    lines = [
        f"chaos: {ROUTERS} routers, {WORKERS} sim workers, cache service on redis-server, "
        f"Consul (agent double); {run.options.rate:g} req/s open loop, "
        f"{run.options.baseline_s:g} s baseline per fault",
        machine_line(),
        "",
        table(by_fault),
        "",
        f"targets: {verdict(overall({n: r['targets'] for n, r in by_fault.items()}))}",
        "",
        "not run:",
        *(f"- {name}: {why}" for name, why in not_run(run).items()),
    ]
    return "\n".join(lines + notes_section(notes(run, by_fault)))


def results(run: Run, argv: Sequence[str]) -> dict[str, Any]:
    by_fault = judged(run)
    options = {k: v for k, v in asdict(run.options).items() if k != "out"}
    return {
        **results_header("chaos", argv),
        "options": {**options, "faults": list(run.options.faults)},
        "mesh": {"routers": ROUTERS, "workers": WORKERS, "startup_s": round(run.startup_s, 2)},
        "faults": by_fault,
        "not_run": not_run(run),
        "targets_pass": overall({n: r["targets"] for n, r in by_fault.items()}),
        "notes": notes(run, by_fault),
    }
