"""``tensorrt_llm.llmapi.llm_args``: the configuration objects an ``LLM`` takes (test double)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class KvCacheConfig:
    """How much GPU memory the KV cache takes and how its blocks are reused."""

    enable_block_reuse: bool = True
    max_tokens: int | None = None
    max_attention_window: list[int] | None = None
    free_gpu_memory_fraction: float | None = None
    host_cache_size: int | None = None
    onboard_blocks: bool = True
    enable_partial_reuse: bool = True
    dtype: str = "auto"
    tokens_per_block: int = 32

    def __post_init__(self) -> None:
        fraction = self.free_gpu_memory_fraction
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValueError("kv_cache_config.free_gpu_memory_fraction must be a float in [0, 1]")


__all__ = ["KvCacheConfig"]
