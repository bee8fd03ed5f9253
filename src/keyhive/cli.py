"""The ``keyhive`` command: look at stored checkpoints without waking any agent.

    keyhive ls URL [--manager M] [--partition P]     keys, versions, sizes, last write
    keyhive show URL MANAGER KEY [--partition P]     the decoded state as JSON
    keyhive rm URL MANAGER KEY [--partition P] --yes delete one checkpoint
    keyhive --version

Keys and partitions are printed by ``ls`` as shell words that paste back into ``show`` and
``rm`` as they are: a str as itself (shell-quoted when it needs it), any other key in
keyhive's JSON key form after ``json:`` (``json:7``, ``'json:["room",7]'``,
``'json:{"u":"<uuid>"}'``, ``'json:{"b":"<base64>"}'``). A str that starts with ``json:``,
is empty or holds control characters is printed in that form too (``'json:""'``), so
every printed key means one key. No partition is an empty column. The commands never
create a database or a directory: a wrong path is an error. Needs the ``cli`` extra.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import shlex
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from . import __version__
from ._errors import KeyhiveError
from ._keys import check_key, storage_key, untag
from ._stored import StoredRecord, records_under, stored_keys
from .codecs import unpack
from .storage import from_url

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by the import error path
    raise ImportError(
        "the keyhive command needs the 'cli' extra: pip install 'keyhive[cli]' "
        "(in a clone of keyhive: .venv/bin/pip install -e '.[cli]')"
    ) from exc

__all__ = ["app", "format_key", "main", "parse_key"]

T = TypeVar("T")

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Inspect keyhive checkpoints in a storage backend (agents are never woken).")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

JSON_PREFIX = "json:"
HEADER = "manager\tpartition\tkey\tversion\tbytes\tlast write (UTC)"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"keyhive {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", help="print the version and exit",
                                 callback=_version, is_eager=True),
) -> None:
    """Inspect keyhive checkpoints in a storage backend (agents are never woken)."""


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}" if count == 1 else f"{count:,} {word}s"


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {escape(message)}")
    return typer.Exit(1)


def _explain(exc: BaseException) -> str:
    """One line for an error: keyhive's own messages as they are, others with their type."""
    cause = exc.__cause__
    if isinstance(exc, KeyhiveError) and isinstance(cause, OSError) and str(cause):
        return str(cause)  # e.g. a missing database or directory: the path is in it
    if isinstance(exc, KeyhiveError | OSError) and str(exc):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def _no_create(url: str) -> str:
    """``url`` with ``create=false`` for the backends that would otherwise make a file or directory."""
    if urlsplit(url).scheme.lower() not in ("sqlite", "file"):
        return url
    # Not urlunsplit: it would turn 'sqlite:////abs.db' (empty host) into 'sqlite://abs.db'.
    base, _, query = url.partition("?")
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "create"]
    return base + "?" + urlencode([*pairs, ("create", "false")])


def _open(url: str) -> Any:
    try:
        return from_url(_no_create(url))
    except (ValueError, ImportError, TypeError) as exc:
        raise _fail(str(exc)) from None


def format_key(value: Any) -> str:
    """How ``ls`` prints a key or partition: a shell word that :func:`parse_key` reads back.

    ``None`` (no partition) is the empty string.
    """
    if value is None:
        return ""
    if (type(value) is str and value and not value.startswith(JSON_PREFIX)
            and value.isprintable()):
        return shlex.quote(value)
    tagged = check_key(value)
    text = json.dumps(tagged, ensure_ascii=False, separators=(",", ":"))
    return shlex.quote(JSON_PREFIX + text)


def parse_key(text: str, what: str = "key", *, as_json: bool = False) -> Any:
    """A key or partition as given on the command line (the form ``ls`` prints, unquoted).

    ``json:<JSON key form>`` is a tagged key; anything else is a str key. With ``as_json``
    the whole text is the JSON key form (the ``json:`` prefix is optional).

    Raises:
        ValueError: the JSON form is invalid (the message says what to write).
    """
    if not (as_json or text.startswith(JSON_PREFIX)):
        check_key(text, what)
        return text
    body = text[len(JSON_PREFIX):] if text.startswith(JSON_PREFIX) else text
    try:
        parsed = untag(json.loads(body))
        check_key(parsed, what)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"bad {what} {text!r}: {exc}; write a str as it is, or keyhive's JSON key form "
            f"after 'json:', e.g. 'json:7' or 'json:[\"room\",7]'"
        ) from None
    return parsed


def _parse(value: str | None, as_json: bool, what: str) -> Any:
    if value is None or (value == "" and what == "partition"):
        return None  # an empty partition column: no partition
    try:
        return parse_key(value, what, as_json=as_json)
    except (ValueError, TypeError) as exc:
        raise _fail(str(exc)) from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


