"""``python -m bench lb``'s command line."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

from bench._common import parse_list, run_benchmark
from bench.lb._options import DEFAULT_OUT, ORACLE, POLICIES, Options
from bench.lb._report import plot, report, results
from bench.lb._run import run_all


def positive_floats(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[float, ...]:
    """The comma-separated positive numbers of option ``flag``; a usage error otherwise."""
    values = parse_list(parser, flag, text, float, "numbers")
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        parser.error(f"{flag}: give one or more positive numbers")
    return values


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench lb",
        description="Load balancing on a heterogeneous sim fleet: router policies, an ideal "
        "join-shortest-queue oracle and router replicas under open-loop Poisson load.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="80%% load only, 5 s per run (under a minute)"
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma-separated policies (default: {','.join(POLICIES)}); {ORACLE} is the "
        "benchmark's own join-shortest-queue dispatcher",
    )
    parser.add_argument(
        "--loads",
        default=None,
        help="comma-separated load levels, percent of fleet capacity (default 50,80,95; "
        "--quick 80)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of arrivals per run (default 20; --quick 5)",
    )
    parser.add_argument(
        "--requests", type=int, default=None, help="requests per run (instead of --duration)"
    )
    parser.add_argument(
        "--speeds",
        default="1,1,0.5,0.25",
        help="relative speed of each worker (default 1,1,0.5,0.25)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiplies every worker's sim speed factor (below 1: slower, easier on the host)",
    )
    parser.add_argument("--capacity", type=int, default=4, help="requests per worker at once")
    parser.add_argument(
        "--max-queued",
        type=int,
        default=None,
        help="queued requests per worker (default 4x capacity)",
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=3,
        help="router replicas of the least-loaded replica run at 80%% (0 or 1: no such run)",
    )
    parser.add_argument(
        "--replica-rounds",
        type=int,
        default=None,
        help="interleaved rounds of one router vs the replicas, pooled (default 2; --quick 1)",
    )
    parser.add_argument(
        "--deadline", type=float, default=30.0, help="per-request deadline, seconds (default 30)"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the request trace")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results JSON (default bench/results/lb.json)"
    )
    parser.add_argument("--no-plot", action="store_true", help="write no PNG beside the JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    policies = parse_list(parser, "--policies", args.policies, str.strip)
    if not policies or len(set(policies)) != len(policies):
        parser.error("--policies: give one or more distinct policy names")
    default_loads = "80" if args.quick else "50,80,95"
    loads = tuple(v / 100 for v in positive_floats(parser, "--loads", args.loads or default_loads))
    speeds = positive_floats(parser, "--speeds", args.speeds)
    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        parser.error("--time-scale: must be > 0")
    if args.capacity < 1:
        parser.error("--capacity: must be >= 1")
    max_queued = 4 * args.capacity if args.max_queued is None else args.max_queued
    if max_queued < 0:
        parser.error("--max-queued: must be >= 0")
    duration = args.duration if args.duration is not None else (5.0 if args.quick else 20.0)
    if not duration > 0:
        parser.error("--duration: must be > 0")
    if args.requests is not None and args.requests < 1:
        parser.error("--requests: must be >= 1")
    if args.replicas < 0:
        parser.error("--replicas: must be >= 0")
    rounds = args.replica_rounds if args.replica_rounds is not None else (1 if args.quick else 2)
    if rounds < 1:
        parser.error("--replica-rounds: must be >= 1")
    if not args.deadline > 0:
        parser.error("--deadline: must be > 0")
    return Options(
        policies=policies,
        loads=loads,
        speeds=speeds,
        time_scale=args.time_scale,
        capacity=args.capacity,
        max_queued=max_queued,
        duration_s=duration,
        requests=args.requests,
        replicas=args.replicas,
        replica_rounds=rounds,
        deadline_s=args.deadline,
        seed=args.seed,
        out=args.out,
        plot=not args.no_plot,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str]) -> int:
    options = parse_args(argv)
    run = run_benchmark(run_all(options), argv, report=report, results=results, out=options.out)
    if options.plot:
        print(plot(run, options.out.with_suffix(".png")))
    return 0
