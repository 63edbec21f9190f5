"""The agent's records: a registered service instance and a health check with what runs it, and
how each is written by the agent's and the health endpoints."""

from __future__ import annotations

import asyncio
import copy
from dataclasses import dataclass, field
from typing import Any

from tests.consul_agent._decoding import CheckSpec
from tests.consul_agent._durations import format_go_duration

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
STATUSES = (PASSING, WARNING, CRITICAL)


@dataclass
class Service:
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
class Check:
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
    spec: CheckSpec | None = None
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


def truncate(output: str, limit: int) -> str:
    if len(output) > limit:
        return f"{output[:limit]} ... (captured {limit} of {len(output)} bytes)"
    return output
