"""``python -m llmmesh.healthcheck``: exit 0 only when a service answers ``grpc.health.v1`` SERVING.

Container healthchecks (the images' ``HEALTHCHECK``, ``deploy/docker-compose.yml``) run this
module, so the images need no ``grpc_health_probe`` binary: one ``Health/Check`` RPC with a short
deadline, no retries, no waiting for the channel to connect.

Which address it asks, first that applies:

1. ``--address HOST:PORT``;
2. the service's ready file (``--ready-file``, else ``LLMMESH_READY_FILE``, the variable the
   service itself reads; the images set it): the port the service wrote there once it was
   SERVING. No file yet means the service is still starting: not healthy;
3. ``LLMMESH_PORT``.

With 2 and 3 the host is ``LLMMESH_HOST`` unless that is empty or a wildcard (``0.0.0.0``,
``::``), in which case it is loopback.

Exit status: 0 SERVING; 1 anything else (``NOT_SERVING``, unknown service, unreachable, timed
out), with one line on stderr saying which; 2 a usage error (bad flag, no address to ask).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh import settings

_WILDCARDS = {"", "0.0.0.0", "::", "[::]"}
SERVING = 0
UNHEALTHY = 1
USAGE = 2


class _NoAddress(Exception):
    """No address to ask could be worked out (usage error)."""


class _NotReady(Exception):
    """The service has not reported SERVING yet (unhealthy)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m llmmesh.healthcheck",
        description="Exit 0 when the gRPC service answers grpc.health.v1 Check with SERVING.",
    )
    parser.add_argument("--address", default="", help="host:port to ask (default: see below)")
    parser.add_argument(
        "--ready-file",
        default="",
        help="read the port from this ready file (default: $LLMMESH_READY_FILE)",
    )
    parser.add_argument(
        "--service",
        default="",
        help='health service name to check (default "": the whole server)',
    )
    parser.add_argument(
        "--timeout",
        type=settings.parse_duration,
        default=settings.parse_duration("2s"),
        help="deadline of the Check RPC (default 2s)",
    )
    parser.epilog = (
        "Without --address: the port in the ready file, else $LLMMESH_PORT, on $LLMMESH_HOST "
        "(loopback when unset or a wildcard). Exit 0 SERVING, 1 not, 2 usage error."
    )
    return parser


def resolve_address(address: str, ready_file: str, environ: Mapping[str, str]) -> str:
    """The ``host:port`` to ask (see the module docstring)."""
    if address:
        return address
    host = environ.get(settings.env_name("host"), "").strip()
    if host in _WILDCARDS:
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    ready_path = ready_file or environ.get(settings.env_name("ready_file"), "")
    if ready_path:
        try:
            info = json.loads(Path(ready_path).read_text())
            port = int(info["port"])
        except FileNotFoundError:
            raise _NotReady(f"{ready_path} does not exist: not serving yet") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _NotReady(f"cannot read the port from {ready_path}: {exc}") from None
        return f"{host}:{port}"
    port_text = environ.get(settings.env_name("port"), "").strip()
    if port_text.isdigit() and 0 < int(port_text) < 65536:
        return f"{host}:{port_text}"
    raise _NoAddress(
        "no address: give --address, a ready file (--ready-file, LLMMESH_READY_FILE) or "
        "LLMMESH_PORT"
    )


def check(address: str, service: str = "", timeout_s: float = 2.0) -> tuple[bool, str]:
    """Ask ``address`` for the health of ``service``: (SERVING?, a one-line description)."""
    name = service or '""'
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            if code is grpc.StatusCode.NOT_FOUND:
                return False, f"{address}: unknown health service {name}"
            if code is grpc.StatusCode.DEADLINE_EXCEEDED:
                return False, f"{address}: no answer within {timeout_s:g} s"
            details = exc.details()
            return False, f"{address}: {code.name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{address} {name}: {status}"


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run the check; returns the exit status (0 SERVING, 1 unhealthy, 2 usage error)."""
    args = _parser().parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        address = resolve_address(args.address, args.ready_file, env)
    except _NoAddress as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return USAGE
    except _NotReady as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return UNHEALTHY
    serving, line = check(address, args.service, args.timeout.total_seconds())
    print(f"healthcheck: {line}", file=sys.stdout if serving else sys.stderr)
    return SERVING if serving else UNHEALTHY


if __name__ == "__main__":
    raise SystemExit(main())
