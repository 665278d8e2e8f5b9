"""bench/distill_bench.py's per-language breakdown: the numbers behind "where agreement is lost"."""

import importlib.util
import json
from pathlib import Path

from raydistill.tasks.task import load_task

BENCH = Path(__file__).resolve().parents[2] / "bench" / "distill_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("distill_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_answers(folder: Path, answers: list[str]) -> None:
    folder.mkdir(parents=True)
    (folder / "answers.json").write_text(json.dumps(answers))


def test_by_label_counts_teacher_stability_and_agreement(tmp_path):
    bench, task = load_bench(), load_task("langid-long")
    # Chinese text the teacher calls English once and Chinese once; Urdu it always calls Arabic.
    teacher = {
        "q1": {"gold": "zh", "label": "en", "response": " English."},
        "q2": {"gold": "zh", "label": "zh", "response": " Chinese."},
        "q3": {"gold": "ur", "label": "ar", "response": " Arabic."},
    }
    ids = ["q1", "q2", "q3"]
    write_answers(tmp_path / "teacher-order-1", [" Chinese.", " Chinese.", " Arabic."])  # q1 flips
    write_answers(tmp_path / "row", ["This text is written in Chinese.", "This text is written in Chinese.",
                                     "This text is written in Arabic."])
    stability = [{"seed": 0}, {"seed": 1}]  # the control (seed 0) is not an order

    rows = bench.by_label(tmp_path, {"name": "row"}, stability, teacher, ids, task)

    assert rows == [
        {"label": "ur", "n": 1, "teacher_right": 0, "teacher_stable": 1, "agree": 1, "teacher_says": {"Arabic": 1}},
        {"label": "zh", "n": 2, "teacher_right": 1, "teacher_stable": 1, "agree": 1,
         "teacher_says": {"English": 1, "Chinese": 1}},
    ]
    text = bench.render_markdown({
        "command": "c", "config": "x.yaml", "task": "langid-long", "eval_queries": 3,
        "teacher": {"eval_accuracy": 1 / 3, "eval_parse_rate": 1.0, "seconds_per_query": 0.1},
        "learning_curve": [], "recipes": [], "recipe_curve": [], "by_label": rows, "by_label_row": "row"})
    assert "| zh | 2 | 1 | 1 | 1 | English 1, Chinese 1 |" in text
    assert "1 of the 1 disagreements are on `zh`:" in text
    assert "copied: `ur` (teacher right 0/1, student agrees 1/1)" in text
