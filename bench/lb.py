"""``python -m bench lb``: load balancing on a heterogeneous fleet of simulated workers.

**Fleet.** Real worker processes (``python -m worker --engine sim``), one per speed factor
(default 1, 1, 0.5, 0.25: two full-speed GPUs, one at half speed, one at a quarter), each running
``--capacity`` requests at once (default 4) with ``--max-queued`` more waiting (default 4x the
capacity, the ratio of the worker's own defaults, 64/256). Each speed factor is multiplied by
``--time-scale`` (default 1) so that the whole mesh, this process included, keeps up on a small
machine. Every answer runs to its ``max_tokens`` (the sim's natural answers are made longer than
any request's limit), so each request's work is known from the trace.

**Capacity.** From the sim's timing model (``worker/engines/sim.py``): with all ``C`` slots
busy, an iteration lasts ``d = token_delay + token_delay_per_request * (C - 1)`` and gives every
running request one token, and each admitted prompt adds ``n * prefill_per_token`` to one
iteration. A request with ``k`` output tokens and ``n`` prompt tokens therefore takes
``k * d / C + n * prefill_per_token`` of a saturated worker's time at speed 1, and a worker of
speed ``s`` completes ``s / (E[k] * d / C + E[n] * prefill_per_token)`` requests per second,
the means taken over 200,000 draws of the workload's distributions. The fleet's capacity is the
sum over workers; a load level of 80% offers 0.8 times that. Host delays (timer overshoot, a
busy CPU) make the real workers somewhat slower than the model, so the real utilisation is a
little higher than the nominal level; the throughput column shows what was achieved.

**Workload.** One trace, drawn once from ``--seed`` and replayed for every policy: an open-loop
Poisson arrival process (exponential gaps, rescaled to each load level's rate), prompt lengths
lognormal (median 200 tokens, sigma 1, clipped to 16-4096) and output lengths lognormal (median
24 tokens, sigma 0.9, clipped to 4-512). Requests use ``CACHE_POLICY_BYPASS`` and temperature
0.7 without a seed, and every prompt begins with a tag of its own run and index, so neither the
response cache nor the sim's prefix cache is ever involved.

**Runs.** For each load level, each policy runs the same trace on the same workers, which are
idle (checked on ``WatchLoad``) before each run; every router run starts fresh router
processes. ``round-robin``, ``random``, ``power-of-two`` and ``least-loaded`` are the router's
``--policy``; ``oracle`` is an ideal join-shortest-queue dispatcher in this process: it sends
each request straight to the worker with the fewest outstanding requests (ties at random) as
soon as one has a free batch slot, holding it in a central first-come-first-served queue while
none has (as the router's admission queue does; early binding to a worker's own queue does
worse under heavy-tailed lengths, since a request can wait behind a long one while another
worker frees up). It is the workers' only client, so its counts are exact, with no report delay
and no router hop.

**Replicas.** Three least-loaded router replicas (requests spread round-robin by this process)
are compared with one router side by side, in ``--replica-rounds`` interleaved rounds (default 2)
at 80% load: each round replays a trace of its own (seed, seed + 1, ...) through one router, then
through the replicas, and the comparison pools each side's rounds, so that a p99 rests on twice
the samples and drift of a noisy host falls on both sides alike. The first round's one-router run
is the main table's least-loaded run at that load.

**Measured.** Time to first token (TTFT) runs from a request's scheduled arrival time (not from
when it was actually sent, so a late sender cannot hide queueing) to its first chunk with text;
end to end (E2E) to the end of its stream. Percentiles are over completed requests; errors (any
RPC that did not complete, including one past the ``--deadline``) are counted beside them.
Throughput is completed requests over the time from the first arrival to the last completion.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import random
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from bench._common import (
    ROOT,
    CpuMeter,
    Progress,
    ServiceProcess,
    close_services,
    fmt,
    format_table,
    machine_info,
    percentile,
    rounded,
    start_services,
    write_results,
)
from llmmesh import logs
from llmmesh.server import grpc_channel_options
from llmmesh.v1 import (
    generate_pb2,
    router_pb2,
    router_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

MODEL = "sim-llama-3.1-8b"
ORACLE = "oracle"
LL = "least-loaded"
ROUTER_POLICIES = ("round-robin", "random", "power-of-two", "least-loaded")
POLICIES = (*ROUTER_POLICIES, ORACLE)
DEFAULT_OUT = ROOT / "bench" / "results" / "lb.json"

#: The sim's timing model at speed factor 1 (worker/engines/sim.py defaults), in seconds.
SIM_TOKEN_DELAY_S = 0.007
SIM_TOKEN_DELAY_PER_REQUEST_S = 16e-6
SIM_PREFILL_PER_TOKEN_S = 15.1e-6
#: Natural answer length given to the sim workers: longer than any request's max_tokens.
ANSWER_TOKENS = 4096

#: Workload distributions: (median, sigma, lowest, highest), in tokens.
PROMPT_TOKENS = (200.0, 1.0, 16, 4096)
OUTPUT_TOKENS = (24.0, 0.9, 4, 512)

#: Targets of issue 5, at 80% load.
TARGET_LOAD = 0.8
TARGET_ORACLE_RATIO = 1.15
TARGET_ROUND_ROBIN_FACTOR = 3.0
TARGET_REPLICA_RATIO = 1.2

#: A process using more of the machine than this share of its CPUs is taken to be saturated.
SATURATED_SHARE = 0.9


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to run."""

    policies: tuple[str, ...] = POLICIES
    loads: tuple[float, ...] = (0.5, 0.8, 0.95)
    speeds: tuple[float, ...] = (1.0, 1.0, 0.5, 0.25)
    time_scale: float = 1.0
    capacity: int = 4
    max_queued: int = 16
    duration_s: float = 20.0
    requests: int | None = None
    replicas: int = 3
    replica_load: float = TARGET_LOAD
    replica_rounds: int = 2
    deadline_s: float = 30.0
    seed: int = 1
    out: Path = DEFAULT_OUT
    plot: bool = True
    progress: bool = True

    @property
    def speed_factors(self) -> tuple[float, ...]:
        """The ``--sim-speed-factor`` of each worker."""
        return tuple(s * self.time_scale for s in self.speeds)


