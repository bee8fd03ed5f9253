"""One agent's storage I/O: storage key, encode, envelope, size limit, thaw, migrate, writes.

Everything that turns an incarnation's state into a stored checkpoint and back lives
here, with the error mapping of SPEC §7 (whatever a backend raises, except a
:class:`~keyhive.ConflictError`, reaches callers as :class:`~keyhive.StorageError`) and
the bound of SPEC §8 (``storage_timeout``).

Writes go through :meth:`CheckpointIO.save_batch`: a backend's ``save_many`` when it has
one that does not bypass an overridden ``save`` (SPEC §7), else ``save`` per item. Each
checkpoint names its writer (this manager instance) and a sequence number in its
envelope, so that after a lost reply an incarnation recognises its own write by
identity, never by comparing bytes (SPEC §9).
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ._errors import CodecError, ConflictError, LeaseLost, StorageError, ThawError
from ._keys import storage_key
from ._timers import timer_part
from .codecs import decode_state, pack, peek_writer, unpack
from .storage import Fence, SaveItem

if TYPE_CHECKING:
    from ._agent import Agent
    from ._options import Options
    from ._ref import AgentRef

__all__ = ["CheckpointIO", "digest", "storage_error"]

logger = logging.getLogger("keyhive")

_UNSURE_MAX = 64  # a bound for an agent whose writes fail for a very long time
_FALLBACK_CHUNK = 64  # per-item saves in flight at once when there is no usable save_many


def digest(payload: bytes, meta: bytes = b"") -> bytes:
    """What an incarnation remembers of the state (and timers, ``meta``) it last wrote or thawed."""
    if not meta:
        return hashlib.blake2b(payload, digest_size=16).digest()
    h = hashlib.blake2b(payload, digest_size=16)
    h.update(b"\xffkeyhive-meta")  # meta apart from the payload: a timers-only change is a change
    h.update(meta)
    h.update(len(meta).to_bytes(8, "little"))
    return h.digest()


def storage_error(exc: BaseException) -> BaseException:
    """``exc`` as the manager reports it: a StorageError with the original as cause."""
    if isinstance(exc, StorageError) or not isinstance(exc, Exception):
        return exc
    if isinstance(exc, TimeoutError):
        err = StorageError(f"storage did not answer in time: {exc}")
    else:
        err = StorageError(f"storage failed: {exc!r}")
    err.__cause__ = exc
    return err


def _defined_below(storage: object, batch: str, single: str) -> bool:
    """Whether ``storage.<batch>`` can stand in for ``<single>``: no class between the
    object and the one defining ``batch`` overrides ``single`` (nor does the instance)."""
    if single in getattr(storage, "__dict__", ()):
        return False
    for klass in type(storage).__mro__:
        attrs = vars(klass)
        if batch in attrs:
            return True
        if single in attrs:
            return False
    return False


class _Watchdog:
    """``storage_timeout`` for many storage calls at once, with one loop timer.

    ``asyncio.timeout`` per call puts a timer per call on the loop's heap: a thaw storm of
    thousands of loads pays for thousands of pushes, pops and cancels, each O(log n) Python
    comparisons (a quarter of a thaw's CPU, measured). Every call here has the same
    timeout, so deadlines come in the order the calls began: an insertion-ordered dict
    (task -> deadline) and one timer for its oldest entry. A call past its deadline is
    cancelled and raises TimeoutError, as under ``asyncio.timeout``.
    """

    __slots__ = ("_calls", "_fired", "_handle", "_loop", "_timeout")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._calls: dict[asyncio.Task[Any], tuple[float, int]] = {}  # deadline, cancel requests
        self._fired: dict[asyncio.Task[Any], int] = {}  # cancelled by us: its cancel requests before
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def begin(self) -> asyncio.Task[Any] | None:
        """Bound the call the running task makes now; None when it is bound already."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a manager started again in another loop
            self._loop, self._calls, self._fired, self._handle = loop, {}, {}, None
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("keyhive storage calls must run inside an asyncio task")
        calls = self._calls
        if task in calls:  # a storage call made from within one (a backend's own load)
            return None
        deadline = loop.time() + self._timeout
        calls[task] = (deadline, task.cancelling())
        if self._handle is None:
            self._handle = loop.call_at(deadline, self._fire)
        return task

    def end(self, task: asyncio.Task[Any] | None, exc: BaseException | None) -> None:
        """The call ended (``exc``: what it raised); raise TimeoutError if it ran out of time."""
        if task is None:
            return
        self._calls.pop(task, None)
        if self._fired:
            cancelling = self._fired.pop(task, None)
            if cancelling is not None and task.uncancel() <= cancelling \
                    and isinstance(exc, asyncio.CancelledError):
                raise TimeoutError(f"no answer from storage within storage_timeout={self._timeout}s") from exc

    def _fire(self) -> None:
        self._handle = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        calls = self._calls
        expired = []
        for task, (deadline, cancelling) in calls.items():
            if deadline > now:
                self._handle = loop.call_at(deadline, self._fire)
                break
            expired.append((task, cancelling))
        for task, cancelling in expired:
            del calls[task]
            self._fired[task] = cancelling
            task.cancel()


def _accepts(method: Any, name: str) -> bool:
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class CheckpointIO:
    """The storage I/O of one manager's agents (one object per manager)."""

    def __init__(self, name: str, storage: Any, options: Options) -> None:
        self.name = name
        self.storage = storage
        self._codec = options.codec
        self._limit = options.max_state_bytes
        self._timeout = options.storage_timeout
        self._watchdog = None if self._timeout is None else _Watchdog(self._timeout)
        self.writer = secrets.token_hex(8)  # this manager instance, in every envelope it writes
        self._seq = 0
        self.fence: Fence | None = None  # set while a lease is held (see _lease.py)
        # the lease keeper's retake(): after a refused fence, take the lease again if nobody
        # else holds it; True when the write may be retried under the new fence
        self.retake: Callable[[BaseException], Awaitable[bool]] | None = None
        if storage is None:
            self._batch: Any = None
            self._fenced = self._timed = False
        else:
            save_many = getattr(storage, "save_many", None)
            self._batch = save_many if callable(save_many) and _defined_below(
                storage, "save_many", "save") else None
            self._fenced = _accepts(storage.save, "fence") and (
                self._batch is None or _accepts(self._batch, "fence"))
            # a due-time index, written by every kind of write we make (save_many too)
            self._timed = callable(getattr(storage, "due_keys", None)) and _accepts(storage.save, "due") and (
                self._batch is None or _accepts(self._batch, "due"))

    @property
    def fenced(self) -> bool:
        """Whether the backend takes ``fence=`` (it implements leases)."""
        return self._fenced

    def key(self, ref: AgentRef) -> str:
        """The storage key of ``ref``'s checkpoint."""
        return storage_key(self.name, ref._partition, ref._key)  # the ref's own identity

    # -- state <-> bytes ------------------------------------------------------------------------

    def encode_state(self, ref: AgentRef, agent: Agent) -> tuple[bytes, bytes, float | None, bytes]:
        """``(payload, meta, due, digest)`` of what ``ref``'s next checkpoint would hold: the
        codec's bytes, the timers' meta section and earliest due time, and the digest that
        tells whether it changed since the last write or thaw (``ref._digest``).

        Raises:
            CodecError: the state cannot be encoded.
        """
        payload = self._codec.encode(agent.state)
        meta, due = timer_part(ref)
        return payload, meta, due, digest(payload, meta)

    def encode_payload(self, agent: Agent) -> bytes:
        """The codec's bytes for ``agent.state`` (CodecError when it cannot be encoded)."""
        return self._codec.encode(agent.state)

    def envelope(self, agent: Agent, payload: bytes, meta: bytes = b"") -> tuple[bytes, int]:
        """``(checkpoint bytes, seq)``: the payload in an envelope naming this writer.

        Raises:
            CodecError: the checkpoint is over ``max_state_bytes``.
        """
        self._seq += 1
        seq = self._seq
        data = pack(type(agent).state_version, payload, writer=self.writer, seq=seq, meta=meta)
        limit = self._limit
        if limit is not None and len(data) > limit:
            raise CodecError(f"state encodes to {len(data)} bytes, over max_state_bytes={limit}")
        return data, seq

    def decode(self, agent: Agent, data: bytes) -> tuple[Any, bytes, bytes]:
        """``(state, payload, meta)`` of a checkpoint, migrated to the agent's state_version.

        Raises:
            ThawError: written by a newer state_version.
            CodecError: corrupt, truncated, or not decodable into ``state_type``.
        """
        env = unpack(data)
        cls = type(agent)
        current = cls.state_version
        if env.state_version > current:
            raise ThawError(
                f"checkpoint was written by state_version {env.state_version}, newer than this "
                f"code's {current}"
            )
        codec, state_type, loose = self._codec, cls.state_type, cls.allow_dropped_fields
        if env.state_version == current:
            return decode_state(codec, env.payload, state_type, loose), env.payload, env.meta
        migrated = agent.migrate(codec.decode(env.payload), env.state_version)
        if state_type is not None:
            migrated = decode_state(codec, codec.encode(migrated), state_type, loose)
        return migrated, env.payload, env.meta

    # -- thaw -----------------------------------------------------------------------------------

    async def load(self, skey: str) -> Any:
        """``storage.load(skey)`` within ``storage_timeout`` (one timer for all loads)."""
        watchdog = self._watchdog
        if watchdog is None:
            return await self.storage.load(skey)
        task = watchdog.begin()
        try:
            checkpoint = await self.storage.load(skey)
        except BaseException as exc:
            watchdog.end(task, exc)
            raise
        watchdog.end(task, None)
        return checkpoint

    async def thaw(self, ref: AgentRef, agent: Agent) -> tuple[bool, bytes]:
        """Put the checkpointed state into ``agent``: ``(thawed, meta)``; False when none.

        Raises:
            ThawError: a checkpoint exists but cannot be restored (or storage failed);
                nothing was changed in storage.
        """
        try:
            checkpoint = await self.load(self.key(ref))
        except Exception as exc:
            raise ThawError(
                f"{self.name}: could not load the checkpoint of key {ref.key!r}: {exc!r}"
            ) from exc
        if checkpoint is None:
            return False, b""
        try:
            version = checkpoint.version
            if type(version) is not int:
                raise StorageError(f"storage returned version {version!r}, not an int")
            state, payload, meta = self.decode(agent, checkpoint.data)
        except Exception as exc:
            raise ThawError(
                f"{self.name}: the checkpoint of key {ref.key!r} cannot be restored "
                f"(left as it is): {exc}"
            ) from exc
        agent.state = state
        ref._version = version  # the ref's checkpoint slots belong to this module
        ref._digest = digest(payload, meta)
        return True, meta

    # -- writes ---------------------------------------------------------------------------------

    async def save_batch(self, items: Sequence[SaveItem], due: Sequence[float | None] | None = None,
                         *, timeout: float | None = None) -> list[int | BaseException]:
        """Write ``items`` (one compare-and-set each); one result per item, errors mapped.

        ``timeout`` (seconds) bounds the whole batch further than ``storage_timeout``
        (close's deadline). A fence refusal fails every item with LeaseLost.
        """
        limit = self._timeout if timeout is None else (
            timeout if self._timeout is None else min(timeout, self._timeout))
        try:
            for attempt in (1, 2):
                try:
                    if limit is None:
                        results = await self._save(items, due)
                    else:
                        async with asyncio.timeout(max(limit, 0.0)):
                            results = await self._save(items, due)
                    break
                except LeaseLost as exc:
                    # nothing was written; once, when the lease is ours again, write again
                    if attempt == 2 or self.retake is None or not await self.retake(exc):
                        raise
            if len(results) != len(items):
                raise StorageError(f"save_many returned {len(results)} results for {len(items)} items")
        except LeaseLost as exc:
            results = [exc] * len(items)
        except Exception as exc:  # noqa: BLE001  # a backend may raise anything: mapped to StorageError per item (SPEC §7)
            results = [storage_error(exc)] * len(items)
        return [storage_error(r) if isinstance(r, BaseException) else r for r in results]

    async def _save(self, items: Sequence[SaveItem],
                    due: Sequence[float | None] | None) -> list[int | BaseException]:
        """One batch through ``save_many``, or ``save`` per item (64 in flight) when the backend
        has none that honours its ``save``; a fence refusal of any item raises LeaseLost."""
        storage, kwargs = self.storage, self._write_kwargs(due)
        batch = self._batch
        if batch is not None:
            if kwargs:
                return list(await batch(items, **kwargs))
            return list(await batch(items))
        if not self._timed:
            due = None  # a backend without a due-time index is never given due=
        if len(items) == 1:
            item = items[0]
            one = kwargs if due is None else {**kwargs, "due": due[0]}
            return [await storage.save(item.key, item.data, expected_version=item.expected_version, **one)]
        results: list[int | BaseException] = []
        for start in range(0, len(items), _FALLBACK_CHUNK):
            chunk = items[start:start + _FALLBACK_CHUNK]
            calls = []
            for i, it in enumerate(chunk):
                one = kwargs if due is None else {**kwargs, "due": due[start + i]}
                calls.append(storage.save(it.key, it.data, expected_version=it.expected_version, **one))
            results.extend(await asyncio.gather(*calls, return_exceptions=True))
        lost = next((r for r in results if isinstance(r, LeaseLost)), None)
        if lost is not None:
            raise lost
        return results

    def _write_kwargs(self, due: Sequence[float | None] | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._fenced and self.fence is not None:
            kwargs["fence"] = self.fence
        if due is not None and self._timed and self._batch is not None:
            kwargs["due"] = due
        return kwargs

    @property
    def keeps_timers(self) -> bool:
        """Whether the backend has a due-time index (``due=`` on writes, ``due_keys``)."""
        return self._timed

    # -- lost replies ---------------------------------------------------------------------------

    @staticmethod
    def remember_unsure(ref: AgentRef, seq: int) -> None:
        """Write ``seq`` failed without a conflict: it may have landed with its reply lost."""
        x = ref._rare()
        unsure = x.unsure
        if unsure is None:
            unsure = x.unsure = set()
        if len(unsure) < _UNSURE_MAX:
            unsure.add(seq)

    async def resave_after_lost_reply(self, ref: AgentRef, item: SaveItem, conflict: ConflictError,
                                      due: float | None = None) -> int | BaseException:
        """A conflict after a failed write: was the stored checkpoint ours, its reply lost?

        It is ours only when its envelope names this writer and one of our unsure
        sequence numbers; then adopt its version and write ``item`` again on top of it.
        Anything else is another incarnation's write, and the conflict stands.
        """
        x = ref._x
        if isinstance(conflict, LeaseLost) or x is None or not x.unsure:
            return conflict
        try:
            checkpoint = await self.load(item.key)
        except Exception as exc:  # noqa: BLE001  # a backend may raise anything: the conflict check fails as StorageError
            return storage_error(exc)
        if checkpoint is None or type(checkpoint.version) is not int:
            return conflict
        try:
            ident = peek_writer(checkpoint.data)
        except CodecError:
            return conflict
        if ident is None or ident[0] != self.writer or ident[1] not in x.unsure:
            return conflict
        logger.info("keyhive: %s: key %r: an earlier write had landed (its reply was lost); "
                    "writing again on top of it", self.name, ref.key)
        ref._version = checkpoint.version
        x.unsure = None  # older than the adopted version now
        resave = [SaveItem(item.key, item.data, checkpoint.version)]
        return (await self.save_batch(resave, None if due is None else [due]))[0]
