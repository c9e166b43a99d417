"""Batched, reward-conditioned sampling with left padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from quark.models import QuarkModel, decode, generation_eos_ids, hf_generate


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # "stop" (EOS) or "length"


def encode_prompts(
    qm: QuarkModel, prompts: Sequence[str], max_prompt_tokens: int | None = None
) -> list[list[int]]:
    """Token ids of each prompt, cut to its *last* ``max_prompt_tokens`` tokens.

    The end is what the completion continues (a pooled chat prompt ends with the assistant
    header): cutting the start keeps the context a completion actually came from.
    """
    encoded = qm.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [list(ids[-max_prompt_tokens:] if max_prompt_tokens else ids) for ids in encoded]


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (input_ids [B, L], attention_mask [B, L])."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def eos_ids(qm: QuarkModel) -> list[int]:
    found = generation_eos_ids(qm.model)
    if qm.tokenizer.eos_token_id is not None:
        found.append(qm.tokenizer.eos_token_id)
    return sorted(set(found))


def _split_completion(qm: QuarkModel, new_ids: list[int], stops: set[int]) -> Completion:
    pad = qm.tokenizer.pad_token_id
    for cut, token in enumerate(new_ids):
        if token in stops:
            kept = new_ids[:cut]
            return Completion(decode(qm.tokenizer, kept), tuple(kept), "stop")
    kept = [t for t in new_ids if t != pad] if pad not in stops else new_ids
    return Completion(decode(qm.tokenizer, kept), tuple(kept), "length")


@torch.inference_mode()
def generate_ids(
    qm: QuarkModel,
    prompt_ids: Sequence[Sequence[int]],
    quantile: int | None,
    params: SamplingParams,
    seed: int | None = None,
) -> list[Completion]:
    """One padded ``generate`` call over already-encoded prompts (one completion each)."""
    prefix = qm.prefix_ids(quantile)
    rows = [prefix + list(ids) for ids in prompt_ids]
    if not all(rows):
        raise ValueError("empty prompt: give at least one token (or a reward token)")
    input_ids, attention_mask = left_pad(rows, qm.tokenizer.pad_token_id, qm.device)
    stops = eos_ids(qm)
    if seed is not None:
        torch.manual_seed(seed)
    sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p}
    output = hf_generate(
        qm.model,
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=not params.greedy,
        max_new_tokens=params.max_new_tokens,
        pad_token_id=qm.tokenizer.pad_token_id,
        eos_token_id=stops,
        # Reward tokens are conditioning signals, never text: the model must not emit them.
        suppress_tokens=list(qm.reward_tokens.ids) if qm.reward_tokens else None,
        top_k=None,
        **sampling,
    )  # [B, L + new]
    new_tokens = output[:, input_ids.shape[1] :].tolist()
    return [_split_completion(qm, row, set(stops)) for row in new_tokens]


def generate(
    qm: QuarkModel,
    prompts: Sequence[str],
    quantile: int | None,
    params: SamplingParams,
    *,
    batch_size: int = 32,
    max_prompt_tokens: int | None = None,
    seed: int | None = None,
) -> list[Completion]:
    """Sample one completion per prompt, ``batch_size`` prompts per ``generate`` call."""
    if not prompts:
        return []
    encoded = encode_prompts(qm, prompts, max_prompt_tokens)
    results: list[Completion] = []
    for start in range(0, len(encoded), batch_size):
        batch_seed = None if seed is None else seed + start
        results += generate_ids(
            qm, encoded[start : start + batch_size], quantile, params, batch_seed
        )
    return results
