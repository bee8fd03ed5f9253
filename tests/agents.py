"""Agents shared by the tests."""

from __future__ import annotations

import asyncio
from typing import Any

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
