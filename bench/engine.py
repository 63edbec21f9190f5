"""``python -m bench engine``: the simulated engine, in-process and behind a worker, at 1, 16, 64
and 256 concurrent streams, beside the TensorRT-LLM figures it is calibrated to.

Each level is a closed loop: every stream sends a request (128 prompt tokens, 128 output tokens,
greedy, a prompt of its own so nothing is shared in the prefix cache), waits for its last token
and sends the next, until the level's duration has passed; the requests still running then
finish. Per request: time to first token (TTFT, from sending to the first text), time per output
token (TPOT, from the first to the last text over the tokens after the first) and the tokens;
per level: the percentiles over requests and output tokens per second (every output token over
the level's wall time, the drain included).

Two parts, one run:

- **engine**: :class:`~worker.engines.SimEngine` driven in this process, no RPC: what the
  simulator models, plus the host's cost of running it. The same requests are also timed on the
  engine's simulated clock (``model`` in the results): the timing model alone, free of host delays.
- **worker**: ``python -m worker --engine sim`` in a child process (started like the tests start
  it, ``--ready-file``) driven over gRPC ``Worker.GenerateStream`` from this process. On a small
  machine the Python client or the worker can run out of CPU first; the CPU each used is shown,
  and a note says when one of them was saturated.

Published figures (``shared/briefs/trtllm-triton.md``) are printed beside the measured ones.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import (
    ROOT,
    CpuMeter,
    Progress,
    ServiceProcess,
    fmt,
    format_table,
    machine_info,
    notes_section,
    open_channel,
    parse_list,
    percentile,
    results_header,
    rounded,
    run_benchmark,
)
from llmmesh.v1 import generate_pb2, worker_pb2_grpc
from llmmesh.validation import Sampling
from worker.engines import Completion, EngineRequest, SimEngine, SimSettings, TextDelta

MODEL = "sim-llama-3.1-8b"
PARTS = ("engine", "worker")
DEFAULT_OUT = ROOT / "bench" / "results" / "engine.json"
#: A process using more of a core than this is taken to be the bottleneck.
SATURATED_CPU_PERCENT = 85.0
#: Streams of the published concurrency figure, run on the simulated clock only.
PUBLISHED_STREAMS = 95
#: The speed factor of that run: its timings are read on the simulated clock and scaled back.
MODEL_ONLY_SPEED = 100.0

#: Published TensorRT-LLM figures on one H100 (shared/briefs/trtllm-triton.md).
PUBLISHED: dict[str, Any] = {
    "source": "shared/briefs/trtllm-triton.md (TensorRT-LLM, one H100)",
    "batch1_ttft_ms_at_128_prompt_tokens": 7.0,
    "batch1_ttft_ms_at_2048_prompt_tokens": 36.0,
    "tpot_ms_small_batch": 7.0,
    "concurrency_95": {"ttft_p50_ms": 160.0, "ttft_p99_ms": 232.0, "tpot_p50_ms": 7.6},
    "tpot_ms_near_256_concurrent": 15.0,
    "saturated_output_tokens_per_s_128_128": 28_312.0,
}


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to run."""

    concurrency: tuple[int, ...] = (1, 16, 64, 256)
    duration_s: float = 10.0
    prompt_tokens: int = 128
    output_tokens: int = 128
    speed_factor: float = 1.0
    parts: tuple[str, ...] = PARTS
    out: Path = DEFAULT_OUT
    progress: bool = True

    @property
    def capacity(self) -> int:
        return max(self.concurrency)

    @property
    def answer_tokens(self) -> int:
        """The natural answer length: longer than ``output_tokens``, so every request runs to
        max_tokens ("length")."""
        return max(4096, self.output_tokens + 1)


@dataclass
class Sample:
    """One request, timed."""

    ttft_s: float
    tpot_s: float | None
    tokens: int
    #: The same on the engine's simulated clock (engine part only).
    model_ttft_s: float | None = None
    model_tpot_s: float | None = None


