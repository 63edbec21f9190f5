"""What every engine's ``generate`` stream must look like, checked by every engine's tests."""

from __future__ import annotations

import asyncio

from worker.engines import Completion, Engine, EngineRequest, TextDelta


async def run(
    engine: Engine, req: EngineRequest, *, timeout: float = 10.0
) -> tuple[list[str], Completion]:
    """Every text delta of ``req`` and its completion: deltas are never empty, and exactly one
    completion comes last (all within ``timeout`` seconds)."""
    deltas: list[str] = []
    completions: list[Completion] = []
    async with asyncio.timeout(timeout):
        async for item in engine.generate(req):
            assert not completions, "nothing may follow the completion"
            if isinstance(item, TextDelta):
                assert item.text, "deltas are never empty"
                deltas.append(item.text)
            else:
                completions.append(item)
    assert len(completions) == 1
    return deltas, completions[0]


async def text_of(engine: Engine, req: EngineRequest) -> str:
    """The whole text of ``req``."""
    deltas, _ = await run(engine, req)
    return "".join(deltas)