# -- workload ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceItem:
    """One request of the trace; ``unit_at`` is its arrival time at one request per second."""

    index: int
    unit_at: float
    prompt_tokens: int
    output_tokens: int


def draw_tokens(rng: random.Random, spec: tuple[float, float, int, int]) -> int:
    median, sigma, low, high = spec
    return min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))


def make_trace(seed: int, count: int) -> list[TraceItem]:
    """``count`` requests: unit-rate Poisson arrivals and heavy-tailed lengths, from ``seed``."""
    rng = random.Random(seed)
    trace, at = [], 0.0
    for index in range(count):
        at += rng.expovariate(1.0)
        prompt = draw_tokens(rng, PROMPT_TOKENS)
        trace.append(TraceItem(index, at, prompt, draw_tokens(rng, OUTPUT_TOKENS)))
    return trace


@dataclass(frozen=True)
class CapacityModel:
    """The fleet's capacity according to the sim's timing model (module docstring)."""

    mean_prompt_tokens: float
    mean_output_tokens: float
    request_s_at_speed_1: float
    worker_rps: tuple[float, ...]

    @property
    def fleet_rps(self) -> float:
        return sum(self.worker_rps)


def capacity_model(options: Options, samples: int = 200_000) -> CapacityModel:
    rng = random.Random(12345)
    prompt = statistics.fmean(draw_tokens(rng, PROMPT_TOKENS) for _ in range(samples))
    output = statistics.fmean(draw_tokens(rng, OUTPUT_TOKENS) for _ in range(samples))
    c = options.capacity
    step = SIM_TOKEN_DELAY_S + SIM_TOKEN_DELAY_PER_REQUEST_S * (c - 1)
    request_s = output * step / c + prompt * SIM_PREFILL_PER_TOKEN_S
    return CapacityModel(
        prompt, output, request_s, tuple(s / request_s for s in options.speed_factors)
    )


def load_label(load: float) -> str:
    return f"{load * 100:g}%"


def prompt_text(tag: str, tokens: int) -> str:
    """A prompt of exactly ``tokens`` sim tokens (4 characters each) starting with ``tag``."""
    text = f"{tag}: " + "Explain how the mesh balances load across its workers. " * (
        tokens // 13 + 2
    )
    return text[: tokens * 4]


