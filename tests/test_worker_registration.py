"""A worker registers itself in Consul, keeps its check honest and leaves first when it drains.

Consul is the :class:`tests.consul_agent.ConsulAgent` double, over real HTTP on loopback, with a
fast reaper; workers run in this process (ServiceRunner + WorkerApp) and as real processes
(``python -m worker --discovery consul``). The code under test uses the real py-consul client.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import prometheus_client
import pytest
import structlog

import llmmesh
from llmmesh.server import ServiceRunner
from llmmesh.v1 import generate_pb2, worker_pb2_grpc
from tests.consul_agent import ConsulAgent
from tests.harness import ServiceProcess, assert_eventually
from worker import WorkerApp, WorkerConfig, load_config
from worker._registration import LEAVE_TIMEOUT_S, advertise_address, go_duration
from worker.engines import LoadSnapshot, SimEngine, SimSettings

pytestmark = [
    pytest.mark.timeout(60),
    # py-consul 1.8.0's aio client builds its aiohttp connector with the deprecated ssl_context.
    pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning"),
]

MODEL = "sim-llama-3.1-8b"
TTL = timedelta(milliseconds=600)  # heartbeat every 200 ms
TOKEN = "acl-secret-5b0e7d1c"
FAST: dict[str, Any] = {
    "sim_token_delay": timedelta(milliseconds=1),
    "sim_first_token_delay": timedelta(milliseconds=1),
    "sim_prefill_per_1k_tokens": timedelta(0),
}
CONSUL_ENV = ("CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "CONSUL_HTTP_TOKEN_FILE", "CONSUL_HTTP_SSL")


@pytest.fixture(autouse=True)
def no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner's own Consul variables must not leak into these workers."""
    for name in (*CONSUL_ENV, "LLMMESH_CONSUL_TOKEN", "LLMMESH_CONSUL_ADDR"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def agent() -> AsyncIterator[ConsulAgent]:
    async with ConsulAgent(
        reap_interval=0.1, min_deregister_after=1.0, min_check_interval=0.2
    ) as consul:
        yield consul


@pytest.fixture
async def acl_agent() -> AsyncIterator[ConsulAgent]:
    async with ConsulAgent(acl_token=TOKEN, reap_interval=0.1, min_deregister_after=1.0) as consul:
        yield consul


class FlakyEngine(SimEngine):
    """A simulator whose health a test switches off and on."""

    def __init__(self) -> None:
        super().__init__(SimSettings(token_delay=timedelta(milliseconds=1)))
        self.healthy = True

    def load(self) -> LoadSnapshot:
        return replace(super().load(), healthy=self.healthy)


@dataclass
class Served:
    app: WorkerApp
    runner: ServiceRunner
    stub: worker_pb2_grpc.WorkerAsyncStub


@asynccontextmanager
async def serve(
    consul: ConsulAgent, *, engine: SimEngine | None = None, **overrides: Any
) -> AsyncIterator[Served]:
    """A worker on 127.0.0.1, port 0, in this process, registering in ``consul``."""
    settings: dict[str, Any] = {
        "port": 0,
        "metrics_port": -1,
        "worker_id": "w-reg",
        "grace": timedelta(seconds=5),
        "discovery": "consul",
        "consul_addr": consul.address,
        "consul_check_ttl": TTL,
        "consul_deregister_after": timedelta(seconds=1),
        **FAST,
        **overrides,
    }
    config = WorkerConfig(**settings)
    app = WorkerApp(config, engine=engine)
    runner = ServiceRunner(app, config, name="worker")
    async with runner, grpc.aio.insecure_channel(runner.address) as channel:
        yield Served(app, runner, worker_pb2_grpc.WorkerStub(channel))


def status(consul: ConsulAgent, check_id: str) -> str | None:
    """The check's status, or None when the agent has no such check."""
    check = consul.checks().get(check_id)
    return None if check is None else str(check["Status"])


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels or {}) or 0.0


def error_count(op: str) -> float:
    return sample("llmmesh_worker_consul_errors_total", {"op": op})


def requests_to(consul: ConsulAgent, prefix: str) -> int:
    return sum(1 for _, path in consul.requests if path.startswith(prefix))


def generate_request(max_tokens: int = 5) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model=MODEL,
        prompt="Explain service discovery.",
        sampling=generate_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )


