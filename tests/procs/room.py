"""The room agent of the web-worker tests (importable by Ray shard hosts: no side effects)."""

from __future__ import annotations

from typing import Any

import keyhive


class Room(keyhive.Agent):
    """A chat room: each posted message gets the next sequence number."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"messages": []}

    async def handle(self, message: Any) -> Any:
        if message == "messages":
            return list(self.state["messages"])
        self.state["messages"].append(message)
        return len(self.state["messages"])
