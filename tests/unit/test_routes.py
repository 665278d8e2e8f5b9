"""Which engine, prompt and forced answer prefix each public model name gets (pure)."""

from pathlib import Path

from raydistill.serve.app import routes_for
from raydistill.tasks.task import load_task

TASK = load_task(str(Path(__file__).parents[1] / "data" / "tiny_task.yaml"))


def test_teacher_gets_the_prompt_and_prefix_base_gets_neither():
    routes = routes_for(False, TASK)
    assert set(routes) == {"teacher", "base"}
    assert routes["teacher"].engine == routes["base"].engine == "teacher"
    assert routes["teacher"].inject_prompt and routes["teacher"].answer_prefix == "This text is written in"
    assert not routes["base"].inject_prompt and routes["base"].answer_prefix == ""


def test_student_gets_the_prefix_only_when_trained_to_say_it():
    trained_on_response = routes_for(True, TASK, student_prefix=True)["student"]
    trained_on_label = routes_for(True, TASK, student_prefix=False)["student"]
    assert trained_on_response.engine == "student" and not trained_on_response.inject_prompt
    assert trained_on_response.answer_prefix == TASK.assistant_prefix
    assert trained_on_label.answer_prefix == ""


def test_the_students_trained_target_comes_from_its_manifest(tmp_path):
    import json

    from raydistill.config import load_config
    from raydistill.serve.stage import trained_target

    config = Path(__file__).parents[2] / "jobs" / "configs" / "demo_cpu.yaml"
    cfg = load_config(config, [f"run_dir={tmp_path}", "train.target=response"])
    assert trained_target(cfg) == "response"  # no student yet: what the config asks for
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "_manifest.json").write_text(json.dumps({"config": {"train": {"target": "label"}}}))
    assert trained_target(cfg) == "label"  # what it was actually trained with wins
