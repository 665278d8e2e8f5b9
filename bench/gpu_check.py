"""GPU checks of the student training loop (bf16, DeepSpeed ZeRO), for a machine without Ray.

The CPU test suite runs the whole training stage for real, but only in fp32 on CPU. This script
runs the same per-step code (``student.step.train_step``: collate → answer-only loss →
DeepSpeed backward/step), the same model builder and DeepSpeed config, and the same export, on
one GPU in bf16, next to a plain transformers + PEFT bf16 loop on the same batches:

    python bench/gpu_check.py --tokenizer DIR --samples FILE.parquet --out DIR

with raydistill installed in that Python (``pip install -c constraints-gpu.txt -e ".[gpu,dev]"``
from the repository root, as docs/cluster.md sets up a GPU machine).

Modes, each in its own process (DeepSpeed ZeRO-3 patches module init globally):
  plain          transformers + PEFT LoRA, bf16 weights, torch AdamW, the model's own loss;
  ds0/ds2/ds3    raydistill's loop step, LoRA, DeepSpeed bf16 with ZeRO stage 0/2/3;
  ds2-fp32       the same at fp32 (what bf16 buys);
  kl             ZeRO-2 bf16 with the top-k KL term (synthetic teacher top-k) on the small model;
  export-lora3   ZeRO-3 LoRA: train, export adapter + merged, reload both with transformers/PEFT;
  export-full3   ZeRO-3 full fine-tuning: train, export the consolidated 16-bit weights, reload.
The model is random-initialised (no hub there): a SmolLM2-1.7B-shaped Llama for speed, the
SmolLM2-135M shape for the numerics and export checks. Writes ``gpu_check.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from common import RESULTS

if TYPE_CHECKING:
    from raydistill.config import TrainConfig

# SmolLM2-1.7B's shape (same tokenizer and chat template as the 135M model).
LARGE = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
         "num_key_value_heads": 32, "head_dim": 64}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 16}
MODES = ["plain", "ds0", "ds2", "ds3", "ds2-fp32", "kl", "export-lora3", "export-full3"]


def train_settings(zero_stage: int, dtype: str, method: str = "lora", kl_weight: float = 0.0,
                   learning_rate: float = 2e-4) -> TrainConfig:
    from raydistill.config import TrainConfig

    return TrainConfig(
        method=method, zero_stage=zero_stage, dtype=dtype, use_gpu=True, batch_size_per_worker=32,
        lora_rank=32, lora_alpha=64, lora_target_modules=["all-linear"], learning_rate=learning_rate, warmup_ratio=0.0,
        target="response" if kl_weight else "label", kl_weight=kl_weight,
    )


def make_model(tokenizer_dir: Path, out: Path, shape: dict[str, int]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file():
        return
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tokenizer_dir)
    for key, value in shape.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)


def batches(model_dir: Path, samples: Path, n_batches: int, batch_size: int, soft: bool) -> tuple[list[dict], int]:
    """Length-bucketed batches of real langid examples, built by the training stage's own code."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from raydistill.student.examples import bucket_batches, build_examples_batch
    from raydistill.tasks.task import load_task

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = pq.read_table(samples).filter(pc.field("valid")).to_pydict()  # as the stage does: valid rows only
    rows = {k: np.asarray(v, dtype=object) for k, v in rows.items()}
    if soft:  # synthetic teacher top-k at each response token: the true token plus 4 others
        rng = np.random.default_rng(0)
        ids, top_ids, top_lps = [], [], []
        for response in rows["response"]:
            toks = tokenizer(response or " English", add_special_tokens=False)["input_ids"][:16]
            ids.append(toks)
            top_ids.append([[t, *rng.integers(0, tokenizer.vocab_size, 4).tolist()] for t in toks])
            top_lps.append([sorted(rng.normal(-3, 1, 5).tolist(), reverse=True) for _ in toks])
        rows.update(token_ids=_obj(ids), top_token_ids=_obj(top_ids), top_logprobs=_obj(top_lps))
    examples = build_examples_batch(rows, tokenizer=tokenizer, tasks={"langid": load_task("langid")},
                                    target="response" if soft else "label", max_seq_len=512, soft=soft)
    rng = np.random.default_rng(0)
    out: list[dict] = []
    while len(out) < n_batches:
        out.extend(bucket_batches(examples, batch_size, rng))
    return out[:n_batches], tokenizer.pad_token_id


