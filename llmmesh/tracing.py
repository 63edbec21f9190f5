"""OpenTelemetry tracing of a request across router -> cache -> worker; off unless configured.

Tracing is on in a process once :func:`configure` finds an OTLP endpoint (``--otlp-endpoint`` /
``LLMMESH_OTLP_ENDPOINT``, else the standard ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``); :func:`llmmesh.server.run_service` calls it at start. Spans go
to the collector over OTLP/gRPC in batches, from a background thread, so a collector that is slow
or down never delays or fails a request: its failures are logged once per outage and counted
(``llmmesh_<service>_trace_spans_total{result="failed"}``).

Off (the default) costs nothing: this module imports nothing from ``opentelemetry`` until tracing
is turned on (the SDK is the optional ``tracing`` extra), and each traced place does one check of
the module's state, getting the shared no-op :data:`NO_SPAN` back.

Servicers wrap an RPC in :func:`server_span`, which continues the caller's trace from the W3C
``traceparent`` / ``tracestate`` keys of the call's metadata and makes the span current for the
RPC (so that the spans of the calls it makes, and of the background tasks it starts, are its
children). Outgoing calls are wrapped in :func:`client_span`, whose :meth:`Span.outgoing` adds the
keys for that span to the call's metadata. A span's gRPC status (``rpc.grpc.status_code``) comes
from how its block ended (:func:`status_of`), or from :meth:`Span.set_status`; any status but OK
sets the span's status to ERROR.

The spans use a tracer provider of their own rather than the global one, so that nothing else in
the process (a library's instrumentation) changes what llm-mesh exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Protocol

import grpc
import grpc.aio
import prometheus_client
import structlog

import llmmesh
from llmmesh.errors import MeshError, cancelled_status
from llmmesh.settings import ConfigError
from llmmesh.v1 import generate_pb2

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.trace import Span as OtelSpan
    from opentelemetry.trace import Tracer


log = structlog.get_logger(__name__)

#: The W3C trace context keys carried in gRPC metadata (lowercase, as gRPC requires).
TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
_KEYS: Final = frozenset({TRACEPARENT, TRACESTATE})
#: Standard OpenTelemetry environment variables honoured when no endpoint is configured.
OTEL_ENDPOINT_VARIABLES: Final = (
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
#: The OTLP exporter logs every failed batch and retry; :class:`_WatchedExporter` logs an outage
#: once instead.
_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.grpc.exporter"

#: Longest request id or model name put on a span (the request is validated after).
_MAX_ATTRIBUTE_CHARS = 256

Metadata = tuple[tuple[str, str | bytes], ...]


class TraceSettings(Protocol):
    """What :func:`configure` reads of a service's settings (``llmmesh.server.ServerSettings``
    has both)."""

    @property
    def otlp_endpoint(self) -> str: ...

    @property
    def trace_sample_ratio(self) -> float: ...


class Span:
    """A span of llm-mesh's. This base class is the no-op span of tracing off (:data:`NO_SPAN`):
    every method does nothing, :meth:`outgoing` gives the metadata back unchanged."""

    __slots__ = ()

    #: False for :data:`NO_SPAN`: nothing set on it is kept.
    recording: bool = False

    def set_attribute(self, key: str, value: str | bool | int | float | Sequence[str]) -> None:
        """Set one attribute."""

    def set_request(self, request_id: str, model: str) -> None:
        """The request's id and model (``llmmesh.request_id``, ``gen_ai.request.model``)."""

    def set_summary(self, summary: generate_pb2.GenerationSummary) -> None:
        """What the engine did: prompt and completion tokens, finish reason, worker, cached."""

    def set_status(self, code: grpc.StatusCode, message: str = "") -> None:
        """The call's gRPC status, instead of the one :func:`status_of` infers at the end."""

    def outgoing(self, metadata: Sequence[tuple[str, str | bytes]] = ()) -> Metadata:
        """``metadata`` with this span's trace context added, for a call the span covers."""
        return tuple(metadata)

    def __enter__(self) -> Span:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


#: The span of every traced place while tracing is off.
NO_SPAN: Final = Span()


