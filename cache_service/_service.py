"""The ``llmmesh.v1.Cache`` servicer and the :class:`CacheApp` that runs it.

The servicer validates requests, applies the TTL and size policy, counts what happens, and leaves
keeping entries to a :class:`~cache_service.stores.CacheStore`. A store that fails makes the RPC
answer UNAVAILABLE at once (every store operation is bounded by the store's timeout), and the
router goes on without the cache. :class:`StoreHealth` turns the stream of successes and failures
into one log line when an outage starts and one when it ends, and the ``llmmesh_cache_store_up``
gauge; a background probe keeps both current when no requests come.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog
from google.protobuf.message import DecodeError

from cache_service import _metrics as metrics
from cache_service._config import CacheConfig
from cache_service.stores import CacheStore, MemoryStore, RedisStore, StoreUnavailable
from llmmesh import logs
from llmmesh.cache_key import DEFAULT_TENANT
from llmmesh.errors import InvalidArgument, grpc_errors
from llmmesh.server import ServiceRunner
from llmmesh.v1 import cache_pb2, cache_pb2_grpc

log = structlog.get_logger(__name__)

T = TypeVar("T")
Context = grpc.aio.ServicerContext[Any, Any]

#: Longest cache key accepted.
MAX_KEY_CHARS = 256
#: Longest model or tenant name accepted in an entry or an invalidation.
MAX_NAME_CHARS = 256
#: A key as llmmesh/cache_key.py writes it: ``llmmesh:v<N>:`` then printable ASCII. The prefix also
#: keeps callers out of the store's own keys (the Redis indexes live under ``llmmesh:idx:``).
KEY_SHAPE = re.compile(r"llmmesh:v[0-9]+:[!-~]+")
#: Metadata a caller may send to have its request id on the cache service's log lines.
REQUEST_ID_METADATA_KEY = "x-llmmesh-request-id"
#: How often the background probe pings the store.
PROBE_INTERVAL_S = 2.0


def open_store(config: CacheConfig) -> CacheStore:
    """The store ``config`` asks for. Nothing connects yet."""
    if config.store == "memory":
        return MemoryStore(max_entries=config.memory_max_entries, max_bytes=config.memory_max_bytes)
    return RedisStore(
        config.redis_url,
        timeout=config.redis_timeout.total_seconds(),
        max_connections=config.redis_max_connections,
    )


class StoreHealth:
    """Whether the store answered last time; logs each change of state once."""

    def __init__(self, store: str) -> None:
        self.store = store
        #: None until the first operation, then whether the last one succeeded.
        self.up: bool | None = None
        self._down_since = 0.0

    def succeeded(self) -> None:
        if self.up is False:
            log.info(
                "cache store recovered",
                store=self.store,
                down_for_s=round(time.monotonic() - self._down_since, 3),
            )
        self.up = True
        metrics.STORE_UP.set(1)

    def failed(self, error: StoreUnavailable, *, at_start: bool = False) -> None:
        if self.up is not False:
            self._down_since = time.monotonic()
            log.warning(
                "cache store unavailable",
                store=self.store,
                error=error.message,
                at_start=at_start,
                serving="UNAVAILABLE to every RPC until the store answers again",
            )
        self.up = False
        metrics.STORE_UP.set(0)


class CacheServicer(cache_pb2_grpc.CacheServicer):
    """``llmmesh.v1.Cache`` over one store, with counters since start for Stats."""

    def __init__(
        self, store: CacheStore, config: CacheConfig, health: StoreHealth | None = None
    ) -> None:
        self._store = store
        self._config = config
        self._health = health or StoreHealth(store.name)
        self.hits = 0
        self.misses = 0
        self.errors = 0
        #: Requests joined to an identical one in flight: single-flight comes with issue 6.
        self.coalesced = 0

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: Context
    ) -> cache_pb2.LookupResponse:
        return await _serve(context, "Lookup", lambda: self._lookup(request))

    async def Store(
        self, request: cache_pb2.StoreRequest, context: Context
    ) -> cache_pb2.StoreResponse:
        return await _serve(context, "Store", lambda: self._store_entry(request))

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: Context
    ) -> cache_pb2.InvalidateResponse:
        return await _serve(context, "Invalidate", lambda: self._invalidate(request))

    async def Stats(
        self, request: cache_pb2.StatsRequest, context: Context
    ) -> cache_pb2.StatsResponse:
        return await _serve(context, "Stats", self._stats)

    async def _lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        key = _check_key("key", request.key)
        try:
            value = await self._call("get", self._store.get(key))
        except StoreUnavailable:
            metrics.LOOKUPS.labels(result="error").inc()
            raise
        entry = _decode(key, value)
        if entry is None:
            self.misses += 1
            metrics.LOOKUPS.labels(result="miss").inc()
            log.debug("cache miss", key=key)
            return cache_pb2.LookupResponse(hit=False)
        self.hits += 1
        metrics.LOOKUPS.labels(result="hit").inc()
        log.debug("cache hit", key=key)
        return cache_pb2.LookupResponse(hit=True, entry=entry)

    async def _store_entry(self, request: cache_pb2.StoreRequest) -> cache_pb2.StoreResponse:
        key = _check_key("key", request.key)
        if not request.HasField("entry"):
            raise InvalidArgument("entry", "is required")
        entry = cache_pb2.CacheEntry()
        entry.CopyFrom(request.entry)
        if not entry.model:
            raise InvalidArgument("entry.model", "must name the model that produced it")
        _check_name("entry.model", entry.model)
        entry.tenant = entry.tenant or DEFAULT_TENANT
        _check_name("entry.tenant", entry.tenant)
        value = entry.SerializeToString()
        if len(value) > self._config.max_value_bytes:
            metrics.STORES.labels(result="too_large").inc()
            log.info(
                "cache entry too large; not stored",
                key=key,
                bytes=len(value),
                max_value_bytes=self._config.max_value_bytes,
            )
            return cache_pb2.StoreResponse(stored=False, ttl_seconds=0)
        ttl_s = min(request.ttl_seconds or self._config.default_ttl_s, self._config.max_ttl_s)
        try:
            await self._call(
                "set",
                self._store.set(key, value, ttl_s=ttl_s, tenant=entry.tenant, model=entry.model),
            )
        except StoreUnavailable:
            metrics.STORES.labels(result="error").inc()
            raise
        metrics.STORES.labels(result="stored").inc()
        log.debug("cache entry stored", key=key, ttl_s=ttl_s, bytes=len(value))
        return cache_pb2.StoreResponse(stored=True, ttl_seconds=ttl_s)

    async def _invalidate(
        self, request: cache_pb2.InvalidateRequest
    ) -> cache_pb2.InvalidateResponse:
        selectors = {"key": request.key, "model": request.model, "tenant": request.tenant}
        chosen = [name for name, value in selectors.items() if value]
        if len(chosen) != 1:
            raise InvalidArgument(
                ", ".join(chosen) if chosen else ", ".join(selectors),
                "set exactly one of key, model or tenant "
                f"({len(chosen) or 'none'} {'are' if chosen else 'is'} set)",
            )
        if request.key:
            key = _check_key("key", request.key)
            removed = await self._call("delete", self._store.delete(key))
        elif request.model:
            model = _check_name("model", request.model)
            removed = await self._call("delete_model", self._store.delete_model(model))
        else:
            tenant = _check_name("tenant", request.tenant)
            removed = await self._call("delete_tenant", self._store.delete_tenant(tenant))
        log.info("cache invalidated", **{chosen[0]: selectors[chosen[0]]}, removed=removed)
        return cache_pb2.InvalidateResponse(removed=removed)

    async def _stats(self) -> cache_pb2.StatsResponse:
        size = await self._call("size", self._store.size())
        lookups = self.hits + self.misses
        return cache_pb2.StatsResponse(
            hits=self.hits,
            misses=self.misses,
            hit_ratio=self.hits / lookups if lookups else 0.0,
            entries=size.entries,
            bytes=size.bytes,
            errors=self.errors,
            coalesced=self.coalesced,
            store=self._store.name,
        )

    async def _call(self, op: str, call: Awaitable[T]) -> T:
        """Await one store operation: time it, count a failure, track the store's health."""
        started = time.perf_counter()
        try:
            result = await call
        except StoreUnavailable as exc:
            self.errors += 1
            metrics.STORE_ERRORS.labels(op=op).inc()
            self._health.failed(exc)
            raise
        finally:
            metrics.OPERATION_DURATION.labels(op=op).observe(time.perf_counter() - started)
        self._health.succeeded()
        return result


