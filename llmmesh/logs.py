"""Structured JSON logging through structlog, configured once per process.

Every line is one JSON object with ``timestamp``, ``level``, ``event``, ``service`` and whatever
context is bound. Servicers bind ``request_id`` with :func:`bind_request` for the duration of an
RPC, so every line logged while handling a request carries it (``merge_contextvars`` comes first in
the processor chain). Standard-library logging (grpc, redis, asyncio) is routed through the same
renderer.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(service: str, level: str = "info", *, json: bool = True) -> None:
    """Configure structlog and the standard library for this process (call once, at start)."""
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(service=service)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


@contextlib.contextmanager
def bind_request(**context: Any) -> Iterator[None]:
    """Bind context (e.g. ``request_id``) to every log line until the block exits."""
    tokens = structlog.contextvars.bind_contextvars(**context)
    try:
        yield
    finally:
        try:
            structlog.contextvars.reset_contextvars(**tokens)
        except ValueError:
            # grpc.aio closes an abandoned streaming handler (an async generator paused at a
            # yield) from another task, whose context did not create the tokens. Each RPC runs in
            # its own task and context, so unbinding there is all that is left to do.
            structlog.contextvars.unbind_contextvars(*context)


def get_logger(name: str) -> Any:
    """A structlog logger named after its module."""
    return structlog.get_logger(logger=name)
