"""``tensorrt_llm.llmapi.llm``: the ``LLM`` classes and ``RequestOutput`` (test double).

What the double reproduces from upstream 1.x:

- ``tensorrt_llm.LLM`` is the PyTorch backend. Its keyword arguments are checked like upstream's:
  an argument of the TensorRT backend only (``quant_config``, ``build_config``, ...) raises
  ``ValueError`` naming ``tensorrt_llm._tensorrt_engine``; any other unknown one raises
  ``ValueError("LLM got invalid argument: ...")``. Iteration stats are collected only with
  ``enable_iter_perf_stats=True``; ``stream_interval`` sets tokens per streamed step.
- ``tensorrt_llm._tensorrt_engine.LLM`` (``_TrtLLM``) is the TensorRT backend: it takes
  ``quant_config`` but not the PyTorch-only arguments, and always collects iteration stats.
- ``generate_async`` returns a ``RequestOutput`` at once and raises ``RuntimeError`` after
  ``shutdown()``; ``get_stats_async(timeout)`` returns an async iterable of stats dicts.

Knobs for tests (class attributes; set them on ``BaseLLM`` or on one instance): ``step_delay_s``,
``min_answer_tokens`` / ``max_answer_tokens`` (natural answer length in words),
``context_steps`` (iterations a request is scheduled before its first token), ``kv_blocks``,
``stats_as_json_strings``, ``load_delay_s``, and the failure switches ``fail_load``,
``fail_next_generate_async``, ``fail_next_step`` (delivered to every request in flight; anything
but ``RequestError`` also shuts the executor down, as upstream does) and ``fail_next_stats``.
A worker process reads ``TRTLLM_DOUBLE_STEP_S`` and ``TRTLLM_DOUBLE_ANSWER_TOKENS`` (``N`` or
``MIN,MAX``) from its environment. Every ``LLM`` built is appended to ``BaseLLM.instances``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

from ..executor.executor import GenerationExecutor
from ..executor.result import GenerationResult
from ..sampling_params import SamplingParams
from .llm_args import KvCacheConfig
from .llm_utils import QuantConfig
from .tokenizer import TransformersTokenizer

_COMMON_ARGS = frozenset(
    {
        "pipeline_parallel_size", "context_parallel_size", "gpus_per_node",
        "moe_cluster_parallel_size", "moe_tensor_parallel_size", "moe_expert_parallel_size",
        "enable_attention_dp", "cp_config", "load_format", "enable_lora", "lora_config",
        "kv_cache_config", "enable_chunked_prefill", "guided_decoding_backend",
        "batched_logits_processor", "iter_stats_max_iterations", "request_stats_max_iterations",
        "peft_cache_config", "scheduler_config", "cache_transceiver_config",
        "speculative_config", "max_batch_size", "max_input_len", "max_seq_len", "max_beam_width",
        "max_num_tokens", "gather_generation_logits", "num_postprocess_workers",
        "postprocess_tokenizer_dir", "reasoning_parser", "decoding_config", "_mpi_session",
        "backend", "return_perf_metrics", "orchestrator_type", "build_config",
    }
)  # fmt: skip
_TORCH_ONLY_ARGS = frozenset(
    {
        "garbage_collection_gen0_threshold", "cuda_graph_config", "attention_dp_config",
        "disable_overlap_scheduler", "moe_config", "attn_backend", "sampler_type",
        "enable_iter_perf_stats", "enable_iter_req_stats", "print_iter_log",
        "perf_metrics_max_requests", "batch_wait_timeout_ms", "torch_compile_config",
        "enable_autotuner", "enable_layerwise_nvtx_marker", "enable_min_latency",
        "stream_interval", "force_dynamic_quantization", "allreduce_strategy",
        "checkpoint_loader", "checkpoint_format", "kv_connector_config", "mm_encoder_only",
    }
)  # fmt: skip
_TRT_ONLY_ARGS = frozenset(
    {
        "enable_tqdm", "workspace", "enable_build_cache", "extended_runtime_perf_knob_config",
        "calib_config", "quant_config", "embedding_parallel_mode", "fast_build",
        "enable_prompt_adapter", "max_prompt_adapter_token", "batching_type",
        "normalize_log_probs",
    }
)  # fmt: skip


class RequestOutput(GenerationResult):
    """The output data of a completion request to the LLM.

    ``request_id`` (int), ``prompt`` (str or None), ``prompt_token_ids``, ``outputs`` (a list of
    ``CompletionOutput``) and ``finished``; ``abort()`` cancels the request.
    """

    def __init__(self, *, prompt: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._prompt = prompt

    @property
    def prompt(self) -> str | None:
        return self._prompt


class BaseLLM:
    """What both backends share (see the module docstring)."""

    step_delay_s: float = 0.005
    min_answer_tokens: int = 8
    max_answer_tokens: int = 48
    context_steps: int = 0
    kv_blocks: int = 1024
    stats_as_json_strings: bool = False
    load_delay_s: float = 0.0
    fail_load: BaseException | None = None
    fail_next_generate_async: BaseException | None = None
    fail_next_step: BaseException | None = None
    fail_next_stats: BaseException | None = None
    instances: ClassVar[list[BaseLLM]] = []

    _backend: ClassVar[str] = "pytorch"
    _args: ClassVar[frozenset[str]] = _COMMON_ARGS | _TORCH_ONLY_ARGS

    def __init__(
        self,
        model: str | Path,
        tokenizer: str | Path | None = None,
        tokenizer_mode: str = "auto",
        skip_tokenizer_init: bool = False,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        **kwargs: Any,
    ) -> None:
        self._check_kwargs(kwargs)
        if not isinstance(model, str | Path) or not str(model):
            raise ValueError("model should be provided.")
        if tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        kv_cache_config = kwargs.get("kv_cache_config") or KvCacheConfig()
        if not isinstance(kv_cache_config, KvCacheConfig):
            raise ValueError(f"kv_cache_config must be a KvCacheConfig, got {kv_cache_config!r}")
        quant_config = kwargs.get("quant_config")
        if quant_config is not None and not isinstance(quant_config, QuantConfig):
            raise ValueError(f"quant_config must be a QuantConfig, got {quant_config!r}")
        stream_interval = int(kwargs.get("stream_interval", 1))
        if stream_interval <= 0:
            raise ValueError(f"stream_interval must be positive, got {stream_interval}")
        self._read_environment()
        if self.fail_load is not None:
            raise self.fail_load
        if self.load_delay_s:
            time.sleep(self.load_delay_s)
        #: Every argument the LLM was built with (for tests to inspect).
        self.args: dict[str, Any] = {
            "model": model,
            "tokenizer": tokenizer,
            "tokenizer_mode": tokenizer_mode,
            "skip_tokenizer_init": skip_tokenizer_init,
            "trust_remote_code": trust_remote_code,
            "tensor_parallel_size": tensor_parallel_size,
            "dtype": dtype,
            "revision": revision,
            "tokenizer_revision": tokenizer_revision,
            **kwargs,
        }
        self.max_num_tokens: int | None = kwargs.get("max_num_tokens", 8192)
        self.max_seq_len: int | None = kwargs.get("max_seq_len")
        self._tokenizer = None if skip_tokenizer_init else TransformersTokenizer()
        self._executor: GenerationExecutor | None = GenerationExecutor(
            owner=self,
            tokenizer=self._tokenizer or TransformersTokenizer(),
            max_batch_size=kwargs.get("max_batch_size") or 2048,
            max_num_tokens=self.max_num_tokens or 8192,
            tokens_per_block=kv_cache_config.tokens_per_block,
            kv_blocks=self.kv_blocks,
            stream_interval=stream_interval,
            stats_enabled=self._stats_enabled(kwargs),
        )
        BaseLLM.instances.append(self)
        print(
            f"[TensorRT-LLM double] loaded {model} ({self._backend} backend)",
            file=sys.stderr,
            flush=True,
        )

    # -- the API -------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> TransformersTokenizer | None:
        return self._tokenizer

    @property
    def executor(self) -> GenerationExecutor:
        """The double's executor (not upstream API: tests inspect it)."""
        assert self._executor is not None
        return self._executor

    def generate_async(
        self,
        inputs: Any,
        sampling_params: SamplingParams | None = None,
        lora_request: Any = None,
        prompt_adapter_request: Any = None,
        streaming: bool = False,
        kv_cache_retention_config: Any = None,
        disaggregated_params: Any = None,
        _postproc_params: Any = None,
        scheduling_params: Any = None,
        cache_salt: str | None = None,
    ) -> RequestOutput:
        """Submit one prompt; the ``RequestOutput`` comes back at once."""
        executor = self._executor
        if executor is None or executor.is_shutdown():
            raise RuntimeError("LLM is shutting down")
        failure = self.fail_next_generate_async
        if failure is not None:
            self.fail_next_generate_async = None
            raise failure
        sampling_params = self._prepare_sampling_params(sampling_params)
        prompt, prompt_token_ids = self._prompt_inputs(inputs, sampling_params)
        self._check_arguments(len(prompt_token_ids), sampling_params)
        sampling_params._get_stop_words()  # as building the executor request does
        result = RequestOutput(
            prompt=prompt,
            request_id=executor.next_request_id(),
            prompt_token_ids=prompt_token_ids,
            sampling_params=sampling_params,
            streaming=streaming,
            executor=executor,
            tokenizer=self._tokenizer,
        )
        executor.submit(result)
        return result

    def get_stats(self, timeout: float | None = 2) -> list[dict[str, Any]]:
        return self.executor.get_stats(timeout)

    def get_stats_async(self, timeout: float | None = 2) -> Any:
        """An async iterable of per-iteration stats dicts (empty before the first request)."""
        return self.executor.aget_stats(timeout)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown()

    def __enter__(self) -> BaseLLM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        del exc_type, exc_value, traceback
        self.shutdown()

    # -- internals -----------------------------------------------------------------------------

    def _check_kwargs(self, kwargs: dict[str, Any]) -> None:
        for key in kwargs:
            if key not in self._args:
                raise ValueError(f"{self.__class__.__name__} got invalid argument: {key}")

    def _stats_enabled(self, kwargs: dict[str, Any]) -> bool:
        return bool(kwargs.get("enable_iter_perf_stats", False))

    def _read_environment(self) -> None:
        step = os.environ.get("TRTLLM_DOUBLE_STEP_S")
        if step:
            self.step_delay_s = float(step)
        answer = os.environ.get("TRTLLM_DOUBLE_ANSWER_TOKENS")
        if answer:
            lo, _, hi = answer.partition(",")
            self.min_answer_tokens = int(lo)
            self.max_answer_tokens = int(hi or lo)

    def _prepare_sampling_params(self, sampling_params: SamplingParams | None) -> SamplingParams:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if not isinstance(sampling_params, SamplingParams):
            raise TypeError(
                "The sampling_params must be type SamplingParams or None, "
                f"but got {type(sampling_params)}"
            )
        if sampling_params.end_id is None:
            if self._tokenizer is None:
                raise ValueError(
                    "tokenizer is required to reset end_id if it is None, or you can "
                    "explicitly specify the end_id for sampling_params"
                )
            sampling_params._setup(self._tokenizer)
        return sampling_params

    def _prompt_inputs(self, inputs: Any, sp: SamplingParams) -> tuple[str | None, list[int]]:
        if isinstance(inputs, str):
            inputs = {"prompt": inputs}
        elif isinstance(inputs, list) and all(isinstance(i, int) for i in inputs):
            inputs = {"prompt_token_ids": inputs}
        if isinstance(inputs, dict) and "prompt_token_ids" in inputs:
            return None, list(inputs["prompt_token_ids"])
        if isinstance(inputs, dict) and "prompt" in inputs:
            if self._tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer")
            prompt = inputs["prompt"]
            ids = self._tokenizer.encode(prompt, add_special_tokens=sp.add_special_tokens)
            return prompt, ids
        raise TypeError(f"The inputs must be type str or list of int, but got {type(inputs)}")

    def _check_arguments(self, prompt_len: int, sp: SamplingParams) -> None:
        if self.max_num_tokens and prompt_len > self.max_num_tokens:
            raise ValueError(
                f"The sum of prompt length ({float(prompt_len)}), query length (0) should not "
                f"exceed max_num_tokens ({self.max_num_tokens})"
            )


