"""The plain-asyncio floor: the least any keyed-agent registry pays (issue 4).

A dict of small objects; a lazily created ``asyncio.Lock`` per key for single-flight
creation and another per agent for one-message-at-a-time calls; no task per agent.
Every agent has the same idle timeout, so deadlines come due in the order they were
armed: one FIFO of (deadline, agent) behind one ``loop.call_at`` is the whole timer (a
re-armed agent is appended again; its stale entry, whose deadline object is no longer
the agent's, is skipped). "Hibernating" an agent encodes
its state into a dict, like keyhive's memory storage.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import orjson


class FloorAgent:
    """One live agent: its state, its call lock, its owners and idle deadline."""

    __slots__ = ("deadline", "key", "lock", "owners", "state")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.state: dict[str, Any] = {}
        self.lock: asyncio.Lock | None = None
        self.owners: set[object] | None = None
        self.deadline: float | None = None

    async def handle(self, message: Any) -> Any:
        if message != "incr":
            return None
        state = self.state
        state["count"] = count = state.get("count", 0) + 1
        return count


class FloorRegistry:
    """Keyed registry with single-flight creation, serialized calls and idle expiry."""

    def __init__(self, idle_timeout: float | None = None,
                 on_start: Callable[[FloorAgent], Awaitable[None]] | None = None,
                 on_stop: Callable[[FloorAgent], None] | None = None) -> None:
        self.agents: dict[Any, FloorAgent] = {}
        self.store: dict[Any, bytes] = {}
        self.activations = 0
        self._locks: dict[Any, asyncio.Lock] = {}
        self._timeout = idle_timeout
        self._on_start = on_start
        self._on_stop = on_stop
        self._fifo: deque[FloorAgent] = deque()
        self._due: deque[float] = deque()  # parallel to _fifo; shares the agents' float objects
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    async def get(self, key: Any) -> FloorAgent:
        agent = self.agents.get(key)
        if agent is not None:
            return agent
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            agent = self.agents.get(key)
            if agent is None:
                agent = FloorAgent(key)
                if self._on_start is not None:
                    await self._on_start(agent)
                self.activations += 1
                self.agents[key] = agent
                if self._timeout is not None:
                    self._arm(agent, self._loop.time() + self._timeout)
        if not lock._waiters:  # type: ignore[attr-defined]  # nobody else is creating it
            self._locks.pop(key, None)
        return agent

    async def call(self, agent: FloorAgent, message: Any) -> Any:
        lock = agent.lock
        if lock is None:
            lock = agent.lock = asyncio.Lock()
        async with lock:
            return await agent.handle(message)

    async def call_key(self, key: Any, message: Any) -> Any:
        return await self.call(await self.get(key), message)

    async def lookup(self, key: Any) -> FloorAgent | None:
        return self.agents.get(key)

    # -- attachments and idle expiry ------------------------------------------------------

    # async like keyhive's, so the same ``await`` is paid on both sides

    async def attach(self, agent: FloorAgent, owner: object) -> None:
        owners = agent.owners
        if owners is None:
            agent.owners = {owner}
        else:
            owners.add(owner)
        agent.deadline = None

    async def detach(self, agent: FloorAgent, owner: object) -> None:
        owners = agent.owners
        if owners is None or owner not in owners:
            return
        owners.discard(owner)
        if not owners:
            agent.owners = None
            if self._timeout is not None:
                self._arm(agent, self._loop.time() + self._timeout)

    def _arm(self, agent: FloorAgent, deadline: float) -> None:
        agent.deadline = deadline
        self._fifo.append(agent)
        self._due.append(deadline)
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        fifo, due, now = self._fifo, self._due, self._loop.time()
        agents, store, on_stop = self.agents, self.store, self._on_stop
        while fifo:
            deadline = due[0]
            if deadline > now:
                self._timer = self._loop.call_at(deadline, self._expire)
                return
            agent = fifo.popleft()
            due.popleft()
            if agent.deadline is not deadline or agents.get(agent.key) is not agent:
                continue  # re-armed or attached since, or already gone
            store[agent.key] = orjson.dumps(agent.state)
            del agents[agent.key]
            agent.deadline = None
            if on_stop is not None:
                on_stop(agent)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.agents.clear()
        self._fifo.clear()
        self._due.clear()
