"""Stage outputs are written to a temporary folder and renamed into place only on success,
so a failed or interrupted stage never leaves a half-written artifact behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
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


@dataclass
class ResumableOutput:
    """An output written into ``.<name>.partial`` beside its final path and renamed into place
    when complete, so the final path only ever holds a finished artifact while an interrupted
    run's files stay behind for ``--resume``."""

    final: Path
    partial: Path
    resumed: bool = False

    def start(self) -> Path:
        self.partial.mkdir(parents=True, exist_ok=True)
        return self.partial

    def discard(self) -> None:
        """Drop the partial output of a run that failed on bad input (never a resumed one)."""
        if not self.resumed:
            shutil.rmtree(self.partial, ignore_errors=True)

    def commit(self) -> Path:
        if self.final.exists():
            shutil.rmtree(self.final)  # --overwrite: the old artifact goes only once the new one is whole
        os.replace(self.partial, self.final)
        return self.final


def resumable_output(path: str | Path, *, overwrite: bool, resume: bool, what: str) -> ResumableOutput | None:
    """Decide what to do with an output path before any work: None if it is complete and
    ``resume`` was asked (nothing to do); otherwise where to write. Refuses to clobber
    a finished or interrupted output unless told."""
    final = Path(path)
    partial = final.with_name(f".{final.name}.partial")
    if final.exists() and any(final.iterdir()):
        if resume and (final / "_manifest.json").is_file():
            return None
        if not overwrite:
            raise RunDirError(f"{what} {str(final)!r} already exists; pass --overwrite to replace it or choose another run_dir")
    if partial.exists():
        if overwrite:
            shutil.rmtree(partial)
        elif not resume:
            raise RunDirError(
                f"{what} {str(final)!r} has an interrupted run in {str(partial)!r}; "
                f"pass --resume to finish it or --overwrite to start over"
            )
    return ResumableOutput(final=final, partial=partial, resumed=partial.exists())
