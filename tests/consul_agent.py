"""A Consul agent double: the HTTP API subset llm-mesh uses, with Consul's semantics, on loopback.

No Consul binary can be installed where the tests run, so :class:`ConsulAgent` serves the
endpoints of ``/work/shared/briefs/consul.md`` from the test's event loop over real HTTP, for
the real ``py-consul`` client and for service processes alike. It behaves as a ``consul agent
-dev`` (one node that is also the server) and follows hashicorp/consul's own code:

- **Registration.** ``PUT /v1/agent/service/register[?replace-existing-checks]`` takes
  ``Name`` (required), ``ID`` (defaults to ``Name``), ``Tags``, ``Address``, ``Port``, ``Meta``
  (Consul's key rules), ``Weights``, and ``Check`` and/or ``Checks`` (``Check`` first). Keys
  match case-insensitively and in snake case, as Consul's decoder does, so py-consul's lowercase
  payloads work. A check with no ``CheckID`` gets ``service:<ID>``, or ``service:<ID>:<n>``
  (from 1) when the service has several. A new check starts ``critical`` unless ``Status`` is
  given; re-registering keeps the status and output of checks that already exist;
  ``replace-existing-checks`` removes the service's checks that are not in the request.
- **Checks.** TTL checks go ``critical`` with output ``TTL expired`` (``TTL expired (last output
  before timeout follows): <output>`` when the last update had one) when not refreshed within
  their TTL, which starts at registration. ``GRPC`` (``host:port[/service]``, the
  ``grpc.health.v1`` Check over plaintext, or TLS with ``GRPCUseTLS``), ``HTTP`` and ``TCP``
  checks are probed on their ``Interval`` (at least ``min_check_interval``, Consul's 1 s, first
  probe after a random stagger within it) with their ``Timeout`` (default 10 s).
  ``PUT /v1/agent/check/pass|warn|fail/<id>[?note=]`` and ``.../update/<id>`` with ``{"Status",
  "Output"}`` update TTL checks only (500 otherwise); an unknown check id is 404
  ``Unknown check ID "<id>". Ensure that the check ID is passed, not the check name.``
- **Reaping.** A check registered with ``DeregisterCriticalServiceAfter`` that has been critical
  for longer than ``max(that, min_deregister_after)`` removes its service at the next reap tick
  (every ``reap_interval``). As in Consul, the clock starts when the check *becomes* critical:
  a TTL check that never passed starts it when its TTL expires.
- **Deregistration and maintenance.** ``PUT /v1/agent/service/deregister/<id>`` removes the
  service and its checks; an unknown id changes nothing and answers 404 ``Unknown service ID
  "<id>". Ensure that the service ID is passed, not the service name.``, as current Consul does
  although its docs still say "no action is taken" (py-consul returns ``False``, no exception).
  ``PUT /v1/agent/service/maintenance/<id>?enable=true|false[&reason=]`` adds or removes the
  critical check ``_service_maintenance:<id>``.
- **Reads.** ``GET /v1/health/service/<name>`` returns ``[{"Node", "Service", "Checks"}]`` with
  the node's ``serfHealth`` check; ``passing`` drops entries with any non-passing check (warning
  and maintenance included), each ``tag`` must be among the service's tags, and ``filter`` takes
  a subset of Consul's filter language (``==``, ``!=``, ``in``, ``not in``, ``contains``,
  ``matches``, ``is [not] empty``, ``and``/``or``/``not``, parentheses). ``GET
  /v1/agent/services``, ``/v1/agent/checks``, ``/v1/agent/service/<id>``, ``/v1/agent/self`` and
  ``/v1/status/leader`` are there too.
- **Indexes and blocking.** :attr:`ConsulAgent.index` is the raft-like modify index; it rises by
  one per change that reaches the catalog. The health endpoint's ``X-Consul-Index`` is the last
  change to that service name (its last extinction, or the whole catalog's, when it has no
  instance). Only status changes reach the catalog at once: a heartbeat that repeats the status
  with new output updates ``/v1/agent/checks`` but neither the index nor the health endpoint's
  ``Output`` (Consul defers those by minutes). With ``index`` > 0 a health query blocks until its
  index passes ``index`` or ``wait`` runs out (default 5 m, at most 10 m, plus up to wait/16
  jitter); ``wait`` without ``index`` does not block. Every response carries
  ``X-Consul-Index``.
- **ACL.** With ``acl_token`` set, a request must send it (``X-Consul-Token``, ``Authorization:
  Bearer`` or ``?token=``). Another token is 403 ``ACL not found``; none is the anonymous token,
  403 ``Permission denied: anonymous token lacks permission 'service:write' on "<name>". The
  anonymous token is used implicitly when a request does not specify a token.`` (after the 404 of
  an unknown check or service, as in Consul). Unlike Consul, which filters reads down to an empty
  list for the anonymous token, reads are 403 too so that a missing token cannot go unnoticed;
  ``/v1/status/leader`` needs no token, as in Consul.
- **Outages.** :meth:`~ConsulAgent.go_down` stops listening and drops open connections (in-flight
  blocking queries included) while the agent keeps its state and keeps running its TTL timers,
  probes and reaper, like an agent that became unreachable; :meth:`~ConsulAgent.come_back`
  listens on the same port again. :meth:`~ConsulAgent.restart` does both, forgetting every
  service and check with ``forget=True`` (a dev agent's restart); the index keeps rising unless
  ``reset_index=True``, which restarts it low to exercise the client's "index went backwards"
  rule.

Not implemented: script, docker, alias, H2PING, UDP and OS-service checks (400),
``/v1/agent/check/register``, the catalog, KV, sessions, namespaces, peering, streaming.

:class:`ThreadedConsulAgent` runs one on its own loop in a thread, for tests whose loop blocks
(``ServiceProcess.start()``/``.stop()``) while processes talk to Consul.

Keyword arguments beyond the common brief: ``datacenter`` (default ``dc1``; another ``?dc=`` is
500 ``No path to datacenter``), ``min_check_interval`` (default 1 s) and ``restart(...,
reset_index=...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import aiohttp
import grpc
import grpc.aio
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
STATUSES = (PASSING, WARNING, CRITICAL)

#: Consul's limits and defaults.
DEFAULT_QUERY_TIME = 300.0
MAX_QUERY_TIME = 600.0
JITTER_FRACTION = 16
DEFAULT_CHECK_TIMEOUT = 10.0
OUTPUT_MAX_SIZE = 4096
MAINT_PREFIX = "_service_maintenance:"
DEFAULT_MAINT_REASON = (
    "Maintenance mode is enabled for this service, but no reason was provided. "
    "This is a default message."
)
SERF_CHECK_ID = "serfHealth"
T = TypeVar("T")
ANONYMOUS_HINT = ". The anonymous token is used implicitly when a request does not specify a token."


class _HTTPError(Exception):
    """An error answer: status code and Consul's plain-text reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# --- Go durations ---------------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``"5s"``, ``"100ms"``, ``"1m30s"``): time.ParseDuration."""
    original = text
    sign = 1
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f"time: invalid duration {json.dumps(original)}")
    total = 0.0
    while text:
        match = _DURATION_PART.match(text)
        assert match is not None
        whole, frac, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not frac:
            raise ValueError(f"time: invalid duration {json.dumps(original)}")
        if not unit:
            raise ValueError(f"time: missing unit in duration {json.dumps(original)}")
        if unit not in _DURATION_UNITS:
            raise ValueError(
                f"time: unknown unit {json.dumps(unit)} in duration {json.dumps(original)}"
            )
        total += float(f"{whole or 0}.{frac or 0}") * _DURATION_UNITS[unit]
        text = text[match.end() :]
    return sign * total / 1e9


