"""The keyhive command reads, shows and deletes checkpoints without waking agents."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import keyhive
from keyhive.cli import app, format_key, parse_key

from .agents import Counter

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
# Every kind of key, and strs that would be ambiguous printed as they are.
TRICKY = ["s-95STeWLfcb2V", 7, "7", ("room", 7), b"\x01raw", uuid.UUID(int=3), "json:x", "",
          "a b", "tab\there", "it's", "ключ", ('x', ("y", 1))]


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


def rows(result: Any) -> list[list[str]]:
    lines = result.stdout.splitlines()
    assert lines[0].startswith("manager\tpartition\tkey")
    return [line.split("\t") for line in lines[1:]]


def test_ls_lists_every_checkpoint(stored: str) -> None:
    """ls prints one row per checkpoint: str keys as they are, others as json:, no partition as empty."""
    result = invoke("ls", stored)
    assert result.exit_code == 0, result.output
    assert sorted((r[0], r[1], r[2]) for r in rows(result)) == sorted([
        ("sessions", "", "alice"), ("sessions", "", """'json:["room",7]'"""),
        ("sessions", "tenant-1", "bob"), ("other", "", "alice"),
    ])
    assert "4 checkpoints" in result.stderr


def test_counts_are_singular_for_one() -> None:
    """One checkpoint of one byte reads '1 checkpoint, 1 byte', not '1 checkpoints'."""
    from keyhive.cli import _plural

    assert [_plural(1, "checkpoint"), _plural(2, "checkpoint"), _plural(0, "byte"), _plural(1, "byte")] == [
        "1 checkpoint", "2 checkpoints", "0 bytes", "1 byte"]


def test_ls_filters_by_manager_and_partition(stored: str) -> None:
    """--manager and --partition narrow the listing; --partition '' is the default partition."""
    result = invoke("ls", stored, "--manager", "sessions")
    assert len(rows(result)) == 3
    result = invoke("ls", stored, "--manager", "sessions", "--partition", "tenant-1")
    assert [r[2] for r in rows(result)] == ["bob"]
    assert "1 checkpoint," in result.stderr
    result = invoke("ls", stored, "--manager", "sessions", "--partition", "")
    assert sorted(r[2] for r in rows(result)) == sorted(["alice", """'json:["room",7]'"""])


def test_printed_keys_parse_back_to_the_same_key() -> None:
    """format_key gives one shell word per key that parse_key reads back to that key, never to another."""
    printed = [format_key(key) for key in TRICKY]
    assert len(set(printed)) == len(printed)
    for key, word in zip(TRICKY, printed, strict=True):
        (arg,) = shlex.split(word)  # what the shell hands to the command
        assert parse_key(arg) == key and type(parse_key(arg)) is type(key), (key, word)
    assert format_key(None) == ""
    assert format_key("user-123") == "user-123"


def test_every_listed_key_pastes_into_show_and_rm(tmp_path: Path) -> None:
    """Each ls row's manager, partition and key, pasted as printed, show and then rm that checkpoint."""
    url = f"sqlite:///{tmp_path}/keys.db"

    async def fill() -> None:
        async with keyhive.InstanceManager("sessions", Counter, storage=url) as m:
            for n, key in enumerate(TRICKY):
                for _ in range(n + 1):
                    await m.call(key, "incr", partition=None if n % 3 else ("t", n))

    asyncio.run(fill())
    listed = rows(invoke("ls", url))
    assert len(listed) == len(TRICKY)
    for manager, partition, key, *_ in listed:
        where = shlex.split(f"{manager} {key}") + (shlex.split(f"--partition {partition}") if partition else [])
        shown = invoke("show", url, *where)
        assert shown.exit_code == 0, (key, shown.output)
        n = TRICKY.index(parse_key(shlex.split(key)[0]))
        assert f'"count": {n + 1}' in shown.stdout
        removed = invoke("rm", url, *where, "--yes")
        assert removed.exit_code == 0, removed.output
    assert invoke("ls", url).stdout.splitlines()[1:] == []


