"""The llm-mesh router: the public ``llmmesh.v1.Router`` service.

It validates a request, answers it from the cache service when it can, and otherwise sends it to
the least-loaded healthy worker serving the model, relaying the answer as it is produced. Run it
with ``python -m router`` (flags and ``LLMMESH_*`` variables: see :class:`RouterConfig`).
"""

from router._balancer import LeastLoaded, Loaded, Policy, make_policy
from router._cache_client import CacheClient, NoCache, ResponseCache, open_cache
from router._config import RouterConfig, load_config
from router._pool import Worker, WorkerPool, WorkerState
from router._service import RouterApp, RouterService

__all__ = [
    "CacheClient",
    "LeastLoaded",
    "Loaded",
    "NoCache",
    "Policy",
    "ResponseCache",
    "RouterApp",
    "RouterConfig",
    "RouterService",
    "Worker",
    "WorkerPool",
    "WorkerState",
    "load_config",
    "make_policy",
    "open_cache",
]
