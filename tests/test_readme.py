"""The README stays true: its commands are the ones CI runs, its reference matches the code."""

from __future__ import annotations

import subprocess
import sys

from tests.harness import ROOT


class TestReadme:
    """README.md."""

    def test_opens_with_the_two_setup_commands(self) -> None:
        """The first code block holds exactly the run command and the test command."""
        text = (ROOT / "README.md").read_text()
        block = text.split("```bash\n", 1)[1].split("```", 1)[0]
        commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
        assert commands == [
            './scripts/install && .venv/bin/llm-mesh up --try "What is a KV cache?"',
            "./scripts/test",
        ]

    def test_ci_runs_the_readme_test_command(self) -> None:
        """.ci/run executes ./scripts/test as written in the README."""
        ci = (ROOT / ".ci" / "run").read_text()
        assert "./scripts/test" in ci

    def test_config_reference_is_fresh(self) -> None:
        """The configuration tables were generated from the current config dataclasses."""
        result = subprocess.run(
            [sys.executable, "scripts/config_reference.py", "--check"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr

    def test_metrics_reference_is_fresh(self) -> None:
        """The metrics list was generated from the services' current metric modules."""
        result = subprocess.run(
            [sys.executable, "scripts/metrics_reference.py", "--check"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
