"""A mesh whose router knows its workers only through Consul: the router and the workers run as
real processes (``python -m router`` / ``python -m worker`` with ``--discovery consul``), the
Consul agent double (tests/consul_agent/) runs in the test's event loop on 127.0.0.1.

The scenarios of issue 4: a new worker gets traffic within a second of registering; a SIGKILLed
worker leaves after its TTL; the router keeps serving through a Consul outage and converges when
Consul is back; two models are routed apart; a drained worker gets no new requests and finishes
the ones it has.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc
from tests.consul_agent import ConsulAgent
from tests.harness import ROOT, ServiceProcess, assert_eventually
from tests.test_local_mesh import Mesh as LocalMesh

# py-consul 1.8.0's aio client builds its aiohttp connector with the deprecated ssl_context.
pytestmark = [
    pytest.mark.slow,  # the file takes about 15 s
    pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning"),
]

MODEL = "sim-llama-3.1-8b"
HEALTHY = router_pb2.WORKER_STATE_HEALTHY
# A worker's TTL check: it turns critical 1 s after the worker stops refreshing it.
WORKER_ARGS = [
    "--engine", "sim",
    "--metrics-port", "-1",
    "--discovery", "consul",
    "--consul-check-ttl", "1s",
    "--consul-deregister-after", "1s",
]  # fmt: skip


class Agent(Protocol):
    """What the scenarios need of a Consul agent: the double, or a real one
    (tests/test_consul_real.py)."""

    @property
    def address(self) -> str: ...

    def services(self) -> dict[str, dict[str, Any]]: ...

    def checks(self) -> dict[str, dict[str, Any]]: ...

    async def go_down(self) -> None: ...

    async def come_back(self) -> None: ...


class ConsulMesh:
    """A Consul agent, a router that watches it, and workers that register with it."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.workers: dict[str, ServiceProcess] = {}
        self.router: ServiceProcess | None = None
        self._channel: grpc.aio.Channel | None = None

    async def start_router(self) -> None:
        self.router = ServiceProcess(
            "router",
            [
                "--discovery", "consul",
                "--consul-addr", self.agent.address,
                "--cache-address", "",
                "--metrics-port", "0",
                # Short enough that a blocking query cut by an outage is noticed soon.
                "--consul-watch-wait", "2s",
                "--consul-retry-max", "200ms",
            ],
        )  # fmt: skip
        # In a thread: the agent answers from this event loop while the router starts.
        await asyncio.to_thread(self.router.start)
        self._channel = grpc.aio.insecure_channel(self.router.address)

    async def start_worker(
        self, worker_id: str, *, model: str = MODEL, args: Sequence[str] = ()
    ) -> ServiceProcess:
        worker = ServiceProcess(
            "worker",
            [
                *WORKER_ARGS,
                "--consul-addr", self.agent.address,
                "--worker-id", worker_id,
                "--model", model,
                *args,
            ],
        )  # fmt: skip
        self.workers[worker_id] = worker
        await asyncio.to_thread(worker.start)
        return worker

    @property
    def stub(self) -> router_pb2_grpc.RouterAsyncStub:
        assert self._channel is not None
        return router_pb2_grpc.RouterStub(self._channel)

    async def table(self) -> router_pb2.ListWorkersResponse:
        return await self.stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)

    async def routed(self) -> set[str]:
        """Ids of the workers the router would send a request to now."""
        return {w.worker_id for w in (await self.table()).workers if w.state == HEALTHY}

    async def listed(self) -> set[str]:
        """Ids (addresses for those not yet answering) of every worker in the router's table."""
        return {w.worker_id or w.address for w in (await self.table()).workers}

    async def wait_routed(self, *worker_ids: str, timeout: float = 5.0) -> None:
        async def exactly() -> bool:
            return await self.routed() == set(worker_ids)

        await assert_eventually(
            exactly, timeout=timeout, message=f"the router never routed to exactly {worker_ids}"
        )

    async def ask(
        self, model: str = MODEL, *, max_tokens: int = 4
    ) -> generate_pb2.GenerateResponse:
        """One unary request, by a client that never retries (the router fails over)."""
        request = generate_pb2.GenerateRequest(
            model=model,
            prompt=f"question {time.monotonic_ns()}",
            sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.7),
        )
        return await self.stub.Generate(request, timeout=10)

    async def served_by(self, worker_id: str) -> bool:
        return (await self.ask()).summary.worker_id == worker_id

    async def router_metric(self, name: str) -> float | None:
        """The first sample of metric ``name`` the router exports (None if there is none)."""
        assert self.router is not None
        url = f"http://127.0.0.1:{self.router.metrics_port}/metrics"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def fetch() -> str:
            with opener.open(url, timeout=5) as reply:
                return str(reply.read().decode())

        for line in (await asyncio.to_thread(fetch)).splitlines():
            if line.startswith((name + "{", name + " ")):
                return float(line.rsplit(" ", 1)[1])
        return None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
        # Together and in threads: workers deregister from the agent while they stop.
        procs = [p for p in (self.router, *self.workers.values()) if p is not None]
        await asyncio.gather(*(asyncio.to_thread(p.close) for p in procs))