def format_go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` writes it (``"10s"``, ``"1m0s"``, ``"1ms"``)."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns / size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _trim(rest / 1e9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _trim(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")


def _duration_field(raw: Any, key: str) -> float:
    """A duration field of a request body: a Go duration string, or nanoseconds as a number."""
    if raw is None or raw == "":
        return 0.0
    if isinstance(raw, bool):
        raise _HTTPError(400, f"Request decode failed: {key}: cannot decode bool as a duration")
    if isinstance(raw, int | float):
        return raw / 1e9
    if isinstance(raw, str):
        try:
            return parse_go_duration(raw)
        except ValueError as exc:
            raise _HTTPError(400, f"Request decode failed: {exc}") from None
    raise _HTTPError(400, f"Request decode failed: {key}: cannot decode as a duration")


def _parse_go_bool(text: str) -> bool:
    """strconv.ParseBool."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(text)


# --- request bodies -------------------------------------------------------------------------------


def _normalize_keys(body: Mapping[str, Any]) -> dict[str, Any]:
    """Keys lowercased without underscores: Go's case-insensitive decoding plus snake case."""
    return {key.replace("_", "").lower(): value for key, value in body.items()}


async def _json_object(request: web.Request, what: str, go_type: str) -> dict[str, Any]:
    """The request's JSON object body, keys normalized; Consul's 400s for an empty body, bad
    JSON, or JSON that is not an object."""
    raw = await request.read()
    if not raw.strip():
        raise _HTTPError(400, "Request decode failed: EOF")
    try:
        decoded = json.loads(raw)
    except ValueError as exc:
        raise _HTTPError(400, f"Request decode failed: {exc}") from None
    if not isinstance(decoded, dict):
        raise _decode_error(what, decoded, go_type)
    return _normalize_keys(decoded)


def _decode_error(what: str, value: Any, go_type: str) -> _HTTPError:
    kind = {dict: "object", list: "array", str: "string", bool: "bool"}.get(type(value), "number")
    return _HTTPError(
        400,
        f"Request decode failed: json: cannot unmarshal {kind} into Go struct field {what} of "
        f"type {go_type}",
    )


def _str_field(body: Mapping[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _decode_error(what, value, "string")
    return value


def _bool_field(body: Mapping[str, Any], key: str, what: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _decode_error(what, value, "bool")
    return value


def _int_field(body: Mapping[str, Any], key: str, what: str) -> int:
    value = body.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise _decode_error(what, value, "int")
    return int(value)


def _str_list_field(body: Mapping[str, Any], key: str, what: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _decode_error(what, value, "[]string")
    return list(value)


def _str_map_field(body: Mapping[str, Any], key: str, what: str) -> dict[str, str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise _decode_error(what, value, "map[string]string")
    return dict(value)


_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def _validate_meta(meta: Mapping[str, str]) -> None:
    """structs.ValidateServiceMetadata."""
    if len(meta) > 64:
        raise _HTTPError(
            400, "Invalid Service Meta: Node metadata cannot contain more than 64 key/value pairs"
        )
    for key, value in meta.items():
        problem = ""
        if not key:
            problem = "Key cannot be blank"
        elif not _META_KEY.match(key):
            problem = "Key contains invalid characters"
        elif len(key) > 128:
            problem = "Key is too long (limit: 128 characters)"
        elif key.startswith("consul-"):
            problem = "Key prefix 'consul-' is reserved for internal use"
        elif len(value) > 512:
            problem = "Value is too long (limit: 512 characters)"
        if problem:
            raise _HTTPError(
                400,
                f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): "
                f"{problem}",
            )


@dataclass
class _CheckSpec:
    """One check of a registration, validated (structs.CheckType)."""

    check_id: str
    name: str
    notes: str
    status: str
    ttl: float
    interval: float
    timeout: float
    deregister_after: float
    grpc: str
    grpc_use_tls: bool
    http: str
    method: str
    header: dict[str, list[str]]
    tcp: str
    tls_skip_verify: bool
    output_max_size: int

    @property
    def type(self) -> str:
        if self.ttl > 0:
            return "ttl"
        if self.grpc:
            return "grpc"
        if self.http:
            return "http"
        return "tcp"


_UNSUPPORTED_CHECK_KEYS = {
    "args": "script",
    "scriptargs": "script",
    "script": "script",
    "dockercontainerid": "docker",
    "aliasnode": "alias",
    "aliasservice": "alias",
    "h2ping": "H2PING",
    "udp": "UDP",
    "osservice": "OS service",
}


def _parse_check(raw: Any, what: str) -> _CheckSpec | None:
    """A check of a registration body; None when it is empty (Consul ignores an empty Check)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _decode_error(what, raw, "structs.CheckType")
    body = _normalize_keys(raw)
    if not any(value not in (None, "", 0, False, [], {}) for value in body.values()):
        return None
    for key, kind in _UNSUPPORTED_CHECK_KEYS.items():
        if body.get(key):
            raise _HTTPError(
                400, f"Invalid check: {kind} checks are not supported by the Consul test double"
            )
    header_raw = body.get("header") or {}
    if not isinstance(header_raw, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in header_raw.values()
    ):
        raise _decode_error(f"{what}.Header", header_raw, "map[string][]string")
    spec = _CheckSpec(
        check_id=_str_field(body, "checkid", f"{what}.CheckID"),
        name=_str_field(body, "name", f"{what}.Name"),
        notes=_str_field(body, "notes", f"{what}.Notes"),
        status=_str_field(body, "status", f"{what}.Status"),
        ttl=_duration_field(body.get("ttl"), "TTL"),
        interval=_duration_field(body.get("interval"), "Interval"),
        timeout=_duration_field(body.get("timeout"), "Timeout"),
        deregister_after=_duration_field(
            body.get("deregistercriticalserviceafter"), "DeregisterCriticalServiceAfter"
        ),
        grpc=_str_field(body, "grpc", f"{what}.GRPC"),
        grpc_use_tls=_bool_field(body, "grpcusetls", f"{what}.GRPCUseTLS"),
        http=_str_field(body, "http", f"{what}.HTTP"),
        method=_str_field(body, "method", f"{what}.Method") or "GET",
        header={str(k): list(v) for k, v in header_raw.items()},
        tcp=_str_field(body, "tcp", f"{what}.TCP"),
        tls_skip_verify=_bool_field(body, "tlsskipverify", f"{what}.TLSSkipVerify"),
        output_max_size=_int_field(body, "outputmaxsize", f"{what}.OutputMaxSize")
        or OUTPUT_MAX_SIZE,
    )
    # structs.CheckType.Validate
    interval_check = bool(spec.grpc or spec.http or spec.tcp)
    problem = ""
    if spec.interval > 0 and spec.ttl > 0:
        problem = "Interval and TTL cannot both be specified"
    elif interval_check and spec.interval <= 0:
        problem = "Interval must be > 0 for Script, HTTP, H2PING, TCP, UDP or OSService checks"
    elif not interval_check and spec.ttl <= 0:
        problem = "TTL must be > 0 for TTL checks"
    elif spec.output_max_size < 0:
        problem = "MaxOutputMaxSize must be positive"
    if problem:
        raise _HTTPError(400, f"Invalid check: {problem}")
    return spec


# --- state ----------------------------------------------------------------------------------------


@dataclass
class _Service:
    """A registered service instance (structs.NodeService)."""

    id: str
    name: str
    tags: list[str] | None
    address: str
    port: int
    meta: dict[str, str] | None
    weights: dict[str, int]
    enable_tag_override: bool
    tagged_addresses: dict[str, dict[str, Any]]
    create_index: int = 0
    modify_index: int = 0

    def content(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.tags,
            self.address,
            self.port,
            self.meta,
            self.weights,
            self.enable_tag_override,
            self.tagged_addresses,
        )

    def agent_json(self, datacenter: str) -> dict[str, Any]:
        """api.AgentService, as /v1/agent/services writes it."""
        out: dict[str, Any] = {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags or []),
            "Meta": dict(self.meta or {}),
            "Port": self.port,
            "Address": self.address,
        }
        if self.tagged_addresses:
            out["TaggedAddresses"] = copy.deepcopy(self.tagged_addresses)
        out.update(
            Weights=dict(self.weights),
            EnableTagOverride=self.enable_tag_override,
            Datacenter=datacenter,
        )
        return out

    def catalog_json(self) -> dict[str, Any]:
        """structs.NodeService, as the health endpoint writes it (Meta stays null when unset)."""
        out: dict[str, Any] = {
            "ID": self.id,
            "Service": self.name,
            "Tags": list(self.tags or []),
            "Address": self.address,
        }
        if self.tagged_addresses:
            out["TaggedAddresses"] = copy.deepcopy(self.tagged_addresses)
        out.update(
            Meta=dict(self.meta) if self.meta is not None else None,
            Port=self.port,
            Weights=dict(self.weights),
            EnableTagOverride=self.enable_tag_override,
            Proxy={"Mode": "", "MeshGateway": {}, "Expose": {}},
            Connect={},
            CreateIndex=self.create_index,
            ModifyIndex=self.modify_index,
        )
        return out


@dataclass
class _Check:
    """A health check and what runs it (structs.HealthCheck plus the agent's check runner)."""

    check_id: str
    name: str
    service_id: str
    service_name: str
    service_tags: list[str]
    type: str
    notes: str
    status: str
    output: str
    spec: _CheckSpec | None = None
    interval_text: str = ""
    timeout_text: str = ""
    reap_after: float = 0.0
    critical_since: float | None = None
    catalog_output: str = ""
    last_ttl_output: str = ""
    create_index: int = 0
    modify_index: int = 0
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)

    def definition(self) -> dict[str, Any]:
        spec = self.spec
        if spec is None:
            return {}
        return {
            "Interval": self.interval_text or "0s",
            "Timeout": self.timeout_text or "0s",
            "DeregisterCriticalServiceAfter": format_go_duration(spec.deregister_after),
            "HTTP": spec.http,
            "Header": spec.header or None,
            "Method": spec.method if spec.http else "",
            "TLSSkipVerify": spec.tls_skip_verify,
            "TCP": spec.tcp,
            "GRPC": spec.grpc,
            "GRPCUseTLS": spec.grpc_use_tls,
        }

    def json(self, node: str, *, catalog: bool) -> dict[str, Any]:
        """structs.HealthCheck: the catalog's view (health endpoint) or the agent's own."""
        return {
            "Node": node,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.catalog_output if catalog else self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.type,
            "Interval": self.interval_text,
            "Timeout": self.timeout_text,
            "ExposedPort": 0,
            "Definition": self.definition(),
            "CreateIndex": self.create_index if catalog else 0,
            "ModifyIndex": self.modify_index if catalog else 0,
        }

    def catalog_view(self) -> tuple[Any, ...]:
        return (
            self.name,
            self.status,
            self.notes,
            self.catalog_output,
            self.service_id,
            self.service_name,
            self.service_tags,
            self.type,
            self.interval_text,
            self.timeout_text,
            self.definition(),
        )


def _truncate(output: str, limit: int) -> str:
    if len(output) > limit:
        return f"{output[:limit]} ... (captured {limit} of {len(output)} bytes)"
    return output


def _go_code_name(code: grpc.StatusCode) -> str:
    """A gRPC status code as Go's codes.Code.String writes it (``DeadlineExceeded``)."""
    return "".join(part.capitalize() for part in code.name.split("_"))


# --- the agent ------------------------------------------------------------------------------------


class ConsulAgent:
    """A one-node Consul agent (``consul agent -dev``) in the running event loop, on 127.0.0.1."""

    def __init__(
        self,
        *,
        acl_token: str | None = None,
        reap_interval: float = 30.0,
        min_deregister_after: float = 60.0,
        node: str = "node-1",
        node_address: str = "127.0.0.1",
        datacenter: str = "dc1",
        min_check_interval: float = 1.0,
    ) -> None:
        self._acl_token = acl_token
        self._reap_interval = reap_interval
        self._min_deregister_after = min_deregister_after
        self._node = node
        self._node_address = node_address
        self._datacenter = datacenter
        self._min_check_interval = min_check_interval
        self._node_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{node}.llmmesh.test"))
        self.requests: list[tuple[str, str]] = []
        self._port = 0
        self._runner: web.AppRunner | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self._started = False
        #: Probe tasks cancelled but not yet awaited.
        self._dead_tasks: set[asyncio.Task[None]] = set()
        self._index = 1
        self._services: dict[str, _Service] = {}
        self._checks: dict[str, _Check] = {}
        #: Index of the last change to each service name.
        self._service_index: dict[str, int] = {}
        #: Index at which a service name last lost its last instance (0: none yet).
        self._extinction_index = 0
        #: Set (and replaced) at every change to the catalog: what blocking queries wait on.
        self._changed = asyncio.Event()
        self._reset_state(index=1)

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

    # ---- state -----------------------------------------------------------------------------------

    def _reset_state(self, *, index: int) -> None:
        self._index = index
        self._services = {}
        self._checks = {SERF_CHECK_ID: self._serf_check()}
        self._service_index = {}
        self._extinction_index = 0
        self._changed = asyncio.Event()

    def _serf_check(self) -> _Check:
        return _Check(
            check_id=SERF_CHECK_ID,
            name="Serf Health Status",
            service_id="",
            service_name="",
            service_tags=[],
            type="",
            notes="",
            status=PASSING,
            output="Agent alive and reachable",
            catalog_output="Agent alive and reachable",
            create_index=1,
            modify_index=1,
        )

    def _commit(self, names: Iterable[str]) -> int:
        """Record a change to the catalog touching ``names``; wake blocking queries."""
        self._index += 1
        for name in names:
            self._service_index[name] = self._index
        self._changed.set()
        self._changed = asyncio.Event()
        return self._index

    def _health_index(self, name: str) -> int:
        if any(s.name == name for s in self._services.values()):
            return self._service_index.get(name, self._index)
        return self._extinction_index or self._index

    def _all_names(self) -> set[str]:
        return {s.name for s in self._services.values()}

    def _register(
        self, service: _Service, specs: list[_CheckSpec], *, replace_existing: bool
    ) -> None:
        previous = self._services.get(service.id)
        touched = {service.name}
        changed = previous is None or previous.content() != service.content()
        if previous is not None:
            touched.add(previous.name)
            service.create_index = previous.create_index
            service.modify_index = previous.modify_index
        self._services[service.id] = service
        existing = {cid for cid, c in self._checks.items() if c.service_id == service.id}
        changed_checks: list[_Check] = []
        new_ids: set[str] = set()
        for position, spec in enumerate(specs, start=1):
            check_id = spec.check_id or f"service:{service.id}"
            if not spec.check_id and len(specs) > 1:
                check_id += f":{position}"
            new_ids.add(check_id)
            old = self._checks.get(check_id)
            status, output = (old.status, old.output) if old else (spec.status or CRITICAL, "")
            reap_after = 0.0
            if spec.deregister_after > 0:
                reap_after = max(spec.deregister_after, self._min_deregister_after)
            check = _Check(
                check_id=check_id,
                name=spec.name or f"Service '{service.name}' check",
                service_id=service.id,
                service_name=service.name,
                service_tags=list(service.tags or []),
                type=spec.type,
                notes=spec.notes,
                status=status,
                output=output,
                spec=spec,
                interval_text=format_go_duration(spec.interval) if spec.interval else "",
                timeout_text=format_go_duration(spec.timeout) if spec.timeout else "",
                reap_after=reap_after,
                catalog_output=old.catalog_output if old else output,
                create_index=old.create_index if old else 0,
                modify_index=old.modify_index if old else 0,
            )
            if old is not None:
                self._stop_runner(old)
                touched.add(old.service_name)
            if old is None or old.catalog_view() != check.catalog_view():
                changed_checks.append(check)
            self._checks[check_id] = check
            self._start_runner(check)
        if replace_existing:
            for check_id in existing - new_ids:
                self._stop_runner(self._checks.pop(check_id))
                changed = True
        if changed or changed_checks:
            index = self._commit(touched)
            if changed:
                service.modify_index = index
                service.create_index = service.create_index or index
            for check in changed_checks:
                check.modify_index = index
                check.create_index = check.create_index or index
            if previous is not None and previous.name != service.name:
                self._note_extinction(previous.name, index)

    def _note_extinction(self, name: str, index: int) -> None:
        if name not in self._all_names():
            self._extinction_index = index

    def _deregister(self, service_id: str) -> None:
        service = self._services.pop(service_id)
        for check_id in [cid for cid, c in self._checks.items() if c.service_id == service_id]:
            self._stop_runner(self._checks.pop(check_id))
        index = self._commit({service.name})
        self._note_extinction(service.name, index)

    def _set_status(self, check: _Check, status: str, output: str) -> None:
        """local.State.UpdateCheck: the critical clock, then a catalog change if status moved."""
        if status == CRITICAL:
            if check.critical_since is None:
                check.critical_since = time.monotonic()
        else:
            check.critical_since = None
        if check.status == status and check.output == output:
            return
        if check.status == status:
            check.output = output  # output-only: the agent defers syncing it to the catalog
            return
        check.status, check.output = status, output
        names = {check.service_name} if check.service_id else self._all_names()
        check.modify_index = self._commit(names)
        check.catalog_output = output

    # ---- check runners ---------------------------------------------------------------------------

    def _start_runner(self, check: _Check) -> None:
        spec = check.spec
        if spec is None:
            return
        if spec.ttl > 0:
            check.timer = asyncio.get_running_loop().call_later(spec.ttl, self._ttl_expired, check)
        else:
            check.task = asyncio.create_task(
                self._probe_loop(check), name=f"consul-check-{check.check_id}"
            )

    def _stop_runner(self, check: _Check) -> None:
        if check.timer is not None:
            check.timer.cancel()
            check.timer = None
        if check.task is not None:
            check.task.cancel()
            self._dead_tasks.add(check.task)
            check.task = None

    async def _drain_probe_tasks(self) -> None:
        tasks, self._dead_tasks = self._dead_tasks, set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _ttl_expired(self, check: _Check) -> None:
        check.timer = None
        if self._checks.get(check.check_id) is not check:
            return
        output = "TTL expired"
        if check.last_ttl_output:
            output += f" (last output before timeout follows): {check.last_ttl_output}"
        self._set_status(check, CRITICAL, output)

    def _ttl_update(self, check: _Check, status: str, output: str) -> None:
        assert check.spec is not None
        output = _truncate(output, check.spec.output_max_size)
        self._set_status(check, status, output)
        check.last_ttl_output = output
        if check.timer is not None:
            check.timer.cancel()
        check.timer = asyncio.get_running_loop().call_later(
            check.spec.ttl, self._ttl_expired, check
        )

    async def _probe_loop(self, check: _Check) -> None:
        spec = check.spec
        assert spec is not None
        interval = max(spec.interval, self._min_check_interval)
        timeout = spec.timeout or DEFAULT_CHECK_TIMEOUT
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                async with asyncio.timeout(timeout + 0.5):
                    status, output = await self._probe(spec, timeout)
            except TimeoutError:
                status, output = CRITICAL, f"probe timed out after {format_go_duration(timeout)}"
            if self._checks.get(check.check_id) is not check:
                return
            self._set_status(check, status, _truncate(output, spec.output_max_size))
            await asyncio.sleep(interval)

    async def _probe(self, spec: _CheckSpec, timeout: float) -> tuple[str, str]:
        if spec.grpc:
            return await _probe_grpc(spec.grpc, use_tls=spec.grpc_use_tls, timeout=timeout)
        if spec.http:
            if self._http is None:
                self._http = aiohttp.ClientSession()
            return await _probe_http(self._http, spec, timeout)
        return await _probe_tcp(spec.tcp)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            self._reap()

    def _reap(self) -> None:
        """Agent.reapServicesInternal."""
        now = time.monotonic()
        for check in list(self._checks.values()):
            if (
                check.service_id in self._services
                and check.reap_after > 0
                and check.critical_since is not None
                and now - check.critical_since > check.reap_after
            ):
                self._deregister(check.service_id)

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
                raise _HTTPError(405, f"method {method} not allowed")
            response = await handler(request, arg)
        except _HTTPError as exc:
            response = web.Response(
                status=exc.status, text=exc.reason, content_type="text/plain", charset="utf-8"
            )
            if exc.status == 405:
                response.headers["Allow"] = ",".join(("OPTIONS", *methods))
        if path.startswith("/v1/health/service/"):
            return self._respond(response, self._health_index(arg))
        return self._respond(response, self._index)

    @staticmethod
    def _respond(response: web.Response, index: int) -> web.Response:
        response.headers["X-Consul-Index"] = str(index)
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
            raise _HTTPError(403, "ACL not found")
        return True

    @staticmethod
    def _require(allowed: bool, permission: str, resource: str) -> None:
        if not allowed:
            raise _HTTPError(
                403,
                f"Permission denied: anonymous token lacks permission '{permission}' on "
                f'"{resource}"{ANONYMOUS_HINT}',
            )

    def _common_query(self, request: web.Request) -> None:
        query = request.query
        if "stale" in query and "consistent" in query:
            raise _HTTPError(400, "Cannot specify ?stale with ?consistent, conflicting semantics.")
        dc = query.get("dc", "")
        if dc and dc != self._datacenter:
            raise _HTTPError(500, "No path to datacenter")

    # ---- handlers --------------------------------------------------------------------------------

    async def _h_register(self, request: web.Request, _: str) -> web.Response:
        body = await _json_object(request, "ServiceDefinition", "structs.ServiceDefinition")
        name = _str_field(body, "name", "Name")
        if not name:
            raise _HTTPError(400, "Missing service name")
        address = _str_field(body, "address", "Address")
        service_id = _str_field(body, "id", "ID") or name
        tags = _str_list_field(body, "tags", "Tags")
        port = _int_field(body, "port", "Port")
        meta = _str_map_field(body, "meta", "Meta")
        enable_tag_override = _bool_field(body, "enabletagoverride", "EnableTagOverride")
        tagged = body.get("taggedaddresses") or {}
        if not isinstance(tagged, dict):
            raise _decode_error("TaggedAddresses", tagged, "map[string]structs.ServiceAddress")
        if address in ("0.0.0.0", "::", "[::]"):
            raise _HTTPError(400, "Invalid service address")
        allowed = self._resolve_token(request)
        weights_raw = body.get("weights")
        weights = {"Passing": 1, "Warning": 1}
        if weights_raw is not None:
            if not isinstance(weights_raw, dict):
                raise _decode_error("Weights", weights_raw, "structs.Weights")
            w = _normalize_keys(weights_raw)
            weights = {
                "Passing": _int_field(w, "passing", "Weights.Passing"),
                "Warning": _int_field(w, "warning", "Weights.Warning"),
            }
            if weights["Passing"] < 1:
                raise _HTTPError(400, "Invalid Weights: Passing must be greater than 0")
        _validate_meta(meta or {})
        specs = [
            spec
            for spec in [_parse_check(body.get("check"), "Check")]
            + [_parse_check(raw_check, "Checks") for raw_check in _check_list(body.get("checks"))]
            if spec is not None
        ]
        for spec in specs:
            if spec.status and spec.status not in STATUSES:
                raise _HTTPError(400, "Status for checks must 'passing', 'warning', 'critical'")
        self._require(allowed, "service:write", name)
        existing = self._services.get(service_id)
        if existing is not None:
            self._require(allowed, "service:write", existing.name)
        tagged_addresses = {str(k): dict(v) for k, v in tagged.items() if isinstance(v, dict)}
        if _is_ipv4(address):
            for key in ("lan_ipv4", "wan_ipv4"):
                tagged_addresses.setdefault(key, {"Address": address, "Port": port})
        service = _Service(
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

    def _existing_service(self, service_id: str) -> _Service:
        service = self._services.get(service_id)
        if service is None:
            raise _HTTPError(
                404,
                f'Unknown service ID "{service_id}". Ensure that the service ID is passed, '
                "not the service name.",
            )
        return service

    def _existing_check(self, check_id: str) -> _Check:
        check = self._checks.get(check_id)
        if check is None:
            raise _HTTPError(
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
            raise _HTTPError(400, "Missing service ID")
        if "enable" not in request.query:
            raise _HTTPError(400, "Missing value for enable")
        raw = request.query["enable"]
        try:
            enable = _parse_go_bool(raw)
        except ValueError:
            raise _HTTPError(400, f"Invalid value for enable: {json.dumps(raw)}") from None
        allowed = self._resolve_token(request)
        service = self._existing_service(service_id)
        self._require(allowed, "service:write", service.name)
        check_id = MAINT_PREFIX + service_id
        if enable and check_id not in self._checks:
            check = _Check(
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
            raise _HTTPError(500, f'CheckID "{check_id}" does not have associated TTL')
        self._ttl_update(check, status, output)
        return web.Response()

    async def _h_check_pass(self, request: web.Request, check_id: str) -> web.Response:
        return await self._ttl_endpoint(request, check_id, PASSING, request.query.get("note", ""))

    async def _h_check_warn(self, request: web.Request, check_id: str) -> web.Response:
        return await self._ttl_endpoint(request, check_id, WARNING, request.query.get("note", ""))

    async def _h_check_fail(self, request: web.Request, check_id: str) -> web.Response:
        return await self._ttl_endpoint(request, check_id, CRITICAL, request.query.get("note", ""))

    async def _h_check_update(self, request: web.Request, check_id: str) -> web.Response:
        body = await _json_object(request, "checkUpdate", "agent.checkUpdate")
        status = _str_field(body, "status", "Status")
        if status not in STATUSES:
            raise _HTTPError(400, f"Invalid check status: '{status}'")
        output = _str_field(body, "output", "Output")
        return await self._ttl_endpoint(request, check_id, status, output)

    async def _h_health_service(self, request: web.Request, name: str) -> web.Response:
        query = request.query
        self._common_query(request)
        min_index, wait = _parse_wait(query)
        if not name:
            raise _HTTPError(400, "Missing service name")
        passing = False
        if "passing" in query:
            raw = query["passing"]
            try:
                passing = raw == "" or _parse_go_bool(raw)
            except ValueError:
                raise _HTTPError(400, "Invalid value for ?passing") from None
        allowed = self._resolve_token(request)
        self._require(allowed, "service:read", name)
        match = _compile_filter(query.get("filter", ""))
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
            if match(entry):
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
        match = _compile_filter(request.query.get("filter", ""))
        services = {sid: s for sid, s in self.services().items() if match(s)}
        return self._json(services)

    async def _h_checks(self, request: web.Request, _: str) -> web.Response:
        self._require(self._resolve_token(request), "node:read", self._node)
        match = _compile_filter(request.query.get("filter", ""))
        return self._json({cid: c for cid, c in self.checks().items() if match(c)})

    async def _h_service(self, request: web.Request, service_id: str) -> web.Response:
        allowed = self._resolve_token(request)
        service = self._services.get(service_id)
        if service is None:
            raise _HTTPError(404, f"unknown service ID: {service_id}")
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


class ThreadedConsulAgent:
    """A :class:`ConsulAgent` on its own event loop in a thread, driven with plain calls.

    For tests that block their own loop while service processes talk to Consul, as
    ``ServiceProcess.start()`` and ``.stop()`` do (a worker registers before it is ready and
    deregisters as it stops): an agent in the test's loop could not answer meanwhile. Use it as
    ``with ThreadedConsulAgent(**ConsulAgent_kwargs) as consul_agent:``; every method waits for
    the agent's loop to carry it out.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._agent: ConsulAgent | None = None

    @property
    def agent(self) -> ConsulAgent:
        """The agent itself: only touch it from its own loop (see :meth:`call`)."""
        if self._agent is None:
            raise RuntimeError("ThreadedConsulAgent not started")
        return self._agent

    def start(self) -> ThreadedConsulAgent:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="consul-agent", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread

        async def make() -> ConsulAgent:
            agent = ConsulAgent(**self._kwargs)
            await agent.start()
            return agent

        self._agent = self.call(make())
        return self

    def stop(self) -> None:
        """Stop the agent, its loop and its thread. Idempotent."""
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            if self._agent is not None:
                asyncio.run_coroutine_threadsafe(self._agent.stop(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()

    def __enter__(self) -> ThreadedConsulAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the agent's loop and return its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("ThreadedConsulAgent not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _read(self, read: Callable[[], T]) -> T:
        async def run() -> T:
            return read()

        return self.call(run())

    @property
    def port(self) -> int:
        return self.agent.port

    @property
    def address(self) -> str:
        return self.agent.address

    @property
    def index(self) -> int:
        return self._read(lambda: self.agent.index)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """A copy of the requests received so far."""
        return self._read(lambda: list(self.agent.requests))

    def services(self) -> dict[str, dict[str, Any]]:
        return self._read(self.agent.services)

    def checks(self) -> dict[str, dict[str, Any]]:
        return self._read(self.agent.checks)

    def go_down(self) -> None:
        self.call(self.agent.go_down())

    def come_back(self) -> None:
        self.call(self.agent.come_back())

    def restart(self, *, forget: bool = True, reset_index: bool = False) -> None:
        self.call(self.agent.restart(forget=forget, reset_index=reset_index))


def _check_list(raw: Any) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _decode_error("Checks", raw, "structs.CheckTypes")
    return raw


def _is_ipv4(address: str) -> bool:
    parts = address.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)


def _parse_wait(query: Mapping[str, str]) -> tuple[int, float]:
    """parseWait: ``(index, wait seconds)``."""
    wait = 0.0
    if query.get("wait", ""):
        try:
            wait = parse_go_duration(query["wait"])
        except ValueError:
            raise _HTTPError(400, "Invalid wait time") from None
    index = 0
    if query.get("index", ""):
        text = query["index"]
        if not text.isdigit() or int(text) >= 2**64:
            raise _HTTPError(400, "Invalid index")
        index = int(text)
    return index, wait


# --- probes ---------------------------------------------------------------------------------------


async def _probe_grpc(target: str, *, use_tls: bool, timeout: float) -> tuple[str, str]:
    """CheckGRPC: grpc.health.v1 Check on ``host:port[/service]``."""
    server, _, service = target.partition("/")
    channel = (
        grpc.aio.secure_channel(server, grpc.ssl_channel_credentials())
        if use_tls
        else grpc.aio.insecure_channel(server)
    )
    async with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            return CRITICAL, f"rpc error: code = {_go_code_name(exc.code())} desc = {exc.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return CRITICAL, f"gRPC {target} serving status: {status_name}"
    return PASSING, f"gRPC check {target}: success"


async def _probe_http(
    session: aiohttp.ClientSession, spec: _CheckSpec, timeout: float
) -> tuple[str, str]:
    """CheckHTTP: 2xx passing, 429 warning, anything else critical."""
    headers = {key: ", ".join(values) for key, values in spec.header.items()}
    try:
        async with session.request(
            spec.method,
            spec.http,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            ssl=not spec.tls_skip_verify,
        ) as response:
            body = (await response.read())[:OUTPUT_MAX_SIZE].decode("utf-8", "replace")
            output = (
                f"HTTP {spec.method} {spec.http}: {response.status} {response.reason} "
                f"Output: {body}"
            )
            if 200 <= response.status < 300:
                return PASSING, output
            if response.status == 429:
                return WARNING, output
            return CRITICAL, output
    except (aiohttp.ClientError, OSError) as exc:
        return CRITICAL, f'Get "{spec.http}": {exc}'


async def _probe_tcp(address: str) -> tuple[str, str]:
    """CheckTCP: a connection is passing."""
    host, _, port = address.rpartition(":")
    try:
        _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except (OSError, ValueError) as exc:
        return CRITICAL, f"dial tcp {address}: {exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return PASSING, f"TCP connect {address}: Success"


# --- filter expressions ---------------------------------------------------------------------------

_FILTER_TOKEN = re.compile(
    r"""\s*(?:
        (?P<op>==|!=|\(|\)|\[|\])
      | (?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)
      | (?P<num>-?\d+(?:\.\d+)?(?![\w.]))
      | (?P<word>[A-Za-z0-9_\-/:]+(?:\.[A-Za-z0-9_\-/:]+)*)
    )""",
    re.VERBOSE,
)
_Matcher = Callable[[Any], bool]
_MISSING = object()


def _compile_filter(expression: str) -> _Matcher:
    """A subset of go-bexpr, Consul's ``filter`` language; 400 for what it cannot parse."""
    if not expression.strip():
        return lambda _: True
    try:
        return _FilterParser(expression).parse()
    except ValueError as exc:
        raise _HTTPError(400, f"Failed to create boolean expression evaluator: {exc}") from None


class _FilterParser:
    def __init__(self, text: str) -> None:
        self.tokens: list[tuple[str, str]] = []
        position = 0
        text = text.rstrip()
        while position < len(text):
            match = _FILTER_TOKEN.match(text, position)
            if match is None or match.end() == position:
                raise ValueError(f"unexpected input at offset {position}: {text[position:]!r}")
            kind = match.lastgroup
            assert kind is not None
            self.tokens.append((kind, match.group(kind)))
            position = match.end()
        self.position = 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        index = self.position + offset
        return self.tokens[index] if index < len(self.tokens) else ("end", "")

    def take(self) -> tuple[str, str]:
        token = self.peek()
        self.position += 1
        return token

    def keyword(self, word: str, offset: int = 0) -> bool:
        kind, value = self.peek(offset)
        return kind == "word" and value.lower() == word

    def expect_keyword(self, word: str) -> None:
        if not self.keyword(word):
            raise ValueError(f"expected {word!r}, got {self.peek()[1]!r}")
        self.position += 1

    def parse(self) -> _Matcher:
        matcher = self.parse_or()
        if self.peek()[0] != "end":
            raise ValueError(f"unexpected {self.peek()[1]!r}")
        return matcher

    def parse_or(self) -> _Matcher:
        parts = [self.parse_and()]
        while self.keyword("or"):
            self.position += 1
            parts.append(self.parse_and())
        return parts[0] if len(parts) == 1 else lambda obj: any(p(obj) for p in parts)

    def parse_and(self) -> _Matcher:
        parts = [self.parse_not()]
        while self.keyword("and"):
            self.position += 1
            parts.append(self.parse_not())
        return parts[0] if len(parts) == 1 else lambda obj: all(p(obj) for p in parts)

    def parse_not(self) -> _Matcher:
        if self.keyword("not"):
            self.position += 1
            inner = self.parse_not()
            return lambda obj: not inner(obj)
        if self.peek() == ("op", "("):
            self.position += 1
            inner = self.parse_or()
            if self.take() != ("op", ")"):
                raise ValueError("missing ')'")
            return inner
        return self.parse_match()

    def parse_value(self) -> str:
        kind, value = self.take()
        if kind == "str":
            return json.loads(value) if value.startswith('"') else value[1:-1]
        if kind in ("num", "word"):
            return value
        raise ValueError(f"expected a value, got {value!r}")

    def parse_selector(self) -> list[str]:
        kind, value = self.take()
        if kind != "word":
            raise ValueError(f"expected a selector, got {value!r}")
        parts = value.split(".")
        while self.peek() == ("op", "["):
            self.position += 1
            parts.append(self.parse_value())
            if self.take() != ("op", "]"):
                raise ValueError("missing ']'")
        return parts

    def parse_match(self) -> _Matcher:
        # value [not] in selector
        first_kind = self.peek()[0]
        if (
            first_kind in ("str", "num")
            or self.keyword("in", 1)
            or (self.keyword("not", 1) and self.keyword("in", 2))
        ):
            value = self.parse_value()
            negate = self.keyword("not")
            if negate:
                self.position += 1
            self.expect_keyword("in")
            selector = self.parse_selector()
            return _negate(
                negate, lambda obj: any(_contains(c, value) for c in _select(obj, selector))
            )
        selector = self.parse_selector()
        kind, op = self.peek()
        if kind == "op" and op in ("==", "!="):
            self.position += 1
            value = self.parse_value()
            equal = lambda obj: any(_equal(c, value) for c in _select(obj, selector))  # noqa: E731
            return _negate(op == "!=", equal)
        if self.keyword("is"):
            self.position += 1
            negate = self.keyword("not")
            if negate:
                self.position += 1
            self.expect_keyword("empty")
            empty = lambda obj: all(c in (None, "", [], {}) for c in _select(obj, selector))  # noqa: E731
            return _negate(negate, empty)
        negate = self.keyword("not")
        if negate:
            self.position += 1
        if self.keyword("contains"):
            self.position += 1
            value = self.parse_value()
            return _negate(
                negate, lambda obj: any(_contains(c, value) for c in _select(obj, selector))
            )
        if self.keyword("matches"):
            self.position += 1
            pattern = re.compile(self.parse_value())
            return _negate(
                negate,
                lambda obj: any(
                    isinstance(c, str) and pattern.search(c) for c in _select(obj, selector)
                ),
            )
        raise ValueError(f"expected an operator after {'.'.join(selector)!r}")


def _negate(negate: bool, matcher: _Matcher) -> _Matcher:
    return (lambda obj: not matcher(obj)) if negate else matcher


def _select(obj: Any, parts: list[str]) -> list[Any]:
    """The values a selector reaches; through a list it reaches into every element."""
    values = [obj]
    for part in parts:
        reached: list[Any] = []
        for value in values:
            items = value if isinstance(value, list) else [value]
            for item in items:
                if isinstance(item, dict) and part in item:
                    reached.append(item[part])
        values = reached
    return values


def _equal(field_value: Any, text: str) -> bool:
    if isinstance(field_value, bool):
        return text.lower() == str(field_value).lower()
    if isinstance(field_value, int | float):
        try:
            return float(text) == float(field_value)
        except ValueError:
            return False
    return isinstance(field_value, str) and field_value == text


def _contains(container: Any, text: str) -> bool:
    if isinstance(container, list):
        return any(_equal(item, text) for item in container)
    if isinstance(container, dict):
        return text in container
    return isinstance(container, str) and text in container
