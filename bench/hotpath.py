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
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import re
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import grpc
import grpc.aio

from bench._common import (
    ROOT,
    Progress,
    ServiceProcess,
    close_services,
    fmt,
    format_table,
    grpc_frame,
    machine_info,
    percentile,
    process_cpu_s,
    ready_info,
    rounded,
    scrape_metrics,
    start_services,
    write_results,
)
from llmmesh import logs
from llmmesh.server import ServerSettings, ServiceRunner, grpc_channel_options, run_service
from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc
from tests.harness import RedisServer

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
#: The most streams ``h2load`` opens on one connection.
STREAMS_PER_CONNECTION = 64

ROUTER_SERVICE = "/llmmesh.v1.Router/"
WORKER_SERVICE = "/llmmesh.v1.Worker/"
UNARY_PATHS = ("bare_hop", "direct_worker", "router_miss", "cache_hit")
STREAM_PATHS = ("bare", "router", "direct")
#: The process that serves each path's requests first, and the one whose counters say how many
#: requests completed.
ENTRY = {"bare_hop": "proxy", "direct_worker": "worker", "router_miss": "router"}
ENTRY |= {"cache_hit": "router", "bare": "proxy", "router": "router", "direct": "worker"}
ROLES = ("router", "cache", "worker", "proxy", "redis")

#: Issue 6's targets.
TARGET_HIT_VS_BARE = 2.0
TARGET_ADDED_VS_BARE = 2.5
TARGET_STREAM_VS_BARE = 0.5


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


# -- the bare pass-through proxy -----------------------------------------------------------------


class PassThroughProxy(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # not generic at run time
    """Forwards the Router's Generate and GenerateStream to a worker as opaque bytes.

    No message is parsed or built: the handlers and the upstream calls have no serializers, so
    grpc hands over the encoded request and response as they came. The caller's deadline goes
    upstream; an upstream status comes back as it was; a caller that goes away cancels upstream.
    """

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._unary = channel.unary_unary(WORKER_SERVICE + "Generate", None, None)
        self._stream = channel.unary_stream(WORKER_SERVICE + "GenerateStream", None, None)
        self._handlers = {
            ROUTER_SERVICE + "Generate": grpc.unary_unary_rpc_method_handler(self.generate),
            ROUTER_SERVICE + "GenerateStream": grpc.unary_stream_rpc_method_handler(
                self.generate_stream
            ),
        }

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handlers.get(handler_call_details.method)

    async def generate(self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await self._unary(request, timeout=context.time_remaining())
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")

    async def generate_stream(
        self, request: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        call = self._stream(request, timeout=context.time_remaining())
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "")
        finally:
            call.cancel()


class ProxyApp:
    """The proxy as a :class:`llmmesh.server.ServiceApp`: health, ready file and drain for free."""

    service_names: Sequence[str] = ("llmmesh.v1.Router",)

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel: grpc.aio.Channel | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=grpc_channel_options())
        server.add_generic_rpc_handlers((PassThroughProxy(self._channel),))

    async def start(self, runner: ServiceRunner) -> None:
        assert self._channel is not None
        await asyncio.wait_for(self._channel.channel_ready(), 10)

    async def drain(self) -> None:
        """Nothing to deregister."""

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)


def serve_proxy(argv: Sequence[str]) -> int:
    """``python -m bench.hotpath --serve-proxy WORKER --host H --port P --ready-file F``."""
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath --serve-proxy")
    parser.add_argument("--serve-proxy", required=True, metavar="WORKER")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ready-file", default="")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    server_settings = ServerSettings(
        host=args.host,
        port=args.port,
        ready_file=args.ready_file,
        log_level=args.log_level,
        grace=timedelta(seconds=2),
    )
    return run_service(ProxyApp(args.serve_proxy), server_settings, name="bench-proxy")


# -- the mesh under test -------------------------------------------------------------------------


