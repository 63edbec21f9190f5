"""``python -m bench hotpath``: the bare pass-through proxy forwards bytes faithfully, the targets
are judged on the measured p50s and tokens/s, and a tiny run writes results of the documented
shape."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest

from bench import hotpath
from llmmesh.server import ServerSettings, ServiceRunner
from llmmesh.v1 import router_pb2, router_pb2_grpc
from tests.fakes import FakeServer, FakeWorker

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
PATHS = ("bare_hop", "direct_worker", "router_miss", "cache_hit")


@pytest.fixture
async def proxied() -> AsyncIterator[tuple[FakeWorker, router_pb2_grpc.RouterAsyncStub]]:
    """A fake worker behind the bare proxy, and a Router stub that calls the proxy."""
    worker = FakeWorker("w-behind-proxy")
    async with FakeServer.for_worker(worker) as server:
        app = hotpath.ProxyApp(server.address)
        settings = ServerSettings(port=0, grace=timedelta(seconds=1))
        async with (
            ServiceRunner(app, settings, name="bench-proxy") as runner,
            grpc.aio.insecure_channel(runner.address) as channel,
        ):
            yield worker, router_pb2_grpc.RouterStub(channel)


class TestPassThroughProxy:
    """The floor's proxy relays Router calls to a worker's Worker methods as they are."""

    async def test_unary_answer_is_the_workers(
        self, proxied: tuple[FakeWorker, router_pb2_grpc.RouterAsyncStub]
    ) -> None:
        worker, stub = proxied
        request = hotpath.generate_request(4, prompt="hello there")
        response = await stub.Generate(request, timeout=5)
        assert response.text == "w-behind-proxy heard: hello there"
        assert response.summary.worker_id == "w-behind-proxy"
        assert worker.requests == [request]
        # The caller's deadline went upstream with the call. gRPC rounds the grpc-timeout header
        # up (to 10 ms units at this size: 5 s has arrived as 5.0092 s), so allow a little.
        remaining = worker.time_remaining[0]
        assert remaining is not None
        assert 3 < remaining <= 5.05

    async def test_stream_chunks_are_relayed_in_order(
        self, proxied: tuple[FakeWorker, router_pb2_grpc.RouterAsyncStub]
    ) -> None:
        _, stub = proxied
        chunks = [c async for c in stub.GenerateStream(hotpath.generate_request(4, prompt="a b"))]
        assert "".join(c.text for c in chunks) == "w-behind-proxy heard: a b"
        assert chunks[-1].HasField("summary")

    async def test_upstream_status_comes_back(
        self, proxied: tuple[FakeWorker, router_pb2_grpc.RouterAsyncStub]
    ) -> None:
        worker, stub = proxied
        worker.fail_with = grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await stub.Generate(hotpath.generate_request(4), timeout=5)
        assert unary.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "fake worker fails" in (unary.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in stub.GenerateStream(hotpath.generate_request(4), timeout=5):
                pass
        assert streamed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    async def test_other_methods_are_unimplemented(
        self, proxied: tuple[FakeWorker, router_pb2_grpc.RouterAsyncStub]
    ) -> None:
        _, stub = proxied
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
        assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED


class TestShape:
    """h2load's connections and streams add up to the concurrency."""

    @pytest.mark.parametrize(
        ("concurrency", "shape"),
        [(1, (1, 1)), (32, (1, 32)), (64, (1, 64)), (65, (5, 13)), (100, (2, 50)), (256, (4, 64))],
    )
    def test_streams_per_connection(self, concurrency: int, shape: tuple[int, int]) -> None:
        assert hotpath.h2load_shape(concurrency) == shape


def measured(path: str, concurrency: int, p50_ms: float, *, tokens: int = 0) -> hotpath.Measured:
    run = hotpath.H2loadRun(
        command=[], clients=1, streams_per_client=1, done=3, succeeded=3, failed=0, errored=0,
        elapsed_s=1.0, req_per_s=3.0, latencies_ms=[p50_ms, p50_ms, p50_ms],
    )  # fmt: skip
    return hotpath.Measured(
        path, concurrency, run, {"OK": 3}, {"router": 0.003}, generated_tokens=tokens
    )


def fake_run(
    bare: float, direct: float, miss: float, hit: float, tokens: tuple[int, int]
) -> hotpath.Run:
    run = hotpath.Run(hotpath.Options(concurrencies=(1,)))
    for path, p50 in zip(PATHS, (bare, direct, miss, hit), strict=True):
        run.unary[path] = {1: measured(path, 1, p50)}
    run.streams["bare"] = {1: measured("bare", 1, 1.0, tokens=tokens[0])}
    run.streams["router"] = {1: measured("router", 1, 1.0, tokens=tokens[1])}
    return run


