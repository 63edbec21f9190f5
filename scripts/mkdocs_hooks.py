"""MkDocs hooks (``hooks:`` in mkdocs.yml): the site shows the benchmarks' own output.

A benchmark writes its plot next to its results (``bench/results/``); the benchmark pages show
that file, served as ``benchmarks/img/<name>``, so a re-run needs no copy into ``docs/``.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
#: The plots the benchmark pages show, by their name in bench/results/.
PLOTS = ("lb.png",)


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add each benchmark plot to the site as ``benchmarks/img/<name>``."""
    for name in PLOTS:
        path = RESULTS / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run `python -m bench lb` to draw it")
        files.append(File.generated(config, f"benchmarks/img/{name}", abs_src_path=str(path)))
    return files