class TestRegistration:
    """Once its engine is ready a worker registers its name, id, address, port, tags and meta."""

    async def test_registers_service_with_passing_ttl_check(self, agent: ConsulAgent) -> None:
        async with serve(agent, consul_tags=("blue", "gpu")) as w:
            await assert_eventually(
                lambda: status(agent, "service:w-reg") == "passing",
                timeout=5,
                message="the TTL check never turned passing",
            )
            service = agent.services()["w-reg"]
            assert service["Service"] == "llm-worker"
            assert service["ID"] == "w-reg"
            assert (service["Address"], service["Port"]) == ("127.0.0.1", w.runner.port)
            assert service["Tags"] == ["blue", "gpu", f"model={MODEL}", "engine=sim"]
            assert service["Meta"] == {
                "model": MODEL,
                "engine": "sim",
                "capacity": "64",
                "model_version": "sim-1",
                "version": llmmesh.__version__,
                "worker_id": "w-reg",
            }
            check = agent.checks()["service:w-reg"]
            assert (check["ServiceID"], check["Type"]) == ("w-reg", "ttl")
            assert check["Definition"]["DeregisterCriticalServiceAfter"] == "1s"
            assert sample("llmmesh_worker_consul_registered") == 1
        assert "w-reg" not in agent.services()  # it left when it drained
        assert sample("llmmesh_worker_consul_registered") == 0

    async def test_service_name_is_configurable(self, agent: ConsulAgent) -> None:
        async with serve(agent, consul_service="llm-worker-canary", worker_id="w-canary"):
            await assert_eventually(lambda: "w-canary" in agent.services(), timeout=5)
            assert agent.services()["w-canary"]["Service"] == "llm-worker-canary"

    async def test_heartbeat_keeps_the_check_passing_beyond_its_ttl(
        self, agent: ConsulAgent
    ) -> None:
        async with serve(agent):
            await assert_eventually(lambda: status(agent, "service:w-reg") == "passing", timeout=5)
            since = time.monotonic()

            def three_ttls_passed_while_passing() -> bool:
                assert status(agent, "service:w-reg") == "passing", "the check lapsed"
                return time.monotonic() - since > 3 * TTL.total_seconds()

            await assert_eventually(three_ttls_passed_while_passing, timeout=5)
            assert requests_to(agent, "/v1/agent/check/pass/service:w-reg") >= 3

    async def test_unhealthy_engine_turns_the_check_critical_until_it_recovers(
        self, agent: ConsulAgent
    ) -> None:
        engine = FlakyEngine()
        async with serve(agent, engine=engine):
            await assert_eventually(lambda: status(agent, "service:w-reg") == "passing", timeout=5)
            engine.healthy = False
            await assert_eventually(
                lambda: status(agent, "service:w-reg") == "critical",
                timeout=3,
                message="the check stayed passing with an unhealthy engine",
            )
            assert "unhealthy" in agent.checks()["service:w-reg"]["Output"]
            assert "w-reg" in agent.services()  # still registered: it may recover
            engine.healthy = True
            await assert_eventually(
                lambda: status(agent, "service:w-reg") == "passing",
                timeout=3,
                message="the check never recovered with the engine",
            )

    async def test_grpc_check_is_probed_by_the_agent(self, agent: ConsulAgent) -> None:
        """The gRPC option: Consul asks the worker's grpc.health.v1, which follows the engine."""
        engine = FlakyEngine()
        async with serve(agent, engine=engine, consul_check="grpc") as w:
            await assert_eventually(
                lambda: status(agent, "service:w-reg") == "passing",
                timeout=5,
                message="the agent's gRPC probe never passed",
            )
            check = agent.checks()["service:w-reg"]
            assert check["Type"] == "grpc"
            assert check["Definition"]["GRPC"] == f"127.0.0.1:{w.runner.port}/llmmesh.v1.Worker"
            assert requests_to(agent, "/v1/agent/check/pass/") == 0  # no TTL heartbeats
            engine.healthy = False
            await assert_eventually(
                lambda: status(agent, "service:w-reg") == "critical",
                timeout=3,
                message="the gRPC probe kept passing with an unhealthy engine",
            )

    async def test_no_discovery_registers_nothing(self, agent: ConsulAgent) -> None:
        async with serve(agent, discovery="none") as w:
            await w.stub.Generate(generate_request(), timeout=5)
            assert w.app.registration is None
        assert agent.requests == []


