"""One generated section of a documentation file, between two marker comments: print it, rewrite
it in place (``--write``) or fail when it is stale (``--check``, run by tests/test_docs.py).

Shared by scripts/config_reference.py, scripts/metrics_reference.py and
scripts/proto_reference.py; each names the file its section lives in.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def replace(text: str, new: str, begin: str, end: str) -> str:
    """``text`` with what lies between ``begin`` and ``end`` (both included) replaced by ``new``."""
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + new + text[stop:]


def main(
    *, what: str, script: str, target: Path, generate: Callable[[], str], begin: str, end: str
) -> int:
    """The command line of a section generator; ``generate`` returns the section, markers
    included, and ``target`` is the file that holds it."""
    name = target.relative_to(ROOT).as_posix() if target.is_relative_to(ROOT) else str(target)
    parser = argparse.ArgumentParser(description=f"generate the {what} in {name}")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help=f"update {name} in place")
    group.add_argument("--check", action="store_true", help=f"fail if {name} is stale")
    args = parser.parse_args()
    new = generate()
    if not (args.write or args.check):
        print(new)
        return 0
    text = target.read_text()
    if begin not in text or end not in text:
        print(f"{name} has no {what} markers ({begin} ... {end})", file=sys.stderr)
        return 1
    updated = replace(text, new, begin, end)
    if args.check:
        if updated != text:
            print(f"{name}: the {what} is stale; run `python {script} --write`", file=sys.stderr)
            return 1
        return 0
    target.write_text(updated)
    return 0
