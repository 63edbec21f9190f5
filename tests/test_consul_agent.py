"""The Consul agent double, driven through the real py-consul clients over loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import consul
import consul.aio
import grpc
import grpc.aio
import pytest
from aiohttp import web
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.consul_agent import (
    ConsulAgent,
    ThreadedConsulAgent,
    format_go_duration,
    parse_go_duration,
)
from tests.harness import assert_eventually

pytestmark = pytest.mark.timeout(30)

SERVICE = "llm-worker"
TOKEN = "s3cr3t-token"


@pytest.fixture(autouse=True)
def _no_consul_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-consul reads CONSUL_HTTP_TOKEN, CONSUL_HTTP_SSL...: a developer's must not leak in."""
    for name in (
        "CONSUL_HTTP_ADDR",
        "CONSUL_HTTP_TOKEN",
        "CONSUL_HTTP_SSL",
        "CONSUL_HTTP_SSL_VERIFY",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def agent() -> AsyncIterator[ConsulAgent]:
    """An agent whose reaper and probes run fast enough for tests."""
    async with ConsulAgent(
        reap_interval=0.05, min_deregister_after=0.3, min_check_interval=0.05
    ) as consul_agent:
        yield consul_agent


@asynccontextmanager
async def open_client(agent: ConsulAgent, token: str | None = None) -> AsyncIterator[Any]:
    """A py-consul asyncio client for ``agent``, closed on exit."""
    # py-consul 1.8.0 builds its aiohttp connector with arguments aiohttp deprecates.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", r"(ssl_context|verify_ssl) is deprecated", DeprecationWarning
        )
        client = consul.aio.Consul(host="127.0.0.1", port=agent.port, token=token)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def client(agent: ConsulAgent) -> AsyncIterator[Any]:
    async with open_client(agent) as c:
        yield c


async def http(
    agent: ConsulAgent, method: str, path: str, *, body: Any = None, **headers: str
) -> tuple[int, str, dict[str, str]]:
    """One raw request: status, body text and headers."""
    data = None if body is None else json.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, f"http://{agent.address}{path}", data=data, headers=headers
        ) as response,
    ):
        return response.status, await response.text(), dict(response.headers)


async def register(
    client: Any, service_id: str, *, ttl: str = "10s", deregister: str | None = None, **kw: Any
) -> None:
    check = consul.Check.ttl(ttl)
    if deregister:
        check["DeregisterCriticalServiceAfter"] = deregister
    kw.setdefault("address", "127.0.0.1")
    kw.setdefault("port", 50061)
    assert await client.agent.service.register(
        kw.pop("name", SERVICE), service_id=service_id, check=check, **kw
    )


async def health(client: Any, **kw: Any) -> tuple[int, list[dict[str, Any]]]:
    index, nodes = await client.health.service(kw.pop("name", SERVICE), **kw)
    return int(index), nodes


def ids(nodes: list[dict[str, Any]]) -> list[str]:
    return [entry["Service"]["ID"] for entry in nodes]


