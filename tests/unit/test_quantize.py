"""quark.quantize: weight-only int8 serving linears, and QUARK_QUANTIZATION's checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from app.decoding import Row, RowSampling, decode
from app.engine import check_serving_dtype, load_version
from quark import quantize
from quark.quantize import Int8Linear, quantize_int8, quantize_rows
from quark.service.settings import ServiceSettings


def test_rows_round_to_within_half_a_step_and_keep_the_row_maximum() -> None:
    weight = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]])
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8
    assert q[0, 1] == -127 and q[2, 0] == 127  # the row's absmax maps to 127
    assert torch.all((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[1], torch.zeros(3, dtype=torch.int8))  # an all-zero row stays zero


@pytest.mark.parametrize("rows", [1, quantize.INT8_MAX_ROWS + 3])
def test_int8_linear_matches_the_bf16_linear(rows: int) -> None:
    """Both paths (the int8 kernel for few rows, the bf16 weight for many) agree with the
    linear layer to int8's rounding."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    x = torch.randn(2, rows, 64, dtype=torch.bfloat16)
    quantized = Int8Linear(linear)
    got, expected = quantized(x), linear(x)
    assert got.shape == expected.shape == (2, rows, 48)
    assert got.dtype == torch.bfloat16
    rel = (got.float() - expected.float()).norm() / expected.float().norm()
    assert rel < 0.02


def test_both_kernels_multiply_by_the_same_int8_weights() -> None:
    """No jump at INT8_MAX_ROWS: many rows at once give what the rows give one by one
    (bf16 rounding apart), not what the unquantized weights give."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight[:, 0] = 3.0  # an outlier per row: coarse int8 steps for the rest
    quantized = Int8Linear(linear)
    x = torch.randn(2, quantize.INT8_MAX_ROWS + 3, 64, dtype=torch.bfloat16)
    together = quantized(x).float()
    one_by_one = torch.cat([quantized(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1).float()
    with torch.no_grad():
        unquantized = linear(x).float()

    def rel(a: torch.Tensor) -> float:
        return float((a - one_by_one).norm() / one_by_one.norm())

    assert rel(together) < 0.006 < 0.012 < rel(unquantized)  # measured: 0.004 and 0.015


@pytest.mark.parametrize("sequences", [2, quantize.INT8_MAX_ROWS + 3])
def test_int8_linear_takes_a_strided_last_position(sequences: int) -> None:
    """The head of a prefill sees hidden[:, -1:, :], a strided view: same rows, same output."""
    torch.manual_seed(0)
    quantized = Int8Linear(nn.Linear(32, 40, bias=False).to(torch.bfloat16))
    hidden = torch.randn(sequences, 6, 32, dtype=torch.bfloat16)
    last = hidden[:, -1:, :]
    assert not last.is_contiguous()
    torch.testing.assert_close(quantized(last), quantized(last.contiguous()))
    assert quantized(last).shape == (sequences, 1, 40)


def test_quantized_model_keeps_its_greedy_tokens_and_embeddings(tiny_model_dir: Path) -> None:
    settings = ServiceSettings(device="cpu", dtype="bfloat16")
    plain = load_version(str(tiny_model_dir), settings)
    quantized = load_version(
        str(tiny_model_dir), settings.model_copy(update={"quantization": "int8"})
    )
    linears = [m for m in quantized.qm.model.modules() if isinstance(m, Int8Linear)]
    assert linears and not any(type(m) is nn.Linear for m in quantized.qm.model.modules())
    assert quantized.dtype == "int8 weights, bfloat16" and plain.dtype == "bfloat16"
    embeddings = quantized.qm.model.get_input_embeddings().weight
    assert embeddings.dtype == torch.bfloat16
    prompt = list(plain.qm.tokenizer("The cat sat on", add_special_tokens=False)["input_ids"])
    tokens = [
        decode(loaded.qm, [Row(list(prompt), RowSampling(8, 0.0))])[0].tokens
        for loaded in (plain, quantized)
    ]
    assert len(tokens[1]) == 8
    # The tiny random model has near-ties everywhere; most greedy tokens still agree.
    assert sum(a == b for a, b in zip(*tokens, strict=True)) >= 4


def test_int8_needs_a_bfloat16_cpu_model() -> None:
    with pytest.raises(ValueError, match="bfloat16 model on CPU"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4)))
    settings = ServiceSettings(device="cpu", dtype="float32", quantization="int8")
    with pytest.raises(ValueError, match="QUARK_DTYPE=bfloat16"):
        check_serving_dtype(settings)


def test_an_unknown_quantization_is_a_settings_error() -> None:
    with pytest.raises(ValidationError, match="use one of none, int8"):
        ServiceSettings(quantization="int4")
    assert ServiceSettings(quantization=" INT8 ").quantization == "int8"
