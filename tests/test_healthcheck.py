"""``python -m llmmesh.healthcheck`` against a real in-process gRPC server (ServiceRunner)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path

import grpc.aio
import pytest

from llmmesh import healthcheck
from llmmesh.server import ServerSettings, ServiceRunner, free_port
from tests.harness import ROOT


class _App:
    """The smallest ServiceApp: health and reflection only."""

    service_names: Sequence[str] = ("llmmesh.test.Probe",)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        pass

    async def start(self, runner: ServiceRunner) -> None:
        pass

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
async def runner(tmp_path: Path) -> AsyncIterator[ServiceRunner]:
    settings = ServerSettings(
        port=0,
        metrics_port=-1,
        grace=timedelta(seconds=1),
        ready_file=str(tmp_path / "ready.json"),
    )
    service_runner = ServiceRunner(_App(), settings, name="probe")
    async with service_runner:
        yield service_runner


async def run_main(
    argv: Sequence[str], environ: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """healthcheck.main in a thread (its gRPC call is blocking; the server runs on this loop)."""
    captured: dict[str, str] = {}

    def call() -> int:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = healthcheck.main(argv, environ or {})
        captured["out"], captured["err"] = out.getvalue(), err.getvalue()
        return code

    code = await asyncio.to_thread(call)
    return code, captured["out"], captured["err"]


class TestCheck:
    """One Check RPC decides the exit status."""

    async def test_serving_exits_0(self, runner: ServiceRunner) -> None:
        code, out, _ = await run_main(["--address", f"127.0.0.1:{runner.port}"])
        assert code == 0
        assert "SERVING" in out

    async def test_named_service_is_checked(self, runner: ServiceRunner) -> None:
        address = f"127.0.0.1:{runner.port}"
        code, _, _ = await run_main(["--address", address, "--service", "llmmesh.test.Probe"])
        assert code == 0
        code, _, err = await run_main(["--address", address, "--service", "llmmesh.v1.Nope"])
        assert code == 1
        assert "unknown health service llmmesh.v1.Nope" in err

    async def test_not_serving_exits_1(self, runner: ServiceRunner) -> None:
        await runner.set_serving(False)
        code, _, err = await run_main(["--address", f"127.0.0.1:{runner.port}"])
        assert code == 1
        assert "NOT_SERVING" in err

    async def test_draining_service_exits_1(self, runner: ServiceRunner) -> None:
        await runner.shutdown()
        code, _, err = await run_main(["--address", f"127.0.0.1:{runner.port}"])
        assert code == 1
        assert "UNAVAILABLE" in err

    async def test_nothing_listening_exits_1_quickly(self) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        code, _, err = await run_main(["--address", f"127.0.0.1:{free_port()}", "--timeout", "5s"])
        assert code == 1
        assert "UNAVAILABLE" in err
        assert loop.time() - started < 4, "it waited for the channel instead of failing fast"


class TestAddress:
    """Without --address the port comes from the ready file, then LLMMESH_PORT."""

    async def test_ready_file_from_environment(self, runner: ServiceRunner) -> None:
        env = {
            "LLMMESH_READY_FILE": runner.settings.ready_file,
            "LLMMESH_HOST": "0.0.0.0",
            "LLMMESH_PORT": "1",
        }
        code, out, _ = await run_main([], env)
        assert code == 0
        assert f"127.0.0.1:{runner.port}" in out

    async def test_ready_file_flag_wins(self, runner: ServiceRunner, tmp_path: Path) -> None:
        stale = tmp_path / "stale.json"
        stale.write_text(json.dumps({"port": free_port()}))
        env = {"LLMMESH_READY_FILE": str(stale)}
        code, _, _ = await run_main(["--ready-file", runner.settings.ready_file], env)
        assert code == 0
        code, _, _ = await run_main([], env)
        assert code == 1

    async def test_missing_ready_file_means_not_serving_yet(self, tmp_path: Path) -> None:
        env = {"LLMMESH_READY_FILE": str(tmp_path / "absent.json")}
        code, _, err = await run_main([], env)
        assert code == 1
        assert "not serving yet" in err

    async def test_port_from_environment(self, runner: ServiceRunner) -> None:
        code, _, _ = await run_main([], {"LLMMESH_PORT": str(runner.port)})
        assert code == 0

    async def test_specific_host_is_used(self, runner: ServiceRunner) -> None:
        env = {"LLMMESH_HOST": "127.0.0.2", "LLMMESH_PORT": str(runner.port)}
        assert healthcheck.resolve_address("", "", env) == f"127.0.0.2:{runner.port}"
        env = {"LLMMESH_HOST": "::", "LLMMESH_PORT": "7"}
        assert healthcheck.resolve_address("", "", env) == "127.0.0.1:7"
        env = {"LLMMESH_HOST": "::1", "LLMMESH_PORT": "7"}
        assert healthcheck.resolve_address("", "", env) == "[::1]:7"

    async def test_no_address_is_a_usage_error(self) -> None:
        code, _, err = await run_main([], {"LLMMESH_PORT": "not-a-port"})
        assert code == 2
        assert "no address" in err


def test_module_entry_point(tmp_path: Path) -> None:
    """``python -m llmmesh.healthcheck`` is what the images run: its exit status is main's."""
    ready = tmp_path / "ready.json"
    ready.write_text(json.dumps({"port": free_port()}))
    result = subprocess.run(
        [sys.executable, "-m", "llmmesh.healthcheck", "--ready-file", str(ready)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1, result.stderr
    assert "UNAVAILABLE" in result.stderr
