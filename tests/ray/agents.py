"""Agents for the Ray runtime tests: importable by the shard hosts (PYTHONPATH has the repo)."""

from __future__ import annotations

import asyncio
from typing import Any

import keyhive


class Boom(Exception):
    """Raised by a handler on purpose; its type must reach the caller."""


class Unrebuildable(Exception):
    """An exception whose constructor needs two arguments: pickle cannot rebuild it."""

    def __init__(self, a: int, b: int) -> None:
        super().__init__(f"{a}+{b}")
        self.total = a + b

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


class Counter(keyhive.Agent):
    """Counts ``incr`` messages; understands a few test commands."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"count": 0, **params}

    async def handle(self, message: Any) -> Any:
        if message == "incr":
            self.state["count"] += 1
            return self.state["count"]
        if message == "get":
            return self.state["count"]
        if message == "boom":
            raise Boom("boom from the handler")
        if message == "unrebuildable":
            raise Unrebuildable(1, 2)
        if message == "bad-reply":
            return {1, 2}
        if isinstance(message, dict) and "sleep" in message:
            await asyncio.sleep(message["sleep"])
            self.state["count"] += 1
            return self.state["count"]
        if message == "pid":
            import os

            return os.getpid()
        return None