class _TorchLLM(BaseLLM):
    """The PyTorch backend."""

    def _check_kwargs(self, kwargs: dict[str, Any]) -> None:
        specific = [key for key in kwargs if key in _TRT_ONLY_ARGS]
        if specific:
            raise ValueError(
                "The following arguments are specific to TensorRT backend and cannot be used "
                f"with PyTorch backend: {specific}.\nPlease use 'from "
                "tensorrt_llm._tensorrt_engine import LLM' instead to use the TensorRT backend."
            )
        super()._check_kwargs(kwargs)


class _TrtLLM(BaseLLM):
    """The TensorRT backend (``tensorrt_llm._tensorrt_engine.LLM``)."""

    _backend: ClassVar[str] = "tensorrt"
    _args: ClassVar[frozenset[str]] = _COMMON_ARGS | _TRT_ONLY_ARGS

    def _stats_enabled(self, kwargs: dict[str, Any]) -> bool:
        return True  # the C++ executor keeps iteration stats by default

    def _check_arguments(self, prompt_len: int, sp: SamplingParams) -> None:
        if self.max_seq_len and prompt_len + sp.max_tokens > self.max_seq_len:
            raise ValueError(
                f"The sum of prompt length ({float(prompt_len)}) and query length (0) "
                f"max_tokens ({sp.max_tokens}) should not exceed max_seq_len ({self.max_seq_len})"
            )


class LLM(_TorchLLM):
    """LLM class is the main class for running a LLM model (PyTorch backend)."""


__all__ = ["LLM", "BaseLLM", "RequestOutput"]
