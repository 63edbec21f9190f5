"""``tensorrt_llm._tensorrt_engine``: the ``LLM`` of the TensorRT backend (test double)."""

from ..llmapi.llm import _TrtLLM as LLM

__all__ = ["LLM"]
