"""Weight-only quantization of a model's linear layers for CPU serving: int8 or int4.

- **int8**: each ``nn.Linear`` weight [out, in] becomes int8 with one bfloat16 scale per
  output row (symmetric, absmax / 127), multiplied by PyTorch's own ``torch._weight_int8pack_mm``
  CPU kernel (what torchao's int8 weight-only layout calls on CPU).
- **int4**: groups of 32 consecutive weights along the input dimension become 4-bit codes
  with a bfloat16 scale and minimum per group (asymmetric, ``w = q * scale + min``, q in
  0..15: GGUF's Q4_1 layout, so a model converted from a Q4_1 GGUF, like the default one,
  re-quantizes onto its own grid), multiplied by ``torch._weight_int4pack_mm_for_cpu``.

The model keeps its own precision (bfloat16, or float32 on a CPU without native bf16)
everywhere but inside the packed kernels, which take bfloat16 rows: they are fast on an
AVX2-only CPU too, where bfloat16 GEMMs are emulated (4x float32's time at 16 rows).
A one-stream decode step is bound by the bytes of weights it reads: int8 reads half of
bfloat16's, int4 a quarter. With more rows than the format's ``max_rows`` the packed kernels
are slower than a dense GEMM, so those calls (prefills, large batches) multiply by the same
weights dequantized to the model's dtype and kept beside the packed ones: the same model
either way, at the model's memory plus the packed weights' (a bfloat16 model: about 1.5x with
int8, 1.3x with int4; measured: docs/results.md, "Serving speed").

The output head is quantized too (for SmolLM2 it is a fifth of the weights), to int8 under
either setting: the GGUF files llama.cpp serves keep it at 8 bits too (the default model's
Q4_1 file stores it as Q8_0). A head tied to the input embeddings gets its own copy, and the
embeddings keep the model's dtype (a lookup reads one row per token). Training never sees these
modules: only serving loads them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

#: Rows (tokens in one forward) up to which the int8 kernel beats bfloat16's GEMM here
#: (benchmarks/int4_kernel_probe.py: even at 8 rows).
INT8_MAX_ROWS = 4
#: Rows up to which the int4 kernel beats bfloat16's GEMM here (1.2-1.6x at 8, even at 16).
INT4_MAX_ROWS = 8
#: Weights per int4 group (GGUF Q4_1's block).
INT4_GROUP = 32


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of ``weight`` [out, in]: (int8 [out, in], scale [out])."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # [out]
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_groups(
    weight: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 of ``weight`` [out, in] in groups of ``group`` along ``in``:
    (codes 0..15 as int32 [out, in], scale [out, in / group], minimum [out, in / group]),
    both bfloat16-rounded (the kernel's precision): ``w ~ codes * scale + minimum``."""
    out, inp = weight.shape
    groups = weight.detach().float().reshape(out, inp // group, group)  # [out, G, group]
    low = groups.amin(dim=-1).bfloat16().float()  # [out, G]
    scale = ((groups.amax(dim=-1) - low) / 15).clamp(min=1e-8).bfloat16().float()  # [out, G]
    codes = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
    return codes.to(torch.int32).reshape(out, inp), scale, low


#: Model dtypes the quantized layers serve (outside their kernels); on CPU only.
SERVED_DTYPES = (torch.float32, torch.bfloat16)


def can_quantize(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether weight-only quantization serves a model in ``dtype`` on ``device``."""
    return device.type == "cpu" and dtype in SERVED_DTYPES


class QuantizedLinear(nn.Module):
    """``nn.Linear`` with packed low-bit weights for calls of up to ``max_rows`` rows and the
    same weights dequantized to the layer's dtype for larger ones; see the module doc."""

    max_rows: int
    label: str

    def __init__(self, linear: nn.Linear, dequantized: torch.Tensor) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        dtype = linear.weight.dtype
        self.weight = nn.Parameter(dequantized.to(dtype), requires_grad=False)
        self.bias = (
            None
            if linear.bias is None
            else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )

    def packed_mm(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, in] bfloat16 -> [N, out] bfloat16 with the packed weights."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Flatten to rows first: a strided 3-D input (the last position of a prefill) would
        # send F.linear to a batched matmul that copies the weight once per sequence.
        rows = x.reshape(-1, self.in_features).to(self.weight.dtype)  # [N, in]
        if rows.shape[0] > self.max_rows:
            y = nn.functional.linear(rows, self.weight, self.bias)  # [N, out]
        else:
            # The kernels are fast with bfloat16 rows only: fed float32 rows they took 2.5-32x
            # float32's own matmul time on AVX2 (benchmarks/int4_kernel_probe.py).
            y = self.packed_mm(rows.to(torch.bfloat16)).to(rows.dtype)  # [N, out]
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.label}"


class Int8Linear(QuantizedLinear):
    """int8 weights [out, in] with bfloat16 row scales."""

    max_rows, label = INT8_MAX_ROWS, "int8"

    def __init__(self, linear: nn.Linear) -> None:
        q, scale = quantize_rows(linear.weight)
        scale = scale.to(torch.bfloat16)  # the kernel's precision, for both paths
        super().__init__(linear, q.float() * scale.float()[:, None])
        self.weight_int8 = nn.Parameter(q, requires_grad=False)
        self.scale = nn.Parameter(scale, requires_grad=False)

    def packed_mm(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.weight_int8, self.scale)


class Int4Linear(QuantizedLinear):
    """4-bit codes in groups of ``INT4_GROUP`` with a bfloat16 scale and minimum per group."""

    max_rows, label = INT4_MAX_ROWS, "int4"

    def __init__(self, linear: nn.Linear) -> None:
        codes, scale, low = quantize_groups(linear.weight)
        out, inp = codes.shape
        per_group = codes.reshape(out, inp // INT4_GROUP, INT4_GROUP).float()
        super().__init__(linear, (per_group * scale[..., None] + low[..., None]).reshape(out, inp))
        # The kernel takes outputs in multiples of 16: zero rows pad the rest (a head whose
        # vocabulary grew by the reward tokens), cut off again after the matmul.
        pad = -out % 16
        codes, scale, low = (nn.functional.pad(t, (0, 0, 0, pad)) for t in (codes, scale, low))
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)  # [out + pad, in / 2] uint8
        self.weight_int4 = nn.Parameter(packed, requires_grad=False)
        # The kernel reads w = (q - 8) * scale + zero per group: zero = min + 8 * scale.
        zero = low + 8 * scale
        scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1)  # [groups, out + pad, 2]
        self.scales_zeros = nn.Parameter(scales_zeros.to(torch.bfloat16), requires_grad=False)

    @staticmethod
    def fits(linear: nn.Linear) -> bool:
        """The kernel's shapes: an input width that is a multiple of the group."""
        return linear.in_features % INT4_GROUP == 0

    def packed_mm(self, rows: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(rows.contiguous(), self.weight_int4, INT4_GROUP,
                                              self.scales_zeros)  # fmt: skip
        return y[:, : self.out_features]  # [N, out]


def quantize_linears(model: nn.Module, method: str) -> None:
    """Replace every ``nn.Linear`` of a float32 or bfloat16 CPU ``model`` by an ``Int8Linear``
    or an ``Int4Linear`` (``method``), in place; a head tied to the embeddings gets its own
    copy. int4 leaves a layer whose shape its kernel cannot take (``Int4Linear.fits``) as it is."""
    weight = next(model.parameters())
    if not can_quantize(weight.device, weight.dtype):
        raise ValueError(
            f"{method} serving quantization needs a float32 or bfloat16 model on CPU, not "
            f"{weight.dtype} on {weight.device}: load it with QUARK_DTYPE=auto (or float32, "
            "bfloat16) on CPU, or use QUARK_QUANTIZATION=none"
        )
    layer = {"int8": Int8Linear, "int4": Int4Linear}[method]
    get_head = getattr(model, "get_output_embeddings", None)  # a transformers model's head
    head: object = get_head() if callable(get_head) else None
    kept: list[str] = []
    for module_name, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            if layer is Int4Linear and child is head:
                # int8 for the head, as llama.cpp's Q4 files keep it at 8 bits: an int4 head
                # moved next-token distributions 10x further from float32 (docs/results.md).
                setattr(module, name, Int8Linear(child))
            elif layer is Int4Linear and not Int4Linear.fits(child):
                kept.append(f"{module_name}.{name}")
            else:
                setattr(module, name, layer(child))
    if kept:
        log.warning("int4: %d linear layers kept unquantized (input width not a multiple of "
                    "%d): %s", len(kept), INT4_GROUP, ", ".join(kept[:5]))  # fmt: skip


def quantization_label(model: nn.Module) -> str | None:
    """'int4', 'int8' (the format of its other layers: an int4 model's head is int8) or None."""
    labels = {m.label for m in model.modules() if isinstance(m, QuantizedLinear)}
    return "int4" if "int4" in labels else next(iter(labels), None)
