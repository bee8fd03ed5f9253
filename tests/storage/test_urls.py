"""Storage URLs: each scheme builds its backend, bad ones fail in the constructor."""

from __future__ import annotations

from pathlib import Path

import pytest

import keyhive
from keyhive.storage import from_url
from keyhive.storage.postgres import PostgresStorage
from keyhive.storage.redis import RedisStorage
from keyhive.storage.sqlite import SQLiteStorage

from ..agents import Counter


def test_schemes_build_their_backends(tmp_path: Path) -> None:
    """Each URL scheme gives its backend, with options from the query string, without connecting."""
    assert from_url("memory://") is keyhive.storage.default_storage()
    assert isinstance(from_url(f"file://{tmp_path}"), keyhive.FileStorage)
    sqlite = from_url(f"sqlite:///{tmp_path}/a.db?synchronous=full&busy_timeout=2")
    assert isinstance(sqlite, SQLiteStorage)
    assert sqlite.path == f"{tmp_path}/a.db"
    assert from_url("sqlite:///relative.db").path == "relative.db"
    redis = from_url("redis://:secret@127.0.0.1:1/3?key_prefix=app:&ttl=60")
    assert isinstance(redis, RedisStorage)
    assert redis.key_prefix == "app:"
    assert isinstance(from_url("rediss://127.0.0.1:1/0"), RedisStorage)
    pg = from_url("postgresql://u:p@127.0.0.1:1/db?table=my_ckpts&pool_max=3")
    assert isinstance(pg, PostgresStorage)
    assert pg.table == "my_ckpts"
    assert isinstance(from_url("postgres://127.0.0.1/db"), PostgresStorage)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("ftp://x", "unknown storage URL scheme"),
        ("sqlite://host/x.db", "no host"),
        ("sqlite:///", "file path"),
        ("sqlite:///a.db?synchronous=sometimes", "synchronous"),
        ("sqlite:///a.db?colour=red", "unknown option"),
        ("redis:///0", "needs a host"),
        ("redis://h:1/0?ttl=abc", "ttl"),
        ("redis://h:1/0?ttl=-1", "ttl"),
        ("postgresql://h/db?table=bad;drop", "identifier"),
        ("postgresql://h/db?pool_max=0", "pool"),
        ("memory://x", "memory"),
        ("file://", "directory"),
    ],
)
def test_bad_urls_raise_value_error_in_the_constructor(url: str, match: str) -> None:
    """A bad URL or option is a ValueError when the manager is built, not later."""
    with pytest.raises(ValueError, match=match):
        keyhive.InstanceManager("x", Counter, storage=url)


def test_missing_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the driver installed, the error names the extra to install."""
    import sys

    for name in ["keyhive.storage.redis", "redis", "redis.asyncio", "redis.exceptions"]:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setitem(sys.modules, "redis", None)  # type: ignore[arg-type]
    with pytest.raises(ImportError, match=r"pip install 'keyhive\[redis\]'"):
        from_url("redis://127.0.0.1:1/0")
