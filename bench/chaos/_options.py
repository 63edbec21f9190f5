"""What the chaos benchmark runs: its options, the mesh's shape, the faults (built and not yet
built) and the load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench._common import ROOT

MODEL = "sim-llama-3.1-8b"
DEFAULT_OUT = ROOT / "bench" / "results" / "chaos.json"
ROUTERS = 2
WORKERS = 4
TENANTS = ("acme", "globex", "initech")
#: Prompts a cacheable request picks from (so that some are answered from the cache).
CACHEABLE_PROMPTS = 16
#: The deadline every request carries, as a production client's would.
DEADLINE_S = 10.0

#: The faults built, in the order they run: name -> what it does.
FAULTS: dict[str, str] = {
    "worker-sigkill": "SIGKILL one worker; a new one (same id) starts after the fault",
    "worker-sigterm": "SIGTERM one worker (it drains and leaves Consul); a new one starts",
    "worker-sigstop": "SIGSTOP one worker (frozen) for the fault's length, then SIGCONT",
    "cache-sigkill": "SIGKILL the cache service; it restarts on its port",
    "cache-sigstop": "SIGSTOP the cache service for the fault's length, then SIGCONT",
    "redis-stop": "stop redis-server for the fault's length, then start it on its port",
    "router-sigkill": "SIGKILL one router; it restarts on its port (its in-flight requests "
    "are counted apart)",
    "consul-down": "Consul stops answering for longer than the workers' TTL, then comes back "
    "with its state",
    "consul-restart": "Consul restarts with its state lost (every registration forgotten)",
    "slow-readers": "8 more clients stream long answers and read one message every 0.5 s for "
    "the fault's length (their own streams reported apart)",
    "rolling-restart": "every worker in turn: SIGTERM, a new one, wait until the fleet is whole",
}
#: The faults of issue 12 that are not built yet: name -> what it would do.
NOT_BUILT: dict[str, str] = {
    "worker-netem-loss": "a worker cut off by the network (netem loss 100% in its namespace)",
    "worker-netem-delay": "a slow worker (netem delay 200 ms in its namespace)",
    "engine-errors": "per-request engine errors at 5%",
}
#: What ``--quick`` runs.
QUICK_FAULTS = (
    "worker-sigkill",
    "worker-sigterm",
    "worker-sigstop",
    "cache-sigkill",
    "redis-stop",
    "router-sigkill",
)
#: Faults after which a worker is dead or cut off, so must be out of rotation within 2 s.
ROTATION_FAULTS = ("worker-sigkill", "worker-sigstop")


@dataclass(frozen=True, kw_only=True)
class Options:
    """What to run."""

    faults: tuple[str, ...] = tuple(FAULTS)
    #: Requests started per second, through both routers together.
    rate: float = 20.0
    #: Seconds of load after the mesh starts, not measured (connections, first requests).
    warmup_s: float = 3.0
    #: Seconds of load before each fault (the baseline).
    baseline_s: float = 5.0
    #: How long a timed fault lasts (SIGSTOP, Redis down, slow readers; Consul down lasts
    #: ``consul_down_s``).
    fault_s: float = 10.0
    consul_down_s: float = 15.0
    #: The fleet is whole again once it has stayed whole this long.
    settle_s: float = 2.0
    #: Seconds of load after that.
    tail_s: float = 2.0
    #: How long to wait for the fleet to be whole again before giving up on a fault.
    recover_timeout_s: float = 30.0
    #: Fraction of requests that stream, and that are cacheable.
    stream_fraction: float = 0.5
    cacheable_fraction: float = 0.5
    #: Tokens a request asks for: about a second of decoding for the sim's defaults, so that
    #: streams are in flight when a fault hits.
    max_tokens: int = 64
    #: Bound on the requests of one fault's load, whatever its length.
    max_requests: int = 5000
    seed: int = 12
    out: Path = DEFAULT_OUT
    progress: bool = True
