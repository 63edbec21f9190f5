"""What the load-balancing benchmark runs: its options, the sim's timing model, the workload's
distributions and issue 5's targets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench._common import ROOT

MODEL = "sim-llama-3.1-8b"
ORACLE = "oracle"
LL = "least-loaded"
ROUTER_POLICIES = ("round-robin", "random", "power-of-two", "least-loaded")
POLICIES = (*ROUTER_POLICIES, ORACLE)
DEFAULT_OUT = ROOT / "bench" / "results" / "lb.json"

#: The sim's timing model at speed factor 1 (worker/engines/sim.py defaults), in seconds.
SIM_TOKEN_DELAY_S = 0.007
SIM_TOKEN_DELAY_PER_REQUEST_S = 16e-6
SIM_PREFILL_PER_TOKEN_S = 15.1e-6
#: Natural answer length given to the sim workers: longer than any request's max_tokens.
ANSWER_TOKENS = 4096

#: Workload distributions: (median, sigma, lowest, highest), in tokens.
PROMPT_TOKENS = (200.0, 1.0, 16, 4096)
OUTPUT_TOKENS = (24.0, 0.9, 4, 512)

#: Targets of issue 5, at 80% load.
TARGET_LOAD = 0.8
TARGET_ORACLE_RATIO = 1.15
TARGET_ROUND_ROBIN_FACTOR = 3.0
TARGET_REPLICA_RATIO = 1.2

#: A process using more of the machine than this share of its CPUs is taken to be saturated.
SATURATED_SHARE = 0.9


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to run."""

    policies: tuple[str, ...] = POLICIES
    loads: tuple[float, ...] = (0.5, 0.8, 0.95)
    speeds: tuple[float, ...] = (1.0, 1.0, 0.5, 0.25)
    time_scale: float = 1.0
    capacity: int = 4
    max_queued: int = 16
    duration_s: float = 20.0
    requests: int | None = None
    replicas: int = 3
    replica_load: float = TARGET_LOAD
    replica_rounds: int = 2
    deadline_s: float = 30.0
    seed: int = 1
    out: Path = DEFAULT_OUT
    plot: bool = True
    progress: bool = True

    @property
    def speed_factors(self) -> tuple[float, ...]:
        """The ``--sim-speed-factor`` of each worker."""
        return tuple(s * self.time_scale for s in self.speeds)
