"""The target prompt's identity (raydistill.identity): hashes read back from samples files and
manifests, and the refusal that names both hashes."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.config import QueriesConfig, TaskConfig
from raydistill.errors import ConfigError
from raydistill.identity import check_prompts, manifest_prompts, recorded_in_files
from raydistill.storage import Location
from raydistill.tasks.pipeline_tasks import RunTask
from raydistill.tasks.task import task_for

A, B = "a" * 64, "b" * 64


def write(path, tasks, prompts, row_group_size=None):
    table = pa.table({"id": [str(i) for i in range(len(prompts))], "prompt_sha256": prompts,
                      **({"task": tasks} if tasks is not None else {})})
    pq.write_table(table, path, row_group_size=row_group_size)
    return str(path)


def test_hashes_come_from_statistics_or_the_columns(tmp_path):
    one = write(tmp_path / "one.parquet", ["x"] * 4, [A] * 4)  # one task and prompt per row group: footer only
    mixed = write(tmp_path / "mixed.parquet", ["x", "x", "y", "y"], [A, B, B, B])  # read from the columns
    groups = write(tmp_path / "groups.parquet", ["y", "y", "x", "x"], [B, B, A, A], row_group_size=2)
    untagged = write(tmp_path / "untagged.parquet", None, [A, A])  # samples of one task, no task column
    nulls = write(tmp_path / "nulls.parquet", [None, None], [B, B])  # a task column without values
    assert recorded_in_files([one], "x") == {"x": {A}}
    assert recorded_in_files([mixed, groups], "x") == {"x": {A, B}, "y": {B}}
    assert recorded_in_files([untagged, nulls], "only") == {"only": {A, B}}
    assert recorded_in_files([Location(tmp_path / "one.parquet")], "x") == {"x": {A}}


def run_task(key="t") -> RunTask:
    spec = task_for(TaskConfig())
    return RunTask(key, spec, QueriesConfig(train_path="q", eval_path="q"), None, tagged=False)


def test_a_changed_prompt_is_refused_naming_both_hashes(caplog):
    task = run_task()
    ours = task.spec.prompt_sha256
    check_prompts({"t": {ours}}, [task], "the samples", allow=False)  # same prompt
    check_prompts({"other": {A}}, [task], "the samples", allow=False)  # a task the artifact does not record
    with pytest.raises(ConfigError) as err:
        check_prompts({"t": A}, [task], "the samples in 's3://b/run/samples'", allow=False)
    message = str(err.value)
    assert f"sha256 {A[:16]}" in message and f"sha256 {ours[:16]}" in message and "'t'" in message
    assert "s3://b/run/samples" in message and "allow_prompt_change=true" in message and "\n" not in message
    with caplog.at_level(logging.WARNING, logger="raydistill.identity"):
        check_prompts({"t": {A, ours}}, [task], "the samples", allow=True)
    assert "used anyway" in caplog.text


def test_manifest_prompts(tmp_path):
    folder = Location(tmp_path / "samples")
    assert manifest_prompts(folder) is None
    (folder / "_manifest.json").write_json({"prompt_sha256": {"t": A}})
    assert manifest_prompts(folder) == {"t": A}
    (folder / "_manifest.json").write_json({"stage": "generate"})  # an older manifest
    assert manifest_prompts(folder) is None


def test_serving_a_student_of_another_prompt_is_refused(tmp_path, tiny_model):
    from raydistill.config import PipelineConfig
    from raydistill.serve.stage import application
    from raydistill.tasks.pipeline_tasks import run_tasks

    cfg = PipelineConfig.model_validate({
        "run_dir": str(tmp_path / "run"), "queries": {"train_path": "q.jsonl", "eval_path": "q.jsonl"},
        "teacher": {"model": tiny_model}, "train": {"student_model": tiny_model}})
    student = Location(tmp_path / "run" / "student")
    (student / "merged" / "config.json").write_text("{}")
    (student / "_manifest.json").write_json({"prompt_sha256": {run_tasks(cfg)[0].key: A}})
    with pytest.raises(ConfigError, match=f"the student in .* \\(sha256 {A[:16]}\\)"):
        application(cfg)
