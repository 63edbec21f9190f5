"""``python -m bench lb`` replays one seeded trace per policy and writes results of the
documented shape, with the issue's targets checked honestly."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import lb

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "throughput_rps", "errors"}


class TestSmokeRun:
    """A tiny run through a real router, router replicas and the oracle writes JSON and PNG."""

    @pytest.mark.slow
    def test_tiny_run_writes_results(self, tmp_path: Path) -> None:
        out = tmp_path / "lb.json"
        argv = ["--policies", "least-loaded,oracle", "--loads", "80", "--requests", "24"]
        argv += ["--replicas", "2", "--time-scale", "2", "--no-progress", "--out", str(out)]
        done = subprocess.run(
            [sys.executable, "-m", "bench", "lb", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=85,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "TTFT p99 ms" in done.stdout
        assert "least-loaded x2 routers, 2 rounds" in done.stdout

        results = json.loads(out.read_text())
        assert {"cpu_count", "python", "platform"} <= set(results["machine"])
        assert set(results["results"]) == {"80%", "80%-1-router", "80%-2-routers"}
        assert set(results["results"]["80%"]) == {"least-loaded", "oracle"}
        assert set(results["results"]["80%-2-routers"]) == {"least-loaded"}
        # Two interleaved rounds per side, pooled: the first one-router round is the main run.
        assert set(results["replica_rounds"]) == {
            "80%-1-router#2",
            "80%-2-routers#1",
            "80%-2-routers#2",
        }
        pooled = {"80%-1-router", "80%-2-routers"}
        for key, by_policy in results["results"].items():
            for policy, figures in by_policy.items():
                assert set(figures) >= FIGURES, policy
                assert figures["errors"] == 0, figures
                n = 48 if key in pooled else 24
                assert figures["requests"] == figures["completed"] == n
                assert 0 < figures["ttft_p50_ms"] <= figures["ttft_p99_ms"]
                assert figures["ttft_p50_ms"] <= figures["e2e_p50_ms"] <= figures["e2e_p99_ms"]
                assert figures["throughput_rps"] > 0
                # Every request was answered by one of the four workers, named in its summary.
                assert sum(figures["completed_per_worker"].values()) == n
                assert len(figures["completed_per_worker"]) <= 4
        settings = results["settings"]
        assert settings["sim_speed_factors"] == [2.0, 2.0, 1.0, 0.5]
        assert settings["capacity_model"]["fleet_rps"] > 0
        targets = results["targets"]
        assert targets["least_loaded_3x_better_than_round_robin"]["pass"] is None  # not run
        assert isinstance(targets["least_loaded_within_15pct_of_oracle"]["pass"], bool)
        assert out.with_suffix(".png").exists() or "matplotlib is not installed" in done.stdout

    def test_bad_option_is_a_usage_error(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "bench", "lb", "--loads", "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2
        assert "--loads" in done.stderr


class TestTrace:
    """The trace is seeded: every policy and load level replays the same requests."""

    def test_same_seed_same_trace(self) -> None:
        assert lb.make_trace(7, 200) == lb.make_trace(7, 200)
        assert lb.make_trace(7, 200) != lb.make_trace(8, 200)

    def test_lengths_are_clipped_and_heavy_tailed(self) -> None:
        trace = lb.make_trace(1, 5000)
        outputs = sorted(t.output_tokens for t in trace)
        prompts = [t.prompt_tokens for t in trace]
        assert min(outputs) >= 4
        assert max(outputs) <= 512
        assert min(prompts) >= 16
        assert max(prompts) <= 4096
        median = outputs[len(outputs) // 2]
        assert 20 <= median <= 28
        assert outputs[int(len(outputs) * 0.99)] > 4 * median  # a heavy tail

    def test_arrivals_are_poisson_at_unit_rate(self) -> None:
        trace = lb.make_trace(3, 5000)
        gaps = [b.unit_at - a.unit_at for a, b in itertools.pairwise(trace)]
        assert all(g > 0 for g in gaps)
        assert trace[-1].unit_at / len(trace) == pytest.approx(1.0, rel=0.05)

    def test_duration_takes_a_prefix_of_the_same_trace(self) -> None:
        options = lb.Options(duration_s=10.0)
        low = lb.trace_for(options, 0.5, 20.0)
        high = lb.trace_for(options, 0.95, 20.0)
        assert high[: len(low)] == low
        assert len(low) == pytest.approx(100, rel=0.3)

    def test_prompt_has_the_requested_token_count(self) -> None:
        for tokens in (16, 200, 4096):
            assert math.ceil(len(lb.prompt_text("lb-x-1", tokens)) / 4) == tokens


class TestCapacityModel:
    """The fleet's capacity follows the sim's timing model and each worker's speed."""

    def test_capacity_scales_with_speed_and_slots(self) -> None:
        model = lb.capacity_model(lb.Options(), samples=20_000)
        fast, _, half, quarter = model.worker_rps
        assert half == pytest.approx(fast / 2)
        assert quarter == pytest.approx(fast / 4)
        step = 0.007 + 16e-6 * 3
        expected = model.mean_output_tokens * step / 4 + model.mean_prompt_tokens * 15.1e-6
        assert model.request_s_at_speed_1 == pytest.approx(expected)
        doubled = lb.capacity_model(lb.Options(time_scale=2.0), samples=20_000)
        assert doubled.fleet_rps == pytest.approx(2 * model.fleet_rps)