class TestRegistration:
    """Service registration and TTL checks have Consul's shapes and semantics."""

    async def test_a_new_ttl_check_starts_critical_in_consul_shapes(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1", tags=["sim"], meta={"model": "m1", "capacity": "4"})

        _, nodes = await health(client)
        [entry] = nodes
        assert entry["Node"]["Node"] == "node-1"
        assert entry["Node"]["Address"] == "127.0.0.1"
        assert entry["Node"]["Datacenter"] == "dc1"
        service = entry["Service"]
        assert {k: service[k] for k in ("ID", "Service", "Tags", "Address", "Port", "Meta")} == {
            "ID": "w1",
            "Service": SERVICE,
            "Tags": ["sim"],
            "Address": "127.0.0.1",
            "Port": 50061,
            "Meta": {"model": "m1", "capacity": "4"},
        }
        checks = {c["CheckID"]: c for c in entry["Checks"]}
        assert set(checks) == {"serfHealth", "service:w1"}
        assert checks["serfHealth"]["Status"] == "passing"
        assert checks["service:w1"]["Status"] == "critical"
        assert checks["service:w1"]["Name"] == f"Service '{SERVICE}' check"
        assert checks["service:w1"]["ServiceID"] == "w1"
        assert checks["service:w1"]["Type"] == "ttl"
        assert agent.checks()["service:w1"]["Status"] == "critical"
        assert agent.services()["w1"]["Meta"] == {"model": "m1", "capacity": "4"}
        assert await client.agent.services() == agent.services()
        assert set(await client.agent.checks()) == {"service:w1"}

    async def test_passing_after_ttl_pass_and_critical_when_the_ttl_runs_out(
        self, client: Any
    ) -> None:
        await register(client, "w1", ttl="300ms")
        await register(client, "w2", ttl="300ms")

        assert await client.agent.check.ttl_pass("service:w1", "engine ok")
        _, nodes = await health(client, passing=True)
        assert ids(nodes) == ["w1"]
        assert nodes[0]["Checks"][1]["Output"] == "engine ok"

        async def both_expired() -> bool:
            checks = await client.agent.checks()
            return all(c["Status"] == "critical" for c in checks.values())

        await assert_eventually(both_expired, timeout=5)
        checks = await client.agent.checks()
        assert checks["service:w1"]["Output"] == (
            "TTL expired (last output before timeout follows): engine ok"
        )
        assert checks["service:w2"]["Output"] == "TTL expired"
        assert (await health(client, passing=True))[1] == []

    async def test_check_ids_initial_status_and_check_with_checks(self, agent: ConsulAgent) -> None:
        body = {
            "Name": SERVICE,
            "ID": "w1",
            "Check": {"TTL": "10s"},
            "Checks": [{"TTL": "10s", "Status": "passing"}, {"TTL": "10s", "CheckID": "mine"}],
        }
        status, _, _ = await http(agent, "PUT", "/v1/agent/service/register", body=body)
        assert status == 200
        one = {"name": SERVICE, "id": "w2", "check": {"ttl": "10s", "status": "warning"}}
        assert (await http(agent, "PUT", "/v1/agent/service/register", body=one))[0] == 200

        statuses = {cid: c["Status"] for cid, c in agent.checks().items()}
        assert statuses == {
            "service:w1:1": "critical",
            "service:w1:2": "passing",
            "mine": "critical",
            "service:w2": "warning",
        }

    async def test_reregistering_keeps_status_and_replace_existing_checks_drops_the_rest(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await client.agent.service.register(
            SERVICE, service_id="w1", check=consul.Check.ttl("10s"),
            extra_checks=[consul.Check.ttl("10s")],
        )  # fmt: skip
        assert set(agent.checks()) == {"service:w1:1", "service:w1:2"}
        assert await client.agent.check.ttl_pass("service:w1:1")

        await client.agent.service.register(
            SERVICE, service_id="w1", check=consul.Check.ttl("10s"),
            extra_checks=[consul.Check.ttl("10s")],
        )  # fmt: skip
        assert agent.checks()["service:w1:1"]["Status"] == "passing"

        await register(client, "w1")
        assert set(agent.checks()) == {"service:w1", "service:w1:1", "service:w1:2"}
        await register(client, "w1", replace_existing_checks=True)
        assert set(agent.checks()) == {"service:w1"}

    async def test_warn_fail_and_update_set_the_status(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1")
        assert await client.agent.check.ttl_warn("service:w1", "busy")
        assert agent.checks()["service:w1"]["Status"] == "warning"
        assert (await health(client, passing=True))[1] == []

        update = {"Status": "passing", "Output": "back"}
        assert (await http(agent, "PUT", "/v1/agent/check/update/service:w1", body=update))[
            0
        ] == 200
        assert agent.checks()["service:w1"]["Output"] == "back"
        assert ids((await health(client, passing=True))[1]) == ["w1"]

        assert await client.agent.check.ttl_fail("service:w1")
        assert agent.checks()["service:w1"]["Status"] == "critical"
        bad = await http(agent, "PUT", "/v1/agent/check/update/service:w1", body={"Status": "ok"})
        assert bad[:2] == (400, "Invalid check status: 'ok'")

    @pytest.mark.parametrize(
        ("body", "reason"),
        [
            ({"ID": "x"}, "Missing service name"),
            ({"Name": "s", "Address": "0.0.0.0"}, "Invalid service address"),
            (
                {"Name": "s", "Meta": {"model.name": "m"}},
                "Invalid Service Meta: Couldn't load metadata pair ('model.name', 'm'): "
                "Key contains invalid characters",
            ),
            (
                {"Name": "s", "Check": {"TTL": "1s", "Interval": "1s"}},
                "Invalid check: Interval and TTL cannot both be specified",
            ),
            (
                {"Name": "s", "Check": {"Notes": "n"}},
                "Invalid check: TTL must be > 0 for TTL checks",
            ),
            (
                {"Name": "s", "Check": {"TTL": "1s", "Status": "up"}},
                "Status for checks must 'passing', 'warning', 'critical'",
            ),
            (
                {"Name": "s", "Check": {"TTL": "ten"}},
                'Request decode failed: time: invalid duration "ten"',
            ),
        ],
    )
    async def test_invalid_registrations_are_400_with_consuls_reason(
        self, agent: ConsulAgent, body: dict[str, Any], reason: str
    ) -> None:
        status, text, _ = await http(agent, "PUT", "/v1/agent/service/register", body=body)
        assert (status, text) == (400, reason)
        assert agent.services() == {}


class TestReaping:
    """DeregisterCriticalServiceAfter removes a service critical for too long, not before."""

    async def test_a_critical_service_is_reaped_and_a_passing_one_is_kept(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        start = time.monotonic()
        await register(client, "dead", ttl="200ms", deregister="10ms")
        await register(client, "alive", ttl="200ms", deregister="10ms")

        async def heartbeat() -> None:
            while True:
                await client.agent.check.ttl_pass("service:alive")
                await asyncio.sleep(0.05)

        beating = asyncio.create_task(heartbeat())
        try:
            await assert_eventually(lambda: "dead" not in agent.services(), timeout=5)
            # The TTL (0.2 s) runs out, then the clock runs the 0.3 s minimum, not 10 ms.
            assert time.monotonic() - start >= 0.5
            assert "alive" in agent.services()
            assert not any(c["ServiceID"] == "dead" for c in agent.checks().values())
            assert await client.agent.check.ttl_pass("service:dead") is False
        finally:
            beating.cancel()


class TestDeregistrationAndMaintenance:
    """Deregistration removes checks; maintenance adds a critical check."""

    async def test_deregister_removes_the_service_and_its_checks(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1")
        assert await client.agent.service.deregister("w1")
        assert agent.services() == {}
        assert agent.checks() == {}

    async def test_deregistering_an_unknown_service_changes_nothing_and_is_404(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1")
        index = agent.index
        status, text, _ = await http(agent, "PUT", "/v1/agent/service/deregister/nope")
        assert (status, text) == (
            404,
            'Unknown service ID "nope". Ensure that the service ID is passed, not the service '
            "name.",
        )
        assert await client.agent.service.deregister("nope") is False
        assert set(agent.services()) == {"w1"}
        assert agent.index == index

    async def test_maintenance_adds_a_critical_check_that_filters_the_service_out(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1")
        assert await client.agent.check.ttl_pass("service:w1")
        assert await client.agent.service.maintenance("w1", True, reason="draining")
        check = agent.checks()["_service_maintenance:w1"]
        assert (check["Status"], check["Notes"], check["ServiceID"]) == (
            "critical",
            "draining",
            "w1",
        )
        assert (await health(client, passing=True))[1] == []

        assert await client.agent.service.maintenance("w1", False)
        assert ids((await health(client, passing=True))[1]) == ["w1"]
        assert (await http(agent, "PUT", "/v1/agent/service/maintenance/w1"))[:2] == (
            400,
            "Missing value for enable",
        )
        assert (await http(agent, "PUT", "/v1/agent/service/maintenance/x?enable=true"))[0] == 404

    async def test_an_unknown_check_is_404(self, agent: ConsulAgent, client: Any) -> None:
        status, text, headers = await http(agent, "PUT", "/v1/agent/check/pass/service:nope")
        assert (status, text) == (
            404,
            'Unknown check ID "service:nope". Ensure that the check ID is passed, not the check '
            "name.",
        )
        assert int(headers["X-Consul-Index"]) == agent.index
        assert await client.agent.check.ttl_pass("service:nope") is False


class TestHealthQueries:
    """The health endpoint filters by passing, tag and filter expression."""

    async def test_passing_tag_and_filter(self, agent: ConsulAgent, client: Any) -> None:
        await register(client, "a", tags=["sim", "v1"], meta={"model": "m1"}, port=1)
        await register(client, "b", tags=["sim"], meta={"model": "m2"}, port=2)
        await register(client, "c", tags=["trt"], meta={"model": "m1"}, port=3)
        for check_id in ("service:a", "service:b"):
            assert await client.agent.check.ttl_pass(check_id)

        assert ids((await health(client))[1]) == ["a", "b", "c"]
        assert ids((await health(client, passing=True))[1]) == ["a", "b"]
        assert ids((await health(client, tag="sim"))[1]) == ["a", "b"]
        assert ids((await health(client, tag=["sim", "v1"]))[1]) == ["a"]
        expressions = {
            'Service.Meta.model == "m1"': ["a", "c"],
            '"sim" in Service.Tags and Service.Port != 1': ["b"],
            'not (Service.Meta.model == "m1") or Service.ID matches "^c"': ["b", "c"],
            'Checks.Status == "critical"': ["c"],
        }
        for expression, expected in expressions.items():
            assert ids((await health(client, filter_expr=expression))[1]) == expected
        bad = await http(agent, "GET", f"/v1/health/service/{SERVICE}?filter=Service.ID%20%3D%3D")
        assert bad[0] == 400

    async def test_an_unknown_service_is_an_empty_list_with_an_index(self, client: Any) -> None:
        index, nodes = await health(client, name="nobody")
        assert nodes == []
        assert index >= 1

    async def test_a_bad_passing_value_is_400(self, agent: ConsulAgent) -> None:
        status, text, _ = await http(agent, "GET", f"/v1/health/service/{SERVICE}?passing=maybe")
        assert (status, text) == (400, "Invalid value for ?passing")


class TestBlockingQueries:
    """A blocking query returns on a change to its service, else after ``wait``."""

    async def test_returns_promptly_on_a_change_with_a_higher_index(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1")
        index, _ = await health(client, passing=True)
        gets = len(agent.requests)
        start = time.monotonic()
        query = asyncio.create_task(health(client, passing=True, index=index, wait="20s"))
        await assert_eventually(lambda: len(agent.requests) > gets)
        await asyncio.sleep(0.05)
        assert not query.done()

        assert await client.agent.check.ttl_pass("service:w1")
        new_index, nodes = await asyncio.wait_for(query, timeout=5)
        assert time.monotonic() - start < 3
        assert new_index > index
        assert ids(nodes) == ["w1"]

    async def test_returns_after_wait_when_only_heartbeats_arrive(self, client: Any) -> None:
        """Heartbeats that repeat the status change nothing a blocking query watches."""
        await register(client, "w1")
        assert await client.agent.check.ttl_pass("service:w1", "ok")
        index, _ = await health(client)

        async def heartbeat() -> None:
            beat = 0
            while True:
                beat += 1
                await client.agent.check.ttl_pass("service:w1", f"beat {beat}")
                await asyncio.sleep(0.03)

        beating = asyncio.create_task(heartbeat())
        try:
            start = time.monotonic()
            new_index, nodes = await health(client, index=index, wait="400ms")
            elapsed = time.monotonic() - start
        finally:
            beating.cancel()
        assert 0.4 <= elapsed < 0.4 * 17 / 16 + 1.0
        assert new_index == index
        assert ids(nodes) == ["w1"]
        # New output with the same status stays on the agent; the catalog gets it later.
        assert nodes[0]["Checks"][1]["Output"] == "ok"
        assert (await client.agent.checks())["service:w1"]["Output"].startswith("beat ")

    async def test_an_unrelated_service_does_not_wake_it(self, client: Any) -> None:
        await register(client, "w1")
        index, _ = await health(client)
        query = asyncio.create_task(health(client, index=index, wait="400ms"))
        await register(client, "other", name="another-service")
        new_index, _ = await asyncio.wait_for(query, timeout=5)
        assert new_index == index

    async def test_a_registration_wakes_a_query_for_a_missing_service(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        index, nodes = await health(client)
        assert nodes == []
        query = asyncio.create_task(health(client, index=index, wait="20s"))
        await register(client, "w1")
        new_index, nodes = await asyncio.wait_for(query, timeout=5)
        assert new_index > index
        assert ids(nodes) == ["w1"]
        assert new_index == agent.index

    async def test_wait_without_index_does_not_block(self, agent: ConsulAgent) -> None:
        start = time.monotonic()
        status, _, headers = await http(agent, "GET", f"/v1/health/service/{SERVICE}?wait=10s")
        assert status == 200
        assert time.monotonic() - start < 2
        assert int(headers["X-Consul-Index"]) >= 1

    @pytest.mark.parametrize(
        ("query", "reason"),
        [("index=1&wait=soon", "Invalid wait time"), ("index=-1", "Invalid index")],
    )
    async def test_bad_index_or_wait_is_400(
        self, agent: ConsulAgent, query: str, reason: str
    ) -> None:
        status, text, _ = await http(agent, "GET", f"/v1/health/service/{SERVICE}?{query}")
        assert (status, text) == (400, reason)

    async def test_the_index_rises_with_every_change_and_is_on_every_response(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        seen = [agent.index]
        await register(client, "w1")
        seen.append(agent.index)
        await client.agent.check.ttl_pass("service:w1")
        seen.append(agent.index)
        await client.agent.service.deregister("w1")
        seen.append(agent.index)
        assert seen == sorted(set(seen))
        for method, path in [
            ("GET", "/v1/agent/services"),
            ("PUT", "/v1/agent/check/pass/nope"),
            ("GET", "/v1/nothing-here"),
            ("GET", "/v1/status/leader"),
        ]:
            _, _, headers = await http(agent, method, path)
            assert int(headers["X-Consul-Index"]) == agent.index


class TestAcl:
    """With an ACL token configured, requests without it are refused."""

    async def test_default_policy_header_on_every_response(self) -> None:
        async with ConsulAgent() as open_agent, ConsulAgent(acl_token=TOKEN) as acl_agent:
            _, _, headers = await http(open_agent, "GET", f"/v1/health/service/{SERVICE}")
            assert headers["X-Consul-Default-ACL-Policy"] == "allow"
            status, _, headers = await http(acl_agent, "GET", f"/v1/health/service/{SERVICE}")
            assert (status, headers["X-Consul-Default-ACL-Policy"]) == (403, "deny")

    async def test_filtered_anonymous_reads_answer_an_empty_list(self) -> None:
        """As Consul does: a read the anonymous token may not make is filtered, not refused."""
        async with (
            ConsulAgent(acl_token=TOKEN, anonymous_reads="filter") as agent,
            open_client(agent, token=TOKEN) as trusted,
        ):
            await register(trusted, "w1")
            assert await trusted.agent.check.ttl_pass("service:w1")
            status, text, headers = await http(
                agent, "GET", f"/v1/health/service/{SERVICE}?passing=1"
            )
            assert (status, json.loads(text)) == (200, [])
            assert headers["X-Consul-Default-ACL-Policy"] == "deny"
            assert ids((await health(trusted, passing=True))[1]) == ["w1"]

    async def test_requests_need_the_token(self) -> None:
        async with (
            ConsulAgent(acl_token=TOKEN) as agent,
            open_client(agent) as anonymous,
            open_client(agent, token="wrong") as stranger,
            open_client(agent, token=TOKEN) as trusted,
        ):
            with pytest.raises(consul.ACLPermissionDenied) as denied:
                await register(anonymous, "w1")
            assert str(denied.value) == (
                f"Permission denied: anonymous token lacks permission 'service:write' on "
                f'"{SERVICE}". The anonymous token is used implicitly when a request does not '
                "specify a token."
            )
            with pytest.raises(consul.ACLPermissionDenied, match=r"^ACL not found$"):
                await register(stranger, "w1")
            assert agent.services() == {}

            await register(trusted, "w1")
            assert await trusted.agent.check.ttl_pass("service:w1")
            assert ids((await health(trusted, passing=True))[1]) == ["w1"]
            with pytest.raises(consul.ACLPermissionDenied, match=r"^Permission denied"):
                await health(anonymous)
            with pytest.raises(consul.ACLPermissionDenied, match=r"^Permission denied"):
                await anonymous.agent.check.ttl_pass("service:w1")
            # Existence is checked before permission, as Consul does.
            assert await anonymous.agent.check.ttl_pass("service:nope") is False
            assert await anonymous.status.leader() == "127.0.0.1:8300"
            status, _, _ = await http(
                agent, "GET", "/v1/agent/services", Authorization=f"Bearer {TOKEN}"
            )
            assert status == 200


class TestOutages:
    """The agent can become unreachable and come back, or restart and forget."""

    async def test_down_refuses_connections_and_back_keeps_state(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1", ttl="30s")
        port = agent.port

        await agent.go_down()
        with pytest.raises(aiohttp.ClientConnectorError):
            await client.agent.check.ttl_pass("service:w1")

        await agent.come_back()
        assert agent.port == port
        assert await client.agent.check.ttl_pass("service:w1")
        assert ids((await health(client, passing=True))[1]) == ["w1"]

    async def test_going_down_drops_a_blocking_query(self, agent: ConsulAgent, client: Any) -> None:
        index, _ = await health(client)
        gets = len(agent.requests)
        query = asyncio.create_task(health(client, index=index, wait="20s"))
        await assert_eventually(lambda: len(agent.requests) > gets)
        await agent.go_down()
        with pytest.raises(aiohttp.ClientError):
            await asyncio.wait_for(query, timeout=5)

    async def test_restart_forgetting_answers_404_and_keeps_the_index_rising(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1")
        index, _ = await health(client)

        await agent.restart(forget=True)
        assert await client.agent.check.ttl_pass("service:w1") is False
        assert agent.services() == {}
        new_index, nodes = await health(client, index=index, wait="10s")
        assert nodes == []
        assert new_index > index

    async def test_restart_keeping_state_and_restart_resetting_the_index(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        await register(client, "w1")
        await agent.restart(forget=False)
        assert await client.agent.check.ttl_pass("service:w1")

        before = agent.index
        await agent.restart(forget=True, reset_index=True)
        index, nodes = await health(client)
        assert nodes == []
        assert index < before


class TestProbedChecks:
    """GRPC, HTTP and TCP checks are probed on their interval."""

    async def test_a_grpc_check_follows_the_health_service(
        self, agent: ConsulAgent, client: Any
    ) -> None:
        server = grpc.aio.server()
        servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        target = f"127.0.0.1:{port}/llmmesh.v1.Worker"
        serving = health_pb2.HealthCheckResponse.SERVING
        try:
            await servicer.set("llmmesh.v1.Worker", serving)
            check = consul.Check.grpc(target, "100ms", timeout="1s", deregister="1m")
            assert await client.agent.service.register(
                SERVICE, service_id="w1", address="127.0.0.1", port=port, check=check
            )
            assert agent.checks()["service:w1"]["Status"] == "critical"

            def status() -> tuple[str, str]:
                c = agent.checks()["service:w1"]
                return c["Status"], c["Output"]

            await assert_eventually(lambda: status()[0] == "passing", timeout=5)
            assert status()[1] == f"gRPC check {target}: success"
            assert ids((await health(client, passing=True))[1]) == ["w1"]

            await servicer.set("llmmesh.v1.Worker", health_pb2.HealthCheckResponse.NOT_SERVING)
            await assert_eventually(lambda: status()[0] == "critical", timeout=5)
            assert status()[1] == f"gRPC {target} serving status: NOT_SERVING"

            await servicer.set("llmmesh.v1.Worker", serving)
            await assert_eventually(lambda: status()[0] == "passing", timeout=5)
        finally:
            await server.stop(None)
        await assert_eventually(lambda: status()[0] == "critical", timeout=5)
        assert status()[1].startswith("rpc error: code = Unavailable desc = ")

    async def test_http_and_tcp_checks(self, agent: ConsulAgent, client: Any) -> None:
        answer = {"status": 200}

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(status=answer["status"], text="fine")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            await client.agent.service.register(
                "web", service_id="h", check=consul.Check.http(url, "100ms")
            )
            await client.agent.service.register(
                "web", service_id="t", check=consul.Check.tcp("127.0.0.1", port, "100ms")
            )

            def status(check_id: str) -> str:
                return str(agent.checks()[check_id]["Status"])

            await assert_eventually(
                lambda: status("service:h") == status("service:t") == "passing", timeout=5
            )
            assert agent.checks()["service:h"]["Output"].endswith("200 OK Output: fine")
            answer["status"] = 429
            await assert_eventually(lambda: status("service:h") == "warning", timeout=5)
            answer["status"] = 503
            await assert_eventually(lambda: status("service:h") == "critical", timeout=5)
        finally:
            await runner.cleanup()
        await assert_eventually(lambda: status("service:t") == "critical", timeout=5)


class TestSyncClient:
    """The synchronous py-consul client works against it too."""

    async def test_register_pass_and_query(self, agent: ConsulAgent) -> None:
        def run() -> list[Any]:
            c = consul.Consul(host="127.0.0.1", port=agent.port)
            c.agent.service.register(SERVICE, service_id="w1", check=consul.Check.ttl("10s"))
            c.agent.check.ttl_pass("service:w1")
            _, nodes = c.health.service(SERVICE, passing=True)
            return list(nodes)

        assert ids(await asyncio.to_thread(run)) == ["w1"]


class TestThreadedAgent:
    """An agent on its own thread answers while the test's thread blocks."""

    def test_blocking_callers_are_served_and_outages_work(self) -> None:
        with ThreadedConsulAgent(reap_interval=0.05, min_deregister_after=0.3) as threaded:
            c = consul.Consul(host="127.0.0.1", port=threaded.port)
            c.agent.service.register(SERVICE, service_id="w1", check=consul.Check.ttl("10s"))
            assert c.agent.check.ttl_pass("service:w1")
            assert threaded.checks()["service:w1"]["Status"] == "passing"
            assert ("PUT", "/v1/agent/check/pass/service:w1") in threaded.requests
            port, index = threaded.port, threaded.index

            threaded.go_down()
            with pytest.raises(OSError, match="Connection refused"):  # requests.ConnectionError
                c.agent.services()
            threaded.come_back()
            assert threaded.port == port
            assert set(c.agent.services()) == {"w1"}

            threaded.restart(forget=True)
            assert c.agent.check.ttl_pass("service:w1") is False
            assert threaded.services() == {}
            assert threaded.index > index


class TestGoDurations:
    """Durations are parsed and written as Go's time package does."""

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("5s", 5), ("100ms", 0.1), ("1m30s", 90), ("1.5h", 5400), ("0", 0), ("250us", 0.00025)],
    )
    def test_parse(self, text: str, seconds: float) -> None:
        assert parse_go_duration(text) == pytest.approx(seconds)

    @pytest.mark.parametrize("text", ["", "5", "s", "5x", "1..5s"])
    def test_parse_rejects(self, text: str) -> None:
        with pytest.raises(ValueError, match="time: "):
            parse_go_duration(text)

    @pytest.mark.parametrize(
        ("seconds", "text"),
        [(10, "10s"), (60, "1m0s"), (0.1, "100ms"), (1.5, "1.5s"), (3661, "1h1m1s"), (0, "0s")],
    )
    def test_format(self, seconds: float, text: str) -> None:
        assert format_go_duration(seconds) == text
