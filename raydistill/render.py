"""Chat rendering shared by teacher sampling, student training and serving.

One function renders every prompt, so the student is trained on exactly the text it is
served with (a mismatch here silently costs accuracy).
"""

from __future__ import annotations

from typing import Any


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], assistant_prefix: str = "") -> str:
    """The model's chat template with the generation prompt, plus an optional forced answer prefix."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + assistant_prefix


def render_completion(tokenizer: Any, messages: list[dict[str, str]], answer: str, prompt: str | None = None) -> str:
    """The text the chat template puts after the generation prompt for ``answer`` (incl. end of turn).
    ``prompt``: ``render_prompt(tokenizer, messages)`` where the caller has it already."""
    if prompt is None:
        prompt = render_prompt(tokenizer, messages)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt):
        raise ValueError("chat template does not extend the generation prompt; cannot mask the answer")
    # The template's trailing newline after end-of-turn is never generated: drop it.
    return full[len(prompt) :].rstrip("\n")
