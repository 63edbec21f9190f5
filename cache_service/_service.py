"""The ``llmmesh.v1.Cache`` servicer and the :class:`CacheApp` that runs it.

The servicer validates requests, applies the TTL and size policy, counts what happens, and leaves
keeping entries to a :class:`~cache_service.stores.CacheStore`. A store that fails makes the RPC
answer UNAVAILABLE at once (every store operation is bounded by the store's timeout), and the
router goes on without the cache. Every store operation goes through the store's circuit breaker
(:class:`StoreHealth`, llmmesh/breaker.py): after ``--store-breaker-failures`` failures in a row
the circuit opens and every RPC that needs the store answers UNAVAILABLE at once, saying so,
without touching the store, until one trial operation succeeds. The background probe pings the
store every few seconds, and as soon as an open circuit's cool-down ends, so that it is the trial
that notices recovery when no requests come. One outage is one warning line when the circuit
opens and one info line when it closes, and the ``llmmesh_cache_store_up`` gauge follows the last
operation.

Single-flight across routers: a Lookup with ``claim`` asks the store for the entry or the key's fill
lock in one step (:meth:`~cache_service.stores.CacheStore.get_or_claim`). When another caller holds
the lock, the lookup waits (``await_fill``: the entry appears or the lock goes) and asks again, for
at most ``wait_ms`` (capped by ``--fill-max-wait`` and the call's deadline), then answers a miss
without the lock. An entry found after waiting is ``coalesced`` (Stats and
``llmmesh_cache_coalesced_total``); a lock taken after waiting means its owner released it or died
(``taken_over``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio
import structlog
from google.protobuf.message import DecodeError

from cache_service import _metrics as metrics
from cache_service._config import CacheConfig
from cache_service.stores import CacheStore, MemoryStore, RedisStore, StoreUnavailable
from llmmesh import logs, tracing
from llmmesh.breaker import BreakerSettings, CircuitBreaker, CircuitOpen, Ticket
from llmmesh.cache_key import DEFAULT_TENANT
from llmmesh.errors import InvalidArgument, Unavailable, grpc_errors
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
#: Span name prefix of the RPCs (llmmesh/tracing.py).
_CACHE_SPAN = "llmmesh.v1.Cache/"
#: How often the background probe pings the store.
PROBE_INTERVAL_S = 2.0
#: Longest fill token accepted (the stores issue 32 hex digits).
MAX_TOKEN_CHARS = 64
#: A waiting lookup leaves this much of the call's deadline to answer in.
REPLY_SLACK_S = 0.02


def open_store(config: CacheConfig) -> CacheStore:
    """The store ``config`` asks for. Nothing connects yet."""
    poll_interval_s = config.fill_poll_interval.total_seconds()
    if config.store == "memory":
        return MemoryStore(
            max_entries=config.memory_max_entries,
            max_bytes=config.memory_max_bytes,
            poll_interval_s=poll_interval_s,
        )
    return RedisStore(
        config.redis_url,
        timeout=config.redis_timeout.total_seconds(),
        max_connections=config.redis_max_connections,
        poll_interval_s=poll_interval_s,
    )


#: Store operations that wait for another caller rather than test the store: never the trial
#: call of a half-open circuit (llmmesh/breaker.py).
WAITING_OPS = frozenset({"await_fill"})


class StoreCircuitOpen(StoreUnavailable):
    """A store operation refused without trying, because the store's circuit is open."""

    def __init__(self, store: str, op: str, refusal: CircuitOpen) -> None:
        Unavailable.__init__(self, f"cache store {store} unavailable ({refusal.detail})")
        self.store = store
        self.op = op
        self.cause = refusal.detail


class StoreHealth:
    """The store's circuit breaker, and the ``llmmesh_cache_store_up`` gauge.

    One outage of the store is one warning line (``cache store unavailable``, with the cause,
    when the circuit opens) and one info line (``cache store recovered``, when a trial closes it).
    """

    def __init__(
        self,
        store: str,
        settings: BreakerSettings | None = None,
        *,
        log_fields: Mapping[str, object] | None = None,
    ) -> None:
        self.store = store
        #: None until the first operation, then whether the last one succeeded.
        self.up: bool | None = None
        self.breaker = CircuitBreaker(
            store,
            settings=settings,
            metrics=metrics.CIRCUIT,
            opened_event="cache store unavailable",
            closed_event="cache store recovered",
            # The store's address goes on the log lines; causes and errors to callers omit it.
            log_fields=log_fields,
        )

    def admit(self, op: str) -> Ticket:
        """Permission to run ``op`` on the store, or :class:`StoreCircuitOpen` at once."""
        try:
            return self.breaker.acquire(may_trial=op not in WAITING_OPS)
        except CircuitOpen as refusal:
            raise StoreCircuitOpen(self.store, op, refusal) from None

    def succeeded(self, ticket: Ticket) -> None:
        self.breaker.succeeded(ticket)
        self.up = True
        metrics.STORE_UP.set(1)

    def failed(self, ticket: Ticket, error: StoreUnavailable) -> None:
        self.breaker.failed(ticket, error.message)
        self.up = False
        metrics.STORE_UP.set(0)

    def abandoned(self, ticket: Ticket) -> None:
        """The operation ended without a verdict on the store (cancelled, or a bug)."""
        self.breaker.abandoned(ticket)

    def failed_at_start(self, error: StoreUnavailable) -> None:
        """The store did not answer the first ping: open the circuit at once."""
        self.breaker.trip(error.message, at_start=True)
        self.up = False
        metrics.STORE_UP.set(0)

    def succeeded_at_start(self) -> None:
        self.up = True
        metrics.STORE_UP.set(1)


