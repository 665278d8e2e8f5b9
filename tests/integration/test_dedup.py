"""`queries.dedup` on a real local Ray: repeats of an id spread over several files (so over
several blocks) come out exactly once, under the hash shuffle Ray uses by default and under the
sort-based strategy, where the group-by path is taken."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from raydistill.config import ClusterConfig, QueriesConfig
from raydistill.data.queries import read_queries
from raydistill.data.sources import resolve_source
from raydistill.runtime import init_ray

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    import ray

    init_ray(ClusterConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.mark.parametrize("strategy", ["hash_shuffle", "sort_shuffle_pull_based"])
def test_dedup_keeps_each_id_once_across_files(tmp_path, ray_local, strategy, monkeypatch):
    from ray.data.context import DataContext, ShuffleStrategy

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "shuffle_strategy", ShuffleStrategy(strategy))
    expected: Counter[str] = Counter()
    for f in range(4):  # file f repeats ids 0..(9+f) and adds its own: repeats cross every block boundary
        rows = [{"id": f"q{i}", "text": f"text {i}"} for i in range(10 + f)] + [{"id": f"only{f}", "text": "x"}]
        (tmp_path / f"part-{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        expected.update(r["id"] for r in rows)
    cfg = QueriesConfig(train_path=str(tmp_path), eval_path=str(tmp_path), id_column="id", dedup=True)
    rows = read_queries(resolve_source(str(tmp_path)), cfg).take_all()
    got = Counter(r["id"] for r in rows)
    assert max(expected.values()) == 4 and got == Counter(set(expected))  # every id, once
    assert all(r["text"] == ("x" if r["id"].startswith("only") else f"text {r['id'][1:]}") for r in rows)
