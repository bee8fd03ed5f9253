"""InstanceManager: the registry, single-flight activation, hibernation and the drain."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import os
import types
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ._agent import Agent
from ._errors import (
    AgentStopped,
    CodecError,
    ConflictError,
    ManagerClosed,
    NotFound,
    StorageError,
    ThawError,
    UnsavedAgentsError,
)
from ._events import Event, EventKind, StopReason
from ._keys import SAFE_STR_LEN, check_key, is_plain_key, storage_key
from ._ref import RUNNING, STARTING, STOPPED, STOPPING, AgentRef
from ._timer import DeadlineWheel
from .codecs import Codec, JSONCodec, pack, unpack
from .storage import SaveItem, default_storage, from_url, is_storage

__all__ = ["InstanceManager", "Stats", "get_manager"]

logger = logging.getLogger("keyhive")

_running: dict[str, InstanceManager] = {}
_closing: dict[str, InstanceManager] = {}  # still draining: its agents are live until saved
_OMITTED: Any = object()
_NEW, _OPEN, _CLOSING, _CLOSED = "new", "running", "closing", "closed"
_REAP_IN_FLIGHT = 4  # hibernate batches written at once by the reaper


def get_manager(name: str) -> InstanceManager:
    """The running manager called ``name``.

    Raises:
        NotFound: no manager of that name is running in this process.
    """
    try:
        return _running[name]
    except KeyError:
        raise NotFound(f"no running manager named {name!r}") from None


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of a manager, for one partition (``count``, ``keys``) and in total."""

    count: int
    keys: list[Any]
    partition: Any = None
    total: int = 0
    attached: int = 0
    registry_partitions: int = 1
    running: bool = False
    counters: dict[str, int] = field(default_factory=dict)


