"""The console demo: a counter agent used, left idle, hibernated to disk, thawed with its state.

Run: python examples/counter_demo.py [--storage URL] [--idle SECONDS]
(the web demo is the other one: bash scripts/demo.sh)
"""

from __future__ import annotations

import argparse
import asyncio
import time

import keyhive


class Counter(keyhive.Agent):
    def initial_state(self, params: dict[str, object]) -> dict[str, object]:
        return {"count": 0, **params}

    async def handle(self, message: object) -> object:
        if message == "incr":
            self.state["count"] += 1
        return self.state["count"]

    async def on_start(self, thawed: bool) -> None:
        how = "thawed from its checkpoint" if thawed else "started fresh"
        print(f"  [{self.key}] {how}, count={self.state['count']}")

    async def on_hibernate(self) -> None:
        print(f"  [{self.key}] hibernating with count={self.state['count']}")


def show(event: keyhive.Event) -> None:
    if event.kind in (keyhive.EventKind.IDLE, keyhive.EventKind.STOPPED):
        extra = f" ({event.reason})" if event.reason else ""
        print(f"  event: {event.kind} key={event.key!r}{extra}")


async def main(storage: str, idle: float) -> None:
    sessions = keyhive.InstanceManager("demo-counters", Counter, idle_timeout=idle, storage=storage)
    async with sessions:
        sessions.subscribe(show)
        print(f"storage: {storage}, idle_timeout: {idle}s")
        print("1. alice uses her counter three times")
        for _ in range(3):
            count = await sessions.call("alice", "incr")
        print(f"   alice's count is {count}")

        print("2. bob attaches (like an open websocket) while alice goes idle")
        async with sessions.attach("bob") as bob:
            await bob.call("incr")
            started = time.monotonic()
            ref = await sessions.lookup("alice")
            assert ref is not None
            reason = await ref.wait_stopped()
            print(f"   alice stopped after {time.monotonic() - started:.1f}s: {reason}")
            print(f"   live agents now: {(await sessions.stats()).keys} (bob is attached, so he stays)")

        print("3. alice comes back: her agent thaws from storage with its state")
        count = await sessions.call("alice", "incr")
        print(f"   alice's count is {count}")
    print("4. the manager closed: every live agent hibernated first. Run me again:")
    print("   the counts go on from where they were.")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default="file://.keyhive-demo/checkpoints", metavar="URL",
                        help="where checkpoints go: a storage URL such as sqlite:///counters.db "
                             "(default: %(default)s, under the current directory)")
    parser.add_argument("--idle", type=float, default=1.0, metavar="SECONDS",
                        help="idle timeout in seconds (default: %(default)s)")
    args = parser.parse_args()
    asyncio.run(main(args.storage, args.idle))
