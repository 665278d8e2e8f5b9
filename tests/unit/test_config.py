from pathlib import Path

import pytest

from raydistill.config import PipelineConfig, apply_overrides, load_config
from raydistill.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.run_dir


def test_shipped_configs_exist():
    names = {p.name for p in SHIPPED}
    assert "demo_cpu.yaml" in names
    assert any("gpu" in n for n in names)


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


BASE = "run_dir: r\nqueries: {train_path: a.jsonl, eval_path: b.jsonl}\n"


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["teacher.temperature=0.7", "train.max_steps=3",
                                                "train.lora_target_modules=[q_proj]", "serve.enforce_eager=true"])
    assert cfg.teacher.temperature == 0.7
    assert cfg.train.max_steps == 3
    assert cfg.train.lora_target_modules == ["q_proj"]
    assert cfg.serve.enforce_eager is True


def test_unknown_key_is_named_with_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'teacher.temprature'; did you mean 'teacher.temperature'"):
        load_config(_write(tmp_path, BASE + "teacher: {temprature: 0.5}\n"))
    with pytest.raises(ConfigError, match="unknown key 'techer'; did you mean 'teacher'"):
        load_config(_write(tmp_path, BASE), ["techer.model=x"])
    with pytest.raises(ConfigError, match="unknown key 'train.zzz'; remove it .* config show"):
        load_config(_write(tmp_path, BASE), ["train.zzz=1"])


def _fields(model, prefix=""):
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from _fields(field.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_config_key_is_described():
    from raydistill.config import AutoscalingConfig

    assert [key for key, field in _fields(PipelineConfig) if not field.description] == []
    assert [key for key, field in _fields(AutoscalingConfig) if not field.description] == []  # an optional section


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_config_show_lists_every_key_with_its_description_and_reads_back(path):
    import yaml

    from raydistill.config import render_config

    cfg = load_config(path)
    text = render_config(cfg)
    lines: dict[str, str] = {}
    path: list[str] = []  # the keys above this line, by indentation (two spaces a level)
    for line in text.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        path = [*path[:depth], line.strip().split(":")[0]]
        lines[".".join(path)] = line
    for key, field in _fields(PipelineConfig):
        if cfg.tasks is not None and key.startswith("task."):
            continue  # several tasks: `task` is not shown
        assert lines[key].endswith(f"# {field.description}"), key
    assert PipelineConfig.model_validate(yaml.safe_load(text)) == cfg  # the comments are only comments


def test_unknown_override_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'nosuch'"):
        load_config(_write(tmp_path, BASE), ["nosuch.x=1"])


def test_bad_value_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"bad value for 'train.zero_stage'.*got 5"):
        load_config(_write(tmp_path, BASE), ["train.zero_stage=5"])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required key 'queries'"):
        load_config(_write(tmp_path, "run_dir: r\n"))


def test_missing_file_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(_write(tmp_path, "run_dir: [unclosed\n"))


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["teacher.temperature"])


def test_tensor_parallel_needs_gpu(tmp_path):
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_config(_write(tmp_path, BASE), ["teacher.tensor_parallel_size=2"])


def test_serve_replicas_fixed_or_autoscaled():
    from raydistill.config import ServeConfig
    from raydistill.serve.app import replica_options

    assert replica_options(ServeConfig(num_replicas=3)) == {"num_replicas": 3}
    auto = replica_options(ServeConfig(autoscaling={"min_replicas": 0, "max_replicas": 5}))
    assert auto["num_replicas"] == "auto" and auto["autoscaling_config"]["max_replicas"] == 5
    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(autoscaling={"min_replicas": 6, "max_replicas": 5})
