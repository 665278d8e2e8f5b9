"""On-policy distillation, the pure parts: prompts, the teacher's view of a student answer, the
tokenizer check, the reverse-KL loss (its gradient, and that it drives a toy policy to the
teacher), the step schedule, query selection and the summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydistill.config import PipelineConfig, TrainConfig
from raydistill.errors import ConfigError
from raydistill.student.on_policy import (
    check_same_tokenizer,
    query_prompts,
    reverse_kl_loss,
    serves_prefix,
    teacher_token_logprobs,
    teacher_top_logprobs,
    teacher_view,
    topk_reverse_kl,
)
from raydistill.student.on_policy_engines import actor_options, sampled_logprobs
from raydistill.student.on_policy_loop import on_policy_summary, seed_of, step_queries
from raydistill.student.on_policy_setup import select_queries
from raydistill.tasks.task import load_task

REPO = Path(__file__).resolve().parents[2]
TINY_TASK = REPO / "tests" / "data" / "tiny_task.yaml"
SUPPORT = REPO / "examples" / "custom_task" / "support" / "task.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(REPO / "tests" / "data" / "smollm2-tokenizer")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_labelled_tasks_prompts_the_student_bare_and_the_teacher_with_its_prefix(tokenizer):
    task = load_task(str(TINY_TASK))
    p = query_prompts(tokenizer, tokenizer, task, "Hallo Welt", student_prefixed=False)
    assert tokenizer.decode(p.student).endswith("<|im_start|>user\nHallo Welt<|im_end|>\n<|im_start|>assistant\n")
    assert "identify the language" not in tokenizer.decode(p.student)
    teacher = tokenizer.decode(p.teacher)
    assert "identify the language" in teacher and teacher.endswith("assistant\nThis text is written in")
    assert tokenizer.decode(p.prefix) == "This text is written in" and p.teacher[-len(p.prefix):] == p.prefix
    assert not p.student_has_prefix


def test_a_student_answer_that_says_the_prefix_has_it_forced_for_the_teacher(tokenizer):
    task = load_task(str(TINY_TASK))
    p = query_prompts(tokenizer, tokenizer, task, "Hallo", student_prefixed=False)
    said = ids(tokenizer, "This text is written in German.<|im_end|>")
    seq, start, forced = teacher_view(p, said)
    assert forced == len(p.prefix) and start == len(p.teacher)
    assert tokenizer.decode(seq[start:]) == " German.<|im_end|>"  # scored after the teacher's own prefix
    bare = ids(tokenizer, " German.<|im_end|>")
    seq2, start2, forced2 = teacher_view(p, bare)
    assert forced2 == 0 and seq2 == seq and start2 == start  # the same tokens, scored the same way


def test_a_student_served_with_the_prefix_samples_after_it_so_every_answer_token_is_scored(tokenizer):
    task = load_task(str(SUPPORT))
    cfg = PipelineConfig.model_validate({"run_dir": "r", "queries": {"train_path": "x", "eval_path": "y"}})
    assert serves_prefix(task, cfg)  # a free task's student always
    langid = load_task(str(TINY_TASK))
    assert not serves_prefix(langid, cfg)  # train.target: label
    assert serves_prefix(langid, cfg.model_copy(update={"train": cfg.train.model_copy(update={"target": "response"})}))
    p = query_prompts(tokenizer, tokenizer, task, "How do I resize?", student_prefixed=True)
    assert p.student_has_prefix and tokenizer.decode(p.student).endswith("assistant\nThanks for reaching out!")
    answer = ids(tokenizer, " Use Settings.<|im_end|>")
    seq, start, forced = teacher_view(p, answer)
    assert forced == 0 and seq[start:] == answer


def test_teacher_token_logprobs_reads_vllm_entries_and_zeroes_forced_tokens():
    class Logprob:
        def __init__(self, v):
            self.logprob = v

    plp = [None, {7: Logprob(-1.0)}, {8: {"logprob": -2.0}, 3: {"logprob": -0.1}}]
    assert teacher_token_logprobs(plp, [6, 7, 8], 1, 2) == [0.0, 0.0, -1.0, -2.0]
    assert sampled_logprobs([4, 5], [{4: Logprob(-0.5)}, {5: Logprob(-0.25), 1: Logprob(-3.0)}]) == [-0.5, -0.25]


def test_same_tokenizer_passes_and_a_different_vocabulary_or_template_is_refused(tokenizer):
    import copy

    check_same_tokenizer(tokenizer, tokenizer, "s", "t")
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["<extra_token_xyz>"])
    with pytest.raises(ConfigError, match=r"tokenize differently.*<extra_token_xyz>.*same tokenizer"):
        check_same_tokenizer(tokenizer, other, "student-m", "teacher-m")
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ '<|endoftext|>' if m['role'] == "
                               "'assistant' else '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigError, match="end an answer with different tokens"):
        check_same_tokenizer(tokenizer, templated, "s", "t")


def test_the_loss_gradient_is_the_reverse_kl_policy_gradient():
    student = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    teacher = torch.tensor([-1.5, -1.0, -0.5])
    loss, kl, gap = reverse_kl_loss(student, student.detach(), teacher, importance_clip=2.0)
    loss.backward()
    per_token = student.detach() - teacher  # log pi - log p
    expected = (per_token - per_token.mean()) / 3  # centred on the batch mean, mean over tokens
    assert torch.allclose(student.grad, expected) and abs(float(kl) - float(per_token.mean())) < 1e-6 and float(gap) == 0
    # stale answers are importance-weighted, the weight clipped
    s2 = torch.tensor([-1.0, -1.0], requires_grad=True)
    loss2, _, gap2 = reverse_kl_loss(s2, torch.tensor([-1.0 - np.log(4.0), -1.0 + np.log(2.0)]), torch.tensor([-2.0, -3.0]), 2.0)
    loss2.backward()
    assert torch.allclose(s2.grad, torch.tensor([2.0 * -0.5, 0.5 * 0.5]) / 2)  # KL terms 1 and 2, centred: -0.5, 0.5
    assert abs(float(gap2) - (np.log(4.0) - np.log(2.0)) / 2) < 1e-6


def test_minimising_it_on_the_students_own_samples_moves_a_toy_policy_to_the_teacher():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.tensor([3.0, 1.0, 0.0, -1.0, -2.0]), -1)
    logits = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)

    def kl() -> float:
        p = torch.log_softmax(logits.detach(), -1)
        return float((p.exp() * (p - teacher)).sum())

    before = kl()
    for _ in range(300):
        lp_all = torch.log_softmax(logits, -1)
        tokens = torch.multinomial(lp_all.exp().detach(), 64, replacement=True, generator=gen)
        lp = lp_all[tokens]
        loss, _, _ = reverse_kl_loss(lp, lp.detach(), teacher[tokens], importance_clip=2.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert before > 0.5 and kl() < 0.05 * before


def test_steps_take_fresh_queries_in_a_seeded_order_and_wrap_around():
    pool = list(range(10))
    a = [step_queries(pool, s, 4, seed=3) for s in range(3)]
    assert a == [step_queries(pool, s, 4, seed=3) for s in range(3)]  # a resumed run repeats the schedule
    assert sorted(a[0] + a[1] + a[2][:2]) == pool  # each query once before any repeats
    assert step_queries(pool, 0, 4, seed=4) != a[0]
    assert seed_of(1, 2, 3) == seed_of(1, 2, 3) != seed_of(1, 2, 4) and 0 <= seed_of(9) < 2**31


def test_select_queries_takes_distinct_ids_per_split_until_it_has_enough():
    cfg = PipelineConfig.model_validate({
        "run_dir": "run", "queries": {"train_path": "x", "eval_path": "y"},
        "train": {"num_workers": 2, "val_fraction": 0.3, "on_policy": {"steps": 2, "queries_per_step": 2, "eval_queries": 3}}})
    ids_ = [f"q{i}" for i in range(200)]
    batches = [pa.record_batch({"id": ids_ + ids_[:5], "query": [f"text {i}" for i in ids_ + ids_[:5]]})]
    train, held_out = select_queries(batches, cfg, "langid")
    assert len(train) == 8 and len(held_out) == 3
    assert len({q for q, _, _ in train + held_out}) == 11 and {t for _, t, _ in train} == {"langid"}
    from raydistill.student.examples import is_validation

    assert all(is_validation(q, 0.3) for q, _, _ in held_out) and not any(is_validation(q, 0.3) for q, _, _ in train)


def test_on_policy_summary_and_config():
    rows = [{"step": 1, "loss": 2.0}, {"step": 2, "phase": "on_policy", "reverse_kl": 1.5, "rollout_s": 2.0, "score_s": 1.0,
                                       "update_s": 3.0, "sync_s": 0.0, "start_eval_reverse_kl": 2.5},
            {"step": 3, "phase": "on_policy", "reverse_kl": 1.0, "rollout_s": 4.0, "score_s": 1.0, "update_s": 1.0,
             "sync_s": 0.2, "eval_reverse_kl": 1.25}]
    s = on_policy_summary(rows)
    assert s["steps"] == 2 and s["start_eval_reverse_kl"] == 2.5 and s["final_eval_reverse_kl"] == 1.25
    assert s["first_reverse_kl"] == 1.5 and s["last_reverse_kl"] == 1.0
    assert s["seconds_per_step"] == {"rollout_s": 3.0, "score_s": 1.0, "update_s": 2.0, "sync_s": 0.1}
    with pytest.raises(ValueError, match="set train.method=lora"):
        TrainConfig(method="full", on_policy={"steps": 1})
    with pytest.raises(ValueError, match="raise train.on_policy.queries_per_step"):
        TrainConfig(gradient_accumulation_steps=4, on_policy={"steps": 1, "queries_per_step": 1, "samples_per_query": 2})
    opts = actor_options({"CPU": 1.0, "GPU": 1.0, "rollout_node": 0.5}, "n")
    assert opts["num_cpus"] == 1.0 and opts["num_gpus"] == 1.0 and opts["resources"] == {"rollout_node": 0.5}
    assert opts["runtime_env"]["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_teacher_top_logprobs_per_answer_token_and_a_certain_forced_prefix():
    plp = [None, {7: {"logprob": -0.5}, 2: {"logprob": -1.5}}, {9: {"logprob": -3.0}, 8: {"logprob": -0.1}}]
    ids_, lps = teacher_top_logprobs(plp, [6, 7, 9], 1, [4, 5])
    assert ids_ == [[4], [5], [7, 2], [9, 8]] and lps == [[0.0], [0.0], [-0.5, -1.5], [-3.0, -0.1]]


def test_topk_reverse_kl_is_the_kl_of_the_coarsened_distributions_and_teaches_a_toy_policy():
    student = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), -1)
    teacher = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0, -3.0]]), -1)
    ids_ = torch.tensor([[1, 2]])
    mask = torch.tensor([[True, True]])
    got = topk_reverse_kl(student, ids_, teacher.gather(-1, ids_), mask)
    s = student.exp()[0]
    t = teacher.exp()[0]
    coarse_s = torch.stack([s[1], s[2], s[0] + s[3]])
    coarse_t = torch.stack([t[1], t[2], t[0] + t[3]])
    assert abs(float(got) - float((coarse_s * (coarse_s.log() - coarse_t.log())).sum())) < 1e-5
    # a padded slot changes nothing
    padded = topk_reverse_kl(student, torch.tensor([[1, 2, 0]]), torch.cat([teacher.gather(-1, ids_), torch.zeros(1, 1)], -1),
                             torch.tensor([[True, True, False]]))
    assert abs(float(padded) - float(got)) < 1e-6
    logits = torch.zeros(1, 5, requires_grad=True)
    target = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0, -1.0, -2.0]]), -1)
    top = torch.tensor([[0, 1, 2]])
    opt = torch.optim.SGD([logits], lr=0.5)
    for _ in range(200):
        loss = topk_reverse_kl(torch.log_softmax(logits, -1), top, target.gather(-1, top), torch.ones(1, 3, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
    probs = torch.softmax(logits.detach(), -1)[0]
    assert torch.allclose(probs[:3], target.exp()[0, :3], atol=0.02)
