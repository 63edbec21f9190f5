"""``python -m bench chaos``: each fault's figures pool the load's outcomes by when they failed,
the targets are judged on them, the report says which faults were not run, and a tiny run of one
fault against the real mesh writes results of the documented shape."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import chaos
from bench.chaos._options import Options

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent


def outcome(
    started: float,
    *,
    ttft_s: float | None = 0.1,
    ended_s: float = 0.5,
    code: str = "OK",
    stream: bool = True,
) -> chaos.Outcome:
    first = None if ttft_s is None else started + ttft_s
    return chaos.Outcome(
        started=started,
        stream=stream,
        cacheable=False,
        tenant="acme",
        first_token=first,
        ended=started + ended_s,
        code=code,
    )


def fault_run(
    outcomes: list[chaos.Outcome], name: str = "worker-sigkill", **marks: Any
) -> chaos.FaultRun:
    defaults: dict[str, Any] = {"injected": 10.0, "undone": 12.0, "whole": 13.0}
    load = chaos.Load(outcomes=outcomes, started=0.0, ended=20.0)
    return chaos.FaultRun(name=name, marks=chaos.Marks(**(defaults | marks)), load=load)


class TestSummarize:
    """A fault's figures: failures by first token, a killed router's apart, TTFT windows."""

    def test_failures_are_split_by_first_token(self) -> None:
        figures = chaos.summarize(
            fault_run(
                [
                    outcome(1.0),
                    outcome(10.5, ttft_s=None, code="UNAVAILABLE"),
                    outcome(10.6, code="UNAVAILABLE"),
                    outcome(10.7, code="INTERNAL", stream=False, ttft_s=None),
                ]
            )
        )
        assert figures["requests"] == 4
        assert figures["failed_before_first_token"] == 2
        assert figures["failed_after_first_token"] == 1
        assert figures["failed_streams_after_first_token"] == 1
        assert figures["failure_codes"] == {"UNAVAILABLE": 2, "INTERNAL": 1}
        assert figures["failed_in_flight_on_killed_router"] == 0

    def test_ttft_baseline_is_before_the_fault_and_during_until_whole(self) -> None:
        outcomes = [outcome(float(t), ttft_s=0.1) for t in range(10)]
        outcomes += [outcome(11.0, ttft_s=0.9), outcome(12.5, ttft_s=0.5)]
        outcomes += [outcome(15.0, ttft_s=5.0)]  # after the fleet was whole: neither window
        figures = chaos.summarize(fault_run(outcomes))
        assert figures["baseline_requests"] == 10
        assert figures["during_requests"] == 2
        assert figures["p99_ttft_baseline_ms"] == pytest.approx(100.0)
        assert 500 < figures["p99_ttft_during_ms"] <= 900
        assert figures["fault_s"] == 2.0
        assert figures["whole_again_s"] == 1.0

    def test_never_whole_is_none(self) -> None:
        figures = chaos.summarize(fault_run([outcome(1.0)], whole=None))
        assert figures["whole_again_s"] is None

    def test_killed_routers_in_flight_failures_are_counted_apart(self) -> None:
        outcomes = [
            outcome(9.8, code="UNAVAILABLE"),  # in flight at the kill
            outcome(10.01, ttft_s=None, code="UNAVAILABLE"),  # sent before the router exited
            outcome(11.0, ttft_s=None, code="UNAVAILABLE"),  # sent after: a failure
            outcome(9.9),  # in flight, but it succeeded (on the other router)
        ]
        figures = chaos.summarize(fault_run(outcomes, "router-sigkill", router_died=10.05))
        assert figures["failed_in_flight_on_killed_router"] == 2
        assert figures["failed_before_first_token"] == 1
        assert figures["failed_after_first_token"] == 0


def figures(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "failed_before_first_token": 0,
        "failed_after_first_token": 0,
        "p99_ttft_baseline_ms": 100.0,
        "p99_ttft_during_ms": 250.0,
        "out_of_rotation_s": 0.5,
    }
    return base | overrides


class TestTargets:
    """Issue 12's targets, as limits not to be weakened."""

    def test_all_pass(self) -> None:
        judged = chaos.targets("worker-sigkill", figures())
        assert {name: t["pass"] for name, t in judged.items()} == {
            "zero_failed_requests": True,
            "p99_ttft_within_3x_baseline": True,
            "out_of_rotation_within_2s": True,
        }
        assert chaos.overall({"worker-sigkill": judged}) is True

    def test_one_failure_after_first_token_fails(self) -> None:
        judged = chaos.targets("worker-sigkill", figures(failed_after_first_token=1))
        assert judged["zero_failed_requests"] == {"failed": 1, "pass": False}
        assert chaos.overall({"worker-sigkill": judged}) is False

    def test_ttft_over_3x_fails(self) -> None:
        judged = chaos.targets("redis-stop", figures(p99_ttft_during_ms=301.0))
        assert judged["p99_ttft_within_3x_baseline"]["pass"] is False
        assert "out_of_rotation_within_2s" not in judged

    def test_rotation_over_2s_or_never_fails(self) -> None:
        for seconds in (2.5, None):
            judged = chaos.targets("worker-sigstop", figures(out_of_rotation_s=seconds))
            assert judged["out_of_rotation_within_2s"]["pass"] is False

    def test_no_baseline_is_not_measured(self) -> None:
        judged = chaos.targets("cache-sigkill", figures(p99_ttft_baseline_ms=None))
        assert judged["p99_ttft_within_3x_baseline"]["pass"] is None
        assert chaos.overall({"cache-sigkill": judged}) is None


