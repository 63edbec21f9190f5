"""``llm-mesh up``: the whole mesh on this machine, supervised by one asyncio process.

Start order: ``redis-server`` (when the store is Redis; a free loopback port, a temp dir, no
persistence, 256 MiB LRU), then ``python -m cache_service``, then the workers (``worker-1`` ..
``worker-N``, together), then ``python -m router`` pointed at them. Each service child gets
``--port 0 --metrics-port 0 --ready-file F`` (the router: the port asked for) and is ready once it
has written ``F``; one that exits or times out during startup fails the whole start, with its last
log lines. Every child writes its logs to ``<log dir>/<name>.log``.

With ``--discovery consul`` the mesh runs against an existing Consul agent (``--consul-addr``,
else ``CONSUL_HTTP_ADDR``, else 127.0.0.1:8500; ``CONSUL_HTTP_TOKEN`` reaches the children through
their environment): the workers register themselves there, the router is given no worker list
and finds them through Consul, and the mesh is ready once the router routes to every worker.

SIGINT or SIGTERM stops the children in reverse order (router, workers, cache service, Redis) with
SIGTERM, killing any that outlive the stop timeout, and exits 0; a second signal kills them at
once. A child that dies while the mesh runs is reported (name, exit status, last log lines), the
others are stopped, and the exit status is 1. Children run in their own process group, so a
terminal's Ctrl-C reaches only the supervisor, and on Linux they get SIGTERM if it dies.

What a person needs (where the mesh listens, what to try, the answers of ``--try``) is plain text
on stdout; progress and failures are ``llm-mesh: ...`` lines on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import grpc

from llmmesh import client as router_client
from llmmesh.server import free_port, write_json_atomically
from llmmesh.v1 import generate_pb2, router_pb2, router_pb2_grpc

TRY_TIMEOUT_S = 30.0
#: --try asks for a short answer: it is printed twice (generated, then from the cache).
TRY_MAX_TOKENS = 32
_LOG_TAIL_LINES = 20


@dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """What ``llm-mesh up`` runs."""

    workers: int = 2
    engine: str = "sim"
    model: str = router_client.DEFAULT_MODEL
    host: str = "127.0.0.1"
    port: int = 50051
    store: Literal["auto", "redis", "memory"] = "auto"
    discovery: Literal["static", "consul"] = "static"
    consul_addr: str = ""
    try_prompt: str = ""
    ready_file: str = ""
    log_dir: str = ""
    verbose: bool = False
    startup_timeout_s: float = 60.0
    stop_timeout_s: float = 40.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: {self.workers} is below 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is not a TCP port")
        if self.consul_addr and self.discovery != "consul":
            raise ValueError("consul_addr: only used with --discovery consul")

    def consul_args(self) -> list[str]:
        """What tells a worker or the router to use Consul (empty for static discovery)."""
        if self.discovery != "consul":
            return []
        args = ["--discovery", "consul"]
        return [*args, "--consul-addr", self.consul_addr] if self.consul_addr else args


class MeshFailed(Exception):
    """A child failed to start or died; the message says which and how."""


def resolve_store(store: str) -> tuple[Literal["redis", "memory"], str]:
    """The store ``--store`` means on this machine, and why (for the one log line)."""
    redis = shutil.which("redis-server")
    if store == "memory":
        return "memory", "in-process store (--store memory)"
    if store == "redis":
        if redis is None:
            raise MeshFailed("--store redis: redis-server is not on PATH")
        return "redis", f"Redis ({redis})"
    if redis is not None:
        return "redis", f"Redis ({redis})"
    return "memory", (
        "in-process store: redis-server is not on PATH (apt-get install redis-server to use Redis)"
    )


def render_log_line(line: str) -> str:
    """A JSON log line as ``level event key=value ...``; any other line as it is."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict) or "event" not in record:
        return line
    rest = {k: v for k, v in record.items() if k not in ("event", "level", "timestamp", "service")}
    text = f"{record.get('level', '')} {record['event']}"
    extra = " ".join(f"{k}={v}" for k, v in rest.items() if k != "exception")
    text = f"{text} {extra}" if extra else text
    if "exception" in rest:
        text += "\n" + str(rest["exception"])
    return text


