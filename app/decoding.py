"""Step-wise batched decoding with a KV cache, for serving (pure tensor code, no web code).

``DecodeBatch`` keeps a set of rows (sequences) at different lengths in one left-padded
KV cache. Rows join between steps (their prompts are prefilled as a small batch of their
own, then their cache is left-padded and concatenated onto the running one) and leave as
soon as they finish or their owner cancels them, so one model forward per step serves
every active request: continuous batching.

Every row has its own temperature, top-p, token budget and ``torch.Generator``. Sampling
draws one uniform number per token from the row's generator and inverts the row's own
CDF, so a row's tokens depend only on its logits and its seed, not on its neighbours.
Rows with ``temperature == 0`` decode greedily.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from quark.models import QuarkModel
from quark.sampling import eos_ids


@dataclass(frozen=True)
class RowSampling:
    """Sampling parameters of one row; ``temperature == 0`` means greedy."""

    max_new_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(eq=False)
class Row:
    """One sequence being decoded; ``owner`` is opaque to this module (the caller's handle)."""

    prompt_ids: list[int]
    sampling: RowSampling
    owner: Any = None
    index: int = 0
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS), "length" (budget or context)
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a row needs at least one prompt token")
        self.generator = torch.Generator(device="cpu").manual_seed(self.sampling.seed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Next token per row from logits [B, V], per-row temperature/top_p [B]: tokens [B].

    Rows with ``temperature == 0`` are greedy; the others draw one uniform number from
    their own generator and invert their own CDF (over tokens sorted by probability when
    ``top_p < 1``), so a row's token never depends on the other rows in the batch.
    """
    tokens = logits.argmax(dim=-1)  # [B], the answer for greedy rows
    for nucleus in (False, True):
        chosen = (temperature > 0) & ((top_p < 1) == nucleus)
        rows = chosen.nonzero().squeeze(1)
        if rows.numel():
            picks = _inverse_cdf(
                logits[rows],
                temperature[rows],
                top_p[rows],
                nucleus,
                [generators[i] for i in rows.tolist()],
            )
            tokens[rows] = picks
    return tokens


def _inverse_cdf(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    nucleus: bool,
    generators: Sequence[torch.Generator],
) -> torch.Tensor:
    """Sample rows of logits [b, V] by inverting their CDF at a per-row uniform draw: [b]."""
    # One draw per row from that row's generator, on CPU so the stream is device-independent.
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators])
    probs = torch.softmax(logits.float() / temperature.float()[:, None], dim=-1)  # [b, V]
    order = None
    if nucleus:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always).
        before = probs.cumsum(dim=-1, dtype=torch.float64) - probs
        probs = probs * (before < top_p.double()[:, None])
    # Accumulate in float64: over ~50k flat probabilities a float32 running sum drifts by
    # about a token's own mass, which would move picks between neighbouring tokens.
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # [b, V]
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)  # [b, 1], below the total mass
    pick = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)  # [b, 1]
    return (pick if order is None else order.gather(1, pick)).squeeze(1)


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left of ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _cache_layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers: list[DynamicLayer] = []
    for layer in cache.layers:
        # Sliding-window or quantized layers keep positions differently; merging rows by
        # left-padding is only sound for plain full-attention layers.
        if type(layer) is not DynamicLayer:
            raise TypeError(f"continuous batching needs DynamicLayer caches, got {type(layer)}")
        layers.append(layer)
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """A filled layer's keys and values [B, H, L, D]."""
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


class DecodeBatch:
    """Rows of one model sharing a left-padded KV cache; see the module docstring."""

    def __init__(
        self,
        model: PreTrainedModel,
        *,
        pad_id: int,
        eos_ids: Iterable[int],
        suppress_ids: Iterable[int] = (),
        max_length: int | None = None,
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.eos = set(eos_ids)
        self.suppress = torch.tensor(sorted(set(suppress_ids)), dtype=torch.long)
        self.max_length = max_length or int(getattr(model.config, "max_position_embeddings", 0))
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L] 1 on real tokens
        self.positions: torch.Tensor | None = None  # [B] position of each row's next token
        self.last: torch.Tensor | None = None  # [B] last sampled token, the next step's input

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def add(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill ``rows``, sample their first token and join them to the batch.

        Returns the new rows (finished ones already removed from the batch).
        """
        if not rows:
            return []
        for row in rows:
            if self.max_length and len(row.prompt_ids) >= self.max_length:
                raise ValueError(
                    f"prompt of {len(row.prompt_ids)} tokens leaves no room in the "
                    f"{self.max_length}-token context"
                )
        ids, mask = self._left_pad([r.prompt_ids for r in rows])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        first = self._sample(out.logits[:, -1, :], rows)
        self._merge(list(rows), out.past_key_values, mask, mask.sum(-1), first)
        self._record(list(rows), first)
        return list(rows)

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """Decode one token for every row; returns the rows stepped (finished ones removed)."""
        if not self.rows:
            return []
        assert self.mask is not None and self.positions is not None and self.last is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        rows = list(self.rows)
        tokens = self._sample(out.logits[:, -1, :], rows)
        self.last = tokens
        self._record(rows, tokens)
        return rows

    def drop(self, rows: Iterable[Row]) -> None:
        """Remove rows (finished or cancelled) and trim the cache's all-padding columns."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask, self.positions, self.last = [], None, None, None, None
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).nonzero()[0])  # first column any remaining row uses
        for layer in _cache_layers(self.cache):
            keys, values = _kv(layer)
            layer.keys = keys.index_select(0, index)[:, :, start:]
            layer.values = values.index_select(0, index)[:, :, start:]
        self.mask = mask[:, start:]
        assert self.positions is not None and self.last is not None
        self.positions = self.positions.index_select(0, index)
        self.last = self.last.index_select(0, index)
        self.rows = [self.rows[i] for i in keep]

    def _left_pad(self, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _sample(self, logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
        logits = logits.float()
        if self.suppress.numel():
            # Reward tokens are conditioning signals, never text: the model must not emit them.
            logits[:, self.suppress.to(logits.device)] = float("-inf")
        temperature = torch.tensor([r.sampling.temperature for r in rows], device=logits.device)
        top_p = torch.tensor([r.sampling.top_p for r in rows], device=logits.device)
        return sample_tokens(logits, temperature, top_p, [r.generator for r in rows])

    def _merge(
        self,
        rows: list[Row],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        last: torch.Tensor,
    ) -> None:
        """Append prefilled rows: left-pad the shorter of the two caches, concatenate rows."""
        if self.cache is None:
            _cache_layers(cache)
            self.rows, self.cache, self.mask = rows, cache, mask
            self.positions, self.last = positions, last
            return
        assert self.mask is not None and self.positions is not None and self.last is not None
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(_cache_layers(self.cache), _cache_layers(cache), strict=True):
            (old_k, old_v), (new_k, new_v) = _kv(old), _kv(new)
            old.keys = torch.cat([_pad_left(old_k, width, 2), _pad_left(new_k, width, 2)])
            old.values = torch.cat([_pad_left(old_v, width, 2), _pad_left(new_v, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, last])
        self.rows = self.rows + rows

    def _record(self, rows: list[Row], tokens: torch.Tensor) -> None:
        """Append each row's new token, mark finished rows and drop them from the batch."""
        done = []
        for row, token in zip(rows, tokens.tolist(), strict=True):
            if token in self.eos:
                row.finish_reason = "stop"
            else:
                row.tokens.append(token)
                full = len(row.prompt_ids) + len(row.tokens)
                if len(row.tokens) >= row.sampling.max_new_tokens or (
                    self.max_length and full >= self.max_length
                ):
                    row.finish_reason = "length"
            if row.finished:
                done.append(row)
        self.drop(done)


def detokenize(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Completion text of token ids; the server streams prefixes of exactly this text."""
    # No clean-up of tokenization spaces: it could rewrite text already streamed.
    text = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return str(text)


def make_batch(qm: QuarkModel, max_length: int | None = None) -> DecodeBatch:
    """A DecodeBatch for a QuarkModel: its EOS ids stop rows, its reward tokens are suppressed."""
    return DecodeBatch(
        qm.model,
        pad_id=qm.tokenizer.pad_token_id,
        eos_ids=eos_ids(qm),
        suppress_ids=qm.reward_tokens.ids if qm.reward_tokens else (),
        max_length=max_length,
    )


def decode(qm: QuarkModel, rows: Sequence[Row], max_length: int | None = None) -> list[Row]:
    """Offline: decode ``rows`` together to completion (the server's engine does the same
    steps for a lone request, so a seed gives the same text offline and over HTTP)."""
    batch = make_batch(qm, max_length)
    batch.add(rows)
    while len(batch):
        batch.step()
    return list(rows)


def decode_text(
    qm: QuarkModel,
    prompt: str,
    quantile: int | None,
    samplings: Sequence[RowSampling],
) -> list[tuple[str, str]]:
    """(text, finish_reason) per sampling for one prompt with an optional reward quantile."""
    ids = qm.prefix_ids(quantile) + qm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    rows = decode(qm, [Row(list(ids), s, index=i) for i, s in enumerate(samplings)])
    return [(detokenize(qm.tokenizer, r.tokens), r.finish_reason or "length") for r in rows]
