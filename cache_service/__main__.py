"""``python -m cache_service [flags]``: run the cache service until SIGTERM or SIGINT."""

from __future__ import annotations

from collections.abc import Sequence

from cache_service._config import load_config
from cache_service._service import CacheApp
from llmmesh.server import run_service


def main(argv: Sequence[str] | None = None) -> int:
    """Serve with the configuration from ``argv`` and the environment; return the exit code."""
    config = load_config(argv)
    return run_service(CacheApp(config), config, name="cache_service")


if __name__ == "__main__":
    raise SystemExit(main())
