"""``tensorrt_llm.executor.result``: a request's streamed result and the iteration stats queue.

As upstream:

- A :class:`GenerationResult` is returned at once and is async-iterable; each step yields the
  *same* object, mutated. ``outputs[0]`` is a :class:`CompletionOutput` whose ``text`` and
  ``token_ids`` are cumulative (``text_diff`` / ``token_ids_diff`` are the new part) and whose
  ``finish_reason`` stays ``None`` until the request is done. ``token_ids`` keep the end-of-
  sequence token; ``text`` (detokenized with ``skip_special_tokens``) does not.
- Stop strings are applied while detokenizing: once a stop string appears in ``text``, the text
  is cut before it (unless ``include_stop_str_in_output``), ``finish_reason`` becomes ``"stop"``,
  the request is aborted and the stream ends. Text that began the stop string may already have
  been streamed by then (``text_diff`` of the last step is then empty).
- ``abort()`` asks the executor to cancel; the stream then ends with ``"cancelled"``.
- :class:`IterationResult` is the stats queue: ``async for`` yields one dict per engine
  iteration and stops when no iteration arrives within the timeout; it then stays done until
  the next request is submitted (``mark_undone``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..sampling_params import SamplingParams

if TYPE_CHECKING:
    from .executor import GenerationExecutor

FinishReason = Literal["stop", "length", "timeout", "cancelled"]


@dataclass(slots=True)
class CompletionOutput:
    """The output data of one completion output of a request."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    request_perf_metrics: Any = None

    _last_text_len: int = field(default=0, init=False, repr=False)
    _last_token_ids_len: int = field(default=0, init=False, repr=False)

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len :]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]


@dataclass(frozen=True, slots=True)
class Response:
    """What the executor hands a result: new token ids, and the finish reason on the last one."""

    token_ids: list[int]
    finish_reason: FinishReason | None
    is_final: bool


class GenerationResult:
    """The result of a generation request; await it or iterate it."""

    def __init__(
        self,
        *,
        request_id: int,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        streaming: bool,
        executor: GenerationExecutor,
        tokenizer: Any,
    ) -> None:
        self._request_id = request_id
        self._prompt_token_ids = prompt_token_ids
        self.sampling_params = sampling_params
        self._streaming = streaming
        self._executor = executor
        self.tokenizer = tokenizer
        self._outputs = [CompletionOutput(i) for i in range(sampling_params.best_of or 1)]
        self._done = False
        self._aborted = False
        self.metrics_dict: dict[str, float] = {}
        self._responses: asyncio.Queue[Response | BaseException] = asyncio.Queue()

    @property
    def request_id(self) -> int:
        return self._request_id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt_token_ids

    @property
    def outputs(self) -> list[CompletionOutput]:
        return self._outputs[: self.sampling_params.n]

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Abort the generation request."""
        self._executor.abort_request(self.request_id)
        self._aborted = True

    def aborted(self) -> bool:
        return self._aborted

    # -- what the executor calls ---------------------------------------------------------------

    def _deliver(self, response: Response | BaseException) -> None:
        self._responses.put_nowait(response)

    # -- consuming -----------------------------------------------------------------------------

    async def _aresult_step(self) -> None:
        response = await self._responses.get()
        if isinstance(response, BaseException):
            raise response
        self._handle_response(response)

    def _handle_response(self, response: Response) -> None:
        output = self._outputs[0]
        output._last_token_ids_len = len(output.token_ids)
        output.token_ids.extend(response.token_ids)
        self._done = response.is_final
        if response.finish_reason == "cancelled":
            output.finish_reason = "cancelled"
        elif self._done:
            output.finish_reason = response.finish_reason
        sp = self.sampling_params
        if not (sp.detokenize and self.tokenizer is not None):
            return
        output._last_text_len = len(output.text)
        output.text = self.tokenizer.decode(
            output.token_ids, skip_special_tokens=sp.skip_special_tokens
        )
        if not self._done or output.finish_reason in ("stop", "length"):
            for stop in sp._stop_strings():
                if stop in output.text:
                    at = output.text.find(stop)
                    end = at + len(stop) if sp.include_stop_str_in_output else at
                    output.text = output.text[:end]
                    output.finish_reason = "stop"
                    output.stop_reason = stop
                    self.abort()
                    self._done = True
                    break

    async def aresult(self) -> GenerationResult:
        while not self._done:
            await self._aresult_step()
        return self

    def __await__(self) -> Generator[Any, None, GenerationResult]:
        return self.aresult().__await__()

    def __aiter__(self) -> GenerationResult:
        return self

    async def __anext__(self) -> GenerationResult:
        if self._done:
            raise StopAsyncIteration
        await self._aresult_step()
        return self

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(request_id={self.request_id}, "
            f"prompt_token_ids={self.prompt_token_ids}, outputs={self.outputs}, "
            f"finished={self.finished})"
        )


class IterationResult:
    """Runtime statistics for all available iterations (an async iterable of dicts)."""

    def __init__(self, executor: GenerationExecutor) -> None:
        self._executor = executor
        self._done = False
        self._timeout = 2.0
        self._items: collections.deque[str] = collections.deque()
        self._arrived = asyncio.Event()

    def set_timeout(self, timeout: float | None) -> None:
        self._timeout = 2.0 if timeout is None else timeout

    def mark_undone(self) -> None:
        """Called when new prompts are submitted: more stats are expected."""
        self._done = False

    def put(self, data: str) -> None:
        self._items.append(data)
        self._arrived.set()

    def get_results(self) -> list[dict[str, Any]]:
        """Every stats dict in the queue, waiting up to the timeout for each next one."""
        results: list[dict[str, Any]] = []
        while not self._done:
            deadline = time.monotonic() + self._timeout
            while not self._items and time.monotonic() < deadline:
                time.sleep(0.001)  # only useful from a thread other than the loop's
            if not self._items:
                self._done = True
                break
            results.append(json.loads(self._items.popleft()))
        return results

    def __aiter__(self) -> IterationResult:
        return self

    async def __anext__(self) -> Any:
        if self._done:
            raise StopAsyncIteration
        self._executor._raise_stats_failure()
        if not self._items:
            self._arrived.clear()
            try:
                async with asyncio.timeout(self._timeout):
                    await self._arrived.wait()
            except TimeoutError:
                self._done = True
                raise StopAsyncIteration from None
        data = self._items.popleft()
        if self._executor.stats_as_json_strings:
            return data  # what some TensorRT-LLM versions hand out
        return json.loads(data)


async def empty_async_iterable() -> AsyncIterator[Any]:
    """What ``get_stats_async`` returns before the first request (upstream's own helper)."""
    nothing: tuple[Any, ...] = ()
    for item in nothing:  # pragma: no cover - makes this an async generator
        yield item


__all__ = [
    "CompletionOutput",
    "GenerationResult",
    "IterationResult",
    "Response",
    "empty_async_iterable",
]
