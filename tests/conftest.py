"""Fixtures shared by the whole suite: a real Redis and service processes on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import RedisServer


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server on a free loopback port, stopped after the test."""
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.close()
