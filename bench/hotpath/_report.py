"""What a run says: the notes on what limited it, the printed report and the results file."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import Any

from bench._common import (
    fmt,
    format_table,
    machine_info,
    machine_line,
    notes_section,
    ratio,
    results_header,
    rounded,
    verdict,
)
from bench._h2load import STREAMS_PER_CONNECTION
from bench.hotpath._measure import Run
from bench.hotpath._options import (
    KV_BLOCKS,
    PROMPT,
    ROLES,
    SIM_SPEED_FACTOR,
    STREAM_PATHS,
    UNARY_PATHS,
    WORKER_CAPACITY,
)
from bench.hotpath._targets import (
    TARGET_ADDED_VS_BARE,
    TARGET_HIT_VS_BARE,
    TARGET_STREAM_VS_BARE,
    targets,
    tokens_per_s,
    unary_p50,
)


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
    lines = [
        f"llm-mesh hot path on loopback: sim worker x{SIM_SPEED_FACTOR:g} speed, "
        f"{o.unary_tokens}-token unary answers, {o.stream_tokens}-token streams in messages of "
        f"{o.stream_interval} tokens; cache service on "
        f"{run.store}; services log at {o.log_level}; h2load closed loop, {o.duration_s:g} s per "
        f"run after {o.warmup_s:g} s warm-up",
        machine_line(),
        "",
    ]
    headers = ["path", "conc", "req/s", "mean ms", "p50 ms", "p99 ms", "p50 x floor"]
    headers += [f"{r} cpu ms/req" for r in ROLES] + ["errors"]
    rows = []
    for c in o.concurrencies:
        floor = unary_p50(run, "bare_hop", c)
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
                    fmt(ratio(unary_p50(run, path, c), floor), 2),
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
    lines += notes_section(notes(run))
    return "\n".join(lines)


def results(run: Run, argv: Sequence[str]) -> dict[str, Any]:
    o = run.options
    data: dict[str, Any] = {
        **results_header("hotpath", argv),
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
            str(c): rounded(ratio(unary_p50(run, path, c), unary_p50(run, "bare_hop", c)))
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
