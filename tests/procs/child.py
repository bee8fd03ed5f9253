"""A child process of the crash and lease tests: ``python -m tests.procs.child <mode> <url> <name> <json>``.

Every line it prints on stdout is one event, flushed at once, so that a parent that
SIGKILLs it has read exactly what it had acknowledged:

* ``crash``: appends 1, 2, 3, ... to the list of key ``"k"`` (continuing after what it
  thawed), one ``call`` at a time, under the checkpoint policy ``opts["checkpoint"]``;
  prints ``ready <thawed length>``, then ``ack <n> <time.monotonic()>`` after each call
  returns. Runs until it is killed (or ``opts["calls"]`` calls, then closes: ``closed``).
* ``serve``: a manager with ``checkpoint="turn"`` driven by commands on stdin, one per
  line: ``call <key> <value>`` (prints ``ack <key> <value> <reply>`` or ``err <key> <value>
  <ErrorType>``), ``slow <key> <value> <seconds>`` (a handler that prints ``sleeping <key>``,
  sleeps, appends, then writes at once with ``self.checkpoint()``), ``close`` (prints
  ``closed``). Prints ``started <pid>`` once it holds the lease, ``elsewhere <message>``
  when ``start()`` raised OwnedElsewhere, and ``stop <key> <reason>`` from ``on_stop``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import keyhive


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class Log(keyhive.Agent):
    """A list of values; ``("add", v)`` appends and returns the new length."""

    def initial_state(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"items": []}

    async def handle(self, message: Any) -> Any:
        if message == "items":
            return list(self.state["items"])
        kind, value, *rest = message
        if kind == "slow":
            say(f"sleeping {self.key}")
            await asyncio.sleep(float(rest[0]))
            self.state["items"].append(value)
            await self.checkpoint()
        else:
            self.state["items"].append(value)
        return len(self.state["items"])

    async def on_stop(self, reason: keyhive.StopReason) -> None:
        say(f"stop {self.key} {reason.value}")


def manager(url: str, name: str, opts: dict[str, Any]) -> keyhive.InstanceManager:
    return keyhive.InstanceManager(name, Log, storage=url, **opts)


async def crash(url: str, name: str, opts: dict[str, Any]) -> None:
    calls = opts.pop("calls", None)
    async with manager(url, name, opts) as m:
        items = await m.call("k", "items")
        say(f"ready {len(items)}")
        n = len(items)
        while calls is None or n < len(items) + calls:
            n += 1
            await m.call("k", ("add", n))
            say(f"ack {n} {time.monotonic()!r}")
            await asyncio.sleep(0.0005)  # a client between requests (the loop runs its timers)
    say("closed")


async def serve(url: str, name: str, opts: dict[str, Any]) -> None:
    m = manager(url, name, {"checkpoint": "turn", **opts})
    try:
        await m.start()
    except keyhive.OwnedElsewhere as exc:
        say(f"elsewhere {exc}")
        return
    say(f"started {os.getpid()}")
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def one(key: str, value: Any, message: Any) -> None:
        try:
            reply = await m.call(key, message, timeout=30)
        except Exception as exc:
            say(f"err {key} {value} {type(exc).__name__}")
        else:
            say(f"ack {key} {value} {reply}")

    try:
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
            if not line or line[0] == "close":
                break
            if line[0] == "call":
                await one(line[1], int(line[2]), ("add", int(line[2])))
            elif line[0] == "slow":  # runs on while the next commands are read
                task = asyncio.create_task(one(line[1], int(line[2]), ("slow", int(line[2]), line[3])))
                pending.add(task)
                task.add_done_callback(pending.discard)
        if pending:
            await asyncio.wait(pending, timeout=30)
    finally:
        await m.close()
        say("closed")


def main() -> None:
    mode, url, name, opts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    asyncio.run({"crash": crash, "serve": serve}[mode](url, name, opts))


if __name__ == "__main__":
    main()
