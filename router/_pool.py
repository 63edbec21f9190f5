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

That is the worker's *health* (:attr:`Worker.health`). Its *state* (:attr:`Worker.state`, what
ListWorkers shows and what routing obeys) also depends on its load reports and its record:

- **load reports**: every worker in the table has one ``Worker.WatchLoad`` stream (reconnected with
  jittered backoff, supervised). The last report and ``sent_since_report`` (requests this router
  sent it since that report) make its load score (router/_balancer.py). A worker that has reported
  but whose last report is older than ``load_stale_after`` is SUSPECT (no new requests; those in
  flight finish) until reports resume; one that has not reported yet is routed on this router's
  in-flight count alone, so that startup never waits for reports. A report with
  ``serving=false`` makes it DRAINING at once, until a report says it serves again;
- **ejection**: ``eject_after_failures`` consecutive failed calls (see :meth:`Lease.failed`) make
  it EJECTED for a cool-down (``eject_cooldown``, doubled on each ejection in a row up to
  ``eject_cooldown_max``). After the cool-down it is due a probe: exactly one real request is
  sent to it (:attr:`Worker.probe_due`); success makes it HEALTHY again and resets the cool-down,
  failure ejects it again.

Only HEALTHY workers (and an ejected worker due its probe, for one request) get traffic. The pool
counts the requests this router has in flight on each worker (:meth:`WorkerPool.lease`) and
remembers every model any worker ever reported, so that a request for a model whose workers are
all down is UNAVAILABLE rather than NOT_FOUND. Listeners (:meth:`WorkerPool.subscribe`) hear of
every change that may free capacity for a model: a load report, a request ending, a worker
becoming routable.

