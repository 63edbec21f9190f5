"""The ``llm-mesh`` command.

- ``llm-mesh up``: the whole mesh on this machine (see :mod:`llmmesh.local_mesh`);
- ``llm-mesh generate "PROMPT"``: ask the router, print the answer and a one-line summary;
- ``llm-mesh workers``: print the router's routing table.

``generate`` and ``workers`` use the synchronous gRPC client and import only the stubs, so they
start fast; ``up`` imports the supervisor only when it runs. A failed call prints
``error: <CODE>: <details>`` and exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import grpc

from llmmesh.cache_key import TENANT_METADATA_KEY
from llmmesh.client import (
    DEFAULT_MODEL,
    DEFAULT_TARGET,
    CommandError,
    ask,
    format_rpc_error,
    format_summary,
)
from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc

TARGET_ENV = "LLMMESH_TARGET"
MODEL_ENV = "LLMMESH_MODEL"

CACHE_POLICIES = {
    "default": generate_pb2.CACHE_POLICY_UNSPECIFIED,
    "bypass": generate_pb2.CACHE_POLICY_BYPASS,
    "refresh": generate_pb2.CACHE_POLICY_REFRESH,
    "only-if-cached": generate_pb2.CACHE_POLICY_ONLY_IF_CACHED,
}

_INT32_MAX = 2**31 - 1
_UINT64_MAX = 2**64 - 1


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}]")
        return value

    return parse


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get(TARGET_ENV, DEFAULT_TARGET),
        metavar="HOST:PORT",
        help=f"the router's address (env {TARGET_ENV}; default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``llm-mesh`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="llm-mesh", description="A gRPC serving mesh for large language models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="run the whole mesh on this machine",
        description="Start the cache service (on Redis when available), N workers and the "
        "router on this machine; Ctrl-C stops them all.",
    )
    up.add_argument("--workers", type=_int_in(1, 64), default=2, help="number of workers")
    up.add_argument("--engine", default="sim", help="the workers' engine (default %(default)s)")
    up.add_argument("--model", default=DEFAULT_MODEL, help="the model the workers serve")
    up.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    up.add_argument(
        "--port", type=_int_in(0, 65535), default=50051, help="router port (0 picks a free one)"
    )
    up.add_argument(
        "--store",
        choices=("auto", "redis", "memory"),
        default="auto",
        help="cache store; auto: Redis when redis-server is on PATH, else in-process",
    )
    up.add_argument(
        "--discovery",
        choices=("static", "consul"),
        default="static",
        help="how the router finds the workers: static (it is given their addresses) or consul "
        "(the workers register with an existing Consul agent and the router watches it)",
    )
    up.add_argument(
        "--consul-addr",
        default="",
        metavar="HOST:PORT",
        help="the Consul agent for --discovery consul (default: CONSUL_HTTP_ADDR, else "
        "127.0.0.1:8500; the token comes from CONSUL_HTTP_TOKEN)",
    )
    up.add_argument(
        "--try",
        dest="try_prompt",
        default="",
        metavar="PROMPT",
        help="once ready, ask this twice (the second answer comes from the cache), then serve",
    )
    up.add_argument(
        "--ready-file", default="", help="write the router address and pids here as JSON"
    )
    up.add_argument(
        "--log-dir", default="", help="one log file per child here (default: a new temp dir)"
    )
    up.add_argument(
        "--verbose", action="store_true", help="also copy the children's logs to stderr"
    )

    gen = commands.add_parser(
        "generate",
        help="ask the router for an answer",
        description="Send a prompt to the router; print the answer on stdout and a summary "
        "line on stderr.",
    )
    gen.add_argument("prompt", help="the prompt")
    _add_target(gen)
    gen.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV, DEFAULT_MODEL),
        help=f"model to ask (env {MODEL_ENV}; default %(default)s)",
    )
    gen.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    gen.add_argument("--max-tokens", type=_int_in(-_INT32_MAX, _INT32_MAX), default=None)
    gen.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (the default) is deterministic, so a repeated question is answered from the cache",
    )
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=_int_in(-_INT32_MAX, _INT32_MAX), default=None)
    gen.add_argument("--seed", type=_int_in(0, _UINT64_MAX), default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeat for several)")
    gen.add_argument("--cache-policy", choices=tuple(CACHE_POLICIES), default="default")
    gen.add_argument("--tenant", default="", help="tenant (cache entries are per tenant)")
    gen.add_argument("--request-id", default="", help="request id (default: the router's)")
    gen.add_argument(
        "--timeout", type=float, default=60.0, help="seconds to wait for the whole answer"
    )

    workers = commands.add_parser(
        "workers",
        help="print the router's routing table",
        description="Print every worker the router knows with its state and load.",
    )
    _add_target(workers)
    workers.add_argument("--model", default="", help="only workers serving this model")
    return parser


def build_request(args: argparse.Namespace) -> generate_pb2.GenerateRequest:
    """The GenerateRequest that ``llm-mesh generate`` sends for these arguments."""
    sampling = generate_pb2.SamplingParams(temperature=args.temperature, stop=args.stop)
    if args.max_tokens is not None:
        sampling.max_tokens = args.max_tokens
    if args.top_p is not None:
        sampling.top_p = args.top_p
    if args.top_k is not None:
        sampling.top_k = args.top_k
    if args.seed is not None:
        sampling.seed = args.seed
    return generate_pb2.GenerateRequest(
        model=args.model,
        prompt=args.prompt,
        sampling=sampling,
        request_id=args.request_id,
        cache_policy=CACHE_POLICIES[args.cache_policy],
    )


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: set[int]) -> str:
    rows = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _age(ms: float) -> str:
    if ms < 0:
        return "never"
    return f"{ms:.0f}ms ago" if ms < 1000 else f"{ms / 1000:.1f}s ago"


WORKER_COLUMNS = (
    "WORKER",
    "ADDRESS",
    "MODEL",
    "ENGINE",
    "STATE",
    "IN-FLIGHT",
    "ACTIVE",
    "QUEUED",
    "CAPACITY",
    "KV-USED",
    "SCORE",
    "LAST-REPORT",
)


def format_workers_table(workers: Sequence[router_pb2.WorkerStatus]) -> str:
    """The routing table as aligned text, one worker per line under a header."""
    rows = [
        (
            w.worker_id,
            w.address,
            w.model,
            w.engine,
            router_pb2.WorkerState.Name(w.state).removeprefix("WORKER_STATE_").lower(),
            str(w.in_flight),
            str(w.active_requests),
            str(w.queued_requests),
            str(w.capacity),
            f"{w.kv_cache_used_fraction:.0%}",
            f"{w.score:.2f}",
            _age(w.last_report_age_ms),
        )
        for w in workers
    ]
    return _table(WORKER_COLUMNS, rows, right=set(range(5, 11)))


def _generate(args: argparse.Namespace) -> int:
    request = build_request(args)
    metadata = ((TENANT_METADATA_KEY, args.tenant),) if args.tenant else ()
    with grpc.insecure_channel(args.target) as channel:
        request_id, summary = ask(
            router_pb2_grpc.RouterStub(channel),
            request,
            stream=args.stream,
            timeout=args.timeout,
            out=sys.stdout,
            metadata=metadata,
        )
    print(format_summary(request_id, summary), file=sys.stderr, flush=True)
    return 0


def _workers(args: argparse.Namespace) -> int:
    with grpc.insecure_channel(args.target) as channel:
        reply = router_pb2_grpc.RouterStub(channel).ListWorkers(
            router_pb2.ListWorkersRequest(model=args.model), timeout=10
        )
    discovery = reply.discovery
    if reply.HasField("discovery") and not discovery.healthy:
        print(
            f"warning: discovery ({discovery.source}, {discovery.target}) is degraded: "
            f"{discovery.last_error or 'it has not answered yet'}",
            file=sys.stderr,
        )
    if not reply.workers:
        print(f"the router at {args.target} knows no workers", file=sys.stderr)
        return 0
    print(format_workers_table(reply.workers))
    return 0


def _up(args: argparse.Namespace) -> int:
    from llmmesh import local_mesh

    if args.consul_addr and args.discovery != "consul":
        raise CommandError("--consul-addr needs --discovery consul")
    config = local_mesh.MeshConfig(
        workers=args.workers,
        engine=args.engine,
        model=args.model,
        host=args.host,
        port=args.port,
        store=args.store,
        discovery=args.discovery,
        consul_addr=args.consul_addr,
        try_prompt=args.try_prompt,
        ready_file=args.ready_file,
        log_dir=args.log_dir,
        verbose=args.verbose,
    )
    return local_mesh.run(config)


_COMMANDS = {"up": _up, "generate": _generate, "workers": _workers}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``llm-mesh``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except grpc.RpcError as exc:
        print(format_rpc_error(exc, getattr(args, "target", "")), file=sys.stderr)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