@app.command("ls")
def ls(
    url: str = typer.Argument(..., help="storage URL, e.g. sqlite:///agents.db"),
    manager: str | None = typer.Option(None, "--manager", "-m", help="only this manager"),
    partition: str | None = typer.Option(None, "--partition", "-p",
                                         help="only this partition (as ls prints it)"),
    json_partition: bool = typer.Option(False, "--json-partition", help="partition is JSON key form"),
    limit: int = typer.Option(0, "--limit", help="stop after this many keys (0: all)"),
) -> None:
    """List stored checkpoints: manager, partition, key, version, size, last write."""
    if partition is not None and manager is None:
        raise _fail("--partition needs --manager: keyhive ls URL --manager NAME --partition P")
    part = _parse(partition, json_partition, "partition")  # '' (an empty column): no partition
    storage = _open(url)
    if not callable(getattr(storage, "iter_keys", None)):
        raise _fail(f"{storage!r} cannot list its keys")

    def records() -> AsyncIterator[tuple[str, StoredRecord]]:
        if manager is None:
            return records_under(storage, "")

        async def one() -> AsyncIterator[tuple[str, StoredRecord]]:
            listing = (stored_keys(storage, manager) if partition is None
                       else stored_keys(storage, manager, partition=part))
            async for record in listing:
                yield manager, record

        return one()

    async def run() -> tuple[int, int]:
        count = 0
        total = 0
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), console=err,
                      transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("scanning", total=None)
            listing = records()
            try:
                # The header waits for the first answer, so an error is all that is printed.
                first = await anext(listing, None)
                typer.echo(HEADER)
                item = first
                while item is not None:
                    name, record = item
                    typer.echo("\t".join([
                        shlex.quote(name), format_key(record.partition), format_key(record.key),
                        str(record.version), str(record.size), _when(record.updated_at)]))
                    count += 1
                    total += record.size
                    progress.update(task, description=_plural(count, "key"))
                    if limit and count >= limit:
                        break
                    item = await anext(listing, None)
            finally:
                await listing.aclose()  # type: ignore[attr-defined]
                await storage.aclose()
        return count, total

    try:
        count, total = _run(run())
    except Exception as exc:  # noqa: BLE001  # any failure is one line on stderr, exit 1
        raise _fail(_explain(exc)) from None
    err.print(f"{_plural(count, 'checkpoint')}, {_plural(total, 'byte')}")


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
    except Exception as exc:  # noqa: BLE001  # any failure is one line on stderr, exit 1
        raise _fail(_explain(exc)) from None


URL = typer.Argument(..., help="storage URL, e.g. sqlite:///agents.db")
MANAGER = typer.Argument(..., help="manager name")
KEY = typer.Argument(..., help="agent key, as ls prints it (a str, or json:<JSON key form>)")
PARTITION = typer.Option(None, "--partition", "-p", help="the key's partition, as ls prints it")
JSON_KEY = typer.Option(False, "--json-key", help="KEY is JSON key form (no json: needed)")
JSON_PARTITION = typer.Option(False, "--json-partition", help="partition is JSON key form")


def _where(manager: str, key: str, partition: str | None) -> str:
    where = f"key {key} of manager {manager}"
    return where if partition is None else f"{where}, partition {partition}"


@app.command("show")
def show(url: str = URL, manager: str = MANAGER, key: str = KEY, partition: str | None = PARTITION,
         json_key: bool = JSON_KEY, json_partition: bool = JSON_PARTITION) -> None:
    """Print one agent's stored state as JSON (with its versions)."""
    checkpoint = _one_key(url, manager, key, partition, json_key, json_partition, "load")
    if checkpoint is None:
        raise _fail(f"no checkpoint for {_where(manager, key, partition)}")
    try:
        state_version, payload = unpack(checkpoint.data)[:2]
        state = json.loads(payload)
    except Exception as exc:  # noqa: BLE001  # any undecodable checkpoint is reported, not a traceback
        raise _fail(f"checkpoint version {checkpoint.version} cannot be decoded: {exc}") from None
    err.print(f"version {checkpoint.version}, state_version {state_version}, "
              f"{_plural(len(checkpoint.data), 'byte')}")
    out.print_json(data=state)


@app.command("rm")
def rm(url: str = URL, manager: str = MANAGER, key: str = KEY, partition: str | None = PARTITION,
       json_key: bool = JSON_KEY, json_partition: bool = JSON_PARTITION,
       yes: bool = typer.Option(False, "--yes", "-y", help="do not ask for confirmation")) -> None:
    """Delete one agent's checkpoint (a live agent elsewhere would write it again)."""
    if not yes and not typer.confirm(f"delete the checkpoint of {_where(manager, key, partition)}?"):
        raise typer.Exit(1)
    if not _one_key(url, manager, key, partition, json_key, json_partition, "delete"):
        raise _fail(f"no checkpoint for {_where(manager, key, partition)}")
    err.print(f"deleted the checkpoint of {_where(manager, key, partition)}")


def main() -> None:
    """Entry point of the ``keyhive`` script."""
    app(prog_name="keyhive")


if __name__ == "__main__":  # pragma: no cover
    main()
