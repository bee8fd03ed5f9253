"""Agents for the Ray runtime tests: importable by the shard hosts (PYTHONPATH has the repo)."""

from __future__ import annotations

import asyncio
from typing import Any

import keyhive


class Boom(Exception):
    """Raised by a handler on purpose; its type and attributes must reach the caller."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


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
            raise Boom("boom from the handler", code=7)
        if message == "unrebuildable":
            class Unrebuildable(Exception):  # a local class: no process but this one can name it
                pass

            raise Unrebuildable("1+2")
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
