"""research/langid/distill_bench.py's per-language breakdown: the numbers behind "where agreement is lost"."""

import importlib.util
import json
from pathlib import Path

import pytest

from raydistill.tasks.task import load_task

STUDIES = Path(__file__).resolve().parents[2] / "research" / "langid"


@pytest.fixture
def bench(monkeypatch):
    """The study's module, loaded as ``python research/langid/distill_bench.py`` runs it: with its
    folder on sys.path (it imports its sibling ``study``)."""
    monkeypatch.syspath_prepend(str(STUDIES))
    spec = importlib.util.spec_from_file_location("distill_bench", STUDIES / "distill_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_answers(folder: Path, answers: list[str]) -> None:
    folder.mkdir(parents=True)
    (folder / "answers.json").write_text(json.dumps(answers))


def test_by_label_counts_teacher_stability_and_agreement(tmp_path, bench):
    task = load_task("langid-long")
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


def test_margin_subset_takes_the_least_sure_half_and_a_fixed_rest(tmp_path, bench):
    import pyarrow as pa
    import pyarrow.parquet as pq

    gaps = {"a": 5.0, "b": 0.1, "c": 3.0, "d": 0.2, "e": 4.0, "f": 0.05, "g": 6.0}
    rows = [{"id": i, "top_logprobs": [[-0.1, -0.1 - g], [-0.01, -5.0]]} for i, g in gaps.items()]
    source = tmp_path / "samples"
    source.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), source / "part-0.parquet")
    pool = sorted(gaps, key=bench.stable_order)[:6]  # the first six in the bench's fixed order

    n = bench.margin_subset(source, tmp_path / "picked", 4, pool=6)

    picked = set(pq.read_table(tmp_path / "picked" / "part-0.parquet")["id"].to_pylist())
    unsure = set(sorted(pool, key=gaps.get)[:2])
    assert n == 4 and len(picked) == 4
    assert unsure <= picked  # the two smallest gaps in the pool
    assert picked <= set(pool)  # nothing outside the pool
    assert picked - unsure == set([i for i in pool if i not in unsure][:2])  # the rest: the fixed order's first
