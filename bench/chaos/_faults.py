"""The faults: each injects one failure into a running mesh, notes when (in a
:class:`~bench.chaos._measure.Marks`), undoes it and returns; the runner then waits until the
fleet is whole again."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

import grpc.aio

from bench.chaos._load import Outcome, client_channel
from bench.chaos._measure import Marks
from bench.chaos._mesh import Mesh, send, wait_exit
from bench.chaos._options import DEADLINE_S, MODEL, TENANTS, Options
from llmmesh.v1 import generate_pb2, router_pb2_grpc

#: The worker and the router the faults hit.
VICTIM_WORKER = "w1"
VICTIM_ROUTER = "r1"
#: How long to watch a worker leave rotation before giving up (the target is 2 s).
ROTATION_WATCH_S = 10.0
#: Slow-reader clients, and how long each waits between the messages it reads.
SLOW_READERS = 8
SLOW_READ_INTERVAL_S = 0.5

Fault = Callable[[Mesh, Options, Marks], Awaitable[None]]


async def watch_rotation(mesh: Mesh, address: str, marks: Marks, watch_s: float) -> None:
    """Note in ``marks`` how long after the injection no router routes to ``address``."""
    waited = await mesh.wait_out_of_rotation(address, deadline=marks.injected + watch_s)
    if waited is not None:
        marks.out_of_rotation_s = time.monotonic() - marks.injected


async def worker_sigkill(mesh: Mesh, options: Options, marks: Marks) -> None:
    victim = mesh.workers[VICTIM_WORKER]
    marks.injected = time.monotonic()
    send(victim, signal.SIGKILL)
    await watch_rotation(mesh, victim.address, marks, ROTATION_WATCH_S)
    await mesh.replace_worker(VICTIM_WORKER)


async def worker_sigterm(mesh: Mesh, options: Options, marks: Marks) -> None:
    victim = mesh.workers[VICTIM_WORKER]
    marks.injected = time.monotonic()
    send(victim, signal.SIGTERM)
    await watch_rotation(mesh, victim.address, marks, ROTATION_WATCH_S)
    await asyncio.to_thread(wait_exit, [victim])
    await mesh.replace_worker(VICTIM_WORKER)


async def worker_sigstop(mesh: Mesh, options: Options, marks: Marks) -> None:
    victim = mesh.workers[VICTIM_WORKER]
    marks.injected = time.monotonic()
    send(victim, signal.SIGSTOP)
    try:
        await asyncio.gather(
            asyncio.sleep(options.fault_s),
            watch_rotation(mesh, victim.address, marks, options.fault_s),
        )
    finally:
        send(victim, signal.SIGCONT)


async def cache_sigkill(mesh: Mesh, options: Options, marks: Marks) -> None:
    assert mesh.cache is not None
    marks.injected = time.monotonic()
    send(mesh.cache, signal.SIGKILL)
    await mesh.restart_cache()


async def cache_sigstop(mesh: Mesh, options: Options, marks: Marks) -> None:
    assert mesh.cache is not None
    cache = mesh.cache
    marks.injected = time.monotonic()
    send(cache, signal.SIGSTOP)
    try:
        await asyncio.sleep(options.fault_s)
    finally:
        send(cache, signal.SIGCONT)


async def redis_stop(mesh: Mesh, options: Options, marks: Marks) -> None:
    marks.injected = time.monotonic()
    await asyncio.to_thread(mesh.redis.stop)
    await asyncio.sleep(options.fault_s)
    await asyncio.to_thread(mesh.redis.start)


async def router_sigkill(mesh: Mesh, options: Options, marks: Marks) -> None:
    victim = mesh.routers[VICTIM_ROUTER]
    marks.injected = time.monotonic()
    send(victim, signal.SIGKILL)
    await asyncio.to_thread(wait_exit, [victim])
    marks.router_died = time.monotonic()
    await mesh.restart_router(VICTIM_ROUTER)


async def consul_down(mesh: Mesh, options: Options, marks: Marks) -> None:
    agent = mesh.consul.agent
    marks.injected = time.monotonic()
    await asyncio.to_thread(mesh.consul.call, agent.go_down())
    await asyncio.sleep(options.consul_down_s)
    await asyncio.to_thread(mesh.consul.call, agent.come_back())


async def consul_restart(mesh: Mesh, options: Options, marks: Marks) -> None:
    agent = mesh.consul.agent
    marks.injected = time.monotonic()
    await asyncio.to_thread(mesh.consul.call, agent.restart(forget=True))


async def slow_readers(mesh: Mesh, options: Options, marks: Marks) -> None:
    """``SLOW_READERS`` clients stream long answers through the routers and read one message
    every ``SLOW_READ_INTERVAL_S`` for the fault's length, then hang up (a cancel, not a
    failure); each starts a new stream when one ends."""
    marks.injected = time.monotonic()
    end = marks.injected + options.fault_s
    channel = client_channel(mesh.router_addresses)
    stub = router_pb2_grpc.RouterStub(channel)
    streams: list[Outcome] = []

    async def read_slowly(i: int) -> None:
        while time.monotonic() < end:
            request = generate_pb2.GenerateRequest(
                model=MODEL,
                prompt=f"Read me slowly, {i} {time.monotonic_ns()}.",
                sampling=generate_pb2.SamplingParams(max_tokens=1024, temperature=0.7),
            )
            tenant = TENANTS[i % len(TENANTS)]
            outcome = Outcome(started=time.monotonic(), stream=True, cacheable=False, tenant=tenant)
            streams.append(outcome)
            call = stub.GenerateStream(
                request,
                timeout=options.fault_s + DEADLINE_S,
                metadata=(("x-llmmesh-tenant", tenant),),
            )
            try:
                async for _ in call:
                    outcome.first_token = outcome.first_token or time.monotonic()
                    if time.monotonic() >= end:
                        call.cancel()
                        break
                    await asyncio.sleep(SLOW_READ_INTERVAL_S)
            except grpc.aio.AioRpcError as exc:
                outcome.code, outcome.detail = exc.code().name, exc.details() or ""
            outcome.ended = time.monotonic()

    try:
        await asyncio.gather(*(read_slowly(i) for i in range(SLOW_READERS)))
    finally:
        await channel.close(None)
        failed = [o for o in streams if not o.ok]
        marks.extra["slow_reader_streams"] = len(streams)
        marks.extra["slow_reader_failed"] = len(failed)
        marks.extra["slow_reader_failure_examples"] = sorted(
            {f"{o.code}: {o.detail}"[:200] for o in failed}
        )[:3]


async def rolling_restart(mesh: Mesh, options: Options, marks: Marks) -> None:
    marks.injected = time.monotonic()
    for worker_id in list(mesh.workers):
        victim = mesh.workers[worker_id]
        send(victim, signal.SIGTERM)
        await asyncio.to_thread(wait_exit, [victim])
        await mesh.replace_worker(worker_id)
        if await mesh.wait_whole(deadline=time.monotonic() + options.recover_timeout_s) is None:
            raise RuntimeError(f"the fleet was not whole again after restarting {worker_id}")


INJECT: dict[str, Fault] = {
    "worker-sigkill": worker_sigkill,
    "worker-sigterm": worker_sigterm,
    "worker-sigstop": worker_sigstop,
    "cache-sigkill": cache_sigkill,
    "cache-sigstop": cache_sigstop,
    "redis-stop": redis_stop,
    "router-sigkill": router_sigkill,
    "consul-down": consul_down,
    "consul-restart": consul_restart,
    "slow-readers": slow_readers,
    "rolling-restart": rolling_restart,
}
