"""The whole benchmark: start the mesh, then for each fault in turn run open-loop load through
a baseline, the fault and the recovery, and measure."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from bench._common import Progress
from bench.chaos._faults import INJECT
from bench.chaos._load import run_load
from bench.chaos._measure import FaultRun, Marks
from bench.chaos._mesh import Mesh
from bench.chaos._options import Options


@dataclass
class Run:
    """Every fault's run, in order."""

    options: Options
    faults: list[FaultRun] = field(default_factory=list)
    #: Faults chosen but not run, and why.
    skipped: dict[str, str] = field(default_factory=dict)
    startup_s: float = 0.0


def fault_estimate_s(name: str, options: Options) -> float:
    """About how long a fault's run takes (for the progress bar)."""
    held = {
        "consul-down": options.consul_down_s,
        "slow-readers": options.fault_s,
        "rolling-restart": 20.0,
    }
    length = held.get(name, options.fault_s if "stop" in name else 3.0)
    return options.baseline_s + length + 3.0 + options.settle_s + options.tail_s


def estimate_s(options: Options) -> float:
    return 15.0 + options.warmup_s + sum(fault_estimate_s(n, options) for n in options.faults)


async def run_fault(mesh: Mesh, name: str, options: Options, seed: int) -> FaultRun:
    """Load through ``options.baseline_s`` of baseline, fault ``name`` and the wait until the
    fleet is whole again (and has stayed whole ``options.settle_s``), then ``options.tail_s``
    more."""
    stop = asyncio.Event()
    max_s = options.baseline_s + fault_estimate_s(name, options) + options.recover_timeout_s + 60
    load_task = asyncio.create_task(
        run_load(mesh.router_addresses, options, stop, seed=seed, max_s=max_s)
    )
    marks = Marks()
    try:
        await asyncio.sleep(options.baseline_s)
        try:
            await INJECT[name](mesh, options, marks)
        except Exception as exc:  # a fault that could not be carried out is reported, not hidden
            marks.error = f"{type(exc).__name__}: {exc}"
        marks.undone = time.monotonic()
        if not marks.injected:
            marks.injected = marks.undone
        waited = await mesh.wait_whole(
            deadline=marks.undone + options.recover_timeout_s, settle_s=options.settle_s
        )
        if waited is not None:
            marks.whole = marks.undone + waited
        await asyncio.sleep(options.tail_s)
    finally:
        stop.set()
        load = await load_task
    return FaultRun(name=name, marks=marks, load=load)


async def run_all(options: Options) -> Run:
    run = Run(options=options)
    async with Progress(estimate_s(options), enabled=options.progress) as progress:
        progress.phase("starting the mesh", 15.0)
        started = time.monotonic()
        mesh = Mesh()
        await mesh.start()
        run.startup_s = time.monotonic() - started
        try:
            progress.phase("warming up", options.warmup_s)
            await run_load(
                mesh.router_addresses,
                options,
                asyncio.Event(),
                seed=options.seed - 1,
                max_s=options.warmup_s,
            )
            for i, name in enumerate(options.faults):
                broken = next((f.name for f in run.faults if f.marks.whole is None), None)
                if broken is not None:
                    # Later faults would measure the damage the earlier one left.
                    run.skipped[name] = f"the fleet was not whole again after {broken}"
                    continue
                progress.phase(name, fault_estimate_s(name, options))
                run.faults.append(await run_fault(mesh, name, options, options.seed + i))
        finally:
            await mesh.close()
    return run
