"""What a request says, decoded and validated as Consul does: JSON bodies and their fields (Go's
case-insensitive keys, snake case too), service meta, check definitions, and the query's
booleans and blocking-query parameters; every refusal is Consul's own 400."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.consul_agent._durations import parse_go_duration
from tests.consul_agent._errors import HTTPError

#: Consul's default for a check's OutputMaxSize.
OUTPUT_MAX_SIZE = 4096


def duration_field(raw: Any, key: str) -> float:
    """A duration field of a request body: a Go duration string, or nanoseconds as a number."""
    if raw is None or raw == "":
        return 0.0
    if isinstance(raw, bool):
        raise HTTPError(400, f"Request decode failed: {key}: cannot decode bool as a duration")
    if isinstance(raw, int | float):
        return raw / 1e9
    if isinstance(raw, str):
        try:
            return parse_go_duration(raw)
        except ValueError as exc:
            raise HTTPError(400, f"Request decode failed: {exc}") from None
    raise HTTPError(400, f"Request decode failed: {key}: cannot decode as a duration")


def parse_go_bool(text: str) -> bool:
    """strconv.ParseBool."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise ValueError(text)


def normalize_keys(body: Mapping[str, Any]) -> dict[str, Any]:
    """Keys lowercased without underscores: Go's case-insensitive decoding plus snake case."""
    return {key.replace("_", "").lower(): value for key, value in body.items()}


async def json_object(request: web.Request, what: str, go_type: str) -> dict[str, Any]:
    """The request's JSON object body, keys normalized; Consul's 400s for an empty body, bad
    JSON, or JSON that is not an object."""
    raw = await request.read()
    if not raw.strip():
        raise HTTPError(400, "Request decode failed: EOF")
    try:
        decoded = json.loads(raw)
    except ValueError as exc:
        raise HTTPError(400, f"Request decode failed: {exc}") from None
    if not isinstance(decoded, dict):
        raise decode_error(what, decoded, go_type)
    return normalize_keys(decoded)


def decode_error(what: str, value: Any, go_type: str) -> HTTPError:
    kind = {dict: "object", list: "array", str: "string", bool: "bool"}.get(type(value), "number")
    return HTTPError(
        400,
        f"Request decode failed: json: cannot unmarshal {kind} into Go struct field {what} of "
        f"type {go_type}",
    )


def str_field(body: Mapping[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise decode_error(what, value, "string")
    return value


def bool_field(body: Mapping[str, Any], key: str, what: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise decode_error(what, value, "bool")
    return value


def int_field(body: Mapping[str, Any], key: str, what: str) -> int:
    value = body.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise decode_error(what, value, "int")
    return int(value)


def str_list_field(body: Mapping[str, Any], key: str, what: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise decode_error(what, value, "[]string")
    return list(value)


def str_map_field(body: Mapping[str, Any], key: str, what: str) -> dict[str, str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise decode_error(what, value, "map[string]string")
    return dict(value)


_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")


def validate_meta(meta: Mapping[str, str]) -> None:
    """structs.ValidateServiceMetadata."""
    if len(meta) > 64:
        raise HTTPError(
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
            raise HTTPError(
                400,
                f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): "
                f"{problem}",
            )


@dataclass
class CheckSpec:
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


def parse_check(raw: Any, what: str) -> CheckSpec | None:
    """A check of a registration body; None when it is empty (Consul ignores an empty Check)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise decode_error(what, raw, "structs.CheckType")
    body = normalize_keys(raw)
    if not any(value not in (None, "", 0, False, [], {}) for value in body.values()):
        return None
    for key, kind in _UNSUPPORTED_CHECK_KEYS.items():
        if body.get(key):
            raise HTTPError(
                400, f"Invalid check: {kind} checks are not supported by the Consul test double"
            )
    header_raw = body.get("header") or {}
    if not isinstance(header_raw, dict) or not all(
        isinstance(v, list) and all(isinstance(s, str) for s in v) for v in header_raw.values()
    ):
        raise decode_error(f"{what}.Header", header_raw, "map[string][]string")
    spec = CheckSpec(
        check_id=str_field(body, "checkid", f"{what}.CheckID"),
        name=str_field(body, "name", f"{what}.Name"),
        notes=str_field(body, "notes", f"{what}.Notes"),
        status=str_field(body, "status", f"{what}.Status"),
        ttl=duration_field(body.get("ttl"), "TTL"),
        interval=duration_field(body.get("interval"), "Interval"),
        timeout=duration_field(body.get("timeout"), "Timeout"),
        deregister_after=duration_field(
            body.get("deregistercriticalserviceafter"), "DeregisterCriticalServiceAfter"
        ),
        grpc=str_field(body, "grpc", f"{what}.GRPC"),
        grpc_use_tls=bool_field(body, "grpcusetls", f"{what}.GRPCUseTLS"),
        http=str_field(body, "http", f"{what}.HTTP"),
        method=str_field(body, "method", f"{what}.Method") or "GET",
        header={str(k): list(v) for k, v in header_raw.items()},
        tcp=str_field(body, "tcp", f"{what}.TCP"),
        tls_skip_verify=bool_field(body, "tlsskipverify", f"{what}.TLSSkipVerify"),
        output_max_size=int_field(body, "outputmaxsize", f"{what}.OutputMaxSize")
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
        raise HTTPError(400, f"Invalid check: {problem}")
    return spec


def check_list(raw: Any) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise decode_error("Checks", raw, "structs.CheckTypes")
    return raw


def is_ipv4(address: str) -> bool:
    parts = address.split(".")
    return len(parts) == 4 and all(p.isdigit() and int(p) < 256 for p in parts)


def parse_wait(query: Mapping[str, str]) -> tuple[int, float]:
    """parseWait: ``(index, wait seconds)``."""
    wait = 0.0
    if query.get("wait", ""):
        try:
            wait = parse_go_duration(query["wait"])
        except ValueError:
            raise HTTPError(400, "Invalid wait time") from None
    index = 0
    if query.get("index", ""):
        text = query["index"]
        if not text.isdigit() or int(text) >= 2**64:
            raise HTTPError(400, "Invalid index")
        index = int(text)
    return index, wait
