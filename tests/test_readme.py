"""The README stays true: its commands are the ones CI runs, and its links lead somewhere."""

from __future__ import annotations

import re

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

    def test_links_lead_to_files_that_exist(self) -> None:
        """Every relative link (into docs/ and elsewhere) names a file of the repository."""
        text = (ROOT / "README.md").read_text()
        targets = [
            target.split("#", 1)[0]
            for target in re.findall(r"\]\(([^)\s]+)\)", text)
            if not target.startswith(("http://", "https://", "#"))
        ]
        assert len(targets) > 10, targets
        missing = sorted({target for target in targets if not (ROOT / target).is_file()})
        assert not missing, missing
