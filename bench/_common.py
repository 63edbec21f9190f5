"""What the benchmarks share: percentiles and ratios, tables, verdicts and the results file, a
progress bar, option lists, CPU meters, a service process started the way tests start one
(``--ready-file``), a client channel, a wait for a condition, a Prometheus scrape and gRPC's
message framing for raw HTTP/2 load generators (``bench/_h2load.py`` runs one)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import shlex
import signal
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import grpc.aio
from prometheus_client.parser import text_string_to_metric_families

from llmmesh import logs
from llmmesh.server import grpc_channel_options

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
T = TypeVar("T")
R = TypeVar("R")


# -- statistics ----------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolating linearly between ranks
    (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded for the results file (None stays None, NaN becomes None)."""
    if value is None or math.isnan(value):
        return None
    return round(value, digits)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is not positive."""
    return a / b if a is not None and b is not None and b > 0 else None


# -- output --------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        parts = [first.ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(rest, widths[1:], strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def fmt(value: float | None, digits: int = 1, *, thousands: bool = False) -> str:
    """A table cell for ``value`` ("-" when there is none)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def verdict(passed: bool | None) -> str:
    """A target's outcome in a report: PASS, FAIL or not measured (None)."""
    return {True: "PASS", False: "FAIL", None: "not measured"}[passed]


def notes_section(notes: Sequence[str]) -> list[str]:
    """A report's closing "Notes:" list, or nothing when there are none."""
    return ["", "Notes:", *(f"- {n}" for n in notes)] if notes else []


def machine_info() -> dict[str, Any]:
    """Where a result was measured."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 0
    return {
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def machine_line() -> str:
    """A report's line saying where it was measured."""
    info = machine_info()
    return (
        f"machine: {info['usable_cpus']} CPUs, {info['processor']}, "
        f"{info['python_implementation']} {info['python']}, {info['platform']}"
    )


def results_header(benchmark: str, argv: Sequence[str]) -> dict[str, Any]:
    """What every results file begins with: the benchmark, its command line, when and where."""
    return {
        "benchmark": benchmark,
        "command": shlex.join(["python", "-m", "bench", benchmark, *argv]),
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }


def write_results(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON at ``path`` (atomically, creating its directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def run_benchmark(
    measure: Coroutine[Any, Any, R],
    argv: Sequence[str],
    *,
    report: Callable[[R], str],
    results: Callable[[R, Sequence[str]], dict[str, Any]],
    out: Path,
) -> R:
    """Run ``measure`` (the benchmark, logging warnings only), print its report, write its
    results (from its command line ``argv``) at ``out`` and say where they are."""
    logs.configure("bench", "warning", json=False)
    run = asyncio.run(measure)
    print(report(run))
    write_results(out, results(run, argv))
    print(f"\nresults: {out}")
    return run


class Progress:
    """A progress bar on stderr, driven by elapsed time against an estimate.

    On a terminal it redraws one line; otherwise (a pipe, CI) it prints one line per phase.
    """

    def __init__(
        self, total_s: float, *, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.total_s = max(total_s, 1e-9)
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self._done_s = 0.0
        self._phase = ""
        self._phase_s = 0.0
        self._phase_started = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def phase(self, label: str, estimate_s: float) -> None:
        """Begin a phase expected to take ``estimate_s`` seconds."""
        self._done_s += self._phase_s
        self._phase, self._phase_s = label, estimate_s
        self._phase_started = time.monotonic()
        if self.enabled and not self.tty:
            print(f"[{self._percent():3.0f}%] {label}", file=self.stream, flush=True)
        self._draw()

    def _percent(self) -> float:
        within = min(time.monotonic() - self._phase_started, self._phase_s * 0.99)
        return min(100.0, 100 * (self._done_s + max(0.0, within)) / self.total_s)

    def _draw(self) -> None:
        if not (self.enabled and self.tty):
            return
        percent = self._percent()
        filled = int(percent / 100 * 30)
        bar = "#" * filled + "." * (30 - filled)
        self.stream.write(f"\r[{bar}] {percent:3.0f}% {self._phase}\033[K")
        self.stream.flush()

    async def __aenter__(self) -> Progress:
        async def redraw() -> None:
            while True:
                await asyncio.sleep(0.25)
                self._draw()

        if self.enabled and self.tty:
            self._task = asyncio.create_task(redraw())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()


# -- options -------------------------------------------------------------------------------------


def parse_list(
    parser: argparse.ArgumentParser,
    flag: str,
    text: str,
    convert: Callable[[str], T],
    what: str = "values",
) -> tuple[T, ...]:
    """The comma-separated items of ``text`` (blanks skipped), each through ``convert``; a
    usage error ``<flag>: not a list of <what>`` when one does not convert (ValueError)."""
    try:
        return tuple(convert(v) for v in text.split(",") if v.strip())
    except ValueError:
        parser.error(f"{flag}: not a list of {what}: {text!r}")


# -- CPU -----------------------------------------------------------------------------------------


def process_cpu_s(pid: int | None = None) -> float | None:
    """CPU seconds (user + system, every thread) used so far by ``pid`` (this process when
    None); None where /proc cannot be read."""
    if pid is None:
        return time.process_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Percent of one core that a process used between :meth:`start` and :meth:`stop`."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid
        self._cpu: float | None = None
        self._wall = 0.0
        self.percent: float | None = None

    def start(self) -> None:
        self._cpu, self._wall = process_cpu_s(self.pid), time.monotonic()

    def stop(self) -> float | None:
        cpu = process_cpu_s(self.pid)
        wall = time.monotonic() - self._wall
        if cpu is None or self._cpu is None or wall <= 0:
            self.percent = None
        else:
            self.percent = 100 * (cpu - self._cpu) / wall
        return self.percent


# -- service processes ---------------------------------------------------------------------------


class ServiceProcess:
    """``python -m <package> --host 127.0.0.1 --port 0 --ready-file F ...`` as a child process,
    ready once it has written its ready file (it is then SERVING)."""

    def __init__(
        self, package: str, args: Sequence[str] = (), *, startup_timeout: float = 30.0
    ) -> None:
        self.package = package
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self._tmp = tempfile.TemporaryDirectory(prefix=f"llmmesh-bench-{package}-")
        self.ready_file = Path(self._tmp.name) / "ready.json"
        self.log_path = Path(self._tmp.name) / "log.jsonl"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServiceProcess:
        self.spawn()
        return self.wait_ready()

    def spawn(self) -> None:
        """Start the process without waiting for it (:meth:`wait_ready` waits)."""
        cmd = [sys.executable, "-m", self.package, "--host", "127.0.0.1"]
        cmd += ["--port", "0", "--ready-file", str(self.ready_file), *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self) -> ServiceProcess:
        """Wait for the ready file of a spawned process (and learn its port)."""
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                self.port = int(json.loads(self.ready_file.read_text())["port"])
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.package} exited with {self.proc.returncode}:\n{self.logs()[-4000:]}"
                )
            time.sleep(0.02)
        self.close()
        raise TimeoutError(f"{self.package} not ready in {self.startup_timeout} s")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> None:
        """Send SIGTERM if it is running (:meth:`close` then waits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def close(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited in 15 s; remove its files."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._tmp.cleanup()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_services(services: Sequence[ServiceProcess]) -> None:
    """Start ``services`` side by side and wait until every one is ready (closing them all if
    one fails)."""
    try:
        for service in services:
            service.spawn()
        for service in services:
            service.wait_ready()
    except BaseException:
        close_services(services)
        raise


def close_services(services: Sequence[ServiceProcess]) -> None:
    """Stop ``services`` side by side: SIGTERM to each, then :meth:`ServiceProcess.close`."""
    for service in services:
        service.terminate()
    for service in services:
        service.close()


# -- waiting -------------------------------------------------------------------------------------


async def wait_until(
    missing: Callable[[], Awaitable[str | None]], *, deadline: float, interval_s: float = 0.05
) -> None:
    """Ask ``missing()`` every ``interval_s`` until it answers None (nothing is missing); past
    ``deadline`` (``time.monotonic()``), a RuntimeError with what it last said was missing."""
    while True:
        problem = await missing()
        if problem is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(problem)
        await asyncio.sleep(interval_s)


# -- channels, metrics, raw gRPC -----------------------------------------------------------------


def open_channel(address: str) -> grpc.aio.Channel:
    """A plaintext client channel to ``address`` with the mesh's own channel options."""
    return grpc.aio.insecure_channel(address, options=grpc_channel_options())


def ready_info(service: ServiceProcess) -> dict[str, Any]:
    """What a started service wrote in its ready file (``pid``, ``port``, ``metrics_port``)."""
    info: dict[str, Any] = json.loads(service.ready_file.read_text())
    return info


def scrape_metrics(port: int, timeout_s: float = 5.0) -> dict[str, float]:
    """Every sample on ``http://127.0.0.1:<port>/metrics``, keyed ``name{label="v",...}``
    (labels sorted)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as reply:
        text = reply.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


GRPC_FRAME_HEADER = struct.Struct(">BI")
"""gRPC's length prefix: a compressed flag byte, then the message length (big-endian)."""


def grpc_frame(payload: bytes) -> bytes:
    """One uncompressed gRPC message frame: the body a raw HTTP/2 client (``h2load -d``) sends."""
    return GRPC_FRAME_HEADER.pack(0, len(payload)) + payload