class TestReport:
    """The table and the list of faults not run never pretend."""

    def test_not_run_names_every_unbuilt_and_unchosen_fault(self) -> None:
        run = chaos.Run(options=Options(faults=("worker-sigkill",)))
        run.skipped["worker-sigterm"] = "the fleet was not whole again after worker-sigkill"
        missing = chaos.not_run(run)
        assert set(missing) == (set(chaos.FAULTS) | set(chaos.NOT_BUILT)) - {"worker-sigkill"}
        assert all(missing[n].startswith("not yet built") for n in chaos.NOT_BUILT)
        assert missing["worker-sigterm"].startswith("the fleet was not whole")

    def test_table_shows_verdicts_and_never(self) -> None:
        run = fault_run([outcome(1.0), outcome(10.5, code="UNAVAILABLE")], whole=None)
        figs = chaos.summarize(run)
        table = chaos.table({run.name: {"figures": figs, "targets": chaos.targets(run.name, figs)}})
        header, _rule, row = table.splitlines()
        assert header.startswith("fault")
        assert "whole again s" in header
        assert row.startswith("worker-sigkill")
        assert "never" in row
        assert "FAIL: zero_failed_requests" in row


class TestOptions:
    """The command line."""

    def test_quick_runs_the_quick_subset(self) -> None:
        options = chaos.parse_args(["--quick"])
        assert options.faults == chaos.QUICK_FAULTS
        assert options.baseline_s == 3.0

    def test_faults_are_chosen_in_order(self) -> None:
        options = chaos.parse_args(["--faults", "redis-stop,worker-sigkill"])
        assert options.faults == ("redis-stop", "worker-sigkill")

    @pytest.mark.parametrize("faults", ["nope", "worker-netem-loss", "redis-stop,redis-stop"])
    def test_bad_faults_are_a_usage_error(self, faults: str) -> None:
        with pytest.raises(SystemExit) as exited:
            chaos.parse_args(["--faults", faults])
        assert exited.value.code == 2

    def test_every_fault_built_has_an_injector(self) -> None:
        assert set(chaos.INJECT) == set(chaos.FAULTS)
        assert not set(chaos.FAULTS) & set(chaos.NOT_BUILT)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_smoke_run_kills_a_worker_and_writes_results(tmp_path: Path) -> None:
    """A tiny run of one fault on the real mesh (about 15 s)."""
    out = tmp_path / "chaos.json"
    argv = ["--quick", "--faults", "worker-sigkill", "--rate", "5", "--baseline", "1.5"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", "chaos", *argv, "--out", str(out), "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "worker-sigkill" in done.stdout
    assert "not yet built" in done.stdout
    data = json.loads(out.read_text())
    assert data["benchmark"] == "chaos"
    assert data["options"]["faults"] == ["worker-sigkill"]
    assert set(data["not_run"]) == (set(chaos.FAULTS) | set(chaos.NOT_BUILT)) - {"worker-sigkill"}
    result = data["faults"]["worker-sigkill"]
    figs = result["figures"]
    assert figs["error"] is None  # injected and undone
    assert figs["requests"] > 0
    assert figs["baseline_requests"] > 0
    assert figs["out_of_rotation_s"] is not None  # the dead worker left both routers' tables
    assert figs["whole_again_s"] is not None  # and its replacement joined them
    assert set(result["targets"]) == {
        "zero_failed_requests",
        "p99_ttft_within_3x_baseline",
        "out_of_rotation_within_2s",
    }
    assert data["targets_pass"] in (True, False, None)
