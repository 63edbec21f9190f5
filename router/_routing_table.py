"""The routing table as ``ListWorkers`` answers it: each worker's load and health, and the state
of discovery."""

from __future__ import annotations

import time

from llmmesh.discovery import DiscoveryStatus
from llmmesh.v1 import router_pb2
from router._balancer import Policy
from router._pool import Worker, WorkerPool


def routing_table(pool: WorkerPool, policy: Policy, model: str) -> router_pb2.ListWorkersResponse:
    """The workers of ``model`` (every worker when empty), sorted by model then worker id, and
    the state of discovery."""
    rows = [_worker_status(w, policy) for w in pool.workers() if not model or w.model == model]
    rows.sort(key=lambda r: (r.model, r.worker_id, r.address))
    status = pool.discovery_status()
    return router_pb2.ListWorkersResponse(
        workers=rows, discovery=None if status is None else _discovery_status(status)
    )


def _worker_status(worker: Worker, policy: Policy) -> router_pb2.WorkerStatus:
    report = worker.report
    age = worker.report_age()
    return router_pb2.WorkerStatus(
        worker_id=worker.worker_id,
        address=worker.address,
        model=worker.model,
        engine=worker.engine,
        state=worker.state.value,
        in_flight=worker.in_flight,
        active_requests=report.active if report is not None else 0,
        queued_requests=report.queued if report is not None else 0,
        capacity=worker.info.capacity if worker.info is not None else 0,
        kv_cache_used_fraction=report.kv_cache_used_fraction if report is not None else 0.0,
        score=policy.score(worker),
        last_report_age_ms=-1.0 if age is None else age * 1000.0,
    )


def _discovery_status(status: DiscoveryStatus) -> router_pb2.DiscoveryStatus:
    now = time.time()
    return router_pb2.DiscoveryStatus(
        source=status.source,
        target=status.target,
        healthy=status.healthy,
        last_error=status.last_error,
        seconds_since_last_success=-1.0
        if status.last_success is None
        else max(0.0, now - status.last_success),
        consecutive_failures=status.consecutive_failures,
        endpoints=status.endpoints,
        seconds_since_last_change=-1.0
        if status.last_change is None
        else max(0.0, now - status.last_change),
    )