class CacheApp:
    """The cache service as a :class:`llmmesh.server.ServiceApp`."""

    service_names: Sequence[str] = (cache_pb2.DESCRIPTOR.services_by_name["Cache"].full_name,)

    def __init__(
        self,
        config: CacheConfig,
        *,
        store: CacheStore | None = None,
        probe_interval_s: float = PROBE_INTERVAL_S,
    ) -> None:
        self.config = config
        self.store = store if store is not None else open_store(config)
        self.health = StoreHealth(self.store.name)
        self.servicer = CacheServicer(self.store, config, self.health)
        self._probe_interval_s = probe_interval_s
        self._probe: asyncio.Task[None] | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        cache_pb2_grpc.add_CacheServicer_to_server(self.servicer, server)

    async def start(self, runner: ServiceRunner) -> None:
        """Check the store once and start probing it. A store that is down does not stop the
        service from starting: it answers UNAVAILABLE until the store is reachable."""
        where = {"redis_url": self.config.redis_url_masked} if self.store.name == "redis" else {}
        log.info("cache store", store=self.store.name, **where)
        try:
            await self.store.ping()
        except StoreUnavailable as exc:
            self.health.failed(exc, at_start=True)
        else:
            self.health.succeeded()
        self._probe = asyncio.create_task(self._probe_store(), name="cache-store-probe")

    async def drain(self) -> None:
        return None

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.store.close()

    async def _probe_store(self) -> None:
        """Ping the store now and then so that outages and recoveries are noticed (logged, and
        shown by llmmesh_cache_store_up) even when no requests come."""
        while True:
            await asyncio.sleep(self._probe_interval_s)
            try:
                await self.store.ping()
            except StoreUnavailable as exc:
                self.health.failed(exc)
            except Exception:
                log.exception("cache store probe failed unexpectedly")
            else:
                self.health.succeeded()


