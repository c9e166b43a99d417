"""quark.quantize: weight-only int8 and int4 serving linears, and QUARK_QUANTIZATION's
checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from app.decoding import Row, RowSampling, decode
from app.serving_model import check_serving_dtype, load_version
from quark.quantize import (
    Int4Linear,
    Int8Linear,
    QuantizedLinear,
    quantize_groups,
    quantize_linears,
    quantize_rows,
)
from quark.service.settings import ServiceSettings


def test_rows_round_to_within_half_a_step_and_keep_the_row_maximum() -> None:
    weight = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.5, -0.75]])
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8
    assert q[0, 1] == -127 and q[2, 0] == 127  # the row's absmax maps to 127
    assert torch.all((q.float() * scale[:, None] - weight).abs() <= scale[:, None] / 2 + 1e-7)
    assert torch.equal(q[1], torch.zeros(3, dtype=torch.int8))  # an all-zero row stays zero


def test_groups_round_to_within_half_a_step_and_keep_each_groups_range() -> None:
    torch.manual_seed(0)
    weight = torch.randn(3, 64)
    weight[1, :32] = 0.5  # a constant group: every code 0, the minimum is the value
    codes, scale, low = quantize_groups(weight, group=32)
    assert codes.shape == (3, 64) and scale.shape == low.shape == (3, 2)
    assert int(codes.min()) == 0 and int(codes.max()) == 15
    grouped = codes.reshape(3, 2, 32).float()
    back = grouped * scale[..., None] + low[..., None]  # [3, 2, 32]
    error = (back - weight.reshape(3, 2, 32)).abs()
    # half a step, plus what rounding the scale and minimum to bfloat16 moves the grid by
    assert torch.all(error <= scale[..., None] * 0.55 + low.abs()[..., None] / 128)
    assert torch.equal(codes[1, :32], torch.zeros(32, dtype=torch.int32))


def test_a_grid_of_q4_1_values_requantizes_exactly() -> None:
    """A weight already on a group's 16-level grid (a model converted from a Q4_1 GGUF) comes
    back unchanged, with bfloat16-exact scale and minimum."""
    codes = torch.arange(64).remainder(16).reshape(2, 32)  # every code in each group
    weight = codes.float() * 0.125 - 1.0
    got, scale, low = quantize_groups(weight, group=32)
    assert torch.equal(got, codes.to(torch.int32))
    assert torch.equal(scale, torch.full((2, 1), 0.125)) and torch.equal(
        low, torch.full((2, 1), -1.0)
    )


LAYERS = [Int8Linear, Int4Linear]


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("extra_rows", [0, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_linear_matches_the_linear(
    layer: type[QuantizedLinear], extra_rows: int, dtype: torch.dtype
) -> None:
    """Both paths (the packed kernel for few rows, the dequantized weight for many) agree with
    the linear layer to the format's rounding, and answer in the layer's dtype."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(dtype)
    rows = 1 if not extra_rows else layer.max_rows + extra_rows
    x = torch.randn(2, rows, 64, dtype=dtype)
    quantized = layer(linear)
    got, expected = quantized(x), linear(x)
    assert got.shape == expected.shape == (2, rows, 48)
    assert got.dtype == quantized.weight.dtype == dtype
    rel = (got.float() - expected.float()).norm() / expected.float().norm()
    assert rel < {"int8": 0.02, "int4": 0.15}[layer.label]


