"""A tiny model on the real SmolLM2 tokenizer, for tests and benchmarks (not in the wheel)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from quark.models import QuarkModel, add_reward_tokens, default_gguf, save_model


@functools.cache
def _smollm2_tokenizer_dir(cache_root: str) -> Path:
    """The SmolLM2 tokenizer, read once from the GGUF and saved as plain files."""
    target = Path(cache_root) / "smollm2-tokenizer"
    if not (target / "tokenizer.json").exists():
        gguf = default_gguf()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(target)
    return target


def smollm2_tokenizer(cache_root: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(_smollm2_tokenizer_dir(str(cache_root)))


def build_tiny_model(
    cache_root: Path,
    *,
    num_quantiles: int | None = 5,
    hidden_size: int = 64,
    layers: int = 2,
    seed: int = 0,
) -> QuarkModel:
    """A 2-layer Llama (~3M parameters, mostly embeddings) on the real tokenizer."""
    tokenizer = smollm2_tokenizer(cache_root)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    qm = QuarkModel(model, tokenizer, None, len(tokenizer), {"base_model": "tiny"})
    if num_quantiles:
        add_reward_tokens(qm, num_quantiles, torch.Generator().manual_seed(seed))
    return qm


def save_tiny_model(directory: Path, cache_root: Path, **kwargs: int | None) -> Path:
    """Build and save a tiny model; returns its directory (loadable with ``load_model``)."""
    qm = build_tiny_model(cache_root, **kwargs)  # type: ignore[arg-type]
    qm.metadata["base_model"] = str(directory)  # the tiny model is its own original
    return save_model(qm, directory)