def grpc_request(run_tag: str, item: TraceItem) -> generate_pb2.GenerateRequest:
    tag = f"lb-{run_tag}-{item.index}"
    return generate_pb2.GenerateRequest(
        model=MODEL,
        prompt=prompt_text(tag, item.prompt_tokens),
        request_id=tag,
        sampling=generate_pb2.SamplingParams(max_tokens=item.output_tokens, temperature=0.7),
        cache_policy=generate_pb2.CACHE_POLICY_BYPASS,
    )


# -- one run -------------------------------------------------------------------------------------


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


class Fleet:
    """The sim workers, started once and reused (idle) by every run."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.workers = [
            ServiceProcess("worker", self.worker_args(i, sf))
            for i, sf in enumerate(options.speed_factors)
        ]
        self.channels: list[grpc.aio.Channel] = []

    def worker_args(self, index: int, speed_factor: float) -> list[str]:
        o = self.options
        return [
            "--engine", "sim",
            "--model", MODEL,
            "--worker-id", f"w{index}-x{self.options.speeds[index]:g}",
            "--metrics-port", "-1",
            "--log-level", "warning",
            "--grace", "2s",
            "--capacity", str(o.capacity),
            "--max-queued", str(o.max_queued),
            "--sim-speed-factor", repr(speed_factor),
            "--sim-min-answer-tokens", str(ANSWER_TOKENS),
            "--sim-max-answer-tokens", str(ANSWER_TOKENS),
            "--max-tokens-limit", str(ANSWER_TOKENS),
        ]  # fmt: skip

    @property
    def addresses(self) -> list[str]:
        return [w.address for w in self.workers]

    async def start(self) -> None:
        await asyncio.to_thread(start_services, self.workers)
        self.channels = [
            grpc.aio.insecure_channel(a, options=grpc_channel_options()) for a in self.addresses
        ]
        for channel in self.channels:
            await asyncio.wait_for(channel.channel_ready(), 15)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close(None)
        await asyncio.to_thread(close_services, self.workers)

    async def load(self, channel: grpc.aio.Channel) -> worker_pb2.WatchLoadResponse:
        call = worker_pb2_grpc.WorkerStub(channel).WatchLoad(
            worker_pb2.WatchLoadRequest(interval_ms=50), timeout=5
        )
        try:
            async for report in call:
                return report
        finally:
            call.cancel()
        raise RuntimeError("WatchLoad ended without a report")

    async def wait_idle(self, timeout_s: float) -> None:
        """Until every worker reports nothing active or queued."""
        deadline = time.monotonic() + timeout_s
        while True:
            reports = [await self.load(c) for c in self.channels]
            busy = [r for r in reports if r.active_requests or r.queued_requests]
            if not busy:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    "workers still busy after the run: "
                    + ", ".join(
                        f"{r.worker_id} {r.active_requests}+{r.queued_requests}" for r in busy
                    )
                )
            await asyncio.sleep(0.1)

    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]


def router_args(fleet: Fleet, policy: str) -> list[str]:
    return [
        "--workers", ",".join(fleet.addresses),
        "--cache-address", "",
        "--policy", policy,
        "--metrics-port", "-1",
        "--log-level", "warning",
        "--grace", "2s",
        "--max-tokens-limit", str(ANSWER_TOKENS),
    ]  # fmt: skip


async def wait_routers_see_fleet(channels: Sequence[grpc.aio.Channel], workers: int) -> None:
    """Until every router lists every worker as HEALTHY (connected and reporting load)."""
    deadline = time.monotonic() + 20
    for channel in channels:
        stub = router_pb2_grpc.RouterStub(channel)
        while True:
            table = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
            healthy = [w for w in table.workers if w.state == router_pb2.WORKER_STATE_HEALTHY]
            if len(healthy) >= workers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"router does not see {workers} healthy workers:\n{table}")
            await asyncio.sleep(0.05)


class Oracle:
    """Join-shortest-queue with true queue lengths and a central queue: a request goes to the
    worker with the fewest outstanding requests (ties at random) as soon as one has a free batch
    slot, and waits here, first come first served, while none has. This process is the
    workers' only client, so its counts are exact and nothing waits in a worker's queue."""

    def __init__(
        self, channels: Sequence[grpc.aio.Channel], capacity: int, rng: random.Random
    ) -> None:
        self.stubs = [worker_pb2_grpc.WorkerStub(c) for c in channels]
        self.outstanding = [0] * len(self.stubs)
        self.capacity = capacity
        self.rng = rng
        self._freed = asyncio.Condition()

    def choose(self) -> int:
        best = min(self.outstanding)
        tied = [i for i, n in enumerate(self.outstanding) if n == best]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    async def acquire(self) -> int:
        async with self._freed:
            await self._freed.wait_for(lambda: min(self.outstanding) < self.capacity)
            index = self.choose()
            self.outstanding[index] += 1
            return index

    async def release(self, index: int) -> None:
        async with self._freed:
            self.outstanding[index] -= 1
            self._freed.notify()


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
            channels = [
                grpc.aio.insecure_channel(s.address, options=grpc_channel_options())
                for s in services
            ]
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


# -- the whole benchmark -------------------------------------------------------------------------


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


# -- reporting -----------------------------------------------------------------------------------


def _p99(run: Run, key: str, policy: str) -> float | None:
    result = run.results.get(key, {}).get(policy)
    if result is None:
        return None
    value = result.figures()["ttft_p99_ms"]
    return float(value) if value is not None else None


def targets(run: Run) -> dict[str, Any]:
    """Issue 5's targets at 80% load, each with pass (True/False) or None when not measured."""
    key = load_label(TARGET_LOAD)
    ll = _p99(run, key, "least-loaded")
    oracle = _p99(run, key, ORACLE)
    rr = _p99(run, key, "round-robin")
    replicas = (
        _p99(run, replica_label(run.options), LL)
        if run.options.replica_load == TARGET_LOAD
        else None
    )
    one = _p99(run, one_router_label(run.options), LL) if replicas is not None else None
    if one is None:
        one = ll

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b is not None and b > 0 else None

    vs_oracle = ratio(ll, oracle)
    vs_rr = ratio(rr, ll)
    vs_one = ratio(replicas, one)
    return {
        "load": key,
        "metric": "ttft_p99_ms",
        "least_loaded_within_15pct_of_oracle": {
            "least_loaded": ll,
            "oracle": oracle,
            "ratio": rounded(vs_oracle),
            "limit": TARGET_ORACLE_RATIO,
            "pass": None if vs_oracle is None else vs_oracle <= TARGET_ORACLE_RATIO,
        },
        "least_loaded_3x_better_than_round_robin": {
            "least_loaded": ll,
            "round_robin": rr,
            "factor": rounded(vs_rr),
            "required": TARGET_ROUND_ROBIN_FACTOR,
            "pass": None if vs_rr is None else vs_rr >= TARGET_ROUND_ROBIN_FACTOR,
        },
        "three_routers_within_20pct_of_one": {
            "one_router": one,
            "routers": run.options.replicas,
            "rounds": sum(1 for k in run.rounds if k.startswith(replica_label(run.options))),
            "replicas": replicas,
            "ratio": rounded(vs_one),
            "limit": TARGET_REPLICA_RATIO,
            "pass": None if vs_one is None else vs_one <= TARGET_REPLICA_RATIO,
        },
    }


