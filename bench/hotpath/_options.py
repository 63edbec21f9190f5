"""What the hot-path benchmark runs: its options, the sim worker's settings, the paths measured
and the process each enters by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bench._common import ROOT

MODEL = "sim-llama-3.1-8b"
DEFAULT_OUT = ROOT / "bench" / "results" / "hotpath.json"
PROMPT = "Explain how a KV cache speeds up decoding."
#: The sim's settings: delays divided by 1000, natural answers longer than any request.
SIM_SPEED_FACTOR = 1000.0
ANSWER_TOKENS = 4096
WORKER_CAPACITY = 512
KV_BLOCKS = 65_536
#: The deadline every request carries (gRPC's ``grpc-timeout``), as a real client's would.
DEADLINE_S = 60
#: Distinct cached requests the Python cross-check's ``cache_hit_distinct`` cycles through.
DISTINCT_KEYS = 64

ROUTER_SERVICE = "/llmmesh.v1.Router/"
WORKER_SERVICE = "/llmmesh.v1.Worker/"
UNARY_PATHS = ("bare_hop", "direct_worker", "router_miss", "cache_hit")
STREAM_PATHS = ("bare", "router", "direct")
#: The process that serves each path's requests first, and the one whose counters say how many
#: requests completed.
ENTRY = {"bare_hop": "proxy", "direct_worker": "worker", "router_miss": "router"}
ENTRY |= {"cache_hit": "router", "bare": "proxy", "router": "router", "direct": "worker"}
ROLES = ("router", "cache", "worker", "proxy", "redis")


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to run."""

    concurrencies: tuple[int, ...] = (1, 32, 256)
    duration_s: float = 5.0
    warmup_s: float = 0.5
    unary_tokens: int = 4
    stream_tokens: int = 256
    stream_interval: int = 16
    store: Literal["auto", "redis", "memory"] = "auto"
    log_level: str = "info"
    python_check: bool = True
    python_check_s: float = 2.0
    out: Path = DEFAULT_OUT
    progress: bool = True
