"""The mesh under test (Redis or not, the cache service, one sim worker, the router and the bare
proxy, each a real process) and the requests sent through it."""

from __future__ import annotations

import asyncio
import time

import grpc.aio

from bench._common import (
    ServiceProcess,
    close_services,
    open_channel,
    process_cpu_s,
    ready_info,
    scrape_metrics,
    start_services,
    wait_until,
)
from bench.hotpath._options import (
    ANSWER_TOKENS,
    ENTRY,
    KV_BLOCKS,
    MODEL,
    PROMPT,
    ROUTER_SERVICE,
    SIM_SPEED_FACTOR,
    WORKER_CAPACITY,
    WORKER_SERVICE,
    Options,
)
from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc
from tests.harness import RedisServer


class Mesh:
    """Redis (or not), the cache service, one sim worker, the router and the bare proxy."""

    def __init__(self, options: Options) -> None:
        self.options = options
        use_redis = options.store == "redis" or (
            options.store == "auto" and RedisServer.available()
        )
        self.redis = RedisServer(maxmemory="256mb") if use_redis else None
        self.store = "redis" if use_redis else "memory"
        level = ["--log-level", options.log_level, "--grace", "2s", "--metrics-port", "0"]
        self.worker = ServiceProcess(
            "worker",
            [
                "--engine", "sim",
                "--model", MODEL,
                "--worker-id", "hotpath-w0",
                "--capacity", str(WORKER_CAPACITY),
                "--max-queued", str(WORKER_CAPACITY),
                "--sim-speed-factor", repr(SIM_SPEED_FACTOR),
                "--sim-kv-blocks", str(KV_BLOCKS),
                "--sim-min-answer-tokens", str(ANSWER_TOKENS),
                "--sim-max-answer-tokens", str(ANSWER_TOKENS),
                "--max-tokens-limit", str(ANSWER_TOKENS),
                "--stream-interval", str(options.stream_interval),
                *level,
            ],
        )  # fmt: skip
        self.cache: ServiceProcess | None = None
        self.router: ServiceProcess | None = None
        self.proxy: ServiceProcess | None = None
        self.channels: dict[str, grpc.aio.Channel] = {}

    @property
    def services(self) -> list[ServiceProcess]:
        return [s for s in (self.router, self.proxy, self.cache, self.worker) if s is not None]

    async def start(self) -> None:
        level = ["--log-level", self.options.log_level, "--grace", "2s"]
        try:
            if self.redis is not None:
                await asyncio.to_thread(self.redis.start)
                store = ["--store", "redis", "--redis-url", self.redis.url]
            else:
                store = ["--store", "memory"]
            self.cache = ServiceProcess("cache_service", [*store, *level, "--metrics-port", "0"])
            await asyncio.to_thread(start_services, [self.cache, self.worker])
            self.router = ServiceProcess(
                "router",
                [
                    "--workers", self.worker.address,
                    "--cache-address", self.cache.address,
                    "--max-tokens-limit", str(ANSWER_TOKENS),
                    "--metrics-port", "0",
                    *level,
                ],
            )  # fmt: skip
            self.proxy = ServiceProcess(
                "bench.hotpath",
                ["--serve-proxy", self.worker.address, "--log-level", self.options.log_level],
            )
            await asyncio.to_thread(start_services, [self.router, self.proxy])
            self.channels = {role: open_channel(s.address) for role, s in self.entries().items()}
            await self.wait_router_sees_worker()
        except BaseException:
            await self.close()
            raise

    def entries(self) -> dict[str, ServiceProcess]:
        assert self.router is not None
        assert self.proxy is not None
        return {"router": self.router, "proxy": self.proxy, "worker": self.worker}

    async def wait_router_sees_worker(self) -> None:
        stub = router_pb2_grpc.RouterStub(self.channels["router"])

        async def unhealthy() -> str | None:
            table = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
            if any(w.state == router_pb2.WORKER_STATE_HEALTHY for w in table.workers):
                return None
            return f"the router does not see its worker as healthy:\n{table}"

        await wait_until(unhealthy, deadline=time.monotonic() + 20)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close(None)
        await asyncio.to_thread(close_services, self.services)
        if self.redis is not None:
            await asyncio.to_thread(self.redis.close)

    def pids(self) -> dict[str, int]:
        pids = {"worker": self.worker.pid}
        for role, service in (("router", self.router), ("proxy", self.proxy)):
            if service is not None:
                pids[role] = service.pid
        if self.cache is not None:
            pids["cache"] = self.cache.pid
        if self.redis is not None:
            pids["redis"] = self.redis.pid
        return pids

    def cpu_s(self) -> dict[str, float | None]:
        return {role: process_cpu_s(pid) for role, pid in self.pids().items()}

    async def counters(self) -> dict[str, dict[str, float]]:
        """The Prometheus samples of the worker, the router and the cache service."""
        services = {"worker": self.worker, "router": self.router, "cache": self.cache}
        out: dict[str, dict[str, float]] = {}
        for role, service in services.items():
            assert service is not None
            port = int(ready_info(service)["metrics_port"])
            out[role] = await asyncio.to_thread(scrape_metrics, port)
        return out

    def address(self, role: str) -> str:
        return self.entries()[role].address


def generate_request(
    max_tokens: int,
    *,
    cache_policy: generate_pb2.CachePolicy.ValueType = generate_pb2.CACHE_POLICY_BYPASS,
    prompt: str = PROMPT,
) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model=MODEL,
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        cache_policy=cache_policy,
    )


def unary_request(path: str, options: Options) -> generate_pb2.GenerateRequest:
    """The request each h2load run of ``path`` sends (the same bytes every time)."""
    if path == "cache_hit":
        return generate_request(
            options.unary_tokens, cache_policy=generate_pb2.CACHE_POLICY_UNSPECIFIED
        )
    return generate_request(options.unary_tokens)


def url_path(path: str, method: str) -> str:
    return (WORKER_SERVICE if ENTRY[path] == "worker" else ROUTER_SERVICE) + method


async def prime_cache(mesh: Mesh, options: Options) -> None:
    """Store the cache_hit request's answer and wait until the router answers it from cache."""
    stub = router_pb2_grpc.RouterStub(mesh.channels["router"])
    request = unary_request("cache_hit", options)

    async def not_cached() -> str | None:
        response = await stub.Generate(request, timeout=5)
        if response.summary.cached:
            return None
        return "the router never answered the primed request from the cache"

    await wait_until(not_cached, deadline=time.monotonic() + 10)
