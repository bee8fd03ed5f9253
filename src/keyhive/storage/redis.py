"""RedisStorage: checkpoints in Redis hashes, compare-and-set in a Lua script (``keyhive[redis]``).

``redis://[:password@]host:6379/0``, ``rediss://…`` (TLS) or ``unix:///path.sock``, with
options ``?key_prefix=keyhive:&ttl=0``. Each checkpoint is a hash at
``<key_prefix><storage key>`` with fields ``d`` (bytes), ``v`` (version) and ``t``
(last write, epoch seconds). The Lua script checks the version and writes in one atomic
step; ``save_many`` sends a batch as one script call per 1,000 items, with each item's
own result (a fenced batch goes as one call, so it is written whole or not at all).

Beside the checkpoints, under the same prefix: the lease hashes ``<key_prefix>lease:<name>``
(fields ``h`` holder, ``e`` epoch, ``a`` acquired, ``x`` expires, ``r`` released, times by
the server's ``TIME``), and two sorted sets kept by the same scripts that write the
checkpoints: ``<key_prefix>idx:due`` (due times) and ``<key_prefix>idx:updated`` (write
times, for ``stale_keys``; key TTLs are never used for retention). Storage keys that start
with ``lease:`` or ``idx:`` are therefore refused (keyhive's own keys start with ``[``).

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

from .._errors import ConflictError, LeaseLost, StorageError
from ._base import Checkpoint, Fence, Lease, SaveItem, StoredKey
from ._driver import (
    LoadBatcher,
    check_due,
    check_dues,
    check_fence,
    check_lease_args,
    check_limit,
    import_driver,
    lease_lost,
    make_lease,
    split_options,
)

__all__ = ["RedisStorage"]

_redis: Any = import_driver("redis.asyncio", "redis")
_exceptions: Any = import_driver("redis.exceptions", "redis")

# Lua helpers shared by the scripts. A fence check: ARGV epoch '' means no fence; a
# fenced write needs the lease hash to hold exactly that epoch, not released.
_FENCE = """
local function fence_ok(lease, epoch)
  if epoch == '' then return true, false end
  local r = redis.call('HMGET', lease, 'e', 'r')
  return r[1] == epoch and r[2] ~= '1', r[1] or false
end
local function set_due(idx, member, due)
  if due == '' then redis.call('ZREM', idx, member) else redis.call('ZADD', idx, due, member) end
end
"""

# KEYS: checkpoint, due index, write-time index, lease. ARGV: data, expected version ('' =
# new), now, ttl_ms, due ('' = none), fence epoch ('' = none), member (the storage key).
# Returns {1, new version}, {0, stored version} on a conflict, {2, stored epoch} when fenced out.
_CAS = _FENCE + """
local ok, stored = fence_ok(KEYS[4], ARGV[6])
if not ok then return {2, stored} end
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
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[7])
set_due(KEYS[2], ARGV[7], ARGV[5])
return {1, new}
"""

# A batch in one script call: KEYS = due index, write-time index, lease, then the keys;
# ARGV = now, ttl_ms, fence epoch, then data, expected version, due, member per key.
# Items apply in order (a key twice in a batch: the second sees the first's write).
# Returns ok, version per item, flat; or {2, stored epoch} when fenced out (nothing written).
_CAS_MANY = _FENCE + """
local ok, stored = fence_ok(KEYS[3], ARGV[3])
if not ok then return {2, stored} end
local out = {}
-- an empty due index has nothing to remove: no ZREM per item (most batches set no due time)
local dues = redis.call('EXISTS', KEYS[1]) == 1
for i = 4, #KEYS do
  local key, j, n = KEYS[i], 4 * (i - 4) + 4, i - 3
  local data, expected = ARGV[j], ARGV[j + 1]
  local cur = redis.call('HGET', key, 'v')
  if (expected == '' and cur) or (expected ~= '' and cur ~= expected) then
    out[2 * n - 1] = 0
    out[2 * n] = cur or false
  else
    local new = 1
    if cur then new = tonumber(cur) + 1 end
    redis.call('HSET', key, 'd', data, 'v', new, 't', ARGV[1])
    if ARGV[2] ~= '0' then redis.call('PEXPIRE', key, ARGV[2]) end
    redis.call('ZADD', KEYS[2], ARGV[1], ARGV[j + 3])
    if ARGV[j + 2] ~= '' then
      dues = true
      redis.call('ZADD', KEYS[1], ARGV[j + 2], ARGV[j + 3])
    elseif dues then
      redis.call('ZREM', KEYS[1], ARGV[j + 3])
    end
    out[2 * n - 1] = 1
    out[2 * n] = new
  end
