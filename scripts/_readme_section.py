"""One generated section of README.md, between two marker comments: print it, rewrite it in
place (``--write``) or fail when it is stale (``--check``, run by tests/test_readme.py).

Shared by scripts/config_reference.py and scripts/metrics_reference.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def replace(text: str, new: str, begin: str, end: str) -> str:
    """``text`` with what lies between ``begin`` and ``end`` (both included) replaced by ``new``."""
    start, stop = text.index(begin), text.index(end) + len(end)
    return text[:start] + new + text[stop:]


def main(*, what: str, script: str, generate: Callable[[], str], begin: str, end: str) -> int:
    """The command line of a section generator; ``generate`` returns the section, markers
    included."""
    parser = argparse.ArgumentParser(description=f"generate the README's {what}")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", action="store_true", help="update README.md in place")
    group.add_argument("--check", action="store_true", help="fail if README.md is stale")
    args = parser.parse_args()
    new = generate()
    if not (args.write or args.check):
        print(new)
        return 0
    text = README.read_text()
    updated = replace(text, new, begin, end)
    if args.check:
        if updated != text:
            print(f"README.md's {what} is stale; run `python {script} --write`", file=sys.stderr)
            return 1
        return 0
    README.write_text(updated)
    return 0
