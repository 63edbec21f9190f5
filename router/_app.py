"""The :class:`RouterApp` that runs the router: config, discovery, pool, cache client, lifecycle.

It builds the routing table (router/_pool.py) over the configured discovery (static addresses or
Consul) and the :class:`router.RouterService` that answers from it (router/_service.py), connects
the cache client once the event loop runs, and closes both when the server stops
(llmmesh/server.py runs it).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
import grpc.aio
import structlog

from llmmesh import consul
from llmmesh.discovery import ConsulDiscovery, Discovery, StaticDiscovery
from llmmesh.server import ServiceRunner
from llmmesh.v1 import router_pb2, router_pb2_grpc
from router._admission import AdmissionQueue
from router._balancer import Policy, make_policy
from router._cache_client import open_cache
from router._config import RouterConfig
from router._pool import WorkerPool, WorkerState
from router._service import RouterService
from router._stream_limits import StreamLimits

log = structlog.get_logger(__name__)


class RouterApp:
    """The router as a :class:`llmmesh.server.ServiceApp`."""

    service_names: Sequence[str] = (router_pb2.DESCRIPTOR.services_by_name["Router"].full_name,)

    def __init__(
        self,
        config: RouterConfig,
        *,
        discovery: Discovery | None = None,
        policy: Policy | None = None,
    ) -> None:
        self.config = config
        self.pool = WorkerPool(
            discovery if discovery is not None else _discovery(config),
            max_message_bytes=config.max_message_bytes,
            close_grace=config.max_request_time,
            load_stale_after=config.load_stale_after,
            eject_after_failures=config.eject_after_failures,
            eject_cooldown=config.eject_cooldown,
            eject_cooldown_max=config.eject_cooldown_max,
            discovery_grace=config.discovery_grace,
        )
        self.service = RouterService(
            self.pool,
            policy if policy is not None else make_policy(config.policy),
            limits=config.limits,
            max_request_time=config.max_request_time,
            max_attempts=config.max_attempts,
            admission=AdmissionQueue(
                max_size=config.admission_queue_size, max_wait=config.admission_max_wait
            ),
            fill_lock_ttl=config.fill_lock_ttl,
            fill_max_wait=config.fill_max_wait,
            stream_idle_timeout=config.stream_idle_timeout,
            stream_limits=StreamLimits(
                per_connection=config.max_streams_per_connection,
                per_tenant=config.max_streams_per_tenant,
            ),
        )

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register the Router servicer."""
        router_pb2_grpc.add_RouterServicer_to_server(self.service, server)

    async def start(self, runner: ServiceRunner) -> None:
        """Connect to the cache, follow discovery, and give the workers a moment to answer."""
        config = self.config
        self.service.cache = open_cache(
            config.cache_address,
            timeout=config.cache_timeout,
            max_message_bytes=config.max_message_bytes,
            breaker=config.cache_breaker,
        )
        await self.pool.start()
        await self.pool.wait_ready(timeout=2.0)
        workers = self.pool.workers()
        log.info(
            "routing",
            workers=len(workers),
            healthy=sum(1 for w in workers if w.state is WorkerState.HEALTHY),
            models=sorted(self.pool.known_models),
            discovery=config.discovery,
            cache=config.cache_address or "disabled",
            policy=self.service.policy.name,
        )

    async def drain(self) -> None:
        """Nothing to deregister: the router is found by its address."""

    async def close(self) -> None:
        """Stop following workers and close every connection."""
        try:
            await self.pool.close()
        finally:
            await self.service.cache.close()


def _discovery(config: RouterConfig) -> Discovery:
    if config.discovery == "static":
        return StaticDiscovery(config.workers)
    if config.discovery == "consul":
        return ConsulDiscovery(
            consul.resolve(config),
            wait=config.consul_watch_wait,
            backoff_max=config.consul_retry_max,
        )
    raise ValueError(f"discovery: unknown discovery {config.discovery!r}")
