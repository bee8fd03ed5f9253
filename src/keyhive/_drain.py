"""Close: drain every live agent in rounds until ``close_timeout``, then name what is unsaved.

Each round takes the turn of every agent still live (waiting for busy ones up to the
deadline), hibernates them in batches, and backs off before the next round. The
deadline bounds the writes themselves too: a backend call that hangs is abandoned at
the deadline and its agent reported unsaved. A conflict cannot succeed on retry: that
agent stops at once (CONFLICT, the newer state left in place) and is reported unsaved.
Neither can a state the codec refuses (a ``set``, over ``max_state_bytes``): that agent
stops UNSAVED at once, the CodecError its reported cause.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ._errors import CodecError, ConflictError, LeaseLost, UnsavedAgentsError
from ._events import StopReason
from ._lifecycle import RUNNING, STARTING, STOPPED

if TYPE_CHECKING:
    from ._core import Core
    from ._ref import AgentRef

__all__ = ["drain"]


async def drain(core: Core, refs: list[AgentRef], deadline: float) -> None:
    """Hibernate ``refs`` until ``deadline`` (loop time).

    Raises:
        UnsavedAgentsError: some agents could not be saved in time; they were stopped
            (``StopReason.UNSAVED``, or ``CONFLICT``) and their keys are listed.
    """
    loop = asyncio.get_running_loop()
    unsaved: list[AgentRef] = []
    last_error: dict[AgentRef, BaseException] = {}
    pending = refs
    attempt = 0
    while pending:
        pending = await _round(core, pending, deadline, last_error, unsaved)
        remaining = deadline - loop.time()
        if not pending or remaining <= 0:
            break
        attempt += 1
        await asyncio.sleep(min(remaining, core.options.backoff(attempt)))
    for ref in pending:
        if ref._status is not STOPPED:
            unsaved.append(ref)
            await core.reaper.finish(ref, StopReason.UNSAVED, saved=False)
    if unsaved:
        keys = [(ref.partition, ref.key) for ref in unsaved]
        shown = ", ".join(repr(k if p is None else (p, k)) for p, k in keys[:20])
        more = f" and {len(keys) - 20} more" if len(keys) > 20 else ""
        causes = {type(e).__name__: e for e in (last_error.get(ref) for ref in unsaved) if e is not None}
        why = "; ".join(f"{e}" for e in list(causes.values())[:3])
        raise UnsavedAgentsError(
            f"manager {core.name!r} closed without saving {len(keys)} agents: {shown}{more}"
            + (f" (last error: {why})" if why else " (close_timeout reached)"),
            keys, [last_error.get(ref) for ref in unsaved],
        )


async def _round(core: Core, refs: list[AgentRef], deadline: float,
                 last_error: dict[AgentRef, BaseException], unsaved: list[AgentRef]) -> list[AgentRef]:
    """Take the turn of every ref and hibernate them in batches; return the ones to retry."""
    loop = asyncio.get_running_loop()
    taken: list[AgentRef] = []
    waiting: list[AgentRef] = []
    for ref in refs:
        if ref._status is STOPPED:
            continue
        if ref._status is RUNNING and not ref._busy:
            ref._busy = True
            ref.begin_stop()
            taken.append(ref)
        else:
            waiting.append(ref)
    leftovers: list[AgentRef] = []
    if waiting:
        results = await asyncio.gather(*(_take(ref, deadline) for ref in waiting), return_exceptions=True)
        for ref, ok in zip(waiting, results, strict=True):
            (taken if ok is True else leftovers).append(ref)
    failed: list[AgentRef] = []
    size = core.options.hibernate_batch
    for start in range(0, len(taken), size):
        remaining = deadline - loop.time()
        if remaining <= 0:
            for ref in taken[start:]:
                ref.stop_failed()
            failed.extend(taken[start:])
            break
        chunk = taken[start:start + size]
        errors = await core.reaper.hibernate(chunk, StopReason.SHUTDOWN, timeout=remaining)
        for ref, error in zip(chunk, errors, strict=True):
            if error is None:
                continue
            last_error[ref] = error
            if isinstance(error, ConflictError) and not isinstance(error, LeaseLost):
                await core.reaper.finish(ref, StopReason.CONFLICT, saved=False)
                unsaved.append(ref)
            elif isinstance(error, CodecError):  # the same state fails the same way: no retry
                await core.reaper.finish(ref, StopReason.UNSAVED, saved=False)
                unsaved.append(ref)
            else:
                failed.append(ref)
    for ref in failed:  # keep the turn free for nobody: the next round takes it again
        if ref._status is RUNNING and ref._busy:
            ref._busy = False
    return [ref for ref in failed + leftovers if ref._status is not STOPPED]


async def _take(ref: AgentRef, deadline: float) -> bool:
    """Wait (until ``deadline``) for ``ref`` to start and for its turn; True when taken."""
    loop = asyncio.get_running_loop()
    while ref._status is STARTING:
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                await ref._changed()
        except (TimeoutError, Exception):  # noqa: BLE001  # a failed start or the deadline: either way not taken this round
            return False
    if ref._status is STOPPED:
        return False
    try:
        async with asyncio.timeout(max(0.0, deadline - loop.time())):
            await ref._acquire()
    except (TimeoutError, Exception):  # noqa: BLE001  # stopped meanwhile or the deadline: either way not taken this round
        return False
    if ref._status is not RUNNING:
        ref._release()
        return False
    ref.begin_stop()
    return True
