"""The agent's local state (Consul's ``agent/local.State``): services and checks, the raft-like
index and what blocking queries wait on, the check runners (TTL timers and probes) and the
reaper; :class:`~tests.consul_agent.ConsulAgent` serves it over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterable

import aiohttp

from tests.consul_agent._decoding import CheckSpec
from tests.consul_agent._durations import format_go_duration
from tests.consul_agent._probes import DEFAULT_CHECK_TIMEOUT, probe_grpc, probe_http, probe_tcp
from tests.consul_agent._state import CRITICAL, PASSING, Check, Service, truncate

SERF_CHECK_ID = "serfHealth"


class LocalState:
    """Services, checks and the index, kept as a one-node dev agent keeps them."""

    def __init__(
        self, *, reap_interval: float, min_deregister_after: float, min_check_interval: float
    ) -> None:
        self._reap_interval = reap_interval
        self._min_deregister_after = min_deregister_after
        self._min_check_interval = min_check_interval
        self._http: aiohttp.ClientSession | None = None
        #: Probe tasks cancelled but not yet awaited.
        self._dead_tasks: set[asyncio.Task[None]] = set()
        self._index = 1
        self._services: dict[str, Service] = {}
        self._checks: dict[str, Check] = {}
        #: Index of the last change to each service name.
        self._service_index: dict[str, int] = {}
        #: Index at which a service name last lost its last instance (0: none yet).
        self._extinction_index = 0
        #: Set (and replaced) at every change to the catalog: what blocking queries wait on.
        self._changed = asyncio.Event()
        self._reset_state(index=1)

    def _reset_state(self, *, index: int) -> None:
        self._index = index
        self._services = {}
        self._checks = {SERF_CHECK_ID: self._serf_check()}
        self._service_index = {}
        self._extinction_index = 0
        self._changed = asyncio.Event()

    def _serf_check(self) -> Check:
        return Check(
            check_id=SERF_CHECK_ID,
            name="Serf Health Status",
            service_id="",
            service_name="",
            service_tags=[],
            type="",
            notes="",
            status=PASSING,
            output="Agent alive and reachable",
            catalog_output="Agent alive and reachable",
            create_index=1,
            modify_index=1,
        )

    def _commit(self, names: Iterable[str]) -> int:
        """Record a change to the catalog touching ``names``; wake blocking queries."""
        self._index += 1
        for name in names:
            self._service_index[name] = self._index
        self._changed.set()
        self._changed = asyncio.Event()
        return self._index

    def _health_index(self, name: str) -> int:
        if any(s.name == name for s in self._services.values()):
            return self._service_index.get(name, self._index)
        return self._extinction_index or self._index

    def _all_names(self) -> set[str]:
        return {s.name for s in self._services.values()}

    def _register(
        self, service: Service, specs: list[CheckSpec], *, replace_existing: bool
    ) -> None:
        previous = self._services.get(service.id)
        touched = {service.name}
        changed = previous is None or previous.content() != service.content()
        if previous is not None:
            touched.add(previous.name)
            service.create_index = previous.create_index
            service.modify_index = previous.modify_index
        self._services[service.id] = service
        existing = {cid for cid, c in self._checks.items() if c.service_id == service.id}
        changed_checks: list[Check] = []
        new_ids: set[str] = set()
        for position, spec in enumerate(specs, start=1):
            check_id = spec.check_id or f"service:{service.id}"
            if not spec.check_id and len(specs) > 1:
                check_id += f":{position}"
            new_ids.add(check_id)
            old = self._checks.get(check_id)
            status, output = (old.status, old.output) if old else (spec.status or CRITICAL, "")
            reap_after = 0.0
            if spec.deregister_after > 0:
                reap_after = max(spec.deregister_after, self._min_deregister_after)
            check = Check(
                check_id=check_id,
                name=spec.name or f"Service '{service.name}' check",
                service_id=service.id,
                service_name=service.name,
                service_tags=list(service.tags or []),
                type=spec.type,
                notes=spec.notes,
                status=status,
                output=output,
                spec=spec,
                interval_text=format_go_duration(spec.interval) if spec.interval else "",
                timeout_text=format_go_duration(spec.timeout) if spec.timeout else "",
                reap_after=reap_after,
                catalog_output=old.catalog_output if old else output,
                create_index=old.create_index if old else 0,
                modify_index=old.modify_index if old else 0,
            )
            if old is not None:
                self._stop_runner(old)
                touched.add(old.service_name)
            if old is None or old.catalog_view() != check.catalog_view():
                changed_checks.append(check)
            self._checks[check_id] = check
            self._start_runner(check)
        if replace_existing:
            for check_id in existing - new_ids:
                self._stop_runner(self._checks.pop(check_id))
                changed = True
        if changed or changed_checks:
            index = self._commit(touched)
            if changed:
                service.modify_index = index
                service.create_index = service.create_index or index
            for check in changed_checks:
                check.modify_index = index
                check.create_index = check.create_index or index
            if previous is not None and previous.name != service.name:
                self._note_extinction(previous.name, index)

    def _note_extinction(self, name: str, index: int) -> None:
        if name not in self._all_names():
            self._extinction_index = index

    def _deregister(self, service_id: str) -> None:
        service = self._services.pop(service_id)
        for check_id in [cid for cid, c in self._checks.items() if c.service_id == service_id]:
            self._stop_runner(self._checks.pop(check_id))
        index = self._commit({service.name})
        self._note_extinction(service.name, index)

    def _set_status(self, check: Check, status: str, output: str) -> None:
        """local.State.UpdateCheck: the critical clock, then a catalog change if status moved."""
        if status == CRITICAL:
            if check.critical_since is None:
                check.critical_since = time.monotonic()
        else:
            check.critical_since = None
        if check.status == status and check.output == output:
            return
        if check.status == status:
            check.output = output  # output-only: the agent defers syncing it to the catalog
            return
        check.status, check.output = status, output
        names = {check.service_name} if check.service_id else self._all_names()
        check.modify_index = self._commit(names)
        check.catalog_output = output

    # ---- check runners ---------------------------------------------------------------------------

    def _start_runner(self, check: Check) -> None:
        spec = check.spec
        if spec is None:
            return
        if spec.ttl > 0:
            check.timer = asyncio.get_running_loop().call_later(spec.ttl, self._ttl_expired, check)
        else:
            check.task = asyncio.create_task(
                self._probe_loop(check), name=f"consul-check-{check.check_id}"
            )

    def _stop_runner(self, check: Check) -> None:
        if check.timer is not None:
            check.timer.cancel()
            check.timer = None
        if check.task is not None:
            check.task.cancel()
            self._dead_tasks.add(check.task)
            check.task = None

    async def _drain_probe_tasks(self) -> None:
        tasks, self._dead_tasks = self._dead_tasks, set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _ttl_expired(self, check: Check) -> None:
        check.timer = None
        if self._checks.get(check.check_id) is not check:
            return
        output = "TTL expired"
        if check.last_ttl_output:
            output += f" (last output before timeout follows): {check.last_ttl_output}"
        self._set_status(check, CRITICAL, output)

    def _ttl_update(self, check: Check, status: str, output: str) -> None:
        assert check.spec is not None
        output = truncate(output, check.spec.output_max_size)
        self._set_status(check, status, output)
        check.last_ttl_output = output
        if check.timer is not None:
            check.timer.cancel()
        check.timer = asyncio.get_running_loop().call_later(
            check.spec.ttl, self._ttl_expired, check
        )

    async def _probe_loop(self, check: Check) -> None:
        spec = check.spec
        assert spec is not None
        interval = max(spec.interval, self._min_check_interval)
        timeout = spec.timeout or DEFAULT_CHECK_TIMEOUT
        await asyncio.sleep(random.uniform(0, interval))
        while True:
            try:
                async with asyncio.timeout(timeout + 0.5):
                    status, output = await self._probe(spec, timeout)
            except TimeoutError:
                status, output = CRITICAL, f"probe timed out after {format_go_duration(timeout)}"
            if self._checks.get(check.check_id) is not check:
                return
            self._set_status(check, status, truncate(output, spec.output_max_size))
            await asyncio.sleep(interval)

    async def _probe(self, spec: CheckSpec, timeout: float) -> tuple[str, str]:
        if spec.grpc:
            return await probe_grpc(spec.grpc, use_tls=spec.grpc_use_tls, timeout=timeout)
        if spec.http:
            if self._http is None:
                self._http = aiohttp.ClientSession()
            return await probe_http(self._http, spec, timeout)
        return await probe_tcp(spec.tcp)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reap_interval)
            self._reap()

    def _reap(self) -> None:
        """Agent.reapServicesInternal."""
        now = time.monotonic()
        for check in list(self._checks.values()):
            if (
                check.service_id in self._services
                and check.reap_after > 0
                and check.critical_since is not None
                and now - check.critical_since > check.reap_after
            ):
                self._deregister(check.service_id)