def notes(run: Run) -> list[str]:
    out: list[str] = []
    cpus = machine_info()["usable_cpus"] or 1
    for key, by_policy in run.results.items():
        for policy, result in by_policy.items():
            total = sum(v or 0 for v in result.cpu_percent.values())
            if total >= SATURATED_SHARE * 100 * cpus:
                out.append(
                    f"{key} {policy}: the processes used {total:.0f}% of a core on {cpus} CPUs; "
                    "the machine was saturated and host delays are part of these figures"
                )
            if result.max_send_lag_s > 0.05:
                out.append(
                    f"{key} {policy}: the load generator sent up to "
                    f"{result.max_send_lag_s * 1000:.0f} ms late (latency is still measured "
                    "from the scheduled arrival)"
                )
            if result.errors:
                out.append(
                    f"{key} {policy}: {result.error_count} of {result.requests} requests failed "
                    f"({result.first_error}); percentiles are over completed requests"
                )
    return out


def report(run: Run) -> str:
    o, m = run.options, run.model
    info = machine_info()
    speeds = ", ".join(f"{s:g}" for s in o.speeds)
    lines = [
        f"llm-mesh load-balancing benchmark: {len(o.speeds)} sim workers (speeds {speeds}, "
        f"x{o.time_scale:g} time scale), capacity {o.capacity} + {o.max_queued} queued each",
        f"fleet capacity (sim timing model): {m.fleet_rps:.1f} requests/s; prompts mean "
        f"{m.mean_prompt_tokens:.0f} tokens, outputs mean {m.mean_output_tokens:.0f} tokens "
        "(lognormal, clipped); open-loop Poisson arrivals, seed "
        f"{o.seed}",
        f"machine: {info['usable_cpus']} CPUs, {info['processor']}, "
        f"{info['python_implementation']} {info['python']}, {info['platform']}",
        "",
    ]
    headers = [
        "load",
        "policy",
        "requests",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "E2E p50 ms",
        "E2E p99 ms",
        "offered rps",
        "done rps",
        "errors",
    ]
    rows = []
    rounds = sum(1 for k in run.rounds if k.startswith(replica_label(run.options)))
    names = {
        (key, policy): policy + (f" x{result.routers} routers" if result.routers > 1 else "")
        for key, by_policy in run.results.items()
        for policy, result in by_policy.items()
    }
    for key in (one_router_label(run.options), replica_label(run.options)):
        for policy in run.results.get(key, {}):
            one = key == one_router_label(run.options)
            names[key, policy] = (
                f"{policy} x{1 if one else run.options.replicas} "
                f"router{'' if one else 's'}, {rounds} round{'s' if rounds != 1 else ''}"
            )
    width = max((len(n) for n in names.values()), default=0)
    for key, by_policy in run.results.items():
        for policy, result in by_policy.items():
            f = result.figures()
            rows.append(
                [
                    key.split("-")[0],
                    names[key, policy].ljust(width),
                    str(result.requests),
                    fmt(f["ttft_p50_ms"]),
                    fmt(f["ttft_p99_ms"]),
                    fmt(f["e2e_p50_ms"]),
                    fmt(f["e2e_p99_ms"]),
                    fmt(result.offered_rps, 2),
                    fmt(f["throughput_rps"], 2),
                    str(f["errors"]),
                ]
            )
    lines.append(format_table(headers, rows))
    t = targets(run)
    lines += ["", f"Targets at {t['load']} (TTFT p99):"]

    def verdict(passed: bool | None) -> str:
        return {True: "PASS", False: "FAIL", None: "not measured"}[passed]

    a = t["least_loaded_within_15pct_of_oracle"]
    b = t["least_loaded_3x_better_than_round_robin"]
    c = t["three_routers_within_20pct_of_one"]
    lines += [
        f"- least-loaded within 15% of the oracle: {fmt(a['least_loaded'])} vs "
        f"{fmt(a['oracle'])} ms, ratio {fmt(a['ratio'], 2)} (<= {a['limit']}): "
        f"{verdict(a['pass'])}",
        f"- least-loaded >= 3x better than round-robin: {fmt(b['least_loaded'])} vs "
        f"{fmt(b['round_robin'])} ms, factor {fmt(b['factor'], 2)} (>= {b['required']}): "
        f"{verdict(b['pass'])}",
        f"- {c['routers']} routers within 20% of one: {fmt(c['replicas'])} vs "
        f"{fmt(c['one_router'])} ms, ratio {fmt(c['ratio'], 2)} (<= {c['limit']}): "
        f"{verdict(c['pass'])}",
    ]
    found = notes(run)
    if found:
        lines += ["", "Notes:", *(f"- {n}" for n in found)]
    return "\n".join(lines)


