"""``tensorrt_llm.executor``: the generation executor and its results (test double)."""

from .executor import GenerationExecutor
from .result import CompletionOutput, GenerationResult, IterationResult
from .utils import RequestError

__all__ = [
    "CompletionOutput",
    "GenerationExecutor",
    "GenerationResult",
    "IterationResult",
    "RequestError",
]
