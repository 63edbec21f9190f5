"""Prometheus metrics of the cache service (default registry, served by the ServiceRunner).

Two levels: every RPC is counted by method and status code and timed as the service sees it
(:func:`rpc`), and every operation on the backing store (Redis or memory) is timed and its
failures counted by operation, so that a slow or failing Redis shows apart from slow callers.
Every metric is listed in docs/operating/metrics.md (scripts/metrics_reference.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
from prometheus_client import Counter, Gauge, Histogram

from llmmesh.breaker import BreakerMetrics
from llmmesh.errors import MeshError, cancelled_status
from llmmesh.malformed_requests import malformed_requests_metric

#: Store operations, as labelled in ``op``.
STORE_OPS = (
    "get",
    "set",
    "delete",
    "delete_model",
    "delete_tenant",
    "size",
    "ping",
    "get_or_claim",
    "release_fill",
    "extend_fill",
    "await_fill",
)
#: The RPCs of llmmesh.v1.Cache, as labelled in ``method``.
METHODS = ("Lookup", "Store", "Invalidate", "ReleaseFill", "ExtendFill", "Stats")
#: What happens to fill locks (single-flight across routers), as labelled in ``event``.
FILL_EVENTS = (
    "claimed",
    "taken_over",
    "wait_timed_out",
    "stored",
    "released",
    "extended",
    "not_owner",
)

REQUESTS = Counter(
    "llmmesh_cache_requests_total",
    "RPCs answered by the cache service, by method and gRPC status code.",
    ["method", "code"],
)
REQUEST_DURATION = Histogram(
    "llmmesh_cache_request_duration_seconds",
    "Time from receipt of an RPC to its answer, by method (a lookup that waits for another"
    " caller's fill included).",
    ["method"],
    buckets=(
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
        2.5, 5.0, 10.0, 30.0,
    ),
)  # fmt: skip
LOOKUPS = Counter(
    "llmmesh_cache_lookups_total",
    "Lookup RPCs by result: hit, miss, or error (store unavailable).",
    ["result"],
)
STORES = Counter(
    "llmmesh_cache_stores_total",
    "Store RPCs by result: stored, too_large (refused), or error (store unavailable).",
    ["result"],
)
STORE_ERRORS = Counter(
    "llmmesh_cache_store_errors_total",
    "Store operations that failed (unreachable, timed out, error reply), by operation.",
    ["op"],
)
OPERATION_DURATION = Histogram(
    "llmmesh_cache_operation_duration_seconds",
    "Time a store operation took, failed ones included, by operation.",
    ["op"],
    buckets=(
        0.0001,
        0.00025,
        0.0005,
        0.001,
        0.0025,
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
    ),
)
COALESCED = Counter(
    "llmmesh_cache_coalesced_total",
    "Lookups answered with an entry after waiting for another caller's fill (single-flight).",
)
FILL_LOCKS = Counter(
    "llmmesh_cache_fill_locks_total",
    "Fill lock events: claimed (on a first miss), taken_over (claimed after waiting: the owner "
    "failed or died), wait_timed_out (the waiter got a miss without the lock), stored / released "
    "/ extended by the owner, not_owner (a token that no longer held the lock).",
    ["event"],
)
FILL_WAITERS = Gauge(
    "llmmesh_cache_fill_waiters",
    "Lookups waiting now for another caller's fill.",
)
STORE_UP = Gauge(
    "llmmesh_cache_store_up",
    "1 when the last operation on the backing store succeeded, 0 when it failed.",
)
#: The store's circuit breaker: llmmesh_cache_circuit_{state,short_circuited_total,opened_total}.
CIRCUIT = BreakerMetrics.create("cache")
#: Requests whose bytes do not parse (llmmesh/malformed_requests.py).
MALFORMED_REQUESTS = malformed_requests_metric("cache", ["llmmesh.v1.Cache"])

for _method in METHODS:
    REQUEST_DURATION.labels(method=_method)
    REQUESTS.labels(method=_method, code="OK")
for _result in ("hit", "miss", "error"):
    LOOKUPS.labels(result=_result)
for _result in ("stored", "too_large", "error"):
    STORES.labels(result=_result)
for _event in FILL_EVENTS:
    FILL_LOCKS.labels(event=_event)
for _op in STORE_OPS:
    STORE_ERRORS.labels(op=_op)
    OPERATION_DURATION.labels(op=_op)


@contextlib.contextmanager
def rpc(method: str, context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[None]:
    """Count and time one RPC; its code comes from the exception that ends it, if any (used
    inside :func:`llmmesh.errors.grpc_errors`, which turns that exception into the status)."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        yield
    except MeshError as exc:
        code = exc.code
        raise
    except asyncio.CancelledError:
        code = cancelled_status(context)
        raise
    except Exception:
        code = grpc.StatusCode.INTERNAL
        raise
    finally:
        REQUESTS.labels(method, code.name).inc()
        REQUEST_DURATION.labels(method).observe(time.perf_counter() - started)