class _Tracing:
    """Tracing turned on: the provider, llm-mesh's tracer, the W3C propagator."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("llmmesh", llmmesh.__version__)
        self.propagator = TraceContextTextMapPropagator()
        self.context = context
        self.trace = trace


#: None while tracing is off: the one check on the hot path.
_state: _Tracing | None = None


def enabled() -> bool:
    """Whether tracing is on in this process."""
    return _state is not None


def server_span(name: str, context: grpc.aio.ServicerContext[Any, Any]) -> Span:
    """A SERVER span for the RPC ``name`` (``package.Service/Method``) that continues the trace
    of the caller's metadata; use it as a context manager around the handler, which makes it the
    current span. :data:`NO_SPAN` while tracing is off."""
    if _state is None:
        return NO_SPAN
    return _LiveSpan.server(_state, name, context)


def client_span(name: str) -> Span:
    """A CLIENT span, child of the current span, for a call to ``name``
    (``package.Service/Method``); send :meth:`Span.outgoing` as the call's metadata.
    :data:`NO_SPAN` while tracing is off."""
    if _state is None:
        return NO_SPAN
    return _LiveSpan.client(_state, name)


def status_of(
    exc: BaseException | None,
    context: grpc.aio.ServicerContext[Any, Any] | None = None,
    *,
    upstream: bool = False,
) -> tuple[grpc.StatusCode, str]:
    """The gRPC status that a handler (``context`` its RPC's) or, with ``upstream``, a call to
    another service ended with when ``exc`` was raised: for a :class:`MeshError` that translates
    a failed call, the status the other service answered."""
    if exc is None:
        return grpc.StatusCode.OK, ""
    if isinstance(exc, MeshError):
        code = exc.upstream_code if upstream and exc.upstream_code is not None else exc.code
        return code, exc.message
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or ""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        if cancelled_status(context) is grpc.StatusCode.DEADLINE_EXCEEDED:
            return grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed"
        return grpc.StatusCode.CANCELLED, "cancelled"
    if isinstance(exc, grpc.aio.AbortError) and context is not None:
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code, str(context.details() or "")
    return grpc.StatusCode.INTERNAL, type(exc).__name__


class _LiveSpan(Span):
    """A recording span of tracing on (or a sampled-out one, which records nothing)."""

    __slots__ = ("_code", "_grpc_context", "_message", "_span", "_state", "_task", "_token")

    recording = True

    def __init__(
        self,
        state: _Tracing,
        span: OtelSpan,
        grpc_context: grpc.aio.ServicerContext[Any, Any] | None,
    ) -> None:
        self._state = state
        self._span = span
        self._grpc_context: grpc.aio.ServicerContext[Any, Any] | None = grpc_context
        self._code: grpc.StatusCode | None = None
        self._message = ""
        self._token: Token[Context] | None = None
        self._task: asyncio.Task[Any] | None = None

    @classmethod
    def server(
        cls, state: _Tracing, name: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _LiveSpan:
        carrier: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if key in _KEYS:
                carrier[key] = (
                    value.decode("ascii", "replace") if isinstance(value, bytes) else value
                )
        parent = state.propagator.extract(carrier) if carrier else None
        span = state.tracer.start_span(
            name,
            context=parent,
            kind=state.trace.SpanKind.SERVER,
            attributes=_rpc_attributes(name),
        )
        return cls(state, span, context)

    @classmethod
    def client(cls, state: _Tracing, name: str) -> _LiveSpan:
        span = state.tracer.start_span(
            name, kind=state.trace.SpanKind.CLIENT, attributes=_rpc_attributes(name)
        )
        return cls(state, span, None)

    def set_attribute(self, key: str, value: str | bool | int | float | Sequence[str]) -> None:
        self._span.set_attribute(key, value)

    def set_request(self, request_id: str, model: str) -> None:
        self._span.set_attributes(
            {
                "llmmesh.request_id": request_id[:_MAX_ATTRIBUTE_CHARS],
                "gen_ai.request.model": model[:_MAX_ATTRIBUTE_CHARS],
            }
        )

    def set_summary(self, summary: generate_pb2.GenerationSummary) -> None:
        attributes: dict[str, Any] = {
            "gen_ai.usage.input_tokens": summary.usage.prompt_tokens,
            "gen_ai.usage.output_tokens": summary.usage.completion_tokens,
            "gen_ai.response.finish_reasons": [_finish_reason(summary.finish_reason)],
            "llmmesh.cached": summary.cached,
        }
        if summary.worker_id:
            attributes["llmmesh.worker_id"] = summary.worker_id
        self._span.set_attributes(attributes)

    def set_status(self, code: grpc.StatusCode, message: str = "") -> None:
        self._code = code
        self._message = message

    def outgoing(self, metadata: Sequence[tuple[str, str | bytes]] = ()) -> Metadata:
        carrier: dict[str, str] = {}
        self._state.propagator.inject(carrier, self._state.trace.set_span_in_context(self._span))
        return (*metadata, *carrier.items())

    def __enter__(self) -> Span:
        if self._grpc_context is not None:
            current: Context = self._state.trace.set_span_in_context(self._span)
            self._token = self._state.context.attach(current)
            with contextlib.suppress(RuntimeError):
                self._task = asyncio.current_task()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        span = self._span
        if self._code is None:
            self._code, self._message = status_of(
                exc, self._grpc_context, upstream=self._grpc_context is None
            )
        code = self._code
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            trace = self._state.trace
            span.set_status(trace.Status(trace.StatusCode.ERROR, f"{code.name}: {self._message}"))
            if exc is not None and not isinstance(
                exc, MeshError | grpc.aio.AioRpcError | grpc.aio.AbortError | asyncio.CancelledError
            ):
                span.record_exception(exc)
        span.end()
        # A streaming handler (an async generator) that its caller left is closed later from
        # another task, whose context never had the span attached: nothing to restore there, and
        # the RPC's own task ends with the RPC.
        if self._token is not None:
            try:
                same_task = asyncio.current_task() is self._task
            except RuntimeError:
                same_task = False
            if same_task:
                self._state.context.detach(self._token)
            self._token = None


def _finish_reason(value: int) -> str:
    try:
        name = generate_pb2.FinishReason.Name(value)  # type: ignore[arg-type]
    except ValueError:
        return "unspecified"
    return name.removeprefix("FINISH_REASON_").lower()


def _rpc_attributes(name: str) -> dict[str, str]:
    service, _, method = name.rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


# -- turning it on and off ------------------------------------------------------------------


def configure(
    service_name: str, settings: TraceSettings, *, environ: Mapping[str, str] | None = None
) -> bool:
    """Turn tracing on for this process when an OTLP endpoint is configured; whether it is on.

    The endpoint is ``settings.otlp_endpoint``, else the standard OpenTelemetry variables
    (:data:`OTEL_ENDPOINT_VARIABLES`, with the exporter's other ``OTEL_EXPORTER_OTLP_*``
    variables; ``OTEL_SDK_DISABLED=true`` keeps it off). Raises :class:`ConfigError` when an
    endpoint is configured but the ``tracing`` extra is not installed.
    """
    environ = os.environ if environ is None else environ
    endpoint = settings.otlp_endpoint
    if not endpoint:
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        endpoint = next((environ[v] for v in OTEL_ENDPOINT_VARIABLES if environ.get(v)), "")
    if not endpoint:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            f"otlp_endpoint: tracing to {endpoint} needs the tracing extra "
            f"(pip install 'llm-mesh[tracing]'): {exc}"
        ) from None
    logging.getLogger(_EXPORTER_LOGGER).setLevel(logging.CRITICAL)
    # Given no endpoint, the exporter reads the OTEL_EXPORTER_OTLP_* variables itself.
    exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint or None)
    watched = _watched(exporter, service_name=service_name, endpoint=endpoint)
    install(service_name, BatchSpanProcessor(watched), sample_ratio=settings.trace_sample_ratio)
    log.info("tracing on", otlp_endpoint=endpoint, sample_ratio=settings.trace_sample_ratio)
    return True


def install(service_name: str, processor: SpanProcessor, *, sample_ratio: float = 1.0) -> None:
    """Turn tracing on with spans going to ``processor`` (:func:`configure` uses a batching OTLP
    one; tests an in-memory one). Replaces any earlier installation, shutting it down."""
    global _state
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    shutdown()
    provider = TracerProvider(
        resource=Resource.create(
            {
                "service.name": service_name,
                "service.namespace": "llmmesh",
                "service.version": llmmesh.__version__,
            }
        ),
        sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
    )
    provider.add_span_processor(processor)
    _state = _Tracing(provider)


def shutdown() -> None:
    """Export what is pending and turn tracing off (at the end of the process; idempotent)."""
    global _state
    state, _state = _state, None
    if state is not None:
        state.provider.shutdown()


# -- the exporter's health ------------------------------------------------------------------

_SPANS: dict[str, prometheus_client.Counter] = {}


def spans_counter(service_name: str) -> prometheus_client.Counter:
    """``llmmesh_<service>_trace_spans_total{result}``: spans exported, or lost (failed)."""
    name = "llmmesh_" + re.sub(r"[^a-zA-Z0-9_]", "_", service_name) + "_trace_spans"
    if name not in _SPANS:
        counter = prometheus_client.Counter(
            name, "Spans sent to the OTLP collector, by result (exported, failed)", ["result"]
        )
        for result in ("exported", "failed"):
            counter.labels(result)
        _SPANS[name] = counter
    return _SPANS[name]


def _watched(exporter: SpanExporter, *, service_name: str, endpoint: str) -> SpanExporter:
    """``exporter``, counting what it exports and logging an outage of the collector once (when
    exports start failing, and when they work again)."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    counter = spans_counter(service_name)

    class WatchedExporter(SpanExporter):
        def __init__(self) -> None:
            self.failing = False

        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            try:
                result = exporter.export(spans)
            except Exception as exc:
                log.debug("trace export raised", error=str(exc))
                result = SpanExportResult.FAILURE
            ok = result is SpanExportResult.SUCCESS
            counter.labels("exported" if ok else "failed").inc(len(spans))
            if ok and self.failing:
                log.info("trace export recovered", otlp_endpoint=endpoint)
            elif not ok and not self.failing:
                log.warning(
                    "trace export failing; spans are dropped until the collector answers",
                    otlp_endpoint=endpoint,
                    spans=len(spans),
                )
            self.failing = not ok
            return result

        def shutdown(self) -> None:
            exporter.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return exporter.force_flush(timeout_millis)

    return WatchedExporter()


__all__ = [
    "NO_SPAN",
    "OTEL_ENDPOINT_VARIABLES",
    "TRACEPARENT",
    "TRACESTATE",
    "Metadata",
    "Span",
    "client_span",
    "configure",
    "enabled",
    "install",
    "server_span",
    "shutdown",
    "spans_counter",
    "status_of",
]