@dataclass
class Level:
    """One concurrency level of one part."""

    part: str
    streams: int
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    elapsed_s: float = math.nan
    model_elapsed_s: float | None = None
    #: Simulated seconds to reported ones (a model-only run at another speed factor).
    clock_scale: float = 1.0
    cpu_percent: dict[str, float | None] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.samples)

    def figures(self, *, model: bool = False) -> dict[str, float | None]:
        """Percentiles (ms) and output tokens/s, on the wall clock or the simulated one."""
        if model:
            k = self.clock_scale
            ttfts = [s.model_ttft_s * k for s in self.samples if s.model_ttft_s is not None]
            tpots = [s.model_tpot_s * k for s in self.samples if s.model_tpot_s is not None]
            elapsed = (self.model_elapsed_s or math.nan) * k
        else:
            ttfts = [s.ttft_s for s in self.samples]
            tpots = [s.tpot_s for s in self.samples if s.tpot_s is not None]
            elapsed = self.elapsed_s
        ms = 1000
        return {
            "ttft_p50_ms": rounded(percentile(ttfts, 50) * ms),
            "ttft_p99_ms": rounded(percentile(ttfts, 99) * ms),
            "tpot_p50_ms": rounded(percentile(tpots, 50) * ms),
            "tpot_p99_ms": rounded(percentile(tpots, 99) * ms),
            "output_tokens_per_s": rounded(self.tokens / elapsed if elapsed > 0 else math.nan, 1),
        }

    def result(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "streams": self.streams,
            "requests": len(self.samples),
            "errors": len(self.errors),
            "output_tokens": self.tokens,
            "elapsed_s": rounded(self.elapsed_s),
            **self.figures(),
            "cpu_percent": {k: rounded(v, 1) for k, v in self.cpu_percent.items()},
        }
        if self.model_elapsed_s is not None:
            data["model"] = self.figures(model=True)
        if self.errors:
            data["first_error"] = self.errors[0]
        return data


def prompt_for(tag: str, tokens: int) -> str:
    """A prompt of exactly ``tokens`` simulator tokens whose first block is unique to ``tag``."""
    text = f"bench {tag}: " + "Summarise the state of the serving mesh in one paragraph. " * (
        tokens // 12 + 2
    )
    return text[: tokens * 4]


def greedy(max_tokens: int) -> Sampling:
    return Sampling(max_tokens=max_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=())


async def closed_loop(
    level: Level, done: Callable[[], bool], one: Callable[[int, int], Awaitable[Sample]]
) -> None:
    """Run ``level.streams`` streams, each sending request after request until ``done()``
    (at least one each); a stream stops at its first error."""

    async def stream(index: int) -> None:
        sent = 0
        while sent == 0 or not done():
            try:
                level.samples.append(await one(index, sent))
            except Exception as exc:
                level.errors.append(f"{type(exc).__name__}: {exc}"[:500])
                return
            sent += 1

    began = time.perf_counter()
    await asyncio.gather(*(stream(i) for i in range(level.streams)))
    level.elapsed_s = time.perf_counter() - began


# -- part 1: the engine in this process ----------------------------------------------------------


def sim_settings(options: Options, speed_factor: float | None = None) -> SimSettings:
    return SimSettings(
        model=MODEL,
        capacity=options.capacity,
        speed_factor=options.speed_factor if speed_factor is None else speed_factor,
        min_answer_tokens=options.answer_tokens,
        max_answer_tokens=options.answer_tokens,
    )


async def engine_request(engine: SimEngine, request: EngineRequest) -> Sample:
    """Run ``request``, timing it on the wall clock and on the engine's simulated clock."""
    sent, model_sent = time.perf_counter(), engine.simulated_seconds
    first = last = model_first = model_last = math.nan
    completion: Completion | None = None
    async for item in engine.generate(request):
        if isinstance(item, TextDelta):
            last, model_last = time.perf_counter(), engine.simulated_seconds
            if math.isnan(first):
                first, model_first = last, model_last
        else:
            completion = item
    if completion is None or math.isnan(first):
        raise RuntimeError(f"request {request.request_id} produced no text")
    tokens = completion.completion_tokens
    return Sample(
        ttft_s=first - sent,
        tpot_s=(last - first) / (tokens - 1) if tokens > 1 else None,
        tokens=tokens,
        model_ttft_s=model_first - model_sent,
        model_tpot_s=(model_last - model_first) / (tokens - 1) if tokens > 1 else None,
    )


