"""Helpers for tests that run real services as processes on loopback.

- :class:`ServiceProcess` starts ``python -m <package>`` with ``--port 0 --ready-file ...`` and
  waits until the service has written its ready file (it is then SERVING), so no test guesses a
  port or sleeps.
- :class:`RedisServer` runs Debian's ``redis-server`` on a free loopback port in a temp dir.
- :func:`assert_eventually` polls a condition instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmmesh.server import free_port

ROOT = Path(__file__).resolve().parent.parent


class ServiceProcess:
    """One llm-mesh service running as a child process."""

    def __init__(
        self,
        package: str,
        args: Sequence[str] = (),
        *,
        env: dict[str, str] | None = None,
        startup_timeout: float = 20.0,
    ) -> None:
        self.package = package
        self.args = list(args)
        self._tmp = tempfile.TemporaryDirectory(prefix=f"llmmesh-{package}-")
        self.ready_file = Path(self._tmp.name) / "ready.json"
        self.log_path = Path(self._tmp.name) / "log.jsonl"
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_port = -1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        cmd = [
            sys.executable,
            "-m",
            self.package,
            "--host",
            "127.0.0.1",
            "--ready-file",
            str(self.ready_file),
            *self.args,
        ]
        if "--port" not in self.args:
            cmd += ["--port", "0"]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.ready_file.exists():
                info = json.loads(self.ready_file.read_text())
                self.port = int(info["port"])
                self.metrics_port = int(info["metrics_port"])
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.package} exited with {self.proc.returncode}:\n{self.logs()}"
                )
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"{self.package} not ready in {self.startup_timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far."""
        records = []
        for line in self.logs().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return records

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        try:
            self.stop(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        finally:
            self.kill()
            if hasattr(self, "_log"):
                self._log.close()
            self._tmp.cleanup()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisServer:
    """A throwaway redis-server on a free loopback port (no persistence, ``maxmemory`` with LRU
    eviction), restartable on the same port; tests and benchmarks (bench/) share it."""

    def __init__(self, *, maxmemory: str = "64mb") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        self.binary = binary
        self.maxmemory = maxmemory
        self._tmp = tempfile.TemporaryDirectory(prefix="llmmesh-redis-")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        """Whether Debian's redis-server is installed."""
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        """Start it (again, on the same port) and return once it answers PING."""
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", self._tmp.name,
                "--maxmemory", self.maxmemory,
                "--maxmemory-policy", "allkeys-lru",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server did not answer PING within {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()


@dataclass
class Mesh:
    """A whole mesh as real processes on loopback: the cache service on a real Redis, workers
    and a router that knows them (static discovery) and the cache."""

    redis: RedisServer
    cache: ServiceProcess
    workers: list[ServiceProcess]
    router: ServiceProcess

    def services(self) -> list[ServiceProcess]:
        """Every process, the router first (the order to stop them in)."""
        return [self.router, *self.workers, self.cache]

    def close(self) -> None:
        for proc in self.services():
            proc.close()


def start_cache(redis: RedisServer, *args: str) -> ServiceProcess:
    """The cache service on ``redis``, with a metrics port; ``args`` add to or override flags."""
    base = ["--store", "redis", "--redis-url", redis.url, "--metrics-port", "0"]
    return ServiceProcess("cache_service", [*base, *args]).start()


def start_mesh(
    redis: RedisServer,
    *,
    worker_args: Sequence[str],
    worker_ids: Sequence[str] = ("w1", "w2"),
    cache_args: Sequence[str] = (),
    router_args: Sequence[str] = (),
) -> Mesh:
    """Start a :class:`Mesh` (every service with a metrics port); what started is stopped again
    when a later service fails to start."""
    started: list[ServiceProcess] = []
    try:
        cache = start_cache(redis, *cache_args)
        started.append(cache)
        workers = []
        for worker_id in worker_ids:
            workers.append(
                ServiceProcess("worker", [*worker_args, "--worker-id", worker_id]).start()
            )
            started.append(workers[-1])
        router_base = ["--workers", ",".join(w.address for w in workers)]
        router_base += ["--cache-address", cache.address, "--metrics-port", "0"]
        router = ServiceProcess("router", [*router_base, *router_args]).start()
    except BaseException:
        for proc in reversed(started):
            proc.close()
        raise
    return Mesh(redis, cache, workers, router)


async def assert_eventually(
    condition: Callable[[], Awaitable[bool]] | Callable[[], bool],
    *,
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition never became true",
) -> None:
    """Poll ``condition`` until it is true or ``timeout`` passes (then fail with ``message``)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(message)
        await asyncio.sleep(interval)
