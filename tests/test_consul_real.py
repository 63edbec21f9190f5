"""The scenarios of tests/test_consul_mesh.py against a real ``consul agent -dev`` on 127.0.0.1,
when a ``consul`` binary is on PATH (skipped otherwise: none can be installed on our development
machines, see shared/briefs/consul.md).

Differences from the double: a real agent taken down (killed) and started again in dev mode has
forgotten every service, so the workers register again (a heartbeat answered 404); and Consul
raises DeregisterCriticalServiceAfter to 1 minute, which matters not (the router asks for passing
instances only).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from llmmesh.server import free_port
from tests import test_consul_mesh as scenarios
from tests.test_consul_mesh import ConsulMesh

CONSUL = shutil.which("consul")
if CONSUL is None:
    pytest.skip(
        "no `consul` binary on PATH: the Consul scenarios ran against the agent double only "
        "(tests/test_consul_mesh.py); install Consul to run them against a real agent",
        allow_module_level=True,
    )

pytestmark = [
    pytest.mark.slow,
    # py-consul 1.8.0's aio client builds its aiohttp connector with the deprecated ssl_context.
    pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning"),
]


class RealConsul:
    """``consul agent -dev`` on free loopback ports; down = killed, back = started again."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.http_port = free_port()
        self._ports = {
            "-serf-lan-port": free_port(),
            "-serf-wan-port": free_port(),
            "-server-port": free_port(),
        }
        self._tmp = tempfile.TemporaryDirectory(prefix="llmmesh-consul-")
        self._log = Path(self._tmp.name) / "consul.log"
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def _argv(self) -> list[str]:
        help_text = subprocess.run(
            [self.binary, "agent", "-h"], capture_output=True, text=True, check=False
        ).stdout
        argv = [
            self.binary, "agent", "-dev",
            "-node", "llmmesh-test",
            "-bind", "127.0.0.1",
            "-client", "127.0.0.1",
            "-http-port", str(self.http_port),
            "-dns-port", "-1",
            "-grpc-port", "-1",
            "-log-level", "warn",
        ]  # fmt: skip
        if "-grpc-tls-port" in help_text:
            argv += ["-grpc-tls-port", "-1"]
        for flag, port in self._ports.items():
            argv += [flag, str(port)]
        return argv

    def _get(self, path: str) -> Any:
        with self._opener.open(f"http://{self.address}{path}", timeout=5) as reply:
            return json.loads(reply.read() or b"null")

    def services(self) -> dict[str, dict[str, Any]]:
        return dict(self._get("/v1/agent/services"))

    def checks(self) -> dict[str, dict[str, Any]]:
        return dict(self._get("/v1/agent/checks"))

    def _has_leader(self) -> bool:
        try:
            return bool(self._get("/v1/status/leader"))
        except OSError:
            return False

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self._log.open("ab") as log:
            return subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT)

    async def start(self) -> None:
        self.proc = await asyncio.to_thread(self._spawn)
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(self._has_leader):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"consul agent did not start:\n{self._log.read_text()}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait, 10)

    async def go_down(self) -> None:
        await self.stop()

    async def come_back(self) -> None:
        await self.start()

    def close(self) -> None:
        self._tmp.cleanup()


@pytest.fixture
async def mesh() -> AsyncIterator[ConsulMesh]:
    assert CONSUL is not None
    agent = RealConsul(CONSUL)
    await agent.start()
    consul_mesh = ConsulMesh(agent)
    try:
        yield consul_mesh
    finally:
        try:
            await consul_mesh.close()
        finally:
            await agent.stop()
            agent.close()


class TestAgainstRealConsul:
    """The main scenarios, with a real Consul agent."""

    async def test_new_worker_gets_traffic_within_a_second(self, mesh: ConsulMesh) -> None:
        await scenarios.scenario_new_worker_gets_traffic_within_a_second(mesh)

    async def test_sigkilled_worker_leaves_after_its_ttl(self, mesh: ConsulMesh) -> None:
        await scenarios.scenario_sigkilled_worker_leaves_after_its_ttl(mesh)

    async def test_router_keeps_serving_while_consul_is_down(self, mesh: ConsulMesh) -> None:
        await scenarios.scenario_router_keeps_serving_while_consul_is_down(mesh)

    async def test_table_converges_when_consul_is_back(self, mesh: ConsulMesh) -> None:
        await scenarios.scenario_table_converges_when_consul_is_back(mesh)

    async def test_two_models_on_different_workers(self, mesh: ConsulMesh) -> None:
        await scenarios.scenario_two_models_on_different_workers(mesh)

    async def test_drained_worker_finishes_in_flight_and_gets_no_new_requests(
        self, mesh: ConsulMesh
    ) -> None:
        await scenarios.scenario_drained_worker_finishes_in_flight_and_gets_no_new_requests(mesh)
