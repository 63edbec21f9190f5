"""The agent's HTTP API: lifecycle (start, stop, outages, restarts), routing, ACL tokens and the
handlers of the endpoints llm-mesh uses, over the state of
:class:`~tests.consul_agent._local_state.LocalState`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from types import TracebackType
from typing import Any, Literal

from aiohttp import web

from tests.consul_agent._decoding import (
    bool_field,
    check_list,
    decode_error,
    int_field,
    is_ipv4,
    json_object,
    normalize_keys,
    parse_check,
    parse_go_bool,
    parse_wait,
    str_field,
    str_list_field,
    str_map_field,
    validate_meta,
)
from tests.consul_agent._errors import HTTPError
from tests.consul_agent._filter import compile_filter
from tests.consul_agent._local_state import SERF_CHECK_ID, LocalState
from tests.consul_agent._state import CRITICAL, PASSING, STATUSES, WARNING, Check, Service

#: Consul's limits and defaults.
DEFAULT_QUERY_TIME = 300.0
MAX_QUERY_TIME = 600.0
JITTER_FRACTION = 16
MAINT_PREFIX = "_service_maintenance:"
DEFAULT_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. "
    "This is a default message."
)
ANONYMOUS_HINT = ". The anonymous token is used implicitly when a request does not specify a token."


class ConsulAgent(LocalState):
    """A one-node Consul agent (``consul agent -dev``) in the running event loop, on 127.0.0.1."""

    def __init__(
        self,
        *,
        acl_token: str | None = None,
        anonymous_reads: Literal["refuse", "filter"] = "refuse",
        reap_interval: float = 30.0,
        min_deregister_after: float = 60.0,
        node: str = "node-1",
        node_address: str = "127.0.0.1",
        datacenter: str = "dc1",
        min_check_interval: float = 1.0,
    ) -> None:
        super().__init__(
            reap_interval=reap_interval,
            min_deregister_after=min_deregister_after,
            min_check_interval=min_check_interval,
        )
        self._acl_token = acl_token
        if anonymous_reads not in ("refuse", "filter"):
            raise ValueError(f"anonymous_reads: {anonymous_reads!r} is not refuse or filter")
        self._anonymous_reads = anonymous_reads
        self._node = node
        self._node_address = node_address
        self._datacenter = datacenter
        self._node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.llmmesh.test"))
        self.requests: list[tuple[str, str]] = []
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._started = False

    # ---- lifecycle -------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port it listens on (0 before :meth:`start`)."""
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, what ``--consul-addr`` and ``CONSUL_HTTP_ADDR`` take."""
        return f"127.0.0.1:{self._port}"

    @property
    def index(self) -> int:
        """The current raft-like modify index."""
        return self._index

    @property
    def is_up(self) -> bool:
        """Whether it is listening."""
        return self._runner is not None

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port and start the reaper."""
        if self._started:
            raise RuntimeError("ConsulAgent already started")
        self._started = True
        await self._listen()
        self._reaper = asyncio.create_task(self._reap_loop(), name="consul-agent-reaper")

    async def stop(self) -> None:
        """Stop listening and stop every timer, probe and the reaper. Idempotent."""
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for check in list(self._checks.values()):
            self._stop_runner(check)
        await self._drain_probe_tasks()
        await self._unlisten()
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> ConsulAgent:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def go_down(self) -> None:
        """Stop listening and drop open connections; state, timers and probes carry on."""
        await self._unlisten()

    async def come_back(self) -> None:
        """Listen again on the same port, with the state it had."""
        if self._runner is None:
            await self._listen()

    async def restart(self, *, forget: bool = True, reset_index: bool = False) -> None:
        """Restart on the same port; ``forget`` drops every service and check (a dev agent).

        The index keeps rising (every forgotten service name changes) unless ``reset_index``,
        which starts it again at 1 as a fresh dev agent would.
        """
        await self._unlisten()
        if forget:
            for check in list(self._checks.values()):
                self._stop_runner(check)
            await self._drain_probe_tasks()
            if reset_index:
                self._reset_state(index=1)
            else:
                names = {service.name for service in self._services.values()}
                self._services.clear()
                self._checks = {SERF_CHECK_ID: self._serf_check()}
                index = self._commit(names)
                self._extinction_index = index
        elif reset_index:
            raise ValueError("reset_index needs forget=True")
        await self._listen()

    # ---- inspection ------------------------------------------------------------------------------

    def services(self) -> dict[str, dict[str, Any]]:
        """Registered services by id, as ``GET /v1/agent/services`` shows them."""
        return {sid: s.agent_json(self._datacenter) for sid, s in self._services.items()}

    def checks(self) -> dict[str, dict[str, Any]]:
        """Checks by id, as ``GET /v1/agent/checks`` shows them (without ``serfHealth``)."""
        return {
            cid: c.json(self._node, catalog=False)
            for cid, c in self._checks.items()
            if cid != SERF_CHECK_ID
        }

    # ---- listening -------------------------------------------------------------------------------

    async def _listen(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.05, handler_cancellation=True
        )
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self._port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        if self._port == 0:
            self._port = int(runner.addresses[0][1])
        self._runner = runner

    async def _unlisten(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ---- HTTP ------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        path, method = request.path, request.method
        self.requests.append((method, path))
        route = self._route(path)
        if route is None:
            return self._respond(web.Response(status=404), self._index)
        handler, methods, arg = route
        try:
            if method not in methods:
                raise HTTPError(405, f"method {method} not allowed")
            response = await handler(request, arg)
        except HTTPError as exc:
            response = web.Response(
                status=exc.status, text=exc.reason, content_type="text/plain", charset="utf-8"
            )
            if exc.status == 405:
                response.headers["Allow"] = ",".join(("OPTIONS", *methods))
        if path.startswith("/v1/health/service/"):
            return self._respond(response, self._health_index(arg))
        return self._respond(response, self._index)

    def _respond(self, response: web.Response, index: int) -> web.Response:
        response.headers["X-Consul-Index"] = str(index)
        # Every response since Consul 1.9 (agent/http.go setACLDefaultPolicy): the agent's
        # acl.default_policy, "allow" when ACLs are off. With a token configured we are a
        # default-deny agent.
        response.headers["X-Consul-Default-ACL-Policy"] = (
            "allow" if self._acl_token is None else "deny"
        )
        return response

    def _route(self, path: str) -> tuple[Any, tuple[str, ...], str] | None:
        exact: dict[str, tuple[Any, tuple[str, ...]]] = {
            "/v1/agent/service/register": (self._h_register, ("PUT",)),
            "/v1/agent/services": (self._h_services, ("GET",)),
            "/v1/agent/checks": (self._h_checks, ("GET",)),
            "/v1/agent/self": (self._h_self, ("GET",)),
            "/v1/status/leader": (self._h_leader, ("GET",)),
        }
        if path in exact:
            handler, methods = exact[path]
            return handler, methods, ""
        prefixes: list[tuple[str, Any, tuple[str, ...]]] = [
            ("/v1/agent/service/deregister/", self._h_deregister, ("PUT",)),
            ("/v1/agent/service/maintenance/", self._h_maintenance, ("PUT",)),
            ("/v1/agent/check/pass/", self._h_check_pass, ("PUT",)),
            ("/v1/agent/check/warn/", self._h_check_warn, ("PUT",)),
            ("/v1/agent/check/fail/", self._h_check_fail, ("PUT",)),
            ("/v1/agent/check/update/", self._h_check_update, ("PUT",)),
            ("/v1/health/service/", self._h_health_service, ("GET",)),
            ("/v1/agent/service/", self._h_service, ("GET",)),
        ]
        for prefix, handler, methods in prefixes:
            if path.startswith(prefix):
                return handler, methods, path[len(prefix) :]
        return None

    def _json(self, obj: Any, **headers: str) -> web.Response:
        response = web.Response(text=json.dumps(obj), content_type="application/json")
        response.headers.update(headers)
        return response

    # ---- ACL -------------------------------------------------------------------------------------

    def _resolve_token(self, request: web.Request) -> bool:
        """Whether the request's token grants everything; raises 403 for an unknown token."""
        if self._acl_token is None:
            return True
        token = request.headers.get("X-Consul-Token", "")
        if not token:
            auth = request.headers.get("Authorization", "")
            if auth.lower().startswith("bearer "):
                token = auth[7:].strip()
        token = request.query.get("token", "") or token
        if not token:
            return False
        if token != self._acl_token:
            raise HTTPError(403, "ACL not found")
        return True

    @staticmethod
    def _require(allowed: bool, permission: str, resource: str) -> None:
        if not allowed:
            raise HTTPError(
                403,
                f"Permission denied: anonymous token lacks permission '{permission}' on "
                f'"{resource}"{ANONYMOUS_HINT}',
            )

    def _common_query(self, request: web.Request) -> None:
        query = request.query
        if "stale" in query and "consistent" in query:
            raise HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        dc = query.get("dc", "")
        if dc and dc != self._datacenter:
            raise HTTPError(500, "No path to datacenter")

    # ---- handlers --------------------------------------------------------------------------------

    async def _h_register(self, request: web.Request, _: str) -> web.Response:
        body = await json_object(request, "ServiceDefinition", "structs.ServiceDefinition")
        name = str_field(body, "name", "Name")
        if not name:
            raise HTTPError(400, "Missing service name")
        address = str_field(body, "address", "Address")
        service_id = str_field(body, "id", "ID") or name
        tags = str_list_field(body, "tags", "Tags")
        port = int_field(body, "port", "Port")
        meta = str_map_field(body, "meta", "Meta")
        enable_tag_override = bool_field(body, "enabletagoverride", "EnableTagOverride")
        tagged = body.get("taggedaddresses") or {}
        if not isinstance(tagged, dict):
            raise decode_error("TaggedAddresses", tagged, "map[string]structs.ServiceAddress")
        if address in ("0.0.0.0", "::", "[::]"):
            raise HTTPError(400, "Invalid service address")
        allowed = self._resolve_token(request)
        weights_raw = body.get("weights")
        weights = {"Passing": 1, "Warning": 1}
        if weights_raw is not None:
            if not isinstance(weights_raw, dict):
                raise decode_error("Weights", weights_raw, "structs.Weights")
            w = normalize_keys(weights_raw)
            weights = {
                "Passing": int_field(w, "passing", "Weights.Passing"),
                "Warning": int_field(w, "warning", "Weights.Warning"),
            }
            if weights["Passing"] < 1:
                raise HTTPError(400, "Invalid Weights: Passing must be greater than 0")
        validate_meta(meta or {})
        specs = [
            spec
            for spec in [parse_check(body.get("check"), "Check")]
            + [parse_check(raw_check, "Checks") for raw_check in check_list(body.get("checks"))]
            if spec is not None
        ]
        for spec in specs:
            if spec.status and spec.status not in STATUSES:
                raise HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
        self._require(allowed, "service:write", name)
        existing = self._services.get(service_id)
        if existing is not None:
            self._require(allowed, "service:write", existing.name)
        tagged_addresses = {str(k): dict(v) for k, v in tagged.items() if isinstance(v, dict)}
        if is_ipv4(address):
            for key in ("lan_ipv4", "wan_ipv4"):
                tagged_addresses.setdefault(key, {"Address": address, "Port": port})
        service = Service(
            id=service_id,
            name=name,
            tags=tags,
            address=address,
            port=port,
            meta=meta,
            weights=weights,
            enable_tag_override=enable_tag_override,
            tagged_addresses=tagged_addresses,
        )
        replace_param = request.query.getall("replace-existing-checks", [])
        replace_existing = bool(replace_param) and replace_param[0] in ("", "true")
        self._register(service, specs, replace_existing=replace_existing)
        return web.Response()

    def _existing_service(self, service_id: str) -> Service:
        service = self._services.get(service_id)
        if service is None:
            raise HTTPError(
                404,
                f'Unknown service ID "{service_id}". Ensure that the service ID is passed, '
                "not the service name.",
            )
        return service

    def _existing_check(self, check_id: str) -> Check:
        check = self._checks.get(check_id)
        if check is None:
            raise HTTPError(
                404,
                f'Unknown check ID "{check_id}". Ensure that the check ID is passed, '
                "not the check name.",
            )
        return check

    async def _h_deregister(self, request: web.Request, service_id: str) -> web.Response:
        allowed = self._resolve_token(request)
        service = self._existing_service(service_id)
        self._require(allowed, "service:write", service.name)
        self._deregister(service_id)
        return web.Response()

    async def _h_maintenance(self, request: web.Request, service_id: str) -> web.Response:
        if not service_id:
            raise HTTPError(400, "Missing service ID")
        if "enable" not in request.query:
            raise HTTPError(400, "Missing value for enable")
        raw = request.query["enable"]
        try:
            enable = parse_go_bool(raw)
        except ValueError:
            raise HTTPError(400, f"Invalid value for enable: {json.dumps(raw)}") from None
        allowed = self._resolve_token(request)
        service = self._existing_service(service_id)
        self._require(allowed, "service:write", service.name)
        check_id = MAINT_PREFIX + service_id
        if enable and check_id not in self._checks:
            check = Check(
                check_id=check_id,
                name="Service Maintenance Mode",
                service_id=service.id,
                service_name=service.name,
                service_tags=list(service.tags or []),
                type="maintenance",
                notes=request.query.get("reason", "") or DEFAULT_MAINT_REASON,
                status=CRITICAL,
                output="",
            )
            self._checks[check_id] = check
            check.create_index = check.modify_index = self._commit({service.name})
        elif not enable and check_id in self._checks:
            del self._checks[check_id]
            self._commit({service.name})
        return web.Response()

    async def _ttl_endpoint(
        self, request: web.Request, check_id: str, status: str, output: str
    ) -> web.Response:
        allowed = self._resolve_token(request)
        check = self._existing_check(check_id)
        if check.service_id:
            self._require(allowed, "service:write", check.service_name)
        else:
            self._require(allowed, "node:write", self._node)
        if check.spec is None or check.spec.ttl <= 0:
            raise HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
        self._ttl_update(check, status, output)
        return web.Response()

    async def _h_check_pass(self, request: web.Request, check_id: str) -> web.Response:
        return await self._ttl_endpoint(request, check_id, PASSING, request.query.get("note", ""))

    async def _h_check_warn(self, request: web.Request, check_id: str) -> web.Response:
        return await self._ttl_endpoint(request, check_id, WARNING, request.query.get("note", ""))

    async def _h_check_fail(self, request: web.Request, check_id: str) -> web.Response:
        return await self._ttl_endpoint(request, check_id, CRITICAL, request.query.get("note", ""))

    async def _h_check_update(self, request: web.Request, check_id: str) -> web.Response:
        body = await json_object(request, "checkUpdate", "agent.checkUpdate")
        status = str_field(body, "status", "Status")
        if status not in STATUSES:
            raise HTTPError(400, f"Invalid check status: '{status}'")
        output = str_field(body, "output", "Output")
        return await self._ttl_endpoint(request, check_id, status, output)

    async def _h_health_service(self, request: web.Request, name: str) -> web.Response:
        query = request.query
        self._common_query(request)
        min_index, wait = parse_wait(query)
        if not name:
            raise HTTPError(400, "Missing service name")
        passing = False
        if "passing" in query:
            raw = query["passing"]
            try:
                passing = raw == "" or parse_go_bool(raw)
            except ValueError:
                raise HTTPError(400, "Invalid value for ?passing") from None
        allowed = self._resolve_token(request)
        if self._anonymous_reads == "refuse":
            self._require(allowed, "service:read", name)
        match = compile_filter(query.get("filter", ""))
        if min_index > 0:
            await self._block(name, min_index, wait)
        tags = query.getall("tag", [])
        entries = []
        node_checks = [c for c in self._checks.values() if not c.service_id]
        for service in sorted(self._services.values(), key=lambda s: s.id):
            if service.name != name or not all(tag in (service.tags or []) for tag in tags):
                continue
            checks = [c for c in self._checks.values() if c.service_id == service.id]
            checks = sorted(checks + node_checks, key=lambda c: c.check_id)
            if passing and any(c.status != PASSING for c in checks):
                continue
            entry = {
                "Node": self._node_json(),
                "Service": service.catalog_json(),
                "Checks": [c.json(self._node, catalog=True) for c in checks],
            }
            if match(entry) and allowed:  # Consul filters what a token may not read
                entries.append(entry)
        return self._json(
            entries,
            **{
                "X-Consul-KnownLeader": "true",
                "X-Consul-LastContact": "0",
                "X-Consul-Effective-Consistency": "leader",
            },
        )

    async def _block(self, name: str, min_index: int, wait: float) -> None:
        """Wait until ``name``'s index passes ``min_index`` or ``wait`` (+ jitter) runs out."""
        if wait <= 0:
            wait = DEFAULT_QUERY_TIME
        wait = min(wait, MAX_QUERY_TIME)
        wait += random.uniform(0, wait / JITTER_FRACTION)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while self._health_index(name) <= min_index:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            changed = self._changed
            try:
                async with asyncio.timeout(remaining):
                    await changed.wait()
            except TimeoutError:
                return

    def _node_json(self) -> dict[str, Any]:
        address = self._node_address
        return {
            "ID": self._node_id,
            "Node": self._node,
            "Address": address,
            "Datacenter": self._datacenter,
            "TaggedAddresses": {
                "lan": address,
                "lan_ipv4": address,
                "wan": address,
                "wan_ipv4": address,
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }

    async def _h_services(self, request: web.Request, _: str) -> web.Response:
        self._require(self._resolve_token(request), "node:read", self._node)
        match = compile_filter(request.query.get("filter", ""))
        services = {sid: s for sid, s in self.services().items() if match(s)}
        return self._json(services)

    async def _h_checks(self, request: web.Request, _: str) -> web.Response:
        self._require(self._resolve_token(request), "node:read", self._node)
        match = compile_filter(request.query.get("filter", ""))
        return self._json({cid: c for cid, c in self.checks().items() if match(c)})

    async def _h_service(self, request: web.Request, service_id: str) -> web.Response:
        allowed = self._resolve_token(request)
        service = self._services.get(service_id)
        if service is None:
            raise HTTPError(404, f"unknown service ID: {service_id}")
        self._require(allowed, "service:read", service.name)
        body = service.agent_json(self._datacenter)
        content_hash = f"{abs(hash(json.dumps(body, sort_keys=True))):016x}"[:16]
        body["ContentHash"] = content_hash
        return self._json(body, **{"X-Consul-ContentHash": content_hash})

    async def _h_self(self, request: web.Request, _: str) -> web.Response:
        self._require(self._resolve_token(request), "agent:read", self._node)
        return self._json(
            {
                "Config": {
                    "Datacenter": self._datacenter,
                    "PrimaryDatacenter": self._datacenter,
                    "NodeName": self._node,
                    "NodeID": self._node_id,
                    "Revision": "llmmesh-test-double",
                    "Server": True,
                    "Version": "1.20.0",
                },
                "Member": {"Name": self._node, "Addr": self._node_address, "Port": 8301},
                "Meta": {"consul-network-segment": ""},
            }
        )

    async def _h_leader(self, request: web.Request, _: str) -> web.Response:
        return self._json(f"{self._node_address}:8300")
