"""Hypothesis profiles for the reliability suite.

``ci`` (default) keeps the model-based tests to a few hundred examples in total;
``soak`` runs them fifty times longer. Pick one with
``pytest tests/reliability --hypothesis-profile=soak`` (the profiles are registered
here, so name this directory on the command line when you choose one), or with
``KEYHIVE_HYPOTHESIS_PROFILE=soak``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("ci", max_examples=100, stateful_step_count=40, **_COMMON)
settings.register_profile("soak", max_examples=5000, stateful_step_count=100, **_COMMON)

if os.environ.get("KEYHIVE_HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["KEYHIVE_HYPOTHESIS_PROFILE"])
elif settings.get_current_profile_name() == "default":
    settings.load_profile("ci")


def scaled(n: int) -> int:
    """``n`` examples on the ``ci`` profile, fifty times more on ``soak``."""
    return n * 50 if settings.get_current_profile_name() == "soak" else n
