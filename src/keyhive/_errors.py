"""The exception tree.

Every error keyhive raises on purpose derives from :class:`KeyhiveError`::

    KeyhiveError
    ├── NotFound            (also a LookupError)  no such agent / manager
    ├── AgentStopped        the incarnation behind an AgentRef has stopped
    ├── ManagerClosed       the manager is not running (before start, after close)
    ├── ThawError           a checkpoint exists but cannot be restored; nothing was started
    ├── CodecError          a state cannot be encoded (or bytes decoded) by the codec
    └── StorageError        a storage backend failed; the original error is ``__cause__``
        └── ConflictError   a compare-and-set write lost: newer state is already stored

Configuration mistakes are ``TypeError`` / ``ValueError``; timeouts are the builtin
``TimeoutError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AgentStopped",
    "CodecError",
    "ConflictError",
    "KeyhiveError",
    "ManagerClosed",
    "NotFound",
    "StorageError",
    "ThawError",
    "UnsavedAgentsError",
]


class KeyhiveError(Exception):
    """Base class of every error keyhive raises on purpose."""


class NotFound(KeyhiveError, LookupError):
    """No live agent for that key, or no running manager of that name."""


class AgentStopped(KeyhiveError):
    """The agent incarnation behind this reference has stopped."""


class ManagerClosed(KeyhiveError):
    """The manager is not running: it was not started yet, or it was closed."""


class ThawError(KeyhiveError):
    """A checkpoint exists but could not be restored.

    Nothing was started and the stored bytes were left untouched; the underlying
    error is ``__cause__``.
    """


class CodecError(KeyhiveError):
    """A state could not be encoded, or stored bytes could not be decoded."""


class StorageError(KeyhiveError):
    """A storage backend failed; the backend's own exception is ``__cause__``."""


class ConflictError(StorageError):
    """A compare-and-set write found a different version stored: nothing was written."""


class UnsavedAgentsError(StorageError):
    """Manager close could not save every live agent before its deadline.

    ``keys`` lists ``(partition, key)`` of the agents whose state was not saved and
    ``errors`` the last error seen for each.
    """

    def __init__(self, message: str, keys: Sequence[tuple[Any, Any]],
                 errors: Sequence[BaseException | None]) -> None:
        super().__init__(message)
        self.keys = list(keys)
        self.errors = list(errors)
