"""The router's side of the response cache: lookups under a short timeout, stores in the background.

The cache is an optimisation, never a dependency: a cache service that is down, slow or failing
turns a lookup into a miss (counted as ``result="error"``) and a store into a no-op. Every RPC to
it goes through one circuit breaker (llmmesh/breaker.py): ``--cache-breaker-failures`` failures in
a row (unreachable, timed out, or UNAVAILABLE because Redis is down behind it) open the circuit,
and while it is open lookups are misses and stores are dropped at once, without calling the cache
(``result="skipped"``); after a cool-down one trial call tests it again. The outage is logged once
when the circuit opens and once when it closes, not on every request.

:class:`CacheClient` talks to ``llmmesh.v1.Cache``; :class:`NoCache` stands in when no cache is
configured. Both satisfy :class:`ResponseCache`.

Single-flight across routers: :meth:`ResponseCache.lookup_or_claim` is a lookup that, on a miss,
takes the key's fill lock in the cache service or waits there for the router holding it. The lock
comes back as a :class:`FillLease`, renewed in the background (ExtendFill every third of its
expiry) until the answer is stored with it (which releases it in the cache service) or it is
released in the background (the request failed or was cancelled). The lease never delays or fails
the request: a failed renewal or release only lets the lock expire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, TypeVar

import grpc
import grpc.aio
import structlog

from llmmesh import tracing
from llmmesh.breaker import BreakerSettings, CircuitBreaker, CircuitOpen
from llmmesh.server import MiB, grpc_channel_options
from llmmesh.v1 import cache_pb2, cache_pb2_grpc
from router import _metrics as metrics

log = structlog.get_logger(__name__)

R = TypeVar("R")

#: Reconnect to a cache service that went away at least every second (gRPC's default backoff grows
#: to two minutes), so that the circuit's trial after an outage finds it as soon as it is back.
RECONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
#: Span name prefix of calls to the cache service (llmmesh/tracing.py).
_CACHE_SPAN = "llmmesh.v1.Cache/"
#: Answers that say the cache service is unwell (a failure for its circuit breaker). Any other
#: answer, INVALID_ARGUMENT say, shows it alive.
UNWELL_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DATA_LOSS,
    }
)


@dataclass(frozen=True, slots=True)
class Fill:
    """What a claiming lookup found: the entry, or the fill lock, or neither (then dispatch)."""

    #: The entry, on a hit.
    entry: cache_pb2.CacheEntry | None = None
    #: True when the entry came after waiting for another router's fill.
    coalesced: bool = False
    #: The fill lock, when this router now owns it: end it with store() or release().
    lease: FillLease | None = None


class ResponseCache(Protocol):
    """Where the router looks answers up and stores them."""

    async def lookup(
        self, key: str, *, timeout: float | None = None
    ) -> cache_pb2.CacheEntry | None:
        """The entry stored under ``key``, or None on a miss or any failure.

        ``timeout`` (seconds) shortens the configured lookup timeout, e.g. to the caller's
        remaining deadline.
        """
        ...

    async def lookup_or_claim(
        self, key: str, *, wait: float, lock_ttl: float, timeout: float | None = None
    ) -> Fill:
        """The entry under ``key``; on a miss, the key's fill lock when no other router holds
        it, else the other router's entry when it comes within ``wait`` seconds. Any failure is
        an empty :class:`Fill`. ``timeout`` (seconds, e.g. the caller's remaining deadline) bounds
        the whole call, waiting included."""
        ...

    def store(
        self, key: str, entry: cache_pb2.CacheEntry, *, ttl_seconds: int, fill_token: str = ""
    ) -> None:
        """Store ``entry`` under ``key`` in the background (releasing the fill lock of
        ``fill_token``); never blocks, never raises."""
        ...

    async def close(self) -> None:
        """Give pending stores a moment to finish, then release the connection."""
        ...


class NoCache:
    """No cache configured: every lookup misses, stores are dropped, nothing is counted."""

    async def lookup(
        self, key: str, *, timeout: float | None = None
    ) -> cache_pb2.CacheEntry | None:
        """Always a miss."""
        return None

    async def lookup_or_claim(
        self, key: str, *, wait: float, lock_ttl: float, timeout: float | None = None
    ) -> Fill:
        """Always a miss, without a lock."""
        return Fill()

    def store(
        self, key: str, entry: cache_pb2.CacheEntry, *, ttl_seconds: int, fill_token: str = ""
    ) -> None:
        """Dropped."""

    async def close(self) -> None:
        """Nothing to release."""


class CacheClient:
    """A client of the cache service at ``address`` that never fails or delays a request."""

    def __init__(
        self,
        address: str,
        *,
        timeout: timedelta = timedelta(milliseconds=100),
        store_timeout: timedelta = timedelta(seconds=1),
        max_message_bytes: int = 4 * MiB,
        max_pending_stores: int = 1024,
        breaker: BreakerSettings | None = None,
    ) -> None:
        self.address = address
        self._timeout = timeout.total_seconds()
        self._store_timeout = store_timeout.total_seconds()
        self._max_pending = max_pending_stores
        self._channel = grpc.aio.insecure_channel(
            address, options=[*grpc_channel_options(max_message_bytes), *RECONNECT_OPTIONS]
        )
        self._stub: cache_pb2_grpc.CacheAsyncStub = cache_pb2_grpc.CacheStub(self._channel)
        self._stores: set[asyncio.Task[None]] = set()
        self._leases: set[FillLease] = set()
        self._closed = False
        self.breaker = CircuitBreaker(
            "cache",
            settings=breaker,
            metrics=metrics.CIRCUIT,
            opened_event="cache unavailable; serving without it",
            closed_event="cache available again",
            log_fields={"cache": address},
        )

    async def lookup(
        self, key: str, *, timeout: float | None = None
    ) -> cache_pb2.CacheEntry | None:
        """The entry under ``key``; None on a miss, or when the cache fails or is too slow."""
        limit = self._timeout if timeout is None else max(0.001, min(self._timeout, timeout))
        try:
            response = await self._guarded(
                "Lookup",
                lambda md: self._stub.Lookup(
                    cache_pb2.LookupRequest(key=key), timeout=limit, metadata=md
                ),
                cut_short=limit < self._timeout,
            )
        except CircuitOpen:
            metrics.CACHE_REQUESTS.labels("skipped").inc()
            return None
        except grpc.aio.AioRpcError:
            metrics.CACHE_REQUESTS.labels("error").inc()
            return None
        if not response.hit:
            metrics.CACHE_REQUESTS.labels("miss").inc()
            return None
        metrics.CACHE_REQUESTS.labels("hit").inc()
        return response.entry

    async def lookup_or_claim(
        self, key: str, *, wait: float, lock_ttl: float, timeout: float | None = None
    ) -> Fill:
        """A Lookup with claim under the lookup timeout; when another router holds the fill
        lock, a second one that waits for it (up to ``wait`` plus the lookup timeout). A cache
        service that hangs thus delays a request by the lookup timeout at most, as a plain lookup.
        """
        lock_ttl_ms = round(lock_ttl * 1000)
        limit = self._timeout if timeout is None else max(0.001, min(self._timeout, timeout))
        response = await self._claiming_lookup(
            key, lock_ttl_ms, 0, limit, cut_short=limit < self._timeout
        )
        if response is not None and response.fill_held:
            if timeout is not None:
                wait = min(wait, timeout - self._timeout)
            if wait >= 0.001:
                limit = wait + self._timeout
                if timeout is not None:
                    limit = max(0.001, min(limit, timeout))
                response = await self._claiming_lookup(
                    key,
                    lock_ttl_ms,
                    round(wait * 1000),
                    limit,
                    cut_short=limit < wait + self._timeout,
                )
        if response is None:
            return Fill()
        if response.hit:
            metrics.CACHE_REQUESTS.labels("hit").inc()
            return Fill(entry=response.entry, coalesced=response.coalesced)
        metrics.CACHE_REQUESTS.labels("miss").inc()
        if not response.fill_token:
            if response.fill_held:
                metrics.CACHE_FILL_LOCKS.labels("held_elsewhere").inc()
            return Fill()
        metrics.CACHE_FILL_LOCKS.labels("claimed").inc()
        ttl = response.lock_ttl_ms / 1000.0 if response.lock_ttl_ms else lock_ttl
        return Fill(lease=FillLease(self, key, response.fill_token, ttl))

    async def _claiming_lookup(
        self, key: str, lock_ttl_ms: int, wait_ms: int, limit: float, *, cut_short: bool
    ) -> cache_pb2.LookupResponse | None:
        """One Lookup with claim; None when the cache failed or its circuit is open."""
        request = cache_pb2.LookupRequest(
            key=key, claim=True, wait_ms=wait_ms, lock_ttl_ms=lock_ttl_ms
        )
        try:
            return await self._guarded(
                "Lookup",
                lambda md: self._stub.Lookup(request, timeout=limit, metadata=md),
                cut_short=cut_short,
                may_trial=not wait_ms,
            )
        except CircuitOpen:
            metrics.CACHE_REQUESTS.labels("skipped").inc()
            return None
        except grpc.aio.AioRpcError:
            metrics.CACHE_REQUESTS.labels("error").inc()
            return None

    def store(
        self, key: str, entry: cache_pb2.CacheEntry, *, ttl_seconds: int, fill_token: str = ""
    ) -> None:
        """Store in the background (the task keeps the caller's log context). A store dropped
        with a fill token leaves the lock to expire."""
        if self._closed:
            return
        if len(self._stores) >= self._max_pending:
            metrics.CACHE_STORES.labels("dropped").inc()
            return
        self._background(self._store(key, entry, ttl_seconds, fill_token), "cache store")

    def _background(self, work: Coroutine[None, None, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def _store(
        self, key: str, entry: cache_pb2.CacheEntry, ttl_seconds: int, fill_token: str
    ) -> None:
        request = cache_pb2.StoreRequest(
            key=key, entry=entry, ttl_seconds=ttl_seconds, fill_token=fill_token
        )
        try:
            response = await self._guarded(
                "Store",
                lambda md: self._stub.Store(request, timeout=self._store_timeout, metadata=md),
            )
        except CircuitOpen:
            metrics.CACHE_STORES.labels("skipped").inc()
            return
        except grpc.aio.AioRpcError:
            metrics.CACHE_STORES.labels("error").inc()
            return
        except Exception:
            metrics.CACHE_STORES.labels("error").inc()
            log.exception("cache store failed", cache=self.address)
            return
        metrics.CACHE_STORES.labels("stored" if response.stored else "refused").inc()

    async def _extend_fill(self, key: str, token: str, lock_ttl: float) -> bool | None:
        """Renew a fill lock: whether this router still owns it, None when the cache failed."""
        request = cache_pb2.ExtendFillRequest(
            key=key, fill_token=token, lock_ttl_ms=round(lock_ttl * 1000)
        )
        timeout = min(self._store_timeout, lock_ttl / 3)
        try:
            response = await self._guarded(
                "ExtendFill",
                lambda md: self._stub.ExtendFill(request, timeout=timeout, metadata=md),
            )
        except (CircuitOpen, grpc.aio.AioRpcError):
            return None
        return response.owned

    def _release_fill(self, key: str, token: str) -> None:
        """Release a fill lock in the background (dropped, to expire, when too many are
        pending)."""
        metrics.CACHE_FILL_LOCKS.labels("released").inc()
        if self._closed or len(self._stores) >= self._max_pending:
            return
        self._background(self._release(key, token), "cache fill release")

    async def _release(self, key: str, token: str) -> None:
        request = cache_pb2.ReleaseFillRequest(key=key, fill_token=token)
        try:
            await self._guarded(
                "ReleaseFill",
                lambda md: self._stub.ReleaseFill(
                    request, timeout=self._store_timeout, metadata=md
                ),
            )
        except (CircuitOpen, grpc.aio.AioRpcError):
            return
        except Exception:
            log.exception("cache fill release failed", cache=self.address)

    async def close(self) -> None:
        """Wait up to the store timeout for pending stores, then close the channel."""
        if self._closed:
            return
        for lease in list(self._leases):
            lease.release()
        self._closed = True
        pending = set(self._stores)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self._store_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._channel.close(None)

    async def _guarded(
        self,
        rpc: str,
        call: Callable[[tracing.Metadata], Awaitable[R]],
        *,
        cut_short: bool = False,
        may_trial: bool = True,
    ) -> R:
        """Make one RPC to the cache through its circuit breaker.

        Raises :class:`CircuitOpen` without calling while the circuit is open, and the call's
        AioRpcError when it fails. ``cut_short``: the call's timeout is shorter than the configured
        one (the caller's deadline is near), so running out of it says nothing about the cache;
        nor does a call cancelled on this side. ``may_trial=False`` for a call that may wait long
        for reasons of its own (a lookup waiting for another router's fill): it is refused while
        the circuit is half-open rather than hold up its one trial. A call that is made is a
        client span, with the trace context in ``call``'s metadata (llmmesh/tracing.py).
        """
        ticket = self.breaker.acquire(may_trial=may_trial)
        try:
            with tracing.client_span(_CACHE_SPAN + rpc) as span:
                result = await call(span.outgoing())
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.CANCELLED or (
                code == grpc.StatusCode.DEADLINE_EXCEEDED and cut_short
            ):
                self.breaker.abandoned(ticket)
            elif code not in UNWELL_CODES:
                self.breaker.succeeded(ticket)
            else:
                self.breaker.failed(ticket, f"{rpc}: {code.name}: {exc.details()}")
            raise
        except BaseException:
            self.breaker.abandoned(ticket)
            raise
        self.breaker.succeeded(ticket)
        return result


class FillLease:
    """The fill lock of one key, owned by this router until :meth:`store` or :meth:`release`;
    renewed in the background meanwhile."""

    def __init__(self, client: CacheClient, key: str, token: str, lock_ttl: float) -> None:
        self.key = key
        self.token = token
        self._client = client
        self._lock_ttl = lock_ttl
        self._ended = False
        client._leases.add(self)
        self._renewal = asyncio.create_task(self._renew(), name="cache fill renewal")

    @property
    def ended(self) -> bool:
        """True once stored or released."""
        return self._ended

    def store(self, entry: cache_pb2.CacheEntry, *, ttl_seconds: int) -> None:
        """Store the answer with the lock's token, which releases the lock with it."""
        if self._end():
            self._client.store(self.key, entry, ttl_seconds=ttl_seconds, fill_token=self.token)

    def release(self) -> None:
        """Give the lock up (in the background): a waiting router takes over at once. A no-op
        after :meth:`store`."""
        if self._end():
            self._client._release_fill(self.key, self.token)

    def _end(self) -> bool:
        if self._ended:
            return False
        self._ended = True
        self._renewal.cancel()
        self._client._leases.discard(self)
        return True

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self._lock_ttl / 3)
            try:
                owned = await self._client._extend_fill(self.key, self.token, self._lock_ttl)
            except Exception:
                log.exception("cache fill renewal failed", key=self.key)
                return
            if owned is False:
                metrics.CACHE_FILL_LOCKS.labels("lost").inc()
                log.info(
                    "cache fill lock lost; another router may dispatch the same request",
                    key=self.key,
                    lock_ttl_s=self._lock_ttl,
                )
                return


def open_cache(
    address: str,
    *,
    timeout: timedelta = timedelta(milliseconds=100),
    max_message_bytes: int = 4 * MiB,
    breaker: BreakerSettings | None = None,
) -> ResponseCache:
    """A client of the cache at ``address``; :class:`NoCache` when ``address`` is empty."""
    if not address:
        return NoCache()
    return CacheClient(
        address, timeout=timeout, max_message_bytes=max_message_bytes, breaker=breaker
    )
