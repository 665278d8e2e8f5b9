"""Issue 18: the per-file / mergeable aggregates that replace whole-dataset reads on the driver
give the same numbers as the in-memory functions they replace (no Ray: the pure parts)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.errors import DataError
from raydistill.evaluate.evaluate import ResultStats, _bucket_pairs, _group_stats, analyze, merge_stats
from raydistill.evaluate.metrics import (
    LatencySketch,
    PairStats,
    accuracy_by_label,
    agreement,
    compare,
    confusion,
    paired,
    system_metrics,
    system_stats,
    throughput,
)
from raydistill.schema import EVAL_RESULTS, SAMPLES
from raydistill.student.train import check_samples
from raydistill.teacher.generate import EMPTY_COUNTS, _distinct, _file_summary, add_counts, finish_summary, summarize
from raydistill.teacher.ledger import file_sample_hashes, finished_samples, merge_hashes
from raydistill.teacher.requests import is_done, sample_hash, sample_key

LABELS = ["de", "en", "fr"]


def test_latency_sketch_exact_then_binned_within_half_a_percent():
    rng = np.random.default_rng(0)
    values = rng.lognormal(0.0, 1.0, 5_000)
    exact = LatencySketch()
    for v in values:
        exact.add(v)
    assert exact.percentile(95) == pytest.approx(np.percentile(values, 95)) and len(exact.points()) == 5_000
    halves = [LatencySketch(exact_limit=1_000), LatencySketch(exact_limit=1_000)]
    for i, v in enumerate(values):
        halves[i % 2].add(v)
    halves[0].merge(halves[1])
    assert halves[0].counts is not None and len(halves[0]) == 5_000
    for q in (50, 95, 99):
        assert halves[0].percentile(q) == pytest.approx(np.percentile(values, q), rel=0.006)
    points = halves[0].points(1_000)
    assert len(points) == 1_000 and points == sorted(points)


def result_row(qid, system, gold, label, task="t1", latency=0.5, error=None):
    return {"id": qid, "task": task, "query": f"query number {qid} " + "x" * (int(qid) % 100), "gold": gold,
            "system": system, "answer": None if error else f"It is {label}", "label": None if error else label,
            "valid": label is not None and not error, "error": error, "latency_s": None if error else latency,
            "started_at": 100.0 + int(qid), "num_input_tokens": None if error else (900 if system == "teacher" else 90),
            "num_output_tokens": None if error else 3}


def results(n=400):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        gold = LABELS[i % 3]
        task = "t1" if i % 4 else "t2"
        teacher = LABELS[rng.integers(3)] if rng.random() < 0.3 else gold
        student = None if rng.random() < 0.05 else (teacher if rng.random() < 0.8 else LABELS[rng.integers(3)])
        rows.append(result_row(str(i), "teacher", gold, teacher, task, float(rng.random()), "HTTP 500" if i % 37 == 0 else None))
        rows.append(result_row(str(i), "student", gold, student, task, float(rng.random())))
    return rows


def write_results(tmp_path, rows, n_files):
    paths = []
    for f in range(n_files):
        part = rows[f::n_files]
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=EVAL_RESULTS), path)
        paths.append(str(path))
    return paths


def streamed(paths, n_buckets):
    """What evaluate.collect_stats computes in Ray, run here in-process."""
    groups = [_group_stats(paths[i::2], n_buckets) for i in range(2)]
    out: dict = {}
    for g in groups:
        for key, stats in g[0].items():
            out.setdefault(key, ResultStats()).merge(stats)
    for b in range(n_buckets):
        for key, pairs in _bucket_pairs(*(g[1 + b] for g in groups)).items():
            out.setdefault(key, ResultStats()).pairs.merge(pairs)
    return out


def test_streamed_evaluation_equals_the_row_functions(tmp_path):
    rows = results()
    stats = streamed(write_results(tmp_path, rows, 5), n_buckets=3)
    for key, part in [(None, rows), ("t2", [r for r in rows if r["task"] == "t2"])]:
        got = analyze(merge_stats(stats.values()) if key is None else stats[key], LABELS, ["teacher", "student"])
        metrics = system_metrics(part)
        assert got["systems"] == metrics
        assert got["student_teacher_agreement"] == agreement(part, "student", "teacher")
        assert got["student_vs_teacher"] == compare(part, metrics, LABELS)
        assert got["throughput_rps"] == throughput([r for r in part if not r["error"]])
        assert got["accuracy_by_label"]["teacher"] == accuracy_by_label(part, "teacher", LABELS)
        assert (got["_report"]["matrices"]["student"] == confusion(part, "student", LABELS)).all()
        assert sorted(got["_report"]["latencies"]["teacher"]) == sorted(
            r["latency_s"] for r in part if r["system"] == "teacher" and not r["error"])
    assert len(got["student_vs_teacher"]["disagreements"]) == 15


def test_pair_stats_merge_keeps_the_first_disagreements_in_order():
    rows = results(200)
    whole = PairStats()
    whole.add_pairs(paired(rows, "teacher", "student"))
    halves = [PairStats(), PairStats()]
    for i, half in enumerate(halves):
        half.add_pairs(paired([r for r in rows if int(r["id"]) % 2 == i], "teacher", "student"))
    halves[0].merge(halves[1])
    assert halves[0].pairs == whole.pairs and halves[0].examples() == whole.examples()
    merged = system_stats(rows[:100])["teacher"]
    merged.merge(system_stats(rows[100:])["teacher"])
    assert merged.metrics() == system_metrics(rows)["teacher"]


def samples_table(n, tasks=("a",), dup_every=0):
    nums = [i - 1 if dup_every and i % dup_every == 0 else i for i in range(n)]  # every dup_every-th repeats a sample
    ids = [f"{tasks[q % len(tasks)]}/q{q}" for q in nums]
    cols = {name: pa.nulls(n, SAMPLES.field(name).type) for name in SAMPLES.names}
    cols.update(id=pa.array(ids), task=pa.array([tasks[q % len(tasks)] for q in nums]),
                query=pa.array(["q"] * n), sample_index=pa.array([q % 2 for q in nums], pa.int32()),
                prompt_sha256=pa.array(["p"] * n), teacher_model=pa.array(["m"] * n),
                valid=pa.array([i % 3 != 0 for i in range(n)]),
                label=pa.array([None if i % 3 == 0 else LABELS[i % 3] for i in range(n)]),
                reject_reason=pa.array(["no_label" if i % 3 == 0 else None for i in range(n)]),
                num_input_tokens=pa.array([100 + i % 7 for i in range(n)], pa.int32()),
                num_output_tokens=pa.array([3] * n, pa.int32()))
    return pa.table(cols, schema=SAMPLES)


@pytest.mark.parametrize("tasks", [("a",), ("a", "b")])
def test_summary_from_files_equals_the_summary_of_the_whole_table(tmp_path, tasks):
    table = samples_table(1_000, tasks, dup_every=10)
    paths = []
    for f in range(4):
        paths.append(str(tmp_path / f"{f}.parquet"))
        pq.write_table(table.slice(f * 250, 250), paths[-1])
    keys = list(tasks) if len(tasks) > 1 else [""]
    parts = [_file_summary(p, len(tasks) > 1) for p in paths]
    counts = {k: EMPTY_COUNTS for k in keys}
    for c, _, _ in parts:
        for k, v in c.items():
            counts[k] = add_counts(counts[k], v)
    total = EMPTY_COUNTS
    for c in counts.values():
        total = add_counts(total, c)
    queries = sum(_distinct(k, *(ids for _, ids, _ in parts)) for k in keys)
    samples = sum(_distinct(k, *(ks for _, _, ks in parts)) for k in keys)
    assert finish_summary(total, queries, samples) == summarize(table)
    assert summarize(table)["duplicate_samples"] > 0
    if len(tasks) > 1:
        b = finish_summary(counts["b"], _distinct("b", *(i for _, i, _ in parts)), _distinct("b", *(k for _, _, k in parts)))
        assert b == summarize(table.filter(pa.compute.equal(table["task"], "b")))


def test_ledger_hashes_every_file_and_membership_is_exact_on_known_keys(tmp_path):
    table = samples_table(3_000)
    for f in range(3):
        pq.write_table(table.slice(f * 1_000, 1_000), tmp_path / f"{f}.parquet")
    done, torn = finished_samples(tmp_path)
    assert torn == 0 and done.dtype == np.uint64 and np.all(done[1:] > done[:-1]) and len(done) == 3_000
    assert np.array_equal(done, merge_hashes(*(file_sample_hashes(tmp_path / f"{f}.parquet") for f in range(3))))
    assert all(is_done(sample_key(f"a/q{i}", i % 2), done) for i in range(0, 3_000, 97))
    assert not any(is_done(sample_key(f"a/q{i}", 1 - i % 2), done) for i in range(0, 3_000, 97))
    assert sample_hash("x\t0") != sample_hash("x\t1") and merge_hashes().dtype == np.uint64


def test_check_samples_streams_files_and_checks_logprobs(tmp_path):
    table = samples_table(600, ("a", "b"))
    for f in range(3):
        pq.write_table(table.slice(f * 200, 200), tmp_path / f"{f}.parquet")
    assert check_samples(tmp_path, ["a", "b"]) == {"a": 200, "b": 200}
    with pytest.raises(DataError, match="no teacher logprobs"):
        check_samples(tmp_path, ["a", "b"], soft=True)
    with_logprobs = table.set_column(SAMPLES.get_field_index("token_ids"), "token_ids",
                                     pa.array([[1, 2]] + [None] * 599, pa.list_(pa.int32())))
    pq.write_table(with_logprobs.slice(0, 200), tmp_path / "0.parquet")
    assert check_samples(tmp_path, ["a", "b"], soft=True) == {"a": 200, "b": 200}