def results(run: Run, argv: Sequence[str]) -> dict[str, Any]:
    o, m = run.options, run.model
    return {
        "benchmark": "lb",
        "command": shlex.join(["python", "-m", "bench", "lb", *argv]),
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "policies": list(o.policies),
            "loads": [load_label(ld) for ld in o.loads],
            "worker_speeds": list(o.speeds),
            "time_scale": o.time_scale,
            "sim_speed_factors": list(o.speed_factors),
            "capacity_per_worker": o.capacity,
            "max_queued_per_worker": o.max_queued,
            "duration_s": o.duration_s if o.requests is None else None,
            "requests_per_run": dict(run.trace_sizes),
            "deadline_s": o.deadline_s,
            "replicas": o.replicas,
            "replica_load": load_label(o.replica_load),
            "replica_rounds": o.replica_rounds,
            "seed": o.seed,
            "workload": {
                "arrivals": "open-loop Poisson",
                "prompt_tokens": dict(
                    zip(("median", "sigma", "min", "max"), PROMPT_TOKENS, strict=True),
                    distribution="lognormal, clipped",
                ),
                "output_tokens": dict(
                    zip(("median", "sigma", "min", "max"), OUTPUT_TOKENS, strict=True),
                    distribution="lognormal, clipped",
                ),
                "sampling": "temperature 0.7, no seed, CACHE_POLICY_BYPASS, unique prompts",
            },
            "capacity_model": {
                "method": "sim timing model at full batch: per request k*d/C + n*prefill; "
                "worker rps = speed factor / that; fleet = sum",
                "mean_prompt_tokens": rounded(m.mean_prompt_tokens, 1),
                "mean_output_tokens": rounded(m.mean_output_tokens, 1),
                "request_s_at_speed_1": rounded(m.request_s_at_speed_1, 5),
                "worker_rps": [rounded(r, 2) for r in m.worker_rps],
                "fleet_rps": rounded(m.fleet_rps, 2),
            },
            "oracle": "join-shortest-queue in the load generator: fewest outstanding requests "
            "(true counts, this process is the only client), ties at random, no router hop; "
            "while every worker's batch is full, requests wait in a central FIFO queue",
        },
        "results": {
            key: {policy: r.result() for policy, r in by_policy.items()}
            for key, by_policy in run.results.items()
        },
        "replica_rounds": {key: r.result() for key, r in run.rounds.items()},
        "targets": targets(run),
        "notes": notes(run),
    }


