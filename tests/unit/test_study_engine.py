"""The langid studies' plain-vLLM engine (research/langid/study.py) is raydistill.engine's, with
the studies' fixed settings: the arguments they built by hand before."""

import importlib.util
from pathlib import Path

STUDY = Path(__file__).resolve().parents[2] / "research" / "langid" / "study.py"


def test_study_engine_arguments_are_the_ones_the_studies_always_ran():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)

    assert study.engine_kwargs("float32", 2048) == {
        "dtype": "float32", "enforce_eager": True, "block_size": 32, "enable_prefix_caching": True,
        "max_model_len": 2048, "seed": 0, "kv_cache_memory_bytes": 1 << 30}
    results = Path(__file__).resolve().parents[2] / "research" / "langid" / "results"
    assert results == study.RESULTS
