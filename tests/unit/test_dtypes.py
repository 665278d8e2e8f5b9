from raydistill.dtypes import cpu_flags, engine_dtype


def test_auto_on_cpu_follows_native_bf16_support():
    assert engine_dtype("auto", "cpu", frozenset({"avx2", "avx512f", "avx512_bf16"})) == "bfloat16"
    assert engine_dtype("auto", "cpu", frozenset({"avx2", "amx_bf16"})) == "bfloat16"
    assert engine_dtype("auto", "cpu", frozenset({"avx2", "avx512f"})) == "float32"  # AVX-512 without BF16
    assert engine_dtype("auto", "cpu", frozenset()) == "float32"


def test_explicit_dtypes_and_gpus_are_left_alone():
    assert engine_dtype("bfloat16", "cpu", frozenset()) == "bfloat16"
    assert engine_dtype("float32", "gpu") == "float32"
    assert engine_dtype("auto", "gpu") == "auto"  # vLLM picks the model's dtype


def test_cpu_flags_reads_this_machine():
    flags = cpu_flags()
    assert isinstance(flags, frozenset)
    assert engine_dtype("auto", "cpu") in ("bfloat16", "float32")
