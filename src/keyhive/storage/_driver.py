"""Shared helpers for driver-backed storage backends."""

from __future__ import annotations

import importlib
from types import ModuleType
from urllib.parse import parse_qsl

__all__ = ["import_driver", "query_options"]


def import_driver(module: str, extra: str) -> ModuleType:
    """Import a backend's driver, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ImportError(
            f"this storage backend needs {module!r}: pip install 'keyhive[{extra}]'"
        ) from exc


def query_options(query: str, allowed: set[str], url: str) -> dict[str, str]:
    """Options from a URL's query string; unknown names raise ValueError."""
    options = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=False))
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(sorted(unknown))} in {url!r}; "
            f"known: {', '.join(sorted(allowed))}"
        )
    return options