def _obj(items: list) -> np.ndarray:
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script with --tiny


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_mem_gib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(step_fn, data: list[dict], warmup: int) -> dict[str, Any]:
    losses, tokens, t0 = [], 0, None
    for i, batch in enumerate(data):
        if i == warmup:
            sync()
            t0, tokens = time.perf_counter(), 0
        loss, n = step_fn(batch)
        losses.append(loss)
        tokens += n
    sync()
    if t0 is None:
        raise ValueError(f"warmup {warmup} leaves none of the {len(data)} batches to time")
    wall = time.perf_counter() - t0
    return {"tokens_per_s": round(tokens / wall, 1), "step_s": round(wall / (len(data) - warmup), 4),
            "timed_steps": len(data) - warmup, "loss_first": losses[0], "loss_last5": float(np.mean(losses[-5:])),
            "losses": [round(x, 4) for x in losses], "peak_mem_gib": round(peak_mem_gib(), 2)}


def run_plain(model_dir: Path, data: list[dict], pad_id: int, warmup: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from raydistill.student.examples import collate

    s = train_settings(0, "bf16")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).to(device())
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=s.lora_rank, lora_alpha=s.lora_alpha, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.learning_rate)

    def step(batch: dict) -> tuple[float, int]:
        arrays = {k: torch.from_numpy(v).to(device()) for k, v in collate(batch, pad_id).items()}
        loss = model(**arrays).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach()), int(arrays["attention_mask"].sum())

    return timed(step, data, warmup)


def init_engine(model_dir: Path, train: TrainConfig) -> Any:
    """The training stage's own engine builder, on a one-rank process group instead of Ray's."""
    import torch

    from raydistill.student.engine import build_engine, skip_shm_comm_build

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    if device() == "cuda":
        torch.cuda.set_device(0)
    torch.distributed.init_process_group("nccl" if device() == "cuda" else "gloo")
    skip_shm_comm_build()  # as in the loop: no JIT build
    return build_engine(str(model_dir), train, total_steps=1000)[0]


def run_deepspeed(model_dir: Path, data: list[dict], pad_id: int, warmup: int, train: TrainConfig) -> dict[str, Any]:
    from raydistill.student.step import train_step

    engine = init_engine(model_dir, train)
    return timed(lambda batch: train_step(engine, batch, pad_id, train.kl_weight), data, warmup)


