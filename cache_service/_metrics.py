"""Prometheus metrics of the cache service (default registry, served by the ServiceRunner)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from llmmesh.breaker import BreakerMetrics

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

LOOKUPS = Counter(
    "llmmesh_cache_lookups_total",
    "Lookup RPCs by result: hit, miss, or error (store unavailable)",
    ["result"],
)
STORES = Counter(
    "llmmesh_cache_stores_total",
    "Store RPCs by result: stored, too_large (refused), or error (store unavailable)",
    ["result"],
)
STORE_ERRORS = Counter(
    "llmmesh_cache_store_errors_total",
    "Store operations that failed (unreachable, timed out, error reply), by operation",
    ["op"],
)
OPERATION_DURATION = Histogram(
    "llmmesh_cache_operation_duration_seconds",
    "Time a store operation took, failed ones included, by operation",
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
    "Lookups answered with an entry after waiting for another caller's fill (single-flight)",
)
FILL_LOCKS = Counter(
    "llmmesh_cache_fill_locks_total",
    "Fill lock events: claimed (on a first miss), taken_over (claimed after waiting: the owner "
    "failed or died), wait_timed_out (the waiter got a miss without the lock), stored / released "
    "/ extended by the owner, not_owner (a token that no longer held the lock)",
    ["event"],
)
FILL_WAITERS = Gauge(
    "llmmesh_cache_fill_waiters",
    "Lookups waiting now for another caller's fill",
)
STORE_UP = Gauge(
    "llmmesh_cache_store_up",
    "1 when the last operation on the backing store succeeded, 0 when it failed",
)
#: The store's circuit breaker: llmmesh_cache_circuit_{state,short_circuited_total,opened_total}.
CIRCUIT = BreakerMetrics.create("cache")

for _result in ("hit", "miss", "error"):
    LOOKUPS.labels(result=_result)
for _result in ("stored", "too_large", "error"):
    STORES.labels(result=_result)
for _event in FILL_EVENTS:
    FILL_LOCKS.labels(event=_event)
for _op in STORE_OPS:
    STORE_ERRORS.labels(op=_op)
    OPERATION_DURATION.labels(op=_op)
