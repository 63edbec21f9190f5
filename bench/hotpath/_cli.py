"""``python -m bench hotpath``'s command line (and the proxy's, ``--serve-proxy``)."""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from bench._common import parse_list, run_benchmark
from bench.hotpath._measure import run_all
from bench.hotpath._options import ANSWER_TOKENS, DEFAULT_OUT, Options
from bench.hotpath._proxy import serve_proxy
from bench.hotpath._report import report, results


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench hotpath",
        description="The RPC hot path on loopback: a bare grpc.aio pass-through hop (the floor), "
        "a direct worker call, the router on a cache miss and on a hit, and streamed tokens/s, "
        "driven by h2load.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 s per run, 128-token streams (under a minute)"
    )
    parser.add_argument(
        "--concurrency", default="1,32,256", help="comma-separated concurrencies (default 1,32,256)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per run (default 5; --quick 1)"
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=None,
        help="h2load warm-up seconds (default 0.5; --quick 0.25)",
    )
    parser.add_argument(
        "--stream-tokens",
        type=int,
        default=None,
        help="tokens per streamed answer (default 256; --quick 128)",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=16,
        help="the worker's --stream-interval: tokens per streamed message after the first "
        "(default 16)",
    )
    parser.add_argument(
        "--store",
        choices=("auto", "redis", "memory"),
        default="auto",
        help="the cache service's store (auto: redis when redis-server is installed)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the services' log level (default info, their default)",
    )
    parser.add_argument(
        "--no-python-check", action="store_true", help="skip the Python client cross-check"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="results JSON (default bench/results/hotpath.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    levels = parse_list(parser, "--concurrency", args.concurrency, int, "integers")
    if not levels or min(levels) < 1 or len(set(levels)) != len(levels):
        parser.error("--concurrency: give distinct integers >= 1")
    duration = args.duration if args.duration is not None else (1.0 if args.quick else 5.0)
    warmup = args.warm_up if args.warm_up is not None else (0.25 if args.quick else 0.5)
    tokens = args.stream_tokens if args.stream_tokens is not None else (128 if args.quick else 256)
    if not (math.isfinite(duration) and duration > 0):
        parser.error("--duration: must be > 0")
    if not (math.isfinite(warmup) and warmup >= 0):
        parser.error("--warm-up: must be >= 0")
    if not 1 <= tokens <= ANSWER_TOKENS:
        parser.error(f"--stream-tokens: must be 1 to {ANSWER_TOKENS}")
    if args.stream_interval < 1:
        parser.error("--stream-interval: must be >= 1")
    return Options(
        concurrencies=levels,
        duration_s=duration,
        warmup_s=warmup,
        stream_tokens=tokens,
        stream_interval=args.stream_interval,
        store=args.store,
        log_level=args.log_level,
        python_check=not args.no_python_check,
        python_check_s=0.5 if args.quick else 2.0,
        out=args.out,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str]) -> int:
    if any(a == "--serve-proxy" or a.startswith("--serve-proxy=") for a in argv):
        return serve_proxy(argv)
    options = parse_args(argv)
    h2load = shutil.which("h2load")
    if h2load is None:
        print(
            "h2load is not installed: apt-get install -y nghttp2-client (Debian's HTTP/2 tools)",
            file=sys.stderr,
        )
        return 2
    run_benchmark(run_all(options, h2load), argv, report=report, results=results, out=options.out)
    return 0
