"""Stage outputs are written beside their final folder and committed only on success (see
``storage``), so a failed or interrupted stage never leaves an artifact a reader would trust."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raydistill.errors import RunDirError
from raydistill.storage import Location, commit, location, scratch


def check_output(path: str | Path | Location, *, overwrite: bool, what: str) -> Location:
    """Refuse an existing non-empty output unless ``overwrite``; call before any expensive work."""
    loc = location(path)
    if loc.is_nonempty() and not overwrite:
        raise RunDirError(f"{what} {loc.uri!r} already exists; pass --overwrite to replace it or choose another run_dir")
    return loc


@dataclass
class Staged:
    """Where a stage writes an output until it is whole: ``partial`` in run storage (what Ray
    tasks write into) and ``local``, a scratch folder on the driver's disk for the files the
    driver makes (reports, plots, the manifest), moved into ``partial`` at the end."""

    partial: Location
    local: Path


@contextlib.contextmanager
def staged_output(final: str | Path | Location) -> Iterator[Staged]:
    """Yield a ``Staged`` beside ``final``; on success it replaces ``final``, on error it is removed."""
    final = location(final)
    partial = final.sibling(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    try:
        with scratch() as local:
            yield Staged(partial, local)
            partial.upload(local)
    except BaseException:
        partial.delete()
        raise
    commit(partial, final)


@dataclass
class ResumableOutput:
    """An output written into ``.<name>.partial`` beside its final folder and committed when
    complete, so the final folder only ever holds a finished artifact while an interrupted
    run's files stay behind for ``--resume``."""

    final: Location
    partial: Location
    resumed: bool = False

    def start(self) -> Location:
        self.partial.mkdir()
        return self.partial

    def discard(self) -> None:
        """Drop the partial output of a run that failed on bad input (never a resumed one)."""
        if not self.resumed:
            self.partial.delete()

    def commit(self) -> Location:
        commit(self.partial, self.final)
        return self.final


def resumable_output(path: str | Path | Location, *, overwrite: bool, resume: bool, what: str) -> ResumableOutput | None:
    """Decide what to do with an output path before any work: None if it is complete and
    ``resume`` was asked (nothing to do); otherwise where to write. Refuses to clobber
    a finished or interrupted output unless told."""
    final = location(path)
    partial = final.sibling(f".{final.name}.partial")
    has_partial = partial.is_nonempty()
    if final.is_nonempty():
        if resume and final.complete():
            if has_partial:
                partial.delete()  # a commit that finished but for deleting its source
            return None
        # an object-store commit cut short leaves the final folder without its manifest; the
        # partial folder still holds everything, and --resume commits it again
        interrupted_commit = resume and has_partial and not final.complete()
        if not overwrite and not interrupted_commit:
            raise RunDirError(f"{what} {final.uri!r} already exists; pass --overwrite to replace it or choose another run_dir")
    if has_partial:
        if overwrite:
            partial.delete()
            has_partial = False
        elif not resume:
            raise RunDirError(
                f"{what} {final.uri!r} has an interrupted run in {partial.uri!r}; "
                f"pass --resume to finish it or --overwrite to start over"
            )
    return ResumableOutput(final=final, partial=partial, resumed=has_partial)
