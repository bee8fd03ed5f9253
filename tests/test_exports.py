"""The public API: what `import keyhive` offers, pinned so that changes are deliberate."""

from __future__ import annotations

import subprocess
import sys

import keyhive

PUBLIC = {
    "Agent", "AgentRef", "AgentStopped", "Checkpoint", "Codec", "CodecError", "ConflictError",
    "Event", "EventKind", "FileStorage", "get_manager", "InstanceManager", "JSONCodec",
    "KeyhiveError", "LeaseLost", "ManagerClosed", "MemoryStorage", "NotFound", "OwnedElsewhere",
    "ReentrancyError", "SaveItem", "SQLiteStorage", "Stats", "StopReason", "Storage", "StorageError", "StoredKey",
    "SubscriberOverflow", "ThawError", "UnsavedAgentsError",
}


def test_all_is_pinned_and_sorted() -> None:
    """__all__ lists exactly the public names, sorted case-insensitively."""
    assert set(keyhive.__all__) == PUBLIC
    assert keyhive.__all__ == sorted(keyhive.__all__, key=str.lower)
    for name in keyhive.__all__:
        assert hasattr(keyhive, name)


def test_public_classes_show_the_public_module() -> None:
    """Re-exported classes report module 'keyhive' in reprs and tracebacks."""
    assert keyhive.InstanceManager.__module__ == "keyhive"
    assert repr(keyhive.ThawError) == "<class 'keyhive.ThawError'>"


def test_error_tree() -> None:
    """Every error derives from KeyhiveError; NotFound is a LookupError; ConflictError a StorageError."""
    for name in ["NotFound", "AgentStopped", "ThawError", "StorageError", "ConflictError",
                 "CodecError", "ManagerClosed", "UnsavedAgentsError", "LeaseLost", "OwnedElsewhere",
                 "ReentrancyError", "SubscriberOverflow"]:
        assert issubclass(getattr(keyhive, name), keyhive.KeyhiveError)
    assert issubclass(keyhive.LeaseLost, keyhive.ConflictError)
    assert issubclass(keyhive.NotFound, LookupError)
    assert issubclass(keyhive.ConflictError, keyhive.StorageError)
    assert issubclass(keyhive.UnsavedAgentsError, keyhive.StorageError)


def test_stop_reasons_are_strings() -> None:
    """StopReason values are the strings SPEC names."""
    assert keyhive.StopReason.IDLE_TIMEOUT == "idle_timeout"
    assert keyhive.StopReason.STOPPED == "stopped"
    assert keyhive.StopReason.NORMAL == "normal"
    assert keyhive.StopReason.SHUTDOWN == "shutdown"


def test_core_import_is_light() -> None:
    """Importing keyhive loads no storage driver, web framework or CLI library."""
    code = (
        "import sys, keyhive; "
        "heavy = {'redis', 'asyncpg', 'aiosqlite', 'fastapi', 'starlette', 'typer', 'rich', 'pydantic'}; "
        "print(sorted(heavy & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_backends_are_importable_from_the_top_level_on_first_use() -> None:
    """keyhive.SQLiteStorage, RedisStorage and PostgresStorage are the backends' classes, imported
    only when first asked for (SPEC §7), and shown as keyhive's."""
    code = (
        "import sys, keyhive; "
        "before = {'keyhive.storage.sqlite', 'keyhive.storage.redis', 'keyhive.storage.postgres'} & set(sys.modules); "
        "from keyhive.storage.sqlite import SQLiteStorage; "
        "from keyhive.storage.redis import RedisStorage; "
        "from keyhive.storage.postgres import PostgresStorage; "
        "assert keyhive.SQLiteStorage is SQLiteStorage and keyhive.RedisStorage is RedisStorage; "
        "assert keyhive.PostgresStorage is PostgresStorage; "
        "assert repr(keyhive.SQLiteStorage) == \"<class 'keyhive.SQLiteStorage'>\"; "
        "assert 'SQLiteStorage' in dir(keyhive); "
        "print(sorted(before))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_driver_names_its_extra() -> None:
    """keyhive.RedisStorage without redis-py raises ImportError naming keyhive[redis]."""
    code = (
        "import sys; sys.modules['redis'] = None; sys.modules['redis.asyncio'] = None; "
        "import keyhive\n"
        "try:\n    keyhive.RedisStorage\nexcept ImportError as exc:\n    print(exc)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'keyhive[redis]'" in out.stdout, out.stdout + out.stderr
