"""Shared helpers for driver-backed storage backends."""

from __future__ import annotations

import asyncio
import importlib
import math
from collections.abc import Awaitable, Callable, Sequence
from types import ModuleType
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._errors import LeaseLost
from ._base import Checkpoint, Fence, Lease

__all__ = [
    "LoadBatcher",
    "check_due",
    "check_dues",
    "check_fence",
    "check_lease_args",
    "check_limit",
    "import_driver",
    "lease_lost",
    "make_lease",
    "query_options",
    "split_options",
    "url_flag",
]


def check_fence(fence: object) -> Fence | None:
    """``fence`` itself when it is a :class:`Fence` or ``None``; TypeError otherwise."""
    if fence is None or type(fence) is Fence:
        return fence
    raise TypeError(f"fence must be keyhive.Fence(name, epoch) or None, not {type(fence).__name__}")


def check_due(due: object) -> float | None:
    """A due time as a float (seconds since the epoch), or None; clear errors otherwise."""
    if due is None:
        return None
    if isinstance(due, bool) or not isinstance(due, int | float):
        raise TypeError(f"due must be seconds since the epoch (a float, e.g. time.time() + 60) or None, "
                        f"not {type(due).__name__}")
    if not math.isfinite(due):
        raise ValueError(f"due must be a finite time in seconds since the epoch, not {due!r}")
    return float(due)


def check_dues(due: object, count: int) -> list[float | None]:
    """``save_many``'s ``due=``: None (no item is due) or one due time per item."""
    if due is None:
        return [None] * count
    if isinstance(due, str | bytes) or not isinstance(due, Sequence):
        raise TypeError(f"save_many(due=...) takes None or a list with one due time (or None) per item, "
                        f"not {type(due).__name__}")
    if len(due) != count:
        raise ValueError(f"save_many(due=...) has {len(due)} due times for {count} items: give one per item")
    return [check_due(d) for d in due]


def check_limit(limit: object) -> int:
    """A result limit: an int >= 1."""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an int >= 1, not {limit!r}")
    return limit


def check_lease_args(name: object, holder: object, ttl: object = 1.0) -> float:
    """Validate a lease call's arguments; return ``ttl`` as a float."""
    if type(name) is not str or not name:
        raise TypeError(f"lease name must be a non-empty str, not {name!r}")
    if type(holder) is not str or not holder:
        raise TypeError(f"lease holder must be a non-empty str such as 'host:pid:instance', not {holder!r}")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not (0 < ttl < math.inf):
        raise ValueError(f"lease ttl must be seconds > 0 (e.g. 10.0), not {ttl!r}")
    return float(ttl)


def make_lease(name: str, holder: str, epoch: int, acquired_at: float, expires_at: float,
               released: bool, now: float) -> Lease:
    """The :class:`Lease` a stored record describes when read at ``now`` (storage clock)."""
    left = 0.0 if released else max(0.0, expires_at - now)
    return Lease(name, holder, int(epoch), float(acquired_at), left, bool(released))


def lease_lost(fence: Fence, stored: str) -> LeaseLost:
    """The error of a fenced write refused because the lease moved on."""
    return LeaseLost(f"lease {fence.name!r} is no longer held under epoch {fence.epoch} "
                     f"({stored}): nothing was written")


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
