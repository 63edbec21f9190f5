"""``python -m bench hotpath``: what one request costs on the way through the mesh, on loopback.

**Processes** (all real, started like the tests start them, ``--ready-file``): one ``sim``
worker, the cache service on a throwaway ``redis-server`` (the in-process memory store when
Redis is not installed; the output says which), the router (least-loaded, static discovery of
that one worker, the cache service as its cache) and a **bare pass-through proxy**: a
``grpc.aio`` server with a generic handler that forwards ``/llmmesh.v1.Router/Generate`` and
``GenerateStream`` to the worker's ``Generate`` and ``GenerateStream`` bytes for bytes (identity
serializers: no protobuf is parsed), passing on the deadline and the status. It is the floor for
one Python gRPC hop on this machine; the router adds its own work on top of one such hop.
Services log at ``--log-level`` (default ``info``, what a deployment runs: one JSON line per
request in the worker and the router).

**The worker does almost nothing**: ``--sim-speed-factor 1000`` divides every simulated delay
(7 us to a first token, 7 us a decode step), unary requests ask for 4 tokens of a 9-token
prompt, so the time measured is the RPC path's, not the engine's. Capacity 512 with 512 queued
and a KV cache of 65,536 blocks: nothing ever waits for a batch slot.

**Unary paths** (``Generate``, one pre-encoded request, greedy):

- ``bare_hop``: client -> bare proxy -> worker (``CACHE_POLICY_BYPASS``, ignored by the worker);
- ``direct_worker``: client -> worker;
- ``router_miss``: client -> router -> worker with ``CACHE_POLICY_BYPASS``: the router validates,
  resolves the tenant, picks a worker and relays, but neither looks up nor stores;
- ``cache_hit``: client -> router, answered from the cache (looked up in the cache service,
  which reads Redis); the request is stored once before the run.

Each path runs at each concurrency (default 1, 32 and 256) as a closed loop driven by
``h2load`` (nghttp2's HTTP/2 load generator, written in C, so that the client's own cost does not
hide the servers'): ``-m`` streams on each of ``-c`` connections (at most 64 streams a
connection), for ``--duration`` seconds after ``--warm-up`` seconds; latency percentiles come
from its per-request log. Every request carries a deadline (``grpc-timeout``, 60 s), as a
real client's does, so the worker does the same deadline work on every path. The servers' own
Prometheus counters check that every request ended OK (and, for ``cache_hit``, that none reached
the worker). CPU time per request of each server process
(``/proc/<pid>/stat``, user + system, every thread) is the CPU it used during the run over the
requests it completed (warm-up included on both sides).

**Streamed tokens per second**: ``GenerateStream`` asking for ``--stream-tokens`` tokens (every
one of them generated: the sim's natural answers are longer) through the bare proxy, through the
router (``CACHE_POLICY_BYPASS``) and straight to the worker, by ``h2load`` with a request count
(one round of ``concurrency`` streams to warm up and size the run, then enough rounds for about
``--duration``); tokens are the worker's ``llmmesh_worker_generated_tokens_total`` over the run's
wall time. The worker runs with ``--stream-interval`` (default 16: the first token alone, then
messages of 16 tokens). Without it (``--stream-interval 1``) the worker sends one message per
read of its engine's output, coalescing what piled up in between, so how many messages a stream
takes depends on how busy its reader happens to be: at this sim speed (tokens every 7 us, far
faster than any real decode step) the count swung from 34 to 81 per 256-token stream between
runs of the same path, and tokens/s measured that chaos rather than the relay. With a fixed
interval both paths relay the same messages, and tokens/s compares their cost per message.

**Cross-check**: a closed-loop ``grpc.aio`` client in this process at concurrency 1 on each path,
plus ``router_miss_unique``: unique greedy prompts through the router with the default cache
policy, i.e. a real miss (cache lookup, worker, cache store in the background), and
``cache_hit_distinct``: 64 distinct stored requests in turn. h2load repeats one request, so its
``cache_hit`` reads one hot key: where the router coalesces identical requests in flight
(single-flight), the results say how many shared another's answer, and how many lookups were made.

**Targets** (issue 6): cache-hit p50 at most 2x the bare hop's p50; the router's added latency
on a miss (router_miss - direct_worker, p50) at most 2.5x the bare proxy's (bare_hop -
direct_worker); streamed tokens/s through the router at least half the bare proxy's; each at
every concurrency measured.

**Modules**: ``_options`` (what to run, the paths), ``_proxy`` (the bare proxy), ``_mesh`` (the
processes and the requests), ``_measure`` (one measured run and the whole benchmark, with
``bench/_h2load.py`` driving h2load), ``_python_check`` (the cross-check), ``_targets`` (issue 6's
targets), ``_report`` (the printed report and the results file) and ``_cli`` (the command line).
"""

from bench._h2load import STREAMS_PER_CONNECTION, H2loadRun, h2load_shape, run_h2load
from bench.hotpath._cli import main, parse_args
from bench.hotpath._measure import Measured, Run, estimate_s, measure, run_all, run_streams
from bench.hotpath._mesh import Mesh, generate_request, prime_cache, unary_request, url_path
from bench.hotpath._options import (
    ANSWER_TOKENS,
    DEADLINE_S,
    DEFAULT_OUT,
    DISTINCT_KEYS,
    ENTRY,
    KV_BLOCKS,
    MODEL,
    PROMPT,
    ROLES,
    ROUTER_SERVICE,
    SIM_SPEED_FACTOR,
    STREAM_PATHS,
    UNARY_PATHS,
    WORKER_CAPACITY,
    WORKER_SERVICE,
    Options,
)
from bench.hotpath._proxy import PassThroughProxy, ProxyApp, serve_proxy
from bench.hotpath._python_check import PythonCheck, python_check
from bench.hotpath._report import notes, report, results
from bench.hotpath._targets import (
    TARGET_ADDED_VS_BARE,
    TARGET_HIT_VS_BARE,
    TARGET_STREAM_VS_BARE,
    targets,
    tokens_per_s,
)

__all__ = [
    "ANSWER_TOKENS",
    "DEADLINE_S",
    "DEFAULT_OUT",
    "DISTINCT_KEYS",
    "ENTRY",
    "KV_BLOCKS",
    "MODEL",
    "PROMPT",
    "ROLES",
    "ROUTER_SERVICE",
    "SIM_SPEED_FACTOR",
    "STREAMS_PER_CONNECTION",
    "STREAM_PATHS",
    "TARGET_ADDED_VS_BARE",
    "TARGET_HIT_VS_BARE",
    "TARGET_STREAM_VS_BARE",
    "UNARY_PATHS",
    "WORKER_CAPACITY",
    "WORKER_SERVICE",
    "H2loadRun",
    "Measured",
    "Mesh",
    "Options",
    "PassThroughProxy",
    "ProxyApp",
    "PythonCheck",
    "Run",
    "estimate_s",
    "generate_request",
    "h2load_shape",
    "main",
    "measure",
    "notes",
    "parse_args",
    "prime_cache",
    "python_check",
    "report",
    "results",
    "run_all",
    "run_h2load",
    "run_streams",
    "serve_proxy",
    "targets",
    "tokens_per_s",
    "unary_request",
    "url_path",
]
