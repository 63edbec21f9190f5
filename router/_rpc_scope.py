"""The scope of one RPC of the router's: its status, metrics, log line and server span.

Every RPC of :class:`router.RouterService` runs in an :class:`RpcScope`. Whatever the RPC raises
becomes its status in one place (``llmmesh.errors.grpc_errors``: no stack trace reaches the
caller); the RPC is counted (``REQUESTS``, ``REQUEST_DURATION``), logged once when it ends
("request finished" or "request failed", with the fields the stages noted on the way), and traced
as a server span.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import structlog

from llmmesh import errors, tracing
from router import _metrics as metrics

log = structlog.get_logger(__name__)

#: The servicer context of a router RPC.
Context = grpc.aio.ServicerContext[Any, Any]
#: Span name prefix of the router's RPCs (llmmesh/tracing.py).
_ROUTER_SPAN = "llmmesh.v1.Router/"


class RpcScope:
    """One RPC: its exceptions become statuses (llmmesh.errors.grpc_errors); counted and logged."""

    def __init__(self, method: str, context: Context, *, quiet: bool = False) -> None:
        self._method = method
        self._context = context
        self._quiet = quiet
        self._errors = errors.grpc_errors(context)
        self._fields: dict[str, Any] = {}
        self._cancel_reason: str | None = None
        #: time.monotonic() when the RPC began.
        self.started = time.monotonic()
        #: The RPC's server span (tracing.NO_SPAN while tracing is off, and for quiet RPCs).
        self.span = tracing.NO_SPAN

    def note(self, **fields: Any) -> None:
        """Add fields to the line logged when the RPC ends."""
        self._fields.update(fields)

    def cancelled_because(self, reason: str) -> None:
        """The router cancels the RPC itself, for ``reason`` (logged as its CANCELLED status)."""
        self._cancel_reason = reason

    async def __aenter__(self) -> RpcScope:
        self.started = time.monotonic()
        await self._errors.__aenter__()
        if not self._quiet:
            self.span = tracing.server_span(_ROUTER_SPAN + self._method, self._context)
            self.span.__enter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        elapsed = time.monotonic() - self.started
        code, message = self._outcome(exc)
        metrics.REQUESTS.labels(self._method, code).inc()
        metrics.REQUEST_DURATION.labels(self._method).observe(elapsed)
        if message is not None:
            self._fields["error"] = message
        if not self._quiet or code != "OK":
            log.info(
                "request finished" if code == "OK" else "request failed",
                method=self._method,
                code=code,
                ms=round(elapsed * 1000.0, 3),
                **self._fields,
            )
        if self.span.recording:
            self.span.set_attribute("llmmesh.cached", bool(self._fields.get("cached", False)))
            for field in ("worker_id", "coalesced"):
                if field in self._fields:
                    self.span.set_attribute(f"llmmesh.{field}", self._fields[field])
        self.span.__exit__(exc_type, exc, tb)
        await self._errors.__aexit__(exc_type, exc, tb)

    def _outcome(self, exc: BaseException | None) -> tuple[str, str | None]:
        if exc is None:
            return "OK", None
        if isinstance(exc, errors.MeshError):
            return exc.code.name, exc.message
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            if errors.cancelled_status(self._context) is grpc.StatusCode.DEADLINE_EXCEEDED:
                return "DEADLINE_EXCEEDED", "the caller's deadline passed"
            return "CANCELLED", self._cancel_reason or "the caller cancelled"
        return "INTERNAL", type(exc).__name__
