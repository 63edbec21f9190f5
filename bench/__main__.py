"""``python -m bench <command> [options]``: run one benchmark.

Commands are a table: each names a module with a ``main(argv) -> int`` (which parses its own
options) and says in a line what it measures. A new benchmark adds one row.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple


class Command(NamedTuple):
    """One benchmark: the module that runs it and what it measures."""

    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "engine": Command(
        "bench.engine",
        "the sim engine in-process and a sim worker over gRPC at 1-256 streams: "
        "TTFT, TPOT, output tokens/s beside the H100 figures",
    ),
    "lb": Command(
        "bench.lb",
        "router policies vs a join-shortest-queue oracle on a heterogeneous sim fleet under "
        "open-loop Poisson load at 50/80/95%: TTFT and end-to-end p50/p99, throughput",
    ),
    "hotpath": Command(
        "bench.hotpath",
        "the RPC hot path on loopback with h2load: a bare grpc.aio hop (the floor), a direct "
        "worker call, router miss and cache hit at 1/32/256, streamed tokens/s, CPU per request",
    ),
    "chaos": Command(
        "bench.chaos",
        "a real mesh (2 routers, 4 sim workers, cache on Redis, Consul) under open-loop load, "
        "one fault at a time: failed requests, p99 TTFT vs baseline, time until whole again",
    ),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: python -m bench <command> [options]   (python -m bench <command> --help)",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}  {command.summary}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(usage(), file=sys.stderr)
        return 2
    if args[0] in ("-h", "--help"):
        print(usage())
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    run: Callable[[Sequence[str]], int] = importlib.import_module(command.module).main
    return run(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
