"""nigrains 0.3.1 (a virtual-actor library with idle collection) through its public API."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nigrains import Grain, GrainId, Runtime

__all__ = ["GrainId", "counter_grain", "runtime"]


def counter_grain(on_activate: Callable[[], Any] | None = None,
                  on_deactivate: Callable[[], None] | None = None,
                  activate_sleep: float = 0.0) -> type[Grain]:
    """A counter grain class (an empty-dict state, like the keyhive agent)."""

    class Counter(Grain):
        grain_type = "counter"

        def __init__(self, grain_id: GrainId) -> None:
            super().__init__(grain_id)
            self.state: dict[str, Any] = {}

        async def activate(self) -> None:
            if on_activate is not None:
                on_activate()
            if activate_sleep:
                await asyncio.sleep(activate_sleep)

        async def deactivate(self) -> None:
            if on_deactivate is not None:
                on_deactivate()

        async def incr(self) -> int:
            state = self.state
            state["count"] = count = state.get("count", 0) + 1
            return count

        async def noop(self) -> None:
            return None

    return Counter


def runtime(grain: type[Grain], *, idle_seconds: float = 3600.0, sweep_seconds: float = 30.0) -> Runtime:
    """A runtime with ``grain`` registered; use it as ``async with``."""
    rt = Runtime(idle_seconds=idle_seconds, sweep_seconds=sweep_seconds, drain_seconds=0.0)
    rt.register(grain)
    return rt
