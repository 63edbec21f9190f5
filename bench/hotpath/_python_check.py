"""The Python client cross-check: a closed loop of ``grpc.aio`` calls from this process at
concurrency 1 on each path, plus a real miss (unique prompts) and distinct cached keys."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc.aio

from bench._common import percentile, rounded
from bench.hotpath._mesh import Mesh, generate_request, unary_request
from bench.hotpath._options import DISTINCT_KEYS, ENTRY, PROMPT, UNARY_PATHS, Options
from llmmesh.v1 import generate_pb2, router_pb2_grpc, worker_pb2_grpc


@dataclass
class PythonCheck:
    """A closed loop of ``grpc.aio`` calls from this process at concurrency 1."""

    path: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    cached: int = 0
    client_cpu_percent: float | None = None

    def figures(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "requests": len(lat),
            "errors": self.errors,
            "p50_ms": rounded(percentile(lat, 50)),
            "p99_ms": rounded(percentile(lat, 99)),
            "answered_from_cache": self.cached,
            "client_cpu_percent": rounded(self.client_cpu_percent, 1),
            **({"first_error": self.first_error} if self.first_error else {}),
        }


async def python_check(mesh: Mesh, path: str, options: Options) -> PythonCheck:
    check = PythonCheck(path)
    entry = ENTRY.get(path, "router")
    channel = mesh.channels[entry]
    call: Callable[[generate_pb2.GenerateRequest], Awaitable[generate_pb2.GenerateResponse]]
    if entry == "worker":
        call = worker_pb2_grpc.WorkerStub(channel).Generate
    else:
        call = router_pb2_grpc.RouterStub(channel).Generate
    fixed = unary_request(path, options) if path in UNARY_PATHS else None
    tag = time.monotonic_ns()
    distinct = [
        generate_request(
            options.unary_tokens,
            cache_policy=generate_pb2.CACHE_POLICY_UNSPECIFIED,
            prompt=f"{PROMPT} [distinct {tag}-{i}]",
        )
        for i in range(DISTINCT_KEYS if path == "cache_hit_distinct" else 0)
    ]
    for request in distinct:
        await call(request, timeout=10)
    if distinct:
        await asyncio.sleep(0.2)  # the router stores in the background
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = wall0 + options.python_check_s
    n = 0
    while time.perf_counter() < end:
        n += 1
        request = (
            fixed
            or (distinct[n % len(distinct)] if distinct else None)
            or generate_request(
                options.unary_tokens,
                cache_policy=generate_pb2.CACHE_POLICY_UNSPECIFIED,
                prompt=f"{PROMPT} [{tag}-{n}]",
            )
        )
        started = time.perf_counter()
        try:
            response = await call(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            check.errors += 1
            check.first_error = check.first_error or f"{exc.code().name}: {exc.details()}"
            continue
        check.latencies_ms.append((time.perf_counter() - started) * 1000)
        check.cached += int(response.summary.cached)
    wall = time.perf_counter() - wall0
    check.client_cpu_percent = 100 * (time.process_time() - cpu0) / wall if wall > 0 else None
    return check