class TestAgentTrouble:
    """Consul restarting, down or slow never stops a worker from serving; it converges."""

    async def test_reregisters_after_the_agent_forgets_it(self, agent: ConsulAgent) -> None:
        async with serve(agent):
            await assert_eventually(lambda: status(agent, "service:w-reg") == "passing", timeout=5)
            with structlog.testing.capture_logs() as logs:
                await agent.restart(forget=True)
                assert "w-reg" not in agent.services()
                # one heartbeat (200 ms) answers 404, and the worker registers again at once
                await assert_eventually(
                    lambda: status(agent, "service:w-reg") == "passing",
                    timeout=1.5,
                    message="the worker did not register again after the agent forgot it",
                )
            forgot = [e for e in logs if "forgot" in e["event"]]
            assert len(forgot) == 1
            assert sample("llmmesh_worker_consul_registered") == 1

    async def test_reregistration_after_an_outage_longer_than_the_ttl_passes_at_once(
        self, agent: ConsulAgent
    ) -> None:
        """The agent keeps the critical state of an expired check over a re-registration (as
        Consul does): the worker reports its health at once instead of a heartbeat later, and
        logs the status the agent reads back."""
        ttl = timedelta(seconds=3)  # heartbeat every 1 s: "at once" is well inside that
        async with serve(agent, consul_check_ttl=ttl, consul_deregister_after=timedelta(minutes=1)):
            await assert_eventually(lambda: status(agent, "service:w-reg") == "passing", timeout=5)
            await agent.go_down()
            await assert_eventually(
                lambda: status(agent, "service:w-reg") == "critical",
                timeout=ttl.total_seconds() + 2,
                message="the TTL never expired while Consul was unreachable",
            )
            registrations = requests_to(agent, "/v1/agent/service/register")
            with structlog.testing.capture_logs() as logs:
                await agent.come_back()
                await assert_eventually(
                    lambda: requests_to(agent, "/v1/agent/service/register") > registrations,
                    timeout=3,
                    message="the worker never registered again",
                )
                registered_at = time.monotonic()
                await assert_eventually(
                    lambda: status(agent, "service:w-reg") == "passing",
                    timeout=3,
                    message="the re-registered check never turned passing",
                )
                assert time.monotonic() - registered_at < 0.5, "passing only after a heartbeat"
                await assert_eventually(
                    lambda: any(e["event"] == "registered in consul" for e in logs), timeout=2
                )
            registered = [e for e in logs if e["event"] == "registered in consul"]
            assert registered[-1]["check_status"] == "passing"  # what the agent said
            assert registered[-1]["passing"] is True

    async def test_registration_log_says_what_the_agent_has(self, agent: ConsulAgent) -> None:
        """An unhealthy engine at registration: the log says critical, as the agent does."""
        engine = FlakyEngine()
        engine.healthy = False
        with structlog.testing.capture_logs() as logs:
            async with serve(agent, engine=engine):
                await assert_eventually(lambda: "w-reg" in agent.services(), timeout=5)
        registered = [e for e in logs if e["event"] == "registered in consul"]
        assert (registered[0]["check_status"], registered[0]["passing"]) == ("critical", False)

    async def test_consul_down_at_start_serves_then_registers(self, agent: ConsulAgent) -> None:
        await agent.go_down()
        errors_before = error_count("register")
        with structlog.testing.capture_logs() as logs:
            async with serve(agent) as w:
                reply = await w.stub.Generate(generate_request(), timeout=5)
                assert reply.summary.worker_id == "w-reg"
                await assert_eventually(lambda: error_count("register") >= errors_before + 2)
                assert sample("llmmesh_worker_consul_registered") == 0
                await agent.come_back()
                await assert_eventually(
                    lambda: status(agent, "service:w-reg") == "passing",
                    timeout=3,
                    message="the worker never registered once Consul came back",
                )
        events = [e["event"] for e in logs]
        assert events.count("consul call failed; serving without it and retrying") == 1
        assert events.count("consul calls succeed again") == 1

    async def test_dead_consul_does_not_hold_up_shutdown(self, agent: ConsulAgent) -> None:
        async with serve(agent) as w:
            await assert_eventually(lambda: "w-reg" in agent.services(), timeout=5)
            await agent.go_down()
            before = error_count("deregister"), error_count("maintenance")
            started = time.monotonic()
            await w.runner.shutdown()
            assert time.monotonic() - started < LEAVE_TIMEOUT_S + 1
            assert (error_count("deregister"), error_count("maintenance")) == (
                before[0] + 1,
                before[1] + 1,
            )