def _seconds(value: object, what: str, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be seconds (int, float or timedelta), not {type(value).__name__}")
    if value != value:
        raise ValueError(f"{what} must be a number of seconds, not NaN")
    return float(value)


class InstanceManager:
    """One live agent per key: started on demand, hibernated when idle, thawed on ``get``.

    Use it as ``async with manager:``; on exit every live agent hibernates, then stops.
    See SPEC §2 for the options; the extras are:

    * ``codec``: how states become bytes (default :class:`keyhive.codecs.JSONCodec`);
    * ``max_state_bytes``: refuse to write bigger checkpoints (``CodecError``);
    * ``close_timeout``: how long ``close`` keeps trying to save agents;
    * ``calls_touch``: make ``call``/``cast`` restart the idle timer like ``touch``;
    * ``hibernate_batch``: how many checkpoints go to storage in one batch;
    * ``retry_backoff``: ``(first, max)`` seconds between hibernate retries;
    * ``timer_resolution``: idle deadlines are rounded up to this many seconds.
    """

    def __new__(cls, *args: Any, runtime: Any = None, **kwargs: Any) -> InstanceManager:
        """``runtime=None`` is this class; a runtime object (``keyhive.ray.RayRuntime``) picks
        the manager class that serves the same API from other processes."""
        if runtime is None:
            return super().__new__(cls)
        manager_type = getattr(runtime, "manager_type", None)
        if not callable(manager_type):
            raise TypeError(
                f"runtime must be a keyhive runtime such as keyhive.ray.RayRuntime(address='auto'), "
                f"or None for this process; got {type(runtime).__name__}"
            )
        sub = manager_type()
        if not (isinstance(sub, type) and issubclass(sub, cls)):
            raise TypeError(
                f"{type(runtime).__name__}.manager_type() must return an InstanceManager subclass"
            )
        return super().__new__(sub)

    def __init__(
        self,
        name: str,
        agent: type[Agent],
        *,
        runtime: Any = None,
        idle_timeout: float | timedelta | None = None,
        storage: Any = _OMITTED,
        registry_partitions: int | None = None,
        partition: Any = None,
        agent_opts: Mapping[str, Any] | None = None,
        codec: Codec | None = None,
        max_state_bytes: int | None = None,
        close_timeout: float | timedelta = 30.0,
        calls_touch: bool = False,
        hibernate_batch: int = 512,
        retry_backoff: tuple[float, float] = (0.5, 30.0),
        timer_resolution: float = 0.01,
    ) -> None:
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        if not name:
            raise ValueError("name must not be empty, e.g. InstanceManager('sessions', MyAgent)")
        if not (isinstance(agent, type) and issubclass(agent, Agent)):
            raise TypeError(f"agent must be a keyhive.Agent subclass, not {agent!r}")
        if agent.handle is Agent.handle:
            raise TypeError(f"{agent.__name__} must define async def handle(self, message)")
        if not inspect.iscoroutinefunction(agent.handle):
            raise TypeError(f"{agent.__name__}.handle must be 'async def', not a plain function")
        if not isinstance(agent.state_version, int) or agent.state_version < 1:
            raise ValueError(f"{agent.__name__}.state_version must be an int >= 1")
        timeout = _seconds(idle_timeout, "idle_timeout")
        self._idle_timeout = timeout if timeout is not None and timeout > 0 else None

        if registry_partitions is None:
            registry_partitions = os.cpu_count() or 1
        if isinstance(registry_partitions, bool) or not isinstance(registry_partitions, int) \
                or registry_partitions < 1:
            raise ValueError(f"registry_partitions must be a positive int, not {registry_partitions!r}")
        self.registry_partitions = registry_partitions

        if partition is not None:
            check_key(partition, "partition")
        self.partition = partition

        if agent_opts is None:
            agent_opts = {}
        if not isinstance(agent_opts, Mapping):
            raise TypeError(f"agent_opts must be a mapping, not {type(agent_opts).__name__}")
        self.agent_opts: Mapping[str, Any] = types.MappingProxyType(dict(agent_opts))

        if codec is None:
            codec = JSONCodec()
        elif not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
            raise TypeError(f"codec must have encode() and decode(), not {codec!r}")
        self._codec = codec
        if max_state_bytes is not None and (
            isinstance(max_state_bytes, bool) or not isinstance(max_state_bytes, int) or max_state_bytes < 1
        ):
            raise ValueError(f"max_state_bytes must be a positive int or None, not {max_state_bytes!r}")
        self._max_state_bytes = max_state_bytes  # checked on every hibernate
        close_s = _seconds(close_timeout, "close_timeout", allow_none=False)
        assert close_s is not None
        if close_s < 0:
            raise ValueError("close_timeout must be >= 0 seconds")
        self._close_timeout = close_s
        self._calls_touch = bool(calls_touch)
        if isinstance(hibernate_batch, bool) or not isinstance(hibernate_batch, int) or hibernate_batch < 1:
            raise ValueError(f"hibernate_batch must be a positive int, not {hibernate_batch!r}")
        self._batch = hibernate_batch
        try:
            first, cap = (float(x) for x in retry_backoff)
        except (TypeError, ValueError):
            raise TypeError("retry_backoff must be (first_seconds, max_seconds)") from None
        if not 0 < first <= cap:
            raise ValueError(
                f"retry_backoff must be (first, max) with 0 < first <= max, not {retry_backoff!r}"
            )
        self._backoff = (first, cap)
        res = _seconds(timer_resolution, "timer_resolution", allow_none=False)
        assert res is not None
        if res <= 0:
            raise ValueError("timer_resolution must be > 0 seconds")
        self._resolution = res

        # storage: a backend object, a URL (the manager owns what it builds), or None
        self._storage_url: str | None = None
        if storage is _OMITTED:
            storage = default_storage()
        elif isinstance(storage, str):
            self._storage_url = storage
            storage = from_url(storage)  # validates now; connects on first use
        elif storage is not None and not is_storage(storage):
            raise TypeError(
                f"storage must be a keyhive.Storage, a URL such as 'sqlite:///agents.db', or None; "
                f"got {type(storage).__name__}"
            )
        self._storage: Any = storage

        self.name = name
        self.agent: type[Agent] = agent
        # hooks the agent class leaves as the base's no-ops are not run (no coroutine to make)
        self._runs_on_start = agent.on_start is not Agent.on_start
        self._runs_on_hibernate = agent.on_hibernate is not Agent.on_hibernate
        self._runs_on_stop = agent.on_stop is not Agent.on_stop
        self._custom_state = agent.initial_state is not Agent.initial_state or agent.state_type is not None
        self._state = _NEW
        self._regs: dict[Any, dict[Any, AgentRef]] = {}
        self._default_reg: dict[Any, AgentRef] = {}
        # a tuple, replaced on (un)subscribe: emitting iterates it without a copy
        self._listeners: tuple[Callable[[Event], None], ...] = ()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retries: set[asyncio.TimerHandle] = set()
        self._expiring: list[tuple[AgentRef, StopReason, bool]] = []
        self._reaper: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._wheel: DeadlineWheel = None  # type: ignore[assignment]  # set by start()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._counters = dict.fromkeys(
            ("started", "thawed", "hibernated", "hibernate_failures", "thaw_failures", "stopped"), 0
        )

    def __repr__(self) -> str:
        return f"<InstanceManager {self.name!r} agent={self.agent.__name__} {self._state}>"

    @property
    def idle_timeout(self) -> float | None:
        """Seconds before an unattached agent hibernates; ``None``: never."""
        return self._idle_timeout

    @property
    def storage(self) -> Any:
        """The storage backend, or ``None`` when hibernate/thaw is off."""
        return self._storage

    @property
    def running(self) -> bool:
        """Whether the manager is started and not closing."""
        return self._state is _OPEN

    # -- start and close -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the manager (``async with manager`` does this).

        Raises:
            ValueError: another running manager has the same name.
        """
        if self._state is _OPEN:
            return
        if self._state is _CLOSING:
            raise RuntimeError(f"manager {self.name!r} is still closing")
        if self.name in _running:
            raise ValueError(f"a manager named {self.name!r} is already running in this process")
        if self.name in _closing:
            raise ValueError(
                f"a manager named {self.name!r} is still closing in this process: await its close() "
                f"first, or a key could be live in both"
            )
        loop = asyncio.get_running_loop()
        if self._storage_url is not None and self._state is _CLOSED:
            self._storage = from_url(self._storage_url)
        self._loop = loop
        self._wheel = DeadlineWheel(loop, self._resolution, self._on_due)
        self._regs = {}
        self._default_reg = self._regs[self.partition] = {}
        self._state = _OPEN
        _running[self.name] = self

    async def __aenter__(self) -> InstanceManager:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Hibernate every live agent, then stop them all; shielded from cancellation.

        Raises:
            UnsavedAgentsError: some agents could not be saved before ``close_timeout``;
                their keys are listed. Everything else was saved.
        """
        if self._state is _NEW or (self._state is _CLOSED and self._closer is None):
            return
        if self._closer is None:
            self._closer = asyncio.get_running_loop().create_task(self._close())
        closer = self._closer
        await asyncio.shield(closer)

    aclose = close

    def _check_open(self) -> None:
        if self._state is not _OPEN:
            raise ManagerClosed(f"manager {self.name!r} is not running ({self._state})")

    # -- get and friends ----------------------------------------------------------------------

    async def get(self, key: Any, *, initial_state: Mapping[str, Any] | None = None,
                  partition: Any = None) -> AgentRef:
        """The live agent for ``key``: running, thawed from its checkpoint, or started fresh.

        Concurrent gets of one key share one thaw and one start.

        Raises:
            ThawError: a checkpoint exists but cannot be restored; nothing was started.
            TypeError, ValueError: the key is not a valid key.
            ManagerClosed: the manager is not running.
        """
        if partition is None and type(key) is str:
            reg = self._default_reg
            ref = reg.get(key)
            if ref is not None:
                if ref._status is RUNNING:
                    return ref
            elif initial_state is None and self._state is _OPEN and is_plain_key(key):
                return await self._activate(reg, key, self.partition, None)  # a valid key, not live
        return await self._get(key, initial_state, self.partition if partition is None else partition)

    async def _get(self, key: Any, initial_state: Mapping[str, Any] | None, partition: Any) -> AgentRef:
        self._check_open()
        check_key(key)
        if initial_state is not None and not isinstance(initial_state, Mapping):
            raise TypeError(f"initial_state must be a mapping, not {type(initial_state).__name__}")
        reg = self._registry(partition, create=True)
        assert reg is not None
        while True:
            ref = reg.get(key)
            if ref is None:
                return await self._activate(reg, key, partition, initial_state)
            if ref._status is RUNNING:
                return ref
            await ref._changed()  # starting or stopping: wait, then look again
            self._check_open()

    def _registry(self, partition: Any, *, create: bool) -> dict[Any, AgentRef] | None:
        reg = self._regs.get(partition)
        if reg is None:
            if partition is not None:
                check_key(partition, "partition")
            if create:
                reg = self._regs[partition] = {}
        return reg

    async def lookup(self, key: Any, *, partition: Any = None) -> AgentRef | None:
        """The live agent for ``key``, or ``None``; never starts or thaws anything."""
        if (partition is None and type(key) is str and self._state is _OPEN
                and len(key) <= SAFE_STR_LEN and key.isascii()):  # is_plain_key(), inlined: 27 ns
            ref = self._default_reg.get(key)  # a valid key of the default partition
            return None if ref is None or ref._status is STARTING else ref
        self._check_open()
        check_key(key)
        reg = self._registry(self.partition if partition is None else partition, create=False)
        ref = None if reg is None else reg.get(key)
        if ref is None or ref._status is STARTING:
            return None
        return ref

    async def call(self, key: Any, message: Any, *, timeout: float | None = 5.0,
                   partition: Any = None) -> Any:
        """``get(key)`` then ``ref.call(message)``, getting again once if the agent stopped between."""
        ref = self._default_reg.get(key) if partition is None and type(key) is str else None
        if ref is None or ref._status is not RUNNING:  # else: what get() would return, inlined
            ref = await self.get(key, partition=partition)
        try:
            return await ref.call(message, timeout=timeout)
        except AgentStopped:
            if ref.alive:
                raise
        ref = await self.get(key, partition=partition)
        return await ref.call(message, timeout=timeout)

    @asynccontextmanager
    async def attach(self, key: Any, *, partition: Any = None) -> AsyncIterator[AgentRef]:
        """``async with manager.attach(key) as ref``: the agent stays alive inside the block."""
        ref = await self.get(key, partition=partition)
        owner = object()
        await ref.attach(owner)
        try:
            yield ref
        finally:
            await ref.detach(owner)

    async def stop(self, key: Any, *, partition: Any = None) -> None:
        """Stop the agent for ``key``: when this returns, ``on_stop`` ran and the checkpoint is written.

        Stops even while attached.

        Raises:
            NotFound: no live agent for ``key``.
            StorageError: the checkpoint could not be written; the agent keeps running.
            ConflictError: newer state is stored; the agent keeps running.
        """
        self._check_open()
        check_key(key)
        reg = self._registry(self.partition if partition is None else partition, create=False)
        waited = False
        while True:
            ref = None if reg is None else reg.get(key)
            if ref is None:
                if waited:
                    return  # it stopped (and saved) while we waited
                raise NotFound(f"no live agent for key {key!r} in manager {self.name!r}")
            if ref._status is STARTING:
                with contextlib.suppress(Exception):  # a failed start: look again
                    await ref._changed()
                continue
            try:
                await ref._acquire()
            except Exception:  # AgentStopped: it stopped while we waited for its turn
                waited = True
                continue
            if ref._status is not RUNNING:  # stopped by someone else meanwhile
                ref._release()
                waited = True
                continue
            ref._status = STOPPING
            task = self._spawn(self._hibernate([ref], StopReason.STOPPED))
            try:
                errors = await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and current is not None and not current.cancelling():
                    # close gave up on this write at its deadline; our caller was not cancelled
                    raise ManagerClosed(
                        f"manager {self.name!r} closed before the checkpoint of key {key!r} was written"
                    ) from None
                raise
            if errors[0] is not None:
                raise errors[0]
            return

    async def stats(self, *, partition: Any = None) -> Stats:
        """Live agents of one partition (``count``, ``keys``) and of the whole manager.

        Awaited like every manager call, so that a runtime in other processes can serve it.
        """
        reg = self._registry(self.partition if partition is None else partition, create=False)
        keys = [] if reg is None else [k for k, r in reg.items() if r._status is not STARTING]
        total = attached = 0
        for r in self._iter_refs():
            total += 1
            attached += r._owners is not None
        return Stats(
            count=len(keys), keys=keys, partition=partition, total=total, attached=attached,
            registry_partitions=self.registry_partitions, running=self._state is _OPEN,
            counters=dict(self._counters),
        )

    async def agents(self) -> list[AgentRef]:
        """Every live agent of every partition (for dashboards and tools)."""
        return list(self._iter_refs())

    def _iter_refs(self) -> Any:
        for reg in self._regs.values():
            for ref in reg.values():
                if ref._status is not STARTING:
                    yield ref

    # -- events -------------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` for every lifecycle event; returns the unsubscribe function.

        Callbacks run synchronously in the loop: keep them short (hand work to a queue).
        An exception in a callback is logged and does not reach the manager.
        """
        if not callable(callback):
            raise TypeError("subscribe() takes a callable")
        self._listeners = (*self._listeners, callback)

        def unsubscribe() -> None:
            listeners = list(self._listeners)
            if callback in listeners:
                listeners.remove(callback)
                self._listeners = tuple(listeners)

        return unsubscribe

    def _emit(self, kind: EventKind, ref: AgentRef, reason: StopReason | None = None,
              error: BaseException | None = None) -> None:
        loop = self._loop
        event = Event(kind, self.name, ref._key, ref._partition,
                      loop.time() if loop is not None else 0.0, reason, error)
        for callback in self._listeners:
            try:
                callback(event)
            except Exception:
                logger.exception("keyhive: %s: event callback %r failed", self.name, callback)

    # -- activation -----------------------------------------------------------------------------

    async def _activate(self, reg: dict[Any, AgentRef], key: Any, partition: Any,
                        initial_state: Mapping[str, Any] | None) -> AgentRef:
        ref = AgentRef(self, key, partition)
        reg[key] = ref
        try:
            agent = self.agent()
            agent._ref = ref
            ref._agent = agent
            thawed = self._storage is not None and await self._thaw(ref, agent)
            if not thawed:
                params = {} if initial_state is None else dict(initial_state)
                # the base class's initial_state is dict(params): params is that already
                agent.state = agent.initial_state(params) if self._custom_state else params
            if self._runs_on_start:
                await agent.on_start(thawed)
        except BaseException as exc:
            if reg.get(key) is ref:
                del reg[key]
            ref._status = STOPPED
            ref._stop_reason = StopReason.STOPPED
            ref._agent = None
            # a cancelled activation lets the waiters try again; a failed one fails them too
            ref._notify(exc if isinstance(exc, Exception) else None)
            raise
        ref._status = RUNNING
        wheel = self._wheel
        if ref.started(wheel.now(), self._idle_timeout):
            wheel.arm(ref, ref._deadline)  # type: ignore[arg-type]
        self._counters["thawed" if thawed else "started"] += 1
        if self._listeners:
            self._emit(EventKind.THAWED if thawed else EventKind.STARTED, ref)
        if ref._change is not None:
            ref._notify()
        if ref._stop_req is not None:  # on_start called self.stop()
            reason, ref._stop_req = ref._stop_req, None
            ref._request_stop(reason)
        return ref

    async def _thaw(self, ref: AgentRef, agent: Agent) -> bool:
        """Put the checkpointed state into ``agent``; False when there is no checkpoint."""
        skey = storage_key(self.name, ref._partition, ref._key)
        try:
            checkpoint = await self._storage.load(skey)
        except Exception as exc:
            self._thaw_failed(ref, exc)
            raise ThawError(
                f"{self.name}: could not load the checkpoint of key {ref._key!r}: {exc!r}"
            ) from exc
        if checkpoint is None:
            return False
        try:
            agent.state = self._decode(agent, checkpoint.data)
            version = checkpoint.version
            if type(version) is not int:
                raise StorageError(f"storage returned version {version!r}, not an int")
        except Exception as exc:
            self._thaw_failed(ref, exc)
            raise ThawError(
                f"{self.name}: the checkpoint of key {ref._key!r} cannot be restored "
                f"(left as it is): {exc}"
            ) from exc
        ref._version = version
        return True

    def _thaw_failed(self, ref: AgentRef, exc: BaseException) -> None:
        self._counters["thaw_failures"] += 1
        logger.error("keyhive: %s: thaw of key %r failed: %r", self.name, ref._key, exc)
        if self._listeners:
            self._emit(EventKind.THAW_FAILED, ref, error=exc)

    def _decode(self, agent: Agent, data: bytes) -> Any:
        version, payload = unpack(data)[:2]  # the Envelope's writer, seq and meta: not used here yet
        current = type(agent).state_version
        if version > current:
            raise ThawError(
                f"checkpoint was written by state_version {version}, newer than this code's {current}"
            )
        codec, state_type = self._codec, type(agent).state_type
        if version == current:
            return codec.decode(payload, state_type)
        migrated = agent.migrate(codec.decode(payload), version)
        if state_type is None:
            return migrated
        return codec.decode(codec.encode(migrated), state_type)

    def _encode(self, agent: Agent) -> bytes:
        data = pack(type(agent).state_version, self._codec.encode(agent.state))
        limit = self._max_state_bytes
        if limit is not None and len(data) > limit:
            raise CodecError(f"state encodes to {len(data)} bytes, over max_state_bytes={limit}")
        return data

    # -- hibernation ----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _on_due(self, refs: list[Any]) -> None:
        """The wheel found these agents past their idle deadline."""
        expiring = self._expiring
        for ref in refs:
            if ref._status is RUNNING:
                expiring.append((ref, StopReason.IDLE_TIMEOUT, False))
        self._kick_reaper()

    def _begin_self_stop(self, ref: AgentRef) -> bool:
        """``agent.stop()`` takes effect at the end of a turn: keep the turn for the stop.

        While the manager closes, the drain stops the agent instead (False).
        """
        if self._state is not _OPEN:
            return False
        ref._status = STOPPING
        # Whatever reason the agent gave, a self-stop saves, fails and retries as NORMAL;
        # _finish reports the reason it asked for (kept in _stop_req until then).
        self._expiring.append((ref, StopReason.NORMAL, True))
        self._kick_reaper()
        return True

    def _kick_reaper(self) -> None:
        if self._reaper is None and self._expiring and self._state is _OPEN:
            self._reaper = self._spawn(self._reap())

    async def _reap(self) -> None:
        """Hibernate agents that idled out or stopped themselves, in batches.

        Up to ``_REAP_IN_FLIGHT`` batches are written at once, so that the loop prepares
        the next batch (hooks, encoding) while storage writes the last one.
        """
        in_flight: set[asyncio.Task[Any]] = set()
        try:
            while self._expiring and self._state is _OPEN:
                batch = self._expiring[: self._batch]
                del self._expiring[: self._batch]
                now = self._wheel.now()
                ready: dict[StopReason, list[AgentRef]] = {}
                for ref, reason, held in batch:
                    if not held:
                        if not self._stop_wanted(ref, reason, now):
                            continue
                        if ref._busy:
                            self._spawn(self._stop_when_free(ref, reason))
                            continue
                        ref._busy = True
                        self._begin_stop(ref, reason)
                    ready.setdefault(reason, []).append(ref)
                for reason, refs in ready.items():
                    if len(in_flight) >= _REAP_IN_FLIGHT:
                        _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    in_flight.add(self._spawn(self._hibernate(refs, reason)))
                if not self._expiring and in_flight:  # let the last batches land before leaving
                    _, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            if in_flight:
                await asyncio.wait(in_flight)
        finally:
            self._reaper = None
            if self._expiring and self._state is _OPEN:
                self._kick_reaper()

    def _still_due(self, ref: AgentRef, now: float) -> bool:
        """Whether an agent the wheel found due is still due; if not, file it again.

        The loop runs a slot's timer up to its clock resolution early, and the wheel judges
        by the slot's time: judge with the same slack, or an agent found due there is found
        not due here and, with nothing re-arming it, never idles out again.
        """
        if ref.is_due(now + self._resolution):
            return True
        if ref._deadline is not None and ref._owners is None:
            self._wheel.arm(ref, ref._deadline)
        return False

    async def _stop_when_free(self, ref: AgentRef, reason: StopReason) -> None:
        try:
            await ref._acquire()
        except Exception:
            return  # stopped meanwhile
        if self._state is not _OPEN or not self._stop_wanted(ref, reason, self._wheel.now()):
            ref._release()
            return
        self._begin_stop(ref, reason)
        await self._hibernate([ref], reason)

    def _stop_wanted(self, ref: AgentRef, reason: StopReason, now: float) -> bool:
        """Whether a queued stop still applies: the agent runs and, for an idle stop, is due."""
        return ref._status is RUNNING and (
            reason is not StopReason.IDLE_TIMEOUT or self._still_due(ref, now)
        )

    def _begin_stop(self, ref: AgentRef, reason: StopReason) -> None:
        """We hold the agent's turn: it is stopping now (a self-stop is STOPPING already)."""
        ref._status = STOPPING
        if reason is StopReason.IDLE_TIMEOUT and self._listeners:
            self._emit(EventKind.IDLE, ref, reason)

    async def _hibernate(self, refs: Sequence[AgentRef], reason: StopReason) -> list[BaseException | None]:
        """Save and stop agents whose turns we hold (status STOPPING); one result each.

        Failed ones are put back to running (their turns released) and retried as the
        reason calls for; the returned errors say which.
        """
        errors: list[BaseException | None] = [None] * len(refs)
        storage = self._storage
        if storage is not None:
            items: list[SaveItem] = []
            index: list[int] = []
            for i, ref in enumerate(refs):
                agent = ref._agent
                assert agent is not None
                try:
                    if self._runs_on_hibernate:
                        await agent.on_hibernate()
                    data = self._encode(agent)
                except Exception as exc:
                    errors[i] = exc
                    continue
                items.append(SaveItem(storage_key(self.name, ref._partition, ref._key), data, ref._version))
                index.append(i)
            if items:
                results = await self._save_many(storage, items)
                for i, item, result in zip(index, items, results, strict=True):
                    ref = refs[i]
                    if not isinstance(result, BaseException):
                        ref._version = result
                        ref._unsure = None
                        continue
                    if isinstance(result, ConflictError) and ref._unsure:
                        result = await self._resave_after_lost_reply(storage, ref, item, result)
                        if not isinstance(result, BaseException):
                            ref._version = result
                            ref._unsure = None
                            continue
                    elif not isinstance(result, ConflictError):
                        _remember_unsure(ref, item.data)
                    errors[i] = result
        for i, ref in enumerate(refs):
            error = errors[i]
            if error is None:
                await self._finish(ref, reason, saved=storage is not None)
            else:
                await self._hibernate_failed(ref, reason, error)
        return errors

    async def _resave_after_lost_reply(self, storage: Any, ref: AgentRef,
                                       item: SaveItem, conflict: ConflictError) -> int | BaseException:
        """A conflict after a failed write: was that write ours, landed with its reply lost?

        When the stored bytes are exactly those of one of our failed writes since the last
        version we know (they all expected that version, so at most one landed), the stored
        version is ours: adopt it and write again. Anything else is another incarnation's
        newer state, and the conflict stands.
        """
        try:
            checkpoint = await storage.load(item.key)
        except Exception as exc:
            return _storage_error(exc)
        if checkpoint is None or type(checkpoint.version) is not int \
                or _digest(checkpoint.data) not in (ref._unsure or ()):
            return conflict
        logger.info("keyhive: %s: key %r: an earlier write had landed (its reply was lost); "
                    "writing again on top of it", self.name, ref._key)
        ref._version = checkpoint.version
        ref._unsure = None  # older than the adopted version now
        result = (await self._save_many(storage, [SaveItem(item.key, item.data, checkpoint.version)]))[0]
        if isinstance(result, BaseException) and not isinstance(result, ConflictError):
            _remember_unsure(ref, item.data)
        return result

    async def _save_many(self, storage: Any, items: list[SaveItem]) -> list[int | BaseException]:
        save_many = getattr(storage, "save_many", None)
        try:
            if save_many is not None:
                results: list[int | BaseException] = list(await save_many(items))
                if len(results) != len(items):
                    raise StorageError(
                        f"save_many returned {len(results)} results for {len(items)} items"
                    )
            elif len(items) == 1:
                item = items[0]
                results = [await storage.save(item.key, item.data, expected_version=item.expected_version)]
            else:
                results = []
                for start in range(0, len(items), 64):
                    chunk = items[start:start + 64]
                    results.extend(await asyncio.gather(
                        *(storage.save(it.key, it.data, expected_version=it.expected_version)
                          for it in chunk),
                        return_exceptions=True,
                    ))
        except Exception as exc:
            results = [exc] * len(items)
        return [_storage_error(r) if isinstance(r, BaseException) else r for r in results]

    async def _finish(self, ref: AgentRef, reason: StopReason, *, saved: bool) -> None:
        """The checkpoint is written (or storage is off): run on_stop and unregister."""
        if reason is StopReason.NORMAL and ref._stop_req is not None:
            reason = ref._stop_req  # a self-stop: the reason the agent gave
        agent = ref._agent
        if agent is not None and self._runs_on_stop:
            try:
                await agent.on_stop(reason)
            except Exception:
                logger.exception("keyhive: %s: on_stop of key %r failed", self.name, ref._key)
        reg = self._regs.get(ref._partition)
        if reg is not None and reg.get(ref._key) is ref:
            del reg[ref._key]
        ref._status = STOPPED
        ref._stop_reason = reason
        ref._stop_req = None
        ref._agent = None
        for owner in ref.clear():
            if isinstance(owner, asyncio.Task):
                owner.remove_done_callback(ref._owner_done)
        if ref._waiters is not None:
            ref._fail_waiters()
        ref._busy = False
        counters = self._counters
        counters["stopped"] += 1
        if saved:
            counters["hibernated"] += 1
        if self._listeners:
            if saved:
                self._emit(EventKind.HIBERNATED, ref, reason)
            self._emit(EventKind.STOPPED, ref, reason)
        if ref._change is not None:
            ref._notify()

    async def _hibernate_failed(self, ref: AgentRef, reason: StopReason, error: BaseException) -> None:
        self._counters["hibernate_failures"] += 1
        if self._listeners:
            self._emit(EventKind.HIBERNATE_FAILED, ref, reason, error)
        if isinstance(error, ConflictError) and reason in (StopReason.IDLE_TIMEOUT, StopReason.NORMAL):
            # Retrying cannot win and overwriting would lose the newer state: stop this one.
            logger.error("keyhive: %s: key %r: newer state is stored by another incarnation; "
                         "this one stops without saving: %s", self.name, ref._key, error)
            await self._finish(ref, StopReason.CONFLICT, saved=False)
            return
        ref._status = RUNNING
        ref._failures += 1
        if reason is not StopReason.IDLE_TIMEOUT and self._state is _OPEN \
                and ref._deadline is not None and ref._owners is None:
            # The wheel drops an agent it finds STOPPING; if its idle deadline passed
            # during this failed save, file it again or it never idles out.
            self._wheel.arm(ref, ref._deadline)
        if reason in (StopReason.IDLE_TIMEOUT, StopReason.NORMAL) and self._state is _OPEN:
            first, cap = self._backoff
            delay = min(cap, first * 2 ** min(ref._failures - 1, 30))
            log = logger.warning
            if isinstance(error, CodecError):
                log = logger.debug if ref._codec_logged else logger.warning
                ref._codec_logged = True
            log("keyhive: %s: hibernate of key %r failed (attempt %d), agent kept alive, "
                "retry in %.1fs: %r", self.name, ref._key, ref._failures, delay, error)
            if reason is StopReason.IDLE_TIMEOUT:
                ref.postponed(self._wheel.now() + delay)
                self._wheel.arm(ref, ref._deadline)  # type: ignore[arg-type]
            else:
                # Asked again when the retry is due; until then turns end as usual.
                requested = ref._stop_req or reason
                ref._stop_req = None
                handle = asyncio.get_running_loop().call_later(delay, self._retry_self_stop, ref, requested)
                self._retries.add(handle)
        if reason is not StopReason.SHUTDOWN:
            ref._release()
        ref._notify()

    def _retry_self_stop(self, ref: AgentRef, reason: StopReason) -> None:
        self._retries = {h for h in self._retries if not h.cancelled() and h.when() > self._wheel.now()}
        if self._state is not _OPEN:
            return
        if ref._status is RUNNING:
            ref._request_stop(reason)
        elif ref._status is STOPPING and ref._stop_req is None:
            # Another hibernate (stop()) holds the turn: should it fail, the agent's own
            # stop is still pending and begins as that turn ends.
            ref._stop_req = reason

    # -- close ----------------------------------------------------------------------------------

    async def _close(self) -> None:
        self._state = _CLOSING
        if _running.get(self.name) is self:
            del _running[self.name]
        _closing[self.name] = self
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._close_timeout
        regs = self._regs
        self._default_reg = {}
        self._wheel.close()
        for handle in self._retries:
            handle.cancel()
        self._retries.clear()
        for ref, _, held in self._expiring:
            if held and ref._status is STOPPING:  # a self-stop not begun: the drain takes it
                ref._status = RUNNING
                ref._release()
        self._expiring.clear()
        unsaved: list[AgentRef] = []
        last_error: dict[AgentRef, BaseException] = {}
        try:
            if self._reaper is not None:
                await asyncio.wait([self._reaper], timeout=max(0.0, deadline - loop.time()))
            pending = [ref for reg in regs.values() for ref in reg.values()]
            attempt = 0
            while pending:
                pending = await self._drain_round(pending, deadline, last_error, unsaved)
                remaining = deadline - loop.time()
                if not pending or remaining <= 0:
                    break
                attempt += 1
                first, cap = self._backoff
                await asyncio.sleep(min(remaining, cap, first * 2 ** min(attempt - 1, 30)))
            for ref in pending:
                if ref._status is not STOPPED:
                    unsaved.append(ref)
                    await self._finish(ref, StopReason.UNSAVED, saved=False)
        finally:
            for task in list(self._tasks):
                if task is not asyncio.current_task() and not task.done():
                    task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks - {asyncio.current_task()}), timeout=1.0)
            self._regs = {}
            if self._storage_url is not None and self._storage is not None:
                try:
                    await self._storage.aclose()
                except Exception:
                    logger.exception("keyhive: %s: closing storage failed", self.name)
            self._state = _CLOSED
            self._closer = None
            if _closing.get(self.name) is self:
                del _closing[self.name]
        if unsaved:
            keys = [(ref._partition, ref._key) for ref in unsaved]
            shown = ", ".join(repr(k if p is None else (p, k)) for p, k in keys[:20])
            more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
            raise UnsavedAgentsError(
                f"manager {self.name!r} closed without saving {len(keys)} agents: {shown}{more}",
                keys, [last_error.get(ref) for ref in unsaved],
            )

    async def _drain_round(self, refs: list[AgentRef], deadline: float,
                           last_error: dict[AgentRef, BaseException],
                           unsaved: list[AgentRef]) -> list[AgentRef]:
        """Take the turn of every ref and hibernate them in batches; return the ones to retry.

        A conflict cannot succeed on retry: that agent stops at once (CONFLICT, newer
        state left in place) and goes to ``unsaved``.
        """
        loop = asyncio.get_running_loop()
        taken: list[AgentRef] = []
        waiting: list[AgentRef] = []
        for ref in refs:
            if ref._status is STOPPED:
                continue
            if ref._status is RUNNING and not ref._busy:
                ref._busy = True
                ref._status = STOPPING
                taken.append(ref)
            else:
                waiting.append(ref)
        if waiting:
            results = await asyncio.gather(
                *(self._take_for_close(ref, deadline) for ref in waiting), return_exceptions=True
            )
            leftovers = [ref for ref, ok in zip(waiting, results, strict=True) if ok is not True]
            taken.extend(ref for ref, ok in zip(waiting, results, strict=True) if ok is True)
        else:
            leftovers = []
        failed: list[AgentRef] = []
        for start in range(0, len(taken), self._batch):
            if loop.time() > deadline:
                for ref in taken[start:]:
                    ref._status = RUNNING
                failed.extend(taken[start:])
                break
            chunk = taken[start:start + self._batch]
            errors = await self._hibernate(chunk, StopReason.SHUTDOWN)
            for ref, error in zip(chunk, errors, strict=True):
                if error is None:
                    continue
                last_error[ref] = error
                if isinstance(error, ConflictError):
                    await self._finish(ref, StopReason.CONFLICT, saved=False)
                    unsaved.append(ref)
                else:
                    failed.append(ref)
        for ref in failed:  # keep the turn free for nobody: the next round takes it again
            if ref._status is RUNNING and ref._busy:
                ref._busy = False
        return [ref for ref in failed + leftovers if ref._status is not STOPPED]

    async def _take_for_close(self, ref: AgentRef, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while ref._status is STARTING:
            try:
                await asyncio.wait_for(ref._changed(), max(0.0, deadline - loop.time()))
            except Exception:
                return False
        if ref._status is STOPPED:
            return False
        try:
            await asyncio.wait_for(ref._acquire(), max(0.0, deadline - loop.time()))
        except Exception:
            return False
        if ref._status is not RUNNING:
            ref._release()
            return False
        ref._status = STOPPING
        return True


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _remember_unsure(ref: AgentRef, data: bytes) -> None:
    """A write of ``data`` failed: it may have landed with its reply lost; remember its digest."""
    unsure = ref._unsure
    if unsure is None:
        unsure = ref._unsure = set()
    if len(unsure) < 64:  # a bound for an agent whose writes fail for a very long time
        unsure.add(_digest(data))


def _storage_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StorageError):
        return exc
    if not isinstance(exc, Exception):
        return exc
    err = StorageError(f"storage failed: {exc!r}")
    err.__cause__ = exc
    return err