class Mesh:
    """Redis (or not), the cache service, one sim worker, the router and the bare proxy."""

    def __init__(self, options: Options) -> None:
        self.options = options
        use_redis = options.store == "redis" or (
            options.store == "auto" and RedisServer.available()
        )
        self.redis = RedisServer(maxmemory="256mb") if use_redis else None
        self.store = "redis" if use_redis else "memory"
        level = ["--log-level", options.log_level, "--grace", "2s", "--metrics-port", "0"]
        self.worker = ServiceProcess(
            "worker",
            [
                "--engine", "sim",
                "--model", MODEL,
                "--worker-id", "hotpath-w0",
                "--capacity", str(WORKER_CAPACITY),
                "--max-queued", str(WORKER_CAPACITY),
                "--sim-speed-factor", repr(SIM_SPEED_FACTOR),
                "--sim-kv-blocks", str(KV_BLOCKS),
                "--sim-min-answer-tokens", str(ANSWER_TOKENS),
                "--sim-max-answer-tokens", str(ANSWER_TOKENS),
                "--max-tokens-limit", str(ANSWER_TOKENS),
                "--stream-interval", str(options.stream_interval),
                *level,
            ],
        )  # fmt: skip
        self.cache: ServiceProcess | None = None
        self.router: ServiceProcess | None = None
        self.proxy: ServiceProcess | None = None
        self.channels: dict[str, grpc.aio.Channel] = {}

    @property
    def services(self) -> list[ServiceProcess]:
        return [s for s in (self.router, self.proxy, self.cache, self.worker) if s is not None]

    async def start(self) -> None:
        level = ["--log-level", self.options.log_level, "--grace", "2s"]
        try:
            if self.redis is not None:
                await asyncio.to_thread(self.redis.start)
                store = ["--store", "redis", "--redis-url", self.redis.url]
            else:
                store = ["--store", "memory"]
            self.cache = ServiceProcess("cache_service", [*store, *level, "--metrics-port", "0"])
            await asyncio.to_thread(start_services, [self.cache, self.worker])
            self.router = ServiceProcess(
                "router",
                [
                    "--workers", self.worker.address,
                    "--cache-address", self.cache.address,
                    "--max-tokens-limit", str(ANSWER_TOKENS),
                    "--metrics-port", "0",
                    *level,
                ],
            )  # fmt: skip
            self.proxy = ServiceProcess(
                "bench.hotpath",
                ["--serve-proxy", self.worker.address, "--log-level", self.options.log_level],
            )
            await asyncio.to_thread(start_services, [self.router, self.proxy])
            self.channels = {
                role: grpc.aio.insecure_channel(s.address, options=grpc_channel_options())
                for role, s in self.entries().items()
            }
            await self.wait_router_sees_worker()
        except BaseException:
            await self.close()
            raise

    def entries(self) -> dict[str, ServiceProcess]:
        assert self.router is not None
        assert self.proxy is not None
        return {"router": self.router, "proxy": self.proxy, "worker": self.worker}

    async def wait_router_sees_worker(self) -> None:
        stub = router_pb2_grpc.RouterStub(self.channels["router"])
        deadline = time.monotonic() + 20
        while True:
            table = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
            if any(w.state == router_pb2.WORKER_STATE_HEALTHY for w in table.workers):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the router does not see its worker as healthy:\n{table}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close(None)
        await asyncio.to_thread(close_services, self.services)
        if self.redis is not None:
            await asyncio.to_thread(self.redis.close)

    def pids(self) -> dict[str, int]:
        pids = {"worker": self.worker.pid}
        for role, service in (("router", self.router), ("proxy", self.proxy)):
            if service is not None:
                pids[role] = service.pid
        if self.cache is not None:
            pids["cache"] = self.cache.pid
        if self.redis is not None:
            pids["redis"] = self.redis.pid
        return pids

    def cpu_s(self) -> dict[str, float | None]:
        return {role: process_cpu_s(pid) for role, pid in self.pids().items()}

    async def counters(self) -> dict[str, dict[str, float]]:
        """The Prometheus samples of the worker, the router and the cache service."""
        services = {"worker": self.worker, "router": self.router, "cache": self.cache}
        out: dict[str, dict[str, float]] = {}
        for role, service in services.items():
            assert service is not None
            port = int(ready_info(service)["metrics_port"])
            out[role] = await asyncio.to_thread(scrape_metrics, port)
        return out

    def address(self, role: str) -> str:
        return self.entries()[role].address


# -- requests ------------------------------------------------------------------------------------


def generate_request(
    max_tokens: int,
    *,
    cache_policy: generate_pb2.CachePolicy.ValueType = generate_pb2.CACHE_POLICY_BYPASS,
    prompt: str = PROMPT,
) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model=MODEL,
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        cache_policy=cache_policy,
    )


def unary_request(path: str, options: Options) -> generate_pb2.GenerateRequest:
    """The request each h2load run of ``path`` sends (the same bytes every time)."""
    if path == "cache_hit":
        return generate_request(
            options.unary_tokens, cache_policy=generate_pb2.CACHE_POLICY_UNSPECIFIED
        )
    return generate_request(options.unary_tokens)


def url_path(path: str, method: str) -> str:
    return (WORKER_SERVICE if ENTRY[path] == "worker" else ROUTER_SERVICE) + method


async def prime_cache(mesh: Mesh, options: Options) -> None:
    """Store the cache_hit request's answer and wait until the router answers it from cache."""
    stub = router_pb2_grpc.RouterStub(mesh.channels["router"])
    request = unary_request("cache_hit", options)
    deadline = time.monotonic() + 10
    while True:
        response = await stub.Generate(request, timeout=5)
        if response.summary.cached:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the router never answered the primed request from the cache")
        await asyncio.sleep(0.05)


# -- h2load --------------------------------------------------------------------------------------


