"""Manager options and their validation: every mistake is a TypeError/ValueError at construction."""

from __future__ import annotations

import inspect
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ._agent import Agent
from ._keys import check_key
from .codecs import Codec, JSONCodec

__all__ = ["Options", "parse_options", "seconds"]


def seconds(value: object, what: str, *, allow_none: bool = True) -> float | None:
    """``value`` as float seconds (int, float or timedelta); ``None`` passes when allowed."""
    if value is None and allow_none:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be seconds (int, float or timedelta), not {type(value).__name__}")
    if value != value:
        raise ValueError(f"{what} must be a number of seconds, not NaN")
    return float(value)


def _positive_seconds(value: object, what: str, *, allow_none: bool) -> float | None:
    s = seconds(value, what, allow_none=allow_none)
    if s is not None and s <= 0:
        raise ValueError(f"{what} must be > 0 seconds{' or None' if allow_none else ''}, not {value!r}")
    return s


def _positive_int(value: object, what: str, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int{' or None' if allow_none else ''}, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Options:
    """The validated options of one manager (see :class:`keyhive.InstanceManager`)."""

    idle_timeout: float | None
    registry_partitions: int
    partition: Any
    agent_opts: Mapping[str, Any]
    codec: Codec
    max_state_bytes: int | None
    close_timeout: float
    calls_touch: bool
    hibernate_batch: int
    retry_backoff: tuple[float, float]
    timer_resolution: float
    storage_timeout: float | None
    turn_timeout: float | None
    checkpoint: str | float  # "idle", "turn" or write-behind seconds
    validate_state: bool
    lease_ttl: float
    lease_wait: float
    subscriber_buffer: int
    max_live: int | None
    checkpoint_ttl: float | None
    shard: int | None  # set by a runtime's shard host: lease (name, shard) instead of the namespace
    takeover: bool  # a shard host that Ray restarted takes its lease over at once
    timer_poll: float  # seconds between asks of the due-time index (durable timers)
    timer_retries: int  # failed deliveries of a timer retried before it is dropped
    shards: int | None  # set by a runtime's shard host with shard: how many shards there are

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1, 2, ...): doubling from first, capped."""
        first, cap = self.retry_backoff
        return float(min(cap, first * 2 ** min(max(attempt, 1) - 1, 30)))


def check_agent(agent: object) -> type[Agent]:
    """``agent`` as an Agent subclass with an ``async def handle``, or TypeError/ValueError."""
    if not (isinstance(agent, type) and issubclass(agent, Agent)):
        raise TypeError(f"agent must be a keyhive.Agent subclass, not {agent!r}")
    if agent.handle is Agent.handle:
        raise TypeError(f"{agent.__name__} must define async def handle(self, message)")
    if not inspect.iscoroutinefunction(agent.handle):
        raise TypeError(f"{agent.__name__}.handle must be 'async def', not a plain function")
    if not isinstance(agent.state_version, int) or agent.state_version < 1:
        raise ValueError(f"{agent.__name__}.state_version must be an int >= 1")
    return agent


def parse_options(
    *,
    idle_timeout: Any = None,
    registry_partitions: Any = None,
    partition: Any = None,
    agent_opts: Any = None,
    codec: Any = None,
    max_state_bytes: Any = None,
    close_timeout: Any = 30.0,
    calls_touch: Any = False,
    hibernate_batch: Any = 512,
    retry_backoff: Any = (0.5, 30.0),
    timer_resolution: Any = 0.01,
    storage_timeout: Any = 30.0,
    turn_timeout: Any = None,
    checkpoint: Any = "idle",
    validate_state: Any = False,
    lease_ttl: Any = 10.0,
    lease_wait: Any = 0.0,
    subscriber_buffer: Any = 1000,
    max_live: Any = None,
    checkpoint_ttl: Any = None,
    shard: Any = None,
    takeover: Any = False,
    timer_poll: Any = 1.0,
    timer_retries: Any = 5,
    shards: Any = None,
) -> Options:
    """Validate every manager option; the messages say what to write instead."""
    timeout = seconds(idle_timeout, "idle_timeout")
    if registry_partitions is None:
        registry_partitions = os.cpu_count() or 1
    if isinstance(registry_partitions, bool) or not isinstance(registry_partitions, int) \
            or registry_partitions < 1:
        raise ValueError(f"registry_partitions must be a positive int, not {registry_partitions!r}")
    if partition is not None:
        check_key(partition, "partition")
    if agent_opts is None:
        agent_opts = {}
    if not isinstance(agent_opts, Mapping):
        raise TypeError(f"agent_opts must be a mapping, not {type(agent_opts).__name__}")
    if codec is None:
        codec = JSONCodec()
    elif not (callable(getattr(codec, "encode", None)) and callable(getattr(codec, "decode", None))):
        raise TypeError(f"codec must have encode() and decode(), not {codec!r}")
    close_s = seconds(close_timeout, "close_timeout", allow_none=False)
    assert close_s is not None
    if close_s < 0:
        raise ValueError("close_timeout must be >= 0 seconds")
    try:
        first, cap = (float(x) for x in retry_backoff)
    except (TypeError, ValueError):
        raise TypeError("retry_backoff must be (first_seconds, max_seconds)") from None
    if not 0 < first <= cap:
        raise ValueError(f"retry_backoff must be (first, max) with 0 < first <= max, not {retry_backoff!r}")
    resolution = _positive_seconds(timer_resolution, "timer_resolution", allow_none=False)
    assert resolution is not None
    if isinstance(checkpoint, str):
        if checkpoint not in ("idle", "turn"):
            raise ValueError(
                f"checkpoint must be 'idle', 'turn' or a number of seconds (write-behind), not {checkpoint!r}"
            )
        policy: str | float = checkpoint
    else:
        behind = _positive_seconds(checkpoint, "checkpoint (write-behind seconds)", allow_none=False)
        assert behind is not None
        policy = behind
    ttl = _positive_seconds(lease_ttl, "lease_ttl", allow_none=False)
    assert ttl is not None
    wait = seconds(lease_wait, "lease_wait", allow_none=False)
    assert wait is not None
    if wait < 0:
        raise ValueError("lease_wait must be >= 0 seconds")
    if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int) or shard < 0):
        raise ValueError(f"shard must be an int >= 0, not {shard!r}")
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards < 1
                               or shard is None or shard >= shards):
        raise ValueError(f"shards must be an int > shard, given with shard, not {shards!r}")
    poll = _positive_seconds(timer_poll, "timer_poll", allow_none=False)
    assert poll is not None
    if isinstance(timer_retries, bool) or not isinstance(timer_retries, int) or timer_retries < 0:
        raise ValueError(f"timer_retries must be an int >= 0 (retries of a failing timer), "
                         f"not {timer_retries!r}")
    return Options(
        idle_timeout=timeout if timeout is not None and timeout > 0 else None,
        registry_partitions=registry_partitions,
        partition=partition,
        agent_opts=types.MappingProxyType(dict(agent_opts)),
        codec=codec,
        max_state_bytes=_positive_int(max_state_bytes, "max_state_bytes", allow_none=True),
        close_timeout=close_s,
        calls_touch=bool(calls_touch),
        hibernate_batch=_positive_int(hibernate_batch, "hibernate_batch") or 1,
        retry_backoff=(first, cap),
        timer_resolution=resolution,
        storage_timeout=_positive_seconds(storage_timeout, "storage_timeout", allow_none=True),
        turn_timeout=_positive_seconds(turn_timeout, "turn_timeout", allow_none=True),
        checkpoint=policy,
        validate_state=bool(validate_state),
        lease_ttl=ttl,
        lease_wait=wait,
        subscriber_buffer=_positive_int(subscriber_buffer, "subscriber_buffer") or 1,
        max_live=_positive_int(max_live, "max_live", allow_none=True),
        checkpoint_ttl=_positive_seconds(checkpoint_ttl, "checkpoint_ttl", allow_none=True),
        shard=shard,
        takeover=bool(takeover),
        timer_poll=poll,
        timer_retries=timer_retries,
        shards=shards,
    )
