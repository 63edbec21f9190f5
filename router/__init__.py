"""The llm-mesh router: the public ``llmmesh.v1.Router`` service.

It validates a request, answers it from the cache service when it can, and otherwise sends it to
the least-loaded healthy worker serving the model (by the load the workers report), queueing it
by priority while every worker is full, and relays the answer as it is produced. Run it
with ``python -m router`` (flags and ``LLMMESH_*`` variables: see :class:`RouterConfig`).
"""

from router._admission import AdmissionQueue
from router._app import RouterApp
from router._balancer import (
    POLICY_NAMES,
    LeastLoaded,
    Loaded,
    LoadReport,
    Policy,
    PowerOfTwo,
    Random,
    RoundRobin,
    is_full,
    load_score,
    make_policy,
)
from router._cache_client import CacheClient, NoCache, ResponseCache, open_cache
from router._config import RouterConfig, load_config
from router._pool import Lease, Worker, WorkerPool, WorkerState
from router._service import RouterService

__all__ = [
    "POLICY_NAMES",
    "AdmissionQueue",
    "CacheClient",
    "Lease",
    "LeastLoaded",
    "LoadReport",
    "Loaded",
    "NoCache",
    "Policy",
    "PowerOfTwo",
    "Random",
    "ResponseCache",
    "RoundRobin",
    "RouterApp",
    "RouterConfig",
    "RouterService",
    "Worker",
    "WorkerPool",
    "WorkerState",
    "is_full",
    "load_config",
    "load_score",
    "make_policy",
    "open_cache",
]
