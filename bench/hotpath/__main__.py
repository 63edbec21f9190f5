"""``python -m bench.hotpath``: the benchmark's own processes (the proxy, ``--serve-proxy``) and,
without that option, the benchmark as ``python -m bench hotpath`` runs it."""

import sys

from bench.hotpath._cli import main

raise SystemExit(main(sys.argv[1:]))
