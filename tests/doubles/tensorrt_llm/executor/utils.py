"""``tensorrt_llm.executor.utils``: the per-request error type."""

from __future__ import annotations


class RequestError(RuntimeError):
    """The error raised when the request is failed."""


__all__ = ["RequestError"]
