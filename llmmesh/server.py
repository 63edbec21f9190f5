"""The gRPC server lifecycle every llm-mesh service shares.

A service provides a :class:`ServiceApp` (its servicers plus start, drain and close hooks) and a
:class:`ServerSettings`; :class:`ServiceRunner` does the rest, the same way for all three:

1. binds a ``grpc.aio`` server (message size limits, no ``SO_REUSEPORT`` so a taken port is an
   error) with ``grpc.health.v1.Health`` and server reflection; a request whose bytes do not
   parse gets ``INVALID_ARGUMENT`` (llmmesh/malformed_requests.py);
2. starts Prometheus metrics over HTTP on their own port;
3. calls ``app.start()``, then reports SERVING and writes the ready file, if asked;
4. on SIGTERM or SIGINT: reports NOT_SERVING, calls ``app.drain()``, stops accepting new RPCs,
   gives in-flight ones ``grace`` to finish, cancels the rest, calls ``app.close()``. A second
   signal skips the grace period.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol, Self

import grpc
import grpc.aio
import prometheus_client
import structlog
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from llmmesh import logs, settings, tracing
from llmmesh.malformed_requests import MalformedRequestGuard

log = structlog.get_logger(__name__)

MiB = 1024 * 1024
_ServingStatus = health_pb2.HealthCheckResponse.ServingStatus.ValueType


@dataclass(frozen=True, kw_only=True)
class ServerSettings:
    """Settings every service's server has. Service configs subclass this."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=0, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_port: int = field(
        default=-1,
        metadata={"help": "Prometheus metrics HTTP port (0 picks a free one, -1 disables)"},
    )
    grace: timedelta = field(
        default=timedelta(seconds=30),
        metadata={"help": "how long in-flight requests may take to finish on shutdown"},
    )
    max_message_bytes: int = field(
        default=4 * MiB,
        metadata={"help": "largest gRPC message accepted or sent (RESOURCE_EXHAUSTED beyond)"},
    )
    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata={"help": "log level"}
    )
    log_format: Literal["json", "console"] = field(
        default="json", metadata={"help": "log line format"}
    )
    ready_file: str = field(
        default="",
        metadata={"help": "write {pid, port, metrics_port} as JSON here once serving"},
    )
    otlp_endpoint: str = field(
        default="",
        metadata={
            "help": "OpenTelemetry collector to send traces to over OTLP/gRPC, "
            "http://host:port or https://host:port (empty: OTEL_EXPORTER_OTLP_ENDPOINT, "
            "else tracing off)"
        },
    )
    trace_sample_ratio: float = field(
        default=1.0,
        metadata={
            "help": "fraction of new traces recorded when tracing is on (a caller's sampling "
            "decision is followed)"
        },
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes: {self.max_message_bytes} is below 1024")
        if self.otlp_endpoint and not re.fullmatch(r"https?://[^/\s]+/?", self.otlp_endpoint):
            raise ValueError(
                f"otlp_endpoint: {self.otlp_endpoint!r} is not http://host:port or "
                "https://host:port"
            )
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio: {self.trace_sample_ratio} is not in [0, 1]")


class ServiceApp(Protocol):
    """What a service plugs into :class:`ServiceRunner`."""

    #: Full names of the gRPC services served, e.g. ``("llmmesh.v1.Worker",)``.
    service_names: Sequence[str]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the servicers."""

    async def start(self, runner: ServiceRunner) -> None:
        """Get ready to serve (the port is bound, health is still NOT_SERVING)."""

    async def drain(self) -> None:
        """Health is NOT_SERVING: stop taking new work from elsewhere (e.g. deregister)."""

    async def close(self) -> None:
        """The server has stopped: release resources."""


def grpc_server_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Server options shared by every llm-mesh server."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Without this a second process could bind the same port and silently share traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
    ]


def grpc_channel_options(max_message_bytes: int = 4 * MiB) -> list[tuple[str, Any]]:
    """Channel options for llm-mesh's internal clients."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 0),
    ]


