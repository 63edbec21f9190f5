"""The whole benchmark: every run planned in order (the main table, then the interleaved replica
rounds), the traces they replay, and the replica rounds pooled per side."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench._common import Progress
from bench.lb._fleet import Fleet
from bench.lb._options import LL, Options
from bench.lb._replay import RunResult, run_one
from bench.lb._workload import CapacityModel, TraceItem, capacity_model, load_label, make_trace


@dataclass
class Run:
    options: Options
    model: CapacityModel
    trace_sizes: dict[str, int] = field(default_factory=dict)
    results: dict[str, dict[str, RunResult]] = field(default_factory=dict)
    #: The replica comparison's runs one by one, before pooling (key ``<side>#<round>``).
    rounds: dict[str, RunResult] = field(default_factory=dict)


def replica_label(options: Options) -> str:
    """Results key of the replicas, pooled over rounds."""
    return f"{load_label(options.replica_load)}-{options.replicas}-routers"


def one_router_label(options: Options) -> str:
    """Results key of the one-router side of the replica comparison, pooled over rounds."""
    return f"{load_label(options.replica_load)}-1-router"


@dataclass(frozen=True)
class Planned:
    """One run: its results key, policy, load, router count and trace seed."""

    key: str
    policy: str
    load: float
    routers: int
    seed: int


def plan(options: Options) -> list[Planned]:
    """Every run, in order: the main table, then the interleaved replica rounds."""
    runs = [
        Planned(load_label(ld), p, ld, 1, options.seed)
        for ld in options.loads
        for p in options.policies
    ]
    if options.replicas > 1 and "least-loaded" in options.policies:
        load = options.replica_load
        for r in range(max(1, options.replica_rounds)):
            seed = options.seed + r
            if r > 0 or load not in options.loads:
                runs.append(Planned(f"{one_router_label(options)}#{r + 1}", LL, load, 1, seed))
            runs.append(
                Planned(f"{replica_label(options)}#{r + 1}", LL, load, options.replicas, seed)
            )
    return runs


def trace_for(
    options: Options, load: float, rps: float, seed: int | None = None
) -> list[TraceItem]:
    seed = options.seed if seed is None else seed
    if options.requests is not None:
        return make_trace(seed, options.requests)
    expected = options.duration_s * load * rps
    full = make_trace(seed, int(expected * 1.5) + 50)
    return [item for item in full if item.unit_at / (load * rps) < options.duration_s]


def pool(parts: Sequence[RunResult]) -> RunResult:
    """One result from several runs of the same policy: their samples and errors together."""
    first = parts[0]
    pooled = RunResult(
        first.policy,
        first.load,
        first.routers,
        sum(p.requests for p in parts),
        statistics.fmean(p.offered_rps for p in parts),
        samples=[s for p in parts for s in p.samples],
        errors={},
        first_error=next((p.first_error for p in parts if p.first_error), ""),
        elapsed_s=sum(p.elapsed_s for p in parts),
        max_send_lag_s=max(p.max_send_lag_s for p in parts),
    )
    for p in parts:
        for code, n in p.errors.items():
            pooled.errors[code] = pooled.errors.get(code, 0) + n
    for name in first.cpu_percent:
        values = [p.cpu_percent.get(name) for p in parts]
        pooled.cpu_percent[name] = (
            None if any(v is None for v in values) else statistics.fmean(v or 0 for v in values)
        )
    return pooled


def pool_rounds(run: Run) -> None:
    """Replace the replica rounds' results by each side pooled (kept apart in ``run.rounds``)."""
    o = run.options
    sides: dict[str, list[RunResult]] = {one_router_label(o): [], replica_label(o): []}
    first_one = run.results.get(load_label(o.replica_load), {}).get(LL)
    if first_one is not None and any(k.startswith(replica_label(o) + "#") for k in run.results):
        sides[one_router_label(o)].append(first_one)
    for key in list(run.results):
        base, sep, _ = key.partition("#")
        if sep and base in sides:
            result = run.results.pop(key)[LL]
            run.rounds[key] = result
            sides[base].append(result)
    for key, parts in sides.items():
        if parts:
            run.results[key] = {LL: pool(parts)}


def estimate_run_s(options: Options, requests: int, rate: float, routers: int) -> float:
    startup = 1.5 * routers
    return startup + requests / rate + 3.0


async def run_all(options: Options) -> Run:
    model = capacity_model(options)
    run = Run(options, model)
    runs = plan(options)
    traces = {r.key: trace_for(options, r.load, model.fleet_rps, r.seed) for r in runs}
    estimates = [
        estimate_run_s(options, len(traces[r.key]), r.load * model.fleet_rps, r.routers)
        for r in runs
    ]
    async with Progress(4 + sum(estimates), enabled=options.progress) as progress:
        progress.phase(f"starting {len(options.speeds)} sim workers", 4)
        fleet = Fleet(options)
        await fleet.start()
        try:
            for r, estimate in zip(runs, estimates, strict=True):
                trace = traces[r.key]
                run.trace_sizes[r.key] = len(trace)
                label = f"{r.key} {r.policy}" + (f" x{r.routers} routers" if r.routers > 1 else "")
                progress.phase(f"{label}: {len(trace)} requests", estimate)
                result = await run_one(
                    options, fleet, trace, r.policy, r.load, r.routers, model.fleet_rps
                )
                run.results.setdefault(r.key, {})[r.policy] = result
        finally:
            await fleet.close()
    pool_rounds(run)
    return run
