"""Write (or check) the Grafana dashboard ``deploy/grafana/dashboards/llm-mesh.json``.

Usage: python deploy/grafana/dashboard.py [--check]

The dashboard is generated so that its layout stays regular and every query is reviewable in one
place: :data:`ROWS` lists each row's panels and their PromQL. ``--check`` exits 1 when the JSON
file differs from what this script writes; tests/test_deploy.py runs it, and checks that every
``llmmesh_*`` metric the services export appears in some panel and that every metric a panel
queries exists. Edit the panels here, not in the JSON (or export from Grafana and port the
change back).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "llm-mesh.json"
DATASOURCE = {"type": "prometheus", "uid": "llmmesh-prometheus"}
RATE = "$__rate_interval"
SERVER_ERRORS = "UNAVAILABLE|INTERNAL|UNKNOWN|DATA_LOSS|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED"


@dataclass(frozen=True)
class Panel:
    title: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    stack: bool = False
    max: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def quantiles(
    metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.99)
) -> list[tuple[str, str]]:
    """histogram_quantile targets of ``metric`` (its _bucket series), grouped by ``by``."""
    group = f"le, {by}" if by else "le"
    legend_by = "".join(f" {{{{{label.strip()}}}}}" for label in by.split(",") if label.strip())
    return [
        (
            f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))",
            f"p{round(q * 100)}{legend_by}",
        )
        for q in qs
    ]


def rate(metric: str, by: str, selector: str = "") -> str:
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


ROWS = [
    Row(
        "Router: traffic",
        [
            Panel(
                "Requests by method and code",
                [(rate("llmmesh_router_requests_total", "method, code"), "{{method}} {{code}}")],
                unit="reqps",
                description="RPCs answered by the routers (llmmesh_router_requests_total).",
                stack=True,
            ),
            Panel(
                "Server error ratio",
                [
                    (
                        f'sum(rate(llmmesh_router_requests_total{{code=~"{SERVER_ERRORS}"}}[{RATE}]))'
                        f" / sum(rate(llmmesh_router_requests_total[{RATE}]))",
                        "server errors",
                    )
                ],
                unit="percentunit",
                description="Share of router answers with a server-side error code; the "
                "LLMMeshHighErrorRate alert fires above 5%.",
            ),
            Panel(
                "Healthy workers",
                [('max(llmmesh_router_workers{state="healthy"})', "healthy")],
                kind="stat",
                description="HEALTHY workers in the routing table (the most any router sees); "
                "LLMMeshNoHealthyWorker fires at 0.",
            ),
            Panel(
                "Time to first token (router)",
                quantiles("llmmesh_router_time_to_first_token_seconds", "cached"),
                unit="s",
                description="As callers see it, cached and uncached; the alert watches uncached "
                "p99 against 2 s.",
            ),
            Panel(
                "Request duration (router)",
                quantiles("llmmesh_router_request_duration_seconds", "method"),
                unit="s",
            ),
            Panel(
                "Workers by state",
                [("max by (state) (llmmesh_router_workers)", "{{state}}")],
                stack=True,
                description="healthy, suspect (load reports stale), draining, ejected.",
            ),
        ],
    ),
    Row(
        "Router: routing and admission",
        [
            Panel(
                "In flight per worker",
                [("sum by (worker_id) (llmmesh_router_worker_in_flight)", "{{worker_id}}")],
                stack=True,
            ),
            Panel(
                "Load score per worker",
                [("max by (worker_id) (llmmesh_router_worker_score)", "{{worker_id}}")],
                description="Least-loaded routing picks the lowest: (active + queued) / capacity "
                "+ KV cache use.",
            ),
            Panel(
                "Admission queue",
                [
                    ("sum by (model) (llmmesh_router_queue_depth)", "queued {{model}}"),
                    (rate("llmmesh_router_rejected_total", "reason"), "rejected/s {{reason}}"),
                ],
                description="Requests waiting for a free worker, and those turned away.",
            ),
            Panel(
                "Admission queue wait",
                quantiles("llmmesh_router_queue_wait_seconds"),
                unit="s",
            ),
            Panel(
                "Open streams, refused and idle-cancelled streams",
                [
                    ("sum(llmmesh_router_open_streams)", "open"),
                    (rate("llmmesh_router_streams_refused_total", "limit"), "refused/s {{limit}}"),
                    (
                        "sum(rate(llmmesh_router_streams_idle_cancelled_total[$__rate_interval]))",
                        "idle-cancelled/s",
                    ),
                ],
                description="GenerateStream calls open now; those refused above "
                "--max-streams-per-connection or --max-streams-per-tenant; those cancelled "
                "because their caller read nothing for --stream-idle-timeout.",
            ),
            Panel(
                "Retries, ejections, stale reports, busy refusals",
                [
                    (rate("llmmesh_router_retries_total", "code"), "retry {{code}}"),
                    (rate("llmmesh_router_ejections_total", "worker_id"), "ejected {{worker_id}}"),
                    (
                        rate("llmmesh_router_worker_reports_stale_total", "worker_id"),
                        "stale {{worker_id}}",
                    ),
                    ("sum(rate(llmmesh_router_busy_refusals_total[$__rate_interval]))", "busy"),
                ],
                unit="ops",
            ),
            Panel(
                "Discovery",
                [
                    ("min by (source) (llmmesh_router_discovery_up)", "up {{source}}"),
                    (rate("llmmesh_router_discovery_errors_total", "kind"), "errors/s {{kind}}"),
                    (
                        "time() - max by (source) "
                        "(llmmesh_router_discovery_last_success_timestamp_seconds)",
                        "s since last success {{source}}",
                    ),
                    (
                        "time() - max by (source) "
                        "(llmmesh_router_discovery_last_change_timestamp_seconds)",
                        "s since last change {{source}}",
                    ),
                    (
                        "sum(increase(llmmesh_router_discovery_grace_total[$__rate_interval]))",
                        "workers kept through a discovery grace",
                    ),
                    ("sum(llmmesh_router_workers_in_discovery_grace)", "workers in grace now"),
                ],
            ),
        ],
    ),
    Row(
        "Router: cache and single-flight",
        [
            Panel(
                "Cache lookups by result",
                [(rate("llmmesh_router_cache_requests_total", "result"), "{{result}}")],
                unit="ops",
                stack=True,
                description="hit, miss, error (served as a miss), skipped (circuit open).",
            ),
            Panel(
                "Cache stores by result",
                [(rate("llmmesh_router_cache_stores_total", "result"), "{{result}}")],
                unit="ops",
                stack=True,
            ),
            Panel(
                "Coalesced requests and fill locks",
                [
                    (rate("llmmesh_router_coalesced_total", "via"), "coalesced via {{via}}"),
                    (rate("llmmesh_router_cache_fill_locks_total", "event"), "lock {{event}}"),
                    ("sum(llmmesh_router_flight_followers)", "followers waiting"),
                ],
            ),
            Panel(
                "Circuit breakers",
                [
                    (
                        "max by (job, dependency) (llmmesh_router_circuit_state)",
                        "router → {{dependency}}",
                    ),
                    (
                        "max by (job, dependency) (llmmesh_cache_circuit_state)",
                        "cache → {{dependency}}",
                    ),
                ],
                description="0 closed, 1 open, 2 half-open.",
                max=2,
            ),
            Panel(
                "Circuit openings and short-circuited calls",
                [
                    (rate("llmmesh_router_circuit_opened_total", "dependency"), "router opened"),
                    (
                        rate("llmmesh_router_circuit_short_circuited_total", "dependency"),
                        "router refused {{dependency}}",
                    ),
                    (rate("llmmesh_cache_circuit_opened_total", "dependency"), "cache opened"),
                    (
                        rate("llmmesh_cache_circuit_short_circuited_total", "dependency"),
                        "cache refused {{dependency}}",
                    ),
                ],
                unit="ops",
            ),
            Panel(
                "Malformed requests",
                [
                    (
                        rate(f"llmmesh_{service}_malformed_requests_total", "method"),
                        service + " {{method}}",
                    )
                    for service in ("router", "worker", "cache")
                ],
                unit="reqps",
                description="Requests refused with INVALID_ARGUMENT because their bytes do not "
                "parse (invalid UTF-8 in a string field, corrupt protobuf): a misbehaving client.",
            ),
        ],
    ),
    Row(
        "Cache service",
        [
            Panel(
                "Requests by method and code",
                [(rate("llmmesh_cache_requests_total", "method, code"), "{{method}} {{code}}")],
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Request duration",
                quantiles("llmmesh_cache_request_duration_seconds", "method"),
                unit="s",
            ),
            Panel(
                "Lookups and stores by result",
                [
                    (rate("llmmesh_cache_lookups_total", "result"), "lookup {{result}}"),
                    (rate("llmmesh_cache_stores_total", "result"), "store {{result}}"),
                ],
                unit="ops",
            ),
            Panel(
                "Store operation duration",
                quantiles("llmmesh_cache_operation_duration_seconds", "op"),
                unit="s",
            ),
            Panel(
                "Store health",
                [
                    ("min(llmmesh_cache_store_up)", "store up"),
                    (rate("llmmesh_cache_store_errors_total", "op"), "errors/s {{op}}"),
                ],
            ),
            Panel(
                "Single-flight in the cache",
                [
                    ("sum(rate(llmmesh_cache_coalesced_total[$__rate_interval]))", "coalesced/s"),
                    (rate("llmmesh_cache_fill_locks_total", "event"), "lock {{event}}/s"),
                    ("sum(llmmesh_cache_fill_waiters)", "waiters"),
                ],
            ),
        ],
    ),
    Row(
        "Workers",
        [
            Panel(
                "Requests by code",
                [(rate("llmmesh_worker_requests_total", "method, code"), "{{method}} {{code}}")],
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Batch: active, queued, capacity",
                [
                    ("sum by (instance) (llmmesh_worker_active_requests)", "active {{instance}}"),
                    ("sum by (instance) (llmmesh_worker_queued_requests)", "queued {{instance}}"),
                    ("sum by (instance) (llmmesh_worker_capacity)", "capacity {{instance}}"),
                ],
            ),
            Panel(
                "KV cache used",
                [("max by (instance) (llmmesh_worker_kv_cache_used_ratio)", "{{instance}}")],
                unit="percentunit",
                max=1,
            ),
            Panel(
                "Tokens per second",
                [
                    (
                        "sum(rate(llmmesh_worker_generated_tokens_total[$__rate_interval]))",
                        "generated",
                    ),
                    ("sum(rate(llmmesh_worker_prompt_tokens_total[$__rate_interval]))", "prompt"),
                ],
            ),
            Panel(
                "Time to first token (worker)",
                quantiles("llmmesh_worker_time_to_first_token_seconds"),
                unit="s",
            ),
            Panel(
                "Request duration and engine queue wait (worker)",
                [
                    *quantiles("llmmesh_worker_request_duration_seconds"),
                    *[
                        (expr, f"queue {legend}")
                        for expr, legend in quantiles("llmmesh_worker_engine_queue_wait_seconds")
                    ],
                ],
                unit="s",
            ),
            Panel(
                "Generated tokens per request",
                quantiles("llmmesh_worker_request_generated_tokens"),
            ),
            Panel(
                "Aborted requests by reason",
                [(rate("llmmesh_worker_aborted_requests_total", "reason"), "{{reason}}")],
                unit="ops",
            ),
            Panel(
                "Engine health and Consul registration",
                [
                    ("min by (instance) (llmmesh_worker_engine_healthy)", "engine {{instance}}"),
                    (
                        "min by (instance) (llmmesh_worker_consul_registered)",
                        "registered {{instance}}",
                    ),
                    (rate("llmmesh_worker_consul_errors_total", "op"), "consul errors/s {{op}}"),
                ],
            ),
        ],
    ),
]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.max is not None:
        defaults["max"] = panel.max
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
    else:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"color": "red", "value": None}, {"color": "green", "value": 1}],
        }
    if panel.kind == "timeseries":
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
                "refId": chr(ord("A") + i),
            }
            for i, (expr, legend) in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (schema version 39, Grafana 11)."""
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        for i, panel in enumerate(row.panels):
            panels.append(_panel_json(panel, panel_id, (i % 3) * 8, y + (i // 3) * 8))
            panel_id += 1
        y += ((len(row.panels) + 2) // 3) * 8
    return {
        "uid": "llm-mesh",
        "title": "llm-mesh",
        "description": "Router, cache service and workers of an llm-mesh deployment "
        "(generated by deploy/grafana/dashboard.py).",
        "tags": ["llm-mesh"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the JSON is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