class CacheServicer(cache_pb2_grpc.CacheServicer):
    """``llmmesh.v1.Cache`` over one store, with counters since start for Stats."""

    def __init__(
        self, store: CacheStore, config: CacheConfig, health: StoreHealth | None = None
    ) -> None:
        self._store = store
        self._config = config
        self._health = health or StoreHealth(store.name, config.store_breaker)
        self.hits = 0
        self.misses = 0
        self.errors = 0
        #: Lookups answered with an entry after waiting for another caller's fill.
        self.coalesced = 0

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: Context
    ) -> cache_pb2.LookupResponse:
        return await _serve(context, "Lookup", lambda: self._lookup(request, context))

    async def Store(
        self, request: cache_pb2.StoreRequest, context: Context
    ) -> cache_pb2.StoreResponse:
        return await _serve(context, "Store", lambda: self._store_entry(request))

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: Context
    ) -> cache_pb2.InvalidateResponse:
        return await _serve(context, "Invalidate", lambda: self._invalidate(request))

    async def ReleaseFill(
        self, request: cache_pb2.ReleaseFillRequest, context: Context
    ) -> cache_pb2.ReleaseFillResponse:
        return await _serve(context, "ReleaseFill", lambda: self._release_fill(request))

    async def ExtendFill(
        self, request: cache_pb2.ExtendFillRequest, context: Context
    ) -> cache_pb2.ExtendFillResponse:
        return await _serve(context, "ExtendFill", lambda: self._extend_fill(request))

    async def Stats(
        self, request: cache_pb2.StatsRequest, context: Context
    ) -> cache_pb2.StatsResponse:
        return await _serve(context, "Stats", self._stats)

    async def _lookup(
        self, request: cache_pb2.LookupRequest, context: Context
    ) -> cache_pb2.LookupResponse:
        key = _check_key("key", request.key)
        if request.claim:
            return await self._lookup_or_claim(key, request, context)
        if request.wait_ms:
            raise InvalidArgument("wait_ms", "needs claim (a lookup waits only in order to claim)")
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

    async def _lookup_or_claim(
        self, key: str, request: cache_pb2.LookupRequest, context: Context
    ) -> cache_pb2.LookupResponse:
        """The entry, else the fill lock, else wait for its owner and ask again (module doc)."""
        lock_ttl_ms = self._config.fill_lock_ttl_ms(request.lock_ttl_ms)
        wait_s = min(request.wait_ms / 1000.0, self._config.fill_max_wait.total_seconds())
        remaining: float | None = context.time_remaining()
        if remaining is not None:
            wait_s = min(wait_s, remaining - REPLY_SLACK_S)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        waited = False
        try:
            while True:
                claim = await self._call(
                    "get_or_claim", self._store.get_or_claim(key, lock_ttl_ms=lock_ttl_ms)
                )
                if claim.value is not None:
                    entry = _decode(key, claim.value)
                    if entry is None:
                        break
                    self.hits += 1
                    metrics.LOOKUPS.labels(result="hit").inc()
                    if waited:
                        self.coalesced += 1
                        metrics.COALESCED.inc()
                    log.debug("cache hit", key=key, coalesced=waited)
                    return cache_pb2.LookupResponse(hit=True, entry=entry, coalesced=waited)
                if claim.token is not None:
                    self.misses += 1
                    metrics.LOOKUPS.labels(result="miss").inc()
                    metrics.FILL_LOCKS.labels(event="taken_over" if waited else "claimed").inc()
                    if waited:
                        log.info("fill lock taken over (its owner released it or died)", key=key)
                    else:
                        log.debug("cache miss; fill lock claimed", key=key, ttl_ms=lock_ttl_ms)
                    return cache_pb2.LookupResponse(
                        hit=False, fill_token=claim.token, lock_ttl_ms=lock_ttl_ms
                    )
                left = deadline - loop.time()
                if left <= 0:
                    if waited:
                        metrics.FILL_LOCKS.labels(event="wait_timed_out").inc()
                    self.misses += 1
                    metrics.LOOKUPS.labels(result="miss").inc()
                    log.debug("cache miss; another caller holds the fill lock", key=key)
                    return cache_pb2.LookupResponse(hit=False, fill_held=True)
                waited = True
                metrics.FILL_WAITERS.inc()
                try:
                    await self._call("await_fill", self._store.await_fill(key, timeout_s=left))
                finally:
                    metrics.FILL_WAITERS.dec()
        except StoreUnavailable:
            metrics.LOOKUPS.labels(result="error").inc()
            raise
        # An unreadable entry: a miss, without the lock (the caller's store replaces it).
        self.misses += 1
        metrics.LOOKUPS.labels(result="miss").inc()
        return cache_pb2.LookupResponse(hit=False)

    async def _release_fill(
        self, request: cache_pb2.ReleaseFillRequest
    ) -> cache_pb2.ReleaseFillResponse:
        key = _check_key("key", request.key)
        token = _check_token("fill_token", request.fill_token)
        released = await self._call("release_fill", self._store.release_fill(key, token))
        metrics.FILL_LOCKS.labels(event="released" if released else "not_owner").inc()
        log.debug("fill lock released" if released else "fill token not the owner", key=key)
        return cache_pb2.ReleaseFillResponse(released=released)

    async def _extend_fill(
        self, request: cache_pb2.ExtendFillRequest
    ) -> cache_pb2.ExtendFillResponse:
        key = _check_key("key", request.key)
        token = _check_token("fill_token", request.fill_token)
        lock_ttl_ms = self._config.fill_lock_ttl_ms(request.lock_ttl_ms)
        owned = await self._call(
            "extend_fill", self._store.extend_fill(key, token, lock_ttl_ms=lock_ttl_ms)
        )
        metrics.FILL_LOCKS.labels(event="extended" if owned else "not_owner").inc()
        return cache_pb2.ExtendFillResponse(owned=owned, lock_ttl_ms=lock_ttl_ms if owned else 0)

    async def _store_entry(self, request: cache_pb2.StoreRequest) -> cache_pb2.StoreResponse:
        key = _check_key("key", request.key)
        if not request.HasField("entry"):
            raise InvalidArgument("entry", "is required")
        fill_token = _check_token("fill_token", request.fill_token) if request.fill_token else None
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
            if fill_token is not None:
                # Waiters must not wait for an entry that will never come.
                await self._release_fill(
                    cache_pb2.ReleaseFillRequest(key=key, fill_token=fill_token)
                )
            return cache_pb2.StoreResponse(stored=False, ttl_seconds=0)
        ttl_s = min(request.ttl_seconds or self._config.default_ttl_s, self._config.max_ttl_s)
        try:
            released = await self._call(
                "set",
                self._store.set(
                    key,
                    value,
                    ttl_s=ttl_s,
                    tenant=entry.tenant,
                    model=entry.model,
                    fill_token=fill_token,
                ),
            )
        except StoreUnavailable:
            metrics.STORES.labels(result="error").inc()
            raise
        metrics.STORES.labels(result="stored").inc()
        if fill_token is not None:
            metrics.FILL_LOCKS.labels(event="stored" if released else "not_owner").inc()
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
        """Await one store operation through the store's circuit breaker: refused at once while
        the circuit is open; otherwise timed, and its failure counted."""
        try:
            ticket = self._health.admit(op)
        except StoreCircuitOpen:
            if isinstance(call, Coroutine):
                call.close()
            self.errors += 1
            raise
        started = time.perf_counter()
        try:
            result = await call
        except StoreUnavailable as exc:
            self.errors += 1
            metrics.STORE_ERRORS.labels(op=op).inc()
            self._health.failed(ticket, exc)
            raise
        except BaseException:
            self._health.abandoned(ticket)
            raise
        finally:
            metrics.OPERATION_DURATION.labels(op=op).observe(time.perf_counter() - started)
        self._health.succeeded(ticket)
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
        where = {"redis_url": config.redis_url_masked} if self.store.name == "redis" else {}
        self.health = StoreHealth(self.store.name, config.store_breaker, log_fields=where)
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
            self.health.failed_at_start(exc)
        else:
            self.health.succeeded_at_start()
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
        shown by llmmesh_cache_store_up) even when no requests come. While the circuit is open
        the probe wakes when its cool-down ends, to be the trial that closes it."""
        while True:
            retry_in = self.health.breaker.retry_in()
            await asyncio.sleep(min(retry_in, self._probe_interval_s) or self._probe_interval_s)
            try:
                ticket = self.health.admit("ping")
            except StoreCircuitOpen:
                continue
            try:
                await self.store.ping()
            except StoreUnavailable as exc:
                self.health.failed(ticket, exc)
            except Exception:
                self.health.abandoned(ticket)
                log.exception("cache store probe failed unexpectedly")
            except BaseException:
                self.health.abandoned(ticket)
                raise
            else:
                self.health.succeeded(ticket)


async def _serve(context: Context, rpc: str, handler: Callable[[], Awaitable[T]]) -> T:
    """Run one RPC's handler with its log context bound, its errors turned into a status, and
    it counted, timed and traced (a server span continuing the caller's trace)."""
    with _bound(context, rpc):
        async with grpc_errors(context):
            with metrics.rpc(rpc, context), tracing.server_span(_CACHE_SPAN + rpc, context):
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


def _check_token(field: str, token: str) -> str:
    if not token:
        raise InvalidArgument(field, "is empty")
    if len(token) > MAX_TOKEN_CHARS or not token.isascii() or not token.isprintable():
        raise InvalidArgument(
            field, f"is not a fill token (LookupResponse.fill_token, at most {MAX_TOKEN_CHARS})"
        )
    return token


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
