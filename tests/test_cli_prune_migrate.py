"""keyhive prune and keyhive migrate on a real SQLite file, with agent modules written to tmp_path."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import keyhive
from keyhive._keys import storage_key
from keyhive.cli import app, parse_duration
from keyhive.storage.sqlite import SQLiteStorage

from .agents import Counter

runner = CliRunner()
DAY = 86400.0
TABLE = "keyhive_checkpoints"


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def _db(url: str) -> str:
    return url.removeprefix("sqlite:///")


def _age(url: str, days: float, *keys: str) -> None:
    """Move the last-write time of these checkpoints ``days`` into the past (all when none given)."""
    with sqlite3.connect(_db(url)) as conn:
        if keys:
            conn.executemany(f"UPDATE {TABLE} SET updated_at = updated_at - ? WHERE key = ?",
                             [(days * DAY, k) for k in keys])
        else:
            conn.execute(f"UPDATE {TABLE} SET updated_at = updated_at - ?", (days * DAY,))


def _keys(url: str) -> dict[str, int]:
    with sqlite3.connect(_db(url)) as conn:
        return dict(conn.execute(f"SELECT key, version FROM {TABLE}").fetchall())


def _skey(manager: str, key: str, partition: Any = None) -> str:
    return storage_key(manager, partition, key)


async def _fill(url: str, manager: str, keys: list[str], agent: type[keyhive.Agent] = Counter,
                partition: Any = None) -> None:
    async with keyhive.InstanceManager(manager, agent, storage=url) as m:
        for key in keys:
            await m.call(key, "incr", partition=partition)


# -- durations ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * DAY), ("12h", 12 * 3600.0), ("90m", 5400.0), ("3600s", 3600.0), ("3600", 3600.0),
    ("1.5h", 5400.0), ("2w", 14 * DAY), (" 7D ", 7 * DAY),
])
def test_durations(text: str, seconds: float) -> None:
    """--older-than reads days, hours, minutes, seconds and weeks; a bare number is seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["thirty", "-1d", "0s", "5y", "1d2h", ""])
def test_bad_durations(text: str) -> None:
    """A duration that is not one number and one unit is refused with examples of what to write."""
    with pytest.raises(ValueError, match="such as 30d, 12h, 90m or 3600s"):
        parse_duration(text)


# -- prune ----------------------------------------------------------------------------------------

def test_prune_deletes_only_old_checkpoints(tmp_path: Path) -> None:
    """prune deletes checkpoints not written for --older-than and keeps the newer ones."""
    url = f"sqlite:///{tmp_path}/p.db"
    asyncio.run(_fill(url, "sessions", ["old1", "old2", "new"]))
    asyncio.run(_fill(url, "sessions", ["old3"], partition="t1"))
    _age(url, 40, _skey("sessions", "old1"), _skey("sessions", "old2"), _skey("sessions", "old3", "t1"))
    _age(url, 10, _skey("sessions", "new"))
    result = invoke("prune", url, "--older-than", "30d")
    assert result.exit_code == 0, result.output
    assert "deleted 3 checkpoints not written for 30d" in result.stderr
    assert list(_keys(url)) == [_skey("sessions", "new")]


