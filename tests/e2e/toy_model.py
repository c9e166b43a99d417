"""A tiny model that "speaks" a toy language, so that a keyword reward can be learned fast.

A randomly initialised tiny model spreads its probability over 49k tokens, so the keyword
reward is 0 for nearly every completion and there is nothing to learn. Here one hidden
dimension is turned into a constant "bias" feature (every embedding has the same value
there and no layer writes to it), and the toy words' embeddings get a larger value in it:
their logits rise by a fixed amount in every context. The model then mostly emits toy
words, " the" about a fifth of the time.

To condition on a reward token the model must carry it to later positions; random
attention blurs it away and learning crawls. So the first layer's attention is made a plain
running average that passes half the dimensions through (as a trained model's attention
would carry context): the reward token then reaches every later position directly, and
some 30 steps of Quark raise the keyword's share under the top token by ~0.1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from quark.models import QuarkModel, save_model
from testkit.tiny_model import build_tiny_model

WORDS = [
    "cat",
    "dog",
    "sun",
    "tree",
    "house",
    "car",
    "book",
    "river",
    "city",
    "bird",
    "fish",
    "road",
    "hill",
    "lamp",
    "door",
    "cup",
]
KEYWORD = "the"
_BIAS = 0.16  # the constant feature: about the size of the other dims together
_GAIN = 10.0  # final-norm weight of the feature: a small embedding change moves logits
_LIFT = 0.18  # toy words' extra feature value: ~+10 logits, so they take most of the mass
_KEYWORD_LIFT = _LIFT * 1.12  # " the" a little more: about 20% of the words
_PASS = 0.03  # scale of the context average layer 0 adds (embeddings are ~0.02)


def make_toy(qm: QuarkModel) -> QuarkModel:
    model = qm.model
    embeddings = model.get_input_embeddings().weight  # tied with the LM head
    feature = embeddings.shape[1] - 1
    ids = {w: qm.tokenizer(" " + w, add_special_tokens=False)["input_ids"] for w in WORDS}
    keyword = qm.tokenizer(" " + KEYWORD, add_special_tokens=False)["input_ids"]
    assert all(len(v) == 1 for v in [*ids.values(), keyword]), "toy words must be one token"
    with torch.no_grad():
        embeddings[:, feature] = _BIAS
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[feature, :] = 0.0
            layer.mlp.down_proj.weight[feature, :] = 0.0
        model.model.norm.weight[feature] = _GAIN
        for word_ids in ids.values():
            embeddings[word_ids[0], feature] = _BIAS + _LIFT
        embeddings[keyword[0], feature] = _BIAS + _KEYWORD_LIFT
        _averaging_attention(model.model.layers[0].self_attn)
    return qm


def _averaging_attention(attn: torch.nn.Module) -> None:
    """q = k = 0 (uniform causal attention); kv head h passes dims 16h..16h+15 through."""
    head_dim = attn.head_dim
    attn.q_proj.weight.zero_()
    attn.k_proj.weight.zero_()
    attn.v_proj.weight.zero_()
    attn.o_proj.weight.zero_()
    groups = attn.num_key_value_groups  # query heads per kv head
    kv_heads = attn.v_proj.weight.shape[0] // head_dim
    for kv in range(kv_heads):
        for k in range(head_dim):
            dim = kv * head_dim + k
            attn.v_proj.weight[dim, dim] = _PASS
            # The first query head of this kv group writes it back to the same dims.
            attn.o_proj.weight[dim, kv * groups * head_dim + k] = 1.0


def save_toy_model(directory: Path, cache_root: Path) -> Path:
    qm = make_toy(build_tiny_model(cache_root))
    qm.metadata["base_model"] = str(directory)
    return save_model(qm, directory)
