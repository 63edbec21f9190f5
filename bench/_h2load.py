"""h2load (nghttp2's HTTP/2 load generator, written in C) as a gRPC load generator: one closed-loop
run of a pre-encoded request, for a duration or a request count, and what it measured.

Every request carries a deadline (``grpc-timeout``) as a real client's would; latencies come from
h2load's per-request log, and the CPU it used from this process's children's resource usage.
"""

from __future__ import annotations

import asyncio
import math
import re
import resource
import shlex
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._common import grpc_frame, percentile, rounded

#: The most streams ``h2load`` opens on one connection.
STREAMS_PER_CONNECTION = 64


@dataclass(frozen=True, kw_only=True)
class RunLength:
    """How long one h2load run lasts: ``duration_s`` seconds after ``warmup_s`` seconds, or
    ``requests`` requests."""

    duration_s: float | None = None
    warmup_s: float = 0.0
    requests: int | None = None

    @property
    def timed(self) -> bool:
        """A run for a duration (else for a request count)."""
        return self.requests is None


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
    length: RunLength,
    *,
    deadline_s: int,
) -> H2loadRun:
    """One closed-loop h2load run of ``concurrency`` streams sending ``body`` (one encoded
    message) to ``url`` for ``length``, each request with a deadline of ``deadline_s``."""
    clients, streams = h2load_shape(concurrency)
    with tempfile.TemporaryDirectory(prefix="llmmesh-h2load-") as tmp:
        frame = Path(tmp) / "request.bin"
        frame.write_bytes(grpc_frame(body))
        log_file = Path(tmp) / "requests.tsv"
        command = [h2load, "-c", str(clients), "-m", str(streams), "-t", "1"]
        command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
        command += ["-H", f"grpc-timeout: {deadline_s}S"]
        command += ["-d", str(frame), "--log-file", str(log_file)]
        if length.requests is not None:
            command += ["-n", str(length.requests)]
        else:
            assert length.duration_s is not None
            command += ["-D", f"{round(length.duration_s * 1000)}ms"]
            if length.warmup_s > 0:
                command += ["--warm-up-time", f"{round(length.warmup_s * 1000)}ms"]
        command.append(url)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        limit = (length.duration_s or 0) + length.warmup_s + 120
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