class TestAcl:
    """The ACL token goes to Consul as X-Consul-Token, and nowhere else."""

    async def test_wrong_token_is_refused_logged_once_and_counted(
        self, acl_agent: ConsulAgent
    ) -> None:
        errors_before = error_count("register")
        with structlog.testing.capture_logs() as logs:
            async with serve(acl_agent, consul_token="not-the-token") as w:
                await assert_eventually(
                    lambda: requests_to(acl_agent, "/v1/agent/service/register") >= 3
                )
                await w.stub.Generate(generate_request(), timeout=5)  # serving regardless
                assert acl_agent.services() == {}
        assert error_count("register") >= errors_before + 3
        failures = [e for e in logs if e["event"].startswith("consul call failed")]
        assert len(failures) == 1
        assert failures[0]["status"] == 403
        assert "not-the-token" not in repr(logs)

    async def test_token_from_consul_http_token_registers(
        self, acl_agent: ConsulAgent, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("CONSUL_HTTP_TOKEN", TOKEN)
        with structlog.testing.capture_logs() as logs:
            async with serve(acl_agent):
                await assert_eventually(
                    lambda: status(acl_agent, "service:w-reg") == "passing", timeout=5
                )
        assert "w-reg" not in acl_agent.services()  # deregistering needed the token too
        assert TOKEN not in repr(logs)


class TestConfig:
    """Discovery settings come from flags and the environment; bad values are refused."""

    def test_flags_and_environment(self) -> None:
        config = load_config(
            [
                "--discovery", "consul",
                "--consul-addr", "10.0.0.5:8500",
                "--consul-check", "grpc",
                "--consul-check-ttl", "15s",
                "--consul-tags", "blue,gpu",
                "--advertise-address", "worker-7.internal",
            ],
            environ={"LLMMESH_CONSUL_TOKEN": TOKEN, "LLMMESH_CONSUL_DEREGISTER_AFTER": "5m"},
        )  # fmt: skip
        assert (config.discovery, config.consul_check) == ("consul", "grpc")
        assert config.consul_check_ttl == timedelta(seconds=15)
        assert config.consul_deregister_after == timedelta(minutes=5)
        assert config.consul_tags == ("blue", "gpu")
        assert config.consul_token == TOKEN
        assert TOKEN not in repr(config)
        assert advertise_address(config) == "worker-7.internal"

    def test_defaults(self) -> None:
        config = load_config([], environ={})
        assert (config.discovery, config.consul_check, config.consul_service) == (
            "none",
            "ttl",
            "llm-worker",
        )
        assert config.consul_check_ttl == timedelta(seconds=10)
        assert config.consul_deregister_after == timedelta(minutes=1)

    def test_advertise_address_defaults_to_the_listen_host_or_this_machine(self) -> None:
        assert advertise_address(WorkerConfig(host="127.0.0.1")) == "127.0.0.1"
        everywhere = advertise_address(WorkerConfig(host="0.0.0.0"))
        assert everywhere
        assert everywhere not in ("0.0.0.0", "::")

    @pytest.mark.parametrize(
        ("overrides", "field"),
        [
            ({"consul_check_ttl": timedelta(0)}, "consul_check_ttl"),
            ({"consul_deregister_after": timedelta(seconds=-1)}, "consul_deregister_after"),
            ({"advertise_address": "10.0.0.5:50061"}, "advertise_address"),
            ({"advertise_address": "http://x"}, "advertise_address"),
        ],
    )
    def test_bad_values_are_refused(self, overrides: dict[str, Any], field: str) -> None:
        with pytest.raises(ValueError, match=field):
            WorkerConfig(**overrides)

    def test_durations_are_sent_as_go_durations(self) -> None:
        assert go_duration(timedelta(seconds=10)) == "10s"
        assert go_duration(timedelta(minutes=1)) == "60s"
        assert go_duration(timedelta(milliseconds=600)) == "600ms"
        assert go_duration(timedelta(seconds=10) / 3) == "3333ms"


# -- whole processes ---------------------------------------------------------------------------


@asynccontextmanager
async def worker_process(
    consul: ConsulAgent, worker_id: str, *args: str, env: dict[str, str]
) -> AsyncIterator[ServiceProcess]:
    """``python -m worker --discovery consul`` against ``consul``, started off the event loop
    (the agent double answers from this loop while the worker registers)."""
    proc = ServiceProcess(
        "worker",
        [
            "--discovery", "consul",
            "--consul-addr", consul.address,
            "--consul-check-ttl", go_duration(TTL),
            "--consul-deregister-after", "1s",
            "--worker-id", worker_id,
            "--metrics-port", "-1",
            "--log-level", "debug",
            *args,
        ],
        env=env,
    )  # fmt: skip
    await asyncio.to_thread(proc.start)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.close)


