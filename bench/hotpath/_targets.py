"""Issue 6's targets, judged on a run's figures at each concurrency measured."""

from __future__ import annotations

from typing import Any

from bench._common import percentile, ratio, rounded
from bench.hotpath._measure import Measured, Run

#: Issue 6's targets.
TARGET_HIT_VS_BARE = 2.0
TARGET_ADDED_VS_BARE = 2.5
TARGET_STREAM_VS_BARE = 0.5


def unary_p50(run: Run, path: str, concurrency: int) -> float | None:
    measured = run.unary.get(path, {}).get(concurrency)
    if measured is None or not measured.h2load.latencies_ms:
        return None
    return percentile(measured.h2load.latencies_ms, 50)


def tokens_per_s(measured: Measured) -> float | None:
    if measured.h2load.elapsed_s <= 0 or not measured.generated_tokens:
        return None
    return measured.generated_tokens / measured.h2load.elapsed_s


def targets(run: Run) -> dict[str, Any]:
    """Issue 6's targets at each concurrency; ``pass`` is None where not measured."""
    hit: dict[str, Any] = {}
    added: dict[str, Any] = {}
    stream: dict[str, Any] = {}
    for c in run.options.concurrencies:
        bare, direct = unary_p50(run, "bare_hop", c), unary_p50(run, "direct_worker", c)
        cached, miss = unary_p50(run, "cache_hit", c), unary_p50(run, "router_miss", c)
        r = ratio(cached, bare)
        hit[str(c)] = {
            "cache_hit_p50_ms": rounded(cached),
            "bare_hop_p50_ms": rounded(bare),
            "ratio": rounded(r),
            "pass": None if r is None else r <= TARGET_HIT_VS_BARE,
        }
        router_added = None if miss is None or direct is None else miss - direct
        bare_added = None if bare is None or direct is None else bare - direct
        r = ratio(router_added, bare_added)
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
        r = ratio(tr, tb)
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