@dataclass
class H2loadRun:
    """What one h2load run measured (latencies in ms, from its per-request log)."""

    command: list[str]
    clients: int
    streams_per_client: int
    done: int
    succeeded: int
    failed: int
    errored: int
    elapsed_s: float
    req_per_s: float
    latencies_ms: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0

    def figures(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "connections": self.clients,
            "streams_per_connection": self.streams_per_client,
            "requests": self.succeeded,
            "failed": self.failed + self.errored,
            "elapsed_s": rounded(self.elapsed_s, 3),
            "req_per_s": rounded(self.req_per_s, 1),
            "mean_ms": rounded(sum(lat) / len(lat) if lat else math.nan),
            "p50_ms": rounded(percentile(lat, 50)),
            "p90_ms": rounded(percentile(lat, 90)),
            "p99_ms": rounded(percentile(lat, 99)),
            "max_ms": rounded(max(lat) if lat else math.nan),
            "h2load_cpu_ms_per_request": rounded(
                1000 * self.client_cpu_s / self.succeeded if self.succeeded else math.nan, 4
            ),
        }


def h2load_shape(concurrency: int) -> tuple[int, int]:
    """(connections, streams per connection) giving ``concurrency`` streams in all."""
    clients = math.ceil(concurrency / STREAMS_PER_CONNECTION)
    while concurrency % clients:
        clients += 1
    return clients, concurrency // clients


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored"
)
_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")


async def run_h2load(
    h2load: str,
    url: str,
    body: bytes,
    concurrency: int,
    *,
    duration_s: float | None = None,
    warmup_s: float = 0.0,
    requests: int | None = None,
) -> H2loadRun:
    """One closed-loop h2load run of ``concurrency`` streams: for ``duration_s`` after
    ``warmup_s``, or for ``requests`` requests."""
    clients, streams = h2load_shape(concurrency)
    with tempfile.TemporaryDirectory(prefix="llmmesh-h2load-") as tmp:
        frame = Path(tmp) / "request.bin"
        frame.write_bytes(grpc_frame(body))
        log_file = Path(tmp) / "requests.tsv"
        command = [h2load, "-c", str(clients), "-m", str(streams), "-t", "1"]
        command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        command += ["-H", f"grpc-timeout: {DEADLINE_S}S"]
        command += ["-d", str(frame), "--log-file", str(log_file)]
        if requests is not None:
            command += ["-n", str(requests)]
        else:
            assert duration_s is not None
            command += ["-D", f"{round(duration_s * 1000)}ms"]
            if warmup_s > 0:
                command += ["--warm-up-time", f"{round(warmup_s * 1000)}ms"]
        command.append(url)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        limit = (duration_s or 0) + warmup_s + 120
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        text = out.decode(errors="replace")
        counts, finished = _REQUESTS.search(text), _FINISHED.search(text)
        if proc.returncode != 0 or counts is None or finished is None:
            raise RuntimeError(f"h2load failed ({proc.returncode}): {shlex.join(command)}\n{text}")
        latencies = []
        for line in log_file.read_text().splitlines():
            fields = line.split("\t")
            if len(fields) >= 3 and fields[1] == "200":
                latencies.append(int(fields[2]) / 1000)
    _, _, done, succeeded, failed, errored = map(int, counts.groups())
    elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
    return H2loadRun(
        command=[Path(command[0]).name, *command[1:]],
        clients=clients,
        streams_per_client=streams,
        done=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        elapsed_s=elapsed,
        req_per_s=float(finished.group(3)),
        latencies_ms=latencies,
        client_cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
    )


# -- one measured run ----------------------------------------------------------------------------


@dataclass
class Measured:
    """One path at one concurrency: h2load's figures, the servers' counts and CPU."""

    path: str
    concurrency: int
    h2load: H2loadRun
    #: Requests the entry process completed with each status code during the run.
    codes: dict[str, int]
    cpu_s: dict[str, float | None]
    #: Router counters: cache lookups answered as hits, all cache lookups, requests answered
    #: with an identical request's answer (single-flight); worker requests (cache_hit: none).
    cache_hits: int = 0
    cache_lookups: int = 0
    coalesced: int = 0
    worker_requests: int = 0
    generated_tokens: int = 0
    #: A run for a duration (else for a request count).
    timed: bool = True

    @property
    def completed(self) -> int:
        return self.codes.get("OK", 0)

    @property
    def cut_at_end(self) -> int:
        """Requests cancelled because a timed h2load run ended while they were in flight."""
        return min(self.codes.get("CANCELLED", 0), self.concurrency) if self.timed else 0

    @property
    def errors(self) -> int:
        """Requests that did not end OK, but for those cut at the end of a timed run."""
        not_ok = sum(n for code, n in self.codes.items() if code != "OK") - self.cut_at_end
        return not_ok + self.h2load.failed + self.h2load.errored

    def cpu_ms_per_request(self) -> dict[str, float | None]:
        n = self.completed
        out: dict[str, float | None] = {
            role: None if s is None or not n else 1000 * s / n for role, s in self.cpu_s.items()
        }
        known = [v for v in out.values() if v is not None]
        out["servers_total"] = sum(known) if known else None
        out["h2load"] = 1000 * self.h2load.client_cpu_s / n if n else None
        return out


