"""ConsulDiscovery against the Consul agent double (tests/consul_agent/) over real HTTP on
127.0.0.1, through the real py-consul client: the passing set, blocking queries, Consul's index
rules, rate limiting, outages and the ACL token."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import pytest
import structlog.testing

from llmmesh.consul import ConsulTarget, open_client
from llmmesh.discovery import (
    ConsulDiscovery,
    ConsulError,
    DiscoveryStatus,
    Endpoint,
    TokenBucket,
    consul_errors,
    next_index,
)
from llmmesh.server import ServiceRunner, free_port
from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc
from router import RouterApp, RouterConfig, load_config
from tests.consul_agent import ConsulAgent
from tests.fakes import DEFAULT_MODEL, FakeServer, FakeWorker
from tests.harness import assert_eventually

# py-consul 1.8.0's aio client builds its aiohttp connector with the deprecated ssl_context.
pytestmark = pytest.mark.filterwarnings("ignore:ssl_context is deprecated:DeprecationWarning")

SERVICE = "llm-worker"
HEALTH_PATH = f"/v1/health/service/{SERVICE}"
# Retries while Consul is down come this often at most, so that outages are short to test.
FAST_RETRY = timedelta(milliseconds=50)


def target_of(agent: ConsulAgent, token: str = "") -> ConsulTarget:
    return ConsulTarget(
        host="127.0.0.1",
        port=agent.port,
        scheme="http",
        verify=True,
        token=token,
        datacenter="",
        service=SERVICE,
    )


class Watcher:
    """Runs a ConsulDiscovery's watch in a task and queues every set it yields."""

    def __init__(self, discovery: ConsulDiscovery) -> None:
        self.discovery = discovery
        self.sets: asyncio.Queue[frozenset[Endpoint]] = asyncio.Queue()
        self.statuses: list[DiscoveryStatus] = []
        discovery.subscribe(self.statuses.append)
        self._task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for endpoints in self.discovery.watch():
            self.sets.put_nowait(endpoints)

    async def next(self, timeout: float = 3.0) -> frozenset[Endpoint]:
        """The next set yielded (fails after ``timeout`` seconds)."""
        return await asyncio.wait_for(self.sets.get(), timeout)

    async def next_addresses(self, timeout: float = 3.0) -> set[str]:
        return {e.address for e in await self.next(timeout)}

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.discovery.close()


@contextlib.asynccontextmanager
async def watching(
    agent: ConsulAgent, *, token: str = "", **options: Any
) -> AsyncIterator[Watcher]:
    options.setdefault("backoff_max", FAST_RETRY)
    options.setdefault("backoff_base", FAST_RETRY)
    watcher = Watcher(ConsulDiscovery(target_of(agent, token), **options))
    try:
        yield watcher
    finally:
        await watcher.close()


class Registry:
    """Registers worker-like services with the agent through py-consul, as a worker would."""

    def __init__(self, agent: ConsulAgent, token: str = "") -> None:
        self.client = open_client(target_of(agent, token))

    async def register(
        self,
        service_id: str,
        port: int,
        *,
        model: str = "m1",
        address: str = "127.0.0.1",
        status: str = "passing",
        ttl: str = "30s",
    ) -> None:
        await self.client.agent.service.register(
            SERVICE,
            service_id=service_id,
            address=address,
            port=port,
            meta={"model": model, "engine": "sim", "capacity": "8", "worker_id": service_id},
            check={"TTL": ttl, "Status": status},
        )

    async def deregister(self, service_id: str) -> None:
        await self.client.agent.service.deregister(service_id)

    async def fail(self, service_id: str) -> None:
        await self.client.agent.check.ttl_fail(f"service:{service_id}")

    async def close(self) -> None:
        await self.client.close()


@pytest.fixture
async def agent() -> AsyncIterator[ConsulAgent]:
    async with ConsulAgent(reap_interval=0.2, min_deregister_after=1.0) as consul_agent:
        yield consul_agent


@pytest.fixture
async def registry(agent: ConsulAgent) -> AsyncIterator[Registry]:
    reg = Registry(agent)
    try:
        yield reg
    finally:
        await reg.close()


def health_queries(agent: ConsulAgent) -> int:
    return sum(1 for method, path in agent.requests if path.startswith(HEALTH_PATH))


