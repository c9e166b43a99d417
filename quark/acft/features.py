"""The frozen base model's features for the auxiliary head, computed once per sample.

The head R reads the base model's final hidden states, and NADO's consistency term needs the
base distribution p at the same positions. Both come from a forward of the whole frozen model,
which costs about 80% of an auxiliary step (docs/acft.md, "Costs"). The base never changes
while a head trains on it, so the hidden states of a (prompt, completion) are the same in
every epoch: ``FeatureCache`` keeps them, and recomputes the logits from them with the base
model's LM head (one matmul) instead of running the model again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from quark.acft.head import base_outputs

log = logging.getLogger(__name__)

#: Cached hidden states must reproduce the model's own logits this closely through its LM
#: head; a model whose logits are not a plain linear map of the last hidden state (soft-capped
#: or scaled logits) is detected here and trained without the cache.
LOGIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Features:
    """The base model at the completion positions of a batch."""

    hidden: torch.Tensor  # [B, T, H] final hidden states (the LM head's input)
    logits: torch.Tensor  # [B, T, V] the base model's logits at the same positions


#: Tokenizes (prompt, completion) pairs: (input_ids [B, L], attention_mask [B, L],
#: label_mask [B, T]), completions right-aligned (quark.batching.encode_pairs).
Encode = Callable[[Sequence[tuple[str, str]]], tuple[torch.Tensor, ...]]


class FeatureCache:
    """Base-model features of (prompt, completion) pairs, kept for up to ``capacity`` pairs.

    ``encode`` tokenizes the pairs. Valid only while ``base`` is frozen: each trainer owns
    one cache for its frozen base.
    """

    def __init__(self, base: torch.nn.Module, encode: Encode, capacity: int) -> None:
        self.base, self.encode, self.capacity = base, encode, capacity
        self._rows: dict[tuple[str, str], torch.Tensor] = {}
        self._exact: bool | None = None  # does lm_head(hidden) reproduce the logits?
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._rows)

    @torch.no_grad()
    def features(self, pairs: Sequence[tuple[str, str]], width: int) -> Features:
        """Features at the last ``width`` completion positions of each pair, right-aligned
        like the batch's labels (padding positions are zeros)."""
        if self.capacity == 0 or self._exact is False:
            return self._forward(pairs, width)
        missing = list(dict.fromkeys(p for p in pairs if p not in self._rows))
        self.hits += len(pairs) - len(missing)
        self.misses += len(missing)
        if missing:
            self._store(missing)
        if not self._exact or any(p not in self._rows for p in pairs):
            # Over capacity (or not exact): one forward of the batch, as without a cache.
            return self._forward(pairs, width)
        hidden = self._collate([self._rows[p] for p in pairs], width)  # [B, T, H]
        return Features(hidden, self._lm_head(hidden))

    def _forward(self, pairs: Sequence[tuple[str, str]], width: int) -> Features:
        input_ids, attention_mask, _ = self.encode(pairs)
        out = base_outputs(self.base, input_ids, attention_mask, width)
        return Features(out.hidden, out.logits[:, -width:])

    def _store(self, pairs: list[tuple[str, str]]) -> None:
        input_ids, attention_mask, label_mask = self.encode(pairs)
        width = label_mask.shape[1]
        out = base_outputs(self.base, input_ids, attention_mask, width)
        if self._exact is None:
            self._exact = self._check_lm_head(out.hidden, out.logits[:, -width:])
        if not self._exact:
            return
        lengths = label_mask.sum(dim=1).long().tolist()
        for pair, hidden, n in zip(pairs, out.hidden, lengths, strict=True):
            if len(self._rows) >= self.capacity:
                return
            self._rows[pair] = hidden[width - n :].detach().clone()  # [n, H]

    def _check_lm_head(self, hidden: torch.Tensor, logits: torch.Tensor) -> bool:
        error = (self._lm_head(hidden) - logits).abs().max().item()
        exact = error <= LOGIT_TOLERANCE * max(1.0, logits.abs().max().item())
        if not exact:
            log.warning(
                "the base model's logits are not its LM head applied to the last hidden "
                "state (max error %.3g): the auxiliary head trains without a feature cache",
                error,
            )
        return exact

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.base.get_output_embeddings()  # type: ignore[operator]
        if not isinstance(head, torch.nn.Module):
            raise ValueError("the base model has no output embeddings (LM head)")
        logits: torch.Tensor = head(hidden)
        return logits

    @staticmethod
    def _collate(rows: list[torch.Tensor], width: int) -> torch.Tensor:
        hidden_size = rows[0].shape[-1]
        out = rows[0].new_zeros(len(rows), width, hidden_size)
        for i, row in enumerate(rows):
            kept = row[-width:]  # [n, H], n <= width (0 for an empty completion)
            out[i, width - kept.shape[0] :] = kept
        return out
