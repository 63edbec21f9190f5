"""``python -m bench lb``: load balancing on a heterogeneous fleet of simulated workers.

**Fleet.** Real worker processes (``python -m worker --engine sim``), one per speed factor
(default 1, 1, 0.5, 0.25: two full-speed GPUs, one at half speed, one at a quarter), each running
``--capacity`` requests at once (default 4) with ``--max-queued`` more waiting (default 4x the
capacity, the ratio of the worker's own defaults, 64/256). Each speed factor is multiplied by
``--time-scale`` (default 1) so that the whole mesh, this process included, keeps up on a small
machine. Every answer runs to its ``max_tokens`` (the sim's natural answers are made longer than
any request's limit), so each request's work is known from the trace.

**Capacity.** From the sim's timing model (``worker/engines/sim.py``): with all ``C`` slots
busy, an iteration lasts ``d = token_delay + token_delay_per_request * (C - 1)`` and gives every
running request one token, and each admitted prompt adds ``n * prefill_per_token`` to one
iteration. A request with ``k`` output tokens and ``n`` prompt tokens therefore takes
``k * d / C + n * prefill_per_token`` of a saturated worker's time at speed 1, and a worker of
speed ``s`` completes ``s / (E[k] * d / C + E[n] * prefill_per_token)`` requests per second,
the means taken over 200,000 draws of the workload's distributions. The fleet's capacity is the
sum over workers; a load level of 80% offers 0.8 times that. Host delays (timer overshoot, a
busy CPU) make the real workers somewhat slower than the model, so the real utilisation is a
little higher than the nominal level; the throughput column shows what was achieved.

**Workload.** One trace, drawn once from ``--seed`` and replayed for every policy: an open-loop
Poisson arrival process (exponential gaps, rescaled to each load level's rate), prompt lengths
lognormal (median 200 tokens, sigma 1, clipped to 16-4096) and output lengths lognormal (median
24 tokens, sigma 0.9, clipped to 4-512). Requests use ``CACHE_POLICY_BYPASS`` and temperature
0.7 without a seed, and every prompt begins with a tag of its own run and index, so neither the
response cache nor the sim's prefix cache is ever involved.

**Runs.** For each load level, each policy runs the same trace on the same workers, which are
idle (checked on ``WatchLoad``) before each run; every router run starts fresh router
processes. ``round-robin``, ``random``, ``power-of-two`` and ``least-loaded`` are the router's
``--policy``; ``oracle`` is an ideal join-shortest-queue dispatcher in this process: it sends
each request straight to the worker with the fewest outstanding requests (ties at random) as
soon as one has a free batch slot, holding it in a central first-come-first-served queue while
none has (as the router's admission queue does; early binding to a worker's own queue does
worse under heavy-tailed lengths, since a request can wait behind a long one while another
worker frees up). It is the workers' only client, so its counts are exact, with no report delay
and no router hop.

**Replicas.** Three least-loaded router replicas (requests spread round-robin by this process)
are compared with one router side by side, in ``--replica-rounds`` interleaved rounds (default 2)
at 80% load: each round replays a trace of its own (seed, seed + 1, ...) through one router, then
through the replicas, and the comparison pools each side's rounds, so that a p99 rests on twice
the samples and drift of a noisy host falls on both sides alike. The first round's one-router run
is the main table's least-loaded run at that load.

**Measured.** Time to first token (TTFT) runs from a request's scheduled arrival time (not from
when it was actually sent, so a late sender cannot hide queueing) to its first chunk with text;
end to end (E2E) to the end of its stream. Percentiles are over completed requests; errors (any
RPC that did not complete, including one past the ``--deadline``) are counted beside them.
Throughput is completed requests over the time from the first arrival to the last completion.

**Modules**: ``_options`` (what to run, the timing model, the targets), ``_workload`` (the trace,
its requests, the fleet's capacity), ``_fleet`` (the workers, the routers' arguments, the
oracle), ``_replay`` (one run), ``_run`` (the plan of runs and the replica rounds pooled),
``_targets`` (issue 5's targets), ``_report`` (the printed report, the results file, the plot)
and ``_cli`` (the command line).
"""

from bench.lb._cli import main, parse_args, positive_floats
from bench.lb._fleet import Fleet, Oracle, router_args, wait_routers_see_fleet
from bench.lb._options import (
    ANSWER_TOKENS,
    DEFAULT_OUT,
    LL,
    MODEL,
    ORACLE,
    OUTPUT_TOKENS,
    POLICIES,
    PROMPT_TOKENS,
    ROUTER_POLICIES,
    SATURATED_SHARE,
    SIM_PREFILL_PER_TOKEN_S,
    SIM_TOKEN_DELAY_PER_REQUEST_S,
    SIM_TOKEN_DELAY_S,
    TARGET_LOAD,
    TARGET_ORACLE_RATIO,
    TARGET_REPLICA_RATIO,
    TARGET_ROUND_ROBIN_FACTOR,
    Options,
)
from bench.lb._replay import RunResult, Sample, replay, run_one, stream_one
from bench.lb._report import notes, plot, report, results
from bench.lb._run import (
    Planned,
    Run,
    estimate_run_s,
    one_router_label,
    plan,
    pool,
    pool_rounds,
    replica_label,
    run_all,
    trace_for,
)
from bench.lb._targets import targets, ttft_p99
from bench.lb._workload import (
    CapacityModel,
    TraceItem,
    capacity_model,
    draw_tokens,
    grpc_request,
    load_label,
    make_trace,
    prompt_text,
)

__all__ = [
    "ANSWER_TOKENS",
    "DEFAULT_OUT",
    "LL",
    "MODEL",
    "ORACLE",
    "OUTPUT_TOKENS",
    "POLICIES",
    "PROMPT_TOKENS",
    "ROUTER_POLICIES",
    "SATURATED_SHARE",
    "SIM_PREFILL_PER_TOKEN_S",
    "SIM_TOKEN_DELAY_PER_REQUEST_S",
    "SIM_TOKEN_DELAY_S",
    "TARGET_LOAD",
    "TARGET_ORACLE_RATIO",
    "TARGET_REPLICA_RATIO",
    "TARGET_ROUND_ROBIN_FACTOR",
    "CapacityModel",
    "Fleet",
    "Options",
    "Oracle",
    "Planned",
    "Run",
    "RunResult",
    "Sample",
    "TraceItem",
    "capacity_model",
    "draw_tokens",
    "estimate_run_s",
    "grpc_request",
    "load_label",
    "main",
    "make_trace",
    "notes",
    "one_router_label",
    "parse_args",
    "plan",
    "plot",
    "pool",
    "pool_rounds",
    "positive_floats",
    "prompt_text",
    "replay",
    "replica_label",
    "report",
    "results",
    "router_args",
    "run_all",
    "run_one",
    "stream_one",
    "targets",
    "trace_for",
    "ttft_p99",
    "wait_routers_see_fleet",
]