async def run_engine_level(
    options: Options,
    streams: int,
    *,
    prompt_tokens: int | None = None,
    output_tokens: int | None = None,
    speed_factor: float | None = None,
    duration_s: float | None = None,
    model_clock: bool = False,
) -> Level:
    """One closed-loop level against a fresh engine (timed on its simulated clock too)."""
    level = Level("engine", streams)
    prompt_tokens = options.prompt_tokens if prompt_tokens is None else prompt_tokens
    sampling = greedy(options.output_tokens if output_tokens is None else output_tokens)
    duration = options.duration_s if duration_s is None else duration_s
    engine = SimEngine(sim_settings(options, speed_factor))
    await engine.start()
    try:
        began, model_began = time.perf_counter(), engine.simulated_seconds

        def done() -> bool:
            if model_clock:
                return engine.simulated_seconds - model_began >= duration
            return time.perf_counter() - began >= duration

        async def one(index: int, sent: int) -> Sample:
            tag = f"{streams}-{index}-{sent}-{prompt_tokens}"
            request = EngineRequest(
                request_id=tag, prompt=prompt_for(tag, prompt_tokens), sampling=sampling
            )
            return await engine_request(engine, request)

        meter = CpuMeter()
        meter.start()
        await closed_loop(level, done, one)
        level.cpu_percent["bench"] = meter.stop()
        level.model_elapsed_s = engine.simulated_seconds - model_began
    finally:
        await engine.stop()
    return level


# -- part 2: a worker process over gRPC ----------------------------------------------------------


def worker_args(options: Options) -> list[str]:
    return [
        "--engine", "sim",
        "--model", MODEL,
        "--metrics-port", "-1",
        "--capacity", str(options.capacity),
        "--max-queued", str(options.capacity),
        "--max-tokens-limit", str(max(4096, options.output_tokens)),
        "--sim-speed-factor", repr(options.speed_factor),
        "--sim-min-answer-tokens", str(options.answer_tokens),
        "--sim-max-answer-tokens", str(options.answer_tokens),
    ]  # fmt: skip


async def worker_request(
    stub: worker_pb2_grpc.WorkerAsyncStub, request: generate_pb2.GenerateRequest
) -> Sample:
    """Stream ``request`` from the worker, timing its text as the client receives it."""
    sent = time.perf_counter()
    first = last = math.nan
    tokens = -1
    call = stub.GenerateStream(request, timeout=300)
    async for chunk in call:
        if chunk.text:
            last = time.perf_counter()
            if math.isnan(first):
                first = last
        if chunk.HasField("summary"):
            tokens = chunk.summary.usage.completion_tokens
    if tokens < 0 or math.isnan(first):
        raise RuntimeError(f"request {request.request_id} ended without text or summary")
    return Sample(
        ttft_s=first - sent,
        tpot_s=(last - first) / (tokens - 1) if tokens > 1 else None,
        tokens=tokens,
    )


