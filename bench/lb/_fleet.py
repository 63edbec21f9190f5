"""The fleet: the sim worker processes every run shares, the routers' arguments, and the oracle
that dispatches to the workers directly."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Sequence

import grpc.aio

from bench._common import (
    ServiceProcess,
    close_services,
    open_channel,
    start_services,
    wait_until,
)
from bench.lb._options import ANSWER_TOKENS, MODEL, Options
from llmmesh.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc


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
        self.channels = [open_channel(a) for a in self.addresses]
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

        async def busy() -> str | None:
            reports = [await self.load(c) for c in self.channels]
            busy = [r for r in reports if r.active_requests or r.queued_requests]
            if not busy:
                return None
            return "workers still busy after the run: " + ", ".join(
                f"{r.worker_id} {r.active_requests}+{r.queued_requests}" for r in busy
            )

        await wait_until(busy, deadline=time.monotonic() + timeout_s, interval_s=0.1)

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

    async def unhealthy(stub: router_pb2_grpc.RouterAsyncStub) -> str | None:
        table = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
        healthy = [w for w in table.workers if w.state == router_pb2.WORKER_STATE_HEALTHY]
        if len(healthy) >= workers:
            return None
        return f"router does not see {workers} healthy workers:\n{table}"

    deadline = time.monotonic() + 20
    for channel in channels:
        stub = router_pb2_grpc.RouterStub(channel)
        await wait_until(functools.partial(unhealthy, stub), deadline=deadline)


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
