"""The benchmarks run end to end with tiny settings and write results of the documented shape."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _common
from bench.__main__ import COMMANDS
from bench.__main__ import main as bench_main

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
FIGURES = {"ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "output_tokens_per_s"}


class TestEngineBenchmark:
    """``python -m bench engine`` drives both parts and writes per-concurrency figures."""

    def test_smoke_run_writes_results(self, tmp_path: Path) -> None:
        out = tmp_path / "engine.json"
        argv = ["--concurrency", "1,3", "--duration", "0.2", "--output-tokens", "6"]
        argv += ["--speed-factor", "5", "--no-progress", "--out", str(out)]
        done = subprocess.run(
            [sys.executable, "-m", "bench", "engine", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=50,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "TTFT p50 ms" in done.stdout
        assert "worker over gRPC" in done.stdout
        assert "28,312" in done.stdout  # the published figures are printed beside ours

        results = json.loads(out.read_text())
        assert {"cpu_count", "python", "platform"} <= set(results["machine"])
        assert set(results["parts"]) == {"engine", "worker"}
        for part, levels in results["parts"].items():
            assert [level["streams"] for level in levels] == [1, 3], part
            for level in levels:
                assert set(level) >= FIGURES, part
                assert level["errors"] == 0
                assert level["requests"] >= level["streams"]
                assert level["output_tokens"] == 6 * level["requests"]
                assert all(isinstance(level[key], float) for key in FIGURES)
                assert level["output_tokens_per_s"] > 0
                assert level["tpot_p50_ms"] <= level["tpot_p99_ms"]
        # In-process, the simulated clock gives the model's own figures: 7 ms / 5 per token.
        model = results["parts"]["engine"][0]["model"]
        assert model["tpot_p50_ms"] == pytest.approx(1.4, rel=0.01)
        assert {row["figure"] for row in results["calibration"]} >= {
            "batch-1 TTFT, 128 prompt tokens (ms)",
            "batch-1 TTFT, 2048 prompt tokens (ms)",
        }

    def test_bad_option_is_a_usage_error(self) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "bench", "engine", "--concurrency", "0"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2
        assert "--concurrency" in done.stderr


class TestDispatcher:
    """``python -m bench`` lists its commands and refuses unknown ones."""

    def test_help_lists_every_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert bench_main(["--help"]) == 0
        printed = capsys.readouterr().out
        assert all(name in printed for name in COMMANDS)

    def test_unknown_command(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert bench_main(["no-such-bench"]) == 2
        assert "unknown command" in capsys.readouterr().err

    def test_no_command_is_a_usage_error(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert bench_main([]) == 2
        assert "usage" in capsys.readouterr().err


class TestCommon:
    """The shared helpers: percentiles and tables."""

    def test_percentile_interpolates_between_ranks(self) -> None:
        assert _common.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
        assert _common.percentile([5.0], 99) == 5.0
        assert _common.percentile(list(map(float, range(101))), 99) == 99.0

    def test_percentile_of_nothing_is_nan(self) -> None:
        assert _common.percentile([], 50) != _common.percentile([], 50)

    def test_table_aligns_columns(self) -> None:
        table = _common.format_table(["name", "value"], [["a", "1"], ["long name", "12345"]])
        lines = table.splitlines()
        assert len({len(line) for line in lines}) == 1
        assert lines[-1].endswith("12345")
