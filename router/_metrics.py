"""The router's Prometheus metrics (default registry, served by llmmesh.server).

Per-worker series (``worker_id`` label, :data:`PER_WORKER`) live as long as the worker is in the
routing table: router/_pool.py exports a worker's in-flight count and load score as gauges read
from the table at scrape time (:func:`track_worker`) once the worker has told its id, and removes
all of its series when it leaves (:func:`forget_worker`). Every metric is listed in
docs/operating/metrics.md (scripts/metrics_reference.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from llmmesh.breaker import BreakerMetrics
from llmmesh.discovery import DiscoveryStatus
from llmmesh.malformed_requests import malformed_requests_metric

# The first token comes in a millisecond (a cache hit) to a minute (a long prompt behind a queue);
# a whole answer takes up to ten minutes.
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
DURATION_BUCKETS = (*TTFT_BUCKETS, 120.0, 300.0, 600.0)

REQUESTS = Counter(
    "llmmesh_router_requests_total",
    "RPCs answered by the router, by method and gRPC status code.",
    ["method", "code"],
)
REQUEST_DURATION = Histogram(
    "llmmesh_router_request_duration_seconds",
    "Time from receipt of an RPC to its end, as seen by the router.",
    ["method"],
    buckets=DURATION_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llmmesh_router_time_to_first_token_seconds",
    "Time from receipt of a generation request to its first text, as seen by the router.",
    ["method", "cached"],
    buckets=TTFT_BUCKETS,
)
CACHE_REQUESTS = Counter(
    "llmmesh_router_cache_requests_total",
    "Cache lookups by result: hit, miss, error (cache down, slow or failing: served as a miss), or"
    " skipped (the cache's circuit was open: a miss at once, the cache not called).",
    ["result"],
)
CACHE_STORES = Counter(
    "llmmesh_router_cache_stores_total",
    "Background stores of finished answers by result: stored, refused (too large), error,"
    " dropped (too many pending), or skipped (the cache's circuit was open).",
    ["result"],
)
#: The cache's circuit breaker: llmmesh_router_circuit_{state,short_circuited_total,opened_total}.
CIRCUIT = BreakerMetrics.create("router")
#: Requests whose bytes do not parse (llmmesh/malformed_requests.py).
MALFORMED_REQUESTS = malformed_requests_metric("router", ["llmmesh.v1.Router"])
WORKER_IN_FLIGHT = Gauge(
    "llmmesh_router_worker_in_flight",
    "Requests this router has in flight on each worker in the routing table.",
    ["worker_id"],
)
WORKER_SCORE = Gauge(
    "llmmesh_router_worker_score",
    "Load score of each worker in the routing table, as least-loaded routing sees it (lower is"
    " preferred): max(active + queued + sent_since_report, in_flight) / capacity +"
    " kv_cache_used_fraction.",
    ["worker_id"],
)
WORKERS = Gauge(
    "llmmesh_router_workers",
    "Workers in the routing table, by state.",
    ["state"],
)
DISCOVERY_UP = Gauge(
    "llmmesh_router_discovery_up",
    "1 while the discovery source answers (its last query succeeded), else 0; the router keeps"
    " routing to the last known workers either way.",
    ["source"],
)
DISCOVERY_ERRORS = Counter(
    "llmmesh_router_discovery_errors_total",
    "Failed discovery queries, by kind: unreachable, timeout, permission_denied, bad_request,"
    " server_error, bad_response.",
    ["source", "kind"],
)
DISCOVERY_LAST_SUCCESS = Gauge(
    "llmmesh_router_discovery_last_success_timestamp_seconds",
    "Unix time of the last successful discovery query.",
    ["source"],
)
DISCOVERY_LAST_CHANGE = Gauge(
    "llmmesh_router_discovery_last_change_timestamp_seconds",
    "Unix time when the discovered set of workers last changed.",
    ["source"],
)
DISCOVERY_GRACE = Counter(
    "llmmesh_router_discovery_grace_total",
    "Workers kept routable for --discovery-grace after discovery dropped them, because their own"
    " load stream was live and said they serve (e.g. Consul back from an outage with every TTL"
    " check still critical).",
)
WORKERS_IN_GRACE = Gauge(
    "llmmesh_router_workers_in_discovery_grace",
    "Workers in the routing table that discovery no longer lists but that are kept routable on"
    " their own load stream's word, for at most --discovery-grace.",
)
STALE_REPORTS = Counter(
    "llmmesh_router_worker_reports_stale_total",
    "Times a worker's load reports stopped for longer than --load-stale-after (it was SUSPECT"
    " until they resumed), by worker.",
    ["worker_id"],
)
BUSY_REFUSALS = Counter(
    "llmmesh_router_busy_refusals_total",
    "Requests a worker refused because another router had just taken its free slot; the request"
    " went back to the head of the admission queue (not a failure, not a retry).",
)
RETRIES = Counter(
    "llmmesh_router_retries_total",
    "Requests sent to another worker after one failed before the first token, by status code.",
    ["code"],
)
STREAMS_IDLE_CANCELLED = Counter(
    "llmmesh_router_streams_idle_cancelled_total",
    "Streams the router cancelled because their caller read nothing for --stream-idle-timeout"
    " (the worker's slot was freed when its stream ended, whatever the caller did).",
)
STREAMS_REFUSED = Counter(
    "llmmesh_router_streams_refused_total",
    "GenerateStream calls refused RESOURCE_EXHAUSTED because their caller already had the most"
    " streams open that a limit allows, by limit: connection (--max-streams-per-connection) or"
    " tenant (--max-streams-per-tenant).",
    ["limit"],
)
OPEN_STREAMS = Gauge(
    "llmmesh_router_open_streams",
    "GenerateStream calls open now (counted against the per-connection and per-tenant limits).",
)

EJECTIONS = Counter(
    "llmmesh_router_ejections_total",
    "Workers ejected for a cool-down after consecutive failures (or a failed probe).",
    ["worker_id"],
)
QUEUE_DEPTH = Gauge(
    "llmmesh_router_queue_depth",
    "Requests waiting in the router's admission queue for a free worker, by model.",
    ["model"],
)
QUEUE_WAIT = Histogram(
    "llmmesh_router_queue_wait_seconds",
    "Time requests waited in the router's admission queue (admitted or not).",
    buckets=DURATION_BUCKETS,
)
REJECTED = Counter(
    "llmmesh_router_rejected_total",
    "Requests the admission queue turned away, by reason: queue_full, max_wait, deadline.",
    ["reason"],
)

COALESCED = Counter(
    "llmmesh_router_coalesced_total",
    "Requests answered with the answer of an identical request instead of dispatching, by where"
    " they waited: router (joined a request in flight in this router) or cache (waited for another"
    " router's fill through the cache service).",
    ["via"],
)
FLIGHT_FOLLOWERS = Gauge(
    "llmmesh_router_flight_followers",
    "Requests waiting now for an identical request in flight in this router.",
)
CACHE_FILL_LOCKS = Counter(
    "llmmesh_router_cache_fill_locks_total",
    "Cache fill locks (single-flight across routers) by event: claimed (this router dispatches and"
    " fills), held_elsewhere (another router's fill did not finish within the wait: dispatched"
    " without the lock), lost (the lock expired before the answer was stored), released (given"
    " up without storing: the request failed or was cancelled).",
    ["event"],
)
for _limit in ("connection", "tenant"):
    STREAMS_REFUSED.labels(_limit)
for _via in ("router", "cache"):
    COALESCED.labels(_via)
for _event in ("claimed", "held_elsewhere", "lost", "released"):
    CACHE_FILL_LOCKS.labels(_event)

#: The series labelled by ``worker_id``: they exist while the worker is in the routing table.
PER_WORKER = (WORKER_IN_FLIGHT, WORKER_SCORE, EJECTIONS, STALE_REPORTS)


def track_worker(
    worker_id: str, in_flight: Callable[[], float], score: Callable[[], float]
) -> None:
    """Export a worker's in-flight count and load score, read from the routing table at scrape
    time (nothing is done per request)."""
    WORKER_IN_FLIGHT.labels(worker_id).set_function(in_flight)
    WORKER_SCORE.labels(worker_id).set_function(score)


def forget_worker(worker_id: str) -> None:
    """Remove every series of a worker that left the routing table (or changed its id)."""
    for metric in PER_WORKER:
        with contextlib.suppress(KeyError):
            metric.remove(worker_id)


class DiscoveryMetrics:
    """Keeps the discovery metrics in step with a source's :class:`DiscoveryStatus`."""

    def __init__(self) -> None:
        self._errors_seen = 0

    def observe(self, status: DiscoveryStatus) -> None:
        """Record ``status`` (called after every query of the source)."""
        source = status.source
        DISCOVERY_UP.labels(source).set(1.0 if status.healthy else 0.0)
        if status.errors_total > self._errors_seen:
            DISCOVERY_ERRORS.labels(source, status.last_error_kind or "unknown").inc(
                status.errors_total - self._errors_seen
            )
            self._errors_seen = status.errors_total
        if status.last_success is not None:
            DISCOVERY_LAST_SUCCESS.labels(source).set(status.last_success)
        if status.last_change is not None:
            DISCOVERY_LAST_CHANGE.labels(source).set(status.last_change)