async def run_worker_level(
    options: Options,
    stub: worker_pb2_grpc.WorkerAsyncStub,
    worker_pid: int,
    streams: int,
    *,
    prompt_tokens: int | None = None,
    output_tokens: int | None = None,
    duration_s: float | None = None,
) -> Level:
    level = Level("worker", streams)
    prompt_tokens = options.prompt_tokens if prompt_tokens is None else prompt_tokens
    max_tokens = options.output_tokens if output_tokens is None else output_tokens
    duration = options.duration_s if duration_s is None else duration_s
    began = time.perf_counter()

    async def one(index: int, sent: int) -> Sample:
        tag = f"{streams}-{index}-{sent}-{prompt_tokens}"
        request = generate_pb2.GenerateRequest(
            model=MODEL,
            prompt=prompt_for(tag, prompt_tokens),
            request_id=f"bench-{tag}",
            sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        )
        return await worker_request(stub, request)

    client, worker = CpuMeter(), CpuMeter(worker_pid)
    client.start()
    worker.start()
    await closed_loop(level, lambda: time.perf_counter() - began >= duration, one)
    level.cpu_percent["client"] = client.stop()
    level.cpu_percent["worker"] = worker.stop()
    return level


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything measured."""

    options: Options
    levels: dict[str, list[Level]] = field(default_factory=dict)
    probes: dict[str, dict[int, float | None]] = field(default_factory=dict)
    model_published: dict[str, float | None] = field(default_factory=dict)


PROBE_PROMPTS = (128, 2048)
PROBE_REQUESTS = 5


def estimate_level_s(options: Options, streams: int) -> float:
    """Roughly how long a level takes (for the progress bar)."""
    step_ms = 7 + 0.016 * streams + 0.0151 * streams
    request_s = (options.output_tokens * step_ms + 0.0151 * streams * options.prompt_tokens) / 1000
    return options.duration_s + request_s / options.speed_factor


async def probe_engine(options: Options) -> dict[int, float | None]:
    """Median batch-1 time to first token (ms) in-process, per prompt length."""
    probes: dict[int, float | None] = {}
    engine = SimEngine(sim_settings(options))
    await engine.start()
    try:
        for tokens in PROBE_PROMPTS:
            ttfts = []
            for i in range(PROBE_REQUESTS):
                tag = f"probe-{tokens}-{i}"
                request = EngineRequest(
                    request_id=tag, prompt=prompt_for(tag, tokens), sampling=greedy(2)
                )
                ttfts.append((await engine_request(engine, request)).ttft_s)
            probes[tokens] = rounded(percentile(ttfts, 50) * 1000)
    finally:
        await engine.stop()
    return probes


async def probe_worker(
    options: Options, stub: worker_pb2_grpc.WorkerAsyncStub
) -> dict[int, float | None]:
    """Median batch-1 time to first token (ms) through the worker, per prompt length (after
    one request that opens the connection)."""
    probes: dict[int, float | None] = {}
    for tokens in PROBE_PROMPTS:
        ttfts = []
        for i in range(-1 if tokens == PROBE_PROMPTS[0] else 0, PROBE_REQUESTS):
            tag = f"probe-{tokens}-{i}"
            request = generate_pb2.GenerateRequest(
                model=MODEL,
                prompt=prompt_for(tag, tokens),
                request_id=f"bench-{tag}",
                sampling=generate_pb2.SamplingParams(max_tokens=2, temperature=0.0),
            )
            sample = await worker_request(stub, request)
            if i >= 0:
                ttfts.append(sample.ttft_s)
        probes[tokens] = rounded(percentile(ttfts, 50) * 1000)
    return probes


async def run_all(options: Options) -> Run:
    run = Run(options)
    phases = len(options.concurrency) * len(options.parts)
    total = sum(estimate_level_s(options, c) for c in options.concurrency) * len(options.parts)
    total += 3.0 * len(options.parts)  # worker start-up and probes
    done = 0
    async with Progress(total, enabled=options.progress) as progress:
        if "engine" in options.parts:
            progress.phase("engine: batch-1 probes", 1.0)
            run.probes["engine"] = await probe_engine(options)
            run.levels["engine"] = []
            for streams in options.concurrency:
                done += 1
                progress.phase(
                    f"engine in-process, {streams} streams ({done}/{phases})",
                    estimate_level_s(options, streams),
                )
                run.levels["engine"].append(await run_engine_level(options, streams))
            progress.phase(f"sim model, {PUBLISHED_STREAMS} streams", 1.0)
            model = await run_engine_level(
                options,
                PUBLISHED_STREAMS,
                speed_factor=MODEL_ONLY_SPEED,
                duration_s=max(1.0, options.duration_s) / MODEL_ONLY_SPEED,
                model_clock=True,
            )
            model.clock_scale = MODEL_ONLY_SPEED / options.speed_factor
            run.model_published = model.figures(model=True)
        if "worker" in options.parts:
            progress.phase("worker: starting", 2.0)
            with ServiceProcess("worker", worker_args(options)) as worker:
                channel = open_channel(worker.address)
                try:
                    stub: worker_pb2_grpc.WorkerAsyncStub = worker_pb2_grpc.WorkerStub(channel)
                    progress.phase("worker: batch-1 probes", 1.0)
                    run.probes["worker"] = await probe_worker(options, stub)
                    run.levels["worker"] = []
                    for streams in options.concurrency:
                        done += 1
                        progress.phase(
                            f"worker over gRPC, {streams} streams ({done}/{phases})",
                            estimate_level_s(options, streams),
                        )
                        run.levels["worker"].append(
                            await run_worker_level(options, stub, worker.pid, streams)
                        )
                finally:
                    await channel.close(None)
    return run


# -- the report ----------------------------------------------------------------------------------


def level_at(run: Run, part: str, streams: int) -> Level | None:
    return next((lv for lv in run.levels.get(part, []) if lv.streams == streams), None)


def calibration(run: Run) -> list[dict[str, Any]]:
    """Each published figure beside the simulator's model and what was measured."""
    model_engine = SimEngine(sim_settings(run.options))
    ms = 1000

    def measured(streams: int, key: str) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for part in PARTS:
            level = level_at(run, part, streams)
            out[part] = level.figures()[key] if level else None
        return out

    def model_at(streams: int, key: str) -> float | None:
        level = level_at(run, "engine", streams)
        return level.figures(model=True)[key] if level else None

    low = min(run.options.concurrency)
    high = max(run.options.concurrency)
    rows: list[dict[str, Any]] = [
        {
            "figure": "batch-1 TTFT, 128 prompt tokens (ms)",
            "published": PUBLISHED["batch1_ttft_ms_at_128_prompt_tokens"],
            "model": rounded(model_engine.iteration_s(0, 128) * ms),
            **{p: run.probes.get(p, {}).get(128) for p in PARTS},
        },
        {
            "figure": "batch-1 TTFT, 2048 prompt tokens (ms)",
            "published": PUBLISHED["batch1_ttft_ms_at_2048_prompt_tokens"],
            "model": rounded(model_engine.iteration_s(0, 2048) * ms),
            **{p: run.probes.get(p, {}).get(2048) for p in PARTS},
        },
        {
            "figure": f"TPOT p50, {low} stream(s) (ms)",
            "published": PUBLISHED["tpot_ms_small_batch"],
            "model": model_at(low, "tpot_p50_ms"),
            **measured(low, "tpot_p50_ms"),
        },
    ]
    c95 = PUBLISHED["concurrency_95"]
    for key, label in (
        ("ttft_p50_ms", "TTFT p50"),
        ("ttft_p99_ms", "TTFT p99"),
        ("tpot_p50_ms", "TPOT p50"),
    ):
        rows.append(
            {
                "figure": f"{label}, ~{PUBLISHED_STREAMS} streams (ms)",
                "published": c95[key],
                "model": run.model_published.get(key),
            }
        )
    rows += [
        {
            "figure": f"TPOT p50, {high} streams (ms; issue 3's target)",
            "published": PUBLISHED["tpot_ms_near_256_concurrent"],
            "model": model_at(high, "tpot_p50_ms"),
            **measured(high, "tpot_p50_ms"),
        },
        {
            "figure": f"output tokens/s, {high} streams (published: saturated)",
            "published": PUBLISHED["saturated_output_tokens_per_s_128_128"],
            "model": model_at(high, "output_tokens_per_s"),
            **measured(high, "output_tokens_per_s"),
        },
    ]
    return rows


