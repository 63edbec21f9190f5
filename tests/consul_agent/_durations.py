"""Go durations as Consul reads them (``time.ParseDuration``) and writes them
(``time.Duration.String``)."""

from __future__ import annotations

import json
import re

_DURATION_UNITS = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}
_DURATION_PART = re.compile(r"(\d*)(?:\.(\d*))?([^\d.]*)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``"5s"``, ``"100ms"``, ``"1m30s"``): time.ParseDuration."""
    original = text
    sign = 1
    if text[:1] in ("+", "-"):
        sign = -1 if text[0] == "-" else 1
        text = text[1:]
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f"time: invalid duration {json.dumps(original)}")
    total = 0.0
    while text:
        match = _DURATION_PART.match(text)
        assert match is not None
        whole, frac, unit = match.group(1), match.group(2), match.group(3)
        if not whole and not frac:
            raise ValueError(f"time: invalid duration {json.dumps(original)}")
        if not unit:
            raise ValueError(f"time: missing unit in duration {json.dumps(original)}")
        if unit not in _DURATION_UNITS:
            raise ValueError(
                f"time: unknown unit {json.dumps(unit)} in duration {json.dumps(original)}"
            )
        total += float(f"{whole or 0}.{frac or 0}") * _DURATION_UNITS[unit]
        text = text[match.end() :]
    return sign * total / 1e9


def format_go_duration(seconds: float) -> str:
    """A duration as Go's ``time.Duration.String`` writes it (``"10s"``, ``"1m0s"``, ``"1ms"``)."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000_000_000:
        for unit, size in (("ms", 1_000_000), ("\u00b5s", 1_000), ("ns", 1)):
            if ns >= size:
                return sign + _trim(ns / size) + unit
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    text = _trim(rest / 1e9) + "s"
    if hours:
        return f"{sign}{hours}h{minutes}m{text}"
    if minutes:
        return f"{sign}{minutes}m{text}"
    return sign + text


def _trim(value: float) -> str:
    return f"{value:.9f}".rstrip("0").rstrip(".")
