"""How many streams one caller may hold open: per connection and per tenant.

A stream holds a worker's slot only while the worker generates (router/_drain.py), but a caller
that opens streams without end would still take every slot of the fleet while the engines work.
:class:`StreamLimits` counts the open ``GenerateStream`` calls of each HTTP/2 connection (the
caller's peer address) and of each tenant, and refuses one more above either limit with
RESOURCE_EXHAUSTED, naming the limit. A limit of 0 is no limit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from llmmesh import errors
from router import _metrics as metrics


class StreamLimits:
    """Open streams by connection and by tenant, within their limits."""

    def __init__(self, *, per_connection: int, per_tenant: int) -> None:
        self.per_connection = per_connection
        self.per_tenant = per_tenant
        self._by_connection: dict[str, int] = {}
        self._by_tenant: dict[str, int] = {}

    @contextlib.contextmanager
    def open(self, *, connection: str, tenant: str) -> Iterator[None]:
        """Count one stream while the block runs; raise ResourceExhausted above a limit."""
        by_connection, by_tenant = self._by_connection, self._by_tenant
        on_connection = by_connection.get(connection, 0)
        if 0 < self.per_connection <= on_connection:
            metrics.STREAMS_REFUSED.labels("connection").inc()
            raise errors.ResourceExhausted(
                f"this connection already has {on_connection} streams open, the most allowed "
                "(--max-streams-per-connection); read or close some, or open another connection"
            )
        on_tenant = by_tenant.get(tenant, 0)
        if 0 < self.per_tenant <= on_tenant:
            metrics.STREAMS_REFUSED.labels("tenant").inc()
            raise errors.ResourceExhausted(
                f"tenant {tenant!r} already has {on_tenant} streams open, the most allowed "
                "(--max-streams-per-tenant); read or close some first"
            )
        by_connection[connection] = on_connection + 1
        by_tenant[tenant] = on_tenant + 1
        metrics.OPEN_STREAMS.inc()
        try:
            yield
        finally:
            metrics.OPEN_STREAMS.dec()
            _decrement(by_connection, connection)
            _decrement(by_tenant, tenant)


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
