"""The router's side of the response cache: lookups under a short timeout, stores in the background.

The cache is an optimisation, never a dependency: a cache service that is down, slow or failing
turns a lookup into a miss (counted as ``result="error"``) and a store into a no-op, and the
outage is logged once when it starts and once when it ends, not on every request.

:class:`CacheClient` talks to ``llmmesh.v1.Cache``; :class:`NoCache` stands in when no cache is
configured. Both satisfy :class:`ResponseCache`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Protocol

import grpc
import grpc.aio
import structlog

from llmmesh.server import MiB, grpc_channel_options
from llmmesh.v1 import cache_pb2, cache_pb2_grpc
from router import _metrics as metrics

log = structlog.get_logger(__name__)


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

    def store(self, key: str, entry: cache_pb2.CacheEntry, *, ttl_seconds: int) -> None:
        """Store ``entry`` under ``key`` in the background; never blocks, never raises."""
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

    def store(self, key: str, entry: cache_pb2.CacheEntry, *, ttl_seconds: int) -> None:
        """Dropped."""

    async def close(self) -> None:
        """Nothing to release."""


class CacheClient:
    """A client of the cache service at ``address`` that never fails or delays a request."""

    def __init__(
        self,
        address: str,
        *,
        timeout: timedelta = timedelta(milliseconds=50),
        store_timeout: timedelta = timedelta(seconds=1),
        max_message_bytes: int = 4 * MiB,
        max_pending_stores: int = 1024,
    ) -> None:
        self.address = address
        self._timeout = timeout.total_seconds()
        self._store_timeout = store_timeout.total_seconds()
        self._max_pending = max_pending_stores
        self._channel = grpc.aio.insecure_channel(
            address, options=grpc_channel_options(max_message_bytes)
        )
        self._stub: cache_pb2_grpc.CacheAsyncStub = cache_pb2_grpc.CacheStub(self._channel)
        self._stores: set[asyncio.Task[None]] = set()
        self._down_since: float | None = None
        self._closed = False

    async def lookup(
        self, key: str, *, timeout: float | None = None
    ) -> cache_pb2.CacheEntry | None:
        """The entry under ``key``; None on a miss, or when the cache fails or is too slow."""
        limit = self._timeout if timeout is None else max(0.001, min(self._timeout, timeout))
        try:
            response = await self._stub.Lookup(cache_pb2.LookupRequest(key=key), timeout=limit)
        except grpc.aio.AioRpcError as exc:
            metrics.CACHE_REQUESTS.labels("error").inc()
            self._failed("lookup", exc)
            return None
        self._succeeded()
        if not response.hit:
            metrics.CACHE_REQUESTS.labels("miss").inc()
            return None
        metrics.CACHE_REQUESTS.labels("hit").inc()
        return response.entry

    def store(self, key: str, entry: cache_pb2.CacheEntry, *, ttl_seconds: int) -> None:
        """Store in the background (the task keeps the caller's log context)."""
        if self._closed:
            return
        if len(self._stores) >= self._max_pending:
            metrics.CACHE_STORES.labels("dropped").inc()
            return
        task = asyncio.create_task(self._store(key, entry, ttl_seconds), name="cache store")
        self._stores.add(task)
        task.add_done_callback(self._stores.discard)

    async def _store(self, key: str, entry: cache_pb2.CacheEntry, ttl_seconds: int) -> None:
        request = cache_pb2.StoreRequest(key=key, entry=entry, ttl_seconds=ttl_seconds)
        try:
            response = await self._stub.Store(request, timeout=self._store_timeout)
        except grpc.aio.AioRpcError as exc:
            metrics.CACHE_STORES.labels("error").inc()
            self._failed("store", exc)
            return
        except Exception:
            metrics.CACHE_STORES.labels("error").inc()
            log.exception("cache store failed", cache=self.address)
            return
        self._succeeded()
        metrics.CACHE_STORES.labels("stored" if response.stored else "refused").inc()

    async def close(self) -> None:
        """Wait up to the store timeout for pending stores, then close the channel."""
        if self._closed:
            return
        self._closed = True
        pending = set(self._stores)
        if pending:
            _, late = await asyncio.wait(pending, timeout=self._store_timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self._channel.close(None)

    def _failed(self, operation: str, exc: grpc.aio.AioRpcError) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "cache unavailable; serving without it",
                cache=self.address,
                operation=operation,
                error=f"{exc.code().name}: {exc.details()}",
            )

    def _succeeded(self) -> None:
        if self._down_since is not None:
            outage = time.monotonic() - self._down_since
            self._down_since = None
            log.info("cache available again", cache=self.address, outage_s=round(outage, 3))


def open_cache(
    address: str,
    *,
    timeout: timedelta = timedelta(milliseconds=50),
    max_message_bytes: int = 4 * MiB,
) -> ResponseCache:
    """A client of the cache at ``address``; :class:`NoCache` when ``address`` is empty."""
    if not address:
        return NoCache()
    return CacheClient(address, timeout=timeout, max_message_bytes=max_message_bytes)
