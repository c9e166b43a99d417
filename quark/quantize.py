"""Weight-only int8 quantization of a model's linear layers, for CPU serving.

Each ``nn.Linear`` weight [out, in] becomes int8 with one bfloat16 scale per output row
(symmetric, absmax / 127); activations stay bfloat16. The matmul is PyTorch's own
``torch._weight_int8pack_mm`` CPU kernel (what torchao's int8 weight-only layout calls on
CPU). It reads a quarter of float32's bytes and half of bfloat16's per decoded token,
which is what a one-stream decode step is bound by. With more rows than ``INT8_MAX_ROWS``
that kernel is slower than bfloat16's GEMM, so those calls multiply by the dequantized
weights (int8 x scale, kept in bfloat16 beside the int8 ones): the same model either way,
at 1.5x bfloat16's memory (measured: docs/results.md, "Serving speed").

The output head is quantized too (for SmolLM2 it is a fifth of the weights); a head tied
to the input embeddings gets its own int8 copy, and the embeddings stay bfloat16 (a lookup
reads one row per token). Training never sees these modules: only serving loads them.
"""

from __future__ import annotations

import torch
from torch import nn

#: Rows (tokens in one forward) up to which the int8 kernel beats bfloat16's GEMM here.
INT8_MAX_ROWS = 4


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``weight`` [out, in]: (int8 [out, in], scale [out])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    """``nn.Linear`` with int8 weights [out, in] and bfloat16 row scales; see the module doc."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_rows(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_int8 = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale.to(torch.bfloat16), requires_grad=False)
        # For many-row calls (prefill, large batches; see INT8_MAX_ROWS): the same int8 weights
        # dequantized, so the model is the int8 one whichever kernel runs.
        dequantized = (q.float() * scale[:, None]).to(torch.bfloat16)
        self.weight = nn.Parameter(dequantized, requires_grad=False)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().to(torch.bfloat16), requires_grad=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Flatten to rows first: a strided 3-D input (the last position of a prefill) would
        # send F.linear to a batched matmul that copies the weight once per sequence.
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)  # [N, in]
        if rows.shape[0] > INT8_MAX_ROWS:
            y = nn.functional.linear(rows, self.weight, self.bias)  # [N, out]
        else:
            y = torch._weight_int8pack_mm(rows, self.weight_int8, self.scale)  # [N, out]
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of a bfloat16 CPU ``model`` by an ``Int8Linear``, in place
    (a head tied to the embeddings gets its own copy); returns how many were replaced."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        raise ValueError(
            f"int8 serving quantization needs a bfloat16 model on CPU, not {weight.dtype} on "
            f"{weight.device}: load it with QUARK_DTYPE=bfloat16, or use QUARK_QUANTIZATION=none"
        )
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
                replaced += 1
    return replaced