def notes(run: Run) -> list[str]:
    """What limited the measurement, in words."""
    out: list[str] = []
    for level in run.levels.get("engine", []):
        wall = level.figures()["output_tokens_per_s"]
        model = level.figures(model=True)["output_tokens_per_s"]
        if wall and model and wall < 0.9 * model:
            out.append(
                f"engine, {level.streams} streams: {wall:,.0f} tokens/s against the model's "
                f"{model:,.0f}: the host's event loop (timer overshoot, scheduling; "
                f"{fmt(level.cpu_percent.get('bench'), 0)}% of a core) lagged the modelled pace"
            )
    for level in run.levels.get("worker", []):
        for who in ("client", "worker"):
            cpu = level.cpu_percent.get(who)
            if cpu is not None and cpu >= SATURATED_CPU_PERCENT:
                what = (
                    "the Python gRPC client (this process) is the bottleneck: the worker's "
                    "figures at this level are a lower bound"
                    if who == "client"
                    else "the worker's one Python process is the bottleneck at this level"
                )
                out.append(
                    f"worker, {level.streams} streams: {who} used {cpu:.0f}% of a core; {what}"
                )
    worker_levels = run.levels.get("worker", [])
    if worker_levels and not any(
        (cpu or 0) >= SATURATED_CPU_PERCENT
        for lv in worker_levels
        for cpu in lv.cpu_percent.values()
    ):
        client = max(lv.cpu_percent.get("client") or 0 for lv in worker_levels)
        worker = max(lv.cpu_percent.get("worker") or 0 for lv in worker_levels)
        out.append(
            f"worker over gRPC: the client (this process) used at most {client:.0f}% of a core "
            f"and the worker {worker:.0f}%; neither was saturated, so the figures are the "
            "worker's, not the client's"
        )
    o = run.options
    budget = sim_settings(o).max_num_tokens
    burst = max(o.concurrency)
    if burst * o.prompt_tokens > budget:
        out.append(
            f"{burst} streams: the closed loop runs in lockstep (equal requests that started "
            f"together), so each round's {burst * o.prompt_tokens:,} prompt tokens are "
            f"prefilled in iterations of at most {budget:,} tokens; that sets the TTFT "
            "percentiles there, and most prefill falls outside the decode of the others"
        )
    for part, levels in run.levels.items():
        for level in levels:
            if level.errors:
                out.append(
                    f"{part}, {level.streams} streams: {len(level.errors)} failed requests "
                    f"(first: {level.errors[0]})"
                )
    return out


