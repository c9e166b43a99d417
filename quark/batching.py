"""Turning quantized pool samples into padded training tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from quark.models import QuarkModel
from quark.pool import QuantizedSample
from quark.sampling import encode_prompts, left_pad


@dataclass
class TrainBatch:
    policy_ids: torch.Tensor  # [B, Lp] reward token + prompt + completion, left-padded
    policy_mask: torch.Tensor  # [B, Lp]
    ref_ids: torch.Tensor  # [B, Lr] prompt + completion (no reward token), left-padded
    ref_mask: torch.Tensor  # [B, Lr]
    labels: torch.Tensor  # [B, T] completion ids, left-padded to the longest completion
    label_mask: torch.Tensor  # [B, T] 1.0 on real completion tokens


@dataclass
class UtilityBatch:
    policy_ids: torch.Tensor  # [B, Lp] reward-token prefix + passage, left-padded
    policy_mask: torch.Tensor  # [B, Lp]
    ref_ids: torch.Tensor  # [B, Lr] passage (no prefix), left-padded
    ref_mask: torch.Tensor  # [B, Lr]
    label_mask: torch.Tensor  # [B, T] 1.0 at positions predicting passage tokens 2..n


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, as ``generate`` uses them: [B, L]."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def encode_pairs(
    qm: QuarkModel,
    prefixes: Sequence[Sequence[int]],
    prompts: Sequence[str],
    completions: Sequence[str],
    max_prompt_tokens: int | None,
    response_length: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (prefix + prompt + completion) rows and their right-aligned labels.

    Returns input_ids [B, L], attention_mask [B, L], labels [B, T], label_mask [B, T].
    Left padding puts every completion at the end of its row, so the completion logits
    are the last T positions of each row.
    """
    prompt_ids = encode_prompts(qm, prompts, max_prompt_tokens)
    completion_ids = [c[:response_length] for c in encode_prompts(qm, completions)]
    rows = [
        list(pre) + p + c for pre, p, c in zip(prefixes, prompt_ids, completion_ids, strict=True)
    ]
    pad = qm.tokenizer.pad_token_id
    input_ids, attention_mask = left_pad(rows, pad, qm.device)
    width = max(1, max(len(c) for c in completion_ids))
    labels = torch.full((len(rows), width), pad, dtype=torch.long)
    label_mask = torch.zeros((len(rows), width))
    for i, ids in enumerate(completion_ids):
        if ids:
            labels[i, width - len(ids) :] = torch.tensor(ids)
            label_mask[i, width - len(ids) :] = 1.0
    return input_ids, attention_mask, labels.to(qm.device), label_mask.to(qm.device)


def build_batch(
    qm: QuarkModel,
    samples: Sequence[QuantizedSample],
    max_prompt_tokens: int,
    response_length: int | None,
) -> TrainBatch:
    """Tokenize (reward token + prompt -> completion) for the policy, (prompt -> completion)
    for the reference."""
    prompts = [s.prompt for s in samples]
    completions = [s.completion for s in samples]
    policy_ids, policy_mask, labels, label_mask = encode_pairs(
        qm,
        [qm.prefix_ids(s.quantile) for s in samples],
        prompts,
        completions,
        max_prompt_tokens,
        response_length,
    )
    ref_ids, ref_mask, _, _ = encode_pairs(
        qm, [[] for _ in samples], prompts, completions, max_prompt_tokens, response_length
    )
    return TrainBatch(policy_ids, policy_mask, ref_ids, ref_mask, labels, label_mask)


def build_utility_batch(
    qm: QuarkModel, passages: Sequence[str], max_tokens: int, prefix: Sequence[int]
) -> UtilityBatch:
    """Each passage's first ``max_tokens`` tokens, after ``prefix`` for the policy and alone
    for the reference. Every token but the first is a target: the reference, given no
    context, has no prediction of the first to compare with, and the prefix is no text."""
    rows = [ids[:max_tokens] for ids in encode_prompts(qm, passages)]
    pad = qm.tokenizer.pad_token_id
    policy_ids, policy_mask = left_pad([list(prefix) + r for r in rows], pad, qm.device)
    ref_ids, ref_mask = left_pad(rows, pad, qm.device)
    # Left padding right-aligns the passages: their targets are the last len - 1 positions.
    width = max(1, max(len(r) for r in rows) - 1)
    label_mask = torch.zeros((len(rows), width))
    for i, ids in enumerate(rows):
        if len(ids) > 1:
            label_mask[i, width - len(ids) + 1 :] = 1.0
    return UtilityBatch(policy_ids, policy_mask, ref_ids, ref_mask, label_mask.to(qm.device))


def completion_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    width: int,
    hidden_states: bool = False,
) -> Any:
    """The model's output for the last ``width + 1`` positions of right-aligned completions
    (the ``width`` that predict completion tokens, plus the last one)."""
    short = width + 1 - input_ids.shape[1]
    if short > 0:
        # Rows shorter than width + 1 (one-token prompts whose completions are all empty, so
        # width is the minimum of 1): pad on the left so the output still has ``width`` steps.
        input_ids = torch.nn.functional.pad(input_ids, (short, 0), value=0)
        attention_mask = torch.nn.functional.pad(attention_mask, (short, 0), value=0)
    # Only the last width+1 hidden states matter; logits_to_keep skips the rest of the LM head.
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        output_hidden_states=hidden_states,
        logits_to_keep=width + 1,
    )


def completion_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int
) -> torch.Tensor:
    """Logits at the ``width`` positions that predict the (right-aligned) completion: [B, T, V]."""
    logits: torch.Tensor = completion_forward(model, input_ids, attention_mask, width).logits
    return logits[:, :-1, :]  # [B, T, V]
