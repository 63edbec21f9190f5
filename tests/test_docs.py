"""The documentation site stays true: its generated references match the code and the protos,
every page is in the nav, and the pages that restate a file of deploy/ say what that file says.

``scripts/test`` also builds the site with ``mkdocs build --strict``, which fails on a broken
link or anchor and on a page missing from the nav.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import ROOT

DOCS = ROOT / "docs"
GENERATORS = [
    "scripts/config_reference.py",
    "scripts/metrics_reference.py",
    "scripts/proto_reference.py",
]


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def nav_pages(nav: list[Any]) -> list[str]:
    """The page paths of a mkdocs nav, in order."""
    pages: list[str] = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            pages += nav_pages(value)
        else:
            pages.append(str(value))
    return pages


class TestGeneratedReferences:
    """The configuration, metrics and API references are generated, and fresh."""

    @pytest.mark.parametrize("script", GENERATORS)
    def test_is_fresh(self, script: str) -> None:
        """``--check`` regenerates the section and finds it equal to the committed one."""
        result = run_script(script, "--check")
        assert result.returncode == 0, result.stderr

    def test_check_fails_on_a_stale_section(self, tmp_path: Path) -> None:
        """The shared section writer's ``--check`` exits 1 and names the command that fixes it;
        ``--write`` then makes it pass."""
        target = tmp_path / "page.md"
        target.write_text("# Page\n\n<!-- B -->\nold\n<!-- E -->\n\nafter\n")
        program = textwrap.dedent(
            f"""
            import sys
            from pathlib import Path
            sys.path.insert(0, {str(ROOT / "scripts")!r})
            import _generated_section
            raise SystemExit(_generated_section.main(
                what="test section", script="gen.py", target=Path({str(target)!r}),
                generate=lambda: "<!-- B -->\\nnew\\n<!-- E -->", begin="<!-- B -->",
                end="<!-- E -->",
            ))
            """
        )
        stale = run_script("-c", program, "--check")
        assert stale.returncode == 1
        assert "python gen.py --write" in stale.stderr
        assert run_script("-c", program, "--write").returncode == 0
        assert target.read_text() == "# Page\n\n<!-- B -->\nnew\n<!-- E -->\n\nafter\n"
        assert run_script("-c", program, "--check").returncode == 0

    def test_api_reference_covers_every_service_and_message(self) -> None:
        """Each service, RPC and message of protos/ has its entry, with its comment."""
        page = (DOCS / "reference" / "api.md").read_text()
        for anchor in ["llmmesh.v1.Router", "llmmesh.v1.Worker", "llmmesh.v1.Cache"]:
            assert f"{{ #{anchor} }}" in page, anchor
        for rpc in ["Generate", "GenerateStream", "ListWorkers", "WatchLoad", "Lookup", "Stats"]:
            assert f"| `{rpc}` |" in page, rpc
        assert "| `max_tokens` | 1 | optional `int32` | Maximum number of tokens" in page
        assert "| `CACHE_POLICY_ONLY_IF_CACHED` | 3 |" in page


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """mkdocs.yml."""
    data = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert isinstance(data, dict)
    return data


class TestSite:
    """mkdocs.yml and docs/."""

    def test_every_page_is_in_the_nav_and_every_nav_entry_exists(
        self, config: dict[str, Any]
    ) -> None:
        pages = nav_pages(config["nav"])
        on_disk = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
        assert sorted(pages) == on_disk
        assert len(pages) == len(set(pages))

    def test_theme_has_search_dark_mode_and_code_copy(self, config: dict[str, Any]) -> None:
        theme = config["theme"]
        assert theme["name"] == "material"
        assert "content.code.copy" in theme["features"]
        assert {palette["scheme"] for palette in theme["palette"]} == {"default", "slate"}
        assert "search" in config["plugins"]

    def test_the_build_is_strict_about_links_and_anchors(self, config: dict[str, Any]) -> None:
        assert config["strict"] is True
        assert set(config["validation"].values()) == {"warn"}
        assert {"omitted_files", "not_found", "anchors"} <= set(config["validation"])

    def test_the_benchmark_plot_is_served_from_bench_results(self, tmp_path: Path) -> None:
        """The load-balancing page shows the plot the benchmark last wrote, not a copy."""
        assert "](img/lb.png)" in (DOCS / "benchmarks" / "lb.md").read_text()
        assert not (DOCS / "benchmarks" / "img").exists()
        site = tmp_path / "site"
        mkdocs = Path(sys.executable).parent / "mkdocs"
        built = subprocess.run(
            [str(mkdocs), "build", "--strict", "--quiet", "--site-dir", str(site)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        )
        assert built.returncode == 0, built.stderr
        served = site / "benchmarks" / "img" / "lb.png"
        assert served.read_bytes() == (ROOT / "bench" / "results" / "lb.png").read_bytes()

    def test_every_alert_rule_is_documented(self) -> None:
        """The alerts page lists exactly the rules of deploy/prometheus/alerts.yml."""
        rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
        alerts = [rule["alert"] for group in rules["groups"] for rule in group["rules"]]
        page = (DOCS / "operating" / "monitoring.md").read_text()
        documented = [line.split("`")[1] for line in page.splitlines() if line.startswith("| `")]
        assert documented == alerts
