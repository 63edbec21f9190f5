"""The first stage of a request: what the router accepts, decided before any network call.

A request keeps the id its caller gave it, or gets one (:func:`request_id_of`), which the servicer
binds to every log line of the RPC. Then :func:`accept_request` checks the tenant (metadata
``x-llmmesh-tenant``) and the request (bad input never reaches a worker), refuses a model no worker
has ever reported (NOT_FOUND), and returns an :class:`Accepted` request: the request as it is
forwarded (its request id filled in), its tenant, and its :class:`CachePlan`, the one place where
the request's use of the cache is decided. The later stages read the plan; none of them asks
``llmmesh.cache_key`` or ``llmmesh.validation`` again.

(Accepting a request is not admitting it to a worker: that is the admission queue's business,
router/_admission.py, at dispatch.)
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass

from llmmesh import errors
from llmmesh.cache_key import (
    DEFAULT_TENANT,
    TENANT_METADATA_KEY,
    cache_key,
    reads_cache,
    writes_cache,
)
from llmmesh.v1 import generate_pb2
from llmmesh.validation import Limits, validate_request
from router._pool import WorkerPool
from router._rpc_scope import Context

_TENANT = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class CachePlan:
    """How one request uses the response cache, decided once when it is accepted."""

    #: Whether it may be answered from the cache (``llmmesh.cache_key.reads_cache``).
    reads: bool
    #: Whether its finished answer is stored in the cache (``llmmesh.cache_key.writes_cache``).
    writes: bool
    #: The cache key ("" when the request neither reads nor writes the cache).
    key: str
    #: CACHE_POLICY_ONLY_IF_CACHED: a miss is NOT_FOUND rather than dispatched.
    only_if_cached: bool
    #: Time to live of the stored answer, in seconds (0: the cache service's default).
    ttl_seconds: int


def plan_cache(request: generate_pb2.GenerateRequest, *, tenant: str, limits: Limits) -> CachePlan:
    """The cache plan of a valid request of ``tenant``."""
    reads = reads_cache(request)
    writes = writes_cache(request)
    return CachePlan(
        reads=reads,
        writes=writes,
        key=cache_key(request, tenant=tenant, limits=limits) if reads or writes else "",
        only_if_cached=request.cache_policy == generate_pb2.CACHE_POLICY_ONLY_IF_CACHED,
        ttl_seconds=request.cache_ttl_seconds,
    )


@dataclass(frozen=True, slots=True)
class Accepted:
    """A validated request on its way through the router."""

    #: The request as forwarded to a worker (the request id filled in).
    request: generate_pb2.GenerateRequest
    tenant: str
    cache: CachePlan
    #: time.monotonic() when the router received the request.
    started: float

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000.0


def request_id_of(request: generate_pb2.GenerateRequest) -> str:
    """The request's id: the caller's, or a new one when the caller gave none."""
    return request.request_id or uuid.uuid4().hex


def accept_request(
    request: generate_pb2.GenerateRequest,
    request_id: str,
    context: Context,
    *,
    started: float,
    limits: Limits,
    pool: WorkerPool,
) -> Accepted:
    """Validate and resolve everything that needs no network; raise what the caller gets."""
    tenant = tenant_of(context)
    validate_request(request, limits)
    known = pool.known_models
    if request.model not in known:
        message = (
            f"model {request.model!r} is not served here; known models: "
            f"{', '.join(sorted(known)) or 'none'}"
        )
        waiting = pool.never_answered()
        if waiting:
            message += f" ({waiting} worker(s) have not answered yet)"
        raise errors.NotFound(message)
    forward = generate_pb2.GenerateRequest()
    forward.CopyFrom(request)
    forward.request_id = request_id
    return Accepted(
        request=forward,
        tenant=tenant,
        cache=plan_cache(request, tenant=tenant, limits=limits),
        started=started,
    )


def tenant_of(context: Context) -> str:
    """The caller's tenant, from metadata ``x-llmmesh-tenant`` (the default tenant without)."""
    for key, value in context.invocation_metadata() or ():
        if key == TENANT_METADATA_KEY:
            tenant = value.decode(errors="replace") if isinstance(value, bytes) else value
            if not _TENANT.fullmatch(tenant):
                raise errors.InvalidArgument(
                    f"metadata {TENANT_METADATA_KEY}",
                    "must be 1 to 64 characters among letters, digits, '.', '_' and '-'",
                )
            return tenant
    return DEFAULT_TENANT
