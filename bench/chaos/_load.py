"""Open-loop load through both routers: requests start at Poisson arrivals whatever happens to
the ones before, on one ``grpc.aio`` channel given both routers' addresses with gRPC's
client-side ``round_robin``, as a production client would. Mixed unary and streaming, cacheable
(greedy, one of a few prompts) and not (sampled, a unique prompt), from several tenants. Bounded
in requests and in time: it stops by itself."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from bench.chaos._options import CACHEABLE_PROMPTS, DEADLINE_S, MODEL, TENANTS, Options
from llmmesh.server import grpc_channel_options
from llmmesh.v1 import generate_pb2, router_pb2_grpc


@dataclass
class Outcome:
    """One request: when it started (``time.monotonic()``), when its first token came (None if
    none did), when it ended, and how (``code`` is ``OK`` or the gRPC status's name)."""

    started: float
    stream: bool
    cacheable: bool
    tenant: str
    first_token: float | None = None
    ended: float | None = None
    code: str = "OK"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.code == "OK"

    @property
    def ttft_ms(self) -> float | None:
        if self.first_token is None:
            return None
        return (self.first_token - self.started) * 1000


@dataclass
class Load:
    """What the load generator saw."""

    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0


def client_channel(addresses: Sequence[str]) -> grpc.aio.Channel:
    """One channel to every router, balanced per call by gRPC's ``round_robin``."""
    target = "ipv4:" + ",".join(addresses)
    options = [*grpc_channel_options(), ("grpc.lb_policy_name", "round_robin")]
    return grpc.aio.insecure_channel(target, options=options)


def make_request(
    rng: random.Random, options: Options
) -> tuple[generate_pb2.GenerateRequest, bool, bool, str]:
    """A request of the mix: the request, whether it streams, whether it is cacheable, its
    tenant."""
    stream = rng.random() < options.stream_fraction
    cacheable = rng.random() < options.cacheable_fraction
    tenant = rng.choice(TENANTS)
    if cacheable:
        prompt = f"Explain chaos engineering, part {rng.randrange(CACHEABLE_PROMPTS)}."
        sampling = generate_pb2.SamplingParams(max_tokens=options.max_tokens, temperature=0.0)
    else:
        prompt = f"Tell me something new, {rng.getrandbits(64):x}."
        sampling = generate_pb2.SamplingParams(max_tokens=options.max_tokens, temperature=0.7)
    request = generate_pb2.GenerateRequest(model=MODEL, prompt=prompt, sampling=sampling)
    return request, stream, cacheable, tenant


async def send_one(
    stub: router_pb2_grpc.RouterAsyncStub,
    request: generate_pb2.GenerateRequest,
    outcome: Outcome,
) -> None:
    """Send ``request`` and fill in ``outcome``. A unary answer's first token is its response;
    a stream's is its first chunk with text."""
    metadata = (("x-llmmesh-tenant", outcome.tenant),)
    try:
        if outcome.stream:
            call = stub.GenerateStream(request, timeout=DEADLINE_S, metadata=metadata)
            async for chunk in call:
                if outcome.first_token is None and (chunk.text or chunk.HasField("summary")):
                    outcome.first_token = time.monotonic()
        else:
            await stub.Generate(request, timeout=DEADLINE_S, metadata=metadata)
            outcome.first_token = time.monotonic()
    except grpc.aio.AioRpcError as exc:
        outcome.code = exc.code().name
        outcome.detail = exc.details() or ""
    except Exception as exc:  # anything else is a failure too, never a crash of the load
        outcome.code = type(exc).__name__
        outcome.detail = str(exc)
    outcome.ended = time.monotonic()


async def run_load(
    addresses: Sequence[str], options: Options, stop: asyncio.Event, *, seed: int, max_s: float
) -> Load:
    """Start requests at ``options.rate`` a second until ``stop`` is set, ``max_s`` have passed
    or ``options.max_requests`` have started; then wait for those in flight (each has a
    deadline)."""
    rng = random.Random(seed)
    load = Load(started=time.monotonic())
    channel = client_channel(addresses)
    stub = router_pb2_grpc.RouterStub(channel)
    tasks: list[asyncio.Task[None]] = []
    try:
        next_at = load.started
        while not stop.is_set() and len(tasks) < options.max_requests:
            now = time.monotonic()
            if now - load.started > max_s:
                break
            if next_at > now:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), next_at - now)
                continue
            request, stream, cacheable, tenant = make_request(rng, options)
            outcome = Outcome(started=now, stream=stream, cacheable=cacheable, tenant=tenant)
            load.outcomes.append(outcome)
            tasks.append(asyncio.create_task(send_one(stub, request, outcome)))
            next_at += rng.expovariate(options.rate)
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await channel.close(None)
    load.ended = time.monotonic()
    return load
