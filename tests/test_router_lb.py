"""Tests of the router's load balancing: policies on worker-reported load, stale and draining
workers, ejection and probing, the admission queue, and a worker lost under load (real processes).

The in-process tests use the fakes of tests/fakes.py, whose WatchLoad reports like a real worker's
(at once, every interval, and on every change)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass

import grpc
import grpc.aio
import pytest

from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc
from router import (
    LoadReport,
    PowerOfTwo,
    Random,
    RoundRobin,
    is_full,
    load_score,
    make_policy,
)
from tests.fakes import FakeWorker
from tests.harness import ServiceProcess, assert_eventually
from tests.test_mesh import request as mesh_request
from tests.test_router import (
    MODEL,
    Router,
    collect,
    metric,
    request,
    running_router,
    serving,
)
from tests.test_worker import SLOW, generate_request, serve

HEALTHY = router_pb2.WORKER_STATE_HEALTHY
SUSPECT = router_pb2.WORKER_STATE_SUSPECT
DRAINING = router_pb2.WORKER_STATE_DRAINING
EJECTED = router_pb2.WORKER_STATE_EJECTED


@dataclass
class Candidate:
    name: str
    in_flight: int = 0
    capacity: int = 4
    report: LoadReport | None = None
    sent_since_report: int = 0


def reported(name: str, active: int, *, queued: int = 0, kv: float = 0.0) -> Candidate:
    return Candidate(name, report=LoadReport(active, queued, 4, kv_cache_used_fraction=kv))


class TestScore:
    """The score is (active + queued + sent since the report) / capacity + KV use."""

    def test_formula(self) -> None:
        worker = Candidate("a", in_flight=1, report=LoadReport(2, 1, 8, 0.25), sent_since_report=1)
        assert load_score(worker) == (2 + 1 + 1) / 8 + 0.25

    def test_in_flight_is_a_floor(self) -> None:
        """Requests this router has on the worker count even if a report predates them."""
        worker = Candidate("a", in_flight=3, report=LoadReport(1, 0, 4))
        assert load_score(worker) == 0.75

    def test_before_the_first_report(self) -> None:
        assert load_score(Candidate("a", in_flight=2, capacity=4)) == 0.5

    def test_kv_pressure_is_avoided(self) -> None:
        policy = make_policy("least-loaded")
        busy_kv = reported("kv", 1, kv=0.95)
        more_requests = reported("requests", 2, kv=0.1)
        assert policy.choose([busy_kv, more_requests]).name == "requests"

    def test_full(self) -> None:
        assert is_full(reported("a", 4))
        assert is_full(Candidate("a", report=LoadReport(3, 0, 4), sent_since_report=1))
        assert not is_full(reported("a", 3, kv=0.99))
        assert is_full(Candidate("a", in_flight=4))


class TestPolicies:
    """Power-of-two takes the lower of two; round-robin cycles; random covers every worker."""

    def test_power_of_two_picks_the_lower_of_two(self) -> None:
        policy = PowerOfTwo(random.Random(5))
        low, high = reported("low", 0), reported("high", 3)
        assert all(policy.choose([high, low]).name == "low" for _ in range(50))

    def test_power_of_two_never_picks_the_worst(self) -> None:
        policy = PowerOfTwo(random.Random(5))
        candidates = [reported(str(i), i) for i in range(4)]
        picks = Counter(policy.choose(candidates).name for _ in range(2000))
        assert "3" not in picks
        assert picks["0"] > picks["1"] > picks["2"] > 0

    def test_round_robin_cycles(self) -> None:
        policy = RoundRobin()
        candidates = [reported("a", 3), reported("b", 0), reported("c", 1)]
        assert [policy.choose(candidates).name for _ in range(7)] == list("abcabca")

    def test_random_covers(self) -> None:
        policy = Random(random.Random(2))
        candidates = [Candidate(name) for name in "abcd"]
        picks = Counter(policy.choose(candidates).name for _ in range(4000))
        assert set(picks) == set("abcd")
        assert all(850 < n < 1150 for n in picks.values()), picks

    @pytest.mark.parametrize("name", ["least-loaded", "power-of-two", "round-robin", "random"])
    def test_single_and_none(self, name: str) -> None:
        policy = make_policy(name)  # type: ignore[arg-type]
        assert policy.name == name
        only = Candidate("only", in_flight=9)
        assert policy.choose([only]) is only
        with pytest.raises(ValueError, match="no candidates"):
            policy.choose([])


async def _share_of_fast(policy: str) -> float:
    """The share of 40 requests (4 at a time) a fast worker gets beside a slow one."""
    fast, slow = FakeWorker("fast", delay=0.005), FakeWorker("slow", delay=0.15)
    async with (
        serving(fast, slow) as servers,
        running_router([s.address for s in servers], policy=policy) as router,
    ):
        await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 2)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(40):
            queue.put_nowait(i)

        async def client() -> None:
            while not queue.empty():
                await router.stub.Generate(request(f"q{queue.get_nowait()}"), timeout=10)

        await asyncio.gather(*(client() for _ in range(4)))
    assert len(fast.requests) + len(slow.requests) == 40
    return len(fast.requests) / 40


class TestPolicyMatters:
    """Least-loaded sends most requests to the fast worker; round-robin splits them evenly."""

    async def test_least_loaded_prefers_the_fast_worker(self) -> None:
        assert await _share_of_fast("least-loaded") > 0.7

    async def test_round_robin_splits_evenly(self) -> None:
        assert 0.4 <= await _share_of_fast("round-robin") <= 0.6


async def _served_by(router: Router, n: int) -> Counter[str]:
    served = [
        (await router.stub.Generate(request(f"p{i}"), timeout=5)).summary.worker_id
        for i in range(n)
    ]
    return Counter(served)


async def _state(router: Router, worker_id: str) -> int:
    return next(w.state for w in await router.workers() if w.worker_id == worker_id)


class TestLoadReports:
    """Workers whose reports stop, or who report draining, get no new requests."""

    async def test_table_shows_reported_load(self) -> None:
        a = FakeWorker("a", capacity=8)
        a.queued, a.kv_cache_used_fraction = 2, 0.5
        a.gate = asyncio.Event()
        async with serving(a) as servers, running_router([servers[0].address]) as router:
            held = asyncio.ensure_future(router.stub.Generate(request(), timeout=5))

            async def reported() -> bool:
                [row] = await router.workers()
                return row.active_requests == 1

            await assert_eventually(reported, timeout=5)
            [row] = await router.workers()
            assert (row.queued_requests, row.kv_cache_used_fraction) == (2, 0.5)
            assert row.score == pytest.approx((1 + 2) / 8 + 0.5)
            assert 0 <= row.last_report_age_ms < 1000
            assert row.state == HEALTHY
            a.gate.set()
            await held

    async def test_stale_worker_gets_nothing_until_reports_resume(self) -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        async with (
            serving(a, b) as servers,
            running_router([s.address for s in servers], load_stale_after=_seconds(0.3)) as router,
        ):
            await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 2)
            stale = metric("llmmesh_router_worker_reports_stale_total", worker_id="a")
            a.reporting = False
            await assert_eventually(lambda: _is(router, "a", SUSPECT), timeout=5)
            # Said once when the reports stop, not on every request it is passed over.
            await assert_eventually(
                lambda: (
                    metric("llmmesh_router_worker_reports_stale_total", worker_id="a") == stale + 1
                )
            )
            before = len(a.requests)
            assert (await _served_by(router, 10)) == Counter({"b": 10})
            assert len(a.requests) == before
            a.reporting = True
            a.load_changed()
            await assert_eventually(lambda: _is(router, "a", HEALTHY), timeout=5)
            assert (await _served_by(router, 20))["a"] > 0
            assert metric("llmmesh_router_worker_reports_stale_total", worker_id="a") == stale + 1

    async def test_draining_worker_gets_nothing_new_at_once(self) -> None:
        a, b = FakeWorker("a"), FakeWorker("b")
        a.gate = asyncio.Event()
        async with (
            serving(a, b) as servers,
            running_router([s.address for s in servers]) as router,
        ):
            await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 2)
            b.gate = asyncio.Event()  # both busy with one request: the first goes to either
            held = [
                asyncio.ensure_future(router.stub.Generate(request(f"h{i}"), timeout=5))
                for i in range(2)
            ]
            await assert_eventually(lambda: len(a.requests) == len(b.requests) == 1)
            b.gate.set()
            b.gate = None
            a.serving = False
            a.load_changed()
            await assert_eventually(lambda: _is(router, "a", DRAINING), timeout=2)
            assert (await _served_by(router, 10)) == Counter({"b": 10})
            assert len(a.requests) == 1
            a.gate.set()  # the request in flight on the draining worker finishes
            assert {(await h).summary.worker_id for h in held} == {"a", "b"}


def _is(router: Router, worker_id: str, state: int) -> bool:
    worker = next(w for w in router.app.pool.workers() if w.worker_id == worker_id)
    return bool(worker.state.value == state)


def _seconds(s: float) -> object:
    from datetime import timedelta

    return timedelta(seconds=s)


class TestEjection:
    """Consecutive failures eject a worker; after the cool-down one probe decides its return."""

    async def test_eject_probe_and_return(self) -> None:
        bad, good = FakeWorker("bad"), FakeWorker("good")
        bad.fail_with = grpc.StatusCode.UNKNOWN  # broken (not retried: an unknown outcome)
        ejections = metric("llmmesh_router_ejections_total", worker_id="bad")
        async with (
            serving(bad, good) as servers,
            running_router(
                [s.address for s in servers],
                eject_after_failures=3,
                eject_cooldown=_seconds(0.5),
            ) as router,
        ):
            await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 2)
            codes = []
            while len(bad.requests) < 3:
                try:
                    await router.stub.Generate(request(), timeout=5)
                    codes.append("OK")
                except grpc.aio.AioRpcError as exc:
                    codes.append(exc.code().name)
            assert codes.count("OK") == len(codes) - 3
            assert _is(router, "bad", EJECTED)
            assert await _state(router, "bad") == EJECTED
            assert metric("llmmesh_router_ejections_total", worker_id="bad") - ejections == 1
            # No traffic during the cool-down.
            assert (await _served_by(router, 8)) == Counter({"good": 8})
            assert len(bad.requests) == 3

            # After it, one probe: still failing, so ejected again (for twice as long).
            await assert_eventually(
                lambda: (
                    router.app.pool.workers()[0].probe_due or router.app.pool.workers()[1].probe_due
                ),
                timeout=3,
            )
            with pytest.raises(grpc.aio.AioRpcError):
                await router.stub.Generate(request(), timeout=5)
            assert len(bad.requests) == 4
            assert _is(router, "bad", EJECTED)
            assert metric("llmmesh_router_ejections_total", worker_id="bad") - ejections == 2

            # Recovered: exactly one probe goes to it while it is held, the rest elsewhere.
            bad.fail_with = None
            bad.gate = asyncio.Event()
            await assert_eventually(
                lambda: any(w.probe_due for w in router.app.pool.workers()), timeout=3
            )
            probe = asyncio.ensure_future(router.stub.Generate(request("probe"), timeout=5))
            await assert_eventually(lambda: len(bad.requests) == 5)
            assert (await _served_by(router, 6)) == Counter({"good": 6})
            assert len(bad.requests) == 5
            bad.gate.set()
            assert (await probe).summary.worker_id == "bad"
            assert _is(router, "bad", HEALTHY)
            served = await _served_by(router, 20)
            assert served["bad"] > 0, "traffic never came back to the recovered worker"

    async def test_a_requests_own_failures_are_not_the_workers(self) -> None:
        """INTERNAL (the engine failed that request alone) never ejects a worker."""
        worker = FakeWorker("w")
        worker.fail_with = grpc.StatusCode.INTERNAL
        ejections = metric("llmmesh_router_ejections_total", worker_id="w")
        async with (
            serving(worker) as servers,
            running_router([servers[0].address], eject_after_failures=2) as router,
        ):
            await assert_eventually(lambda: len(router.app.pool.healthy(MODEL)) == 1)
            for _ in range(4):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await router.stub.Generate(request(), timeout=5)
                assert info.value.code() == grpc.StatusCode.INTERNAL
            assert _is(router, "w", HEALTHY)
            assert router.app.pool.workers()[0].consecutive_failures == 0
            assert metric("llmmesh_router_ejections_total", worker_id="w") == ejections
            worker.fail_with = None
            assert (await router.stub.Generate(request(), timeout=5)).summary.worker_id == "w"

    async def test_caller_deadlines_are_not_failures(self) -> None:
        slow = FakeWorker("slow", delay=1.0)
        async with (
            serving(slow) as servers,
            running_router([servers[0].address], eject_after_failures=2) as router,
        ):
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await router.stub.Generate(request(), timeout=0.1)
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await assert_eventually(lambda: router.app.pool.workers()[0].in_flight == 0)
            assert _is(router, "slow", HEALTHY)


class TestAdmission:
    """While every worker is full, requests wait in a bounded, priority-ordered router queue."""

    @pytest.mark.parametrize(("policy", "queued_in_router"), [
        ("least-loaded", True),
        ("power-of-two", True),
        ("round-robin", False),
        ("random", False),
    ])  # fmt: skip
    async def test_only_load_aware_policies_hold_requests_for_a_free_slot(
        self, policy: str, queued_in_router: bool
    ) -> None:
        """A full worker gets the next request under a blind policy; a load-aware one queues it."""
        w = FakeWorker("w", capacity=1)
        w.gate = asyncio.Event()
        async with (
            serving(w) as servers,
            running_router([servers[0].address], policy=policy) as router,
        ):
            held = asyncio.ensure_future(router.stub.Generate(request("held"), timeout=10))
            await assert_eventually(lambda: len(w.requests) == 1)
            second = asyncio.ensure_future(router.stub.Generate(request("next"), timeout=10))
            if queued_in_router:
                await assert_eventually(lambda: router.app.service.admission.waiting(MODEL) == 1)
                assert len(w.requests) == 1
            else:
                await assert_eventually(lambda: len(w.requests) == 2)
                assert router.app.service.admission.waiting(MODEL) == 0
            w.gate.set()
            await asyncio.gather(held, second)

    async def test_full_queue_is_resource_exhausted(self) -> None:
        w = FakeWorker("w", capacity=1)
        w.gate = asyncio.Event()
        rejected = metric("llmmesh_router_rejected_total", reason="queue_full")
        async with (
            serving(w) as servers,
            running_router([servers[0].address], admission_queue_size=2) as router,
        ):
            calls = [
                asyncio.ensure_future(router.stub.Generate(request(f"q{i}"), timeout=10))
                for i in range(3)
            ]
            await assert_eventually(lambda: router.app.service.admission.waiting(MODEL) == 2)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router.stub.Generate(request("one too many"), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "admission queue is full (2 waiting)" in (info.value.details() or "")
            assert metric("llmmesh_router_rejected_total", reason="queue_full") - rejected == 1
            assert metric("llmmesh_router_queue_depth", model=MODEL) == 2
            await asyncio.sleep(0)
            w.gate.set()
            responses = [await c for c in calls]
        assert len(w.requests) == 3
        # The queued ones waited in the router; the time is in their summaries.
        assert sorted(r.summary.timings.queue_ms > 1.5 for r in responses) == [False, True, True]

    async def test_deadline_spent_in_the_queue(self) -> None:
        w = FakeWorker("w", capacity=1)
        w.gate = asyncio.Event()
        async with serving(w) as servers, running_router([servers[0].address]) as router:
            held = asyncio.ensure_future(router.stub.Generate(request("held"), timeout=10))
            await assert_eventually(lambda: len(w.requests) == 1)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router.stub.Generate(request("late"), timeout=0.3)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await collect(router.stub.GenerateStream(request("late"), timeout=0.3))
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await assert_eventually(lambda: router.app.service.admission.waiting(MODEL) == 0)
            w.gate.set()
            await held
        assert [r.prompt for r in w.requests] == ["held"]

    async def test_max_wait_is_resource_exhausted(self) -> None:
        w = FakeWorker("w", capacity=1)
        w.gate = asyncio.Event()
        async with (
            serving(w) as servers,
            running_router([servers[0].address], admission_max_wait=_seconds(0.2)) as router,
        ):
            held = asyncio.ensure_future(router.stub.Generate(request("held"), timeout=10))
            await assert_eventually(lambda: len(w.requests) == 1)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await router.stub.Generate(request("late"), timeout=5)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "no worker of model" in (info.value.details() or "")
            w.gate.set()
            await held

    async def test_priority_order(self) -> None:
        """HIGH is admitted before earlier NORMAL and LOW waiters; FIFO within a level."""
        w = FakeWorker("w", capacity=1)
        w.gate = asyncio.Event()
        async with serving(w) as servers, running_router([servers[0].address]) as router:
            admission = router.app.service.admission
            calls = [asyncio.ensure_future(router.stub.Generate(request("held"), timeout=10))]
            await assert_eventually(lambda: len(w.requests) == 1)
            order = [
                ("low", generate_pb2.PRIORITY_LOW),
                ("normal-1", generate_pb2.PRIORITY_NORMAL),
                ("unspecified", generate_pb2.PRIORITY_UNSPECIFIED),
                ("high-1", generate_pb2.PRIORITY_HIGH),
                ("high-2", generate_pb2.PRIORITY_HIGH),
            ]
            for n, (prompt, priority) in enumerate(order, start=1):
                req = request(prompt, priority=priority)
                calls.append(asyncio.ensure_future(router.stub.Generate(req, timeout=10)))
                await assert_eventually(lambda n=n: admission.waiting(MODEL) == n)
            w.gate.set()
            await asyncio.gather(*calls)
        assert [r.prompt for r in w.requests] == [
            "held",
            "high-1",
            "high-2",
            "normal-1",
            "unspecified",
            "low",
        ]

    async def test_cancelled_request_leaves_the_queue(self) -> None:
        w = FakeWorker("w", capacity=1)
        w.gate = asyncio.Event()
        async with serving(w) as servers, running_router([servers[0].address]) as router:
            admission = router.app.service.admission
            held = asyncio.ensure_future(router.stub.Generate(request("held"), timeout=10))
            await assert_eventually(lambda: len(w.requests) == 1)
            queued = router.stub.GenerateStream(request("cancelled"), timeout=10)
            waiting = asyncio.ensure_future(queued.read())
            await assert_eventually(lambda: admission.waiting(MODEL) == 1)
            queued.cancel()
            await assert_eventually(lambda: admission.waiting(MODEL) == 0)
            w.gate.set()
            await held
            with pytest.raises(asyncio.CancelledError):
                await waiting
            # The slot it would have had goes to the next request.
            await router.stub.Generate(request("next"), timeout=5)
        assert [r.prompt for r in w.requests] == ["held", "next"]


class TestWorkerLostUnderLoad:
    """A worker SIGKILLed under 200 concurrent requests fails none that had not streamed."""

    async def test_sigkill_under_200_streams(self) -> None:
        args = ["--engine", "sim", "--metrics-port", "0", "--sim-speed-factor", "4"]
        args += ["--capacity", "4", "--max-queued", "2"]
        workers = [
            ServiceProcess("worker", [*args, "--worker-id", f"w{i}"]).start() for i in (1, 2)
        ]
        router = ServiceProcess(
            "router",
            ["--workers", ",".join(w.address for w in workers), "--cache-address", ""],
        ).start()
        outcomes: list[tuple[int, str]] = []
        try:
            async with grpc.aio.insecure_channel(router.address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)

                async def one(i: int) -> None:
                    req = mesh_request(f"question {i}", max_tokens=64, temperature=0.0)
                    req.cache_policy = generate_pb2.CACHE_POLICY_BYPASS
                    chunks = 0
                    try:
                        async for chunk in stub.GenerateStream(req, timeout=45):
                            chunks += bool(chunk.text)
                        outcomes.append((chunks, "OK"))
                    except grpc.aio.AioRpcError as exc:
                        outcomes.append((chunks, exc.code().name))

                tasks = [asyncio.create_task(one(i)) for i in range(200)]

                async def w1_busy() -> bool:
                    table = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
                    return any(w.worker_id == "w1" and w.in_flight >= 3 for w in table.workers)

                await assert_eventually(w1_busy, timeout=10, message="w1 never got traffic")
                workers[0].kill()
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=50)
        finally:
            router.close()
            for w in workers:
                w.close()
        assert len(outcomes) == 200
        assert [o for o in outcomes if o[1] != "OK" and o[0] == 0] == []
        assert all(code == "UNAVAILABLE" for _, code in outcomes if code != "OK")
        assert any(code != "OK" for _, code in outcomes), (
            "no stream was cut by the kill: the test did not exercise a mid-stream loss"
        )


class TestReplicas:
    """Router replicas share no state; the worker arbitrates its free slots between them."""

    async def test_two_routers_never_queue_on_a_worker_with_a_free_slot_elsewhere(self) -> None:
        """Two routers, one real worker with 2 slots, 16 requests split between them: the
        worker never holds more than its capacity (a router that loses the race for a slot
        gets Busy and waits in its own queue), nothing fails and nothing is retried."""
        refusals = metric("llmmesh_router_busy_refusals_total")
        retries = metric("llmmesh_router_retries_total", code="RESOURCE_EXHAUSTED")
        async with (
            serve(capacity=2, max_queued=64, **SLOW) as w,
            running_router([w.runner.address]) as one,
            running_router([w.runner.address]) as two,
        ):
            await assert_eventually(lambda: w.app.engine.load().active == 0)
            most = 0

            async def watch() -> None:
                nonlocal most
                while True:
                    active, queued = w.load()
                    most = max(most, active + queued)
                    await asyncio.sleep(0.001)

            watcher = asyncio.ensure_future(watch())
            calls = [
                router.stub.Generate(generate_request(f"q{i}", max_tokens=3), timeout=20)
                for i in range(8)
                for router in (one, two)
            ]
            answers = await asyncio.gather(*calls)
            watcher.cancel()
        assert all(a.text for a in answers)
        assert most <= 2
        assert metric("llmmesh_router_busy_refusals_total") > refusals
        assert metric("llmmesh_router_retries_total", code="RESOURCE_EXHAUSTED") == retries