What discovery knows of a worker (Consul's service meta: model, engine, capacity) describes it
until it answers GetInfo, whose answer is authoritative; a worker whose model the meta names is
routed to only once GetInfo confirms it. A worker that leaves the discovery set leaves the table
at once; the requests still on it finish on its channel, which is closed after them.

**Discovery grace.** Discovery can contradict what the router sees directly: when Consul comes
back from an outage longer than the workers' TTL, their checks are critical for a moment and the
passing set may be empty. A worker that discovery drops while its own load stream is live (a
fresh report), says it serves, and it answered GetInfo, stays routable for ``discovery_grace``
(as Envoy's healthy-panic threshold keeps routing when most hosts look unhealthy at once); this
is logged once per worker and counted (``llmmesh_router_discovery_grace_total``). It leaves as
before when its stream ends or goes stale, reports ``serving=false`` (a worker that drains
leaves Consul and says so on its stream), stops answering, or its grace runs out; discovery
listing it again ends the grace. A grace of 0 turns this off.

Metrics cost nothing per request: the workers-by-state gauge and each worker's in-flight and load
score gauges read the table when Prometheus scrapes (from the metrics server's thread). A worker's
series appear once it has answered GetInfo (they are labelled by its id) and go when it leaves.
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
from router._balancer import LoadReport, capacity_of, load_score

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

    def __init__(
        self, endpoint: Endpoint, channel: grpc.aio.Channel, *, stale_after: float = 1.0
    ) -> None:
        self.endpoint = endpoint
        self.channel = channel
        self.stub: worker_pb2_grpc.WorkerAsyncStub = worker_pb2_grpc.WorkerStub(channel)
        #: The worker's own description, from its last GetInfo answer (None until it answers).
        self.info: worker_pb2.GetInfoResponse | None = None
        #: HEALTHY once it answers GetInfo, SUSPECT while it does not (see :attr:`state`).
        self.health = WorkerState.SUSPECT
        #: Requests this router has in flight on the worker.
        self.in_flight = 0
        #: Its last load report (None before the first).
        self.report: LoadReport | None = None
        #: Requests this router has sent it since its last load report.
        self.sent_since_report = 0
        #: A report with serving=false came last: no new requests.
        self.draining = False
        #: Reports older than this many seconds make the worker SUSPECT.
        self.stale_after = stale_after
        #: Failed calls in a row (reset by a successful one).
        self.consecutive_failures = 0
        #: Ejections in a row (the cool-down doubles with each; reset by a successful probe).
        self.ejections = 0
        #: time.monotonic() when its cool-down ends; None while not ejected.
        self.ejected_until: float | None = None
        #: Its probe request is in flight.
        self.probing = False
        #: Why the worker last failed to answer ("" when it never failed).
        self.last_error = ""
        self.lost = asyncio.Event()
        self.probed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.load_task: asyncio.Task[None] | None = None
        #: Fires when its last report turns stale, to say so once.
        self.stale_timer: asyncio.TimerHandle | None = None
        #: time.monotonic() when its discovery grace ends: discovery dropped it while its own
        #: load stream was live and serving (None: discovery lists it).
        self.grace_until: float | None = None
        #: Ends that grace.
        self.grace_timer: asyncio.TimerHandle | None = None

    @property
    def state(self) -> WorkerState:
        """Its state for routing and ListWorkers (see the module doc)."""
        if self.health is not WorkerState.HEALTHY:
            return self.health
        if self.draining:
            return WorkerState.DRAINING
        if self.ejected_until is not None:
            return WorkerState.EJECTED
        if self.report_stale():
            return WorkerState.SUSPECT
        return WorkerState.HEALTHY

    def report_age(self, now: float | None = None) -> float | None:
        """Seconds since its last load report (None when it never reported)."""
        if self.report is None:
            return None
        return (time.monotonic() if now is None else now) - self.report.received

    def report_stale(self) -> bool:
        """It has reported, but not for longer than ``stale_after``."""
        age = self.report_age()
        return age is not None and age > self.stale_after

    @property
    def probe_due(self) -> bool:
        """Ejected, its cool-down over, and no probe in flight: the next request may probe it."""
        return (
            self.ejected_until is not None
            and not self.probing
            and self.health is WorkerState.HEALTHY
            and not self.draining
            and time.monotonic() >= self.ejected_until
        )

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


class Lease:
    """One request of this router on a worker: counted in its load from :meth:`WorkerPool.lease`
    to :meth:`release` (a ``with`` block releases it), and the place its outcome is told.

    Outcomes make the worker's record: :meth:`succeeded` (the worker answered, or produced its
    first chunk) resets its consecutive failures; :meth:`failed` counts one (see
    :data:`router._dispatch` for which statuses are failures). A lease released with neither told
    (the caller cancelled or ran out of time) changes nothing. Only the probe lease of an
    ejected worker decides whether it comes back.
    """

    def __init__(self, pool: WorkerPool, worker: Worker, *, probe: bool) -> None:
        self.pool = pool
        self.worker = worker
        self.probe = probe
        self._released = False
        self._told = False

    def succeeded(self) -> None:
        """The worker did its part (told once; later calls are ignored)."""
        if not self._told:
            self._told = True
            self.pool._succeeded(self)

    def failed(self, reason: str) -> None:
        """The worker failed the request (a success told before is overridden by one failure)."""
        self._told = True
        self.pool._failed(self, reason)

    def release(self) -> None:
        """The request has left the worker. Idempotent."""
        if not self._released:
            self._released = True
            self.pool._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
        load_stale_after: timedelta = timedelta(seconds=1),
        eject_after_failures: int = 3,
        eject_cooldown: timedelta = timedelta(seconds=5),
        eject_cooldown_max: timedelta = timedelta(minutes=1),
        discovery_grace: timedelta = timedelta(seconds=30),
        rng: random.Random | None = None,
    ) -> None:
        self._discovery = discovery
        self._channel_options = grpc_channel_options(max_message_bytes) + _RECONNECT_OPTIONS
        self._probe_timeout = probe_timeout.total_seconds()
        self._backoff_base = backoff_base.total_seconds()
        self._backoff_max = backoff_max.total_seconds()
        self._close_grace = close_grace.total_seconds()
        self._load_stale_after = load_stale_after.total_seconds()
        self._eject_after_failures = eject_after_failures
        self._eject_cooldown = eject_cooldown.total_seconds()
        self._eject_cooldown_max = eject_cooldown_max.total_seconds()
        self._discovery_grace = discovery_grace.total_seconds()
        self._rng = rng or random.Random()
        self._listeners: list[Callable[[str], None]] = []
        self._timers: set[asyncio.TimerHandle] = set()
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
        for state in WorkerState:
            metrics.WORKERS.labels(state.name.lower()).set_function(
                lambda state=state: self._count(state)  # type: ignore[misc]
            )
        metrics.WORKERS_IN_GRACE.set_function(
            lambda: sum(1 for w in list(self._workers.values()) if w.grace_until is not None)
        )

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
        for timer in self._timers:
            timer.cancel()
        for worker in self._workers.values():
            for handle in (worker.stale_timer, worker.grace_timer):
                if handle is not None:
                    handle.cancel()
        channels = [w.channel for w in self._workers.values()] + self._retired
        for worker in self._workers.values():
            if worker.worker_id:
                metrics.forget_worker(worker.worker_id)
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
        """The HEALTHY workers serving ``model`` (in state HEALTHY: see the module doc)."""
        return [
            w for w in self._workers.values() if w.model == model and w.state is WorkerState.HEALTHY
        ]

    def candidates(self, model: str) -> list[Worker]:
        """The workers of ``model`` that may take a request now: HEALTHY ones, and ejected ones
        due their probe."""
        return [
            w
            for w in self._workers.values()
            if w.model == model and (w.state is WorkerState.HEALTHY or w.probe_due)
        ]

    def subscribe(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(model)`` whenever capacity for ``model`` may have freed up."""
        self._listeners.append(listener)

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

    def lease(self, worker: Worker, *, probe: bool = False) -> Lease:
        """Count a request on ``worker`` from now until the lease is released; ``probe``: it is
        the one request that decides whether an ejected worker comes back."""
        worker.in_flight += 1
        worker.sent_since_report += 1
        if probe:
            worker.probing = True
        return Lease(self, worker, probe=probe)

    @contextlib.contextmanager
    def in_flight(self, worker: Worker) -> Iterator[Lease]:
        """A lease on ``worker`` for the duration of the block."""
        with self.lease(worker) as lease:
            yield lease

    def _release(self, lease: Lease) -> None:
        worker = lease.worker
        worker.in_flight -= 1
        if lease.probe:
            worker.probing = False
        self._changed(worker)

    def _succeeded(self, lease: Lease) -> None:
        worker = lease.worker
        worker.consecutive_failures = 0
        if lease.probe and worker.ejected_until is not None:
            worker.ejected_until = None
            worker.ejections = 0
            worker.probing = False
            log.info(
                "ejected worker answered its probe; back in rotation", worker=worker.describe()
            )
            self._changed(worker)

    def _failed(self, lease: Lease, reason: str) -> None:
        worker = lease.worker
        worker.consecutive_failures += 1
        worker.last_error = reason
        if worker.ejected_until is not None:
            if lease.probe:
                worker.probing = False
                self._eject(worker, f"its probe failed: {reason}")
            return
        if self._eject_after_failures and worker.consecutive_failures >= self._eject_after_failures:
            self._eject(worker, f"{worker.consecutive_failures} failures in a row; last: {reason}")

    def _eject(self, worker: Worker, reason: str) -> None:
        cooldown = min(self._eject_cooldown_max, self._eject_cooldown * 2**worker.ejections)
        worker.ejections += 1
        worker.ejected_until = time.monotonic() + cooldown
        metrics.EJECTIONS.labels(worker.worker_id or worker.address).inc()
        log.warning(
            "worker ejected; one probe request after the cool-down decides its return",
            worker=worker.describe(),
            cooldown_s=round(cooldown, 3),
            reason=reason,
        )
        # Waiters may be waiting for it to be due its probe.
        self._wake_later(cooldown, worker)

    def _wake_later(self, delay: float, worker: Worker) -> None:
        def fire() -> None:
            self._timers.discard(handle)
            if not self._closed:
                self._changed(worker)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._timers.add(handle)

    def _changed(self, worker: Worker) -> None:
        """Tell the listeners that capacity for the worker's model may have freed up."""
        if not worker.model:
            return
        for listener in list(self._listeners):
            try:
                listener(worker.model)
            except Exception:
                log.exception("load listener failed")

    def mark_full(self, worker: Worker) -> None:
        """The worker refused a request for want of a free slot: count it full until its next
        load report (another router's request took the slot its last report showed)."""
        report = worker.report
        if report is not None:
            spare = capacity_of(worker) - report.active - report.queued
            worker.sent_since_report = max(worker.sent_since_report, spare)

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
            dropped = self._workers[address]
            if dropped.grace_until is not None:
                continue  # already kept on its own word
            if self._discovery_grace > 0 and self._serves_by_its_own_word(dropped):
                self._start_grace(dropped, listed=len(by_address))
            else:
                self._remove(address)
        for address, endpoint in by_address.items():
            worker = self._workers.get(address)
            if worker is None:
                self._add(endpoint)
            else:
                worker.endpoint = endpoint
                if worker.grace_until is not None:
                    self._cancel_grace(worker)
                    log.info("discovery lists the worker again", worker=worker.describe())

    @staticmethod
    def _serves_by_its_own_word(worker: Worker) -> bool:
        """Its load stream is live (a fresh report) and says it serves, and it answers GetInfo."""
        report = worker.report
        return (
            worker.health is WorkerState.HEALTHY
            and report is not None
            and report.serving
            and not worker.draining
            and not worker.report_stale()
        )

    def _start_grace(self, worker: Worker, *, listed: int) -> None:
        worker.grace_until = time.monotonic() + self._discovery_grace
        worker.grace_timer = asyncio.get_running_loop().call_later(
            self._discovery_grace, self._end_grace, worker, "its discovery grace ran out"
        )
        metrics.DISCOVERY_GRACE.inc()
        status = self.discovery_status()
        log.warning(
            "discovery dropped a worker whose own load stream is live and serving; keeping it "
            "routable for the grace",
            worker=worker.describe(),
            grace_s=self._discovery_grace,
            discovery_workers=listed,
            discovery_healthy=None if status is None else status.healthy,
            discovery_error=None if status is None else status.last_error or None,
        )

    def _cancel_grace(self, worker: Worker) -> None:
        worker.grace_until = None
        if worker.grace_timer is not None:
            worker.grace_timer.cancel()
            worker.grace_timer = None

    def _end_grace(self, worker: Worker, reason: str) -> None:
        """A worker kept on its own word leaves (soon, from outside the task that noticed)."""
        if self._closed or worker.grace_until is None:
            return
        if self._workers.get(worker.address) is not worker:
            return
        self._cancel_grace(worker)
        log.info("worker kept through discovery's grace leaves", worker=worker.describe(),
                 reason=reason)  # fmt: skip
        asyncio.get_running_loop().call_soon(self._remove_if_current, worker)

    def _remove_if_current(self, worker: Worker) -> None:
        if not self._closed and self._workers.get(worker.address) is worker:
            self._remove(worker.address)

    def _add(self, endpoint: Endpoint) -> None:
        channel = grpc.aio.insecure_channel(endpoint.address, options=self._channel_options)
        worker = Worker(endpoint, channel, stale_after=self._load_stale_after)
        self._workers[endpoint.address] = worker
        worker.task = self._spawn(
            self._keep_running(f"worker {endpoint.address}", lambda: self._supervise(worker)),
            name=f"worker {endpoint.address}",
        )
        worker.load_task = self._spawn(
            self._keep_running(f"load of {endpoint.address}", lambda: self._watch_load(worker)),
            name=f"load {endpoint.address}",
        )
        log.info("worker added", address=endpoint.address)

    def _remove(self, address: str) -> None:
        worker = self._workers.pop(address)
        for task in (worker.task, worker.load_task):
            if task is not None:
                task.cancel()
        if worker.stale_timer is not None:
            worker.stale_timer.cancel()
        self._cancel_grace(worker)
        if worker.worker_id:
            metrics.forget_worker(worker.worker_id)
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

    # -- load reports -----------------------------------------------------------------------

    async def _watch_load(self, worker: Worker) -> None:
        """Follow the worker's load reports for as long as it is in the table: one stream at a
        time, reopened with jittered backoff whenever it ends or fails."""
        # Reports come four times per stale period, so one or two late ones are not a gap.
        interval_ms = max(10, int(self._load_stale_after * 1000 / 4))
        attempt = 0
        while True:
            stream = worker.stub.WatchLoad(worker_pb2.WatchLoadRequest(interval_ms=interval_ms))
            try:
                async for report in stream:
                    attempt = 0
                    self._on_report(worker, report)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    # Routed on in-flight counts alone; asked again now and then.
                    attempt = max(attempt, 16)
            finally:
                stream.cancel()
            self._end_grace(worker, "its load stream ended")
            delay = min(self._backoff_max, self._backoff_base * 2**attempt)
            await asyncio.sleep(delay * self._rng.uniform(0.5, 1.0))
            attempt += 1

    def _on_report(self, worker: Worker, report: worker_pb2.WatchLoadResponse) -> None:
        was = worker.state
        worker.report = LoadReport(
            active=report.active_requests,
            queued=report.queued_requests,
            capacity=report.capacity,
            kv_cache_used_fraction=report.kv_cache_used_fraction,
            serving=report.serving,
            received=time.monotonic(),
            sequence=report.sequence,
        )
        worker.sent_since_report = 0
        if report.serving == worker.draining:
            worker.draining = not report.serving
            log.info(
                "worker draining; no new requests" if worker.draining else "worker serving again",
                worker=worker.describe(),
            )
        if worker.draining:
            self._end_grace(worker, "it reports not serving")
        if was is WorkerState.SUSPECT and worker.state is WorkerState.HEALTHY:
            log.info("worker load reports resumed", worker=worker.describe())
        if worker.stale_timer is not None:
            worker.stale_timer.cancel()
        worker.stale_timer = asyncio.get_running_loop().call_later(
            worker.stale_after + 0.001, self._report_went_stale, worker
        )
        self._changed(worker)

    def _report_went_stale(self, worker: Worker) -> None:
        """No report for ``load_stale_after``: said once, when the worker turns SUSPECT for it."""
        worker.stale_timer = None
        if self._closed or self._workers.get(worker.address) is not worker:
            return
        self._end_grace(worker, "its load reports stopped")
        if worker.state is WorkerState.SUSPECT and worker.health is WorkerState.HEALTHY:
            metrics.STALE_REPORTS.labels(worker.worker_id or worker.address).inc()
            log.warning(
                "worker load reports stopped; no new requests until they resume",
                worker=worker.describe(),
                last_report_age_ms=round((worker.report_age() or 0.0) * 1000.0, 1),
            )

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
        if worker.worker_id != info.worker_id:
            if worker.worker_id:
                metrics.forget_worker(worker.worker_id)
            metrics.track_worker(
                info.worker_id, lambda: worker.in_flight, lambda: load_score(worker)
            )
        worker.info = info
        worker.lost.clear()
        self._known_models.add(info.model)
        if worker.health is not WorkerState.HEALTHY:
            worker.health = WorkerState.HEALTHY
            self._changed(worker)
            log.info(
                "worker healthy",
                address=worker.address,
                worker_id=info.worker_id,
                model=info.model,
                engine=info.engine,
                capacity=info.capacity,
            )

    def _set_suspect(self, worker: Worker, reason: str) -> None:
        self._end_grace(worker, f"it stopped answering: {reason}")
        if worker.health is WorkerState.HEALTHY:
            worker.health = WorkerState.SUSPECT
            self._changed(worker)
            log.warning(
                "worker suspect; no traffic until it answers again",
                address=worker.address,
                worker_id=worker.worker_id,
                reason=reason,
            )

    def _count(self, state: WorkerState) -> int:
        # Called at scrape time from the metrics server's thread: iterate over a copy.
        return sum(1 for w in list(self._workers.values()) if w.state is state)

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
