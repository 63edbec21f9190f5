"""Small in-process fakes of the services the router calls, for tests on real loopback sockets.

- :class:`FakeWorker`: a ``llmmesh.v1.Worker`` that echoes the prompt, records what it was asked
  (requests, the deadline it saw, cancellations) and can be held, slowed down or made to fail;
- :class:`FakeCache`: a ``llmmesh.v1.Cache`` over a dict, optionally slow;
- :class:`FakeServer`: a ``grpc.aio`` server on 127.0.0.1 for them, which can be stopped and
  started again on the same port (a worker that goes away and comes back).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from llmmesh.v1 import cache_pb2, cache_pb2_grpc, generate_pb2, worker_pb2, worker_pb2_grpc

DEFAULT_MODEL = "sim-llama-3.1-8b"
_Context = grpc.aio.ServicerContext[Any, Any]


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """A worker whose answer is ``"<worker_id> heard: <prompt>"``, one word per stream chunk."""

    def __init__(
        self,
        worker_id: str = "w1",
        *,
        model: str = DEFAULT_MODEL,
        capacity: int = 4,
        delay: float = 0.0,
        chunk_delay: float = 0.0,
    ) -> None:
        self.worker_id = worker_id
        self.model = model
        self.capacity = capacity
        #: Seconds to wait before the first chunk (or the unary answer).
        self.delay = delay
        #: Seconds to wait between stream chunks.
        self.chunk_delay = chunk_delay
        #: When set, requests wait until it is set (an open gate); None: no gate.
        self.gate: asyncio.Event | None = None
        #: When set, Generate and GenerateStream fail with this status.
        self.fail_with: grpc.StatusCode | None = None
        #: When true, GenerateStream ends without its summary chunk (a broken worker).
        self.omit_summary = False
        #: When set, GenerateStream fails with UNAVAILABLE after this many chunks.
        self.fail_after_chunks: int | None = None
        self.requests: list[generate_pb2.GenerateRequest] = []
        #: context.time_remaining() as each request saw it on arrival.
        self.time_remaining: list[float | None] = []
        self._active = 0
        #: Reported as queued_requests and kv_cache_used_fraction.
        self.queued = 0
        self.kv_cache_used_fraction = 0.0
        #: False: WatchLoad sends one serving=false report (draining) and ends its streams.
        self.serving = True
        #: False: WatchLoad streams stay open but send nothing (a worker whose reports stop).
        self.reporting = True
        #: Report interval when the caller asks for none.
        self.report_interval = 0.2
        self._load_changed = asyncio.Event()
        self.watch_calls = 0
        self.cancellations = 0
        self.cancelled = asyncio.Event()
        self.info_calls = 0

    @property
    def active(self) -> int:
        """Requests in progress (reported as active_requests)."""
        return self._active

    @active.setter
    def active(self, value: int) -> None:
        self._active = value
        self.load_changed()

    def load_changed(self) -> None:
        """Wake the WatchLoad streams: a report goes out now (after a change of serving,
        reporting, queued...)."""
        self._load_changed.set()
        self._load_changed = asyncio.Event()

    def answer(self, prompt: str) -> str:
        return f"{self.worker_id} heard: {prompt}"

    async def _begin(self, request: generate_pb2.GenerateRequest, context: _Context) -> None:
        self.requests.append(request)
        self.time_remaining.append(context.time_remaining())
        if self.fail_with is not None:
            await context.abort(self.fail_with, f"fake worker fails with {self.fail_with.name}")
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)

    def _summary(self, request: generate_pb2.GenerateRequest) -> generate_pb2.GenerationSummary:
        words = self.answer(request.prompt).split()
        return generate_pb2.GenerationSummary(
            finish_reason=generate_pb2.FINISH_REASON_STOP,
            usage=generate_pb2.Usage(
                prompt_tokens=len(request.prompt.split()), completion_tokens=len(words)
            ),
            worker_id=self.worker_id,
            model_version="fake-1",
            timings=generate_pb2.Timings(queue_ms=1.5, time_to_first_token_ms=2.0, total_ms=3.0),
        )

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: _Context
    ) -> generate_pb2.GenerateResponse:
        self.active += 1
        try:
            await self._begin(request, context)
            return generate_pb2.GenerateResponse(
                request_id=request.request_id,
                model=request.model,
                text=self.answer(request.prompt),
                summary=self._summary(request),
            )
        except asyncio.CancelledError:
            self._saw_cancel()
            raise
        finally:
            self.active -= 1

    async def GenerateStream(
        self, request: generate_pb2.GenerateRequest, context: _Context
    ) -> AsyncIterator[generate_pb2.GenerateStreamResponse]:
        self.active += 1
        try:
            await self._begin(request, context)
            words = self.answer(request.prompt).split()
            for i, word in enumerate(words):
                if i == self.fail_after_chunks:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "fake worker died mid-stream")
                if i and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                text = word if i == 0 else " " + word
                yield generate_pb2.GenerateStreamResponse(request_id=request.request_id, text=text)
            if self.omit_summary:
                return
            yield generate_pb2.GenerateStreamResponse(
                request_id=request.request_id, summary=self._summary(request)
            )
        except (asyncio.CancelledError, GeneratorExit):
            self._saw_cancel()
            raise
        finally:
            self.active -= 1

    def _saw_cancel(self) -> None:
        self.cancellations += 1
        self.cancelled.set()

    async def WatchLoad(
        self, request: worker_pb2.WatchLoadRequest, context: _Context
    ) -> AsyncIterator[worker_pb2.WatchLoadResponse]:
        """A report at once, every interval, and on every change, like the real worker."""
        self.watch_calls += 1
        interval = request.interval_ms / 1000 if request.interval_ms else self.report_interval
        sequence = 0
        while True:
            changed = self._load_changed
            if self.reporting:
                sequence += 1
                yield worker_pb2.WatchLoadResponse(
                    worker_id=self.worker_id,
                    sequence=sequence,
                    active_requests=self.active,
                    queued_requests=self.queued,
                    capacity=self.capacity,
                    max_queued=8,
                    kv_cache_used_fraction=self.kv_cache_used_fraction,
                    serving=self.serving,
                    timestamp_ms=int(time.time() * 1000),
                )
                if not self.serving:
                    return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), interval)

    async def GetInfo(
        self, request: worker_pb2.GetInfoRequest, context: _Context
    ) -> worker_pb2.GetInfoResponse:
        self.info_calls += 1
        return worker_pb2.GetInfoResponse(
            worker_id=self.worker_id,
            engine="fake",
            model=self.model,
            model_version="fake-1",
            capacity=self.capacity,
            max_queued=8,
            version="0.0.0",
            max_prompt_tokens=100_000,
        )


class FakeCache(cache_pb2_grpc.CacheServicer):
    """A cache over a dict; ``delay`` seconds added to every Lookup and Store. It keeps no fill
    locks (Lookup ignores ``claim``), like a cache service from before single-flight."""

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.entries: dict[str, cache_pb2.CacheEntry] = {}
        self.ttls: dict[str, int] = {}
        self.lookups = 0
        self.stores = 0

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: _Context
    ) -> cache_pb2.LookupResponse:
        self.lookups += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        entry = self.entries.get(request.key)
        if entry is None:
            return cache_pb2.LookupResponse(hit=False)
        return cache_pb2.LookupResponse(hit=True, entry=entry)

    async def Store(
        self, request: cache_pb2.StoreRequest, context: _Context
    ) -> cache_pb2.StoreResponse:
        self.stores += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        self.entries[request.key] = request.entry
        self.ttls[request.key] = request.ttl_seconds
        return cache_pb2.StoreResponse(stored=True, ttl_seconds=request.ttl_seconds)

    async def ReleaseFill(
        self, request: cache_pb2.ReleaseFillRequest, context: _Context
    ) -> cache_pb2.ReleaseFillResponse:
        return cache_pb2.ReleaseFillResponse(released=False)

    async def ExtendFill(
        self, request: cache_pb2.ExtendFillRequest, context: _Context
    ) -> cache_pb2.ExtendFillResponse:
        return cache_pb2.ExtendFillResponse(owned=False)

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: _Context
    ) -> cache_pb2.InvalidateResponse:
        keys = [
            k
            for k, e in self.entries.items()
            if k == request.key or e.model == request.model or e.tenant == request.tenant
        ]
        for k in keys:
            del self.entries[k]
        return cache_pb2.InvalidateResponse(removed=len(keys))

    async def Stats(
        self, request: cache_pb2.StatsRequest, context: _Context
    ) -> cache_pb2.StatsResponse:
        return cache_pb2.StatsResponse(entries=len(self.entries), store="memory")


class FakeServer:
    """A grpc.aio server on 127.0.0.1 that can stop and start again on the same port."""

    def __init__(self, register: Callable[[grpc.aio.Server], None]) -> None:
        self._register = register
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @classmethod
    def for_worker(cls, worker: FakeWorker) -> FakeServer:
        return cls(lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(worker, server))

    @classmethod
    def for_cache(cls, cache: FakeCache) -> FakeServer:
        return cls(lambda server: cache_pb2_grpc.add_CacheServicer_to_server(cache, server))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeServer:
        """Start, on the port of the previous start if there was one."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self._register(server)
        port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        if port == 0:
            raise OSError(f"cannot listen on 127.0.0.1:{self.port}")
        await server.start()
        self._server, self.port = server, port
        return self

    async def stop(self) -> None:
        """Stop at once, cancelling the calls in progress."""
        if self._server is not None:
            await self._server.stop(None)
            self._server = None

    async def __aenter__(self) -> FakeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
