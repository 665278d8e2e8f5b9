"""The committed tokenizer fixture is still the built-in model's tokenizer and chat template."""

import pytest

pytestmark = pytest.mark.integration


def test_committed_tokenizer_matches_the_materialized_model(smollm2_tokenizer):
    from transformers import AutoTokenizer

    from raydistill.models import resolve_model

    real = AutoTokenizer.from_pretrained(resolve_model("builtin:smollm2-135m-instruct"))
    chat = [{"role": "user", "content": "Hola, ¿qué tal? 你好 12345"}]
    assert smollm2_tokenizer.get_vocab() == real.get_vocab()
    assert (smollm2_tokenizer.eos_token_id, smollm2_tokenizer.pad_token_id) == (real.eos_token_id, real.pad_token_id)
    for gen in (True, False):
        assert smollm2_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
            real.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