def describe_exit(returncode: int) -> str:
    """``exited with code 3`` or ``killed by SIGKILL``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec function asking Linux to SIGTERM the child when the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class Child:
    """One process of the mesh, its log file, and what it reported when ready."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, ready_file: Path | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.ready_file = ready_file
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self.metrics_port = -1

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    async def start(self, env: dict[str, str], preexec: Callable[[], None] | None) -> None:
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                process_group=0,
                preexec_fn=preexec,
            )

    async def wait_ready(self, is_ready: Callable[[], Awaitable[bool]], timeout: float) -> None:
        """Poll ``is_ready`` until true; fail if the child exits or ``timeout`` passes."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while not await is_ready():
            if self.proc.returncode is not None:
                raise MeshFailed(self.failure(f"{describe_exit(self.proc.returncode)} on startup"))
            if time.monotonic() > deadline:
                raise MeshFailed(self.failure(f"not ready after {timeout:.0f}s"))
            await asyncio.sleep(0.05)

    async def read_ready_file(self) -> bool:
        """Whether the child has written its ready file; takes its ports from it."""
        assert self.ready_file is not None
        try:
            info = json.loads(self.ready_file.read_text())
        except (OSError, ValueError):
            return False
        self.port = int(info["port"])
        self.metrics_port = int(info["metrics_port"])
        return True

    def failure(self, what: str) -> str:
        """``<name> (pid N) <what>; its last log lines: ...``"""
        lines = self.log_tail()
        text = f"{self.name} (pid {self.pid}) {what}"
        if not lines:
            return f"{text}; it logged nothing ({self.log_path})"
        shown = "\n".join(f"  {render_log_line(line)}" for line in lines)
        return f"{text}; its last log lines ({self.log_path}):\n{shown}"

    def log_tail(self, n: int = _LOG_TAIL_LINES) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return text.splitlines()[-n:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def stop(self, timeout: float) -> None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; always reaps the process."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                _say(f"{self.name} did not stop within {timeout:.0f}s; killing it")
                self.kill()
        await self.proc.wait()


def _say(text: str) -> None:
    print(f"llm-mesh: {text}", file=sys.stderr, flush=True)


def _command_name() -> str:
    """How the user can run ``llm-mesh`` again from here."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) == "llm-mesh":
        on_path = shutil.which("llm-mesh")
        if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
            return "llm-mesh"
        return argv0
    return f"{shlex.quote(sys.executable)} -m llmmesh.cli"


async def _redis_answers_ping(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), 1.0)).startswith(b"+PONG")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _error_line(exc: Exception, target: str) -> str:
    if isinstance(exc, grpc.RpcError):
        return router_client.format_rpc_error(exc, target)
    return f"error: {exc}"


