"""``llm-mesh up``: the supervisor's pieces, and whole meshes run as processes on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from llmmesh import local_mesh
from llmmesh.local_mesh import TRY_MAX_TOKENS, Child, MeshConfig, MeshFailed
from tests.harness import ROOT, assert_eventually

PROMPT = "What is a KV cache?"
HAVE_REDIS = shutil.which("redis-server") is not None


class TestResolveStore:
    """resolve_store() picks Redis when redis-server is on PATH, and says why."""

    def test_auto_without_redis_is_memory(self, monkeypatch, tmp_path):
        """auto falls back to the in-process store and names the missing binary."""
        monkeypatch.setenv("PATH", str(tmp_path))
        store, why = local_mesh.resolve_store("auto")
        assert store == "memory"
        assert "redis-server is not on PATH" in why

    def test_auto_with_redis_is_redis(self, monkeypatch, tmp_path):
        """auto uses Redis when a redis-server executable is on PATH."""
        fake = tmp_path / "redis-server"
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", str(tmp_path))
        assert local_mesh.resolve_store("auto") == ("redis", f"Redis ({fake})")

    def test_redis_without_redis_fails(self, monkeypatch, tmp_path):
        """--store redis without redis-server is an error, not a silent fallback."""
        monkeypatch.setenv("PATH", str(tmp_path))
        with pytest.raises(MeshFailed, match="redis-server is not on PATH"):
            local_mesh.resolve_store("redis")

    def test_memory_is_memory(self):
        """--store memory never uses Redis."""
        assert local_mesh.resolve_store("memory")[0] == "memory"


class TestRun:
    """run() reports a mesh that cannot start with one line and exit 1."""

    def test_missing_redis_exits_1(self, monkeypatch, tmp_path, capsys):
        """--store redis without redis-server exits 1 before starting anything."""
        monkeypatch.setenv("PATH", str(tmp_path))
        config = MeshConfig(store="redis", log_dir=str(tmp_path / "logs"), port=0)
        assert local_mesh.run(config) == 1
        assert capsys.readouterr().err == ("llm-mesh: --store redis: redis-server is not on PATH\n")


class TestMeshConfig:
    """MeshConfig rejects what cannot run."""

    @pytest.mark.parametrize(
        ("fields", "problem"), [({"workers": 0}, "workers"), ({"port": -1}, "port")]
    )
    def test_rejects(self, fields, problem):
        """The error names the field."""
        with pytest.raises(ValueError, match=f"^{problem}: "):
            MeshConfig(**fields)


class TestLogLines:
    """Log lines are shown to people as `level event key=value`."""

    def test_json_line_is_rendered(self):
        """timestamp and service are dropped; the rest follows the event."""
        line = json.dumps(
            {
                "event": "cannot start",
                "level": "error",
                "timestamp": "t",
                "service": "router",
                "error": "port 1 in use",
            }
        )
        assert local_mesh.render_log_line(line) == "error cannot start error=port 1 in use"

    def test_other_lines_are_kept(self):
        """A line that is not a JSON log record is shown as it is."""
        assert local_mesh.render_log_line("Traceback (most recent call last):") == (
            "Traceback (most recent call last):"
        )
        assert local_mesh.render_log_line("[1, 2]") == "[1, 2]"

    def test_exception_follows_on_its_own_lines(self):
        """An exception field is printed after the line, as the traceback it is."""
        line = json.dumps({"event": "boom", "level": "error", "exception": "Traceback\n  x"})
        assert local_mesh.render_log_line(line) == "error boom\nTraceback\n  x"

    def test_failure_names_the_child_and_shows_its_last_lines(self, tmp_path):
        """Child.failure() gives the name, pid, what happened and the log's tail."""
        log = tmp_path / "worker-1.log"
        log.write_text("".join(f'{{"event": "line {i}", "level": "info"}}\n' for i in range(30)))
        text = Child("worker-1", [], log).failure("exited with code 2")
        lines = text.splitlines()
        assert lines[0] == f"worker-1 (pid 0) exited with code 2; its last log lines ({log}):"
        assert lines[1:] == [f"  info line {i}" for i in range(10, 30)]

    def test_failure_of_a_silent_child(self, tmp_path):
        """A child that logged nothing is said to have logged nothing."""
        text = Child("redis", [], tmp_path / "redis.log").failure("killed by SIGKILL")
        assert (
            text == f"redis (pid 0) killed by SIGKILL; it logged nothing ({tmp_path / 'redis.log'})"
        )


