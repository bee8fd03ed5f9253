"""Storage backends and the URL forms that name them.

=====================  ==========================================  =================
URL                    backend                                     needs
=====================  ==========================================  =================
``memory://``          the process-wide :class:`MemoryStorage`     nothing
``file:///dir``        :class:`FileStorage`                        nothing
``sqlite:///path.db``  :class:`~keyhive.storage.sqlite.SQLiteStorage`  ``keyhive[sqlite]``
``redis://host/0``     :class:`~keyhive.storage.redis.RedisStorage`    ``keyhive[redis]``
``postgresql://…``     :class:`~keyhive.storage.postgres.PostgresStorage`  ``keyhive[postgres]``
=====================  ==========================================  =================

Driver-backed modules are imported only when their URL is used.
"""

from __future__ import annotations

import importlib
from typing import Any
from urllib.parse import unquote, urlsplit

from ._base import (
    BatchStorage,
    Checkpoint,
    Fence,
    Lease,
    LeaseStorage,
    ListableStorage,
    SaveItem,
    Storage,
    StoredKey,
    TimerIndexStorage,
)
from ._driver import query_options, url_flag
from .file import FileStorage
from .memory import MemoryStorage

__all__ = [
    "BatchStorage",
    "Checkpoint",
    "Fence",
    "FileStorage",
    "Lease",
    "LeaseStorage",
    "ListableStorage",
    "MemoryStorage",
    "SaveItem",
    "Storage",
    "StoredKey",
    "TimerIndexStorage",
    "default_storage",
    "from_url",
    "is_storage",
]

_DEFAULT = MemoryStorage()

# scheme -> (module, class, extra)
_SCHEMES: dict[str, tuple[str, str, str]] = {
    "sqlite": ("keyhive.storage.sqlite", "SQLiteStorage", "sqlite"),
    "redis": ("keyhive.storage.redis", "RedisStorage", "redis"),
    "rediss": ("keyhive.storage.redis", "RedisStorage", "redis"),
    "unix": ("keyhive.storage.redis", "RedisStorage", "redis"),
    "postgresql": ("keyhive.storage.postgres", "PostgresStorage", "postgres"),
    "postgres": ("keyhive.storage.postgres", "PostgresStorage", "postgres"),
}


def default_storage() -> MemoryStorage:
    """The process-wide in-memory storage that managers use when ``storage`` is omitted."""
    return _DEFAULT


def is_storage(obj: object) -> bool:
    """Whether ``obj`` has the four methods of :class:`Storage`."""
    return all(callable(getattr(obj, name, None)) for name in ("load", "save", "delete", "aclose"))


def from_url(url: str) -> Any:
    """The backend a storage URL names, constructed but not yet connected.

    Raises:
        ValueError: unknown scheme or bad option in the URL.
        ImportError: the backend's extra is not installed (the message names it).
    """
    if not isinstance(url, str):
        raise TypeError(f"storage URL must be a str, not {type(url).__name__}")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "memory":
        if parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"memory storage takes no path: write 'memory://', not {url!r}")
        return _DEFAULT
    if scheme == "file":
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise ValueError(f"file storage needs a directory: 'file:///path/to/dir', not {url!r}")
        options = query_options(parts.query, {"create"}, url)
        if "create" in options:
            return FileStorage(path, create=url_flag(options["create"], "create", url))
        return FileStorage(path)
    if scheme not in _SCHEMES:
        known = ", ".join(["memory://", "file://", *sorted(f"{s}://" for s in _SCHEMES)])
        raise ValueError(f"unknown storage URL scheme {parts.scheme!r} in {url!r}; use one of {known}")
    module_name, class_name, extra = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"{scheme}:// storage is not available in this keyhive build") from exc
        raise ImportError(
            f"{scheme}:// storage needs the {extra!r} extra: pip install 'keyhive[{extra}]'"
        ) from exc
    return getattr(module, class_name).from_url(url)