def _codes(
    before: dict[str, float], after: dict[str, float], metric: str, method: str
) -> dict[str, int]:
    pattern = re.compile(rf'^{metric}\{{code="([A-Z_]+)",method="{method}"\}}$')
    codes: dict[str, int] = {}
    for key, value in after.items():
        m = pattern.match(key)
        if m:
            n = round(value - before.get(key, 0.0))
            if n:
                codes[m.group(1)] = n
    return codes


async def measure(
    mesh: Mesh,
    h2load: str,
    path: str,
    concurrency: int,
    method: str,
    body: bytes,
    *,
    duration_s: float | None = None,
    warmup_s: float = 0.0,
    requests: int | None = None,
) -> Measured:
    """Run h2load on ``path`` and account for it on the server side."""
    entry = ENTRY[path]
    url = f"http://{mesh.address(entry)}{url_path(path, method)}"
    counters_before = await mesh.counters()
    cpu_before = mesh.cpu_s()
    run = await run_h2load(
        h2load,
        url,
        body,
        concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
        requests=requests,
    )
    cpu_after = mesh.cpu_s()
    counters_after = await mesh.counters()
    # The proxy counts nothing: the worker counts what it forwarded.
    counting = "router" if entry == "router" else "worker"
    codes = _codes(
        counters_before[counting],
        counters_after[counting],
        f"llmmesh_{counting}_requests_total",
        method,
    )
    cpu = {
        role: None if b is None or cpu_after.get(role) is None else cpu_after[role] - b  # type: ignore[operator]
        for role, b in cpu_before.items()
    }

    def delta(role: str, key: str) -> int:
        return round(counters_after[role].get(key, 0.0) - counters_before[role].get(key, 0.0))

    def delta_all(role: str, name: str) -> int:
        """Every labelled sample of counter ``name`` together."""
        keys = {k for k in (*counters_before[role], *counters_after[role]) if k.startswith(name)}
        return sum(delta(role, k) for k in keys)

    return Measured(
        path=path,
        concurrency=concurrency,
        h2load=run,
        codes=codes,
        cpu_s=cpu,
        cache_hits=delta("router", 'llmmesh_router_cache_requests_total{result="hit"}'),
        cache_lookups=delta_all("router", "llmmesh_router_cache_requests_total{"),
        coalesced=delta_all("router", "llmmesh_router_coalesced_total{"),
        worker_requests=delta_all("worker", "llmmesh_worker_requests_total{"),
        generated_tokens=delta("worker", "llmmesh_worker_generated_tokens_total{}"),
        timed=requests is None,
    )


# -- the Python client cross-check ---------------------------------------------------------------


