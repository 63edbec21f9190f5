"""The workload: one trace of Poisson arrivals and heavy-tailed lengths, the requests it becomes,
and the fleet's capacity according to the sim's timing model."""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass

from bench.lb._options import (
    MODEL,
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    SIM_PREFILL_PER_TOKEN_S,
    SIM_TOKEN_DELAY_PER_REQUEST_S,
    SIM_TOKEN_DELAY_S,
    Options,
)
from llmmesh.v1 import generate_pb2


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
