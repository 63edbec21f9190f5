"""The worker in Consul: it registers itself once its engine is ready, keeps its check honest, and
leaves first when it drains.

::

    start()      register: name, id = worker id, address, port, tags, meta, one check
                 (TTL: Status passing if the engine is healthy, then reported at once, since
                 Consul keeps an existing check's state over a re-registration; gRPC: Consul
                 probes grpc.health.v1 for llmmesh.v1.Worker), DeregisterCriticalServiceAfter;
                 the check's status is then read back from the agent and logged
    heartbeat    every TTL/3: pass (engine healthy) or fail with a note (engine unhealthy);
                 woken at once by health_changed(). A 404 means the agent forgot us (it
                 restarted): register again. gRPC check: ask the agent whether it still
                 has the service, and register again if not.
    failures     Consul unreachable, refusing (403) or failing: keep serving, retry with
                 jittered backoff, log the outage once and the recovery once, count each
                 failed call (llmmesh_worker_consul_errors_total{op})
    leave()      stop the heartbeat, deregister (on failure: maintenance mode), all within
                 LEAVE_TIMEOUT_S so that a dead Consul never holds up a shutdown
    stop()       stop the heartbeat and close the client (idempotent)

Every consul and aiohttp error is translated into :class:`ConsulError` by
:func:`llmmesh.consul.consul_errors`, the one place that happens (the router's watch uses it
too). The ACL token travels only in the ``X-Consul-Token`` header; it is never logged, and is
scrubbed from any error message that might echo it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import consul
import structlog
from prometheus_client import Counter, Gauge

import llmmesh
from llmmesh import settings
from llmmesh.consul import ConsulError, ConsulTarget, consul_errors, open_client, resolve
from worker._config import WorkerConfig
from worker.engines import EngineInfo

if TYPE_CHECKING:
    import consul.aio

log = structlog.get_logger(__name__)

#: The gRPC service whose health a gRPC check asks for.
GRPC_HEALTH_SERVICE = "llmmesh.v1.Worker"
#: leave() gives up after this long (half for deregistering, the rest for maintenance mode).
LEAVE_TIMEOUT_S = 2.0
#: start() waits this long for the first registration before serving without it (the heartbeat
#: goes on retrying).
FIRST_REGISTRATION_TIMEOUT_S = 2.0
#: First retry delay after a failed Consul call; it doubles up to the heartbeat interval.
FIRST_RETRY_S = 0.1

REGISTERED = Gauge(
    "llmmesh_worker_consul_registered",
    "1 while the Consul agent has confirmed this worker's registration, else 0.",
)
ERRORS = Counter(
    "llmmesh_worker_consul_errors_total",
    "Failed calls to the Consul agent, by operation "
    "(register, heartbeat, lookup, deregister, maintenance).",
    ["op"],
)


def go_duration(value: timedelta) -> str:
    """``value`` as a Go duration, the way Consul reads them (``10s``, ``600ms``)."""
    ms = value / timedelta(milliseconds=1)
    if ms >= 1000 and ms % 1000 == 0:
        return f"{int(ms // 1000)}s"
    return f"{max(1, round(ms))}ms"


def advertise_address(config: WorkerConfig) -> str:
    """Where others reach this worker: the configured address, the listen host, or (listening on
    every interface) this machine's IP, falling back to its hostname when that is loopback."""
    if config.advertise_address:
        return config.advertise_address.strip("[]")
    if config.host not in ("", "0.0.0.0", "::", "[::]"):
        return config.host.strip("[]")
    hostname = socket.gethostname()
    try:
        ip = socket.gethostbyname(hostname)
    except OSError:
        return hostname
    return hostname if ipaddress.ip_address(ip).is_loopback else ip


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConsulRegistration:
    """One worker's registration in Consul, from :meth:`start` to :meth:`leave` / :meth:`stop`.

    ``is_healthy`` reports the engine's health now; :meth:`health_changed` makes the heartbeat
    report a change at once instead of at its next beat.
    """

    def __init__(
        self,
        config: WorkerConfig,
        *,
        worker_id: str,
        port: int,
        info: EngineInfo,
        is_healthy: Callable[[], bool],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        try:
            self.target: ConsulTarget = resolve(config, environ)
        except ValueError as exc:
            raise settings.ConfigError(str(exc)) from None
        self.service_id = worker_id
        self.check_id = f"service:{worker_id}"
        self.address = advertise_address(config)
        self.port = port
        self.check_kind = config.consul_check
        self.ttl = config.consul_check_ttl
        self.interval_s = max(0.01, config.consul_check_ttl.total_seconds() / 3)
        self._info = info
        self._is_healthy = is_healthy
        self.tags = self._tags(config, info)
        self.meta = self._meta(info)
        self._deregister_after = go_duration(config.consul_deregister_after)
        self._client: consul.aio.Consul | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._registered = False
        self._outage = False
        self._failures = 0
        self._reported_healthy: bool | None = None
        self._left = False
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (waiting at most FIRST_REGISTRATION_TIMEOUT_S), then keep it up in the
        background. Consul being down is no error: the worker serves, and registration follows
        when Consul comes back."""
        if self._client is not None:
            raise RuntimeError("consul registration already started")
        self._client = open_client(self.target, timeout_s=max(1.0, self.interval_s))
        try:
            async with asyncio.timeout(FIRST_REGISTRATION_TIMEOUT_S):
                await self._register()
        except ConsulError as exc:
            self._failed(exc)
        except TimeoutError:
            self._failed(
                ConsulError(
                    "timeout", f"Consul at {self.target.url} did not answer in time", op="register"
                )
            )
        if self._left or self._stopped:  # a signal came while the first registration ran
            return
        self._task = asyncio.create_task(self._keep_registered(), name="worker-consul")

    def health_changed(self) -> None:
        """The engine's health changed: report it now."""
        self._wake.set()

    async def leave(self) -> None:
        """Leave Consul before draining: deregister, or failing that enter maintenance mode.
        Bounded by LEAVE_TIMEOUT_S; idempotent."""
        if self._left or self._stopped:
            return
        self._left = True
        await self._stop_heartbeat()
        if self._client is None:
            return
        half = LEAVE_TIMEOUT_S / 2
        try:
            async with asyncio.timeout(half):
                with consul_errors(self.target, "deregister"):
                    await self._client.agent.service.deregister(self.service_id)
            self._set_registered(False)
            log.info("left consul", service=self.target.service, service_id=self.service_id)
            return
        except (ConsulError, TimeoutError) as exc:
            error = self._error_text("deregister", exc)
        try:
            async with asyncio.timeout(half):
                with consul_errors(self.target, "maintenance"):
                    await self._client.agent.service.maintenance(
                        self.service_id, True, reason="llm-mesh worker draining"
                    )
            self._set_registered(False)
            log.warning(
                "consul deregistration failed; put the service in maintenance instead",
                service_id=self.service_id,
                error=error,
            )
        except (ConsulError, TimeoutError) as exc:
            log.warning(
                "could not leave consul; its check will expire",
                service_id=self.service_id,
                error=error,
                maintenance_error=self._error_text("maintenance", exc),
            )

    async def stop(self) -> None:
        """Stop the heartbeat and close the client (the registration stays). Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        await self._stop_heartbeat()
        if self._client is not None:
            await self._client.close()

    # -- the heartbeat --------------------------------------------------------------------------

    async def _keep_registered(self) -> None:
        delay = self.interval_s if self._registered else self._retry_delay()
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()
            delay = self.interval_s
            try:
                if self._registered:
                    await self._heartbeat()
                else:
                    await self._register()
            except ConsulError as exc:
                self._failed(exc)
                delay = self._retry_delay()
            else:
                self._recovered()

    async def _heartbeat(self) -> None:
        """Report the engine's health (TTL), or check the agent still has us (gRPC)."""
        assert self._client is not None
        if self.check_kind == "grpc":
            with consul_errors(self.target, "lookup"):
                services = await self._client.agent.services()
            known = self.service_id in (services or {})
        else:
            healthy = self._healthy()
            with consul_errors(self.target, "heartbeat"):
                known = await self._report(healthy)
            if known and healthy != self._reported_healthy:
                log.info("consul check updated", check_id=self.check_id, passing=healthy)
            self._reported_healthy = healthy if known else None
        if not known:  # py-consul answers False for a 404: the agent restarted without us
            self._set_registered(False)
            log.warning(
                "the consul agent forgot this worker; registering again",
                service_id=self.service_id,
            )
            await self._register()

    async def _register(self) -> None:
        assert self._client is not None
        healthy = self._healthy()
        check = self._check(healthy)
        with consul_errors(self.target, "register"):
            await self._client.agent.service.register(
                self.target.service,
                service_id=self.service_id,
                address=self.address,
                port=self.port,
                tags=self.tags,
                meta=self.meta,
                check=check,
                replace_existing_checks=True,
            )
            if self.check_kind == "ttl":
                # A check's Status only sets the state of a *new* check: Consul carries an
                # existing check's state over a re-registration (agent.addServiceInternal), so
                # after an outage longer than the TTL the check would stay critical until the
                # next heartbeat and the fleet would vanish from the passing set. Report now.
                await self._report(healthy)
        self._reported_healthy = healthy if self.check_kind == "ttl" else None
        self._set_registered(True)
        self._recovered()
        agent_status = await self._agent_check_status()
        log.info(
            "registered in consul",
            consul=self.target.url,
            service=self.target.service,
            service_id=self.service_id,
            address=_host_port(self.address, self.port),
            check=self.check_kind,
            engine_healthy=healthy,
            check_status=agent_status,
            passing=agent_status == "passing",
        )

    async def _report(self, healthy: bool) -> bool:
        """Set the TTL check from the engine's health; False if the agent has no such check."""
        assert self._client is not None
        if healthy:
            return bool(
                await self._client.agent.check.ttl_pass(self.check_id, notes=self._note(healthy))
            )
        return bool(
            await self._client.agent.check.ttl_fail(self.check_id, notes=self._note(healthy))
        )

    async def _agent_check_status(self) -> str:
        """The check's status as the agent has it now, read back rather than assumed
        (``unknown`` when the agent cannot say)."""
        assert self._client is not None
        try:
            with consul_errors(self.target, "lookup"):
                checks = await self._client.agent.checks()
        except ConsulError as exc:
            ERRORS.labels(op=exc.op).inc()
            return "unknown"
        check = (checks or {}).get(self.check_id) or {}
        return str(check.get("Status") or "unknown")

    # -- pieces ---------------------------------------------------------------------------------

    @staticmethod
    def _tags(config: WorkerConfig, info: EngineInfo) -> list[str]:
        tags = [*config.consul_tags, f"model={info.model}", f"engine={info.engine}"]
        return list(dict.fromkeys(tags))

    def _meta(self, info: EngineInfo) -> dict[str, str]:
        return {
            "model": info.model,
            "engine": info.engine,
            "capacity": str(info.capacity),
            "model_version": info.model_version,
            "version": llmmesh.__version__,
            "worker_id": self.service_id,
        }

    def _check(self, healthy: bool) -> dict[str, Any]:
        common = {
            "CheckID": self.check_id,
            "DeregisterCriticalServiceAfter": self._deregister_after,
        }
        if self.check_kind == "grpc":
            interval = go_duration(timedelta(seconds=self.interval_s))
            url = f"{_host_port(self.address, self.port)}/{GRPC_HEALTH_SERVICE}"
            return {
                **consul.Check.grpc(url, interval, timeout=interval),
                "Name": "llm-mesh worker gRPC health",
                **common,
            }
        return {
            **consul.Check.ttl(go_duration(self.ttl)),
            "Name": "llm-mesh worker engine health",
            "Status": "passing" if healthy else "critical",
            "Notes": f"kept passing by the worker while its {self._info.engine} engine is healthy",
            **common,
        }

    def _note(self, healthy: bool) -> str:
        info = self._info
        if healthy:
            return f"the {info.engine} engine serving {info.model} is healthy"
        return f"the {info.engine} engine serving {info.model} is unhealthy"

    def _healthy(self) -> bool:
        try:
            return bool(self._is_healthy())
        except Exception:  # an engine that cannot say is not healthy
            return False

    def _set_registered(self, registered: bool) -> None:
        self._registered = registered
        REGISTERED.set(1 if registered else 0)

    def _failed(self, exc: ConsulError) -> None:
        """Count every failure; log the first of an outage only."""
        ERRORS.labels(op=exc.op).inc()
        self._failures += 1
        if exc.status is None or exc.status >= 500:
            self._set_registered(False)  # we cannot tell; a 403 or 400 does not undo a register
        if not self._outage:
            self._outage = True
            log.warning(
                "consul call failed; serving without it and retrying",
                consul=self.target.url,
                op=exc.op,
                status=exc.status,
                error=str(exc),
            )

    def _recovered(self) -> None:
        if self._outage:
            self._outage = False
            log.info("consul calls succeed again", consul=self.target.url, failures=self._failures)
        self._failures = 0

    def _retry_delay(self) -> float:
        """Exponential backoff from FIRST_RETRY_S up to the heartbeat interval, jittered."""
        ceiling = min(self.interval_s, FIRST_RETRY_S * 2 ** min(self._failures - 1, 16))
        return random.uniform(ceiling / 2, ceiling)

    def _error_text(self, op: str, exc: Exception) -> str:
        if isinstance(exc, ConsulError):
            ERRORS.labels(op=exc.op).inc()
            return str(exc)
        ERRORS.labels(op=op).inc()
        return f"consul {op}: timed out"

    async def _stop_heartbeat(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


__all__ = [
    "ERRORS",
    "REGISTERED",
    "ConsulRegistration",
    "advertise_address",
    "go_duration",
]