@pytest.mark.parametrize("layer", LAYERS)
def test_both_kernels_multiply_by_the_same_quantized_weights(layer: type[QuantizedLinear]) -> None:
    """No jump at max_rows: many rows at once give what the rows give one by one (bf16
    rounding apart), not what the unquantized weights give."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight[:, 0] = 3.0  # an outlier per row (and group): coarse steps for the rest
    quantized = layer(linear)
    x = torch.randn(2, layer.max_rows + 3, 64, dtype=torch.bfloat16)
    together = quantized(x).float()
    one_by_one = torch.cat([quantized(x[:, i : i + 1]) for i in range(x.shape[1])], dim=1).float()
    with torch.no_grad():
        unquantized = linear(x).float()

    def rel(a: torch.Tensor) -> float:
        return float((a - one_by_one).norm() / one_by_one.norm())

    assert rel(together) < 0.006 < 0.012 < rel(unquantized)  # int8 measured: 0.004 and 0.015


@pytest.mark.parametrize("layer", LAYERS)
def test_a_float32_layer_multiplies_by_the_same_weights_as_a_bfloat16_one(
    layer: type[QuantizedLinear],
) -> None:
    """A float32 model's quantized layer holds the bfloat16 one's weights exactly (scales and
    minimums are bfloat16 in both), and its packed path is the bfloat16 kernel's."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False).to(torch.bfloat16).float()  # bfloat16-exact weights
    as_float32, as_bfloat16 = layer(linear), layer(linear.to(torch.bfloat16))
    assert torch.equal(as_float32.weight.bfloat16(), as_bfloat16.weight)
    one_row = torch.randn(1, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(as_float32(one_row.float()), as_bfloat16(one_row).float())


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("sequences", [2, 7])
def test_quantized_linear_takes_a_strided_last_position(
    layer: type[QuantizedLinear], sequences: int
) -> None:
    """The head of a prefill sees hidden[:, -1:, :], a strided view: same rows, same output."""
    torch.manual_seed(0)
    quantized = layer(nn.Linear(32, 48, bias=False).to(torch.bfloat16))
    hidden = torch.randn(sequences, 6, 32, dtype=torch.bfloat16)
    last = hidden[:, -1:, :]
    assert not last.is_contiguous()
    torch.testing.assert_close(quantized(last), quantized(last.contiguous()))
    assert quantized(last).shape == (sequences, 1, 48)


def test_int4_keeps_the_layers_its_kernel_cannot_take() -> None:
    model = nn.Sequential(nn.Linear(64, 48), nn.Linear(48, 32))
    quantize_linears(model.to(torch.bfloat16), "int4")
    assert isinstance(model[0], Int4Linear)
    assert type(model[1]) is nn.Linear  # 48 inputs: not a multiple of the group of 32


def test_int4_pads_an_output_width_its_kernel_cannot_take() -> None:
    """A head whose vocabulary grew by 5 reward tokens: 21 outputs, padded to 32 inside."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 21, bias=False).to(torch.bfloat16)
    quantized = Int4Linear(linear)
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    got = quantized(x)
    assert got.shape == (1, 21)
    expected = x.float() @ quantized.weight.float().t()  # the dequantized weights
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_quantized_model_keeps_its_greedy_tokens_and_embeddings(
    tiny_model_dir: Path, method: str, dtype: str
) -> None:
    settings = ServiceSettings(device="cpu", dtype=dtype)
    plain = load_version(str(tiny_model_dir), settings)
    quantized = load_version(
        str(tiny_model_dir), settings.model_copy(update={"quantization": method})
    )
    layer = {"int8": Int8Linear, "int4": Int4Linear}[method]
    linears = [m for m in quantized.qm.model.modules() if isinstance(m, layer)]
    assert linears and not any(type(m) is nn.Linear for m in quantized.qm.model.modules())
    assert quantized.dtype == f"{method} weights, {dtype}" and plain.dtype == dtype
    assert isinstance(quantized.qm.model.get_output_embeddings(), Int8Linear)  # 8 bits either way
    embeddings = quantized.qm.model.get_input_embeddings().weight
    assert embeddings.dtype == getattr(torch, dtype)
    prompt = list(plain.qm.tokenizer("The cat sat on", add_special_tokens=False)["input_ids"])
    tokens = [
        decode(loaded.qm, [Row(list(prompt), RowSampling(8, 0.0))])[0].tokens
        for loaded in (plain, quantized)
    ]
    assert len(tokens[1]) == 8
    # The tiny random model has near-ties everywhere; most greedy tokens still agree.
    assert sum(a == b for a, b in zip(*tokens, strict=True)) >= 4


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantization_needs_a_float32_or_bfloat16_cpu_model(method: str) -> None:
    with pytest.raises(ValueError, match=f"{method} serving quantization needs a float32 or"):
        quantize_linears(nn.Sequential(nn.Linear(32, 4)).half(), method)
    settings = ServiceSettings(device="cpu", dtype="float16", quantization=method)
    with pytest.raises(ValueError, match="QUARK_DTYPE=auto"):
        check_serving_dtype(settings)
    float32 = settings.model_copy(update={"dtype": "float32"})
    assert check_serving_dtype(float32) == torch.float32


def test_int4_warns_at_start_up_that_it_rounds_unlearning_away(
    caplog: pytest.LogCaptureFixture,
) -> None:
    check_serving_dtype(ServiceSettings(device="cpu", dtype="bfloat16", quantization="int8"))
    assert "4-bit grid" not in caplog.text
    check_serving_dtype(ServiceSettings(device="cpu", dtype="bfloat16", quantization="int4"))
    assert "QUARK_QUANTIZATION=int8" in caplog.text and "4-bit grid" in caplog.text


def test_an_unknown_quantization_is_a_settings_error() -> None:
    with pytest.raises(ValidationError, match="use one of none, int8, int4"):
        ServiceSettings(quantization="int2")
    assert ServiceSettings(quantization=" INT8 ").quantization == "int8"