end
return out
"""

# KEYS: checkpoint, due index, write-time index, lease. ARGV: member, fence epoch, version
# ('' = any). Returns {1} removed, {0} not (missing or another version), {2, epoch} fenced out.
_DELETE = _FENCE + """
local ok, stored = fence_ok(KEYS[4], ARGV[2])
if not ok then return {2, stored} end
if ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'v') ~= ARGV[3] then return {0} end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return {redis.call('DEL', KEYS[1])}
"""

# Leases judge time by the server's clock alone. Fields: h holder, e epoch, a acquired,
# x expires, r released ('1'). Each returns holder, epoch, acquired, expires, released, now.
_LEASE_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function f(x) return string.format('%.6f', x) end
"""
# KEYS: lease. ARGV: holder, ttl seconds, takeover ('1').
_ACQUIRE = _LEASE_NOW + """
local r = redis.call('HMGET', KEYS[1], 'h', 'e', 'a', 'x', 'r')
local until_ = f(now + tonumber(ARGV[2]))
if not r[2] then
  -- a new record starts at the server's clock in microseconds, not 1: a server restarted
  -- without its data must never hand out an epoch that an earlier holder still fences with
  local first = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
  redis.call('HSET', KEYS[1], 'h', ARGV[1], 'e', first, 'a', f(now), 'x', until_, 'r', '0')
  return {ARGV[1], first, f(now), until_, '0', f(now)}
end
if r[1] == ARGV[1] and r[5] ~= '1' then
  redis.call('HSET', KEYS[1], 'x', until_)
  return {r[1], r[2], r[3], until_, '0', f(now)}
end
if r[5] == '1' or tonumber(r[4]) <= now or ARGV[3] == '1' then
  local epoch = string.format('%d', tonumber(r[2]) + 1)
  redis.call('HSET', KEYS[1], 'h', ARGV[1], 'e', epoch, 'a', f(now), 'x', until_, 'r', '0')
  return {ARGV[1], epoch, f(now), until_, '0', f(now)}
end
return {r[1], r[2], r[3], r[4], r[5], f(now)}
"""
# KEYS: lease. ARGV: holder, epoch. Returns 1 when released.
_RELEASE = _LEASE_NOW + """
local r = redis.call('HMGET', KEYS[1], 'h', 'e', 'r')
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] or r[3] == '1' then return 0 end
redis.call('HSET', KEYS[1], 'r', '1', 'x', f(now))
return 1
"""
# KEYS: lease. Returns the fields and now ({} when there is no lease).
_READ_LEASE = _LEASE_NOW + """
local r = redis.call('HMGET', KEYS[1], 'h', 'e', 'a', 'x', 'r')
if not r[2] then return {} end
return {r[1], r[2], r[3], r[4], r[5], f(now)}
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
        self._script_delete = client.register_script(_DELETE)
        self._script_acquire = client.register_script(_ACQUIRE)
        self._script_release = client.register_script(_RELEASE)
        self._script_read_lease = client.register_script(_READ_LEASE)
        self._due_index = key_prefix + "idx:due"
        self._updated_index = key_prefix + "idx:updated"
        self._lease_prefix = key_prefix + "lease:"
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

    @staticmethod
    def _member(key: str) -> str:
        """``key`` itself, checked: str, and not one of the names the indexes and leases use."""
        if type(key) is not str:
            raise TypeError(f"storage keys are str, not {type(key).__name__}")
        if key.startswith(("lease:", "idx:")):
            raise ValueError(f"storage key {key!r}: keys starting with 'lease:' or 'idx:' are reserved "
                             "for RedisStorage's leases and indexes; choose another key")
        return key

    @staticmethod
    def _data(data: bytes) -> bytes:
        if not isinstance(data, bytes):
            raise TypeError(f"checkpoint data must be bytes, not {type(data).__name__}")
        return data

    def _lease_key(self, fence: Fence | None) -> str:
        # A script names every key it touches; an unfenced write names the lease of "" unused.
        return self._lease_prefix + ("" if fence is None else fence.name)

    @staticmethod
    def _fenced_out(fence: Fence | None, reply: Any) -> LeaseLost:
        assert fence is not None  # the scripts answer 2 only to a fenced write
        stored = reply[1]
        return lease_lost(fence, "no lease" if stored is None else f"epoch {int(stored)} or released")

    @staticmethod
    def _result(key: str, expected: int | None, reply: Any) -> int:
        ok, version = reply
        if ok == 1:
            return int(version)
        stored = None if version is None else int(version)
        raise ConflictError(f"version conflict on {key!r}: expected {expected}, stored {stored}")

    async def save(self, key: str, data: bytes, *, expected_version: int | None,
                   fence: Fence | None = None, due: float | None = None) -> int:
        """Compare-and-set one checkpoint with its due time, under ``fence`` when given (one script)."""
        self._check()
        member = self._member(key)
        fence = check_fence(fence)
        due = check_due(due)
        args = [self._data(data), "" if expected_version is None else str(expected_version),
                repr(time.time()), self._ttl_ms, "" if due is None else repr(due),
                "" if fence is None else str(fence.epoch), member]
        keys = [self.key_prefix + key, self._due_index, self._updated_index, self._lease_key(fence)]
        try:
            reply = await self._script(keys=keys, args=args)
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc
        if reply[0] == 2:
            raise self._fenced_out(fence, reply)
        return self._result(key, expected_version, reply)

    async def save_many(self, items: Sequence[SaveItem], *, fence: Fence | None = None,
                        due: Sequence[float | None] | None = None) -> list[int | BaseException]:
        """Write a batch with one script call per 1,000 items (each item's own CAS result).

        A fenced batch goes as one script call whatever its size, so that it is written
        whole or (LeaseLost) not at all. Every key of a call is passed in KEYS, as Redis
        requires; on Redis Cluster a batch would need its keys in one hash slot, which
        keyhive's keys do not promise.
        """
        self._check()
        items = list(items)
        fence = check_fence(fence)
        dues = check_dues(due, len(items))
        for item in items:
            self._member(item.key)
            self._data(item.data)
        now = repr(time.time())
        epoch = "" if fence is None else str(fence.epoch)
        size = len(items) if fence is not None else _SCRIPT_BATCH
        results: list[int | BaseException] = []
        try:
            for start in range(0, len(items), max(size, 1)):
                chunk = items[start:start + size]
                args: list[Any] = [now, self._ttl_ms, epoch]
                for item, item_due in zip(chunk, dues[start:start + size], strict=True):
                    args += [item.data, "" if item.expected_version is None else str(item.expected_version),
                             "" if item_due is None else repr(item_due), item.key]
                keys = [self._due_index, self._updated_index, self._lease_key(fence)]
                keys += [self.key_prefix + i.key for i in chunk]
                reply = await self._script_many(keys=keys, args=args)
                if reply and reply[0] == 2:
                    raise self._fenced_out(fence, reply)
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

    async def _delete(self, key: str, version: int | None, fence: Fence | None) -> bool:
        self._check()
        member = self._member(key)
        fence = check_fence(fence)
        keys = [self.key_prefix + key, self._due_index, self._updated_index, self._lease_key(fence)]
        args = [member, "" if fence is None else str(fence.epoch), "" if version is None else str(version)]
        try:
            reply = await self._script_delete(keys=keys, args=args)
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc
        if reply[0] == 2:
            raise self._fenced_out(fence, reply)
        return bool(reply[0])

    async def delete(self, key: str, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` and its index entries; ``True`` when something was removed."""
        return await self._delete(key, None, fence)

    async def delete_if(self, key: str, version: int, *, fence: Fence | None = None) -> bool:
        """Remove ``key`` only while its stored version is ``version``; ``True`` when removed."""
        if isinstance(version, bool) or not isinstance(version, int):
            raise TypeError(f"version must be an int, not {type(version).__name__}")
        return await self._delete(key, version, fence)

    async def _range(self, index: str, prefix: str, upper: str, limit: int) -> list[tuple[str, float]]:
        """Members of ``index`` with ``prefix`` and a score up to ``upper``, by score, paged."""
        out: list[tuple[str, float]] = []
        offset, page = 0, max(limit, 1000)
        try:
            while len(out) < limit:
                rows = await self._client.zrange(index, "-inf", upper, byscore=True, offset=offset,
                                                 num=page, withscores=True)
                for member, score in rows:
                    key = member.decode() if isinstance(member, bytes) else member
                    if key.startswith(prefix):
                        out.append((key, float(score)))
                        if len(out) == limit:
                            break
                if len(rows) < page:
                    break
                offset += page
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc
        return out

    async def due_keys(self, prefix: str, until: float, limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` ``(key, due)`` with ``prefix`` and ``due <= until``, earliest first."""
        self._check()
        return await self._range(self._due_index, prefix, repr(float(until)), check_limit(limit))

    async def stale_keys(self, prefix: str, older_than: float, limit: int = 1000) -> list[StoredKey]:
        """Up to ``limit`` checkpoints with ``prefix`` last written before ``older_than``, oldest first.

        Read from the write-time sorted set; a member whose checkpoint is gone (a key
        TTL, ``?ttl=``) is dropped from the set as it is met.
        """
        self._check()
        limit = check_limit(limit)
        found: list[StoredKey] = []
        while len(found) < limit:
            rows = await self._range(self._updated_index, prefix, "(" + repr(float(older_than)),
                                     limit - len(found))
            if not rows:
                break
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, _ in rows:
                        pipe.hget(self.key_prefix + key, "v")
                        pipe.hstrlen(self.key_prefix + key, "d")
                    replies = await pipe.execute()
                gone = [key for i, (key, _) in enumerate(rows) if replies[2 * i] is None]
                if gone:
                    await self._client.zrem(self._updated_index, *gone)
            except (_exceptions.RedisError, OSError) as exc:
                raise self._errors(exc) from exc
            found += [StoredKey(key, int(replies[2 * i]), int(replies[2 * i + 1]), updated)
                      for i, (key, updated) in enumerate(rows) if replies[2 * i] is not None]
            if not gone:
                break
        return found

    # -- leases -------------------------------------------------------------------------------------

    @staticmethod
    def _lease(name: str, reply: Any) -> Lease:
        holder, epoch, since, expires, released, now = reply
        holder = holder.decode() if isinstance(holder, bytes) else holder
        return make_lease(name, holder, int(epoch), float(since), float(expires),
                          released in (b"1", "1"), float(now))

    async def acquire_lease(self, name: str, holder: str, ttl: float, *,
                            takeover: bool = False) -> Lease:
        """Take or renew ``name`` for ``ttl`` seconds, by the server's clock; see LeaseStorage."""
        self._check()
        ttl = check_lease_args(name, holder, ttl)
        try:
            reply = await self._script_acquire(keys=[self._lease_prefix + name],
                                               args=[holder, repr(ttl), "1" if takeover else "0"])
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc
        return self._lease(name, reply)

    async def release_lease(self, name: str, holder: str, epoch: int) -> bool:
        """Give ``name`` up at once, keeping its epoch; False when it is not ours anymore."""
        self._check()
        check_lease_args(name, holder)
        try:
            return bool(await self._script_release(keys=[self._lease_prefix + name],
                                                   args=[holder, str(int(epoch))]))
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc

    async def read_lease(self, name: str) -> Lease | None:
        """The lease ``name`` as stored, or None when nobody ever took it."""
        self._check()
        check_lease_args(name, "reader")
        try:
            reply = await self._script_read_lease(keys=[self._lease_prefix + name])
        except (_exceptions.RedisError, OSError) as exc:
            raise self._errors(exc) from exc
        return self._lease(name, reply) if reply else None

    def _reserved(self, name: bytes | str) -> bool:
        """Whether a Redis key is one of the indexes or a lease, not a checkpoint."""
        text = name.decode() if isinstance(name, bytes) else name
        return text in (self._due_index, self._updated_index) or text.startswith(self._lease_prefix)

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
            # str(), not repr(): redis-py 8's repr is "network:ConnectionError", without the OS error
            what = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) \
                else f"{type(exc).__name__}: {exc}"
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
                names = [n for n in names if not self._reserved(n)]
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