async def wait_for(condition: Callable[[], bool], message: str, timeout: float = 5) -> None:
    await assert_eventually(condition, timeout=timeout, message=message)


class TestProcess:
    """`python -m worker --discovery consul`: killed, it is reaped; terminated, it leaves first."""

    async def test_sigkilled_worker_goes_critical_and_is_reaped(
        self, acl_agent: ConsulAgent
    ) -> None:
        env = {"CONSUL_HTTP_TOKEN": TOKEN}
        async with worker_process(acl_agent, "proc-kill", env=env) as proc:
            await wait_for(
                lambda: status(acl_agent, "service:proc-kill") == "passing", "never passing"
            )
            proc.kill()
            killed = time.monotonic()
            await wait_for(
                lambda: status(acl_agent, "service:proc-kill") == "critical",
                "the check of a killed worker stayed passing",
                timeout=3 * TTL.total_seconds(),
            )
            assert time.monotonic() - killed >= TTL.total_seconds() * 0.5
            await wait_for(
                lambda: "proc-kill" not in acl_agent.services(),
                "the killed worker was never reaped",
            )
            assert TOKEN not in proc.logs()

    async def test_sigterm_leaves_consul_before_finishing_the_in_flight_stream(
        self, acl_agent: ConsulAgent
    ) -> None:
        env = {"LLMMESH_CONSUL_TOKEN": TOKEN}
        slow = [
            "--sim-token-delay", "20ms",
            "--sim-min-answer-tokens", "4000",
            "--sim-max-answer-tokens", "4000",
        ]  # fmt: skip
        async with worker_process(acl_agent, "proc-term", *slow, env=env) as proc:
            await wait_for(
                lambda: status(acl_agent, "service:proc-term") == "passing", "never passing"
            )
            async with grpc.aio.insecure_channel(proc.address) as channel:
                stub = worker_pb2_grpc.WorkerStub(channel)
                stream = stub.GenerateStream(generate_request(max_tokens=60), timeout=20)
                chunks: list[generate_pb2.GenerateStreamResponse] = []

                async def read_chunk() -> bool:
                    chunk = await stream.read()
                    if isinstance(chunk, generate_pb2.GenerateStreamResponse):
                        chunks.append(chunk)
                        return True
                    return False  # grpc.aio.EOF

                assert await asyncio.wait_for(read_chunk(), 10)

                async def rest() -> None:
                    while await read_chunk():
                        pass

                reader = asyncio.create_task(rest())
                proc.signal(signal.SIGTERM)

                def deregistered_mid_stream() -> bool:
                    if "proc-term" in acl_agent.services():
                        assert not reader.done(), "the stream ended before the worker left"
                        return False
                    assert not reader.done(), "deregistered only after the stream ended"
                    return True

                await wait_for(deregistered_mid_stream, "the worker never left Consul")
                await asyncio.wait_for(reader, 10)
                assert await stream.code() == grpc.StatusCode.OK
            final = chunks[-1]
            assert final.summary.finish_reason == generate_pb2.FINISH_REASON_LENGTH
            assert final.summary.usage.completion_tokens == 60
            assert await asyncio.to_thread(proc.wait, 20) == 0
            assert ("PUT", "/v1/agent/service/deregister/proc-term") in acl_agent.requests
            assert TOKEN not in proc.logs()
