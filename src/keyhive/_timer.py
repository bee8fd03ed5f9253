"""Idle deadlines on the event loop's clock, bucketed so that an idle agent holds no timer.

Agents whose deadlines fall in the same ``resolution``-wide slot share one
``loop.call_at`` handle; each agent only holds the float of its slot. A slot fires no
earlier than every deadline in it, so an agent never idles out early, and at most
``resolution`` late. Moving a deadline later costs nothing here: the old slot fires,
finds the agent not due yet and files it again. This module is the only one that reads
the loop's clock.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Protocol

__all__ = ["DeadlineWheel"]


class _Timed(Protocol):
    _armed: float | None
    _deadline: float | None


class _Slot(list[_Timed]):
    """The items of one slot, and the slot's time (the one float its items share)."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        super().__init__()
        self.at = at


class DeadlineWheel:
    """Slots of deadlines, one loop timer per slot."""

    __slots__ = ("_handles", "_loop", "_on_due", "_resolution", "_slots")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float,
                 on_due: Callable[[list[_Timed]], None]) -> None:
        self._loop = loop
        self._resolution = resolution
        self._on_due = on_due
        self._slots: dict[float, _Slot] = {}
        self._handles: dict[float, asyncio.TimerHandle] = {}

    def now(self) -> float:
        """The loop's clock."""
        return self._loop.time()

    def arm(self, item: _Timed, deadline: float) -> None:
        """Make sure a slot at or before ``deadline`` will look at ``item``.

        When ``deadline`` is the item's own deadline, it is rounded up to the slot's time
        and shares the slot's float (the slot fires then anyway): an idle agent holds no
        float of its own (24 bytes each).
        """
        armed = item._armed
        if armed is not None and armed <= deadline:
            return
        res = self._resolution
        at = math.ceil(deadline / res) * res
        if at < deadline:  # float rounding
            at += res
        slot = self._slots.get(at)
        if slot is None:
            slot = self._slots[at] = _Slot(at)
            self._handles[at] = self._loop.call_at(at, self._fire, at)
        slot.append(item)
        at = slot.at
        item._armed = at
        if item._deadline == deadline:
            item._deadline = at

    def _fire(self, at: float) -> None:
        """The slot at ``at`` is due: hand its due items to ``on_due``, re-file the others."""
        slot = self._slots.pop(at, None)
        self._handles.pop(at, None)
        if not slot:
            return
        now = max(self._loop.time(), at)
        due: list[_Timed] = []
        for item in slot:
            if item._armed != at:  # filed in an earlier slot since
                continue
            item._armed = None
            deadline = item._deadline
            if deadline is None:
                continue
            if deadline <= now:
                due.append(item)
            else:
                self.arm(item, deadline)
        if due:
            self._on_due(due)

    def close(self) -> None:
        """Cancel every slot's timer."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
        for slot in self._slots.values():
            for item in slot:
                item._armed = None
        self._slots.clear()
