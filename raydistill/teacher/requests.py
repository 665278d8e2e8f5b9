"""Pure: query rows → vLLM request rows (k per query), and engine outputs → SAMPLES rows."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa

from raydistill.config import TeacherConfig
from raydistill.render import render_prompt
from raydistill.schema import SAMPLES, check_batch, optional_text
from raydistill.tasks.task import REJECT_ENGINE, TaskSpec


def sampling_params(cfg: TeacherConfig, sample_index: int) -> dict[str, Any]:
    params: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    if cfg.stop:
        params["stop"] = list(cfg.stop)
    if cfg.logprobs:
        params["logprobs"] = cfg.logprobs
    if cfg.temperature > 0 and cfg.samples > 1:  # keep in sync with generate.seeded
        # distinct seeds make the k samples of one query differ, reproducibly
        params["seed"] = cfg.seed * 1_000_003 + sample_index
    return params


class TeacherRequests:
    """Ray Data UDF: render the target prompt around each query with the teacher's chat template.

    ``done_ref`` (resume) is an object ref to the sorted hashes of the samples already written
    (``teacher/ledger.py``); those are not requested again. The array is read zero-copy from
    the object store, so every actor on a node shares one copy.
    """

    def __init__(self, model_path: str, tasks: dict[str, TaskSpec], cfg: TeacherConfig, done_ref: Any = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tasks = tasks
        self.cfg = cfg
        self.done = None
        if done_ref is not None:
            import ray

            self.done = ray.get(done_ref[0])  # wrapped in a list so Ray passes the ref, not the value

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return build_requests(batch, self.tokenizer, self.tasks, self.cfg, done=self.done)


def sample_key(query_id: str, sample_index: int) -> str:
    """The exactly-once unit of generate: one sample of one query."""
    return f"{query_id}\t{sample_index}"


def sample_hash(key: str) -> int:
    """A sample key's 64-bit hash: the ledger holds these (8 bytes a sample), not the keys."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "little")


def is_done(key: str, done: np.ndarray | None) -> bool:
    """Membership in the ledger's sorted uint64 array of sample hashes (``teacher/ledger.py``)."""
    if done is None or len(done) == 0:
        return False
    h = np.uint64(sample_hash(key))
    i = int(np.searchsorted(done, h))
    return i < len(done) and done[i] == h


# The columns each UDF of generate reads (schema.check_batch enforces them per batch).
REQUEST_COLUMNS = ("id", "task", "text", "gold")
# (the engine adds generated_text; it is read only for rows without an engine error)
OUTPUT_COLUMNS = ("id", "task", "query", "gold", "sample_index")


def build_requests(
    batch: dict[str, np.ndarray], tokenizer: Any, tasks: dict[str, TaskSpec], cfg: TeacherConfig,
    done: np.ndarray | None = None,
) -> dict[str, Any]:
    """Query rows → request rows, each query wrapped in its own task's target prompt (so the
    engine's prefix cache holds one prefix per task)."""
    check_batch(batch, REQUEST_COLUMNS, "the teacher's request builder")
    out: dict[str, list[Any]] = {k: [] for k in ("id", "task", "query", "gold", "sample_index", "prompt", "sampling_params")}
    for qid, key, text, gold in zip(batch["id"], batch["task"], batch["text"], batch["gold"]):
        todo = [k for k in range(cfg.samples) if not is_done(sample_key(str(qid), k), done)]
        if not todo:
            continue
        task = tasks[str(key)]
        prompt = render_prompt(tokenizer, task.teacher_messages(str(text)), task.assistant_prefix)
        for k in todo:
            out["id"].append(str(qid))
            out["task"].append(str(key))
            out["query"].append(str(text))
            out["gold"].append(optional_text(gold))
            out["sample_index"].append(k)
            out["prompt"].append(prompt)
            out["sampling_params"].append(sampling_params(cfg, k))
    return out


def parse_outputs(batch: dict[str, np.ndarray], *, tasks: dict[str, TaskSpec], teacher_model: str, top_k: int = 0) -> pa.Table:
    """Engine output rows → SAMPLES table: parse each response with its task's parser; engine
    errors become rejects."""
    check_batch(batch, OUTPUT_COLUMNS, "the teacher's output parser")
    n = len(batch["id"])
    errors = batch.get("__inference_error__", np.array([""] * n, dtype=object))
    cols: dict[str, list[Any]] = {name: [] for name in SAMPLES.names}
    for i in range(n):
        error = errors[i]
        key = str(batch["task"][i])
        task = tasks[key]
        response = None if error else str(batch["generated_text"][i])
        reason: str | None
        if error:
            label, valid, reason = None, False, REJECT_ENGINE
        else:
            parsed = task.parse(response)
            label, valid, reason = parsed.label, parsed.valid, parsed.reject_reason
        cols["id"].append(str(batch["id"][i]))
        cols["task"].append(key)
        cols["query"].append(str(batch["query"][i]))
        cols["gold"].append(optional_text(batch["gold"][i]))
        cols["sample_index"].append(int(batch["sample_index"][i]))
        cols["prompt_sha256"].append(task.prompt_sha256)
        cols["teacher_model"].append(teacher_model)
        cols["response"].append(response)
        cols["label"].append(label)
        cols["valid"].append(valid)
        cols["reject_reason"].append(reason)
        cols["num_input_tokens"].append(_int_or_none(batch, "num_input_tokens", i, error))
        cols["num_output_tokens"].append(_int_or_none(batch, "num_generated_tokens", i, error))
        # Without logprobs requested the column holds nulls (NaN after Ray's numpy conversion).
        logprobs = batch["logprobs"][i] if top_k and not error and "logprobs" in batch else None
        flat = flatten_logprobs(batch["generated_tokens"][i], logprobs, top_k) if _is_list(logprobs) else None
        for name, value in zip(LOGPROB_COLUMNS, flat or (None,) * len(LOGPROB_COLUMNS)):
            cols[name].append(value)
    return pa.table(cols, schema=SAMPLES)


LOGPROB_COLUMNS = ("token_ids", "token_logprobs", "top_token_ids", "top_logprobs")


def flatten_logprobs(token_ids: Any, logprobs: Any, top_k: int) -> tuple[list, list, list, list]:
    """vLLM's per-token ``{token_id: {logprob, rank, ...}}`` dicts → four plain numeric lists.

    vLLM returns the top-k alternatives plus the sampled token (which may rank below k), so
    the sampled token's logprob is read by id and the alternatives are those of rank ≤ k.
    """
    ids = [int(t) for t in token_ids]
    own: list[float] = []
    top_ids: list[list[int]] = []
    top_lps: list[list[float]] = []
    for token, entry in zip(ids, logprobs):
        table = {int(t): v for t, v in entry.items()}
        own.append(float(table[token]["logprob"]))
        ranked = sorted((v["rank"], t, v["logprob"]) for t, v in table.items() if v.get("rank") is not None and v["rank"] <= top_k)
        top_ids.append([t for _, t, _ in ranked])
        top_lps.append([float(lp) for _, _, lp in ranked])
    return ids, own, top_ids, top_lps


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _int_or_none(batch: dict[str, np.ndarray], key: str, i: int, error: str) -> int | None:
    if error or key not in batch or batch[key][i] is None:
        return None
    return int(batch[key][i])
