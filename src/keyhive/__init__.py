"""keyhive: one live asyncio agent per key.

Started on demand, kept alive while someone is attached, hibernated to storage when
idle, thawed on the next ``get``. Start with :class:`InstanceManager` and
:class:`Agent`.
"""

from __future__ import annotations

from ._agent import Agent
from ._errors import (
    AgentStopped,
    CodecError,
    ConflictError,
    KeyhiveError,
    LeaseLost,
    ManagerClosed,
    NotFound,
    OwnedElsewhere,
    ReentrancyError,
    StorageError,
    SubscriberOverflow,
    ThawError,
    UnsavedAgentsError,
)
from ._events import Event, EventKind, StopReason
from ._manager import InstanceManager, Stats, get_manager
from ._ref import AgentRef
from .codecs import Codec, JSONCodec
from .storage import Checkpoint, FileStorage, MemoryStorage, SaveItem, Storage, StoredKey

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AgentRef",
    "AgentStopped",
    "Checkpoint",
    "Codec",
    "CodecError",
    "ConflictError",
    "Event",
    "EventKind",
    "FileStorage",
    "get_manager",
    "InstanceManager",
    "JSONCodec",
    "KeyhiveError",
    "LeaseLost",
    "ManagerClosed",
    "MemoryStorage",
    "NotFound",
    "OwnedElsewhere",
    "ReentrancyError",
    "SaveItem",
    "SQLiteStorage",
    "Stats",
    "StopReason",
    "Storage",
    "StorageError",
    "StoredKey",
    "SubscriberOverflow",
    "ThawError",
    "UnsavedAgentsError",
]

# Backends imported on first use (``keyhive.SQLiteStorage``, SPEC §7): the driver-backed ones
# only when asked for, with an error naming the extra when the driver is missing.
_LAZY = {
    "SQLiteStorage": ("keyhive.storage.sqlite", "sqlite"),
    "RedisStorage": ("keyhive.storage.redis", "redis"),
    "PostgresStorage": ("keyhive.storage.postgres", "postgres"),
}


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module 'keyhive' has no attribute {name!r}")
    import importlib

    module_name, extra = _LAZY[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"keyhive.{name} needs the {extra!r} extra: pip install 'keyhive[{extra}]'"
        ) from exc
    value = getattr(module, name)
    value.__module__ = "keyhive"
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


# Show the public names in reprs and tracebacks, not the private modules.
for _name in __all__:
    if _name in _LAZY:
        continue
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("keyhive."):
        _obj.__module__ = "keyhive"
del _name, _obj