def test_prune_dry_run_counts_and_deletes_nothing(tmp_path: Path) -> None:
    """prune --dry-run reports how many it would delete and leaves every checkpoint in place."""
    url = f"sqlite:///{tmp_path}/p.db"
    asyncio.run(_fill(url, "sessions", ["a", "b", "c"]))
    _age(url, 2, _skey("sessions", "a"), _skey("sessions", "b"))
    before = _keys(url)
    result = invoke("prune", url, "--older-than", "1d", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would delete 2 checkpoints not written for 1d (dry run)" in result.stderr
    assert _keys(url) == before


def test_prune_of_one_manager_leaves_the_others(tmp_path: Path) -> None:
    """prune --manager touches only that manager's checkpoints."""
    url = f"sqlite:///{tmp_path}/p.db"
    asyncio.run(_fill(url, "sessions", ["a"]))
    asyncio.run(_fill(url, "carts", ["a"]))
    _age(url, 100)
    result = invoke("prune", url, "--older-than", "30d", "--manager", "carts")
    assert result.exit_code == 0, result.output
    assert list(_keys(url)) == [_skey("sessions", "a")]


def test_prune_refuses_while_the_manager_holds_its_lease(tmp_path: Path) -> None:
    """prune of a running manager's checkpoints is refused (its live agents would conflict); --force prunes."""
    url = f"sqlite:///{tmp_path}/p.db"
    asyncio.run(_fill(url, "sessions", ["a"]))
    _age(url, 100)

    async def hold() -> None:
        storage = SQLiteStorage(_db(url))
        try:
            await storage.acquire_lease("sessions/*", "elsewhere:1:x", 600.0)
        finally:
            await storage.aclose()

    asyncio.run(hold())
    result = invoke("prune", url, "--older-than", "30d")
    assert result.exit_code == 1
    assert "manager 'sessions' is running" in result.stderr and "--force" in result.stderr
    assert len(_keys(url)) == 1
    result = invoke("prune", url, "--older-than", "30d", "--force")
    assert result.exit_code == 0, result.output
    assert _keys(url) == {}


def test_prune_bad_duration_is_one_clear_line(tmp_path: Path) -> None:
    """A bad --older-than exits 1 with an example of what to write."""
    url = f"sqlite:///{tmp_path}/p.db"
    asyncio.run(_fill(url, "sessions", ["a"]))
    result = invoke("prune", url, "--older-than", "a month")
    assert result.exit_code == 1
    assert "such as 30d" in result.stderr


# -- migrate --------------------------------------------------------------------------------------

V1 = """
import keyhive

class Session(keyhive.Agent):
    state_version = 1

    def initial_state(self, params):
        return {"count": 0}

    async def handle(self, message):
        self.state["count"] += 1
        return self.state["count"]
"""

V2 = """
import keyhive

class Session(keyhive.Agent):
    state_version = 2

    def initial_state(self, params):
        return {"hits": 0, "label": "new"}

    def migrate(self, data, from_version):
        assert from_version == 1
        return {"hits": data["count"], "label": "migrated"}

    async def handle(self, message):
        if message == "get":
            return dict(self.state)
        self.state["hits"] += 1
        return self.state["hits"]
"""

V2_TYPED = """
import dataclasses
import keyhive

@dataclasses.dataclass
class State:
    hits: int = 0
    label: str = "new"

class Session(keyhive.Agent):
    state_version = 2
    state_type = State

    def migrate(self, data, from_version):
        return {"hits": data["count"] * 10, "label": "typed"}

    async def handle(self, message):
        return dataclasses.asdict(self.state)
"""

RACING = V2.replace('        return {"hits": data["count"], "label": "migrated"}', '''        if data["count"] == 2:  # another writer lands while the migration runs
            import sqlite3, os
            with sqlite3.connect(os.environ["KEYHIVE_TEST_DB"]) as conn:
                conn.execute("UPDATE keyhive_checkpoints SET version = version + 1")
        return {"hits": data["count"], "label": "migrated"}''')


def _module(tmp_path: Path, name: str, source: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    __import__(name)
    return sys.modules[name]


@pytest.fixture
def v1_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A SQLite file with checkpoints of a state_version 1 agent: a (1), b (2), c (3), one partitioned."""
    url = f"sqlite:///{tmp_path}/m.db"
    v1 = _module(tmp_path, "app_v1", V1, monkeypatch)

    async def fill() -> None:
        async with keyhive.InstanceManager("sessions", v1.Session, storage=url) as m:
            for n, key in enumerate(["a", "b", "c"]):
                for _ in range(n + 1):
                    await m.call(key, "incr", partition="t1" if key == "c" else None)

    asyncio.run(fill())
    return url


async def _states(url: str, agent: type[keyhive.Agent]) -> dict[str, Any]:
    async with keyhive.InstanceManager("sessions", agent, storage=url) as m:
        return {"a": await m.call("a", "get"), "b": await m.call("b", "get"),
                "c": await m.call("c", "get", partition="t1")}


def _state_versions(url: str) -> list[int]:
    from keyhive.codecs import unpack

    with sqlite3.connect(_db(url)) as conn:
        return sorted(unpack(data).state_version for (data,) in conn.execute(f"SELECT data FROM {TABLE}"))


def test_migrate_rewrites_old_checkpoints_through_migrate(
        v1_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate rewrites every older checkpoint at the class's state_version with migrate()'s state."""
    v2 = _module(tmp_path, "app_v2", V2, monkeypatch)
    before = _keys(v1_store)
    result = invoke("migrate", v1_store, "--manager", "sessions", "--module", "app_v2:Session", "--batch", "2")
    assert result.exit_code == 0, result.output
    assert "migrated 3 checkpoints to state_version 2" in result.stderr
    assert _state_versions(v1_store) == [2, 2, 2]
    assert all(_keys(v1_store)[k] == v + 1 for k, v in before.items())  # compare-and-set writes
    assert asyncio.run(_states(v1_store, v2.Session)) == {
        "a": {"hits": 1, "label": "migrated"}, "b": {"hits": 2, "label": "migrated"},
        "c": {"hits": 3, "label": "migrated"}}
    again = invoke("migrate", v1_store, "--manager", "sessions", "--module", "app_v2:Session")
    assert "migrated 0 checkpoints" in again.stderr and "3 already current" in again.stderr


def test_migrate_dry_run_writes_nothing(v1_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate --dry-run counts the checkpoints it would rewrite and leaves them as they are."""
    _module(tmp_path, "app_v2", V2, monkeypatch)
    before = _keys(v1_store)
    result = invoke("migrate", v1_store, "--manager", "sessions", "--module", "app_v2:Session", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would migrate 3 checkpoints to state_version 2" in result.stderr
    assert _keys(v1_store) == before and _state_versions(v1_store) == [1, 1, 1]


def test_migrate_decodes_into_the_state_type(v1_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With state_type set, the migrated state is checked by decoding it into that type before it is written."""
    typed = _module(tmp_path, "app_typed", V2_TYPED, monkeypatch)
    result = invoke("migrate", v1_store, "--manager", "sessions", "--module", "app_typed:Session")
    assert result.exit_code == 0, result.output
    assert asyncio.run(_states(v1_store, typed.Session))["b"] == {"hits": 20, "label": "typed"}


def test_migrate_never_overwrites_a_concurrent_write(
        v1_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint written while the migration ran keeps that write: the migration's CAS write is refused."""
    _module(tmp_path, "app_racing", RACING, monkeypatch)
    monkeypatch.setenv("KEYHIVE_TEST_DB", _db(v1_store))
    result = invoke("migrate", v1_store, "--manager", "sessions", "--module", "app_racing:Session", "--batch", "10")
    assert result.exit_code == 0, result.output
    assert "migrated 0 checkpoints" in result.stderr and "3 written meanwhile (left alone)" in result.stderr
    assert _state_versions(v1_store) == [1, 1, 1]


def test_migrate_leaves_newer_checkpoints_and_reports_failures(
        v1_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoints newer than the class are left alone; one whose migrate() fails is named, exit 1."""
    _module(tmp_path, "app_v2", V2, monkeypatch)
    assert invoke("migrate", v1_store, "-m", "sessions", "--module", "app_v2:Session").exit_code == 0
    broken = V2.replace("state_version = 2", "state_version = 3").replace(
        "        assert from_version == 1\n", "        raise ValueError('no way from ' + str(from_version))\n")
    _module(tmp_path, "app_v3", broken, monkeypatch)
    result = invoke("migrate", v1_store, "-m", "sessions", "--module", "app_v3:Session")
    assert result.exit_code == 1
    assert "cannot migrate" in result.stderr and "no way from 2" in result.stderr
    assert "3 failed" in result.stderr
    result = invoke("migrate", v1_store, "-m", "sessions", "--module", "app_v1:Session")
    assert result.exit_code == 0 and "3 newer (left alone)" in result.stderr
    assert _state_versions(v1_store) == [2, 2, 2]


@pytest.mark.parametrize(("spec", "message"), [
    ("app_v2", "module:Class"), ("no_such_module_here:Agent", "cannot import"),
    ("app_v2:Nope", "has no 'Nope'"), ("json:dumps", "keyhive.Agent subclass"),
])
def test_migrate_bad_module(v1_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            spec: str, message: str) -> None:
    """A --module that is not module:Class of an Agent subclass is one clear line, exit 1."""
    _module(tmp_path, "app_v2", V2, monkeypatch)
    result = invoke("migrate", v1_store, "--manager", "sessions", "--module", spec)
    assert result.exit_code == 1
    assert message in result.stderr


def test_migrate_refuses_while_the_manager_holds_its_lease(
        v1_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """migrate is refused while the manager runs elsewhere; nothing is rewritten."""
    _module(tmp_path, "app_v2", V2, monkeypatch)

    async def hold() -> None:
        storage = SQLiteStorage(_db(v1_store))
        try:
            await storage.acquire_lease("sessions/*", "elsewhere:1:x", 600.0)
        finally:
            await storage.aclose()

    asyncio.run(hold())
    result = invoke("migrate", v1_store, "--manager", "sessions", "--module", "app_v2:Session")
    assert result.exit_code == 1 and "is running" in result.stderr
    assert _state_versions(v1_store) == [1, 1, 1]
