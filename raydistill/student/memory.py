"""Resident memory (RSS) of this worker process, read at the phases of a training run."""

from __future__ import annotations


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class MemoryPhases:
    """RSS before the model loads, once the engine exists, and once the first optimizer step has
    run (activations, gradients and optimizer state then all exist), with the peak up to each."""

    def __init__(self) -> None:
        self.start = rss_mb()
        self.phases = {"rss_before_model_mb": self.start}

    def after_engine(self) -> None:
        self.phases.update(rss_after_engine_mb=rss_mb(), peak_rss_engine_mb=peak_rss_mb())

    def after_first_step(self) -> None:
        self.phases.update(rss_after_first_step_mb=rss_mb(), peak_rss_first_step_mb=peak_rss_mb())
