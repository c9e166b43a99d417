"""A prompt longer than max_prompt_tokens keeps its end: the context a completion came from."""

from __future__ import annotations

from quark.batching import build_batch
from quark.config import QuarkConfig
from quark.models import QuarkModel
from quark.pool import QuantizedSample
from quark.sampling import encode_prompts


def _chat_prompt(qm: QuarkModel, words: int) -> str:
    """A pooled chat request: its rendered template, ending with the assistant header."""
    messages = [{"role": "user", "content": " ".join(f"word{i}" for i in range(words))}]
    rendered = qm.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert isinstance(rendered, str)
    return rendered


def _ids(qm: QuarkModel, text: str) -> list[int]:
    return list(qm.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_long_chat_prompt_is_cut_from_the_left(tiny_qm: QuarkModel) -> None:
    limit = QuarkConfig().max_prompt_tokens
    prompt = _chat_prompt(tiny_qm, words=2 * limit)
    full = _ids(tiny_qm, prompt)
    assert len(full) > limit
    kept = encode_prompts(tiny_qm, [prompt], limit)[0]
    assert kept == full[-limit:]
    assert tiny_qm.tokenizer.decode(kept).endswith("<|im_start|>assistant\n")


def test_training_rows_end_with_the_assistant_header_then_the_completion(
    tiny_qm: QuarkModel,
) -> None:
    config = QuarkConfig()
    prompt = _chat_prompt(tiny_qm, words=2 * config.max_prompt_tokens)
    sample = QuantizedSample(prompt, "Hello there.", 1.0, 0)
    batch = build_batch(tiny_qm, [sample], config.max_prompt_tokens, config.response_length)
    row = batch.policy_ids[0][batch.policy_mask[0].bool()].tolist()
    header_and_completion = _ids(tiny_qm, "<|im_start|>assistant\n") + _ids(tiny_qm, "Hello there.")
    assert row[-len(header_and_completion) :] == header_and_completion
    assert tiny_qm.reward_tokens is not None and row[0] == tiny_qm.reward_tokens.ids[0]
    assert len(row) == 1 + config.max_prompt_tokens + len(_ids(tiny_qm, "Hello there."))
