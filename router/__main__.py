"""``python -m router [flags]``: run the router until SIGTERM or SIGINT."""

from llmmesh.server import run_service
from router import RouterApp, load_config


def main() -> None:
    """Load the configuration, serve, exit with the service's status."""
    config = load_config()
    raise SystemExit(run_service(RouterApp(config), config, name="router"))


if __name__ == "__main__":
    main()
