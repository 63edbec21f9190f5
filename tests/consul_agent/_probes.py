"""The probes of GRPC, HTTP and TCP checks, each answering a status and Consul's output."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.consul_agent._decoding import OUTPUT_MAX_SIZE, CheckSpec
from tests.consul_agent._state import CRITICAL, PASSING, WARNING

#: A probe's timeout when its check gives none.
DEFAULT_CHECK_TIMEOUT = 10.0


def go_code_name(code: grpc.StatusCode) -> str:
    """A gRPC status code as Go's codes.Code.String writes it (``DeadlineExceeded``)."""
    return "".join(part.capitalize() for part in code.name.split("_"))


async def probe_grpc(target: str, *, use_tls: bool, timeout: float) -> tuple[str, str]:
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
            return CRITICAL, f"rpc error: code = {go_code_name(exc.code())} desc = {exc.details()}"
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        status_name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return CRITICAL, f"gRPC {target} serving status: {status_name}"
    return PASSING, f"gRPC check {target}: success"


async def probe_http(
    session: aiohttp.ClientSession, spec: CheckSpec, timeout: float
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


async def probe_tcp(address: str) -> tuple[str, str]:
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
