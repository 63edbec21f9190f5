"""One run: a trace replayed open-loop through routers (or the oracle) and what each request
measured (time to first token, end to end, the worker that answered) or how it failed."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc.aio

from bench._common import (
    CpuMeter,
    ServiceProcess,
    close_services,
    open_channel,
    percentile,
    rounded,
    start_services,
)
from bench.lb._fleet import Fleet, Oracle, router_args, wait_routers_see_fleet
from bench.lb._options import ORACLE, Options
from bench.lb._workload import TraceItem, grpc_request, load_label
from llmmesh.v1 import generate_pb2, router_pb2_grpc, worker_pb2_grpc


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    worker_id: str


@dataclass
class RunResult:
    """One policy at one load level."""

    policy: str
    load: float
    routers: int
    requests: int
    offered_rps: float
    samples: list[Sample] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    first_error: str = ""
    elapsed_s: float = math.nan
    max_send_lag_s: float = 0.0
    cpu_percent: dict[str, float | None] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def figures(self) -> dict[str, Any]:
        ttft = [s.ttft_s for s in self.samples]
        e2e = [s.e2e_s for s in self.samples]
        ms = 1000
        return {
            "ttft_p50_ms": rounded(percentile(ttft, 50) * ms, 1),
            "ttft_p99_ms": rounded(percentile(ttft, 99) * ms, 1),
            "e2e_p50_ms": rounded(percentile(e2e, 50) * ms, 1),
            "e2e_p99_ms": rounded(percentile(e2e, 99) * ms, 1),
            "throughput_rps": rounded(
                len(self.samples) / self.elapsed_s if self.elapsed_s > 0 else math.nan, 2
            ),
            "errors": self.error_count,
        }

    def result(self) -> dict[str, Any]:
        per_worker: dict[str, int] = {}
        for s in self.samples:
            per_worker[s.worker_id] = per_worker.get(s.worker_id, 0) + 1
        data: dict[str, Any] = {
            **self.figures(),
            "requests": self.requests,
            "completed": len(self.samples),
            "offered_rps": rounded(self.offered_rps, 2),
            "routers": self.routers,
            "elapsed_s": rounded(self.elapsed_s, 2),
            "max_send_lag_ms": rounded(self.max_send_lag_s * 1000, 1),
            "completed_per_worker": dict(sorted(per_worker.items())),
            "cpu_percent": {k: rounded(v, 1) for k, v in self.cpu_percent.items()},
        }
        if self.errors:
            data["error_codes"] = dict(self.errors)
            data["first_error"] = self.first_error
        return data


async def stream_one(
    result: RunResult,
    stub: worker_pb2_grpc.WorkerAsyncStub | router_pb2_grpc.RouterAsyncStub,
    request: generate_pb2.GenerateRequest,
    scheduled: float,
    deadline_s: float,
) -> None:
    """Send ``request`` and record its timings (from ``scheduled``) or its error."""
    first = math.nan
    worker = ""
    try:
        remaining = max(0.001, scheduled + deadline_s - time.perf_counter())
        call = stub.GenerateStream(request, timeout=remaining)
        async for chunk in call:
            if chunk.text and math.isnan(first):
                first = time.perf_counter()
            if chunk.HasField("summary"):
                worker = chunk.summary.worker_id
        end = time.perf_counter()
        if math.isnan(first):
            raise RuntimeError("stream ended without text")
        result.samples.append(Sample(first - scheduled, end - scheduled, worker))
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
        result.errors[code] = result.errors.get(code, 0) + 1
        result.first_error = result.first_error or f"{code}: {exc.details()}"[:300]
    except Exception as exc:
        name = type(exc).__name__
        result.errors[name] = result.errors.get(name, 0) + 1
        result.first_error = result.first_error or f"{name}: {exc}"[:300]


async def replay(
    result: RunResult,
    trace: Sequence[TraceItem],
    rate: float,
    run_tag: str,
    options: Options,
    *,
    router_stubs: Sequence[router_pb2_grpc.RouterAsyncStub] = (),
    oracle: Oracle | None = None,
) -> None:
    """Send ``trace`` open-loop at ``rate`` requests/s and wait for every answer."""
    tasks: list[asyncio.Task[None]] = []
    began = time.perf_counter() + 0.05
    last_end = began

    async def via_oracle(request: generate_pb2.GenerateRequest, scheduled: float) -> None:
        assert oracle is not None
        index = await oracle.acquire()
        try:
            await stream_one(result, oracle.stubs[index], request, scheduled, options.deadline_s)
        finally:
            await oracle.release(index)

    for n, item in enumerate(trace):
        scheduled = began + item.unit_at / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        result.max_send_lag_s = max(result.max_send_lag_s, time.perf_counter() - scheduled)
        request = grpc_request(run_tag, item)
        if oracle is not None:
            coro = via_oracle(request, scheduled)
        else:
            stub = router_stubs[n % len(router_stubs)]
            coro = stream_one(result, stub, request, scheduled, options.deadline_s)
        tasks.append(asyncio.create_task(coro))
    await asyncio.gather(*tasks)
    last_end = time.perf_counter()
    result.elapsed_s = last_end - began


async def run_one(
    options: Options,
    fleet: Fleet,
    trace: Sequence[TraceItem],
    policy: str,
    load: float,
    routers: int,
    fleet_rps: float,
) -> RunResult:
    rate = load * fleet_rps
    result = RunResult(policy, load, routers if policy != ORACLE else 0, len(trace), rate)
    run_tag = f"{policy}-{load_label(load)}-{routers}-{time.monotonic_ns()}"
    services: list[ServiceProcess] = []
    channels: list[grpc.aio.Channel] = []
    meters: dict[str, list[CpuMeter]] = {"client": [CpuMeter()]}
    meters["workers"] = [CpuMeter(pid) for pid in fleet.pids()]
    try:
        if policy == ORACLE:
            oracle = Oracle(fleet.channels, options.capacity, random.Random(options.seed))
            stubs: list[router_pb2_grpc.RouterAsyncStub] = []
        else:
            oracle = None
            services = [
                ServiceProcess("router", router_args(fleet, policy)) for _ in range(routers)
            ]
            await asyncio.to_thread(start_services, services)
            channels = [open_channel(s.address) for s in services]
            await wait_routers_see_fleet(channels, len(fleet.workers))
            stubs = [router_pb2_grpc.RouterStub(c) for c in channels]
            meters["routers"] = [CpuMeter(s.pid) for s in services]
        for group in meters.values():
            for meter in group:
                meter.start()
        await replay(result, trace, rate, run_tag, options, router_stubs=stubs, oracle=oracle)
        for name, group in meters.items():
            used = [meter.stop() for meter in group]
            result.cpu_percent[name] = (
                None if any(u is None for u in used) else sum(u or 0 for u in used)
            )
    finally:
        for channel in channels:
            await channel.close(None)
        if services:
            await asyncio.to_thread(close_services, services)
    await fleet.wait_idle(timeout_s=options.deadline_s)
    return result
