"""A worker's stream read apart from a caller that reads slowly, and a caller that stops reading.

A worker's batch slot is held while its engine works, not while a caller dawdles. A
:class:`StreamDrain` hands the relay one worker call's messages and releases the call's
:class:`router._pool.Lease` when the worker's stream ends. While the caller keeps up, the relay
reads the worker's call itself (no task, no queue: the hot path); once a message has waited
``_SLOW_AFTER`` to be taken by the caller, a :class:`StreamWatch` has a task of its own read the
rest of the worker's stream into a queue, and the relay goes on from the queue at the caller's
pace. Either way the caller gets the worker's messages one for one, as they came. The queue is
bounded by the request's own output: a worker sends at most one message per token of
``max_tokens``, and its summary, so a worker that sends many more is broken.

A caller that reads nothing for ``--stream-idle-timeout`` (the relay has waited that long to hand
it one message: its HTTP/2 flow-control window is full) is cancelled. One :class:`StreamWatch`
per dispatcher looks at every open stream every ``_SWEEP_INTERVAL``, so that relaying a message
costs two attribute writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from llmmesh import errors
from llmmesh.v1 import generate_pb2
from router._pool import Lease

#: Messages a worker may send beyond one per token: the summary, and spares (an engine's last
#: text flushed apart, a future header message).
_SPARE_MESSAGES = 16
#: A message that has waited this long for its caller switches its stream to the queue: long
#: enough that a busy event loop's own delays do not (a router saturated at 256 streams sees tens
#: of milliseconds), short beside a worker's answer.
_SLOW_AFTER = 0.2
#: How often the watch looks at the open streams.
_SWEEP_INTERVAL = 0.1

_Item = generate_pb2.GenerateStreamResponse | errors.MeshError | None


class StreamDrain:
    """The messages of one worker call (``messages``), ``lease`` held until they end."""

    def __init__(
        self,
        messages: AsyncIterator[generate_pb2.GenerateStreamResponse],
        lease: Lease,
        *,
        max_tokens: int,
        on_idle: Callable[[], None],
    ) -> None:
        self._messages = messages
        self._lease = lease
        self._bound = max_tokens + _SPARE_MESSAGES
        self._count = 0
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        #: Called by the watch when the caller has read nothing for the idle timeout.
        self.on_idle = on_idle
        #: loop.time() when the message being handed to the caller was offered; None between
        #: messages. Set by the relay.
        self.waiting_since: float | None = None

    async def next(self) -> generate_pb2.GenerateStreamResponse | None:
        """The worker's next message, None at the end; raises the worker's error."""
        if self._queue is not None:
            item = await self._queue.get()
            if isinstance(item, errors.MeshError):
                raise item
            return item
        try:
            message = await anext(self._messages)
            self._count += 1
            if self._count > self._bound:
                self._over_bound()
        except StopAsyncIteration:
            self._lease.release()
            return None
        except errors.MeshError:
            self._lease.release()
            raise
        return message

    def buffer(self) -> None:
        """Read the rest of the worker's stream in a task, into a queue (called only while the
        relay waits for the caller to take a message, so that one reader reads at a time)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.create_task(self._drain(self._queue))
            # A task cancelled before its first step never runs its body.
            self._task.add_done_callback(lambda _: self._lease.release())

    def cancel(self) -> None:
        """Stop reading (the caller went away or was cancelled); the lease is released."""
        if self._task is not None:
            self._task.cancel()
        else:
            self._lease.release()

    def _over_bound(self) -> None:
        self._lease.failed("too many stream messages")
        raise errors.Unavailable(
            f"worker {self._lease.worker.worker_id} sent more than {self._bound} messages "
            f"for a request of max_tokens {self._bound - _SPARE_MESSAGES}"
        )

    async def _drain(self, queue: asyncio.Queue[_Item]) -> None:
        end: _Item = None
        try:
            async for message in self._messages:
                self._count += 1
                if self._count > self._bound:
                    self._over_bound()
                queue.put_nowait(message)
        except errors.MeshError as exc:
            end = exc
        finally:
            # Free before the relay hears of the end, so that a retry finds the slot free.
            self._lease.release()
        queue.put_nowait(end)


class StreamWatch:
    """Looks at the open streams every ``_SWEEP_INTERVAL``: a stream whose caller is slower than
    its worker is buffered; one whose caller has read nothing for ``idle_timeout`` (0: never) is
    told so (:attr:`StreamDrain.on_idle`), once."""

    def __init__(self, idle_timeout: float) -> None:
        self._idle_timeout = idle_timeout
        self._streams: set[StreamDrain] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, drain: StreamDrain) -> None:
        self._streams.add(drain)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_SWEEP_INTERVAL, self._sweep)

    def discard(self, drain: StreamDrain) -> None:
        self._streams.discard(drain)

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        idle = self._idle_timeout
        for drain in list(self._streams):
            since = drain.waiting_since
            if since is None:
                continue
            waited = now - since
            if waited >= _SLOW_AFTER:
                drain.buffer()
            if idle and waited >= idle:
                self._streams.discard(drain)
                drain.on_idle()
        self._timer = loop.call_later(_SWEEP_INTERVAL, self._sweep) if self._streams else None