@pytest.fixture
async def mesh() -> AsyncIterator[ConsulMesh]:
    async with ConsulAgent(reap_interval=0.2, min_deregister_after=1.0) as agent:
        consul_mesh = ConsulMesh(agent)
        try:
            yield consul_mesh
        finally:
            await consul_mesh.close()


def passing(agent: Agent, service_id: str) -> bool:
    """Whether the agent has ``service_id`` with every check of it passing."""
    if service_id not in agent.services():
        return False
    checks = [c for c in agent.checks().values() if c.get("ServiceID") == service_id]
    return bool(checks) and all(c.get("Status") == "passing" for c in checks)


# -- the scenarios (tests/test_consul_real.py runs them against a real agent too) ----------


async def scenario_new_worker_gets_traffic_within_a_second(mesh: ConsulMesh) -> None:
    await mesh.start_worker("w1")
    await mesh.start_router()
    await mesh.wait_routed("w1")
    assert (await mesh.ask()).summary.worker_id == "w1"

    starting = asyncio.create_task(mesh.start_worker("w2"))
    await assert_eventually(lambda: passing(mesh.agent, "w2"), timeout=20)
    registered = time.monotonic()
    await assert_eventually(
        lambda: mesh.served_by("w2"), timeout=1.0, message="w2 got no traffic within 1 s"
    )
    assert time.monotonic() - registered < 1.0
    await starting


async def scenario_sigkilled_worker_leaves_after_its_ttl(mesh: ConsulMesh) -> None:
    """No request fails (the router retries one whose worker died before answering on the
    survivor); once the worker's TTL has run out and a query returned, it is out of the table
    and every request goes to the survivor."""
    await asyncio.gather(mesh.start_worker("w1"), mesh.start_worker("w2"))
    await mesh.start_router()
    await mesh.wait_routed("w1", "w2")

    failures: list[str] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                await mesh.ask()
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    clients = [asyncio.create_task(client()) for _ in range(2)]
    try:
        await asyncio.to_thread(mesh.workers["w2"].kill)
        killed = time.monotonic()
        await assert_eventually(lambda: not passing(mesh.agent, "w2"), timeout=3)

        async def w2_gone() -> bool:
            return "w2" not in await mesh.listed() and not any(
                w.address == mesh.workers["w2"].address for w in (await mesh.table()).workers
            )

        await assert_eventually(w2_gone, timeout=3, message="w2 still in the table")
        # TTL (1 s) + the agent noticing + a query returning.
        assert time.monotonic() - killed < 3.0
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert failures == []
    answers = await asyncio.gather(*(mesh.ask() for _ in range(10)))
    assert {a.summary.worker_id for a in answers} == {"w1"}


