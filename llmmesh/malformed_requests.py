"""Requests whose bytes do not parse: ``INVALID_ARGUMENT`` in plain words, not ``UNKNOWN``.

grpc.aio parses a request with its method handler's ``request_deserializer`` before the servicer
runs. When that raises (protobuf's ``DecodeError``: a string field that is not valid UTF-8, as a
JavaScript client sends for half a surrogate pair, or truncated or corrupt bytes), grpc answers
``UNKNOWN: Unexpected <class '...DecodeError'>: ...`` and logs the exception at error, once per
request. A deserializer can change neither: grpc's answer to an exception is fixed, and only the
servicer's ``context.abort`` ends an RPC with a status of our choosing.

So :class:`MalformedRequestGuard` stands in for the server while the servicers register, and
rebuilds each method handler once: its deserializer returns a :class:`MalformedRequest` instead of
raising, and its servicer method, handed one, counts it, logs it (warning, at most one line per
gRPC service every :data:`LOG_INTERVAL_S`, with the number left out since the last line) and aborts
with ``INVALID_ARGUMENT: request is not a valid <message>: ...``. A good request costs one function
call around the deserializer and one around the servicer method (no interceptor: nothing runs per
call to find the handler); a streaming answer is written with ``context.write``, as grpc itself
writes what an async generator yields. Handlers of client-streaming methods, and of sync servicers,
are registered unchanged (llm-mesh has none).

Each service registers its counter with :func:`malformed_requests_metric` in its metrics module.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias, cast

import grpc
import grpc.aio
import structlog
from google.protobuf.message import DecodeError
from prometheus_client import REGISTRY, CollectorRegistry, Counter

log = structlog.get_logger(__name__)

#: At most one warning line per gRPC service in this many seconds.
LOG_INTERVAL_S = 10.0

_Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_Generic: TypeAlias = "grpc.GenericRpcHandler[Any, Any]"

#: The counter of each gRPC service, by its full name (filled by malformed_requests_metric).
_COUNTERS: dict[str, Counter] = {}


def malformed_requests_metric(
    service: str, grpc_services: Sequence[str], registry: CollectorRegistry = REGISTRY
) -> Counter:
    """Register ``llmmesh_<service>_malformed_requests_total`` (once per service and registry),
    counting by method the malformed requests to ``grpc_services`` (full names)."""
    counter = Counter(
        f"llmmesh_{service}_malformed_requests_total",
        "Requests refused with INVALID_ARGUMENT because their bytes do not parse as the method's"
        " request message (a string field that is not valid UTF-8, truncated or corrupt bytes),"
        " by method.",
        ["method"],
        registry=registry,
    )
    for name in grpc_services:
        _COUNTERS[name] = counter
    return counter


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """What a guarded deserializer returns, instead of raising, for bytes that do not parse."""

    #: The full name of the message the bytes should have been, e.g. llmmesh.v1.GenerateRequest.
    message_type: str


class _ServiceReporter:
    """Counts and logs (rate-limited) the malformed requests of one gRPC service."""

    def __init__(self, service: str, clock: Callable[[], float]) -> None:
        self._counter = _COUNTERS.get(service)
        self._clock = clock
        self._next_line_at = float("-inf")
        self._left_out = 0

    def report(self, method: str, request: MalformedRequest) -> None:
        if self._counter is not None:
            self._counter.labels(method.rsplit("/", 1)[-1]).inc()
        now = self._clock()
        if now < self._next_line_at:
            self._left_out += 1
            return
        self._next_line_at = now + LOG_INTERVAL_S
        # left_out: malformed requests to this service since the previous line, not logged.
        log.warning(
            "malformed request",
            method=method,
            message_type=request.message_type,
            left_out=self._left_out,
        )
        self._left_out = 0


def invalid_request_details(message_type: str) -> str:
    """The message a caller gets for bytes that do not parse as ``message_type``."""
    return (
        f"request is not a valid {message_type}: its bytes do not parse as that message (a string"
        " field that is not valid UTF-8, or truncated or corrupt bytes)"
    )


def _message_type(deserializer: Callable[[bytes], Any], method: str) -> str:
    # Generated handlers pass ``Message.FromString``, bound to the message class.
    descriptor = getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", f"request of {method}"))


def _guard_handler(handler: _Handler, method: str, reporter: _ServiceReporter) -> _Handler:
    parse = handler.request_deserializer
    if handler.request_streaming or parse is None:
        return handler
    behavior = cast(
        "Callable[..., Any]",
        handler.unary_stream if handler.response_streaming else handler.unary_unary,
    )
    if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler
    malformed = MalformedRequest(_message_type(parse, method))
    details = invalid_request_details(malformed.message_type)

    def parse_or_flag(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            return malformed

    async def reject(context: grpc.aio.ServicerContext[Any, Any]) -> NoReturn:
        reporter.report(method, malformed)
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, details)

    if not handler.response_streaming:

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if request is malformed:
                await reject(context)
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary,
            request_deserializer=parse_or_flag,
            response_serializer=handler.response_serializer,
        )

    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if request is malformed:
                await reject(context)
            async for response in behavior(request, context):
                await context.write(response)

    else:

        async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if request is malformed:
                await reject(context)
            await behavior(request, context)

    return grpc.unary_stream_rpc_method_handler(
        stream, request_deserializer=parse_or_flag, response_serializer=handler.response_serializer
    )


class MalformedRequestGuard:
    """Stands in for a ``grpc.aio.Server`` while servicers register (``add_*Servicer_to_server``);
    :meth:`install` then registers their handlers on the server, guarded."""

    def __init__(self, server: grpc.aio.Server, *, clock: Callable[[], float] = time.monotonic):
        self._server = server
        self._clock = clock
        self._generic: list[_Generic] = []
        self._registered: dict[str, dict[str, _Handler]] = {}

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[_Generic]) -> None:
        self._generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, _Handler]
    ) -> None:
        reporter = _ServiceReporter(service_name, self._clock)
        self._registered[service_name] = {
            name: _guard_handler(handler, f"/{service_name}/{name}", reporter)
            for name, handler in method_handlers.items()
        }

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def install(self) -> None:
        """Register on the server what was added. The generated code adds each service twice,
        as a generic handler and as registered methods: the generic one is rebuilt from the
        guarded handlers, and any other generic handler is added as it is."""
        for generic in self._generic:
            if isinstance(generic, grpc.ServiceRpcHandler) and (
                generic.service_name() in self._registered
            ):
                continue
            self._server.add_generic_rpc_handlers((generic,))
        for service, handlers in self._registered.items():
            self._server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, handlers),)
            )
            # (Not in grpc-stubs yet.)
            cast(Any, self._server).add_registered_method_handlers(service, handlers)

    @classmethod
    def register(
        cls, server: grpc.aio.Server, add_to_server: Callable[[grpc.aio.Server], None]
    ) -> None:
        """Call ``add_to_server`` (e.g. ``app.add_to_server``) on a guard, then install it."""
        guard = cls(server)
        add_to_server(cast(grpc.aio.Server, guard))
        guard.install()


__all__ = [
    "LOG_INTERVAL_S",
    "MalformedRequest",
    "MalformedRequestGuard",
    "invalid_request_details",
    "malformed_requests_metric",
]
