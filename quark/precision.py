"""Floating-point precision of a model for inference: names, and what ``auto`` means here.

``auto`` is bfloat16 on CUDA and on a CPU with native bf16 arithmetic (x86 ``avx512_bf16``
or ``amx_bf16``, Arm ``bf16``), else float32: on a CPU without it, bf16 matmuls are
emulated and run slower than float32. Training keeps float32 weights (``quark train`` and
the worker load models in float32) and runs its forwards under bf16 autocast where ``auto``
finds native bf16 (``bf16_autocast``).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where it is used: the settings import this module
    import torch

#: The precisions a model can be served in, by name (torch's names for them).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: The values of QUARK_DTYPE.
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
#: The values of QUARK_QUANTIZATION (serving weights; ``quark.quantize``).
QUANTIZATION_CHOICES = ("none", "int8", "int4")
#: /proc/cpuinfo flags of CPUs whose vector units compute in bf16 natively.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), or None where unreadable."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether the CPU computes bf16 natively: from ``flags`` if given, else /proc/cpuinfo,
    else (no /proc, e.g. macOS) torch's own check of AVX512-BF16."""
    found = frozenset(flags) if flags is not None else cpu_flags()
    if found is not None:
        return bool(found & NATIVE_BF16_FLAGS)
    import torch

    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check()) if callable(check) else False


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(
    name: str, device: torch.device | str = "cpu", flags: Iterable[str] | None = None
) -> torch.dtype:
    """The torch dtype for a precision name on ``device``; ``auto`` as in the module
    docstring (``flags``: the CPU's feature flags, read from the machine when None)."""
    import torch

    key = name.strip().lower()
    if key == "auto":
        kind = torch.device(device).type
        native = kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16(flags))
        return torch.bfloat16 if native else torch.float32
    if key not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_CHOICES)}")
    dtype = getattr(torch, key)
    assert isinstance(dtype, torch.dtype)
    return dtype


def training_autocast(enabled: bool) -> AbstractContextManager[Any]:
    """The context a training forward runs in: CPU bf16 autocast when ``enabled``."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def bf16_autocast(precision: str, device: torch.device | str, native: bool | None = None) -> bool:
    """Whether training forwards run under CPU bf16 autocast: ``precision`` 'bfloat16' on a
    CPU model, or 'auto' on a CPU with native bf16 (``native``; None = detect it)."""
    import torch

    if torch.device(device).type != "cpu" or precision == "float32":
        return False
    if precision == "bfloat16":
        return True
    return cpu_has_native_bf16() if native is None else native
