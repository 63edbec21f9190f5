"""The one exception tree of llm-mesh, and its one translation to gRPC status codes.

::

    MeshError                       INTERNAL (a bug or an unexpected engine failure)
    ├── InvalidArgument             INVALID_ARGUMENT   the message names the field
    ├── RequestFailed               INTERNAL, or INVALID_ARGUMENT: the engine failed or refused
    │                                                  this one request; the worker is fine
    ├── NotFound                    NOT_FOUND          unknown model, only-if-cached miss
    ├── Unavailable                 UNAVAILABLE        no healthy worker, engine failed, draining
    ├── ResourceExhausted           RESOURCE_EXHAUSTED queue full, message too large
    │   └── Busy                    RESOURCE_EXHAUSTED no free batch slot (trailer x-llmmesh-busy)
    ├── DeadlineExceeded            DEADLINE_EXCEEDED
    ├── Cancelled                   CANCELLED
    ├── Unauthenticated             UNAUTHENTICATED
    └── PermissionDenied            PERMISSION_DENIED

Lower layers (redis, consul, tritonclient, engines) raise or are translated into these at their
boundary; servicers wrap each RPC in :func:`grpc_errors`, which turns them into a status and
message, and turns anything else into INTERNAL without showing the caller a stack trace.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
import grpc.aio
import structlog

log = structlog.get_logger(__name__)


class MeshError(Exception):
    """Base of every error llm-mesh reports to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: The status another service answered, when this error translates a failed call to it.
    upstream_code: grpc.StatusCode | None = None
    #: Trailing metadata sent with the status.
    trailers: tuple[tuple[str, str], ...] = ()

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(MeshError):
    """A request field has a value the service cannot accept."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class RequestFailed(MeshError):
    """The engine failed this one request, not the worker: TensorRT-LLM's ``RequestError``, a
    Triton error response for the request. INTERNAL, or INVALID_ARGUMENT (``invalid``) when the
    engine refused the request's input. The message carries the engine's.

    The worker stays SERVING and a router neither retries the request nor counts it against the
    worker (router/_dispatch.py): another worker would most likely fail it the same way, and one
    bad request must not take a healthy worker out of rotation. An engine that is *down* raises
    :class:`worker.engines.EngineError` instead, which makes the worker UNAVAILABLE.
    """

    def __init__(self, message: str, *, invalid: bool = False) -> None:
        super().__init__(message)
        if invalid:
            self.code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MeshError):
    """The named thing (a model, a cached answer) does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class Unavailable(MeshError):
    """The service cannot serve now; retrying later or elsewhere may succeed."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(MeshError):
    """A bound (queue, message size) was reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


#: Request metadata by which a router asks a worker to refuse the request (:class:`Busy`) rather
#: than queue it when the worker has no free batch slot: a router that queues requests itself
#: binds a request to a worker only when the worker has room for it (router/_picking.py).
NO_QUEUE_METADATA_KEY = "x-llmmesh-no-queue"
#: Trailing metadata of a :class:`Busy` refusal.
BUSY_TRAILER = "x-llmmesh-busy"


class Busy(ResourceExhausted):
    """A worker asked not to queue (``x-llmmesh-no-queue``) has no free batch slot."""

    trailers = ((BUSY_TRAILER, "1"),)


def is_busy(exc: grpc.aio.AioRpcError) -> bool:
    """True when a failed call is a worker's :class:`Busy` refusal."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    trailers: Any = exc.trailing_metadata() or ()
    return any(key == BUSY_TRAILER for key, _ in trailers)


class DeadlineExceeded(MeshError):
    """The caller's deadline passed before the answer was complete."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(MeshError):
    """The caller cancelled the request."""

    code = grpc.StatusCode.CANCELLED


class Unauthenticated(MeshError):
    """The caller did not prove who it is."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MeshError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        Unavailable,
        ResourceExhausted,
        DeadlineExceeded,
        Cancelled,
        Unauthenticated,
        PermissionDenied,
    )
}


def from_rpc_error(exc: grpc.aio.AioRpcError, *, peer: str = "") -> MeshError:
    """Translate a failed call to another llm-mesh service into our error tree.

    The result's :attr:`MeshError.upstream_code` keeps the status the other service answered.
    """
    code = exc.code()
    details = exc.details() or code.name
    error: MeshError
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        error = MeshError(details)
        error.code = grpc.StatusCode.INVALID_ARGUMENT
    elif code == grpc.StatusCode.INTERNAL:
        # The other service failed this request (a worker's RequestFailed, or a bug it logged):
        # passed on as it is, without the peer's address (internal addresses are for logs).
        error = RequestFailed(details)
    elif (cls := _BY_CODE.get(code)) is not None:
        error = cls(f"{peer}: {details}" if peer and cls is Unavailable else details)
    else:
        error = Unavailable(f"{peer or 'upstream'} failed: {code.name}: {details}")
    error.upstream_code = code
    return error


def cancelled_status(context: grpc.aio.ServicerContext[Any, Any] | None) -> grpc.StatusCode:
    """The status of an RPC whose handler was cancelled: gRPC cancels it both when the caller
    goes away (CANCELLED) and when the caller's deadline passes (DEADLINE_EXCEEDED)."""
    remaining: float | None = context.time_remaining() if context is not None else None
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: MeshError) -> NoReturn:
    """End the current RPC with the status of ``error``."""
    await context.abort(error.code, error.message, error.trailers)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


@contextlib.asynccontextmanager
async def grpc_errors(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Translate exceptions raised inside an RPC handler into gRPC statuses.

    MeshError becomes its status code and message. Any other exception is logged once with its
    traceback and becomes INTERNAL with a generic message: no stack trace reaches the caller.
    """
    try:
        yield
    except MeshError as exc:
        await context.abort(exc.code, exc.message, exc.trailers)
    except grpc.aio.AbortError:
        raise
    except Exception:
        log.exception("unhandled error in RPC handler")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the service's logs")
