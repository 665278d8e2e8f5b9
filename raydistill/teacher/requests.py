"""Pure: query rows → vLLM request rows (k per query), and engine outputs → SAMPLES rows."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raydistill.config import TeacherConfig
from raydistill.render import render_prompt
from raydistill.schema import SAMPLES
from raydistill.tasks.task import REJECT_ENGINE, TaskSpec


def sampling_params(cfg: TeacherConfig, sample_index: int) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    if cfg.temperature > 0 and cfg.samples_per_query > 1:
        # distinct seeds make the k samples of one query differ reproducibly
        params["seed"] = cfg.seed * 1_000_003 + sample_index
    return params


class TeacherRequests:
    """Ray Data UDF: render the target prompt around each query with the teacher's chat template."""

    def __init__(self, model_path: str, task: TaskSpec, cfg: TeacherConfig):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.task = task
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return build_requests(batch, self.tokenizer, self.task, self.cfg)


def build_requests(batch: dict[str, np.ndarray], tokenizer: Any, task: TaskSpec, cfg: TeacherConfig) -> dict[str, Any]:
    out: dict[str, list[Any]] = {k: [] for k in ("id", "query", "gold", "sample_index", "prompt", "sampling_params")}
    for qid, text, gold in zip(batch["id"], batch["text"], batch["gold"]):
        prompt = render_prompt(tokenizer, task.teacher_messages(str(text)), task.assistant_prefix)
        for k in range(cfg.samples_per_query):
            out["id"].append(str(qid))
            out["query"].append(str(text))
            out["gold"].append(None if gold is None else str(gold))
            out["sample_index"].append(k)
            out["prompt"].append(prompt)
            out["sampling_params"].append(sampling_params(cfg, k))
    return out


def parse_outputs(batch: dict[str, np.ndarray], *, task: TaskSpec, teacher_model: str) -> pa.Table:
    """Engine output rows → SAMPLES table: parse each response; engine errors become rejects."""
    n = len(batch["id"])
    errors = batch.get("__inference_error__", np.array([""] * n, dtype=object))
    cols: dict[str, list[Any]] = {name: [] for name in SAMPLES.names}
    for i in range(n):
        error = errors[i]
        response = None if error else str(batch["generated_text"][i])
        if error:
            label, valid, reason = None, False, REJECT_ENGINE
        else:
            parsed = task.parse(response)
            label, valid, reason = parsed.label, parsed.valid, parsed.reject_reason
        cols["id"].append(str(batch["id"][i]))
        cols["query"].append(str(batch["query"][i]))
        cols["gold"].append(None if batch["gold"][i] is None else str(batch["gold"][i]))
        cols["sample_index"].append(int(batch["sample_index"][i]))
        cols["prompt_sha256"].append(task.prompt_sha256)
        cols["teacher_model"].append(teacher_model)
        cols["response"].append(response)
        cols["label"].append(label)
        cols["valid"].append(valid)
        cols["reject_reason"].append(reason)
        cols["num_input_tokens"].append(_int_or_none(batch, "num_input_tokens", i, error))
        cols["num_output_tokens"].append(_int_or_none(batch, "num_generated_tokens", i, error))
    return pa.table(cols, schema=SAMPLES)


def _int_or_none(batch: dict[str, np.ndarray], key: str, i: int, error: str) -> int | None:
    if error or key not in batch or batch[key][i] is None:
        return None
    return int(batch[key][i])