async def _serve(context: Context, rpc: str, handler: Callable[[], Awaitable[T]]) -> T:
    """Run one RPC's handler with its log context bound and its errors turned into a status."""
    with _bound(context, rpc):
        async with grpc_errors(context):
            return await handler()


def _check_key(field: str, key: str) -> str:
    if not key:
        raise InvalidArgument(field, "is empty")
    if len(key) > MAX_KEY_CHARS:
        raise InvalidArgument(field, f"is {len(key)} characters, more than {MAX_KEY_CHARS}")
    if KEY_SHAPE.fullmatch(key) is None:
        raise InvalidArgument(
            field, "is not a cache key (llmmesh:v1:<sha256 hex>, see llmmesh/cache_key.py)"
        )
    return key


def _check_name(field: str, name: str) -> str:
    if len(name) > MAX_NAME_CHARS:
        raise InvalidArgument(field, f"is {len(name)} characters, more than {MAX_NAME_CHARS}")
    return name


def _decode(key: str, value: bytes | None) -> cache_pb2.CacheEntry | None:
    if value is None:
        return None
    try:
        return cache_pb2.CacheEntry.FromString(value)
    except DecodeError:
        log.warning("unreadable cache entry; answering a miss", key=key, bytes=len(value))
        return None


@contextlib.contextmanager
def _bound(context: Context, rpc: str) -> Iterator[None]:
    """Bind the RPC name, and the caller's request id when it sent one, to every log line."""
    request_id = ""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_METADATA_KEY:
            request_id = str(value)[:128]
    extra = {"request_id": request_id} if request_id else {}
    with logs.bind_request(rpc=rpc, **extra):
        yield