class TestPassingSet:
    """The watch yields the passing instances of the service, and every change to them."""

    async def test_initial_set_with_metadata(self, agent: ConsulAgent, registry: Registry) -> None:
        await registry.register("w1", 7001, model="m1")
        await registry.register("w2", 7002, model="m2")
        await registry.register("other", 7003, status="critical")
        async with watching(agent) as watcher:
            endpoints = await watcher.next()
        by_address = {e.address: e.meta for e in endpoints}
        assert set(by_address) == {"127.0.0.1:7001", "127.0.0.1:7002"}
        assert by_address["127.0.0.1:7002"]["model"] == "m2"
        assert by_address["127.0.0.1:7001"] == {
            "model": "m1",
            "engine": "sim",
            "capacity": "8",
            "worker_id": "w1",
        }

    async def test_empty_service_address_means_the_node_address(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        await registry.register("w1", 7001, address="")
        async with watching(agent) as watcher:
            assert await watcher.next_addresses() == {"127.0.0.1:7001"}

    async def test_registration_appears_when_the_blocking_query_returns(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        """With a 30 s wait, a new instance still shows up well within a second."""
        await registry.register("w1", 7001)
        async with watching(agent, wait=timedelta(seconds=30)) as watcher:
            assert await watcher.next_addresses() == {"127.0.0.1:7001"}
            # The watch is now parked in a blocking query.
            await assert_eventually(lambda: health_queries(agent) >= 2, timeout=2)
            started = time.monotonic()
            await registry.register("w2", 7002)
            assert await watcher.next_addresses(timeout=1.0) == {
                "127.0.0.1:7001",
                "127.0.0.1:7002",
            }
            assert time.monotonic() - started < 0.5

    async def test_deregistration_disappears(self, agent: ConsulAgent, registry: Registry) -> None:
        await registry.register("w1", 7001)
        await registry.register("w2", 7002)
        async with watching(agent) as watcher:
            assert len(await watcher.next()) == 2
            await registry.deregister("w1")
            assert await watcher.next_addresses(timeout=1.0) == {"127.0.0.1:7002"}

    async def test_critical_check_leaves_the_set(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        await registry.register("w1", 7001)
        await registry.register("w2", 7002)
        async with watching(agent) as watcher:
            assert len(await watcher.next()) == 2
            await registry.fail("w2")
            assert await watcher.next_addresses(timeout=1.0) == {"127.0.0.1:7001"}

    async def test_ttl_expiry_leaves_the_set(self, agent: ConsulAgent, registry: Registry) -> None:
        """A check nobody refreshes turns critical after its TTL: the instance leaves."""
        await registry.register("w1", 7001)
        await registry.register("short", 7002, ttl="300ms")
        async with watching(agent) as watcher:
            assert len(await watcher.next()) == 2
            assert await watcher.next_addresses(timeout=2.0) == {"127.0.0.1:7001"}

    async def test_unchanged_set_is_not_yielded_again(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        """A query that returns with the same set (a wait that ran out, another service's
        change) yields nothing."""
        await registry.register("w1", 7001)
        async with watching(agent, wait=timedelta(milliseconds=100)) as watcher:
            await watcher.next()
            await assert_eventually(lambda: health_queries(agent) >= 4, timeout=3)
            assert watcher.sets.empty()
            status = watcher.discovery.status()
        assert (status.healthy, status.endpoints, status.consecutive_failures) == (True, 1, 0)


class TestIndexRules:
    """Consul's rules for the blocking index."""

    @pytest.mark.parametrize(
        ("previous", "returned", "expected"),
        [(0, 5, 5), (5, 5, 5), (5, 9, 9), (9, 5, 0), (0, 0, 1), (3, 0, 1), (0, -2, 1)],
    )
    def test_next_index(self, previous: int, returned: int, expected: int) -> None:
        """Never below 1; backwards resets to 0 (the next query does not block)."""
        assert next_index(previous, returned) == expected

    async def test_agent_restart_that_forgets_everything(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        """An agent that restarts and forgets its services empties the set; services that
        register again come back."""
        await registry.register("w1", 7001)
        async with watching(agent) as watcher:
            assert await watcher.next_addresses() == {"127.0.0.1:7001"}
            await agent.restart(forget=True)
            assert await watcher.next_addresses(timeout=3.0) == set()
            await registry.register("w1", 7001)
            assert await watcher.next_addresses(timeout=1.0) == {"127.0.0.1:7001"}

    async def test_index_going_backwards_restarts_the_loop(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        """After a restart that sets the index back, changes still arrive at once: the watch
        starts over from 0 instead of waiting for an index the agent will not reach soon."""
        for i in range(20):  # push the index well above where a fresh agent starts
            await registry.register(f"w{i}", 7000 + i)
        async with watching(agent) as watcher:
            assert len(await watcher.next()) == 20
            await assert_eventually(lambda: health_queries(agent) >= 2, timeout=2)
            seen = agent.index
            await agent.restart(forget=True, reset_index=True)
            assert await watcher.next_addresses(timeout=3.0) == set()
            await registry.register("a", 7100)
            assert await watcher.next_addresses(timeout=1.0) == {"127.0.0.1:7100"}
            await registry.register("b", 7101)
            assert len(await watcher.next(timeout=1.0)) == 2
            assert agent.index < seen


class TestRateLimit:
    """However fast Consul answers, the watch never spins."""

    async def test_queries_are_bounded_by_the_token_bucket(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        """Every query returns at once (the set changes all the time): at most the burst plus
        the rate per second are sent."""
        await registry.register("w0", 7000)
        stop = asyncio.Event()

        async def churn() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                await registry.register("churn", 7100 + i % 50)

        async with watching(agent, rate=5.0, burst=5) as watcher:
            await watcher.next()
            churner = asyncio.create_task(churn())
            try:
                before = health_queries(agent)
                await asyncio.sleep(1.0)  # measuring a rate: a fixed window is the point
                sent = health_queries(agent) - before
            finally:
                stop.set()
                await churner
        assert 3 <= sent <= 11, sent

    async def test_token_bucket(self) -> None:
        now = [0.0]
        bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
        for _ in range(3):
            await asyncio.wait_for(bucket.take(), 0.1)  # the burst is there at once
        taking = asyncio.ensure_future(bucket.take())
        await asyncio.sleep(0.05)
        assert not taking.done()
        now[0] += 0.5  # one token at 2/s
        await asyncio.wait_for(taking, 1.0)
        with pytest.raises(ValueError, match="rate"):
            TokenBucket(rate=0.0, burst=1)


class TestOutage:
    """While Consul is unreachable the last set stays, the outage is logged once, and the watch
    converges when Consul is back."""

    async def test_down_then_back(self, agent: ConsulAgent, registry: Registry) -> None:
        await registry.register("w1", 7001)
        await registry.register("w2", 7002, ttl="500ms")
        with structlog.testing.capture_logs() as logs:
            async with watching(agent, wait=timedelta(seconds=1)) as watcher:
                assert len(await watcher.next()) == 2
                await agent.go_down()
                await assert_eventually(
                    lambda: watcher.discovery.status().consecutive_failures >= 3,
                    timeout=5,
                    message="no failed queries while Consul is down",
                )
                down = watcher.discovery.status()
                assert not down.healthy
                assert down.last_error_kind == "unreachable"
                assert f"127.0.0.1:{agent.port}" in down.last_error
                assert down.endpoints == 2
                assert watcher.sets.empty()  # the last known set stays in force

                # While it was down, w2's TTL ran out (nobody refreshed it).
                await asyncio.sleep(0.6)  # let the TTL pass: Consul's clock, not ours
                await agent.come_back()
                assert await watcher.next_addresses(timeout=3.0) == {"127.0.0.1:7001"}
                up = watcher.discovery.status()
                assert up.healthy
                assert (up.last_error, up.consecutive_failures) == ("", 0)
                assert up.errors_total >= 3
        warnings = [e for e in logs if e["event"].startswith("consul unavailable")]
        recoveries = [e for e in logs if e["event"] == "consul available again"]
        assert len(warnings) == 1, warnings
        assert warnings[0]["workers"] == 2
        assert warnings[0]["kind"] == "unreachable"
        assert len(recoveries) == 1
        assert recoveries[0]["failures"] >= 3

    async def test_unreachable_from_the_start(self, agent: ConsulAgent) -> None:
        """No set is yielded until Consul answers; then the first set comes at once."""
        await agent.go_down()
        async with watching(agent) as watcher:
            await assert_eventually(
                lambda: watcher.discovery.status().consecutive_failures >= 2, timeout=5
            )
            assert watcher.sets.empty()
            assert watcher.discovery.status().last_success is None
            await agent.come_back()
            assert await watcher.next_addresses(timeout=3.0) == set()

    async def test_listeners_hear_every_query(self, agent: ConsulAgent) -> None:
        async with watching(agent) as watcher:
            await watcher.next()
            await agent.go_down()
            await assert_eventually(lambda: not watcher.statuses[-1].healthy, timeout=5)
        first_failure = next(s for s in watcher.statuses if not s.healthy)
        assert first_failure.errors_total == 1
        assert first_failure.last_success is not None


class TestAclToken:
    """The token is sent as X-Consul-Token and never appears in logs or status."""

    async def test_token_is_sent(self) -> None:
        async with ConsulAgent(acl_token="s3cret-token") as agent:
            registry = Registry(agent, token="s3cret-token")
            try:
                await registry.register("w1", 7001)
                with structlog.testing.capture_logs() as logs:
                    async with watching(agent, token="s3cret-token") as watcher:
                        assert await watcher.next_addresses() == {"127.0.0.1:7001"}
            finally:
                await registry.close()
        assert logs
        assert not any("s3cret-token" in repr(entry) for entry in logs)

    async def test_default_deny_without_a_token_is_degraded_and_said_once(self) -> None:
        """Consul filters what the anonymous token may not read: 200 [] with
        X-Consul-Default-ACL-Policy: deny. That is no healthy answer, and the cause is named."""
        async with ConsulAgent(acl_token="the-token", anonymous_reads="filter") as agent:
            registry = Registry(agent, token="the-token")
            try:
                await registry.register("w1", 7001)
                with structlog.testing.capture_logs() as logs:
                    async with watching(agent, wait=timedelta(milliseconds=50)) as watcher:
                        assert await watcher.next_addresses() == set()
                        await assert_eventually(lambda: len(watcher.statuses) >= 4, timeout=5)
                        status = watcher.discovery.status()
            finally:
                await registry.close()
        assert (status.healthy, status.last_error_kind) == (False, "acl_default_deny")
        assert "no ACL token" in status.last_error
        assert "default policy is deny" in status.last_error
        assert status.consecutive_failures == 0  # Consul did answer
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert [e["event"] for e in warnings] == [
            "consul answers no workers, probably for want of an ACL token"
        ]

    async def test_default_deny_with_a_token_is_healthy(self) -> None:
        async with (
            ConsulAgent(acl_token="the-token", anonymous_reads="filter") as agent,
            watching(agent, token="the-token") as watcher,
        ):
            assert await watcher.next_addresses() == set()
            assert watcher.discovery.status().healthy

    async def test_wrong_token_is_denied_and_never_logged(self) -> None:
        async with ConsulAgent(acl_token="right-token") as agent:
            with structlog.testing.capture_logs() as logs:
                async with watching(agent, token="wrong-token") as watcher:
                    await assert_eventually(
                        lambda: watcher.discovery.status().consecutive_failures >= 2, timeout=5
                    )
                    status = watcher.discovery.status()
        assert status.last_error_kind == "permission_denied"
        assert "403" in status.last_error
        assert "wrong-token" not in repr(status)
        assert not any(
            "wrong-token" in repr(entry) or "right-token" in repr(entry) for entry in logs
        )
        assert len([e for e in logs if e["event"].startswith("consul unavailable")]) == 1


class TestErrorTranslation:
    """consul_errors turns py-consul and aiohttp failures into ConsulError, one kind each."""

    @pytest.mark.parametrize(
        ("raised", "kind"),
        [
            ("acl", "permission_denied"),
            ("500", "server_error"),
            ("400", "bad_request"),
            ("timeout", "timeout"),
            ("json", "bad_response"),
        ],
    )
    def test_kinds(self, raised: str, kind: str) -> None:
        import consul.exceptions as ce

        exceptions: dict[str, BaseException] = {
            "acl": ce.ACLPermissionDenied("Permission denied"),
            "500": ce.ConsulException("500 leader lost"),
            "400": ce.BadRequest("400 bad wait"),
            "timeout": TimeoutError(),
            "json": ValueError("Expecting value"),
        }
        target = ConsulTarget(
            host="127.0.0.1",
            port=8500,
            scheme="http",
            verify=True,
            token="tok",
            datacenter="",
            service=SERVICE,
        )
        with pytest.raises(ConsulError) as info, consul_errors(target):
            raise exceptions[raised]
        assert info.value.kind == kind
        assert "http://127.0.0.1:8500" in info.value.message

    def test_token_is_scrubbed_from_messages(self) -> None:
        import consul.exceptions as ce

        target = ConsulTarget(
            host="127.0.0.1",
            port=8500,
            scheme="http",
            verify=True,
            token="leaky-token",
            datacenter="",
            service=SERVICE,
        )
        with pytest.raises(ConsulError) as info, consul_errors(target):
            raise ce.ACLPermissionDenied("token leaky-token not found")
        assert "leaky-token" not in info.value.message
        assert "<token>" in info.value.message


@contextlib.asynccontextmanager
async def consul_router(agent: ConsulAgent) -> AsyncIterator[router_pb2_grpc.RouterAsyncStub]:
    """A router in-process whose only source of workers is ``agent``."""
    config = RouterConfig(
        port=0,
        metrics_port=-1,
        cache_address="",
        grace=timedelta(0),
        discovery="consul",
        consul_addr=agent.address,
        consul_retry_max=FAST_RETRY,
    )
    runner = ServiceRunner(RouterApp(config), config, name="router")
    await runner.start()
    try:
        async with grpc.aio.insecure_channel(runner.address) as channel:
            yield router_pb2_grpc.RouterStub(channel)
    finally:
        await runner.shutdown(grace=timedelta(0))


def generate(model: str = DEFAULT_MODEL, prompt: str = "hi") -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model=model, prompt=prompt, sampling=generate_pb2.SamplingParams(temperature=0.0)
    )


async def table(stub: router_pb2_grpc.RouterAsyncStub) -> router_pb2.ListWorkersResponse:
    return await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)


class TestRouterWithConsul:
    """The router (in-process, fake workers) routes by the model Consul names and GetInfo
    confirms, and reports how discovery is doing."""

    async def test_meta_model_before_the_worker_answers(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        """A worker Consul lists but that has not answered yet makes its model known
        (UNAVAILABLE, not NOT_FOUND), and shows in the table with Consul's description."""
        await registry.register("late", free_port(), model="m-late")
        async with consul_router(agent) as stub:
            [row] = (await table(stub)).workers
            assert (row.model, row.engine, row.state) == (
                "m-late",
                "sim",
                router_pb2.WORKER_STATE_SUSPECT,
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(generate("m-late"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert info.value.details() == "no healthy worker serves model 'm-late'"
            with pytest.raises(grpc.aio.AioRpcError) as unknown:
                await stub.Generate(generate("m-other"), timeout=5)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    async def test_getinfo_overrules_consul_meta(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        worker = FakeWorker("w1", model=DEFAULT_MODEL)
        async with FakeServer.for_worker(worker) as server:
            await registry.register("w1", server.port, model="m-claimed")
            async with consul_router(agent) as stub:
                response = await stub.Generate(generate(), timeout=5)
                assert response.summary.worker_id == "w1"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Generate(generate("m-claimed"), timeout=5)
                assert info.value.code() == grpc.StatusCode.NOT_FOUND

    async def test_worker_leaving_consul_leaves_the_table_at_once(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        """A worker that drains leaves Consul and says so on its load stream: it leaves the
        table at once (no discovery grace); its in-flight request finishes; new ones go to the
        other worker."""
        a, b = FakeWorker("a"), FakeWorker("b")
        a.gate = asyncio.Event()
        async with FakeServer.for_worker(a) as server_a, FakeServer.for_worker(b) as server_b:
            await registry.register("a", server_a.port)
            async with consul_router(agent) as stub:
                in_flight = asyncio.ensure_future(stub.Generate(generate(), timeout=10))
                await assert_eventually(lambda: a.active == 1, timeout=5)
                await registry.register("b", server_b.port)
                await registry.deregister("a")
                a.serving = False
                a.load_changed()

                async def only_b() -> bool:
                    return [w.worker_id for w in (await table(stub)).workers] == ["b"]

                await assert_eventually(only_b, timeout=2)
                # Other prompts: an identical one would join the request in flight on a.
                for i in range(3):
                    answer = await stub.Generate(generate(prompt=f"new {i}"), timeout=5)
                    assert answer.summary.worker_id == "b"
                a.gate.set()
                assert (await in_flight).summary.worker_id == "a"

    async def test_discovery_status_in_the_table(
        self, agent: ConsulAgent, registry: Registry
    ) -> None:
        await registry.register("w1", free_port())
        async with consul_router(agent) as stub:
            status = (await table(stub)).discovery
            assert (status.source, status.healthy, status.endpoints) == ("consul", True, 1)
            assert status.target == f"http://{agent.address} service {SERVICE}"
            assert 0 <= status.seconds_since_last_success < 5
            assert 0 <= status.seconds_since_last_change < 5
            await agent.go_down()

            async def failing() -> bool:
                return (await table(stub)).discovery.consecutive_failures >= 2

            await assert_eventually(failing, timeout=5)
            status = (await table(stub)).discovery
            assert not status.healthy
            assert status.last_error.startswith(
                f"cannot connect to Consul at http://{agent.address}"
            )
            assert [w.model for w in (await table(stub)).workers] == ["m1"]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Generate(generate("m1"), timeout=5)
            assert info.value.details() == (
                "no healthy worker serves model 'm1'; the worker registry (consul) is unreachable"
            )

    async def test_default_deny_without_a_token_in_the_table(self) -> None:
        async with ConsulAgent(acl_token="the-token", anonymous_reads="filter") as agent:
            registry = Registry(agent, token="the-token")
            try:
                await registry.register("w1", free_port())
                async with consul_router(agent) as stub:

                    async def answered() -> bool:
                        return (await table(stub)).discovery.seconds_since_last_success >= 0

                    await assert_eventually(answered, timeout=5)
                    reply = await table(stub)
            finally:
                await registry.close()
        assert not reply.workers
        assert not reply.discovery.healthy
        assert "no ACL token" in reply.discovery.last_error
        assert "default policy is deny" in reply.discovery.last_error

    async def test_static_discovery_status(self) -> None:
        worker = FakeWorker("w1")
        async with FakeServer.for_worker(worker) as server:
            config = RouterConfig(
                port=0, metrics_port=-1, cache_address="", workers=(server.address,)
            )
            runner = ServiceRunner(RouterApp(config), config, name="router")
            await runner.start()
            try:
                async with grpc.aio.insecure_channel(runner.address) as channel:
                    status = (await table(router_pb2_grpc.RouterStub(channel))).discovery
            finally:
                await runner.shutdown(grace=timedelta(0))
        assert (status.source, status.target, status.healthy) == ("static", server.address, True)
        assert status.seconds_since_last_success == -1.0


class TestRouterConfig:
    """--discovery consul needs no worker list, and checks the Consul settings at once."""

    def test_consul_flags(self) -> None:
        config = load_config(
            [
                "--discovery",
                "consul",
                "--consul-addr",
                "10.0.0.5:8500",
                "--consul-watch-wait",
                "5s",
            ],
            environ={"CONSUL_HTTP_TOKEN": "from-env"},
        )
        assert (config.discovery, config.consul_addr) == ("consul", "10.0.0.5:8500")
        assert config.consul_watch_wait == timedelta(seconds=5)
        assert "from-env" not in repr(config)

    def test_bad_consul_address_stops_the_router(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            load_config(["--discovery", "consul"], environ={"CONSUL_HTTP_ADDR": "nonsense"})
        assert "consul_addr: 'nonsense' is not host:port" in capsys.readouterr().err

    @pytest.mark.parametrize("wait", ["0s", "11m"])
    def test_watch_wait_is_bounded(self, wait: str, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            load_config(["--discovery", "consul", "--consul-watch-wait", wait], environ={})
        assert "consul_watch_wait" in capsys.readouterr().err
