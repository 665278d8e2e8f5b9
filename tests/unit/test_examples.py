"""Masking: the loss covers exactly the answer tokens, and the prompt is the served one."""

import numpy as np
import pytest

from raydistill.render import render_completion, render_prompt
from raydistill.student.examples import IGNORE_INDEX, build_example, collate
from raydistill.tasks.task import TaskSpec

MSG = TaskSpec(name="t", labels={"a": "A"}).student_messages  # the bare query, template default system


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def test_loss_mask_covers_exactly_the_answer(tokenizer):
    ex = build_example(tokenizer, MSG("Hola, ¿qué tal?"), "Spanish", max_seq_len=256)
    prompt = render_prompt(tokenizer, MSG("Hola, ¿qué tal?"))
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    labels = np.array(ex["labels"])
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    answer = labels[n_prompt:]
    assert (answer != IGNORE_INDEX).all()
    assert tokenizer.decode(answer) == "Spanish<|im_end|>"
    assert ex["input_ids"][n_prompt:] == list(answer)


def test_prompt_is_the_bare_query_with_generation_prompt(tokenizer):
    prompt = render_prompt(tokenizer, MSG("hello"))
    assert prompt.endswith("<|im_start|>assistant\n") and "hello" in prompt
    assert render_completion(tokenizer, MSG("hello"), "English") == "English<|im_end|>"


def test_too_long_is_dropped(tokenizer):
    assert build_example(tokenizer, MSG("word " * 300), "English", max_seq_len=64) is None


def test_collate_pads_right_and_masks():
    batch = {"input_ids": [np.array([5, 6, 7]), np.array([8])], "labels": [np.array([-100, 6, 7]), np.array([8])]}
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_bucket_batches_group_similar_lengths_and_drop_tail():
    from raydistill.student.examples import bucket_batches

    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6]
    chunk = {"input_ids": np.array([np.arange(n) for n in lengths], dtype=object),
             "labels": np.array([np.arange(n) for n in lengths], dtype=object)}
    batches = bucket_batches(chunk, 4, np.random.default_rng(0))
    assert len(batches) == 2  # 9 rows -> two full batches, the longest row dropped
    groups = sorted(sorted(len(x) for x in b["input_ids"]) for b in batches)
    assert groups == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_tokenizer_pool_is_as_configured_else_one_actor_per_8_cluster_cpus(monkeypatch):
    import ray

    from raydistill.student.train import tokenizer_actors

    for cpus, expected in ((2.0, 1), (4.0, 1), (16.0, 2), (192.0, 24)):
        monkeypatch.setattr(ray, "cluster_resources", lambda cpus=cpus: {"CPU": cpus})
        assert tokenizer_actors(None) == expected
    assert tokenizer_actors(3) == 3