def report(run: Run) -> str:
    o = run.options
    info = machine_info()
    lines = [
        f"llm-mesh sim engine benchmark: {o.prompt_tokens}-token prompts, {o.output_tokens} "
        f"output tokens, closed loop, {o.duration_s:g} s per level, speed factor "
        f"{o.speed_factor:g}",
        f"machine: {info['usable_cpus']} CPUs, {info['python_implementation']} "
        f"{info['python']}, {info['platform']}",
        "",
    ]
    headers = [
        "part",
        "streams",
        "requests",
        "TTFT p50 ms",
        "TTFT p99 ms",
        "TPOT p50 ms",
        "TPOT p99 ms",
        "output tok/s",
        "CPU % of a core",
    ]

    def row(label: str, level: Level, *, model: bool = False) -> list[str]:
        f = level.figures(model=model)
        cpu = "" if model else ", ".join(f"{k} {fmt(v, 0)}" for k, v in level.cpu_percent.items())
        return [
            label,
            str(level.streams),
            str(len(level.samples)),
            fmt(f["ttft_p50_ms"]),
            fmt(f["ttft_p99_ms"]),
            fmt(f["tpot_p50_ms"], 2),
            fmt(f["tpot_p99_ms"], 2),
            fmt(f["output_tokens_per_s"], 0, thousands=True),
            cpu,
        ]

    rows = [
        row(label, level)
        for part, label in (("engine", "engine in-process"), ("worker", "worker over gRPC"))
        for level in run.levels.get(part, [])
    ]
    rows += [
        row("sim model (its clock)", level, model=True) for level in run.levels.get("engine", [])
    ]
    lines.append(format_table(headers, rows))
    lines += ["", f"Calibration: {PUBLISHED['source']}"]
    cal_rows = [
        [
            row["figure"],
            fmt(row["published"], 1, thousands=True),
            fmt(row["model"], 1, thousands=True),
            fmt(row.get("engine"), 1, thousands=True),
            fmt(row.get("worker"), 1, thousands=True),
        ]
        for row in calibration(run)
    ]
    lines.append(format_table(["figure", "published", "sim model", "engine", "worker"], cal_rows))
    lines += [
        "",
        "Published figures: batch-1 TTFT from H100 FP8 LLaMA 7B; ~95 streams from Llama-3.1-8B "
        "BF16 128/128; throughput from Llama-3.1-8B FP8 128/128 at saturation (batches larger "
        "than 256). 'sim model' is the simulator's own clock (no host overhead); 'engine' and "
        "'worker' are wall-clock measurements on this machine.",
    ]
    if o.speed_factor != 1:
        lines.append(
            f"The published figures are for speed factor 1; this run's times are divided by "
            f"{o.speed_factor:g} and its throughput multiplied by it."
        )
    lines += notes_section(notes(run))
    return "\n".join(lines)