def run_export(model_dir: Path, data: list[dict], pad_id: int, method: str, work: Path) -> dict[str, Any]:
    """Train a few steps under ZeRO-3 bf16, export as the stage does, reload what was written,
    and compare its logits with the trained engine's own (bf16) forward on the same batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from raydistill.student.examples import collate
    from raydistill.student.export import export
    from raydistill.student.step import train_step

    train = train_settings(3, "bf16", method=method, learning_rate=1e-3 if method == "lora" else 1e-4)
    engine = init_engine(model_dir, train)
    result = timed(lambda batch: train_step(engine, batch, pad_id, 0.0), data, 2)
    export_dir = work / f"export-{method}"
    export(engine, train, str(model_dir), export_dir, rank=0)
    probe = {k: torch.from_numpy(v).to(device()) for k, v in collate(data[0], pad_id).items()}
    engine.eval()
    with torch.no_grad():
        trained = engine.module(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(export_dir / "merged", dtype=torch.float32).to(device()).eval()
        reloaded = merged(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device()).eval()
        before = base(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    mask = probe["attention_mask"].bool()
    result.update(
        files=sorted(str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file()),
        # export error: reloaded fp32 export vs the engine's bf16 forward; training effect: vs the base
        max_abs_logit_diff_vs_engine=float((reloaded - trained)[mask].abs().max()),
        max_abs_logit_change_vs_base=float((reloaded - before)[mask].abs().max()),
        argmax_agreement_vs_engine=float((reloaded.argmax(-1) == trained.argmax(-1))[mask].float().mean()),
    )
    if method == "lora":
        from peft import PeftModel

        with torch.no_grad():
            peft_model = PeftModel.from_pretrained(base, str(export_dir / "adapter")).eval()
            via_adapter = peft_model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
        result["max_abs_logit_diff_adapter_vs_merged"] = float((via_adapter - reloaded)[mask].abs().max())
    return result


def child(args: argparse.Namespace) -> None:

    work = Path(args.work)
    large, small = work / "model-1.7b", work / "model-135m"
    mode = args.mode
    model_dir = large if mode in ("plain", "ds0", "ds2", "ds3", "ds2-fp32") else small
    data, pad_id = batches(model_dir, Path(args.samples), args.steps, 32, soft=mode == "kl")
    if mode == "plain":
        result = run_plain(model_dir, data, pad_id, args.warmup)
    elif mode.startswith("ds"):
        stage, dtype = int(mode[2]), "fp32" if mode.endswith("fp32") else "bf16"
        result = run_deepspeed(model_dir, data, pad_id, args.warmup, train_settings(stage, dtype))
    elif mode == "kl":
        result = run_deepspeed(model_dir, data, pad_id, 2, train_settings(2, "bf16", kl_weight=0.5))
        result["kl_weight"] = 0.5
    else:
        result = run_export(model_dir, data, pad_id, "lora" if mode == "export-lora3" else "full", work)
    result["model"] = model_dir.name
    result["params_billion"] = round(sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 2 / 1e9, 3)  # bf16 files
    print("GPU-RESULT " + json.dumps(result), flush=True)


def parent(args: argparse.Namespace) -> None:
    import torch

    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    make_model(Path(args.tokenizer), work / "model-1.7b", TINY if args.tiny else LARGE)
    make_model(Path(args.tokenizer), work / "model-135m", TINY if args.tiny else {})
    meta = {"device": torch.cuda.get_device_name(0) if device() == "cuda" else "cpu (dry run)", "torch": torch.__version__, "python": sys.version.split()[0],
            "model_build_s": round(time.time() - t0, 1)}
    for pkg in ("transformers", "peft", "deepspeed"):
        try:
            meta[pkg] = __import__(pkg).__version__
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            meta[pkg] = f"import failed: {err}"
    results: dict[str, Any] = {"meta": meta, "modes": {}}
    for mode in args.modes.split(","):
        started = time.time()
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--work", str(work), "--samples", args.samples,
               "--steps", str(args.steps), "--warmup", str(args.warmup), *(["--tiny"] if args.tiny else [])]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.mode_timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("GPU-RESULT ")]
            entry = json.loads(lines[-1][len("GPU-RESULT "):]) if lines else {"error": proc.stderr[-3000:], "rc": proc.returncode}
        except subprocess.TimeoutExpired as err:
            entry = {"error": f"timed out after {args.mode_timeout}s", "stderr": (err.stderr or b"")[-2000:].decode(errors="replace")}
        entry["wall_s"] = round(time.time() - started, 1)
        results["modes"][mode] = entry
        print(f"[gpu-check] {mode}: " + json.dumps({k: v for k, v in entry.items() if k != "losses"})[:1500], flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    plain = results["modes"].get("plain", {}).get("tokens_per_s")
    if plain:
        results["ratios_vs_plain"] = {m: round(v["tokens_per_s"] / plain, 3) for m, v in results["modes"].items()
                                      if "tokens_per_s" in v and v.get("model") == "model-1.7b"}
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results.get("ratios_vs_plain", {})), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", help="folder with the SmolLM2 tokenizer and config")
    parser.add_argument("--samples", required=True, help="teacher samples Parquet (query, label, response, ...)")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--work", default="/tmp/gpu-check")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--mode-timeout", type=int, default=240)
    parser.add_argument("--tiny", action="store_true", help="dry run: a tiny 'large' model (for CPU)")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--mode")
    args = parser.parse_args()
    if importlib.util.find_spec("raydistill") is None:
        raise SystemExit("raydistill is not installed in this Python: from the repository root run "
                         "pip install -c constraints-gpu.txt -e '.[gpu,dev]' (docs/cluster.md), then this again")
    if args.child:
        try:
            child(args)
        except Exception:
            traceback.print_exc()
            sys.exit(1)
    else:
        parent(args)


if __name__ == "__main__":
    main()
