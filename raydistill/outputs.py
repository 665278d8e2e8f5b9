"""Stage outputs are written to a temporary folder and renamed into place only on success,
so a failed or interrupted stage never leaves a half-written artifact behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from raydistill.errors import RunDirError


def check_output(path: str | Path, *, overwrite: bool, what: str) -> Path:
    """Refuse an existing non-empty output unless ``overwrite``; call before any expensive work."""
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise RunDirError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it or choose another run_dir")
    return path


@contextlib.contextmanager
def staged_output(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