async def scenario_router_keeps_serving_while_consul_is_down(mesh: ConsulMesh) -> None:
    await mesh.start_worker("w1")
    await mesh.start_router()
    await mesh.wait_routed("w1")
    assert await mesh.router_metric("llmmesh_router_discovery_up") == 1.0

    await mesh.agent.go_down()

    async def discovery_unhealthy() -> bool:
        status = (await mesh.table()).discovery
        return not status.healthy and status.consecutive_failures >= 2

    await assert_eventually(discovery_unhealthy, timeout=6)
    status = (await mesh.table()).discovery
    assert status.source == "consul"
    assert mesh.agent.address in status.target
    assert "cannot connect" in status.last_error
    assert status.seconds_since_last_success > 0
    assert status.endpoints == 1
    assert await mesh.router_metric("llmmesh_router_discovery_up") == 0.0
    assert ((await mesh.router_metric("llmmesh_router_discovery_errors_total")) or 0) >= 2

    answers = await asyncio.gather(*(mesh.ask() for _ in range(5)))
    assert {a.summary.worker_id for a in answers} == {"w1"}
    assert await mesh.routed() == {"w1"}
    async with grpc.aio.insecure_channel(mesh.router.address if mesh.router else "") as ch:
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    await mesh.agent.come_back()

    async def discovery_healthy() -> bool:
        return (await mesh.table()).discovery.healthy

    await assert_eventually(discovery_healthy, timeout=5)
    assert await mesh.router_metric("llmmesh_router_discovery_up") == 1.0
    records = mesh.router.log_records() if mesh.router else []
    events = [r["event"] for r in records]
    assert sum(e.startswith("consul unavailable") for e in events) == 1
    assert events.count("consul available again") == 1


async def scenario_table_converges_when_consul_is_back(mesh: ConsulMesh) -> None:
    """A worker started while Consul was down joins; one killed meanwhile leaves."""
    await asyncio.gather(mesh.start_worker("w1"), mesh.start_worker("w2"))
    await mesh.start_router()
    await mesh.wait_routed("w1", "w2")

    await mesh.agent.go_down()
    await asyncio.to_thread(mesh.workers["w2"].kill)
    await mesh.start_worker("w3")  # registration refused: it serves and keeps trying
    assert "w3" not in await mesh.listed()
    # The last known set still routes; a request that meets the dead w2 fails over to w1.
    assert {(await mesh.ask()).summary.worker_id for _ in range(4)} <= {"w1", "w2"}

    await mesh.agent.come_back()
    await mesh.wait_routed("w1", "w3", timeout=8)
    await assert_eventually(lambda: mesh.served_by("w3"), timeout=2, message="w3 got no traffic")


async def scenario_two_models_on_different_workers(mesh: ConsulMesh) -> None:
    await asyncio.gather(
        mesh.start_worker("wa", model="model-a"), mesh.start_worker("wb", model="model-b")
    )
    await mesh.start_router()
    await mesh.wait_routed("wa", "wb")
    for _ in range(4):
        assert (await mesh.ask("model-a")).summary.worker_id == "wa"
        assert (await mesh.ask("model-b")).summary.worker_id == "wb"

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await mesh.ask("model-c")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model-a, model-b" in (unknown.value.details() or "")

    await asyncio.to_thread(mesh.workers["wb"].stop)
    await mesh.wait_routed("wa")
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await mesh.ask("model-b")
    assert gone.value.code() == grpc.StatusCode.UNAVAILABLE
    assert gone.value.details() == (
        "no healthy worker serves model 'model-b' now: every worker that served it has left"
        " the mesh"
    )
    assert (await mesh.ask("model-a")).summary.worker_id == "wa"


