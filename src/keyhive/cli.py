"""The ``keyhive`` command: look at stored checkpoints without waking any agent.

    keyhive ls URL [--manager M] [--partition P]     keys, versions, sizes, last write
    keyhive show URL MANAGER KEY [--partition P]     the decoded state as JSON
    keyhive rm URL MANAGER KEY [--partition P] --yes delete one checkpoint
    keyhive prune URL --older-than 30d [--manager M] [--dry-run]   delete old checkpoints
    keyhive migrate URL --manager M --module app:Agent [--dry-run] rewrite old state versions
    keyhive --version

Keys and partitions are printed by ``ls`` as shell words that paste back into ``show`` and
``rm`` as they are: a str as itself (shell-quoted when it needs it), any other key in
keyhive's JSON key form after ``json:`` (``json:7``, ``'json:["room",7]'``,
``'json:{"u":"<uuid>"}'``, ``'json:{"b":"<base64>"}'``). A str that starts with ``json:``,
is empty or holds control characters is printed in that form too (``'json:""'``), so
every printed key means one key. No partition is an empty column. The commands never
create a database or a directory: a wrong path is an error. Needs the ``cli`` extra.

``prune`` and ``migrate`` write with compare-and-set only (``delete_if`` and ``save_many``
with the version they read), so a checkpoint written meanwhile is never deleted or
overwritten; on a storage with leases they refuse while a manager holds its lease (its
live agents' next writes would conflict), unless ``--force``.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import json
import os
import re
import shlex
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

from . import __version__
from ._errors import ConflictError, KeyhiveError
from ._keys import check_key, decode_storage_key, storage_key, storage_prefix, untag
from ._options import check_agent
from ._stored import StoredRecord, records_under, stored_keys
from .codecs import JSONCodec, decode_state, pack, unpack
from .storage import SaveItem, from_url

try:
    import typer
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised by the import error path
    raise ImportError(
        "the keyhive command needs the 'cli' extra: pip install 'keyhive[cli]' "
        "(in a clone of keyhive: .venv/bin/pip install -e '.[cli]')"
    ) from exc

__all__ = ["app", "format_key", "main", "parse_duration", "parse_key"]

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


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``30d``, ``12h``, ``90m``, ``3600s`` (a bare number: seconds).

    Raises:
        ValueError: not such a duration (the message shows what to write).
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None or float(match[1]) <= 0:
        raise ValueError(f"--older-than takes a duration such as 30d, 12h, 90m or 3600s, not {text!r}")
    return float(match[1]) * _UNITS[match[2] or "s"]


async def _lease_holder(storage: Any, manager: str) -> str | None:
    """Who holds ``manager``'s lease now (None: nobody, or the storage keeps no leases)."""
    read = getattr(storage, "read_lease", None)
    if not callable(read):
        return None
    lease = await read(f"{manager}/*")
    if lease is None or lease.released or lease.expires_in <= 0:
        return None
    return str(lease.holder)


async def _refuse_if_running(storage: Any, manager: str, force: bool, doing: str) -> None:
    if force:
        return
    holder = await _lease_holder(storage, manager)
    if holder is not None:
        raise RuntimeError(
            f"manager {manager!r} is running (its lease is held by {holder}): {doing} under it would make "
            f"its live agents' next writes conflict; stop it first, or pass --force")


def _progress(*columns: Any) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), *columns, console=err,
                    transient=True, disable=not err.is_terminal)


