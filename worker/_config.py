"""The worker's configuration: every setting, read from flags and ``LLMMESH_*`` in one place."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

from llmmesh import settings
from llmmesh.consul import ConsulSettings
from llmmesh.server import ServerSettings
from llmmesh.validation import Limits

#: A prompt may have at most this many characters per allowed token before it is even tokenized
#: (a cheap bound; the token limit is the one that matters).
CHARS_PER_TOKEN_BOUND = 16


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(ServerSettings, ConsulSettings):
    """How a worker serves: its engine, model, admission bounds, request limits and discovery."""

    port: int = field(default=50061, metadata={"help": "gRPC port (0 picks a free one)"})
    metrics_port: int = field(
        default=9402,
        metadata={"help": "Prometheus metrics HTTP port (0 picks a free one, -1 disables)"},
    )
    engine: Literal["sim", "trtllm", "triton", "hf"] = field(
        default="sim",
        metadata={
            "help": "inference engine: sim (simulated GPU), trtllm (TensorRT-LLM in-process), "
            "triton (a Triton server with the TensorRT-LLM backend), hf (transformers)"
        },
    )
    model: str = field(
        default="",
        metadata={
            "help": "name of the model served, as requests name it (default: sim-llama-3.1-8b "
            "for sim, the model directory's name for trtllm and hf, the Triton model for triton)"
        },
    )
    model_version: str = field(
        default="",
        metadata={
            "help": "version of the model (default: sim-1 for sim, the checkpoint's commit or "
            "directory name for trtllm and hf, the Triton model for triton)"
        },
    )
    worker_id: str = field(default="", metadata={"help": "id in the mesh (default: HOSTNAME-PORT)"})
    capacity: int = field(
        default=64, metadata={"help": "requests the engine runs at once (max batch size)"}
    )
    max_queued: int = field(
        default=256,
        metadata={"help": "requests that may wait beyond capacity before RESOURCE_EXHAUSTED"},
    )
    stream_interval: int = field(
        default=1,
        metadata={
            "help": "engine outputs per streamed message after the first, which is always sent "
            "at once (an output is one token, or --trtllm-stream-interval tokens on the trtllm "
            "engine, which groups inside the engine): 1 sends each as it is produced; more sends "
            "fewer, larger messages, for less CPU per token in the worker, the router and the "
            "client"
        },
    )
    load_report_interval: timedelta = field(
        default=timedelta(milliseconds=200),
        metadata={"help": "WatchLoad report interval when the caller asks for none"},
    )
    default_max_tokens: int = field(
        default=256, metadata={"help": "max_tokens when a request leaves it unset"}
    )
    max_tokens_limit: int = field(
        default=4096, metadata={"help": "largest max_tokens a request may ask for"}
    )
    max_prompt_tokens: int = field(
        default=32_768, metadata={"help": "largest prompt accepted, in tokens"}
    )
    sim_first_token_delay: timedelta = field(
        default=timedelta(milliseconds=7),
        metadata={"help": "sim: prefill time of a 128-token prompt (batch-1 time to first token)"},
    )
    sim_prefill_per_1k_tokens: timedelta = field(
        default=timedelta(milliseconds=15.1),
        metadata={"help": "sim: prefill time per 1000 uncached prompt tokens"},
    )
    sim_token_delay: timedelta = field(
        default=timedelta(milliseconds=7),
        metadata={"help": "sim: duration of a decode step at batch size 1"},
    )
    sim_token_delay_per_request: timedelta = field(
        default=timedelta(microseconds=16),
        metadata={"help": "sim: what each further generating request adds to a decode step"},
    )
    sim_max_num_tokens: int = field(
        default=8192,
        metadata={
            "help": "sim: most tokens per iteration (prompt chunks plus one per generating request)"
        },
    )
    sim_enable_block_reuse: bool = field(
        default=True,
        metadata={
            "help": "sim: share KV blocks of identical prompt prefixes (no prefill for them)"
        },
    )
    sim_speed_factor: float = field(
        default=1.0, metadata={"help": "sim: divides every delay (10 = ten times faster)"}
    )
    sim_kv_blocks: int = field(default=8192, metadata={"help": "sim: KV cache size, in blocks"})
    sim_tokens_per_block: int = field(
        default=32, metadata={"help": "sim: tokens per KV cache block"}
    )
    sim_min_answer_tokens: int = field(
        default=32, metadata={"help": "sim: shortest natural answer, in tokens"}
    )
    sim_max_answer_tokens: int = field(
        default=1024, metadata={"help": "sim: longest natural answer, in tokens"}
    )

    model_path: str = field(
        default="",
        metadata={
            "help": "trtllm: checkpoint or engine directory (or HF model id); hf: local model "
            "directory (required by trtllm and hf)"
        },
    )
    tokenizer_path: str = field(
        default="", metadata={"help": "trtllm/hf: tokenizer directory (default: model_path)"}
    )
    trtllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "trtllm: GPUs to shard the model over (tensor parallelism)"}
    )
    trtllm_max_num_tokens: int = field(
        default=8192, metadata={"help": "trtllm: most tokens (prefill + decode) per iteration"}
    )
    trtllm_max_seq_len: int = field(
        default=0, metadata={"help": "trtllm: longest sequence (prompt + output); 0: the model's"}
    )
    trtllm_kv_cache_free_gpu_memory_fraction: float = field(
        default=0.9, metadata={"help": "trtllm: fraction of free GPU memory for the KV cache"}
    )
    trtllm_enable_block_reuse: bool = field(
        default=True, metadata={"help": "trtllm: reuse KV cache blocks of shared prompt prefixes"}
    )
    trtllm_dtype: str = field(
        default="auto", metadata={"help": "trtllm: weight/activation dtype (auto, float16, ...)"}
    )
    trtllm_quantization: str = field(
        default="",
        metadata={
            "help": "trtllm: quantization algorithm for an unquantized checkpoint (e.g. FP8, "
            "NVFP4, W4A16_AWQ); a pre-quantized checkpoint is detected by TensorRT-LLM itself"
        },
    )
    trtllm_stream_interval: int = field(
        default=1, metadata={"help": "trtllm: tokens generated per streamed update"}
    )
    triton_url: str = field(
        default="127.0.0.1:8001", metadata={"help": "triton: gRPC address of the Triton server"}
    )
    triton_model: Literal["ensemble", "tensorrt_llm_bls"] = field(
        default="ensemble", metadata={"help": "triton: model to call in inflight_batcher_llm"}
    )
    triton_metrics_url: str = field(
        default="http://127.0.0.1:8002/metrics",
        metadata={"help": "triton: Prometheus metrics URL, read for load reports"},
    )
    hf_device: Literal["auto", "cpu", "cuda"] = field(
        default="auto", metadata={"help": "hf: device (auto: cuda when available, else cpu)"}
    )
    hf_dtype: Literal["auto", "float32", "float16", "bfloat16"] = field(
        default="auto", metadata={"help": "hf: weight dtype (auto: bfloat16 on cuda, else float32)"}
    )

    discovery: Literal["none", "consul"] = field(
        default="none",
        metadata={"help": "register in Consul (consul_* settings) when consul; none: do not"},
    )
    advertise_address: str = field(
        default="",
        metadata={
            "help": "host or IP others reach this worker at, registered in Consul (default: the "
            "listen host; when listening on 0.0.0.0 or ::, this machine's IP, else its hostname)"
        },
    )
    consul_check: Literal["ttl", "grpc"] = field(
        default="ttl",
        metadata={
            "help": "Consul health check: ttl (the worker reports its engine's health), grpc "
            "(Consul probes the worker's grpc.health.v1 for llmmesh.v1.Worker)"
        },
    )
    consul_check_ttl: timedelta = field(
        default=timedelta(seconds=10),
        metadata={
            "help": "ttl check: its TTL, refreshed every third of it; grpc check: Consul probes "
            "every third of it. A dead worker turns critical within about this long"
        },
    )
    consul_deregister_after: timedelta = field(
        default=timedelta(minutes=1),
        metadata={
            "help": "Consul removes the worker after its check has been critical this long "
            "(DeregisterCriticalServiceAfter; Consul raises anything below 1m to 1m)"
        },
    )
    consul_tags: tuple[str, ...] = field(
        default=(),
        metadata={"help": "extra Consul tags (model=... and engine=... are always added)"},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.consul_check_ttl <= timedelta(0):
            raise ValueError("consul_check_ttl: must be positive")
        if self.consul_deregister_after <= timedelta(0):
            raise ValueError("consul_deregister_after: must be positive")
        if self.advertise_address:
            _check_advertise_address(self.advertise_address)
        if self.engine in ("trtllm", "hf") and not self.model_path:
            raise ValueError(f"model_path: the {self.engine} engine needs a model directory")
        if self.trtllm_tensor_parallel_size < 1:
            raise ValueError("trtllm_tensor_parallel_size: must be >= 1")
        if not 0 < self.trtllm_kv_cache_free_gpu_memory_fraction <= 1:
            raise ValueError("trtllm_kv_cache_free_gpu_memory_fraction: must be in (0, 1]")
        for name in ("capacity", "max_prompt_tokens", "max_tokens_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 (got {getattr(self, name)})")
        if self.max_queued < 0:
            raise ValueError(f"max_queued: must be >= 0 (got {self.max_queued})")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens: must be in 1..max_tokens_limit={self.max_tokens_limit} "
                f"(got {self.default_max_tokens})"
            )
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval: must be >= 1 (got {self.stream_interval})")
        if self.load_report_interval <= timedelta(0):
            raise ValueError("load_report_interval: must be positive")
        if not (math.isfinite(self.sim_speed_factor) and self.sim_speed_factor > 0):
            raise ValueError(f"sim_speed_factor: must be > 0 (got {self.sim_speed_factor})")
        for name in (
            "sim_first_token_delay",
            "sim_prefill_per_1k_tokens",
            "sim_token_delay",
            "sim_token_delay_per_request",
        ):
            if getattr(self, name) < timedelta(0):
                raise ValueError(f"{name}: must not be negative")
        if self.sim_kv_blocks < 1 or self.sim_tokens_per_block < 1:
            raise ValueError("sim_kv_blocks, sim_tokens_per_block: must be >= 1")
        if self.sim_max_num_tokens < 1:
            raise ValueError(f"sim_max_num_tokens: must be >= 1 (got {self.sim_max_num_tokens})")
        if not 1 <= self.sim_min_answer_tokens <= self.sim_max_answer_tokens:
            raise ValueError(
                "sim_min_answer_tokens: must be >= 1 and <= sim_max_answer_tokens "
                f"(got {self.sim_min_answer_tokens} and {self.sim_max_answer_tokens})"
            )

    @property
    def limits(self) -> Limits:
        """The bounds the worker validates each request against."""
        return Limits(
            default_max_tokens=self.default_max_tokens,
            max_tokens_limit=self.max_tokens_limit,
            max_prompt_chars=self.max_prompt_tokens * CHARS_PER_TOKEN_BOUND,
        )


def _check_advertise_address(address: str) -> None:
    """A host name or an IP address, without a port: the worker's own port is registered."""
    if ":" in address:
        try:
            ipaddress.IPv6Address(address.strip("[]"))
        except ValueError:
            raise ValueError(
                f"advertise_address: {address!r} is not a host or IP address (give no port: "
                "the worker's own port is registered)"
            ) from None
    elif not address.isprintable() or any(c.isspace() or c in "/@" for c in address):
        raise ValueError(f"advertise_address: {address!r} is not a host or IP address")


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> WorkerConfig:
    """The worker's configuration from flags, then ``LLMMESH_*`` variables, then defaults."""
    return settings.load(
        WorkerConfig,
        prog="python -m worker",
        description="llm-mesh worker: serves one model from one inference engine over gRPC.",
        argv=argv,
        environ=environ,
    )


__all__ = ["WorkerConfig", "load_config"]
