"""``tensorrt_llm.llmapi`` (test double): the LLM API's public names."""

from ..executor import CompletionOutput, RequestError
from ..sampling_params import SamplingParams
from .llm import LLM, RequestOutput
from .llm_args import KvCacheConfig
from .llm_utils import QuantAlgo, QuantConfig

__all__ = [
    "LLM",
    "CompletionOutput",
    "KvCacheConfig",
    "QuantAlgo",
    "QuantConfig",
    "RequestError",
    "RequestOutput",
    "SamplingParams",
]
