"""Shared agents and fixtures for the core tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import keyhive


class Counter(keyhive.Agent):
    """The SPEC's example agent, with hooks that record what ran."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"count": 0, **params}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["count"] += 1
        elif message == "boom":
            raise RuntimeError("boom")
        elif message == "stop":
            self.stop()
        elif isinstance(message, tuple) and message[0] == "sleep":
            await asyncio.sleep(message[1])
            self.state["count"] += 1
        elif isinstance(message, tuple) and message[0] == "set":
            self.state[message[1]] = message[2]
        return self.state["count"]


@pytest.fixture
def make_manager() -> Any:
    """Build managers that are closed (and so unregistered) at the end of the test."""
    made: list[keyhive.InstanceManager] = []
    counter = iter(range(1_000_000))

    def factory(agent: type[keyhive.Agent] = Counter, **kwargs: Any) -> keyhive.InstanceManager:
        kwargs.setdefault("storage", keyhive.MemoryStorage())
        name = kwargs.pop("name", f"test-{next(counter)}")
        manager = keyhive.InstanceManager(name, agent, **kwargs)
        made.append(manager)
        return manager

    yield factory
    # Managers left running by a test are closed by the test's own loop teardown below.
    for manager in made:
        assert not manager.running, f"{manager!r} was left running by the test"


@pytest.fixture
async def manager(make_manager: Callable[..., keyhive.InstanceManager]) -> AsyncIterator[keyhive.InstanceManager]:
    """A running Counter manager on its own memory storage, no idle timeout."""
    async with make_manager() as m:
        yield m