class LocalMesh:
    """Starts, watches and stops the children of one local mesh."""

    def __init__(self, config: MeshConfig, *, out: TextIO | None = None) -> None:
        self.config = config
        self.out = out or sys.stdout
        self.groups: list[list[Child]] = []
        self.store: Literal["redis", "memory"] = "memory"
        self._state = Path(tempfile.mkdtemp(prefix="llm-mesh-state-"))
        self.log_dir = Path(config.log_dir or tempfile.mkdtemp(prefix="llm-mesh-logs-"))
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._preexec = _parent_death_signal()
        self._stop = asyncio.Event()
        self._signals = 0
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def children(self) -> list[Child]:
        return [child for group in self.groups for child in group]

    @property
    def router(self) -> Child:
        return self.groups[-1][0]

    @property
    def target(self) -> str:
        host = self.config.host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        host = "[::1]" if host == "::" else host
        return f"{host}:{self.router.port}"

    async def run(self) -> int:
        """Start the mesh, serve until a signal or a child's death, stop it; the exit status."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            return await self._run()
        except MeshFailed as exc:
            _say(str(exc))
            return 1
        except OSError as exc:
            _say(f"cannot run the mesh: {exc}")
            return 1
        finally:
            if self.children:
                await self._stop_children()
                _say(f"stopped; the logs stay in {self.log_dir}")
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            self._remove_ready_file()
            shutil.rmtree(self._state, ignore_errors=True)

    async def _run(self) -> int:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._remove_ready_file()
        if self.config.verbose:
            self._spawn(self._follow_logs())
        starting = asyncio.create_task(self._start())
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await starting
            _say("interrupted during startup; stopping")
            return 0
        stopping.cancel()
        starting.result()
        self._announce()
        if self.config.ready_file:
            write_json_atomically(Path(self.config.ready_file), self._ready_info())
        if self.config.try_prompt:
            self._spawn(self._try(self.config.try_prompt))
        return await self._watch()

    async def _start(self) -> None:
        config = self.config
        if config.discovery == "consul":
            await self._check_consul()
        self.store, why = resolve_store(config.store)
        _say(f"cache store: {why}")
        cache_args = ["--store", "memory"]
        if self.store == "redis":
            redis = await self._start_redis()
            cache_args = ["--store", "redis", "--redis-url", f"redis://127.0.0.1:{redis.port}/0"]
        [cache] = await self._start_group([self._service("cache_service", cache_args)])
        workers = await self._start_group(
            [
                self._service(
                    "worker",
                    [
                        "--engine",
                        config.engine,
                        "--model",
                        config.model,
                        "--worker-id",
                        self._worker_id(i),
                        *config.consul_args(),
                    ],
                    name=f"worker-{i}",
                )
                for i in range(1, config.workers + 1)
            ]
        )
        router_args = ["--cache-address", f"127.0.0.1:{cache.port}", *config.consul_args()]
        if config.discovery == "static":
            router_args += ["--workers", ",".join(f"127.0.0.1:{w.port}" for w in workers)]
        [router] = await self._start_group(
            [self._service("router", router_args, host=config.host, port=config.port)]
        )
        if config.discovery == "consul":
            addresses = {f"127.0.0.1:{worker.port}" for worker in workers}
            await router.wait_ready(lambda: self._routes_to(addresses), config.startup_timeout_s)

    async def _check_consul(self) -> None:
        """Fail at once, before starting anything, when the Consul agent does not answer."""
        from llmmesh import consul
        from llmmesh.discovery import ConsulError, consul_errors

        try:
            target = consul.resolve(consul.ConsulSettings(consul_addr=self.config.consul_addr))
        except ValueError as exc:
            raise MeshFailed(f"--consul-addr: {exc}") from None
        agent = consul.open_client(target, timeout_s=5.0)
        try:
            with consul_errors(target):
                leader = await agent.status.leader()
        except ConsulError as exc:
            raise MeshFailed(
                f"{exc.message}; start an agent (consul agent -dev) or fix --consul-addr"
            ) from None
        finally:
            await agent.close()
        _say(f"Consul agent at {target.url} (leader {leader or 'none yet'})")

    def _worker_id(self, i: int) -> str:
        """``worker-<i>``; with Consul, whose registry other meshes may share, made unique by
        the supervisor's pid (a worker's id is its Consul service id)."""
        if self.config.discovery == "consul":
            return f"worker-{i}-{os.getpid()}"
        return f"worker-{i}"

    async def _routes_to(self, addresses: set[str]) -> bool:
        """Whether the router has a HEALTHY worker at every one of ``addresses``."""
        try:
            async with grpc.aio.insecure_channel(self.target) as channel:
                reply = await router_pb2_grpc.RouterStub(channel).ListWorkers(
                    router_pb2.ListWorkersRequest(), timeout=2.0
                )
        except grpc.aio.AioRpcError:
            return False
        healthy = {w.address for w in reply.workers if w.state == router_pb2.WORKER_STATE_HEALTHY}
        return addresses <= healthy

    def _service(
        self,
        package: str,
        args: list[str],
        *,
        name: str = "",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> Child:
        """``python -m <package>`` as a child named ``name`` (default: the package)."""
        name = name or package
        ready_file = self._state / f"{name}.ready.json"
        argv = [
            sys.executable, "-m", package,
            "--host", host,
            "--port", str(port),
            "--metrics-port", "0",
            "--ready-file", str(ready_file),
            "--log-format", "json",
            *args,
        ]  # fmt: skip
        return Child(name, argv, self.log_dir / f"{name}.log", ready_file)

    async def _start_group(self, group: list[Child]) -> list[Child]:
        """Start these children together and wait until each has written its ready file."""
        self.groups.append(group)
        names = ", ".join(child.name for child in group)
        _say(f"starting {names}")
        for child in group:
            await child.start(self._env, self._preexec)
        waits = [
            asyncio.create_task(
                child.wait_ready(child.read_ready_file, self.config.startup_timeout_s)
            )
            for child in group
        ]
        try:
            await asyncio.gather(*waits)
        finally:  # one failed (or startup was interrupted): stop waiting for the others
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        return group

    async def _start_redis(self) -> Child:
        binary = shutil.which("redis-server")
        assert binary is not None
        data_dir = self._state / "redis"
        data_dir.mkdir()
        port = free_port()
        redis = Child(
            "redis",
            [
                binary,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--dir", str(data_dir),
                "--save", "",
                "--appendonly", "no",
                "--maxmemory", "256mb",
                "--maxmemory-policy", "allkeys-lru",
            ],
            self.log_dir / "redis.log",
        )  # fmt: skip
        redis.port = port
        self.groups.append([redis])
        _say(f"starting redis-server on 127.0.0.1:{port}")
        await redis.start(self._env, self._preexec)
        await redis.wait_ready(lambda: _redis_answers_ping(port), self.config.startup_timeout_s)
        return redis

    def _announce(self) -> None:
        cmd = _command_name()
        lines = [
            f"llm-mesh is up: the router listens on {self.target}"
            f" ({self.config.workers} {self.config.engine}"
            f" worker{'s' if self.config.workers > 1 else ''} serving {self.config.model},"
            f" cache on {'Redis' if self.store == 'redis' else 'the in-process store'}"
            f"{self._discovery_text()})",
            "",
        ]
        for child in [child for group in reversed(self.groups) for child in group]:
            where = f"127.0.0.1:{child.port}" if child is not self.router else self.target
            metrics = (
                f"metrics http://127.0.0.1:{child.metrics_port}/metrics"
                if child.metrics_port > 0
                else ""
            )
            lines.append(f"  {child.name:<14} {where:<22} pid {child.pid:<8} {metrics}".rstrip())
        lines += [
            f"  {'logs':<14} {self.log_dir}/ (one file per child)",
            "",
            "Try it:",
            f"  {cmd} generate {shlex.quote('What is a KV cache?')} --target {self.target}",
            f"  {cmd} workers --target {self.target}",
            "",
            "Ctrl-C stops the mesh.",
        ]
        print("\n".join(lines), file=self.out, flush=True)

    def _discovery_text(self) -> str:
        if self.config.discovery != "consul":
            return ""
        return (
            f", workers found through Consul at {self.config.consul_addr or 'its default address'}"
        )

    def _remove_ready_file(self) -> None:
        if self.config.ready_file:
            Path(self.config.ready_file).unlink(missing_ok=True)

    def _ready_info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "router": self.target,
            "store": self.store,
            "discovery": self.config.discovery,
            "log_dir": str(self.log_dir),
            "children": {
                child.name: {
                    "pid": child.pid,
                    "port": child.port,
                    "metrics_port": child.metrics_port,
                    "log": str(child.log_path),
                }
                for child in self.children
            },
        }

    async def _watch(self) -> int:
        """Wait for a stop signal (exit 0) or the death of a child (exit 1)."""
        deaths = {
            asyncio.create_task(child.proc.wait()): child
            for child in self.children
            if child.proc is not None
        }
        stopping = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({stopping, *deaths}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopping, *deaths):
            task.cancel()
        dead = [child for task, child in deaths.items() if task in done]
        if not dead:
            _say("stopping")
            return 0
        child = dead[0]
        assert child.proc is not None
        assert child.proc.returncode is not None
        _say(child.failure(describe_exit(child.proc.returncode)))
        _say("stopping the rest of the mesh")
        return 1

    async def _stop_children(self) -> None:
        """Stop every group in reverse start order (each group's members together)."""
        for group in reversed(self.groups):
            await asyncio.gather(*(child.stop(self.config.stop_timeout_s) for child in group))

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            _say(f"{sig.name} received; stopping the mesh (again to kill it at once)")
            self._stop.set()
            return
        _say(f"{sig.name} received again; killing the mesh")
        for child in self.children:
            child.kill()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _try(self, prompt: str) -> None:
        """Ask ``prompt`` twice as ``llm-mesh generate`` would, printing what a user would see."""
        cmd = (
            f"{_command_name()} generate {shlex.quote(prompt)} --target {self.target}"
            f" --max-tokens {TRY_MAX_TOKENS}"
        )
        await asyncio.to_thread(self._ask_twice, prompt, cmd)

    def _ask_twice(self, prompt: str, cmd: str) -> None:
        request = generate_pb2.GenerateRequest(
            model=self.config.model,
            prompt=prompt,
            sampling=generate_pb2.SamplingParams(temperature=0.0, max_tokens=TRY_MAX_TOKENS),
        )
        with grpc.insecure_channel(self.target) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            if self._ask_visibly(stub, request, cmd) is None:
                return
            # The router stores a finished answer in the background: ask again once it is there.
            self._wait_until_cached(stub, request)
            again = self._ask_visibly(stub, request, cmd)
            if again is None:
                return
        print(
            "(the same deterministic request again: answered from the cache)"
            if again.cached
            else "(the same request again, but not answered from the cache)",
            file=self.out,
        )
        print("\nThe mesh keeps serving; Ctrl-C stops it.", file=self.out, flush=True)

    def _ask_visibly(
        self,
        stub: router_pb2_grpc.RouterStub,
        request: generate_pb2.GenerateRequest,
        cmd: str,
    ) -> generate_pb2.GenerationSummary | None:
        """Ask as ``llm-mesh generate --stream`` would, printing all it would print."""
        if self._stop.is_set():
            return None
        print(f"\n$ {cmd} --stream", file=self.out, flush=True)
        try:
            request_id, summary = router_client.ask(
                stub, request, stream=True, timeout=TRY_TIMEOUT_S, out=self.out
            )
        except (grpc.RpcError, router_client.CommandError) as exc:
            if not self._stop.is_set():  # else the router stopped under it: no news
                print(_error_line(exc, self.target), file=self.out, flush=True)
            return None
        print(router_client.format_summary(request_id, summary), file=self.out, flush=True)
        return summary

    def _wait_until_cached(
        self, stub: router_pb2_grpc.RouterStub, request: generate_pb2.GenerateRequest
    ) -> None:
        """Poll with CACHE_POLICY_ONLY_IF_CACHED (never reaches a worker) for a few seconds."""
        probe = generate_pb2.GenerateRequest()
        probe.CopyFrom(request)
        probe.cache_policy = generate_pb2.CACHE_POLICY_ONLY_IF_CACHED
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not self._stop.is_set():
            try:
                stub.Generate(probe, timeout=2.0)
            except grpc.RpcError as exc:
                if router_client.rpc_status(exc)[0] != grpc.StatusCode.NOT_FOUND:
                    return
                time.sleep(0.05)
            else:
                return

    async def _follow_logs(self) -> None:
        """Copy every child's new log lines to stderr, prefixed with its name (--verbose)."""
        offsets: dict[Path, int] = {}
        try:
            while True:
                self._copy_new_log_lines(offsets)
                await asyncio.sleep(0.1)
        finally:
            self._copy_new_log_lines(offsets)

    def _copy_new_log_lines(self, offsets: dict[Path, int]) -> None:
        for child in self.children:
            path = child.log_path
            try:
                with path.open("rb") as log:
                    log.seek(offsets.get(path, 0))
                    data = log.read()
            except OSError:
                continue
            end = data.rfind(b"\n")
            if end < 0:
                continue
            offsets[path] = offsets.get(path, 0) + end + 1
            for line in data[:end].split(b"\n"):
                print(f"{child.name:>13} | {line.decode(errors='replace')}", file=sys.stderr)
        sys.stderr.flush()


def run(config: MeshConfig) -> int:
    """Run the mesh until Ctrl-C or SIGTERM (exit 0) or a failure (exit 1)."""
    return asyncio.run(LocalMesh(config).run())


__all__ = [
    "Child",
    "LocalMesh",
    "MeshConfig",
    "MeshFailed",
    "describe_exit",
    "render_log_line",
    "resolve_store",
    "run",
]
