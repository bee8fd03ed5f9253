"""Attachments and the idle deadline as a pure state machine.

No clock, no loop, no I/O: every method takes ``now`` (and the idle timeout) as plain
numbers and says what the runtime must do. That keeps the rules of SPEC §4 testable
with a table of events, and keeps the per-agent cost to three slots:

* a new incarnation has no owners, so its deadline is ``now + timeout`` at once;
* ``attach`` clears the deadline; ``detach`` of the last owner sets a fresh full one;
* ``touch`` restarts the deadline only while nothing is attached;
* calls and casts do not move the deadline (unless the manager opts in via ``touch``);
* a timeout of ``None`` means never idle out.

The runtime arms a timer for the deadline it reads back; a timer that fires early (the
deadline moved later since) finds ``is_due`` false and re-arms, so a stale timer is
harmless.
"""

from __future__ import annotations

__all__ = ["Lifecycle"]


class Lifecycle:
    """Owners and idle deadline of one agent incarnation."""

    __slots__ = ("_armed", "_deadline", "_owners")

    def __init__(self) -> None:
        self._owners: set[object] | None = None
        self._deadline: float | None = None
        self._armed: float | None = None  # the timer slot holding us; owned by the runtime

    @property
    def attachments(self) -> int:
        """How many owners are attached."""
        owners = self._owners
        return 0 if owners is None else len(owners)

    @property
    def idle_deadline(self) -> float | None:
        """Loop time at which the agent idles out, or ``None`` (attached, or no timeout)."""
        return self._deadline

    def started(self, now: float, timeout: float | None) -> bool:
        """A new incarnation: start the idle deadline. True when a timer must be armed."""
        if timeout is None:
            return False
        self._deadline = now + timeout
        return True

    def attached(self, owner: object) -> bool:
        """Add ``owner``; True when it was not attached before (idempotent per owner)."""
        owners = self._owners
        if owners is None:
            self._owners = {owner}
        elif owner in owners:
            return False
        else:
            owners.add(owner)
        self._deadline = None
        return True

    def detached(self, owner: object, now: float, timeout: float | None) -> bool:
        """Remove ``owner``; True when it was attached.

        When the last owner leaves, a fresh full deadline starts (``idle_deadline``).
        """
        owners = self._owners
        if owners is None or owner not in owners:
            return False
        owners.remove(owner)
        if not owners:
            self._owners = None
            if timeout is not None:
                self._deadline = now + timeout
        return True

    def touched(self, now: float, timeout: float | None) -> bool:
        """Restart the deadline when nothing is attached; True when a timer must be armed."""
        if self._owners is not None or timeout is None:
            return False
        self._deadline = now + timeout
        return True

    def postponed(self, deadline: float) -> None:
        """Set the deadline to ``deadline`` (a retry after a failed hibernate)."""
        self._deadline = deadline

    def is_due(self, now: float) -> bool:
        """Whether the agent has idled out at ``now``."""
        deadline = self._deadline
        return self._owners is None and deadline is not None and deadline <= now

    def clear(self) -> set[object] | tuple[()]:
        """Forget owners and deadline (the incarnation stopped); return the owners it had."""
        owners = self._owners
        self._owners = None
        self._deadline = None
        return () if owners is None else owners
