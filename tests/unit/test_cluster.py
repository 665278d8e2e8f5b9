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
# The one image every manifest runs: cluster/Dockerfile's documented tag, <registry>/raydistill:<version>-gpu
# (a placeholder registry; the version is pyproject.toml's).
IMAGE = "registry.example.com/your-org/raydistill:0.1.0-gpu"
# rayproject/ray images run as the user `ray`: uid 1000, primary group `users` (gid 100).
RAY_UID, RAY_GID = 1000, 100
OBJECT_STORE_SECRET = "raydistill-object-store"
# The KubeRay manifests holding a Ray cluster spec, and where in each the spec sits.
CLUSTER_SPECS = {"raycluster.yaml": ("spec",), "rayjob.yaml": ("spec", "rayClusterSpec"),
                 "rayservice.yaml": ("spec", "rayClusterConfig")}


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pod_templates(cluster_spec: dict) -> list[dict]:
    groups = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    return [g["template"] for g in groups]


def as_pod(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": template["spec"]}


def all_pod_templates() -> list[tuple[str, dict]]:
    """(file name, pod template) for every head and worker group of every KubeRay manifest."""
    found = []
    for name, keys in CLUSTER_SPECS.items():
        spec = load(KUBERAY / name)
        for key in keys:
            spec = spec[key]
        found += [(name, template) for template in pod_templates(spec)]
    return found


def project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


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
            # was the bare rayproject/ray:<ray>-py311-gpu; cluster/Dockerfile's image (FROM that one) adds raydistill
            assert container["image"] == IMAGE, "the pods run cluster/Dockerfile's image, not the bare Ray image"
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


def without_pip(runtime_env: dict) -> dict:
    return {key: value for key, value in runtime_env.items() if key != "pip"}


def test_rayjob_runs_a_real_entrypoint_on_the_same_cluster(raycluster, rayjob):
    assert rayjob["kind"] == "RayJob"
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"] and argv[2].startswith("jobs.")
    assert (REPO / (argv[2].replace(".", "/") + ".py")).is_file()
    cfg = load_config(REPO / argv[3])
    assert cfg.teacher.accelerator == "gpu" and cfg.train.use_gpu
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    working_dir = runtime_env.pop("working_dir")
    assert working_dir.endswith(f"/v{project_version()}.zip")  # a cluster-fetchable archive: the image's version
    assert runtime_env == without_pip(load(REPO / "jobs" / "runtime_env_gpu.yaml")), (
        "the RayJob's runtime env is jobs/runtime_env_gpu.yaml less `pip`: the image already holds that stack")


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
    assert runtime_env.pop("working_dir").endswith(f"/v{project_version()}.zip")
    assert runtime_env == without_pip(load(REPO / "jobs" / "runtime_env_gpu.yaml")), (
        "the Serve app's runtime env is jobs/runtime_env_gpu.yaml less `pip`: the image already holds that stack")


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
    assert config["docker"]["image"] == pod_templates(raycluster["spec"])[0]["spec"]["containers"][0]["image"] == IMAGE
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
    assert f"python -m jobs.{stage}" in (REPO / "docs" / "cluster.md").read_text()  # the README links there
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
    assert f"FROM rayproject/ray:{gpu['ray']}-py311-gpu" in dockerfile
    # The image installs raydistill[gpu] under constraints-gpu.txt (no package list of its own, so
    # nothing to keep in step): every pin must then reach a requirement of raydistill[gpu].
    assert re.search(r'pip install [^\n]*-c /tmp/raydistill/constraints-gpu\.txt "/tmp/raydistill\[gpu\]"', dockerfile)
    stray = set(gpu) - gpu_extra_requirements() - set(PULLED_IN)
    assert not stray, f"pins in constraints-gpu.txt that raydistill[gpu] never asks for: {sorted(stray)}"
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert f"vllm=={gpu['vllm']}" in extra


def gpu_extra_requirements() -> set[str]:
    """The distribution names `pip install "raydistill[gpu]"` asks for directly."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["gpu"]]]
    return {r.name.lower() for r in requirements}


# The manifests of cluster/ as Kubernetes and the cluster launcher read them: pure checks on the files.

CLUSTER_YAML = sorted((REPO / "cluster").rglob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTER_YAML, ids=lambda p: str(p.relative_to(REPO / "cluster")))
def test_every_manifest_parses(path):
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert documents and all(isinstance(d, dict) for d in documents)
    if path.parent == KUBERAY:
        assert all({"apiVersion", "kind", "metadata"} <= set(d) for d in documents)
        for document in documents:  # the YAML held in strings parses too
            for embedded in ("runtimeEnvYAML", "serveConfigV2"):
                if embedded in document.get("spec", {}):
                    assert isinstance(yaml.safe_load(document["spec"][embedded]), dict)


def test_every_kuberay_manifest_is_checked():
    assert {p.name for p in KUBERAY.glob("*.yaml")} == {*CLUSTER_SPECS, "shared-pvc.yaml", "serviceaccount.yaml"}


def test_shared_pvc_and_service_account_are_valid_kubernetes():
    (pvc,) = yaml.safe_load_all((KUBERAY / "shared-pvc.yaml").read_text())
    kubernetes_validate.validate(pvc, K8S_VERSION, strict=True)
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"]
    # storageClassName stays a placeholder to replace: a default (usually ReadWriteOnce) class would not do
    assert pvc["spec"]["storageClassName"] == "replace-me-rwx"
    assert "PLACEHOLDER" in (KUBERAY / "shared-pvc.yaml").read_text()
    (account,) = yaml.safe_load_all((KUBERAY / "serviceaccount.yaml").read_text())
    kubernetes_validate.validate(account, K8S_VERSION, strict=True)
    assert account["kind"] == "ServiceAccount"
    text = (KUBERAY / "serviceaccount.yaml").read_text()
    assert "eks.amazonaws.com/role-arn" in text and "iam.gke.io/gcp-service-account" in text  # commented placeholders


def test_every_mounted_claim_is_defined_in_shared_pvc():
    defined = {d["metadata"]["name"] for d in yaml.safe_load_all((KUBERAY / "shared-pvc.yaml").read_text())
               if d["kind"] == "PersistentVolumeClaim"}
    mounted = {}
    for name, template in all_pod_templates():
        for volume in template["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                mounted.setdefault(volume["persistentVolumeClaim"]["claimName"], set()).add(name)
    assert mounted and set(mounted) <= defined, f"claims without a PVC in shared-pvc.yaml: {set(mounted) - defined}"
    for name in set().union(*mounted.values()):  # the manifest says to apply the PVC first
        assert "shared-pvc.yaml" in (KUBERAY / name).read_text(), name


def test_every_pod_runs_as_the_ray_user_with_the_service_account_and_the_optional_secret():
    (account,) = yaml.safe_load_all((KUBERAY / "serviceaccount.yaml").read_text())
    templates = all_pod_templates()
    assert len(templates) == 2 * len(CLUSTER_SPECS)  # a head and a worker group each
    for name, template in templates:
        spec = template["spec"]
        security = spec.get("securityContext", {})
        assert security.get("fsGroup") == RAY_GID, f"{name}: fsGroup {RAY_GID} makes the shared volume writable"
        assert (security.get("runAsUser"), security.get("runAsGroup")) == (RAY_UID, RAY_GID), name
        assert spec.get("serviceAccountName") == account["metadata"]["name"], name
        for container in spec["containers"]:
            secrets = [source["secretRef"] for source in container.get("envFrom", []) if "secretRef" in source]
            assert {"name": OBJECT_STORE_SECRET, "optional": True} in secrets, f"{name}: {container['name']}"


def test_every_image_is_the_dockerfiles_tag():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    (documented,) = re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", dockerfile)
    assert documented == IMAGE and f"docker push {IMAGE}" in dockerfile
    name, tag = IMAGE.rsplit(":", 1)
    assert name.endswith("/raydistill") and tag == f"{project_version()}-gpu"
    images = {(name, c["name"]): c["image"] for name, t in all_pod_templates() for c in t["spec"]["containers"]}
    launcher = load(LAUNCHER)["docker"]
    images |= {("aws-gpu.yaml", key): launcher[key] for key in ("image", "head_image", "worker_image") if key in launcher}
    wrong = {where: image for where, image in images.items() if image != IMAGE}
    assert len(images) == 2 * len(CLUSTER_SPECS) + 1 and not wrong, wrong
    readme = (REPO / "cluster" / "README.md").read_text()
    assert IMAGE in readme and f"rayproject/ray:{ray.__version__}-py311-gpu" in readme  # the image, and the bare alternative


def test_the_dockerfile_installs_raydistill_itself():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    lines = [ln for ln in dockerfile.replace("\\\n", " ").splitlines() if ln and not ln.startswith("#")]
    copied = {src for ln in lines if ln.startswith("COPY") for src in ln.split()[1:-1] if not src.startswith("--")}
    assert {"pyproject.toml", "README.md", "constraints-gpu.txt", "raydistill/", "jobs/"} <= copied
    assert all("--chown=1000:100" in ln for ln in lines if ln.startswith("COPY"))  # pip builds in the copy, as uid 1000
    (install,) = [ln for ln in lines if ln.startswith("RUN pip install")]
    assert '"/tmp/raydistill[gpu]"' in install and " -e " not in install and "--editable" not in install
    # the build context: cluster/Dockerfile.dockerignore ignores everything but what is copied
    ignore = [ln for ln in (REPO / "cluster" / "Dockerfile.dockerignore").read_text().splitlines() if ln and ln[0] != "#"]
    assert ignore[0] == "*" and all(f"!{src}" in ignore for src in copied)
    assert "ENV PYTHONPATH=/home/ray/raydistill" in lines and any("/home/ray/raydistill/jobs/" in ln for ln in lines)


def test_gpu_runtime_env_allows_time_to_install_the_stack():
    from ray.runtime_env import RuntimeEnv, RuntimeEnvConfig

    env = load(REPO / "jobs" / "runtime_env_gpu.yaml")
    config = env["config"]
    assert set(config) <= RuntimeEnvConfig.known_fields  # Ray only warns about a misspelt key
    assert isinstance(config["setup_timeout_seconds"], int) and config["setup_timeout_seconds"] >= 1800
    RuntimeEnv(**env)  # Ray's own validation of the whole env, no cluster needed
