"""RedisStorage: checkpoints in Redis hashes, compare-and-set in a Lua script (``keyhive[redis]``).

``redis://[:password@]host:6379/0``, ``rediss://…`` (TLS) or ``unix:///path.sock``, with
options ``?key_prefix=keyhive:&ttl=0``. Each checkpoint is a hash at
``<key_prefix><storage key>`` with fields ``d`` (bytes), ``v`` (version) and ``t``
(last write, epoch seconds). The Lua script checks the version and writes in one atomic
step; ``save_many`` sends a batch as one script call per 1,000 items, with each item's
own result.

Durability is the server's: with Redis defaults (RDB snapshots) a crash of the Redis
server can lose the writes since the last snapshot; run it with ``appendonly yes``
(``appendfsync everysec`` loses at most a second, ``always`` nothing) to make
checkpoints durable. A crash of *this* process loses nothing that was acknowledged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import urlsplit

from .._errors import ConflictError, StorageError
from ._base import Checkpoint, SaveItem, StoredKey
from ._driver import LoadBatcher, import_driver, split_options

__all__ = ["RedisStorage"]

_redis: Any = import_driver("redis.asyncio", "redis")
_exceptions: Any = import_driver("redis.exceptions", "redis")

_CAS = """
local cur = redis.call('HGET', KEYS[1], 'v')
if ARGV[2] == '' then
  if cur then return {0, cur} end
elseif cur ~= ARGV[2] then
  return {0, cur or false}
end
local new = 1
if cur then new = tonumber(cur) + 1 end
redis.call('HSET', KEYS[1], 'd', ARGV[1], 'v', new, 't', ARGV[3])
if ARGV[4] ~= '0' then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return {1, new}
"""

# A batch in one script call: KEYS are the keys, ARGV = now, ttl_ms, then data and
# expected version per key. Items apply in order (a key twice in a batch: the second
# sees the first's write). Returns ok, version per item, flat.
_CAS_MANY = """
local out = {}
for i, key in ipairs(KEYS) do
  local data, expected = ARGV[2 * i + 1], ARGV[2 * i + 2]
  local cur = redis.call('HGET', key, 'v')
  if (expected == '' and cur) or (expected ~= '' and cur ~= expected) then
    out[2 * i - 1] = 0
    out[2 * i] = cur or false
  else
    local new = 1
    if cur then new = tonumber(cur) + 1 end
    redis.call('HSET', key, 'd', data, 'v', new, 't', ARGV[1])
    if ARGV[2] ~= '0' then redis.call('PEXPIRE', key, ARGV[2]) end
    out[2 * i - 1] = 1
    out[2 * i] = new
  end
end
return out
"""
# Many loads in one call: data and version per key, flat (false, false when missing).
_LOAD_MANY = """
local out = {}
for i, key in ipairs(KEYS) do
  local r = redis.call('HMGET', key, 'd', 'v')
  out[2 * i - 1] = r[1]
  out[2 * i] = r[2]
