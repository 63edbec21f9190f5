"""A router in front of exactly one in-process worker that runs a given engine: for the tests of
how an engine's failures reach a caller through the whole mesh (tests/test_trtllm_engine.py,
tests/test_triton_engine.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import prometheus_client

from llmmesh.server import ServiceRunner
from llmmesh.v1 import generate_pb2, router_pb2
from router._pool import Worker
from tests.test_router import Router, running_router
from worker import WorkerApp, WorkerConfig
from worker.engines import Engine

WORKER_ID = "w-engine"


@dataclass
class OneWorkerMesh:
    """The router, and the worker behind it."""

    router: Router
    worker: WorkerApp
    address: str

    def pooled(self) -> Worker:
        """The router's row of the one worker."""
        [worker] = self.router.app.pool.workers()
        return worker

    async def generate(
        self, model: str, prompt: str, *, streaming: bool, max_tokens: int = 5
    ) -> str:
        request = generate_pb2.GenerateRequest(
            model=model,
            prompt=prompt,
            sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
            cache_policy=generate_pb2.CACHE_POLICY_BYPASS,
        )
        stub = self.router.stub
        if streaming:
            return "".join([c.text async for c in stub.GenerateStream(request, timeout=10)])
        return (await stub.Generate(request, timeout=10)).text

    async def state(self) -> int:
        [status] = (await self.router.stub.ListWorkers(router_pb2.ListWorkersRequest())).workers
        return status.state


def failure_counts() -> tuple[float, float]:
    """Router ejections and retries so far (every worker, every reason)."""

    def total(name: str) -> float:
        return sum(
            sample.value
            for metric in prometheus_client.REGISTRY.collect()
            for sample in metric.samples
            if sample.name == name
        )

    return total("llmmesh_router_ejections_total"), total("llmmesh_router_retries_total")


@contextlib.asynccontextmanager
async def one_worker_mesh(engine: Engine) -> AsyncIterator[OneWorkerMesh]:
    """A worker serving ``engine`` on 127.0.0.1 and a router whose only worker it is."""
    config = WorkerConfig(port=0, metrics_port=-1, worker_id=WORKER_ID, grace=timedelta(seconds=2))
    app = WorkerApp(config, engine=engine)
    runner = ServiceRunner(app, config, name="worker")
    async with runner, running_router([runner.address]) as router:
        yield OneWorkerMesh(router, app, runner.address)


__all__ = ["WORKER_ID", "OneWorkerMesh", "failure_counts", "one_worker_mesh"]
