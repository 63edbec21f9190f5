"""``python -m bench.chaos``: the benchmark, as ``python -m bench chaos`` runs it."""

import sys

from bench.chaos._cli import main

raise SystemExit(main(sys.argv[1:]))
