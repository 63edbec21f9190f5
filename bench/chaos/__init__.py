"""``python -m bench chaos``: a real local mesh under load, one fault at a time (issue 12).

**The mesh** (every part a real process on 127.0.0.1, started like the tests start them): a
throwaway ``redis-server``, the cache service on it, the Consul agent double
(``tests/consul_agent/``, no Consul binary is installable here) in a thread, four ``sim``
workers that register in it (1 s TTL checks, deregistered 1 s after going critical) and two
routers that watch it (``--discovery consul``) and use the cache service.

**The load** is open loop (Poisson arrivals at ``--rate``), on one ``grpc.aio`` channel to
``ipv4:<router 1>,<router 2>`` with gRPC's client-side ``round_robin``, as a production client
would: half streams, half cacheable (greedy, one of 16 prompts; the rest sampled with a unique
prompt), three tenants, a 10 s deadline each. It is bounded in requests and in time.

**Each fault** runs on its own load: a baseline, the fault (injected, held, undone), the wait
until the fleet is whole again (every worker HEALTHY in both routers' ``ListWorkers``), a short
tail. Reported: requests, those that failed before their first token and after it, a killed
router's in-flight failures apart, p99 TTFT before and during the fault, how long a dead or
frozen worker stayed in rotation, and how long the fleet took to be whole after the fault was
undone. TTFT is the client's: the first chunk with text for a stream, the response for a unary
call.

**Targets** (issue 12): 0 failed requests per fault, streams included, except a killed router's
in-flight requests (counted apart); p99 TTFT during a fault at most 3x the baseline; a dead or
frozen worker out of rotation within 2 s.

**Modules**: ``_options`` (the faults, built and not, and the options), ``_mesh`` (the
processes), ``_load`` (the load generator), ``_faults`` (the faults), ``_measure`` (one fault's
figures), ``_targets``, ``_run`` (the whole benchmark), ``_report`` (the table and the results
file) and ``_cli`` (the command line).
"""

from bench.chaos._cli import main, parse_args
from bench.chaos._faults import INJECT
from bench.chaos._load import Load, Outcome, client_channel, make_request, run_load
from bench.chaos._measure import FaultRun, Marks, summarize
from bench.chaos._mesh import Mesh
from bench.chaos._options import (
    DEFAULT_OUT,
    FAULTS,
    NOT_BUILT,
    QUICK_FAULTS,
    ROTATION_FAULTS,
    Options,
)
from bench.chaos._report import not_run, report, results, table
from bench.chaos._run import Run, estimate_s, run_all, run_fault
from bench.chaos._targets import (
    TARGET_OUT_OF_ROTATION_S,
    TARGET_TTFT_VS_BASELINE,
    overall,
    targets,
)

__all__ = [
    "DEFAULT_OUT",
    "FAULTS",
    "INJECT",
    "NOT_BUILT",
    "QUICK_FAULTS",
    "ROTATION_FAULTS",
    "TARGET_OUT_OF_ROTATION_S",
    "TARGET_TTFT_VS_BASELINE",
    "FaultRun",
    "Load",
    "Marks",
    "Mesh",
    "Options",
    "Outcome",
    "Run",
    "client_channel",
    "estimate_s",
    "main",
    "make_request",
    "not_run",
    "overall",
    "parse_args",
    "report",
    "results",
    "run_all",
    "run_fault",
    "run_load",
    "summarize",
    "table",
    "targets",
]