async def scenario_drained_worker_finishes_in_flight_and_gets_no_new_requests(
    mesh: ConsulMesh,
) -> None:
    slow = ["--sim-token-delay", "10ms", "--sim-min-answer-tokens", "200"]
    await mesh.start_worker("w2", args=slow)
    await mesh.start_router()
    await mesh.wait_routed("w2")
    # w2 is the only worker: the long request is on it.
    long_request = asyncio.create_task(mesh.ask(max_tokens=150))

    async def in_flight_on_w2() -> bool:
        return any(w.worker_id == "w2" and w.in_flight for w in (await mesh.table()).workers)

    await assert_eventually(in_flight_on_w2, timeout=5)
    await mesh.start_worker("w1")
    await mesh.wait_routed("w1", "w2")
    assert not long_request.done()

    mesh.workers["w2"].signal(signal.SIGTERM)
    await mesh.wait_routed("w1", timeout=3)
    assert "w2" not in await mesh.listed()
    answers = await asyncio.gather(*(mesh.ask() for _ in range(8)))
    assert {a.summary.worker_id for a in answers} == {"w1"}

    finished = await asyncio.wait_for(long_request, 10)
    assert finished.summary.worker_id == "w2"
    assert finished.summary.usage.completion_tokens == 150
    assert await asyncio.to_thread(mesh.workers["w2"].wait, 10) == 0
    assert "w2" not in mesh.agent.services()


class TestJoiningAndLeaving:
    """Workers come and go through Consul alone."""

    async def test_new_worker_gets_traffic_within_a_second(self, mesh: ConsulMesh) -> None:
        await scenario_new_worker_gets_traffic_within_a_second(mesh)

    async def test_sigkilled_worker_leaves_after_its_ttl(self, mesh: ConsulMesh) -> None:
        await scenario_sigkilled_worker_leaves_after_its_ttl(mesh)


class TestConsulOutage:
    """Consul down: the router keeps serving from the last known set; back: it converges."""

    async def test_router_keeps_serving_while_consul_is_down(self, mesh: ConsulMesh) -> None:
        await scenario_router_keeps_serving_while_consul_is_down(mesh)

    async def test_table_converges_when_consul_is_back(self, mesh: ConsulMesh) -> None:
        await scenario_table_converges_when_consul_is_back(mesh)


class TestModels:
    """Requests go only to workers of their model."""

    async def test_two_models_on_different_workers(self, mesh: ConsulMesh) -> None:
        await scenario_two_models_on_different_workers(mesh)


class TestDrain:
    """A worker that drains (SIGTERM) leaves Consul first and finishes what it has."""

    async def test_drained_worker_finishes_in_flight_and_gets_no_new_requests(
        self, mesh: ConsulMesh
    ) -> None:
        await scenario_drained_worker_finishes_in_flight_and_gets_no_new_requests(mesh)


class TestLlmMeshUp:
    """``llm-mesh up --discovery consul --consul-addr HOST:PORT`` runs against an existing agent."""

    @pytest.mark.timeout(120)
    async def test_up_with_consul(self, tmp_path: Path) -> None:
        async with ConsulAgent(reap_interval=0.2, min_deregister_after=1.0) as agent:
            up = LocalMesh(
                tmp_path,
                "--discovery", "consul",
                "--consul-addr", agent.address,
                "--workers", "2",
                "--store", "memory",
            )  # fmt: skip
            try:
                await up.start()
                assert up.info["discovery"] == "consul"
                registered = sorted(s["Service"] for s in agent.services().values())
                assert registered == ["llm-worker", "llm-worker"]
                router_log = (up.log_dir / "router.log").read_text()
                assert '"discovery": "consul"' in router_log

                code, out, err = await up.cli("workers")
                assert code == 0, err
                assert len(out.splitlines()) == 3  # the header and two workers
                code, out, err = await up.cli("generate", "Hello through Consul")
                assert code == 0, err
                assert err.startswith("[generated] worker=worker-")

                assert up.proc is not None
                up.proc.send_signal(signal.SIGINT)
                assert await up.wait() == 0, up.output()
                assert agent.services() == {}  # the workers left Consul as they stopped
            finally:
                await up.close()

    async def test_up_without_an_agent_fails_fast(self, tmp_path: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmmesh.cli", "up",
            "--discovery", "consul", "--consul-addr", "127.0.0.1:9",
            "--port", "0", "--log-dir", str(tmp_path),
            cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 1
        assert err.decode().startswith("llm-mesh: cannot connect to Consul at http://127.0.0.1:9")
        assert os.listdir(tmp_path) == []  # nothing was started: no child log