def fake_result(policy: str, p99_ms: float, routers: int = 1) -> lb.RunResult:
    result = lb.RunResult(policy, 0.8, routers, 100, 10.0, elapsed_s=10.0)
    result.samples = [lb.Sample(p99_ms / 1000, 1.0, "w0") for _ in range(100)]
    return result


class TestTargets:
    """The targets pass or fail on the measured p99 TTFT, and say when they were not run."""

    def make_run(self, ll: float, oracle: float, rr: float, replicas: float) -> lb.Run:
        run = lb.Run(lb.Options(), lb.capacity_model(lb.Options(), samples=1000))
        run.results["80%"] = {
            "least-loaded": fake_result("least-loaded", ll),
            "oracle": fake_result("oracle", oracle),
            "round-robin": fake_result("round-robin", rr),
        }
        run.results["80%-3-routers"] = {"least-loaded": fake_result("least-loaded", replicas, 3)}
        return run

    def test_all_pass(self) -> None:
        t = lb.targets(self.make_run(ll=110, oracle=100, rr=400, replicas=120))
        assert t["least_loaded_within_15pct_of_oracle"]["pass"] is True
        assert t["least_loaded_3x_better_than_round_robin"]["pass"] is True
        assert t["three_routers_within_20pct_of_one"]["pass"] is True

    def test_each_can_fail(self) -> None:
        t = lb.targets(self.make_run(ll=120, oracle=100, rr=300, replicas=150))
        assert t["least_loaded_within_15pct_of_oracle"]["pass"] is False
        assert t["least_loaded_3x_better_than_round_robin"]["pass"] is False
        assert t["three_routers_within_20pct_of_one"]["pass"] is False
        assert t["least_loaded_within_15pct_of_oracle"]["ratio"] == pytest.approx(1.2)

    def test_replicas_are_compared_with_pooled_one_router_rounds(self) -> None:
        """The replica target compares each side's rounds pooled, not the main table's run."""
        run = self.make_run(ll=100, oracle=100, rr=400, replicas=0)
        del run.results["80%-3-routers"]
        run.results["80%-1-router#2"] = {"least-loaded": fake_result("least-loaded", 200)}
        for r in (1, 2):
            run.results[f"80%-3-routers#{r}"] = {
                "least-loaded": fake_result("least-loaded", 210, 3)
            }
        lb.pool_rounds(run)
        assert set(run.rounds) == {"80%-1-router#2", "80%-3-routers#1", "80%-3-routers#2"}
        one = run.results["80%-1-router"]["least-loaded"]
        assert len(one.samples) == 200
        assert one.requests == 200
        assert len(run.results["80%-3-routers"]["least-loaded"].samples) == 200
        c = lb.targets(run)["three_routers_within_20pct_of_one"]
        # Pooled one-router samples are half at 100 ms and half at 200 ms: p99 is 200 ms.
        assert c["one_router"] == 200.0
        assert c["replicas"] == 210.0
        assert c["rounds"] == 2
        assert c["pass"] is True

    def test_missing_runs_are_not_measured(self) -> None:
        run = lb.Run(lb.Options(), lb.capacity_model(lb.Options(), samples=1000))
        run.results["80%"] = {"oracle": fake_result("oracle", 100)}
        t = lb.targets(run)
        assert all(t[k]["pass"] is None for k in t if isinstance(t[k], dict))
