"""The router's Prometheus metrics (default registry, served by llmmesh.server)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Generation takes from milliseconds (a cache hit) to minutes (a long answer).
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip

REQUESTS = Counter(
    "llmmesh_router_requests_total",
    "RPCs answered by the router, by method and gRPC status code.",
    ["method", "code"],
)
REQUEST_DURATION = Histogram(
    "llmmesh_router_request_duration_seconds",
    "Time from receipt of an RPC to its end, as seen by the router.",
    ["method"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llmmesh_router_time_to_first_token_seconds",
    "Time from receipt of a generation request to its first text, as seen by the router.",
    ["method", "cached"],
    buckets=_LATENCY_BUCKETS,
)
CACHE_REQUESTS = Counter(
    "llmmesh_router_cache_requests_total",
    "Cache lookups by result: hit, miss, or error (cache down, slow or failing: served as a miss).",
    ["result"],
)
CACHE_STORES = Counter(
    "llmmesh_router_cache_stores_total",
    "Background stores of finished answers by result: stored, refused (too large), error, or"
    " dropped (too many pending).",
    ["result"],
)
WORKER_IN_FLIGHT = Gauge(
    "llmmesh_router_worker_in_flight",
    "Requests this router has in flight on each worker.",
    ["worker_id"],
)
WORKERS = Gauge(
    "llmmesh_router_workers",
    "Workers in the routing table, by state.",
    ["state"],
)
