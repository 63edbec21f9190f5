"""``python -m bench.lb``: the benchmark, as ``python -m bench lb`` runs it."""

import sys

from bench.lb._cli import main

raise SystemExit(main(sys.argv[1:]))
