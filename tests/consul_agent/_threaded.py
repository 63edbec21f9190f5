"""A :class:`~tests.consul_agent.ConsulAgent` on its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from tests.consul_agent._agent import ConsulAgent

T = TypeVar("T")


class ThreadedConsulAgent:
    """A :class:`ConsulAgent` on its own event loop in a thread, driven with plain calls.

    For tests that block their own loop while service processes talk to Consul, as
    ``ServiceProcess.start()`` and ``.stop()`` do (a worker registers before it is ready and
    deregisters as it stops): an agent in the test's loop could not answer meanwhile. Use it as
    ``with ThreadedConsulAgent(**ConsulAgent_kwargs) as consul_agent:``; every method waits for
    the agent's loop to carry it out.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._agent: ConsulAgent | None = None

    @property
    def agent(self) -> ConsulAgent:
        """The agent itself: only touch it from its own loop (see :meth:`call`)."""
        if self._agent is None:
            raise RuntimeError("ThreadedConsulAgent not started")
        return self._agent

    def start(self) -> ThreadedConsulAgent:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="consul-agent", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread

        async def make() -> ConsulAgent:
            agent = ConsulAgent(**self._kwargs)
            await agent.start()
            return agent

        self._agent = self.call(make())
        return self

    def stop(self) -> None:
        """Stop the agent, its loop and its thread. Idempotent."""
        loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        try:
            if self._agent is not None:
                asyncio.run_coroutine_threadsafe(self._agent.stop(), loop).result(30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()

    def __enter__(self) -> ThreadedConsulAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run ``coro`` on the agent's loop and return its result."""
        if self._loop is None:
            coro.close()
            raise RuntimeError("ThreadedConsulAgent not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _read(self, read: Callable[[], T]) -> T:
        async def run() -> T:
            return read()

        return self.call(run())

    @property
    def port(self) -> int:
        return self.agent.port

    @property
    def address(self) -> str:
        return self.agent.address

    @property
    def index(self) -> int:
        return self._read(lambda: self.agent.index)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """A copy of the requests received so far."""
        return self._read(lambda: list(self.agent.requests))

    def services(self) -> dict[str, dict[str, Any]]:
        return self._read(self.agent.services)

    def checks(self) -> dict[str, dict[str, Any]]:
        return self._read(self.agent.checks)

    def go_down(self) -> None:
        self.call(self.agent.go_down())

    def come_back(self) -> None:
        self.call(self.agent.come_back())

    def restart(self, *, forget: bool = True, reset_index: bool = False) -> None:
        self.call(self.agent.restart(forget=forget, reset_index=reset_index))
