"""The one interface between the worker service and an inference engine.

The service depends only on :class:`Engine`; each backend (the simulator now; TensorRT-LLM,
Triton and Hugging Face later) implements it and translates its own failures into
:class:`EngineError`, which the service turns into a gRPC status in one place.

A request's life in an engine::

    generate(request) ──▶ TextDelta, TextDelta, ... ──▶ Completion   (exactly one, always last)
                              │
    abort(request_id) ────────┘  frees the batch slot and KV blocks at once; the stream then
                                 ends with Completion(finish_reason="cancelled")

A request may carry a ``continuation`` (text already produced for it, by this engine or another
worker's): the engine then reads the prompt followed by it and streams only what comes after.

Times are ``time.monotonic()`` seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from llmmesh.validation import Sampling

FinishReason = Literal["stop", "length", "cancelled", "timeout"]


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set; False when ``timeout`` seconds pass first.

    ``asyncio.timeout`` rather than ``wait_for``: on Python 3.11 ``wait_for`` can swallow a
    cancellation that arrives as its timeout fires, and these waits are cancelled at shutdown.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


class EngineError(Exception):
    """The engine failed (crashed, stopped, unreachable); the request did not complete.

    A request the engine failed or refused on its own, while it serves others, raises
    :class:`llmmesh.errors.RequestFailed` instead: that request's error, not the worker's.
    """


class Outbox:
    """What an engine has produced for one request and its ``generate`` stream has not yet read.

    The engine appends text to ``pending`` and sets ``wake``; it ends the request by setting
    ``done`` (a :class:`Completion`) or ``error``, then ``wake``. :meth:`stream` hands it all to
    the caller, coalescing text that piled up between two reads into one delta.
    """

    __slots__ = ("done", "error", "pending", "wake")

    def __init__(self) -> None:
        self.pending: list[str] = []
        self.done: Completion | None = None
        self.error: EngineError | None = None
        self.wake = asyncio.Event()

    @property
    def finished(self) -> bool:
        """True once the request has a completion or an error."""
        return self.done is not None or self.error is not None

    async def stream(self) -> AsyncGenerator[TextDelta | Completion, None]:
        """Text deltas as they arrive, then the completion (or the error, raised)."""
        while True:
            if not self.pending and not self.finished:
                self.wake.clear()
                await self.wake.wait()
            if self.pending:
                text = "".join(self.pending)
                self.pending.clear()
                yield TextDelta(text)
            elif self.error is not None:
                raise self.error
            elif self.done is not None:
                yield self.done
                return


@dataclass(frozen=True, kw_only=True)
class EngineRequest:
    """One generation, as the worker hands it to its engine."""

    #: Unique among the engine's live requests; :meth:`Engine.abort` takes it.
    request_id: str
    #: The prompt text (chat messages already rendered with the chat template, ending with its
    #: generation prompt).
    prompt: str
    #: Sampling parameters with every default filled in (``max_tokens`` counts new tokens only).
    sampling: Sampling
    #: ``time.monotonic()`` after which the engine ends the request with finish "timeout".
    deadline: float | None = None
    #: Text already produced for this request (``GenerateRequest.continuation``): the start of
    #: the answer. The engine reads :attr:`input_text`, generates what follows the continuation
    #: and streams only that; its prompt tokens include the continuation's.
    continuation: str = ""

    @property
    def input_text(self) -> str:
        """What the model reads: the prompt followed by the continuation."""
        return self.prompt + self.continuation


@dataclass(frozen=True, slots=True)
class TextDelta:
    """Text generated since the previous delta (never empty)."""

    text: str


@dataclass(frozen=True, kw_only=True, slots=True)
class Completion:
    """The end of a generation: always the last item of :meth:`Engine.generate`."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    #: Seconds the request waited in the engine's queue before it was scheduled.
    queue_s: float


@dataclass(frozen=True, kw_only=True)
class LoadSnapshot:
    """The engine's load now, shaped after TensorRT-LLM's iteration statistics."""

    #: Requests scheduled in the running batch.
    active: int
    #: Requests submitted and waiting for a batch slot or KV blocks.
    queued: int
    #: Most requests the engine runs at once (max batch size).
    capacity: int
    #: Fraction of KV cache blocks in use, in [0, 1].
    kv_cache_used_fraction: float
    #: False once the engine has failed or stopped.
    healthy: bool


@dataclass(frozen=True, kw_only=True)
class EngineInfo:
    """What an engine serves."""

    engine: str
    model: str
    model_version: str
    capacity: int
    max_prompt_tokens: int


class Engine(Protocol):
    """An inference engine with continuous batching, as the worker service drives it.

    Implementations are used from one asyncio event loop and must keep ``generate`` cheap per
    token: hundreds of concurrent streams are normal.
    """

    async def start(self) -> None:
        """Load the model / connect; after this, :meth:`generate` accepts requests."""

    async def stop(self) -> None:
        """Finish every live request with "cancelled" and release the engine. Idempotent."""

    def generate(self, request: EngineRequest) -> AsyncGenerator[TextDelta | Completion, None]:
        """Submit ``request`` and stream its text, ending with exactly one :class:`Completion`.

        Raises :class:`EngineError` (while iterating) when the engine cannot serve it, and
        :class:`~llmmesh.errors.RequestFailed` when it failed this request alone. Closing
        the generator early (``aclose()``) aborts the request, as :meth:`abort` does.
        """
        ...

    async def abort(self, request_id: str) -> None:
        """Abort a queued or running request at once, freeing its slot and KV cache.

        Its stream then ends with finish "cancelled". Unknown or finished ids are ignored.
        """

    def count_tokens(self, text: str) -> int:
        """How many prompt tokens ``text`` is, for the worker's prompt length limit."""
        ...

    def load(self) -> LoadSnapshot:
        """The load now (cheap: called on every report and admission)."""
        ...

    async def wait_load_change(self, timeout: float) -> bool:
        """Wait until active or queued counts change; False when ``timeout`` passed first."""
        ...

    def info(self) -> EngineInfo:
        """What the engine serves."""
        ...


LiveT = TypeVar("LiveT", bound=Outbox)


class OutboxEngine(Generic[LiveT]):
    """``generate`` and ``abort`` for an engine that keeps each live request in an
    :class:`Outbox`: the engine provides ``_live`` (live requests by id), ``_submit`` (admit a
    request, returning its outbox) and ``_finish`` (end one with a finish reason)."""

    _live: dict[str, LiveT]

    def _submit(self, request: EngineRequest) -> LiveT:
        raise NotImplementedError

    def _finish(self, live: LiveT, reason: FinishReason) -> None:
        raise NotImplementedError

    async def generate(
        self, request: EngineRequest
    ) -> AsyncGenerator[TextDelta | Completion, None]:
        """Submit ``request`` and stream its outbox; closing the stream early aborts it."""
        live = self._submit(request)
        try:
            async for item in live.stream():
                yield item
        finally:
            if not live.finished:
                self._finish(live, "cancelled")

    async def abort(self, request_id: str) -> None:
        """End a live request with "cancelled" (unknown or finished ids are ignored)."""
        live = self._live.get(request_id)
        if live is not None:
            self._finish(live, "cancelled")