def test_round_trip_in_a_real_shell(stored: str) -> None:
    """ls, then show and rm with the key and partition pasted into bash as printed (docs/cli.md)."""
    keyhive_cmd = f"{shlex.quote(sys.executable)} -m keyhive.cli"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    ls = subprocess.run(f"{keyhive_cmd} ls {stored} --manager sessions", shell=True, executable="/bin/bash",
                        capture_output=True, text=True, env=env, timeout=60)
    assert ls.returncode == 0, ls.stderr
    room = next(line.split("\t") for line in ls.stdout.splitlines() if "room" in line)
    script = (f"{keyhive_cmd} show {stored} {room[0]} {room[2]} && "
              f"{keyhive_cmd} rm {stored} {room[0]} {room[2]} --yes && "
              f"! {keyhive_cmd} show {stored} {room[0]} {room[2]}")
    done = subprocess.run(script, shell=True, executable="/bin/bash", capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert '"count": 1' in done.stdout
    assert "no checkpoint for key" in done.stderr


def test_show_prints_the_state(stored: str) -> None:
    """show decodes a checkpoint to JSON, for str keys, json: keys and --json-key keys."""
    result = invoke("show", stored, "sessions", "alice")
    assert result.exit_code == 0, result.output
    assert '"count": 2' in result.stdout
    result = invoke("show", stored, "sessions", 'json:["room",7]')
    assert '"count": 1' in result.stdout
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
                 ("show", f"sqlite:///{tmp_path}/none.db", "m", "json:[1.5]"),
                 ("show", f"sqlite:///{tmp_path}/none.db", "m", "[1.5]", "--json-key")]:
        result = invoke(*args)
        assert result.exit_code == 1
        assert "error:" in result.stderr
        assert "Traceback" not in result.output
    assert "json:7" in invoke("show", f"sqlite:///{tmp_path}/x.db", "m", "json:{").stderr  # says what to write


@pytest.mark.parametrize("command", ["ls", "show", "rm"])
def test_missing_database_or_directory_is_an_error_and_nothing_is_created(
        tmp_path: Path, command: str) -> None:
    """ls/show/rm on a missing SQLite file or directory exit 1 naming it, print no header, create nothing."""
    extra = [] if command == "ls" else ["sessions", "alice"] + (["--yes"] if command == "rm" else [])
    for url, path in [(f"sqlite:///{tmp_path}/nope.db", tmp_path / "nope.db"),
                      (f"file://{tmp_path}/typo", tmp_path / "typo")]:
        result = invoke(command, url, *extra)
        assert result.exit_code == 1
        assert result.stdout == ""
        assert str(path) in result.stderr
        assert "Traceback" not in result.output
        assert not path.exists()


def test_not_a_database(tmp_path: Path) -> None:
    """A file that is not SQLite gives one clear error and is left untouched."""
    path = tmp_path / "notes.txt"
    path.write_bytes(b"just some text, not a database" * 100)
    result = invoke("ls", f"sqlite:///{path}")
    assert result.exit_code == 1
    assert "not a database" in result.stderr
    assert result.stdout == ""
    assert path.read_bytes() == b"just some text, not a database" * 100


def test_version() -> None:
    """keyhive --version prints the package version."""
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"keyhive {keyhive.__version__}"


def test_console_script_is_installed() -> None:
    """The keyhive script runs and shows its commands."""
    result = subprocess.run([sys.executable, "-m", "keyhive.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("ls", "show", "rm", "--version"):
        assert command in result.stdout


def test_missing_extra_says_how_to_install_it_from_a_clone() -> None:
    """Without typer, importing the CLI fails with a pip command that works from a clone too."""
    code = "import sys; sys.modules['typer'] = None\nimport keyhive.cli"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "pip install 'keyhive[cli]'" in result.stderr
    assert ".venv/bin/pip install -e '.[cli]'" in result.stderr


def test_ls_limit_stops_early(stored: str) -> None:
    """--limit N prints N rows and counts only those."""
    result = invoke("ls", stored, "--limit", "1")
    assert result.exit_code == 0, result.output
    assert len(rows(result)) == 1
    assert "1 checkpoint," in result.stderr
