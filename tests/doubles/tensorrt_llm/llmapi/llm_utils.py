"""``tensorrt_llm.llmapi.llm_utils``: quantization settings, ``QuantConfig`` and ``QuantAlgo``."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class QuantAlgo(StrEnum):
    """Quantization algorithms, by upstream's names (``tensorrt_llm.quantization.mode``)."""

    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    INT8 = "INT8"
    MIXED_PRECISION = "MIXED_PRECISION"
    NVFP4 = "NVFP4"
    W4A8_NVFP4_FP8 = "W4A8_NVFP4_FP8"
    W4A8_MXFP4_FP8 = "W4A8_MXFP4_FP8"
    W4A16_MXFP4 = "W4A16_MXFP4"
    NO_QUANT = "NO_QUANT"


@dataclass(kw_only=True)
class QuantConfig:
    """How the TensorRT backend quantizes an unquantized checkpoint while building."""

    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None
    group_size: int = 128
    exclude_modules: list[str] | None = None


__all__ = ["QuantAlgo", "QuantConfig"]