class TestDescribeExit:
    """describe_exit() says how a process ended."""

    def test_code(self):
        """A normal exit shows its code."""
        assert local_mesh.describe_exit(3) == "exited with code 3"

    def test_signal(self):
        """A negative status is the signal that killed it."""
        assert local_mesh.describe_exit(-9) == "killed by SIGKILL"


# --- whole meshes -------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie left to a non-reaping init counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


class Mesh:
    """``llm-mesh up`` run as a process, with its ready file and output."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.args = args
        self.ready_file = tmp_path / "mesh.json"
        self.out_path = tmp_path / "up.out"
        self.err_path = tmp_path / "up.err"
        self.log_dir = tmp_path / "logs"
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}

    @property
    def target(self) -> str:
        return str(self.info["router"])

    def pids(self) -> dict[str, int]:
        return {name: int(child["pid"]) for name, child in self.info["children"].items()}

    def output(self) -> tuple[str, str]:
        return self.out_path.read_text(), self.err_path.read_text()

    async def start(self) -> Mesh:
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "llmmesh.cli", "up",
                "--port", "0",
                "--ready-file", str(self.ready_file),
                "--log-dir", str(self.log_dir),
                *self.args,
                cwd=ROOT, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=err,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.returncode is not None:
                raise AssertionError(f"llm-mesh up exited {self.proc.returncode}: {self.output()}")
            return self.ready_file.exists()

        await assert_eventually(ready, timeout=60, interval=0.05, message="mesh not ready in 60s")
        self.info = json.loads(self.ready_file.read_text())
        return self

    async def cli(self, *args: str) -> tuple[int, str, str]:
        """Run ``llm-mesh <args> --target <router>``: (exit status, stdout, stderr)."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llmmesh.cli", *args, "--target", self.target,
            cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode is not None
        return proc.returncode, out.decode(), err.decode()

    async def wait(self, timeout: float = 60) -> int:
        assert self.proc is not None
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        """Kill whatever is left (only after a failed test)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for pid in self.pids().values() if self.info else ():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def mesh_factory(tmp_path) -> AsyncIterator[Any]:
    meshes: list[Mesh] = []

    async def start(*args: str) -> Mesh:
        mesh = Mesh(tmp_path / f"mesh{len(meshes)}", *args)
        mesh.ready_file.parent.mkdir()
        meshes.append(mesh)
        return await mesh.start()

    try:
        yield start
    finally:
        for mesh in meshes:
            await mesh.close()


STORES = [
    "memory",
    pytest.param(
        "redis", marks=pytest.mark.skipif(not HAVE_REDIS, reason="redis-server is not installed")
    ),
]


@pytest.mark.slow
class TestUp:
    """llm-mesh up serves generate and workers, caches, and stops cleanly on SIGINT."""

    @pytest.mark.timeout(180)
    @pytest.mark.parametrize("store", STORES)
    async def test_whole_mesh(self, mesh_factory, store):
        """A mesh on each store answers, caches, lists its workers and stops with exit 0."""
        mesh: Mesh = await mesh_factory("--workers", "2", "--store", store, "--try", PROMPT)
        assert mesh.info["store"] == store
        assert set(mesh.pids()) == {"router", "worker-1", "worker-2", "cache_service"} | (
            {"redis"} if store == "redis" else set()
        )

        # unary: an answer and a summary line
        code, out, err = await mesh.cli("generate", "Explain continuous batching")
        assert code == 0, err
        assert out.strip()
        assert err.startswith("[generated] worker=worker-")

        # streaming
        code, out, err = await mesh.cli("generate", "--stream", "--max-tokens", "16", "Tell me")
        assert code == 0, err
        assert out.strip()
        assert err.startswith("[generated] worker=worker-")
        assert " prompt_tokens=" in err
        assert " completion_tokens=" in err

        # the same deterministic request again comes from the cache (stored after the answer)
        code, answer, err = await mesh.cli("generate", "What is continuous batching?")
        assert code == 0, err
        assert err.startswith("[generated] ")

        async def repeated_is_cached() -> bool:
            code, again, err = await mesh.cli("generate", "What is continuous batching?")
            assert code == 0, err
            assert again == answer
            return err.startswith("[cached] ")

        await assert_eventually(repeated_is_cached, timeout=20, message="never served from cache")

        # the routing table
        code, out, err = await mesh.cli("workers")
        assert code == 0, err
        rows = out.splitlines()
        assert rows[0].split()[0] == "WORKER"
        assert sorted(row.split()[0] for row in rows[1:]) == ["worker-1", "worker-2"]

        # --try asked twice and the second answer came from the cache
        def try_done() -> bool:
            return "keeps serving" in mesh.output()[0]

        await assert_eventually(try_done, timeout=30, message="--try never finished")
        stdout = mesh.output()[0]
        assert f"--target {mesh.target}" in stdout
        assert "[generated] worker=worker-" in stdout
        assert "[cached] worker=worker-" in stdout
        assert stdout.index("[generated]") < stdout.index("[cached]")
        # a short answer, and the command shown asks for the same
        assert f"--max-tokens {TRY_MAX_TOKENS}" in stdout
        completions = [int(n) for n in re.findall(r" completion_tokens=(\d+)", stdout)]
        assert len(completions) == 2, stdout
        assert all(0 < n <= TRY_MAX_TOKENS for n in completions), completions

        # SIGINT: everything stops, exit 0, no child left
        pids = mesh.pids()
        assert mesh.proc is not None
        mesh.proc.send_signal(signal.SIGINT)
        assert await mesh.wait() == 0, mesh.output()
        assert [name for name, pid in pids.items() if _alive(pid)] == []
        assert not mesh.ready_file.exists()
        logs = {p.name for p in mesh.log_dir.iterdir()}
        assert {"router.log", "worker-1.log", "worker-2.log", "cache_service.log"} <= logs

    @pytest.mark.timeout(120)
    async def test_dead_worker_stops_the_mesh(self, mesh_factory):
        """A worker killed with SIGKILL makes up name it, stop the rest and exit non-zero."""
        mesh: Mesh = await mesh_factory("--workers", "2", "--store", "memory")
        pids = mesh.pids()
        os.kill(pids["worker-2"], signal.SIGKILL)
        assert await mesh.wait() != 0
        err = mesh.output()[1]
        assert f"worker-2 (pid {pids['worker-2']}) killed by SIGKILL" in err
        assert [name for name, pid in pids.items() if _alive(pid)] == []

    @pytest.mark.timeout(120)
    @pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
    async def test_children_die_with_the_supervisor(self, mesh_factory):
        """When up itself is killed (SIGKILL), its children get SIGTERM and stop."""
        mesh: Mesh = await mesh_factory("--workers", "1", "--store", "memory")
        pids = mesh.pids()
        assert mesh.proc is not None
        mesh.proc.kill()
        await mesh.wait()

        def all_gone() -> bool:
            return not any(_alive(pid) for pid in pids.values())

        await assert_eventually(all_gone, timeout=30, message=f"orphans left: {pids}")

    @pytest.mark.timeout(120)
    async def test_child_failing_at_startup_is_reported(self, tmp_path):
        """A worker that cannot start fails up fast, with the worker's own last log lines."""
        mesh = Mesh(tmp_path, "--workers", "1", "--store", "memory", "--engine", "no-such-engine")
        with pytest.raises(AssertionError, match="exited 1"):
            await mesh.start()
        _, err = mesh.output()
        assert "worker-1 (pid " in err
        assert "on startup; its last log lines" in err
        assert "no-such-engine" in err
        await mesh.close()
