"""The ``keyhive`` command: look at stored checkpoints without waking any agent.

    keyhive ls URL [--manager M] [--partition P]     keys, versions, sizes, last write
    keyhive show URL MANAGER KEY [--partition P]     the decoded state as JSON
    keyhive rm URL MANAGER KEY [--partition P] --yes delete one checkpoint

KEY and P are strings; with ``--json-key`` / ``--json-partition`` they are keyhive's
JSON key form instead (``7``, ``["room",1]``, ``{"u":"<uuid>"}``, ``{"b":"<base64>"}``).
Needs the ``cli`` extra: ``pip install 'keyhive[cli]'``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._keys import _untag, check_key, decode_storage_key, storage_key, storage_prefix
from .codecs import unpack
from .storage import from_url

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by the import error path
    raise ImportError("the keyhive command needs the 'cli' extra: pip install 'keyhive[cli]'") from exc

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Inspect keyhive checkpoints in a storage backend (agents are never woken).")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(1)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _open(url: str) -> Any:
    try:
        return from_url(url)
    except (ValueError, ImportError, TypeError) as exc:
        raise _fail(str(exc)) from None


def _parse(value: str | None, as_json: bool, what: str) -> Any:
    if value is None or not as_json:
        return value
    try:
        parsed = _untag(json.loads(value))
        check_key(parsed, what)
    except (ValueError, TypeError) as exc:
        raise _fail(f"bad {what} {value!r}: {exc}") from None
    return parsed


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command("ls")
def ls(
    url: str = typer.Argument(..., help="storage URL, e.g. sqlite:///agents.db"),
    manager: str | None = typer.Option(None, "--manager", "-m", help="only this manager"),
    partition: str | None = typer.Option(None, "--partition", "-p", help="only this partition"),
    json_partition: bool = typer.Option(False, "--json-partition", help="partition is JSON key form"),
    limit: int = typer.Option(0, "--limit", help="stop after this many keys (0: all)"),
) -> None:
    """List stored checkpoints: manager, partition, key, version, size, last write."""
    if partition is not None and manager is None:
        raise _fail("--partition needs --manager")
    part = _parse(partition, json_partition, "partition")
    prefix = "" if manager is None else (
        storage_prefix(manager) if partition is None else storage_prefix(manager, part)
    )
    storage = _open(url)
    if not callable(getattr(storage, "iter_keys", None)):
        raise _fail(f"{storage!r} cannot list its keys")

    async def run() -> int:
        count = 0
        total = 0
        typer.echo("manager\tpartition\tkey\tversion\tbytes\tlast write (UTC)")
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err,
                      transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("scanning", total=None)
            try:
                async for item in storage.iter_keys(prefix):
                    try:
                        m, p, k = decode_storage_key(item.key)
                    except ValueError:
                        continue  # not a keyhive checkpoint
                    typer.echo(f"{m}\t{p!r}\t{k!r}\t{item.version}\t{item.size}\t{_when(item.updated_at)}")
                    count += 1
                    total += item.size
                    progress.update(task, description=f"{count} keys")
                    if limit and count >= limit:
                        break
            finally:
                await storage.aclose()
        err.print(f"{count} checkpoints, {total} bytes")
        return count

    try:
        _run(run())
    except Exception as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None


def _one_key(url: str, manager: str, key: str, partition: str | None, json_key: bool,
             json_partition: bool, operation: str) -> Any:
    """Run ``storage.<operation>(storage key)`` for one agent's checkpoint, then close the storage."""
    skey = storage_key(manager, _parse(partition, json_partition, "partition"), _parse(key, json_key, "key"))
    storage = _open(url)

    async def run() -> Any:
        try:
            return await getattr(storage, operation)(skey)
        finally:
            await storage.aclose()

    try:
        return _run(run())
    except Exception as exc:
        raise _fail(f"{type(exc).__name__}: {exc}") from None


URL = typer.Argument(..., help="storage URL, e.g. sqlite:///agents.db")
MANAGER = typer.Argument(..., help="manager name")
KEY = typer.Argument(..., help="agent key")
PARTITION = typer.Option(None, "--partition", "-p", help="the key's partition")
JSON_KEY = typer.Option(False, "--json-key", help="KEY is JSON key form")
JSON_PARTITION = typer.Option(False, "--json-partition", help="partition is JSON key form")


@app.command("show")
def show(url: str = URL, manager: str = MANAGER, key: str = KEY, partition: str | None = PARTITION,
         json_key: bool = JSON_KEY, json_partition: bool = JSON_PARTITION) -> None:
    """Print one agent's stored state as JSON (with its versions)."""
    checkpoint = _one_key(url, manager, key, partition, json_key, json_partition, "load")
    if checkpoint is None:
        raise _fail(f"no checkpoint for key {key!r} of manager {manager!r}")
    try:
        state_version, payload = unpack(checkpoint.data)[:2]
        state = json.loads(payload)
    except Exception as exc:
        raise _fail(f"checkpoint version {checkpoint.version} cannot be decoded: {exc}") from None
    err.print(f"version {checkpoint.version}, state_version {state_version}, {len(checkpoint.data)} bytes")
    out.print_json(data=state)


@app.command("rm")
def rm(url: str = URL, manager: str = MANAGER, key: str = KEY, partition: str | None = PARTITION,
       json_key: bool = JSON_KEY, json_partition: bool = JSON_PARTITION,
       yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")) -> None:
    """Delete one agent's checkpoint (a live agent elsewhere would write it again)."""
    if not yes and not typer.confirm(f"delete the checkpoint of {key!r} in {manager!r}?"):
        raise typer.Exit(1)
    if not _one_key(url, manager, key, partition, json_key, json_partition, "delete"):
        raise _fail(f"no checkpoint for key {key!r} of manager {manager!r}")
    err.print(f"deleted {key!r} of {manager!r}")


def main() -> None:
    """Entry point of the ``keyhive`` script."""
    app(prog_name="keyhive")


if __name__ == "__main__":  # pragma: no cover
    main()