end
return out
"""
_SCRIPT_BATCH = 1000  # items per script call, so one call never blocks the server for long

_OWN_OPTIONS = {"key_prefix", "ttl"}


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStorage:
    """Checkpoints in Redis. See the module docstring for layout and durability."""

    def __init__(self, client: Any, *, key_prefix: str = "keyhive:", ttl: float | None = None) -> None:
        if not isinstance(key_prefix, str):
            raise TypeError(f"key_prefix must be a str, not {type(key_prefix).__name__}")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float) or ttl < 0):
            raise ValueError(f"ttl must be seconds >= 0 or None, not {ttl!r}")
        self._client = client
        self.key_prefix = key_prefix
        self._ttl_ms = "0" if not ttl else str(int(ttl * 1000))
        self._script = client.register_script(_CAS)
        self._script_many = client.register_script(_CAS_MANY)
        self._script_load = client.register_script(_LOAD_MANY)
        self._closed = False
        self._loads = LoadBatcher(self._read)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> RedisStorage:
        """Build from a URL; ``key_prefix`` and ``ttl`` come from the query or ``overrides``."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL: {url!r}")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError(f"Redis URL needs a host, e.g. 'redis://127.0.0.1:6379/0', not {url!r}")
        own, driver_url = split_options(url, _OWN_OPTIONS)
        kwargs: dict[str, Any] = {}
        if "key_prefix" in own:
            kwargs["key_prefix"] = own["key_prefix"]
        if "ttl" in own:
            try:
                kwargs["ttl"] = float(own["ttl"])
            except ValueError:
                raise ValueError(f"ttl must be seconds in {url!r}") from None
        kwargs.update(overrides)
        try:
            # A blocking pool: a burst of saves waits for a connection instead of failing
            # with "too many connections" (loads are coalesced and need just one).
            pool = _redis.BlockingConnectionPool.from_url(driver_url,
                                                          max_connections=50, timeout=20)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad Redis URL {url!r}: {exc}") from exc
        return cls(_redis.Redis.from_pool(pool), **kwargs)

    def __repr__(self) -> str:
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        return f"<RedisStorage {where} prefix={self.key_prefix!r}>"

    def _check(self) -> None:
        if self._closed:
            raise StorageError(f"{self!r} is closed")

    def _errors(self, exc: BaseException) -> StorageError:
        return StorageError(f"{self!r}: {exc!r}")

    async def load(self, key: str) -> Checkpoint | None:
        self._check()
        return await self._loads.load(key)

    async def _read(self, keys: list[str]) -> dict[str, Checkpoint]:
        """The checkpoints of ``keys`` that exist: one script call per 1,000 keys."""
        found: dict[str, Checkpoint] = {}
        try:
            for start in range(0, len(keys), _SCRIPT_BATCH):
                chunk = keys[start:start + _SCRIPT_BATCH]
                reply = await self._script_load(keys=[self.key_prefix + k for k in chunk])
                for pos, key in enumerate(chunk):
                    data, version = reply[2 * pos], reply[2 * pos + 1]
                    if version is not None:
                        found[key] = Checkpoint(bytes(data), int(version))
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc
        return found

    def _args(self, data: bytes, expected: int | None) -> list[Any]:
        if not isinstance(data, bytes):
            raise TypeError(f"checkpoint data must be bytes, not {type(data).__name__}")
        return [data, "" if expected is None else str(expected), repr(time.time()), self._ttl_ms]

    @staticmethod
    def _result(key: str, expected: int | None, reply: Any) -> int:
        ok, version = reply
        if ok == 1:
            return int(version)
        stored = None if version is None else int(version)
        raise ConflictError(f"version conflict on {key!r}: expected {expected}, stored {stored}")

    async def save(self, key: str, data: bytes, *, expected_version: int | None) -> int:
        self._check()
        if type(key) is not str:
            raise TypeError(f"storage keys are str, not {type(key).__name__}")
        args = self._args(data, expected_version)
        try:
            reply = await self._script(keys=[self.key_prefix + key], args=args)
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc
        return self._result(key, expected_version, reply)

    async def save_many(self, items: Sequence[SaveItem]) -> list[int | BaseException]:
        """Write a batch with one script call per 1,000 items (each item's own CAS result).

        Every key of a call is passed in KEYS, as Redis requires; on Redis Cluster a batch
        would need its keys in one hash slot, which keyhive's keys do not promise.
        """
        self._check()
        items = list(items)
        for item in items:
            if type(item.key) is not str:
                raise TypeError(f"storage keys are str, not {type(item.key).__name__}")
        now = repr(time.time())
        results: list[int | BaseException] = []
        try:
            for start in range(0, len(items), _SCRIPT_BATCH):
                chunk = items[start:start + _SCRIPT_BATCH]
                args: list[Any] = [now, self._ttl_ms]
                for item in chunk:
                    args += self._args(item.data, item.expected_version)[:2]
                reply = await self._script_many(keys=[self.key_prefix + i.key for i in chunk], args=args)
                for pos, item in enumerate(chunk):
                    try:
                        results.append(self._result(item.key, item.expected_version,
                                                    (reply[2 * pos], reply[2 * pos + 1])))
                    except ConflictError as exc:
                        results.append(exc)
        except (_exceptions.RedisError, OSError) as exc:
            if results:  # earlier chunks are written: report them, fail the rest
                failed = self._errors(exc)
                failed.__cause__ = exc
                return results + [failed] * (len(items) - len(results))
            raise self._errors(exc) from exc
        return results

    async def delete(self, key: str) -> bool:
        self._check()
        try:
            return bool(await self._client.delete(self.key_prefix + key))
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc

    async def ping(self, *, timeout: float = 10.0) -> None:
        """One ``PING`` round trip (``timeout`` seconds at most).

        Raises:
            StorageError: the server cannot be reached or refused us; the message names
                host and port, the driver's exception is ``__cause__``.
        """
        self._check()
        kwargs = self._client.connection_pool.connection_kwargs
        where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        try:
            async with asyncio.timeout(timeout):
                await self._client.ping()
        except (_exceptions.RedisError, OSError, TimeoutError) as exc:
            what = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else repr(exc)
            raise StorageError(
                f"cannot reach Redis at {where}: {what}; is the server running? "
                "check host/port/password (and TLS: rediss://) in the storage URL"
            ) from exc

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[StoredKey]:
        """Every key under ``prefix``, streamed with SCAN (no order)."""
        self._check()
        strip = len(self.key_prefix)
        match = _glob_escape(self.key_prefix + prefix) + "*"
        cursor: Any = 0
        try:
            while True:
                cursor, names = await self._client.scan(cursor=cursor, match=match, count=1000)
                if names:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for name in names:
                            pipe.hmget(name, "v", "t")
                            pipe.hstrlen(name, "d")
                        replies = await pipe.execute()
                    for i, name in enumerate(names):
                        (version, updated), size = replies[2 * i], replies[2 * i + 1]
                        if version is not None:
                            key = name.decode() if isinstance(name, bytes) else name
                            yield StoredKey(key[strip:], int(version), int(size),
                                            None if updated is None else float(updated))
                if int(cursor) == 0:
                    return
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.aclose()
