"""The routing table: every worker discovery knows of, its connection, description, health and load.

For each endpoint the pool keeps one ``grpc.aio`` channel and a Worker stub, and a supervisor task
that runs the worker's life cycle::

      (new endpoint)
            │
            ▼        GetInfo answers          connection lost, or a call failed UNAVAILABLE
         SUSPECT ───────────────────▶ HEALTHY ─────────────────────────────────────────────┐
            ▲   GetInfo retried with                                                        │
            │   jittered backoff                                                            │
            └───────────────────────────────────────────────────────────────────────────────┘

Only HEALTHY workers get traffic. The pool also counts the requests this router has in flight on
each worker (the load the balancer sees) and remembers every model any worker ever reported, so
that a request for a model whose workers are all down is UNAVAILABLE rather than NOT_FOUND.

What discovery knows of a worker (Consul's service meta: model, engine, capacity) describes it
until it answers GetInfo, whose answer is authoritative; a worker whose model the meta names is
routed to only once GetInfo confirms it. A worker that leaves the discovery set leaves the table
at once; the requests still on it finish on its channel, which is closed after them.

Later additions slot in here: load reports from ``Worker.WatchLoad`` (DRAINING when a worker says it
is not serving), and ejection after consecutive failures (EJECTED).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from datetime import timedelta
from typing import Any

import grpc
import grpc.aio
import structlog

from llmmesh.discovery import Discovery, DiscoveryStatus, Endpoint, ReportsStatus
from llmmesh.server import MiB, grpc_channel_options
from llmmesh.v1 import router_pb2, worker_pb2, worker_pb2_grpc
from router import _metrics as metrics

log = structlog.get_logger(__name__)

# A worker restarted on its port is redialled within a second instead of gRPC's default backoff
# (1 s growing to 2 min), so it gets traffic again quickly.
_RECONNECT_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
_LOST_STATES = frozenset(
    {
        grpc.ChannelConnectivity.IDLE,
        grpc.ChannelConnectivity.TRANSIENT_FAILURE,
        grpc.ChannelConnectivity.SHUTDOWN,
    }
)


class WorkerState(enum.Enum):
    """A worker's state as the router sees it (values are ``llmmesh.v1.WorkerState``)."""

    HEALTHY = router_pb2.WORKER_STATE_HEALTHY
    SUSPECT = router_pb2.WORKER_STATE_SUSPECT
    DRAINING = router_pb2.WORKER_STATE_DRAINING
    EJECTED = router_pb2.WORKER_STATE_EJECTED


class Worker:
    """One row of the routing table."""

    def __init__(self, endpoint: Endpoint, channel: grpc.aio.Channel) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.stub: worker_pb2_grpc.WorkerAsyncStub = worker_pb2_grpc.WorkerStub(channel)
        #: The worker's own description, from its last GetInfo answer (None until it answers).
        self.info: worker_pb2.GetInfoResponse | None = None
        self.state = WorkerState.SUSPECT
        #: Requests this router has in flight on the worker.
        self.in_flight = 0
        #: Why the worker last failed to answer ("" when it never failed).
        self.last_error = ""
        self.lost = asyncio.Event()
        self.probed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """host:port the router dials."""
        return self.endpoint.address

    @property
    def worker_id(self) -> str:
        """The worker's id ("" until it has answered GetInfo)."""
        return self.info.worker_id if self.info is not None else ""

    @property
    def model(self) -> str:
        """The model it serves: its GetInfo answer, else what discovery says ("" if neither)."""
        return self.info.model if self.info is not None else self.endpoint.meta.get("model", "")

    @property
    def engine(self) -> str:
        """Its engine: its GetInfo answer, else what discovery says ("" if neither)."""
        return self.info.engine if self.info is not None else self.endpoint.meta.get("engine", "")

    @property
    def model_version(self) -> str:
        """The version of its model ("" until it has answered GetInfo)."""
        return self.info.model_version if self.info is not None else ""

    @property
    def capacity(self) -> int:
        """How many requests it runs at once (at least 1): GetInfo's, else discovery's."""
        if self.info is not None:
            return max(1, self.info.capacity)
        claimed = self.endpoint.meta.get("capacity", "")
        return max(1, int(claimed)) if claimed.isdigit() else 1

    def describe(self) -> str:
        """How error messages name the worker."""
        if self.worker_id:
            return f"worker {self.worker_id} ({self.address})"
        return f"worker at {self.address}"

    def __repr__(self) -> str:
        return f"<Worker {self.worker_id or '?'} {self.address} {self.state.name}>"


