"""Where raydistill keeps things it makes once (materialized models, built-in data)."""

from __future__ import annotations

import os
from pathlib import Path

BUILTIN_PREFIX = "builtin:"  # built-in models and query sets: builtin:smollm2-135m-instruct, builtin:langid-demo/train


def cache_dir() -> Path:
    """``$RAYDISTILL_CACHE``, else ``$XDG_CACHE_HOME/raydistill``, else ``~/.cache/raydistill``."""
    if env := os.environ.get("RAYDISTILL_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "raydistill"