class ServiceRunner:
    """Runs one :class:`ServiceApp` behind a gRPC server, from start to graceful stop."""

    def __init__(self, app: ServiceApp, server_settings: ServerSettings, *, name: str) -> None:
        self.app = app
        self.settings = server_settings
        self.name = name
        self.port = 0
        self.metrics_port = -1
        self.health = health_aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics: Any = None
        self._started = False
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._signals = 0
        self._signal_tasks: set[asyncio.Future[None]] = set()

    @property
    def address(self) -> str:
        """host:port the server listens on."""
        return f"{self.settings.host}:{self.port}"

    async def start(self) -> None:
        """Bind, start the app and report SERVING. Starting twice is an error."""
        if self._started:
            raise RuntimeError(f"{self.name} already started")
        self._started = True
        s = self.settings
        server = grpc.aio.server(options=grpc_server_options(s.max_message_bytes))
        self._server = server

        def add_servicers(server: grpc.aio.Server) -> None:
            self.app.add_to_server(server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)

        MalformedRequestGuard.register(server, add_servicers)
        reflection.enable_server_reflection(
            [*self.app.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {s.host}:{s.port}: {exc}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {s.host}:{s.port} (in use?)")
        await server.start()
        if s.metrics_port >= 0:
            self._metrics, _ = prometheus_client.start_http_server(s.metrics_port, addr=s.host)
            self.metrics_port = int(self._metrics.server_port)
        await self.app.start(self)
        await self._set_all(health_pb2.HealthCheckResponse.SERVING)
        if s.ready_file:
            write_json_atomically(
                Path(s.ready_file),
                {"pid": os.getpid(), "port": self.port, "metrics_port": self.metrics_port},
            )
        log.info("serving", address=self.address, metrics_port=self.metrics_port)

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING (e.g. when a worker's engine fails or recovers).

        Once shutdown has begun the service stays NOT_SERVING whatever is asked.
        """
        if serving and self._shutdown_task is not None:
            return
        await self._set_all(
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def shutdown(self, *, grace: timedelta | None = None) -> None:
        """Drain and stop. Idempotent: later calls wait for the first one to finish."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown(grace))
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, grace: timedelta | None) -> None:
        grace = self.settings.grace if grace is None else grace
        log.info("draining", grace_s=grace.total_seconds())
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            await self.app.drain()
        except Exception:
            log.exception("drain failed; stopping anyway")
        if self._server is not None:
            await self._server.stop(grace.total_seconds())
        try:
            await self.app.close()
        finally:
            if self._metrics is not None:
                self._metrics.shutdown()
                self._metrics.server_close()
            self._stopped.set()
            log.info("stopped")

    async def wait_stopped(self) -> None:
        """Wait until :meth:`shutdown` has finished."""
        await self._stopped.wait()

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            await self.start()
            await self._stopped.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.shutdown()

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        log.info("signal received", signal=sig.name, count=self._signals)
        if self._signals == 1:
            self._signal_tasks.add(asyncio.ensure_future(self.shutdown()))
        elif self._server is not None:
            self._signal_tasks.add(asyncio.ensure_future(self._server.stop(0)))

    async def _set_all(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for service in ("", *self.app.service_names):
            await self.health.set(service, status)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


def write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON so that a reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def run_service(app: ServiceApp, server_settings: ServerSettings, *, name: str) -> int:
    """Entry point body of ``python -m <service>``: configure logs, serve, return the exit code."""
    logs.configure(name, server_settings.log_level, json=server_settings.log_format == "json")
    runner = ServiceRunner(app, server_settings, name=name)
    try:
        tracing.configure(name, server_settings)
        asyncio.run(runner.run())
    except OSError as exc:
        log.error("cannot start", error=str(exc))
        return 1
    except settings.ConfigError as exc:
        log.error("bad configuration", error=str(exc))
        return 2
    finally:
        tracing.shutdown()
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for tools and tests that must name one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


__all__ = [
    "ServerSettings",
    "ServiceApp",
    "ServiceRunner",
    "free_port",
    "grpc_channel_options",
    "grpc_server_options",
    "run_service",
    "write_json_atomically",
]