class WorkerPool:
    """The routing table, kept in step with a :class:`~llmmesh.discovery.Discovery`."""

    def __init__(
        self,
        discovery: Discovery,
        *,
        max_message_bytes: int = 4 * MiB,
        probe_timeout: timedelta = timedelta(seconds=1),
        backoff_base: timedelta = timedelta(milliseconds=50),
        backoff_max: timedelta = timedelta(seconds=1),
        close_grace: timedelta = timedelta(seconds=30),
        rng: random.Random | None = None,
    ) -> None:
        self._discovery = discovery
        self._channel_options = grpc_channel_options(max_message_bytes) + _RECONNECT_OPTIONS
        self._probe_timeout = probe_timeout.total_seconds()
        self._backoff_base = backoff_base.total_seconds()
        self._backoff_max = backoff_max.total_seconds()
        self._close_grace = close_grace.total_seconds()
        self._rng = rng or random.Random()
        self._workers: dict[str, Worker] = {}
        self._retired: list[grpc.aio.Channel] = []
        self._known_models: set[str] = set()
        self._discovery_metrics = metrics.DiscoveryMetrics()
        self._tasks: set[asyncio.Task[None]] = set()
        self._discovered = asyncio.Event()
        self._started = False
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start following discovery. Starting twice is an error."""
        if self._started:
            raise RuntimeError("worker pool already started")
        self._started = True
        if isinstance(self._discovery, ReportsStatus):
            self._discovery.subscribe(self._discovery_metrics.observe)
        self._spawn(self._keep_running("discovery", self._follow_discovery), name="discovery")
        self._update_state_gauge()

    async def wait_ready(self, timeout: float) -> bool:
        """Wait until discovery gave its first set and every worker was probed once (or failed to
        answer once); True if that happened within ``timeout`` seconds."""

        async def ready() -> None:
            await self._discovered.wait()
            await asyncio.gather(*(w.probed.wait() for w in list(self._workers.values())))

        try:
            await asyncio.wait_for(ready(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop every background task and close every channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        channels = [w.channel for w in self._workers.values()] + self._retired
        self._workers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close(None) for c in channels), return_exceptions=True)
        await self._discovery.close()

    # -- what the router asks ---------------------------------------------------------------

    def workers(self) -> list[Worker]:
        """Every worker in the table, in any state."""
        return list(self._workers.values())

    def healthy(self, model: str) -> list[Worker]:
        """The HEALTHY workers serving ``model``."""
        return [
            w for w in self._workers.values() if w.state is WorkerState.HEALTHY and w.model == model
        ]

    @property
    def known_models(self) -> frozenset[str]:
        """Every model any worker has reported since the router started, and every model that
        a worker in the table is said to serve by discovery (and has not answered yet)."""
        claimed = {w.model for w in self._workers.values() if w.info is None}
        return frozenset(self._known_models | (claimed - {""}))

    def discovery_status(self) -> DiscoveryStatus | None:
        """How discovery is doing (None for a source that does not say)."""
        if isinstance(self._discovery, ReportsStatus):
            return self._discovery.status()
        return None

    def never_answered(self) -> int:
        """How many workers have not answered GetInfo yet."""
        return sum(1 for w in self._workers.values() if w.info is None)

    @contextlib.contextmanager
    def in_flight(self, worker: Worker) -> Iterator[None]:
        """Count a request on ``worker`` for the duration of the block."""
        label = worker.worker_id or worker.address
        worker.in_flight += 1
        metrics.WORKER_IN_FLIGHT.labels(label).inc()
        try:
            yield
        finally:
            worker.in_flight -= 1
            metrics.WORKER_IN_FLIGHT.labels(label).dec()

    def mark_unavailable(self, worker: Worker, reason: str) -> None:
        """A call to ``worker`` failed as if it were gone: no traffic until it answers again."""
        worker.last_error = reason
        self._set_suspect(worker, reason)
        worker.lost.set()

    # -- discovery --------------------------------------------------------------------------

    async def _follow_discovery(self) -> None:
        async for endpoints in self._discovery.watch():
            self._apply(endpoints)
            self._discovered.set()

    def _apply(self, endpoints: frozenset[Endpoint]) -> None:
        by_address = {e.address: e for e in endpoints}
        for address in [a for a in self._workers if a not in by_address]:
            self._remove(address)
        for address, endpoint in by_address.items():
            worker = self._workers.get(address)
            if worker is None:
                self._add(endpoint)
            else:
                worker.endpoint = endpoint
        self._update_state_gauge()

    def _add(self, endpoint: Endpoint) -> None:
        channel = grpc.aio.insecure_channel(endpoint.address, options=self._channel_options)
        worker = Worker(endpoint, channel)
        self._workers[endpoint.address] = worker
        worker.task = self._spawn(
            self._keep_running(f"worker {endpoint.address}", lambda: self._supervise(worker)),
            name=f"worker {endpoint.address}",
        )
        log.info("worker added", address=endpoint.address)

    def _remove(self, address: str) -> None:
        worker = self._workers.pop(address)
        if worker.task is not None:
            worker.task.cancel()
        if worker.worker_id:
            with contextlib.suppress(KeyError):
                metrics.WORKER_IN_FLIGHT.remove(worker.worker_id)
        self._spawn(self._retire(worker.channel), name=f"close {address}")
        log.info("worker removed", address=address, worker_id=worker.worker_id)

    async def _retire(self, channel: grpc.aio.Channel) -> None:
        """Close the channel of a removed worker once the requests still on it have finished
        (or the grace period is over); :meth:`close` closes it at once if it comes first."""
        self._retired.append(channel)
        try:
            await channel.close(self._close_grace)
        finally:
            with contextlib.suppress(ValueError):
                self._retired.remove(channel)

    # -- health -----------------------------------------------------------------------------

    async def _supervise(self, worker: Worker) -> None:
        while True:
            await self._probe_until_answers(worker)
            await self._wait_until_lost(worker)
            self._set_suspect(worker, worker.last_error)

    async def _probe_until_answers(self, worker: Worker) -> None:
        attempt = 0
        while not await self._probe(worker):
            worker.probed.set()
            if attempt == 0 and worker.info is None:
                log.warning(
                    "worker not answering yet; will keep trying",
                    address=worker.address,
                    error=worker.last_error,
                )
            delay = min(self._backoff_max, self._backoff_base * 2**attempt)
            await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))
            attempt += 1
        worker.probed.set()

    async def _probe(self, worker: Worker) -> bool:
        """Ask the worker for its description; True (and HEALTHY) if it answers."""
        try:
            info = await worker.stub.GetInfo(
                worker_pb2.GetInfoRequest(), timeout=self._probe_timeout
            )
        except grpc.aio.AioRpcError as exc:
            worker.last_error = f"{exc.code().name}: {exc.details()}"
            return False
        self._set_healthy(worker, info)
        return True

    async def _wait_until_lost(self, worker: Worker) -> None:
        """Return once the worker stops answering: its connection dropped and a probe failed, or
        a call to it failed UNAVAILABLE (:meth:`mark_unavailable`)."""
        state = worker.channel.get_state()
        while not worker.lost.is_set():
            lost = asyncio.ensure_future(worker.lost.wait())
            changed = asyncio.ensure_future(worker.channel.wait_for_state_change(state))
            try:
                await asyncio.wait({lost, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                changed.cancel()
            state = worker.channel.get_state()
            # IDLE after READY is also how an idle channel looks; a probe tells them apart.
            if state in _LOST_STATES and not worker.lost.is_set():
                if not await self._probe(worker):
                    return
                state = worker.channel.get_state()

    def _set_healthy(self, worker: Worker, info: worker_pb2.GetInfoResponse) -> None:
        claimed = worker.endpoint.meta.get("model", "")
        if claimed and claimed != info.model and worker.model != info.model:
            log.warning(
                "worker serves another model than discovery says; routing by its own answer",
                address=worker.address,
                worker_id=info.worker_id,
                model=info.model,
                discovery_model=claimed,
            )
        if worker.worker_id and worker.worker_id != info.worker_id:
            with contextlib.suppress(KeyError):
                metrics.WORKER_IN_FLIGHT.remove(worker.worker_id)
        worker.info = info
        worker.lost.clear()
        self._known_models.add(info.model)
        if worker.state is not WorkerState.HEALTHY:
            worker.state = WorkerState.HEALTHY
            self._update_state_gauge()
            log.info(
                "worker healthy",
                address=worker.address,
                worker_id=info.worker_id,
                model=info.model,
                engine=info.engine,
                capacity=info.capacity,
            )

    def _set_suspect(self, worker: Worker, reason: str) -> None:
        if worker.state is WorkerState.HEALTHY:
            worker.state = WorkerState.SUSPECT
            self._update_state_gauge()
            log.warning(
                "worker suspect; no traffic until it answers again",
                address=worker.address,
                worker_id=worker.worker_id,
                reason=reason,
            )

    def _update_state_gauge(self) -> None:
        for state in WorkerState:
            count = sum(1 for w in self._workers.values() if w.state is state)
            metrics.WORKERS.labels(state.name.lower()).set(count)

    # -- task supervision -------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], *, name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _keep_running(self, what: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run ``run()`` to its end; a bug that makes it raise is logged and it is restarted."""
        while True:
            started = time.monotonic()
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task failed; restarting it", task=what)
                if time.monotonic() - started < 1.0:
                    await asyncio.sleep(self._backoff_max)
                continue
            return
