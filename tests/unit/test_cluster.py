"""The cluster manifests and job entrypoints: schema-valid, consistent with each other and
with the pinned stack, and naming modules and configs that exist."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from raydistill.config import load_config

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "cluster" / "kuberay"
LAUNCHER = REPO / "cluster" / "launcher" / "aws-gpu.yaml"
K8S_VERSION = "1.33"
STAGES = ("generate", "train", "serve", "evaluate", "run")


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pod_templates(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"] for g in groups]


def as_pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": template["spec"]}


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return load(KUBERAY / "raycluster.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return load(KUBERAY / "rayjob.yaml")


def test_raycluster_matches_pinned_ray_and_declares_gpus(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    for template in pod_templates(spec):
        for container in template["spec"]["containers"]:
            assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py311-gpu", container["image"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head runs no work
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1


def test_pod_templates_are_valid_kubernetes(raycluster, rayjob):
    for spec in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        for template in pod_templates(spec):
            kubernetes_validate.validate(as_pod(template), K8S_VERSION, strict=True)


def test_the_validator_rejects_a_broken_pod_template(raycluster):
    broken = copy.deepcopy(pod_templates(raycluster["spec"])[1])
    broken["spec"]["containers"][0]["resourcess"] = broken["spec"]["containers"][0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod(broken), K8S_VERSION, strict=True)


def test_rayjob_runs_a_real_entrypoint_on_the_same_cluster(raycluster, rayjob):
    assert rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    assert (REPO / (argv[2].replace(".", "/") + ".py")).is_file()
    cfg = load_config(REPO / argv[3])
    assert cfg.teacher.accelerator == "gpu" and cfg.train.use_gpu
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env.pop("working_dir").endswith(".zip")  # a cluster-fetchable archive
    assert runtime_env == load(REPO / "jobs" / "runtime_env_gpu.yaml")


def test_rayservice_serves_the_app_builder_on_the_same_cluster(raycluster):
    from ray.serve.schema import ServeDeploySchema

    service = load(KUBERAY / "rayservice.yaml")
    assert service["kind"] == "RayService" and service["spec"]["rayClusterConfig"] == raycluster["spec"]
    for template in pod_templates(service["spec"]["rayClusterConfig"]):
        kubernetes_validate.validate(as_pod(template), K8S_VERSION, strict=True)
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert serve_config.http_options.host == "0.0.0.0"  # reachable through the head's service
    (application,) = serve_config.applications
    module, name = application.import_path.split(":")
    assert module == "raydistill.serve.deploy" and name == "app"
    cfg = load_config(REPO / application.args["config"])
    assert cfg.serve.accelerator == "gpu" and cfg.serve.host == "0.0.0.0"
    runtime_env = dict(application.runtime_env)
    assert runtime_env.pop("working_dir").endswith(".zip")
    assert runtime_env == load(REPO / "jobs" / "runtime_env_gpu.yaml")


def test_serve_run_builds_the_app_from_its_arguments(tmp_path):
    """What `serve run raydistill.serve.deploy:app config=... overrides=...` does, short of running it."""
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary

    from raydistill.serve.deploy import app

    model = tmp_path / "model"  # a local model folder: nothing is fetched or loaded while building
    model.mkdir()
    (model / "config.json").write_text("{}")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"), "queries": {"train_path": "x", "eval_path": "y"},
                                      "teacher": {"model": str(model)}, "train": {"student_model": str(model)}}))
    built = call_user_app_builder_with_args_if_necessary(app, {"config": str(config), "overrides": "serve.port=8123"})
    assert isinstance(built, Application)
    with pytest.raises(Exception, match="extra"):  # a misspelt argument is refused, not ignored
        call_user_app_builder_with_args_if_necessary(app, {"config": str(config), "overide": "x"})


def test_launcher_yaml_is_valid_for_ray_and_matches_kuberay(raycluster):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = load(LAUNCHER)
    jsonschema.validate(config, schema)
    assert config["docker"]["image"] == pod_templates(raycluster["spec"])[0]["spec"]["containers"][0]["image"]
    workers = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert workers and all(t["max_workers"] >= 1 for t in workers)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_gpu_runtime_env_pins_the_stack():
    env = load(REPO / "jobs" / "runtime_env_gpu.yaml")
    pinned = dict(line.split("==") for line in (REPO / "constraints-cpu.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    for requirement in env["pip"]["packages"]:
        name, version = requirement.split("==")
        assert pinned.get(name, pinned.get(f"{name}-cpu")) == version, requirement


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_documented_job_entrypoint(stage):
    module = REPO / "jobs" / f"{stage}.py"
    text = module.read_text()
    for env in ("cpu", "gpu"):
        line = next(ln.strip() for ln in text.splitlines() if f"runtime_env_{env}.yaml" in ln and "ray job submit" in ln)
        argv = shlex.split(line)
        assert argv[:3] == ["ray", "job", "submit"]
        runtime_env = argv[argv.index("--runtime-env") + 1]
        assert (REPO / runtime_env).is_file()
        command = argv[argv.index("--") + 1 :]
        assert command[:3] == ["python", "-m", f"jobs.{stage}"] and (REPO / command[3]).is_file()
    assert f"python -m jobs.{stage}" in (REPO / "README.md").read_text()
    assert f'main(["{stage}", *sys.argv[1:]])' in text


def test_runtime_envs_keep_local_state_out_of_the_upload():
    for env in ("cpu", "gpu"):
        excludes = load(REPO / "jobs" / f"runtime_env_{env}.yaml")["excludes"]
        assert {".venv/", ".git/", "runs/"} <= set(excludes)


# What rayproject/ray:<version>-py311-gpu already has (Ray's own dependencies), and what a pinned
# package pulls in; everything else raydistill needs must be in the GPU runtime env.
RAY_IMAGE_PROVIDES = {"ray", "pyarrow", "pydantic", "pyyaml", "requests", "psutil"}
PULLED_IN = {"torch": "vllm"}


def test_gpu_runtime_env_installs_every_runtime_dependency():
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = {Requirement(r).name.lower() for r in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]}
    needed |= {"language_data"}  # langcodes[data]
    packages = {line.split("==")[0].lower() for line in load(REPO / "jobs" / "runtime_env_gpu.yaml")["pip"]["packages"]}
    missing = needed - packages - RAY_IMAGE_PROVIDES - set(PULLED_IN)
    assert not missing, f"jobs/runtime_env_gpu.yaml lacks {sorted(missing)}"
    assert all(parent in packages for parent in PULLED_IN.values())


def test_job_commands_never_rely_on_the_console_script():
    """A working_dir upload installs no `raydistill` script on the cluster's nodes; `python -m` works."""
    files = [*REPO.glob("raydistill/**/*.py"), *REPO.glob("jobs/**/*"), *REPO.glob("cluster/**/*"), REPO / "README.md"]
    console = re.compile(r"--\s*(\\\s*#?\s*)?raydistill ")  # also across a shell line continuation
    bad = [str(f.relative_to(REPO)) for f in files if f.is_file() and console.search(f.read_text(errors="ignore"))]
    assert not bad, f"use `-- python -m raydistill <verb>` in {bad}"


def _pins(path: Path) -> dict[str, str]:
    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return {name.lower(): version for name, version in (ln.split("==") for ln in lines if "==" in ln)}


def test_one_pinned_gpu_stack_everywhere():
    """constraints-gpu.txt is the GPU stack; the runtime env, the RayJob, the image and the extra agree with it."""
    import tomllib

    gpu = _pins(REPO / "constraints-gpu.txt")
    cpu = _pins(REPO / "constraints-cpu.txt")
    for name, version in gpu.items():  # the CPU tests run the same Python code
        assert cpu.get(name, cpu.get(f"{name}-cpu")) == version, name
    runtime = {r.split("==")[0].lower(): r.split("==")[1] for r in load(REPO / "jobs" / "runtime_env_gpu.yaml")["pip"]["packages"]}
    assert runtime == {k: v for k, v in gpu.items() if k != "ray"}  # Ray comes with the image
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{gpu['ray']}-py311-gpu" in dockerfile and "-c /tmp/constraints-gpu.txt" in dockerfile
    assert all(name in dockerfile.split("RUN pip install")[1] for name in runtime)
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert f"vllm=={gpu['vllm']}" in extra
