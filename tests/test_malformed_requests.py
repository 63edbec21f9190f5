"""Requests whose bytes do not parse get INVALID_ARGUMENT in plain words, on every service.

A client that sends invalid UTF-8 in a string field (half a surrogate pair from a JavaScript
string) or corrupt protobuf bytes must get ``INVALID_ARGUMENT`` naming the message, not
``UNKNOWN`` naming a Python class; the service logs it once at warning (rate-limited), counts it,
and goes on serving. The bytes are built by hand and sent without a serializer.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import grpc
import grpc.aio
import pytest
from structlog.testing import capture_logs

from llmmesh.malformed_requests import LOG_INTERVAL_S, MalformedRequestGuard
from llmmesh.v1 import cache_pb2, cache_pb2_grpc, generate_pb2
from tests.harness import ServiceProcess

WORKER_ARGS = ["--engine", "sim", "--metrics-port", "0", "--sim-speed-factor", "10"]
#: Field 1 (a string in every request below), length 3, the UTF-8 encoding of a lone surrogate.
INVALID_UTF8 = b"\x0a\x03\xed\xa0\x80"
#: A field tag that promises 127 bytes which never come.
CORRUPT = b"\x0a\x7f\x01\x02"


@dataclass
class Mesh:
    cache: ServiceProcess
    worker: ServiceProcess
    router: ServiceProcess


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with (
        ServiceProcess("cache_service", ["--store", "memory", "--metrics-port", "0"]) as cache,
        ServiceProcess("worker", WORKER_ARGS) as worker,
        ServiceProcess(
            "router",
            ["--workers", worker.address, "--cache-address", "", "--metrics-port", "0"],
        ) as router,
    ):
        yield Mesh(cache, worker, router)


@dataclass(frozen=True)
class Case:
    """One RPC of one service: the malformed requests sent to it and a good one after."""

    service: str
    path: str
    message: str
    streaming: bool
    good_request: Any
    response_deserializer: Callable[[bytes], Any]


GOOD_GENERATE = generate_pb2.GenerateRequest(
    model="sim-llama-3.1-8b", prompt="hello", sampling=generate_pb2.SamplingParams(max_tokens=4)
)
CASES = [
    Case(
        "router",
        "/llmmesh.v1.Router/Generate",
        "llmmesh.v1.GenerateRequest",
        False,
        GOOD_GENERATE,
        generate_pb2.GenerateResponse.FromString,
    ),
    Case(
        "router",
        "/llmmesh.v1.Router/GenerateStream",
        "llmmesh.v1.GenerateRequest",
        True,
        GOOD_GENERATE,
        generate_pb2.GenerateStreamResponse.FromString,
    ),
    Case(
        "worker",
        "/llmmesh.v1.Worker/Generate",
        "llmmesh.v1.GenerateRequest",
        False,
        GOOD_GENERATE,
        generate_pb2.GenerateResponse.FromString,
    ),
    Case(
        "worker",
        "/llmmesh.v1.Worker/GenerateStream",
        "llmmesh.v1.GenerateRequest",
        True,
        GOOD_GENERATE,
        generate_pb2.GenerateStreamResponse.FromString,
    ),
    Case(
        "cache",
        "/llmmesh.v1.Cache/Lookup",
        "llmmesh.v1.LookupRequest",
        False,
        cache_pb2.LookupRequest(key="llmmesh:v1:" + "0" * 64),
        cache_pb2.LookupResponse.FromString,
    ),
]


def _process(mesh: Mesh, case: Case) -> ServiceProcess:
    return {"router": mesh.router, "worker": mesh.worker, "cache": mesh.cache}[case.service]


async def _call(channel: grpc.aio.Channel, case: Case, request: bytes | Any) -> Any:
    serializer = None if isinstance(request, bytes) else type(request).SerializeToString
    if case.streaming:
        stream = channel.unary_stream(
            case.path,
            request_serializer=serializer,
            response_deserializer=case.response_deserializer,
        )
        return [response async for response in stream(request, timeout=10)]
    unary = channel.unary_unary(
        case.path,
        request_serializer=serializer,
        response_deserializer=case.response_deserializer,
    )
    return await unary(request, timeout=10)


def _malformed_warnings(process: ServiceProcess) -> list[dict[str, Any]]:
    return [r for r in process.log_records() if r.get("event") == "malformed request"]


@pytest.fixture
async def channel_for(mesh: Mesh) -> AsyncIterator[Callable[[Case], grpc.aio.Channel]]:
    channels: dict[str, grpc.aio.Channel] = {}

    def channel_for(case: Case) -> grpc.aio.Channel:
        if case.service not in channels:
            channels[case.service] = grpc.aio.insecure_channel(_process(mesh, case).address)
        return channels[case.service]

    yield channel_for
    await asyncio.gather(*(channel.close(None) for channel in channels.values()))


class TestMalformedRequests:
    """Invalid UTF-8 or corrupt bytes: INVALID_ARGUMENT in plain words, one warning line, and
    the service still serves."""

    @pytest.mark.parametrize("payload", [INVALID_UTF8, CORRUPT], ids=["invalid-utf8", "corrupt"])
    @pytest.mark.parametrize("case", CASES, ids=lambda c: c.path.rsplit(".", 1)[1])
    async def test_rejected_in_plain_words(
        self,
        mesh: Mesh,
        channel_for: Callable[[Case], grpc.aio.Channel],
        case: Case,
        payload: bytes,
    ) -> None:
        process = _process(mesh, case)
        channel = channel_for(case)
        warned_before = len(_malformed_warnings(process))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await _call(channel, case, payload)
        err = caught.value
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        details = err.details() or ""
        assert details.startswith(f"request is not a valid {case.message}:"), details
        assert "<class" not in details, details
        assert "Error" not in details, details
        # Still serving.
        assert await _call(channel, case, case.good_request)
        # Logged at warning, rate-limited: the first one of a service always, then at most one
        # line per interval.
        records = process.log_records()
        assert not [r for r in records if r.get("level") == "error" or "DecodeError" in str(r)], (
            records
        )
        warnings = _malformed_warnings(process)
        assert len(warnings) - warned_before == (1 if warned_before == 0 else 0) or (
            len(warnings) - warned_before <= 1
        )
        assert warnings, process.logs()
        assert all(w["level"] == "warning" for w in warnings)
        assert "<class" not in process.logs()

    async def test_one_warning_line_then_counted(
        self, mesh: Mesh, channel_for: Callable[[Case], grpc.aio.Channel]
    ) -> None:
        """A burst of malformed requests logs at most one line; the metric counts them all."""
        case = CASES[-1]
        channel = channel_for(case)
        process = mesh.cache
        warned_before = len(_malformed_warnings(process))
        for _ in range(20):
            with pytest.raises(grpc.aio.AioRpcError):
                await _call(channel, case, CORRUPT)
        assert len(_malformed_warnings(process)) - warned_before <= 1
        assert _malformed_warnings(process), process.logs()
        warning = _malformed_warnings(process)[0]
        assert warning["method"] == case.path
        assert warning["level"] == "warning"
        metrics = await asyncio.to_thread(_scrape, process.metrics_port)
        counted = [
            line
            for line in metrics.splitlines()
            if line.startswith("llmmesh_cache_malformed_requests_total{")
            and 'method="Lookup"' in line
        ]
        assert counted, metrics
        assert float(counted[0].rsplit(" ", 1)[1]) >= 20, counted


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


class _Cache(cache_pb2_grpc.CacheServicer):
    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: Any
    ) -> cache_pb2.LookupResponse:
        return cache_pb2.LookupResponse()


class TestGuard:
    """In one process: one warning line per interval with the number left out since the last."""

    async def test_rate_limited_warning_lines(self) -> None:
        now = [100.0]
        server = grpc.aio.server()
        guard = MalformedRequestGuard(server, clock=lambda: now[0])
        servicer = _Cache()  # type: ignore[abstract]  # only Lookup is called
        cache_pb2_grpc.add_CacheServicer_to_server(servicer, cast(grpc.aio.Server, guard))
        guard.install()
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        case = CASES[-1]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with capture_logs() as logs:
                    for _ in range(3):
                        with pytest.raises(grpc.aio.AioRpcError) as caught:
                            await _call(channel, case, INVALID_UTF8)
                        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    now[0] += LOG_INTERVAL_S
                    with pytest.raises(grpc.aio.AioRpcError):
                        await _call(channel, case, CORRUPT)
                    assert await _call(channel, case, case.good_request) is not None
        finally:
            await server.stop(None)
        lines = [log for log in logs if log["event"] == "malformed request"]
        assert [(line["log_level"], line["left_out"]) for line in lines] == [
            ("warning", 0),
            ("warning", 2),
        ]
        assert lines[0]["method"] == "/llmmesh.v1.Cache/Lookup"
        assert lines[0]["message_type"] == "llmmesh.v1.LookupRequest"
