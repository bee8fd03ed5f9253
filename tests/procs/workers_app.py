"""A small FastAPI app that posts messages to a room agent: ``uvicorn tests.procs.workers_app:app``.

Configured by the environment: ``ROOMS_STORAGE`` (a storage URL), ``ROOMS_NAME`` (the
manager's name) and, to run the agents on Ray, ``ROOMS_RAY_ADDRESS``. Rooms are written
with ``checkpoint="turn"``: a 200 reply means the message is stored.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import FastAPI

import keyhive
from keyhive.integrations.fastapi import add_exception_handlers, keyhive_lifespan

from .room import Room


def _runtime() -> Any:
    address = os.environ.get("ROOMS_RAY_ADDRESS")
    if not address:
        return None
    from keyhive.ray import RayRuntime

    return RayRuntime(address=address, shards=2)


rooms = keyhive.InstanceManager(os.environ.get("ROOMS_NAME", "rooms"), Room,
                                storage=os.environ["ROOMS_STORAGE"], checkpoint="turn", runtime=_runtime())
app = FastAPI(lifespan=keyhive_lifespan(rooms))
add_exception_handlers(app)


@app.get("/health")
async def health() -> dict[str, Any]:
    return {"pid": os.getpid()}


@app.post("/rooms/{room}")
async def post(room: str, body: dict[str, Any]) -> dict[str, Any]:
    seq = await rooms.call(room, body["text"], timeout=30)
    return {"seq": seq, "pid": os.getpid()}