@dataclass
class PythonCheck:
    """A closed loop of ``grpc.aio`` calls from this process at concurrency 1."""

    path: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    cached: int = 0
    client_cpu_percent: float | None = None

    def figures(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {
            "requests": len(lat),
            "errors": self.errors,
            "p50_ms": rounded(percentile(lat, 50)),
            "p99_ms": rounded(percentile(lat, 99)),
            "answered_from_cache": self.cached,
            "client_cpu_percent": rounded(self.client_cpu_percent, 1),
            **({"first_error": self.first_error} if self.first_error else {}),
        }


async def python_check(mesh: Mesh, path: str, options: Options) -> PythonCheck:
    check = PythonCheck(path)
    entry = ENTRY.get(path, "router")
    channel = mesh.channels[entry]
    call: Callable[[generate_pb2.GenerateRequest], Awaitable[generate_pb2.GenerateResponse]]
    if entry == "worker":
        call = worker_pb2_grpc.WorkerStub(channel).Generate
    else:
        call = router_pb2_grpc.RouterStub(channel).Generate
    fixed = unary_request(path, options) if path in UNARY_PATHS else None
    tag = time.monotonic_ns()
    distinct = [
        generate_request(
            options.unary_tokens,
            cache_policy=generate_pb2.CACHE_POLICY_UNSPECIFIED,
            prompt=f"{PROMPT} [distinct {tag}-{i}]",
        )
        for i in range(DISTINCT_KEYS if path == "cache_hit_distinct" else 0)
    ]
    for request in distinct:
        await call(request, timeout=10)
    if distinct:
        await asyncio.sleep(0.2)  # the router stores in the background
    cpu0, wall0 = time.process_time(), time.perf_counter()
    end = wall0 + options.python_check_s
    n = 0
    while time.perf_counter() < end:
        n += 1
        request = (
            fixed
            or (distinct[n % len(distinct)] if distinct else None)
            or generate_request(
                options.unary_tokens,
                cache_policy=generate_pb2.CACHE_POLICY_UNSPECIFIED,
                prompt=f"{PROMPT} [{tag}-{n}]",
            )
        )
        started = time.perf_counter()
        try:
            response = await call(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            check.errors += 1
            check.first_error = check.first_error or f"{exc.code().name}: {exc.details()}"
            continue
        check.latencies_ms.append((time.perf_counter() - started) * 1000)
        check.cached += int(response.summary.cached)
    wall = time.perf_counter() - wall0
    check.client_cpu_percent = 100 * (time.process_time() - cpu0) / wall if wall > 0 else None
    return check


# -- the whole benchmark -------------------------------------------------------------------------


@dataclass
class Run:
    options: Options
    store: str = ""
    unary: dict[str, dict[int, Measured]] = field(default_factory=dict)
    streams: dict[str, dict[int, Measured]] = field(default_factory=dict)
    stream_warmup_s: dict[str, dict[int, float]] = field(default_factory=dict)
    python: dict[str, PythonCheck] = field(default_factory=dict)


def estimate_s(options: Options) -> float:
    levels = len(options.concurrencies)
    unary = levels * len(UNARY_PATHS) * (options.duration_s + options.warmup_s + 0.4)
    streams = levels * len(STREAM_PATHS) * (options.duration_s + 1.0)
    check = (len(UNARY_PATHS) + 2) * options.python_check_s if options.python_check else 0
    return 6 + unary + streams + check


async def run_streams(
    mesh: Mesh, h2load: str, run: Run, path: str, concurrency: int, body: bytes
) -> Measured:
    """One round of ``concurrency`` streams (a warm-up that sizes the run), then enough rounds
    for about the run's duration."""
    options = run.options
    started = time.perf_counter()
    await run_h2load(
        h2load,
        f"http://{mesh.address(ENTRY[path])}{url_path(path, 'GenerateStream')}",
        body,
        concurrency,
        requests=concurrency,
    )
    round_s = time.perf_counter() - started
    run.stream_warmup_s.setdefault(path, {})[concurrency] = round_s
    rounds = max(1, round(options.duration_s / max(round_s, 1e-3)))
    return await measure(
        mesh,
        h2load,
        path,
        concurrency,
        "GenerateStream",
        body,
        requests=concurrency * rounds,
    )


async def run_all(options: Options, h2load: str) -> Run:
    run = Run(options)
    async with Progress(estimate_s(options), enabled=options.progress) as progress:
        mesh = Mesh(options)
        run.store = mesh.store
        progress.phase(f"starting redis ({mesh.store} store), cache, worker, router, proxy", 6)
        await mesh.start()
        try:
            await prime_cache(mesh, options)
            for concurrency in options.concurrencies:
                for path in UNARY_PATHS:
                    progress.phase(
                        f"{path} at concurrency {concurrency}",
                        options.duration_s + options.warmup_s + 0.4,
                    )
                    body = unary_request(path, options).SerializeToString()
                    measured = await measure(
                        mesh,
                        h2load,
                        path,
                        concurrency,
                        "Generate",
                        body,
                        duration_s=options.duration_s,
                        warmup_s=options.warmup_s,
                    )
                    run.unary.setdefault(path, {})[concurrency] = measured
            stream_body = generate_request(options.stream_tokens).SerializeToString()
            for concurrency in options.concurrencies:
                for path in STREAM_PATHS:
                    progress.phase(
                        f"{options.stream_tokens}-token streams via {path} at concurrency "
                        f"{concurrency}",
                        options.duration_s + 1.0,
                    )
                    measured = await run_streams(mesh, h2load, run, path, concurrency, stream_body)
                    run.streams.setdefault(path, {})[concurrency] = measured
            if options.python_check:
                for path in (*UNARY_PATHS, "router_miss_unique", "cache_hit_distinct"):
                    progress.phase(f"python client: {path}", options.python_check_s)
                    run.python[path] = await python_check(mesh, path, options)
        finally:
            await mesh.close()
    return run


# -- reporting -----------------------------------------------------------------------------------


def _p50(run: Run, path: str, concurrency: int) -> float | None:
    measured = run.unary.get(path, {}).get(concurrency)
    if measured is None or not measured.h2load.latencies_ms:
        return None
    return percentile(measured.h2load.latencies_ms, 50)


def tokens_per_s(measured: Measured) -> float | None:
    if measured.h2load.elapsed_s <= 0 or not measured.generated_tokens:
        return None
    return measured.generated_tokens / measured.h2load.elapsed_s


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b is not None and b > 0 else None


def targets(run: Run) -> dict[str, Any]:
    """Issue 6's targets at each concurrency; ``pass`` is None where not measured."""
    hit: dict[str, Any] = {}
    added: dict[str, Any] = {}
    stream: dict[str, Any] = {}
    for c in run.options.concurrencies:
        bare, direct = _p50(run, "bare_hop", c), _p50(run, "direct_worker", c)
        cached, miss = _p50(run, "cache_hit", c), _p50(run, "router_miss", c)
        r = _ratio(cached, bare)
        hit[str(c)] = {
            "cache_hit_p50_ms": rounded(cached),
            "bare_hop_p50_ms": rounded(bare),
            "ratio": rounded(r),
            "pass": None if r is None else r <= TARGET_HIT_VS_BARE,
        }
        router_added = None if miss is None or direct is None else miss - direct
        bare_added = None if bare is None or direct is None else bare - direct
        r = _ratio(router_added, bare_added)
        added[str(c)] = {
            "router_added_ms": rounded(router_added),
            "bare_added_ms": rounded(bare_added),
            "ratio": rounded(r),
            "pass": None if r is None else r <= TARGET_ADDED_VS_BARE,
        }
        via_bare = run.streams.get("bare", {}).get(c)
        via_router = run.streams.get("router", {}).get(c)
        tb = tokens_per_s(via_bare) if via_bare else None
        tr = tokens_per_s(via_router) if via_router else None
        r = _ratio(tr, tb)
        stream[str(c)] = {
            "router_tokens_per_s": rounded(tr, 1),
            "bare_tokens_per_s": rounded(tb, 1),
            "ratio": rounded(r),
            "pass": None if r is None else r >= TARGET_STREAM_VS_BARE,
        }

    def overall(by_level: dict[str, Any]) -> bool | None:
        verdicts = [v["pass"] for v in by_level.values()]
        if any(v is None for v in verdicts) or not verdicts:
            return None
        return all(verdicts)

    return {
        "cache_hit_p50_within_2x_bare_hop": {
            "limit": TARGET_HIT_VS_BARE,
            "by_concurrency": hit,
            "pass": overall(hit),
        },
        "router_added_latency_within_2_5x_bare_proxy": {
            "limit": TARGET_ADDED_VS_BARE,
            "definition": "p50(router_miss) - p50(direct_worker) vs "
            "p50(bare_hop) - p50(direct_worker)",
            "by_concurrency": added,
            "pass": overall(added),
        },
        "router_stream_tokens_at_least_half_bare": {
            "limit": TARGET_STREAM_VS_BARE,
            "by_concurrency": stream,
            "pass": overall(stream),
        },
    }


def notes(run: Run) -> list[str]:
    out: list[str] = []
    cpus = machine_info()["usable_cpus"] or 1
    for group in (run.unary, run.streams):
        for path, by_level in group.items():
            for c, m in by_level.items():
                if m.errors:
                    out.append(
                        f"{path} at {c}: {m.errors} requests did not end OK "
                        f"(server codes {m.codes}, h2load failed {m.h2load.failed}, "
                        f"errored {m.h2load.errored})"
                    )
                if path == "cache_hit" and m.worker_requests:
                    out.append(
                        f"cache_hit at {c}: {m.worker_requests} of {m.completed} requests reached "
                        "the worker (cache lookups that failed or timed out)"
                    )
                if path == "cache_hit" and m.coalesced:
                    out.append(
                        f"cache_hit at {c}: {m.coalesced} of {m.completed} requests shared an "
                        f"identical request's answer (the router's single-flight; "
                        f"{m.cache_lookups} cache lookups): one hot key, as h2load repeats one "
                        "request; the Python cross-check's cache_hit_distinct reads distinct keys"
                    )
                busy = sum(v or 0 for v in m.cpu_s.values()) + m.h2load.client_cpu_s
                wall = m.h2load.elapsed_s
                if group is run.unary:
                    wall += run.options.warmup_s
                if wall > 0 and busy / wall >= 0.9 * cpus:
                    out.append(
                        f"{path} at {c}: the processes used {100 * busy / wall:.0f}% of a core "
                        f"on {cpus} CPUs: the machine was saturated"
                    )
    for path, check in run.python.items():
        if check.errors:
            out.append(f"python client {path}: {check.errors} errors ({check.first_error})")
    return out


def report(run: Run) -> str:
    o = run.options
    info = machine_info()
    lines = [
        f"llm-mesh hot path on loopback: sim worker x{SIM_SPEED_FACTOR:g} speed, "
        f"{o.unary_tokens}-token unary answers, {o.stream_tokens}-token streams in messages of "
        f"{o.stream_interval} tokens; cache service on "
        f"{run.store}; services log at {o.log_level}; h2load closed loop, {o.duration_s:g} s per "
        f"run after {o.warmup_s:g} s warm-up",
        f"machine: {info['usable_cpus']} CPUs, {info['processor']}, "
        f"{info['python_implementation']} {info['python']}, {info['platform']}",
        "",
    ]
    headers = ["path", "conc", "req/s", "mean ms", "p50 ms", "p99 ms", "p50 x floor"]
    headers += [f"{r} cpu ms/req" for r in ROLES] + ["errors"]
    rows = []
    for c in o.concurrencies:
        floor = _p50(run, "bare_hop", c)
        for path in UNARY_PATHS:
            m = run.unary.get(path, {}).get(c)
            if m is None:
                continue
            f = m.h2load.figures()
            cpu = m.cpu_ms_per_request()
            rows.append(
                [
                    path,
                    str(c),
                    fmt(f["req_per_s"], 0, thousands=True),
                    fmt(f["mean_ms"], 3),
                    fmt(f["p50_ms"], 3),
                    fmt(f["p99_ms"], 3),
                    fmt(_ratio(_p50(run, path, c), floor), 2),
                    *(fmt(cpu.get(r), 3) for r in ROLES),
                    str(m.errors),
                ]
            )
    lines.append(format_table(headers, rows))
    lines += ["", f"Streamed tokens/s ({o.stream_tokens}-token GenerateStream):"]
    headers = ["path", *(f"conc {c}" for c in o.concurrencies)]
    rows = []
    for path in STREAM_PATHS:
        by_level = run.streams.get(path, {})
        rows.append(
            [
                path,
                *(
                    fmt(tokens_per_s(by_level[c]) if c in by_level else None, 0, thousands=True)
                    for c in o.concurrencies
                ),
            ]
        )
    lines.append(format_table(headers, rows))
    t = targets(run)

    def verdict(passed: bool | None) -> str:
        return {True: "PASS", False: "FAIL", None: "not measured"}[passed]

    a = t["cache_hit_p50_within_2x_bare_hop"]
    b = t["router_added_latency_within_2_5x_bare_proxy"]
    s = t["router_stream_tokens_at_least_half_bare"]
    lines += ["", "Targets:"]
    lines.append(f"- cache-hit p50 <= {TARGET_HIT_VS_BARE:g}x the bare hop's: {verdict(a['pass'])}")
    for c, v in a["by_concurrency"].items():
        lines.append(
            f"    conc {c}: {fmt(v['cache_hit_p50_ms'], 3)} vs {fmt(v['bare_hop_p50_ms'], 3)} ms, "
            f"ratio {fmt(v['ratio'], 2)}"
        )
    lines.append(
        f"- router's added latency on a miss <= {TARGET_ADDED_VS_BARE:g}x the bare proxy's "
        f"(p50 minus direct_worker's): {verdict(b['pass'])}"
    )
    for c, v in b["by_concurrency"].items():
        lines.append(
            f"    conc {c}: {fmt(v['router_added_ms'], 3)} vs {fmt(v['bare_added_ms'], 3)} ms, "
            f"ratio {fmt(v['ratio'], 2)}"
        )
    lines.append(
        f"- streamed tokens/s via the router >= {TARGET_STREAM_VS_BARE:g}x via the bare proxy: "
        f"{verdict(s['pass'])}"
    )
    for c, v in s["by_concurrency"].items():
        lines.append(
            f"    conc {c}: {fmt(v['router_tokens_per_s'], 0, thousands=True)} vs "
            f"{fmt(v['bare_tokens_per_s'], 0, thousands=True)} tokens/s, ratio "
            f"{fmt(v['ratio'], 2)}"
        )
    if run.python:
        lines += ["", "Cross-check, Python grpc.aio client at concurrency 1:"]
        headers = ["path", "requests", "p50 ms", "p99 ms", "from cache", "client cpu %"]
        rows = []
        for path, check in run.python.items():
            f = check.figures()
            rows.append(
                [
                    path,
                    str(f["requests"]),
                    fmt(f["p50_ms"], 3),
                    fmt(f["p99_ms"], 3),
                    str(f["answered_from_cache"]),
                    fmt(f["client_cpu_percent"], 0),
                ]
            )
        lines.append(format_table(headers, rows))
    found = notes(run)
    if found:
        lines += ["", "Notes:", *(f"- {n}" for n in found)]
    return "\n".join(lines)


def results(run: Run, argv: Sequence[str]) -> dict[str, Any]:
    o = run.options
    data: dict[str, Any] = {
        "benchmark": "hotpath",
        "command": shlex.join(["python", "-m", "bench", "hotpath", *argv]),
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "concurrencies": list(o.concurrencies),
            "duration_s": o.duration_s,
            "warmup_s": o.warmup_s,
            "unary_max_tokens": o.unary_tokens,
            "stream_max_tokens": o.stream_tokens,
            "worker_stream_interval": o.stream_interval,
            "prompt": PROMPT,
            "sampling": "greedy (temperature 0)",
            "cache_store": run.store,
            "log_level": o.log_level,
            "sim_speed_factor": SIM_SPEED_FACTOR,
            "worker_capacity": WORKER_CAPACITY,
            "worker_max_queued": WORKER_CAPACITY,
            "sim_kv_blocks": KV_BLOCKS,
            "router": "least-loaded, static discovery, cache timeout 50 ms (defaults)",
            "load_generator": "h2load closed loop, at most "
            f"{STREAMS_PER_CONNECTION} streams per connection",
        },
    }
    for path in UNARY_PATHS:
        data[path] = {
            str(c): {
                "p50_ms": m.h2load.figures()["p50_ms"],
                "p99_ms": m.h2load.figures()["p99_ms"],
            }
            for c, m in run.unary.get(path, {}).items()
        }
    data["stream_tokens_per_s"] = {
        path: {str(c): rounded(tokens_per_s(m), 1) for c, m in run.streams.get(path, {}).items()}
        for path in STREAM_PATHS
    }
    data["ratios_to_floor"] = {
        path: {
            str(c): rounded(_ratio(_p50(run, path, c), _p50(run, "bare_hop", c)))
            for c in run.unary.get(path, {})
        }
        for path in UNARY_PATHS
    }
    data["h2load"] = {
        "unary": {
            path: {
                str(c): {
                    **m.h2load.figures(),
                    "server_codes": m.codes,
                    **(
                        {
                            "cache_hits": m.cache_hits,
                            "cache_lookups": m.cache_lookups,
                            "coalesced": m.coalesced,
                            "worker_requests": m.worker_requests,
                        }
                        if path == "cache_hit"
                        else {}
                    ),
                }
                for c, m in by_level.items()
            }
            for path, by_level in run.unary.items()
        },
        "streams": {
            path: {
                str(c): {
                    **m.h2load.figures(),
                    "server_codes": m.codes,
                    "generated_tokens": m.generated_tokens,
                    "warm_up_round_s": rounded(run.stream_warmup_s.get(path, {}).get(c), 3),
                }
                for c, m in by_level.items()
            }
            for path, by_level in run.streams.items()
        },
        "example_command": next(
            (shlex.join(m.h2load.command) for by in run.unary.values() for m in by.values()),
            None,
        ),
    }
    data["cpu_ms_per_request"] = {
        "unary": {
            path: {
                str(c): {k: rounded(v, 4) for k, v in m.cpu_ms_per_request().items()}
                for c, m in by_level.items()
            }
            for path, by_level in run.unary.items()
        },
        "streams": {
            path: {
                str(c): {k: rounded(v, 4) for k, v in m.cpu_ms_per_request().items()}
                for c, m in by_level.items()
            }
            for path, by_level in run.streams.items()
        },
    }
    data["python_client"] = {path: check.figures() for path, check in run.python.items()}
    data["targets"] = targets(run)
    data["notes"] = notes(run)
    return data


# -- command line --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m bench hotpath",
        description="The RPC hot path on loopback: a bare grpc.aio pass-through hop (the floor), "
        "a direct worker call, the router on a cache miss and on a hit, and streamed tokens/s, "
        "driven by h2load.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1 s per run, 128-token streams (under a minute)"
    )
    parser.add_argument(
        "--concurrency", default="1,32,256", help="comma-separated concurrencies (default 1,32,256)"
    )
    parser.add_argument(
        "--duration", type=float, default=None, help="seconds per run (default 5; --quick 1)"
    )
    parser.add_argument(
        "--warm-up",
        type=float,
        default=None,
        help="h2load warm-up seconds (default 0.5; --quick 0.25)",
    )
    parser.add_argument(
        "--stream-tokens",
        type=int,
        default=None,
        help="tokens per streamed answer (default 256; --quick 128)",
    )
    parser.add_argument(
        "--stream-interval",
        type=int,
        default=16,
        help="the worker's --stream-interval: tokens per streamed message after the first "
        "(default 16)",
    )
    parser.add_argument(
        "--store",
        choices=("auto", "redis", "memory"),
        default="auto",
        help="the cache service's store (auto: redis when redis-server is installed)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the services' log level (default info, their default)",
    )
    parser.add_argument(
        "--no-python-check", action="store_true", help="skip the Python client cross-check"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="results JSON (default bench/results/hotpath.json)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = parser.parse_args(argv)
    try:
        levels = tuple(int(v) for v in args.concurrency.split(",") if v.strip())
    except ValueError:
        parser.error(f"--concurrency: not a list of integers: {args.concurrency!r}")
    if not levels or min(levels) < 1 or len(set(levels)) != len(levels):
        parser.error("--concurrency: give distinct integers >= 1")
    duration = args.duration if args.duration is not None else (1.0 if args.quick else 5.0)
    warmup = args.warm_up if args.warm_up is not None else (0.25 if args.quick else 0.5)
    tokens = args.stream_tokens if args.stream_tokens is not None else (128 if args.quick else 256)
    if not (math.isfinite(duration) and duration > 0):
        parser.error("--duration: must be > 0")
    if not (math.isfinite(warmup) and warmup >= 0):
        parser.error("--warm-up: must be >= 0")
    if not 1 <= tokens <= ANSWER_TOKENS:
        parser.error(f"--stream-tokens: must be 1 to {ANSWER_TOKENS}")
    if args.stream_interval < 1:
        parser.error("--stream-interval: must be >= 1")
    return Options(
        concurrencies=levels,
        duration_s=duration,
        warmup_s=warmup,
        stream_tokens=tokens,
        stream_interval=args.stream_interval,
        store=args.store,
        log_level=args.log_level,
        python_check=not args.no_python_check,
        python_check_s=0.5 if args.quick else 2.0,
        out=args.out,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str]) -> int:
    if any(a == "--serve-proxy" or a.startswith("--serve-proxy=") for a in argv):
        return serve_proxy(argv)
    options = parse_args(argv)
    h2load = shutil.which("h2load")
    if h2load is None:
        print(
            "h2load is not installed: apt-get install -y nghttp2-client (Debian's HTTP/2 tools)",
            file=sys.stderr,
        )
        return 2
    logs.configure("bench", "warning", json=False)
    run = asyncio.run(run_all(options, h2load))
    print(report(run))
    write_results(options.out, results(run, argv))
    print(f"\nresults: {options.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
