"""The measurements: each path at each concurrency under h2load, accounted for on the server
side (status codes, cache and worker counters, CPU), and the whole run in order."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from bench._common import Progress
from bench._h2load import H2loadRun, RunLength, run_h2load
from bench.hotpath._mesh import Mesh, generate_request, prime_cache, unary_request, url_path
from bench.hotpath._options import DEADLINE_S, ENTRY, STREAM_PATHS, UNARY_PATHS, Options
from bench.hotpath._python_check import PythonCheck, python_check


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
    length: RunLength,
) -> Measured:
    """Run h2load on ``path`` for ``length`` and account for it on the server side."""
    entry = ENTRY[path]
    url = f"http://{mesh.address(entry)}{url_path(path, method)}"
    counters_before = await mesh.counters()
    cpu_before = mesh.cpu_s()
    run = await run_h2load(h2load, url, body, concurrency, length, deadline_s=DEADLINE_S)
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
        timed=length.timed,
    )


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
        RunLength(requests=concurrency),
        deadline_s=DEADLINE_S,
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
        RunLength(requests=concurrency * rounds),
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
                        RunLength(duration_s=options.duration_s, warmup_s=options.warmup_s),
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