class TestTargets:
    """Each target passes or fails on the measured figures and says when it was not measured."""

    def test_all_pass(self) -> None:
        t = hotpath.targets(fake_run(bare=2.0, direct=1.0, miss=3.0, hit=3.9, tokens=(100, 60)))
        assert t["cache_hit_p50_within_2x_bare_hop"]["pass"] is True
        added = t["router_added_latency_within_2_5x_bare_proxy"]
        assert added["by_concurrency"]["1"]["ratio"] == pytest.approx(2.0)
        assert added["pass"] is True
        assert t["router_stream_tokens_at_least_half_bare"]["pass"] is True

    def test_each_can_fail(self) -> None:
        t = hotpath.targets(fake_run(bare=2.0, direct=1.0, miss=4.0, hit=4.2, tokens=(100, 40)))
        assert t["cache_hit_p50_within_2x_bare_hop"]["pass"] is False
        assert t["router_added_latency_within_2_5x_bare_proxy"]["pass"] is False
        assert t["router_stream_tokens_at_least_half_bare"]["pass"] is False
        assert t["router_stream_tokens_at_least_half_bare"]["by_concurrency"]["1"][
            "ratio"
        ] == pytest.approx(0.4)

    def test_not_measured(self) -> None:
        t = hotpath.targets(hotpath.Run(hotpath.Options(concurrencies=(1,))))
        assert all(t[k]["pass"] is None for k in t)

    def test_cancelled_at_the_end_of_a_timed_run_is_no_error(self) -> None:
        m = measured("bare_hop", 4, 1.0)
        m.codes = {"OK": 10, "CANCELLED": 4}
        assert m.errors == 0
        m.codes = {"OK": 10, "CANCELLED": 5, "UNAVAILABLE": 1}
        assert m.errors == 2
        m.timed = False
        assert m.errors == 6


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("h2load") is None, reason="needs h2load (nghttp2-client)")
class TestSmokeRun:
    """A tiny run through real processes writes every documented figure."""

    def test_tiny_run_writes_results(self, tmp_path: Path) -> None:
        out = tmp_path / "hotpath.json"
        argv = ["--quick", "--concurrency", "1,2", "--duration", "0.3", "--warm-up", "0.1"]
        argv += ["--stream-tokens", "8", "--no-progress", "--out", str(out)]
        done = subprocess.run(
            [sys.executable, "-m", "bench", "hotpath", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=80,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "p50 x floor" in done.stdout
        assert "Targets:" in done.stdout

        results = json.loads(out.read_text())
        assert {"cpu_count", "python", "platform"} <= set(results["machine"])
        assert results["settings"]["cache_store"] in ("redis", "memory")
        for path in PATHS:
            assert set(results[path]) == {"1", "2"}, path
            for figures in results[path].values():
                assert set(figures) == {"p50_ms", "p99_ms"}
                assert 0 < figures["p50_ms"] <= figures["p99_ms"], path
        h2 = results["h2load"]["unary"]
        for path in PATHS:
            for level in ("1", "2"):
                assert h2[path][level]["requests"] > 0
                assert h2[path][level]["server_codes"].get("OK", 0) > 0
                assert set(h2[path][level]["server_codes"]) <= {"OK", "CANCELLED"}
        # The hits never reached the worker; each run counted its requests where it entered.
        assert all(h2["cache_hit"][level]["worker_requests"] == 0 for level in ("1", "2"))
        cpu = results["cpu_ms_per_request"]["unary"]
        assert cpu["bare_hop"]["1"]["proxy"] > 0
        assert cpu["router_miss"]["1"]["router"] > 0
        assert cpu["cache_hit"]["1"]["cache"] > 0
        assert cpu["direct_worker"]["1"]["worker"] > 0

        tokens = results["stream_tokens_per_s"]
        assert set(tokens) >= {"bare", "router"}
        for path in ("bare", "router", "direct"):
            assert all(tokens[path][level] > 0 for level in ("1", "2")), path
            for level, figures in results["h2load"]["streams"][path].items():
                # Every stream ran to its 8 tokens, all of them generated by the worker.
                assert figures["generated_tokens"] == 8 * figures["requests"], (path, level)

        python = results["python_client"]
        assert python["cache_hit"]["answered_from_cache"] == python["cache_hit"]["requests"] > 0
        distinct = python["cache_hit_distinct"]
        assert distinct["answered_from_cache"] == distinct["requests"] > 0
        assert python["router_miss_unique"]["answered_from_cache"] == 0
        assert python["router_miss_unique"]["requests"] > 0
        targets = results["targets"]
        for target in targets.values():
            assert set(target["by_concurrency"]) == {"1", "2"}
            assert isinstance(target["pass"], bool)


class TestOptions:
    """Bad options are usage errors (exit status 2, naming the option)."""

    def test_bad_option_is_a_usage_error(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "bench", "hotpath", "--concurrency", "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2
        assert "--concurrency" in done.stderr
