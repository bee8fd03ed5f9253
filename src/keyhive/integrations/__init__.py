"""Integrations with web frameworks and observability.

* :mod:`keyhive.integrations.fastapi`: FastAPI and plain Starlette: a lifespan that runs the
  managers, ``attach_websocket`` (an agent lives while a socket is open), ``agent_call`` for
  plain HTTP handlers, and error mapping. Needs ``pip install 'keyhive[fastapi]'``.
* :mod:`keyhive.integrations.dashboard`: a live dashboard as an ASGI app to mount.
* :mod:`keyhive.integrations.otel`: OpenTelemetry spans and metrics for a manager, by one
  ``instrument(manager)`` call. Needs ``pip install 'keyhive[otel]'``.

Nothing here is imported by ``import keyhive``.
"""
