"""Inference engines behind one interface, and the factory that picks one from the config.

- :mod:`worker.engines._base`: the :class:`Engine` protocol and the values it exchanges;
- :mod:`worker.engines.sim`: the simulated engine (continuous batching, KV budget, determinism).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.engines._base import (
    Completion,
    Engine,
    EngineError,
    EngineInfo,
    EngineRequest,
    FinishReason,
    LoadSnapshot,
    TextDelta,
    wait_event,
)
from worker.engines.sim import SimEngine, SimSettings

#: What the simulator serves when the configuration names no model or version.
SIM_DEFAULT_MODEL = "sim-llama-3.1-8b"
SIM_DEFAULT_MODEL_VERSION = "sim-1"

if TYPE_CHECKING:
    from worker._config import WorkerConfig


def create_engine(config: WorkerConfig) -> Engine:
    """The engine ``config.engine`` names, configured from ``config``.

    The GPU engines import their packages (tensorrt_llm, tritonclient, torch and transformers)
    only here, so a worker that does not use them runs without them installed.
    """
    if config.engine == "sim":
        return SimEngine(
            SimSettings(
                model=config.model or SIM_DEFAULT_MODEL,
                model_version=config.model_version or SIM_DEFAULT_MODEL_VERSION,
                capacity=config.capacity,
                max_prompt_tokens=config.max_prompt_tokens,
                first_token_delay=config.sim_first_token_delay,
                prefill_per_1k_tokens=config.sim_prefill_per_1k_tokens,
                token_delay=config.sim_token_delay,
                token_delay_per_request=config.sim_token_delay_per_request,
                max_num_tokens=config.sim_max_num_tokens,
                enable_block_reuse=config.sim_enable_block_reuse,
                speed_factor=config.sim_speed_factor,
                kv_blocks=config.sim_kv_blocks,
                tokens_per_block=config.sim_tokens_per_block,
                min_answer_tokens=config.sim_min_answer_tokens,
                max_answer_tokens=config.sim_max_answer_tokens,
            )
        )
    if config.engine == "trtllm":
        from worker.engines.trtllm import TrtllmEngine

        return TrtllmEngine.from_config(config)
    if config.engine == "triton":
        from worker.engines.triton import TritonEngine

        return TritonEngine.from_config(config)
    if config.engine == "hf":
        from worker.engines.hf import HfEngine

        return HfEngine.from_config(config)
    raise ValueError(f"engine: unknown engine {config.engine!r}")  # pragma: no cover


__all__ = [
    "Completion",
    "Engine",
    "EngineError",
    "EngineInfo",
    "EngineRequest",
    "FinishReason",
    "LoadSnapshot",
    "SimEngine",
    "SimSettings",
    "TextDelta",
    "create_engine",
    "wait_event",
]
