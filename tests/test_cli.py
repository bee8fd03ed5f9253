"""The keyhive command reads, shows and deletes checkpoints without waking agents."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import keyhive
from keyhive.cli import app

from .agents import Counter

runner = CliRunner()


@pytest.fixture(params=["sqlite", "file"])
async def stored(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A storage URL holding checkpoints of two managers, one partitioned, one tuple key."""
    url = f"sqlite:///{tmp_path}/cli.db" if request.param == "sqlite" else f"file://{tmp_path}/ckpt"
    async with keyhive.InstanceManager("sessions", Counter, storage=url) as m:
        await m.call("alice", "incr")
        await m.call("alice", "incr")
        await m.call(("room", 7), "incr")
        await m.call("bob", "incr", partition="tenant-1")
    async with keyhive.InstanceManager("other", Counter, storage=url) as m:
        await m.call("alice", "incr")
    return url


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def test_ls_lists_every_checkpoint(stored: str) -> None:
    """ls prints one row per checkpoint with manager, partition, key and version."""
    result = invoke("ls", stored)
    assert result.exit_code == 0, result.output
    rows = [line.split("\t") for line in result.stdout.splitlines()[1:]]
    assert sorted((r[0], r[1], r[2]) for r in rows) == sorted([
        ("sessions", "None", "'alice'"), ("sessions", "None", "('room', 7)"),
        ("sessions", "'tenant-1'", "'bob'"), ("other", "None", "'alice'"),
    ])
    assert "4 checkpoints" in result.stderr


def test_ls_filters_by_manager_and_partition(stored: str) -> None:
    """--manager and --partition narrow the listing."""
    result = invoke("ls", stored, "--manager", "sessions")
    assert len(result.stdout.splitlines()) == 4
    result = invoke("ls", stored, "--manager", "sessions", "--partition", "tenant-1")
    assert [line.split("\t")[2] for line in result.stdout.splitlines()[1:]] == ["'bob'"]


def test_show_prints_the_state(stored: str) -> None:
    """show decodes a checkpoint to JSON, for str keys and JSON-form keys."""
    result = invoke("show", stored, "sessions", "alice")
    assert result.exit_code == 0, result.output
    assert '"count": 2' in result.stdout
    result = invoke("show", stored, "sessions", '["room", 7]', "--json-key")
    assert '"count": 1' in result.stdout
    result = invoke("show", stored, "sessions", "bob", "--partition", "tenant-1")
    assert '"count": 1' in result.stdout


def test_rm_deletes_one_checkpoint(stored: str) -> None:
    """rm --yes deletes exactly one checkpoint; a second rm says it is gone."""
    result = invoke("rm", stored, "sessions", "alice", "--yes")
    assert result.exit_code == 0, result.output
    assert invoke("show", stored, "sessions", "alice").exit_code == 1
    assert invoke("show", stored, "other", "alice").exit_code == 0
    again = invoke("rm", stored, "sessions", "alice", "--yes")
    assert again.exit_code == 1
    assert "no checkpoint" in again.stderr


def test_clear_errors(tmp_path: Path) -> None:
    """Unknown URLs, missing keys and bad JSON keys exit 1 with one line, never a traceback."""
    for args in [("ls", "ftp://x"), ("show", f"sqlite:///{tmp_path}/none.db", "m", "k"),
                 ("show", f"sqlite:///{tmp_path}/none.db", "m", "[1.5]", "--json-key")]:
        result = invoke(*args)
        assert result.exit_code == 1
        assert "error:" in result.stderr
        assert "Traceback" not in result.output


def test_not_a_database(tmp_path: Path) -> None:
    """A file that is not SQLite gives one clear error and is left untouched."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just some text, not a database" * 100)
    result = invoke("ls", f"sqlite:///{path}")
    assert result.exit_code == 1
    assert "not a database" in result.stderr
    assert path.read_bytes() == b"just some text, not a database" * 100


def test_console_script_is_installed() -> None:
    """The keyhive script runs and shows its commands."""
    result = subprocess.run([sys.executable, "-m", "keyhive.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("ls", "show", "rm"):
        assert command in result.stdout
