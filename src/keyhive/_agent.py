"""The Agent base class: state, ``handle``, and the lifecycle hooks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from ._events import StopReason

if TYPE_CHECKING:
    from ._ref import AgentRef

__all__ = ["Agent"]


class Agent:
    """Subclass this and define ``async def handle(self, message)``.

    The manager creates one instance per incarnation. ``key``, ``partition``,
    ``manager`` and ``opts`` are set before any hook runs. Messages are handled one at
    a time, in arrival order; ``handle`` runs in the task of the caller that sent the
    message (a ``call``) or in a task of the manager's (a ``cast``).
    """

    state_type: ClassVar[type[Any] | None] = None
    """When set, fresh states are ``state_type(**params)`` and thawed ones decode into it."""

    state_version: ClassVar[int] = 1
    """Version written with every checkpoint; older checkpoints go through ``migrate``."""

    allow_dropped_fields: ClassVar[bool] = False
    """When True, a thawed state may have stored fields that ``state_type`` drops.

    By default such a thaw is refused (``ThawError``): a field renamed without a
    ``state_version`` bump would otherwise thaw as its default, losing the stored value.
    """

    state: Any
    _ref: AgentRef

    @property
    def key(self) -> Any:
        """The key this agent serves."""
        return self._ref._key

    @property
    def partition(self) -> Any:
        """The partition of the key (``None`` when none)."""
        return self._ref._partition

    @property
    def manager(self) -> str:
        """The name of the manager running this agent."""
        return self._ref._mgr.name

    @property
    def opts(self) -> Mapping[str, Any]:
        """The manager's ``agent_opts`` (read-only)."""
        return self._ref._mgr.agent_opts

    def initial_state(self, params: dict[str, Any]) -> Any:
        """The state of a fresh agent, from ``get(..., initial_state=params)``."""
        if self.state_type is not None:
            return self.state_type(**params)
        return dict(params)

    async def handle(self, message: Any) -> Any:
        """Handle one message; the return value is the reply to ``call``."""
        raise NotImplementedError(f"{type(self).__name__} must define async def handle(self, message)")

    def migrate(self, data: Any, from_version: int) -> Any:
        """Turn the decoded data of a checkpoint written by ``from_version`` into current data.

        The default refuses: a class that raises ``state_version`` must say how.
        """
        raise NotImplementedError(
            f"{type(self).__name__}.state_version is {self.state_version} but the checkpoint "
            f"was written by version {from_version}: define migrate(self, data, from_version)"
        )

    async def on_start(self, thawed: bool) -> None:
        """Called once the state is in place; ``thawed`` when it came from a checkpoint."""

    async def on_hibernate(self) -> None:
        """Called before the checkpoint is written (storage on)."""

    async def on_stop(self, reason: StopReason) -> None:
        """Called after the checkpoint is written, as the incarnation stops."""

    def stop(self, reason: StopReason | str = StopReason.NORMAL) -> None:
        """Stop this agent after the current message: hibernate (storage on), then stop."""
        self._ref._request_stop(StopReason(reason))
