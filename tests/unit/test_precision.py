"""QUARK_DTYPE: what ``auto`` resolves to, validation at start-up, and the serving load path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from app.serving_model import load_version, serving_dtype
from quark.models import load_model
from quark.precision import cpu_flags, cpu_has_native_bf16, resolve_dtype
from quark.service.settings import ServiceSettings

X86_BF16 = ["fpu", "avx2", "avx512f", "avx512_bf16", "amx_tile"]
X86_PLAIN = ["fpu", "sse4_2", "avx2", "avx512f"]


def test_auto_is_bf16_on_a_cpu_with_native_bf16() -> None:
    assert resolve_dtype("auto", "cpu", flags=X86_BF16) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", flags=["amx_bf16"]) == torch.bfloat16
    assert resolve_dtype("auto", "cpu", flags=["fp", "asimd", "bf16"]) == torch.bfloat16  # Arm


def test_auto_is_float32_on_a_cpu_without_it() -> None:
    assert resolve_dtype("auto", "cpu", flags=X86_PLAIN) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu"), flags=[]) == torch.float32


def test_auto_is_bf16_on_cuda_whatever_the_cpu() -> None:
    assert resolve_dtype("auto", "cuda", flags=X86_PLAIN) == torch.bfloat16
    assert resolve_dtype("auto", "cuda:1", flags=[]) == torch.bfloat16


def test_explicit_names_ignore_the_hardware() -> None:
    for name, dtype in [("float32", torch.float32), ("bfloat16", torch.bfloat16)]:
        assert resolve_dtype(name, "cpu", flags=[]) == dtype
        assert resolve_dtype(name.upper(), "cuda", flags=X86_BF16) == dtype
    assert resolve_dtype("float16", "cpu", flags=X86_BF16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text(
        "processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_bf16\n\n"
        "processor\t: 1\nflags\t\t: fpu avx512_bf16 amx_bf16\n"
    )
    flags = cpu_flags(x86)
    assert flags == frozenset({"fpu", "avx512_bf16", "amx_bf16"})
    assert cpu_has_native_bf16(flags)
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm\n")
    assert cpu_flags(arm) == frozenset({"fp", "asimd", "evtstrm"})
    assert not cpu_has_native_bf16(cpu_flags(arm))
    assert cpu_flags(tmp_path / "missing") is None


def test_settings_default_to_auto_and_normalise_the_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QUARK_DTYPE", raising=False)
    assert ServiceSettings().dtype == "auto"
    monkeypatch.setenv("QUARK_DTYPE", " BFloat16 ")
    assert ServiceSettings().dtype == "bfloat16"


def test_an_invalid_dtype_is_a_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUARK_DTYPE", "int4")
    with pytest.raises(ValidationError) as caught:
        ServiceSettings()
    message = str(caught.value)
    assert "QUARK_DTYPE='int4'" in message
    assert "auto, float32, bfloat16, float16" in message


def test_the_server_loads_versions_in_the_serving_dtype(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = ServiceSettings(data_dir=tmp_path, device="cpu", dtype="bfloat16")
    assert serving_dtype(settings) == torch.bfloat16
    loaded = load_version(str(tiny_model_dir), settings)
    assert loaded.dtype == "bfloat16"
    assert {p.dtype for p in loaded.qm.model.parameters()} == {torch.bfloat16}
    as_float32 = load_version(str(tiny_model_dir), settings.model_copy(update={"dtype": "float32"}))
    assert as_float32.dtype == "float32"


def test_training_loads_keep_float32(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """QUARK_DTYPE is the server's: load_model (the worker's and `quark train`'s loader)
    keeps float32 unless asked, whatever the environment says."""
    monkeypatch.setenv("QUARK_DTYPE", "bfloat16")
    qm = load_model(tiny_model_dir, device="cpu")
    assert {p.dtype for p in qm.model.parameters()} == {torch.float32}


def test_a_renamed_setting_is_refused_naming_its_new_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUARK_UNLEARN_BF16_AUTOCAST", "1")
    with pytest.raises(ValueError, match="QUARK_UNLEARN_TRAIN_PRECISION"):
        ServiceSettings()
