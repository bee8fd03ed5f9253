"""Shared helpers for driver-backed storage backends."""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from types import ModuleType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ._base import Checkpoint

__all__ = ["LoadBatcher", "import_driver", "query_options", "split_options", "url_flag"]


def import_driver(module: str, extra: str) -> ModuleType:
    """Import a backend's driver, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"this storage backend needs {module!r}: pip install 'keyhive[{extra}]'"
        ) from exc


def query_options(query: str, allowed: set[str], url: str) -> dict[str, str]:
    """Options from a URL's query string; unknown names raise ValueError."""
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} in {url!r}; "
            f"known: {', '.join(sorted(allowed))}"
        )
    return options


def url_flag(value: str, name: str, url: str) -> bool:
    """A boolean URL option: ``true``/``false`` (also ``1``/``0``, ``yes``/``no``)."""
    flag = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(value.lower())
    if flag is None:
        raise ValueError(f"{name} must be true or false in {url!r}, not {value!r}")
    return flag


def split_options(url: str, own: set[str]) -> tuple[dict[str, str], str]:
    """Split a URL's query into keyhive's own options and the URL left for the driver.

    The driver keeps every other query option (e.g. redis-py's ``socket_timeout``).
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    mine = {k: v for k, v in pairs if k in own}
    rest = urlencode([(k, v) for k, v in pairs if k not in own])
    return mine, urlunsplit(parts._replace(query=rest))


class LoadBatcher:
    """Coalesce the loads requested in one loop iteration into one backend read.

    A thaw storm asks for thousands of keys at once; reading them in one round trip (one
    ``SELECT … IN``, one pipeline) instead of one each is what makes it fast, and it bounds
    the connections a storm needs to one.
    """

    def __init__(self, read: Callable[[list[str]], Awaitable[dict[str, Checkpoint]]]) -> None:
        self._read = read
        self._pending: dict[str, list[asyncio.Future[Checkpoint | None]]] = {}
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self, key: str) -> Checkpoint | None:
        if type(key) is not str:
            raise TypeError(f"storage keys are str, not {type(key).__name__}")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Checkpoint | None] = loop.create_future()
        self._pending.setdefault(key, []).append(fut)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, {}
        if pending:
            task = asyncio.get_running_loop().create_task(self._load_batch(pending))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _load_batch(self, pending: dict[str, list[asyncio.Future[Checkpoint | None]]]) -> None:
        try:
            found = await self._read(list(pending))
        except BaseException as exc:
            for futures in pending.values():
                for fut in futures:
                    if not fut.done():
                        fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for key, futures in pending.items():
            for fut in futures:
                if not fut.done():
                    fut.set_result(found.get(key))
