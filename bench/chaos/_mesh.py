"""The mesh under test, every part a real process on 127.0.0.1: ``redis-server``, the cache
service on it, the Consul agent double (``tests/consul_agent/``) in a thread, four ``sim``
workers and two routers that find them through Consul; and what the faults do to it."""

from __future__ import annotations

import asyncio
import os
import signal
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
from bench.chaos._options import MODEL, ROUTERS, WORKERS
from llmmesh.v1 import router_pb2, router_pb2_grpc
from tests.consul_agent import ThreadedConsulAgent
from tests.harness import RedisServer

HEALTHY = router_pb2.WORKER_STATE_HEALTHY
LOG = ["--log-level", "warning", "--grace", "2s", "--metrics-port", "-1"]


class Mesh:
    """Redis, the cache service, Consul, the workers ``w0``.. and the routers ``r0``.."""

    def __init__(self) -> None:
        self.redis = RedisServer(maxmemory="128mb")
        self.consul = ThreadedConsulAgent(reap_interval=0.2, min_deregister_after=1.0)
        self.cache: ServiceProcess | None = None
        self.workers: dict[str, ServiceProcess] = {}
        self.routers: dict[str, ServiceProcess] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: Every process made, so that close() stops one being started when it is called too.
        self._made: list[ServiceProcess] = []
        self._started = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("Mesh already started")
        self._started = True
        try:
            await asyncio.to_thread(self.redis.start)
            await asyncio.to_thread(self.consul.start)
            self.cache = self.cache_process()
            workers = {f"w{i}": self.worker_process(f"w{i}") for i in range(WORKERS)}
            await asyncio.to_thread(start_services, [self.cache, *workers.values()])
            self.workers = workers
            routers = {f"r{i}": self.router_process() for i in range(ROUTERS)}
            await asyncio.to_thread(start_services, list(routers.values()))
            self.routers = routers
            await wait_until(self.missing, deadline=time.monotonic() + 30)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop everything (idempotent): channels, every process (a stopped one is continued
        first), Consul, Redis."""
        for channel in self._channels.values():
            await channel.close(None)
        self._channels.clear()
        services = list(reversed(self._made))
        for service in services:
            resume(service)
        await asyncio.to_thread(close_services, services)
        if self.redis.proc is not None and self.redis.proc.poll() is None:
            os.kill(self.redis.pid, signal.SIGCONT)
        await asyncio.to_thread(self.redis.close)
        await asyncio.to_thread(self.consul.stop)

    # -- processes ---------------------------------------------------------------------------

    def made(self, service: ServiceProcess) -> ServiceProcess:
        """``service``, noted for :meth:`close`."""
        self._made.append(service)
        return service

    def cache_process(self, port: int = 0) -> ServiceProcess:
        return self.made(
            ServiceProcess(
                "cache_service",
                ["--store", "redis", "--redis-url", self.redis.url, *LOG, "--port", str(port)],
            )
        )

    def worker_process(self, worker_id: str) -> ServiceProcess:
        args = [
            "--engine", "sim",
            "--model", MODEL,
            "--worker-id", worker_id,
            "--discovery", "consul",
            "--consul-addr", self.consul.address,
            "--consul-check-ttl", "1s",
            "--consul-deregister-after", "1s",
            *LOG,
        ]  # fmt: skip
        return self.made(ServiceProcess("worker", args))

    def router_process(self, port: int = 0) -> ServiceProcess:
        assert self.cache is not None
        args = [
            "--discovery", "consul",
            "--consul-addr", self.consul.address,
            "--consul-watch-wait", "2s",
            "--consul-retry-max", "200ms",
            "--cache-address", self.cache.address,
            *LOG,
            "--port", str(port),
        ]  # fmt: skip
        return self.made(ServiceProcess("router", args))

    async def replace_worker(self, worker_id: str) -> None:
        """Start a new worker ``worker_id`` in place of the one there (already stopped)."""
        old = self.workers[worker_id]
        await asyncio.to_thread(old.close)
        new = self.worker_process(worker_id)
        await asyncio.to_thread(start_services, [new])
        self.workers[worker_id] = new

    async def restart_cache(self) -> None:
        """Start the cache service again on its port (the old one is already dead)."""
        assert self.cache is not None
        old = self.cache
        await asyncio.to_thread(old.close)
        new = self.cache_process(old.port)
        await asyncio.to_thread(start_services, [new])
        self.cache = new

    async def restart_router(self, router_id: str) -> None:
        """Start router ``router_id`` again on its port (the old one is already dead)."""
        old = self.routers[router_id]
        await asyncio.to_thread(old.close)
        channel = self._channels.pop(router_id, None)
        if channel is not None:
            await channel.close(None)
        new = self.router_process(old.port)
        await asyncio.to_thread(start_services, [new])
        self.routers[router_id] = new

    # -- what the clients and the checks see -------------------------------------------------

    @property
    def router_addresses(self) -> list[str]:
        return [r.address for r in self.routers.values()]

    def stub(self, router_id: str) -> router_pb2_grpc.RouterAsyncStub:
        if router_id not in self._channels:
            self._channels[router_id] = open_channel(self.routers[router_id].address)
        return router_pb2_grpc.RouterStub(self._channels[router_id])

    async def healthy(self, router_id: str) -> set[str]:
        """Addresses of the workers router ``router_id`` routes to now (empty if it does not
        answer)."""
        try:
            table = await self.stub(router_id).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=1
            )
        except grpc.aio.AioRpcError:
            return set()
        return {w.address for w in table.workers if w.state == HEALTHY}

    async def missing(self) -> str | None:
        """What keeps the fleet from being whole (every worker healthy in every router's
        table), or None."""
        expected = {w.address for w in self.workers.values()}
        for router_id in self.routers:
            seen = await self.healthy(router_id)
            if seen != expected:
                return f"{router_id} routes to {sorted(seen)}, not {sorted(expected)}"
        return None

    async def wait_whole(self, *, deadline: float, settle_s: float = 0.0) -> float | None:
        """Wait until the fleet is whole and has stayed whole for ``settle_s`` (a fault's effect
        on the routers' tables may come a moment after it is undone); the time from the call to
        the start of that whole stretch, or None when there was none by ``deadline``."""
        started = time.monotonic()
        whole_since: float | None = None
        while True:
            now = time.monotonic()
            if await self.missing() is None:
                whole_since = now if whole_since is None else whole_since
                if now - whole_since >= settle_s:
                    return whole_since - started
            else:
                whole_since = None
                if now > deadline:
                    return None
            await asyncio.sleep(0.05)

    async def wait_out_of_rotation(self, address: str, *, deadline: float) -> float | None:
        """Wait until no router routes to ``address``; the time that took, or None."""
        started = time.monotonic()
        while True:
            seen = await asyncio.gather(*(self.healthy(r) for r in self.routers))
            if not any(address in s for s in seen):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                return None
            await asyncio.sleep(0.02)


def send(service: ServiceProcess, sig: signal.Signals) -> None:
    """Send ``sig`` to ``service`` if it is running."""
    if service.proc is not None and service.proc.poll() is None:
        service.proc.send_signal(sig)


def resume(service: ServiceProcess) -> None:
    """SIGCONT, so that a stopped process can be stopped for good."""
    send(service, signal.SIGCONT)


def wait_exit(services: Sequence[ServiceProcess], timeout_s: float = 15.0) -> None:
    """Wait until each of ``services`` has exited."""
    for service in services:
        if service.proc is not None:
            service.proc.wait(timeout_s)