def plot(run: Run, path: Path) -> str:
    """Draw TTFT p99 by load level per policy at ``path``; what was done, in a line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    o = run.options
    fig, ax = plt.subplots(figsize=(7, 4.5))
    loads = [ld for ld in o.loads if load_label(ld) in run.results]
    for policy in o.policies:
        xs, ys = [], []
        for ld in loads:
            value = _p99(run, load_label(ld), policy)
            if value is not None:
                xs.append(ld * 100)
                ys.append(value)
        if xs:
            ax.plot(xs, ys, marker="o", label=policy)
    replicas = _p99(run, replica_label(o), "least-loaded")
    if replicas is not None:
        ax.plot(
            [o.replica_load * 100],
            [replicas],
            marker="*",
            markersize=14,
            linestyle="none",
            label=f"least-loaded, {o.replicas} routers",
        )
    ax.set_yscale("log")
    ax.set_xlabel("offered load (% of fleet capacity)")
    ax.set_ylabel("time to first token, p99 (ms)")
    speeds = ", ".join(f"{s:g}" for s in o.speeds)
    ax.set_title(f"llm-mesh load balancing: sim workers at speeds {speeds}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


# -- command line --------------------------------------------------------------------------------


def _floats(parser: argparse.ArgumentParser, flag: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        parser.error(f"{flag}: not a list of numbers: {text!r}")
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
    policies = tuple(p.strip() for p in args.policies.split(",") if p.strip())
    if not policies or len(set(policies)) != len(policies):
        parser.error("--policies: give one or more distinct policy names")
    default_loads = "80" if args.quick else "50,80,95"
    loads = tuple(v / 100 for v in _floats(parser, "--loads", args.loads or default_loads))
    speeds = _floats(parser, "--speeds", args.speeds)
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
    logs.configure("bench", "warning", json=False)
    run = asyncio.run(run_all(options))
    print(report(run))
    write_results(options.out, results(run, argv))
    print(f"\nresults: {options.out}")
    if options.plot:
        print(plot(run, options.out.with_suffix(".png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
