"""``python -m bench chaos``'s command line."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bench._common import parse_list, run_benchmark
from bench.chaos._options import DEFAULT_OUT, FAULTS, NOT_BUILT, QUICK_FAULTS, Options
from bench.chaos._report import report, results
from bench.chaos._run import run_all


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench chaos",
        description="A real local mesh (2 routers, 4 sim workers, the cache service on "
        "redis-server, Consul) under open-loop load through both routers, with one fault at a "
        "time: failed requests, p99 TTFT against the baseline, time out of rotation and until "
        "the fleet is whole again.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"faults {','.join(QUICK_FAULTS)}, 3 s baselines and faults (under 3 minutes)",
    )
    parser.add_argument(
        "--faults",
        default=None,
        help=f"comma-separated faults, in the order given (default all: {','.join(FAULTS)})",
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="requests started per second (default 20)"
    )
    parser.add_argument(
        "--baseline", type=float, default=None, help="seconds of baseline (default 5; --quick 3)"
    )
    parser.add_argument(
        "--fault-length",
        type=float,
        default=None,
        help="seconds a SIGSTOP, a Redis stop or the slow readers last (default 10; --quick 3)",
    )
    parser.add_argument(
        "--consul-down",
        type=float,
        default=None,
        help="seconds Consul is down, longer than the workers' 1 s TTL (default 15; --quick 4)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="results JSON (default bench/results/chaos.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    if args.faults is None:
        faults = QUICK_FAULTS if args.quick else tuple(FAULTS)
    else:
        faults = parse_list(parser, "--faults", args.faults, str, "faults")
        for name in faults:
            if name in NOT_BUILT:
                parser.error(f"--faults: {name} is not built yet ({NOT_BUILT[name]})")
            if name not in FAULTS:
                parser.error(f"--faults: unknown fault {name!r} (choose from {', '.join(FAULTS)})")
        if not faults or len(set(faults)) != len(faults):
            parser.error("--faults: give distinct faults")
    rate = args.rate if args.rate is not None else 20.0
    baseline = args.baseline if args.baseline is not None else (3.0 if args.quick else 5.0)
    length = args.fault_length if args.fault_length is not None else (3.0 if args.quick else 10.0)
    down = args.consul_down if args.consul_down is not None else (4.0 if args.quick else 15.0)
    for flag, value in (("--rate", rate), ("--baseline", baseline), ("--fault-length", length)):
        if not (math.isfinite(value) and value > 0):
            parser.error(f"{flag}: must be > 0")
    if not (math.isfinite(down) and down > 1.0):
        parser.error("--consul-down: must be longer than the workers' 1 s TTL")
    return Options(
        faults=faults,
        rate=rate,
        baseline_s=baseline,
        fault_s=length,
        consul_down_s=down,
        warmup_s=2.0 if args.quick else 3.0,
        tail_s=1.0 if args.quick else 2.0,
        out=args.out,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str]) -> int:
    options = parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed: apt-get install -y redis-server", file=sys.stderr)
        return 2
    run_benchmark(run_all(options), argv, report=report, results=results, out=options.out)
    return 0
