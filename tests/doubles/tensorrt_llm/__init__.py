"""A test double of ``tensorrt_llm`` (TensorRT-LLM 1.x), for machines without a GPU.

It reproduces the parts of the LLM API that llm-mesh's ``trtllm`` engine uses, with upstream's
names, signatures and behaviours (see ``llmapi/llm.py`` for what is reproduced and the knobs
tests use). It runs no model: a small in-flight-batching executor writes deterministic words.
Put ``tests/doubles`` first on ``sys.path`` (or ``PYTHONPATH``) to use it.
"""

from .llmapi import LLM, CompletionOutput, RequestOutput, SamplingParams

__version__ = "1.0.0+double"
IS_DOUBLE = True

__all__ = ["IS_DOUBLE", "LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