@app.command("prune")
def prune(
    url: str = URL,
    older_than: str = typer.Option(..., "--older-than", help="e.g. 30d, 12h, 90m, 3600s"),
    manager: str | None = typer.Option(None, "--manager", "-m", help="only this manager"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count, delete nothing"),
    force: bool = typer.Option(False, "--force", help="even while a manager holds its lease"),
) -> None:
    """Delete checkpoints not written for --older-than (compare-and-set: never a newer write)."""
    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        raise _fail(str(exc)) from None
    storage = _open(url)
    missing = [m for m in ("stale_keys", "delete_if", "iter_keys") if not callable(getattr(storage, m, None))]
    if missing:
        raise _fail(f"{storage!r} cannot prune: it has no {', '.join(missing)}")
    prefix = "" if manager is None else storage_prefix(manager)
    cutoff = time.time() - age

    async def count() -> int:
        found = 0
        async for name, record in records_under(storage, prefix):
            if (manager is None or name == manager) and record.updated_at is not None \
                    and record.updated_at < cutoff:
                found += 1
        return found

    async def delete(progress: Progress, task: Any) -> int:
        checked: set[str] = set()
        deleted = skipped = 0
        while True:
            limit = 1000 + skipped
            page = await storage.stale_keys(prefix, cutoff, limit=limit)
            gone = 0
            for item in page:
                try:
                    name = decode_storage_key(item.key)[0]
                except ValueError:
                    continue  # not a keyhive checkpoint: never ours to delete
                if manager is not None and name != manager:
                    continue
                if name not in checked:
                    await _refuse_if_running(storage, name, force, "deleting checkpoints")
                    checked.add(name)
                if await storage.delete_if(item.key, item.version):
                    gone += 1
                    progress.update(task, description=f"deleted {_plural(deleted + gone, 'checkpoint')}")
            deleted += gone
            if len(page) < limit:
                return deleted
            skipped = len(page) - gone

    async def run() -> int:
        try:
            with _progress() as progress:
                task = progress.add_task("scanning", total=None)
                return await (count() if dry_run else delete(progress, task))
        finally:
            await storage.aclose()

    try:
        done = _run(run())
    except Exception as exc:  # noqa: BLE001  # any failure is one line on stderr, exit 1
        raise _fail(_explain(exc)) from None
    what = f"{_plural(done, 'checkpoint')} not written for {older_than}"
    err.print(f"would delete {what} (dry run)" if dry_run else f"deleted {what}")


def _import_agent(spec: str) -> Any:
    """The agent class named by ``module:Class`` (the current directory is importable)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"--module takes module:Class, e.g. --module app.agents:Session, not {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} (from --module {spec}): {exc}") from exc
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no {attr!r} (from --module {spec})") from None
    return check_agent(obj)


@app.command("migrate")
def migrate(
    url: str = URL,
    manager: str = typer.Option(..., "--manager", "-m", help="the manager whose checkpoints to migrate"),
    module: str = typer.Option(..., "--module", help="the agent class, as module:Class"),
    dry_run: bool = typer.Option(False, "--dry-run", help="count, write nothing"),
    force: bool = typer.Option(False, "--force", help="even while the manager holds its lease"),
    batch: int = typer.Option(500, "--batch", min=1, help="checkpoints per write"),
) -> None:
    """Rewrite checkpoints older than the class's state_version through its migrate() (JSON codec)."""
    try:
        cls = _import_agent(module)
    except (ValueError, TypeError) as exc:
        raise _fail(str(exc)) from None
    storage = _open(url)
    if not callable(getattr(storage, "iter_keys", None)):
        raise _fail(f"{storage!r} cannot list its keys")
    target: int = cls.state_version
    codec = JSONCodec()
    agent = cls()
    tally = {"migrated": 0, "current": 0, "newer": 0, "conflicts": 0, "failed": 0}

    def upgraded(data: bytes) -> tuple[bytes, bytes] | None:
        """``(checkpoint rewritten at target, its meta)``, or None when it needs nothing."""
        env = unpack(data)
        if env.state_version >= target:
            tally["current" if env.state_version == target else "newer"] += 1
            return None
        state = agent.migrate(codec.decode(env.payload), env.state_version)
        if cls.state_type is not None:
            state = decode_state(codec, codec.encode(state), cls.state_type, cls.allow_dropped_fields)
        return pack(target, codec.encode(state), meta=env.meta), env.meta

    due_keys = getattr(storage, "due_keys", None)

    async def due_of(skey: str, meta: bytes) -> float | None:
        """The key's time in the due-time index (a write without it would drop it)."""
        if not meta or not callable(due_keys):
            return None
        found = await due_keys(skey, float("inf"), 1)  # a whole storage key is a prefix of itself only
        return found[0][1] if found and found[0][0] == skey else None

    async def write(items: list[SaveItem], dues: list[float | None]) -> None:
        if not items:
            return
        save_many = getattr(storage, "save_many", None)
        timed = any(d is not None for d in dues)
        if callable(save_many):
            results = list(await (save_many(items, due=dues) if timed else save_many(items)))
        else:
            results = []
            for item, due in zip(items, dues, strict=True):
                extra = {"due": due} if timed else {}
                try:
                    results.append(await storage.save(item.key, item.data,
                                                      expected_version=item.expected_version, **extra))
                except ConflictError as exc:
                    results.append(exc)
        if len(results) != len(items):
            raise RuntimeError(f"save_many returned {len(results)} results for {len(items)} items")
        for result in results:
            if isinstance(result, ConflictError):
                tally["conflicts"] += 1  # written meanwhile: that newer write stands
            elif isinstance(result, BaseException):
                raise result
            else:
                tally["migrated"] += 1

    async def run() -> None:
        try:
            if not dry_run:
                await _refuse_if_running(storage, manager, force, "rewriting checkpoints")
            total = 0
            async for _ in stored_keys(storage, manager):
                total += 1
            with _progress(BarColumn(), MofNCompleteColumn()) as progress:
                task = progress.add_task("migrating" if not dry_run else "checking", total=total)
                items: list[SaveItem] = []
                dues: list[float | None] = []
                async for record in stored_keys(storage, manager):
                    skey = storage_key(manager, record.partition, record.key)
                    checkpoint = await storage.load(skey)
                    progress.advance(task)
                    if checkpoint is None:
                        continue  # deleted meanwhile
                    try:
                        new = upgraded(checkpoint.data)
                    except Exception as exc:  # noqa: BLE001  # one bad checkpoint is reported, the others go on
                        tally["failed"] += 1
                        where = _where(manager, format_key(record.key), format_key(record.partition) or None)
                        err.print(f"[red]cannot migrate[/red] {escape(where)}: {escape(str(exc))}")
                        continue
                    if new is None:
                        continue
                    if dry_run:
                        tally["migrated"] += 1
                        continue
                    items.append(SaveItem(skey, new[0], checkpoint.version))
                    dues.append(await due_of(skey, new[1]))
                    if len(items) >= batch:
                        await write(items, dues)
                        items, dues = [], []
                await write(items, dues)
        finally:
            await storage.aclose()

    try:
        _run(run())
    except Exception as exc:  # noqa: BLE001  # any failure is one line on stderr, exit 1
        raise _fail(_explain(exc)) from None
    verb = "would migrate" if dry_run else "migrated"
    err.print(f"{verb} {_plural(tally['migrated'], 'checkpoint')} to state_version {target}; "
              f"{tally['current']:,} already current, {tally['newer']:,} newer (left alone), "
              f"{tally['conflicts']:,} written meanwhile (left alone), {tally['failed']:,} failed")
    if tally["failed"]:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``keyhive`` script."""
    app(prog_name="keyhive")


if __name__ == "__main__":  # pragma: no cover
    main()
