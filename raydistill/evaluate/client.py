"""Evaluation traffic: a Ray Data UDF that sends each (query, system) row as an OpenAI request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from raydistill.schema import EVAL_RESULTS, check_batch, optional_text
from raydistill.tasks.task import TaskSpec

QUERY_COLUMNS = ("id", "task", "text", "gold")  # what expand_systems reads (schema.check_batch)
TRAFFIC_COLUMNS = ("id", "task", "query", "gold", "system")  # what ChatClient reads


def expand_systems(batch: dict[str, np.ndarray], systems: list[str]) -> dict[str, list[Any]]:
    """One query row → one row per system under evaluation (pure)."""
    check_batch(batch, QUERY_COLUMNS, "evaluate's traffic builder")
    out: dict[str, list[Any]] = {"id": [], "task": [], "query": [], "gold": [], "system": []}
    for qid, key, text, gold in zip(batch["id"], batch["task"], batch["text"], batch["gold"]):
        for system in systems:
            out["id"].append(str(qid))
            out["task"].append(str(key))
            out["query"].append(str(text))
            out["gold"].append(optional_text(gold))
            out["system"].append(system)
    return out


def request_body(system: str, query: str, max_tokens: int) -> dict[str, Any]:
    """Every system gets the same bare query; the server adds the teacher's prompt itself."""
    return {"model": system, "messages": [{"role": "user", "content": query}], "max_tokens": max_tokens,
            "temperature": 0.0}


class ChatClient:
    """Sends a batch of rows with bounded concurrency; failures become rows with ``error`` set."""

    def __init__(self, base_url: str, tasks: dict[str, TaskSpec], tagged: bool, max_tokens: int, concurrency: int,
                 timeout_s: float):
        import requests

        self.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(pool_connections=concurrency, pool_maxsize=concurrency)
        self.session.mount("http://", adapter)
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.tasks, self.tagged, self.max_tokens, self.timeout_s = tasks, tagged, max_tokens, timeout_s
        self.pool = ThreadPoolExecutor(max_workers=concurrency)

    def _one(self, system: str, query: str) -> dict[str, Any]:
        wall, started = time.time(), time.perf_counter()
        try:
            resp = self.session.post(self.url, json=request_body(system, query, self.max_tokens), timeout=self.timeout_s)
            latency = time.perf_counter() - started
            if resp.status_code != 200:
                return {"error": f"HTTP {resp.status_code}: {resp.text[:200]}", "latency_s": latency, "started_at": wall}
            body = resp.json()
        except Exception as exc:  # noqa: BLE001 - any transport failure is recorded, not raised
            return {"error": f"{type(exc).__name__}: {exc}"[:300], "latency_s": time.perf_counter() - started,
                    "started_at": wall}
        usage = body.get("usage", {})
        return {"answer": body["choices"][0]["message"]["content"], "latency_s": latency, "started_at": wall,
                "num_input_tokens": usage.get("prompt_tokens"), "num_output_tokens": usage.get("completion_tokens")}

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        check_batch(batch, TRAFFIC_COLUMNS, "evaluate's chat client")
        # several tasks: each is its own model name ("student/<tag>"), the tag added server-side
        models = [f"{s}/{k}" if self.tagged else str(s) for s, k in zip(batch["system"], batch["task"])]
        results = list(self.pool.map(self._one, models, batch["query"]))
        rows = []
        for i, res in enumerate(results):
            task = self.tasks[str(batch["task"][i])]
            parsed = task.parse(res.get("answer")) if not res.get("error") else None
            rows.append({
                "id": str(batch["id"][i]), "task": str(batch["task"][i]), "query": str(batch["query"][i]),
                "gold": optional_text(batch["gold"][i]),
                "system": str(batch["system"][i]), "answer": res.get("answer"),
                "label": parsed.label if parsed else None, "valid": bool(parsed and parsed.valid),
                "error": res.get("error"), "latency_s": res.get("latency_s"), "started_at": res.get("started_at"),
                "num_input_tokens": res.get("num_input_tokens"), "num_output_tokens": res.get("num_output_tokens"),
            })
        return pa.Table.from_pylist(rows, schema=EVAL_RESULTS)