def results(run: Run, argv: Sequence[str]) -> dict[str, Any]:
    o = run.options
    settings = dataclasses.asdict(sim_settings(o))
    return {
        **results_header("engine", argv),
        "workload": {
            "prompt_tokens": o.prompt_tokens,
            "output_tokens": o.output_tokens,
            "concurrency": list(o.concurrency),
            "duration_s": o.duration_s,
            "speed_factor": o.speed_factor,
            "sampling": "greedy, a distinct prompt per request (no prefix reuse)",
        },
        "sim_settings": {
            k: (v.total_seconds() * 1000 if isinstance(v, datetime.timedelta) else v)
            for k, v in settings.items()
        },
        "published": PUBLISHED,
        "calibration": calibration(run),
        "batch1_ttft_probe_ms": {
            part: {str(k): v for k, v in probes.items()} for part, probes in run.probes.items()
        },
        "parts": {part: [lv.result() for lv in levels] for part, levels in run.levels.items()},
        "notes": notes(run),
    }


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench engine",
        description="Benchmark the sim engine in-process and a sim worker over gRPC.",
    )
    parser.add_argument("--quick", action="store_true", help="2 s per level (under a minute)")
    parser.add_argument(
        "--concurrency",
        default="1,16,64,256",
        help="comma-separated concurrent streams per level (default: 1,16,64,256)",
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per level (default 10; --quick 2)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length")
    parser.add_argument("--output-tokens", type=int, default=128, help="tokens per answer")
    parser.add_argument(
        "--speed-factor", type=float, default=1.0, help="sim speed factor (1: the H100 timing)"
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help="comma-separated parts to run: engine, worker (default: both)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="results JSON (default: bench/results/engine.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    concurrency = parse_list(parser, "--concurrency", args.concurrency, int, "integers")
    parts = parse_list(parser, "--parts", args.parts, str.strip)
    if not concurrency or min(concurrency) < 1:
        parser.error("--concurrency: give one or more positive integers")
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    if args.prompt_tokens < 1 or args.output_tokens < 1:
        parser.error("--prompt-tokens, --output-tokens: must be >= 1")
    if not args.speed_factor > 0:
        parser.error("--speed-factor: must be > 0")
    duration = args.duration if args.duration is not None else (2.0 if args.quick else 10.0)
    if duration < 0:
        parser.error("--duration: must be >= 0")
    return Options(
        concurrency=concurrency,
        duration_s=duration,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        speed_factor=args.speed_factor,
        parts=parts,
        out=args.out,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str]) -> int:
    options = parse_args(argv)
    run = run_benchmark(run_all(options), argv, report=report, results=results, out=options.out)
    failed = any(level.errors for levels in run.levels.values() for level in levels)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
