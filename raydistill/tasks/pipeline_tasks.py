"""The tasks a pipeline runs: one (``task`` + ``queries``) or several (``tasks``), in one shape.

Every stage asks ``run_tasks(cfg)`` and handles a list, so a single-task config is simply a
list of one. Rows carry their task's ``key`` in a ``task`` column from the moment they are read.
"""

from __future__ import annotations

from dataclasses import dataclass

from raydistill.config import PipelineConfig, QueriesConfig, TaskConfig
from raydistill.errors import ConfigError
from raydistill.tasks.task import TaskSpec, task_for


@dataclass(frozen=True)
class RunTask:
    """A task as the pipeline runs it."""

    key: str  # the ``task`` column's value: the tag (several tasks) or the task's name (one)
    spec: TaskSpec  # with the student tag applied when there are several tasks
    queries: QueriesConfig
    weight: float | None  # training share relative to the other tasks (None: proportional)
    tagged: bool  # several tasks: ids are namespaced by tag and model names are "<system>/<tag>"

    def model_name(self, system: str) -> str:
        """The public model name a client asks for: ``student`` or, with several tasks, ``student/<tag>``."""
        return f"{system}/{self.key}" if self.tagged else system

    def query_id(self, raw_id: str) -> str:
        """Ids are namespaced by tag with several tasks: two tasks may share query texts."""
        return f"{self.key}/{raw_id}" if self.tagged else raw_id

    def where(self) -> str:
        """How error messages name this task's settings."""
        return f"task {self.key!r} (tasks[].queries)" if self.tagged else "queries"


def run_tasks(cfg: PipelineConfig) -> list[RunTask]:
    """The config's tasks, their files read and checked (a bad task file fails here, named)."""
    if cfg.tasks is None:
        assert cfg.queries is not None  # the config's validator guarantees one of the two
        spec = task_for(cfg.task)
        return check_votes(cfg, [RunTask(spec.name, spec, cfg.queries, None, tagged=False)])
    out = []
    for entry in cfg.tasks:
        try:
            spec = task_for(TaskConfig(name=entry.name, student_system_prompt=entry.student_system_prompt))
        except ConfigError as exc:
            raise ConfigError(f"task {entry.tag!r}: {exc}") from None
        out.append(RunTask(entry.tag, spec.model_copy(update={"student_tag": entry.tag}), entry.queries, entry.weight,
                           tagged=True))
    return check_votes(cfg, out)


def check_votes(cfg: PipelineConfig, tasks: list[RunTask]) -> list[RunTask]:
    """Votes elect a label: a free task has none to elect."""
    free = [t.key for t in tasks if t.spec.free]
    if cfg.teacher.votes > 1 and free:
        raise ConfigError(f"teacher.votes elects a majority label, but task(s) {free} are free-form (no labels); "
                          "set teacher.votes=1 (or teacher.samples_per_query for several answers per query)")
    return tasks


def specs_by_key(tasks: list[RunTask]) -> dict[str, TaskSpec]:
    return {t.key: t.spec for t in tasks}


def task_factors(valid_counts: dict[str, int], weights: dict[str, float | None]) -> dict[str, float]:
    """How many times each task's examples are used so that the tasks' shares of training are
    their weights' shares (1.0 everywhere, the natural proportions, when no weights are set). A
    factor below 1 subsamples the task, above 1 repeats it."""
    total = sum(valid_counts.values())
    if total == 0 or all(w is None for w in weights.values()):
        return {k: 1.0 for k in valid_counts}
    wsum = sum(w or 0.0 for w in weights.values())
    return {k: ((weights[k] or 0.0) / wsum) / (n / total) if n else 0.0 for k, n in valid_counts.items()}


def repeats(factor: float, key: str) -> int:
    """Copies of one example under a task factor: floor(factor), plus one more for a share
    ``frac(factor)`` of the examples, chosen by a hash of ``key`` (reproducible, no RNG state)."""
    from raydistill.ids import hash_bucket

    whole = int(factor)
    return whole + (1 if hash_bucket(f"repeat:{key}") < factor - whole else 0)
