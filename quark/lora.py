"""Fewer trained weights for Quark's fine-tuning: frozen lower blocks, or low-rank adapters
(LoRA, Hu et al. 2021).

``add_lora`` wraps every ``nn.Linear`` inside the transformer blocks in a :class:`LoRALinear`
(the pretrained weight frozen, a trainable update ``scale * B @ A`` of rank r beside it) and
freezes everything else except the embedding rows named by the caller (the reward tokens).
A saved model is always a plain one: :func:`merged` folds each update into its weight for as
long as the context lasts (``quark.models.save_model`` saves under it), so serving, the
store and evaluation never see an adapter. A resumable checkpoint also keeps the adapters
themselves (:func:`adapter_state` / :func:`load_adapter_state`), so a resumed run takes the
same steps as one that was never interrupted (to float rounding: the update is subtracted
from the merged weights again).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T``; B starts at zero, so the wrapped layer starts as
    the base layer exactly."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        weight = base.weight  # [out, in]
        self.lora_a = nn.Parameter(torch.empty(rank, weight.shape[1], dtype=weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(weight.shape[0], rank, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's (and PEFT's) init

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        update = (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype)
        return self.base(x) + self.scale * update

    def delta(self) -> torch.Tensor:
        """The weight update the adapter stands for: [out, in]."""
        return self.scale * (self.lora_b @ self.lora_a)


def add_lora(
    model: nn.Module, rank: int, alpha: float, trainable_rows: Sequence[int] = ()
) -> list[LoRALinear]:
    """Freeze ``model`` except new adapters on the linears of its transformer blocks and the
    embedding rows ``trainable_rows`` (input and output embeddings: a gradient mask keeps
    every other row as it is, provided the optimizer has no weight decay, which would shrink
    them anyway: ``QuarkConfig`` refuses lora_rank with weight_decay). Returns the adapters."""
    blocks = transformer_blocks(model)
    if blocks is None:
        raise ValueError(f"lora_rank={rank}: {type(model).__name__} has no transformer blocks")
    model.requires_grad_(False)
    adapters = []
    for block in blocks:
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent, _, attr = name.rpartition(".")
                adapter = LoRALinear(module, rank, alpha)
                setattr(block.get_submodule(parent) if parent else block, attr, adapter)
                adapters.append(adapter)
    _train_rows_only(model, list(trainable_rows))
    return adapters


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """A Hugging Face causal LM's blocks (``model.model.layers``), or None."""
    blocks = getattr(getattr(model, "model", None), "layers", None)
    return blocks if isinstance(blocks, nn.ModuleList) else None


def _train_rows_only(model: nn.Module, rows: list[int]) -> None:
    """Gradients for ``rows`` of the input and output embedding matrices only."""
    if not rows:
        return
    heads = [model.get_input_embeddings(), model.get_output_embeddings()]  # type: ignore[operator]
    weights = {id(h.weight): h.weight for h in heads if h is not None}  # one when tied
    for weight in weights.values():
        mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)  # [V, 1]
        mask[rows] = 1.0
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, mask=mask: grad * mask.to(grad.device))


def freeze_lower_layers(model: nn.Module, count: int) -> None:
    """No gradients for the lowest ``count`` transformer blocks (embeddings stay trainable:
    the reward tokens live there)."""
    if count == 0:
        return
    layers = transformer_blocks(model)
    if layers is None or count > len(layers):
        raise ValueError(f"freeze_layers={count}: the model has no {count} transformer blocks")
    for block in layers[:count]:
        block.requires_grad_(False)


def adapters_of(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


@contextmanager
def merged(model: nn.Module) -> Iterator[None]:
    """Inside the context ``model`` is a plain model: each adapter is replaced by its base
    linear with the update added to the weight. Afterwards the adapters are back and every
    weight is restored bit for bit (a copy, not a subtraction)."""
    adapters = adapters_of(model)
    saved = []
    with torch.no_grad():
        for name, adapter in adapters:
            weight = adapter.base.weight
            saved.append(weight.detach().clone())
            weight += adapter.delta().to(weight.dtype)
            model.set_submodule(name, adapter.base)
    try:
        yield
    finally:
        with torch.no_grad():
            for (name, adapter), original in zip(adapters, saved, strict=True):
                adapter.base.weight.copy_(original)
                model.set_submodule(name, adapter)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter's A and B, by module name (for a safetensors checkpoint)."""
    state = {}
    for name, adapter in adapters_of(model):
        state[f"{name}.lora_a"] = adapter.lora_a.detach().contiguous()
        state[f"{name}.lora_b"] = adapter.lora_b.detach().contiguous()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Resume adapters saved with a merged model: load A and B, and take their update back
    out of the (merged) base weights, so forward and the next steps continue as before."""
    adapters = adapters_of(model)
    if set(state) != {f"{n}.lora_{p}" for n, _ in adapters for p in "ab"}:
        raise ValueError("the checkpoint's adapters do not match this model's (lora_rank?)")
    with torch.no_grad():
        for name, adapter in adapters:
            adapter.lora_a.copy_(state[f"{name}.lora_a"])
            adapter.lora_b.copy_(state[f"{name}.lora_b"])
            adapter.base.weight -= adapter.delta().to(adapter.base.weight.dtype)
