"""Issue 12's targets, judged on each fault's figures."""

from __future__ import annotations

from typing import Any

from bench._common import ratio, rounded
from bench.chaos._options import ROTATION_FAULTS

#: p99 TTFT during a fault at most this many times the baseline's.
TARGET_TTFT_VS_BASELINE = 3.0
#: A dead or cut-off worker out of rotation within this many seconds.
TARGET_OUT_OF_ROTATION_S = 2.0


def targets(name: str, figures: dict[str, Any]) -> dict[str, Any]:
    """The targets of fault ``name``: 0 failed requests (streams included; a killed router's
    in-flight requests apart), p99 TTFT at most 3x the baseline, and for a dead or frozen
    worker, out of rotation within 2 s. ``pass`` is None where not measured."""
    failed = figures["failed_before_first_token"] + figures["failed_after_first_token"]
    x = ratio(figures["p99_ttft_during_ms"], figures["p99_ttft_baseline_ms"])
    out: dict[str, Any] = {
        "zero_failed_requests": {"failed": failed, "pass": failed == 0},
        "p99_ttft_within_3x_baseline": {
            "limit": TARGET_TTFT_VS_BASELINE,
            "ratio": rounded(x, 2),
            "pass": None if x is None else x <= TARGET_TTFT_VS_BASELINE,
        },
    }
    if name in ROTATION_FAULTS:
        seconds = figures["out_of_rotation_s"]
        out["out_of_rotation_within_2s"] = {
            "limit_s": TARGET_OUT_OF_ROTATION_S,
            "seconds": seconds,
            "pass": seconds is not None and seconds <= TARGET_OUT_OF_ROTATION_S,
        }
    return out


def overall(by_fault: dict[str, dict[str, Any]]) -> bool | None:
    """Every target of every fault passed (None if one was not measured and none failed)."""
    verdicts = [t["pass"] for f in by_fault.values() for t in f.values()]
    if any(v is False for v in verdicts):
        return False
    if not verdicts or any(v is None for v in verdicts):
        return None
    return True
