"""``python -m worker [flags]``: run a worker until SIGTERM or SIGINT."""

from __future__ import annotations

from collections.abc import Sequence

from llmmesh.server import run_service
from worker._config import load_config
from worker._service import WorkerApp


def main(argv: Sequence[str] | None = None) -> int:
    """Load the configuration, serve, and return the exit code."""
    config = load_config(argv)
    return run_service(WorkerApp(config), config, name="worker")


if __name__ == "__main__":
    raise SystemExit(main())
