"""The model a server serves: loading a version in QUARK_DTYPE, QUARK_QUANTIZATION's
weights, its version label, and the engine's thread count."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quark.models import QuarkModel, load_model, resolve_device, resolve_source
from quark.precision import cpu_has_native_bf16, dtype_name, resolve_dtype
from quark.quantize import can_quantize, quantization_label, quantize_linears
from quark.service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(eq=False)
class LoadedModel:
    """A model the engine serves, with its version label and context size."""

    qm: QuarkModel
    version: str
    context: int
    dtype: str  # of its weights: "float32", "bfloat16", ...
    loaded_at: float = field(default_factory=time.time)


def model_version(qm: QuarkModel, path: Path | None) -> str:
    """quark.json's "version" if present, else a short hash of the weights, else "base"."""
    if qm.metadata.get("version"):
        return str(qm.metadata["version"])
    files = sorted(path.glob("*.safetensors")) if path else []
    if not files:
        return "base"
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:12]


def serving_dtype(settings: ServiceSettings) -> torch.dtype:
    """The precision versions are loaded in for serving (QUARK_DTYPE, ``auto`` resolved
    for QUARK_DEVICE on this machine). Training loads its own models in float32."""
    return resolve_dtype(settings.dtype, resolve_device(settings.device))


#: int4 is faithful to a model on a 4-bit grid (the default GGUF's), not to versions trained
#: from it: their weights moved less than one step (docs/results.md, "int4 weights").
INT4_WARNING = (
    "QUARK_QUANTIZATION=int4 rounds every version onto a 4-bit grid: an unlearned version moved "
    "less than one step from the original, so int4 serves something close to the original "
    "model again (measured: next-token KL 0.03 to the original, 0.57 to the version). Serve "
    "unlearned versions with QUARK_QUANTIZATION=int8 or none."
)


def check_serving_dtype(settings: ServiceSettings) -> torch.dtype:
    """Resolve the serving precision at start-up (a bad QUARK_DEVICE fails here, not at the
    first load) and say in the log what was chosen and when it will be slow."""
    dtype = serving_dtype(settings)
    device = resolve_device(settings.device)
    quantized = settings.quantization != "none"
    if quantized and not can_quantize(device, dtype):
        raise ValueError(
            f"QUARK_QUANTIZATION={settings.quantization} serves a float32 or bfloat16 model on "
            f"CPU, but QUARK_DTYPE={settings.dtype} resolves to {dtype_name(dtype)} on {device}: "
            "set QUARK_DEVICE=cpu and QUARK_DTYPE=auto (or float32, bfloat16), or "
            "QUARK_QUANTIZATION=none"
        )
    log.info("serving in %s (QUARK_DTYPE=%s, device %s)", dtype_name(dtype), settings.dtype, device)
    if settings.quantization == "int4":
        log.warning(INT4_WARNING)
    emulated = dtype == torch.float16 or not cpu_has_native_bf16()
    if device.type == "cpu" and dtype != torch.float32 and emulated:
        log.warning(
            "QUARK_DTYPE=%s on a CPU without native %s arithmetic: decoding may be slower "
            "than float32",
            settings.dtype,
            dtype_name(dtype),
        )
    return dtype


def load_version(source: str, settings: ServiceSettings) -> LoadedModel:
    """Load a model source the way the server serves it (blocking: seconds)."""
    path = resolve_source(source, settings.cache_dir)
    qm = load_model(
        path, device=settings.device, dtype=serving_dtype(settings), cache_dir=settings.cache_dir
    )
    return wrap_model(prepare_for_serving(qm, settings), model_version(qm, path))


def prepare_for_serving(qm: QuarkModel, settings: ServiceSettings) -> QuarkModel:
    """What every served version gets after loading: QUARK_QUANTIZATION's weights."""
    if settings.quantization != "none":
        quantize_linears(qm.model, settings.quantization)
    return qm


def wrap_model(qm: QuarkModel, version: str) -> LoadedModel:
    context = int(getattr(qm.model.config, "max_position_embeddings", 0) or 2048)
    dtype = dtype_name(next(qm.model.parameters()).dtype)
    label = quantization_label(qm.model)
    if label is not None:
        dtype = f"{label} weights, {dtype}"
    return LoadedModel(qm, version, context, dtype)


def engine_threads(configured: int) -> int:
    """Torch threads for the engine: as configured, or all cores but one. The event loop
    and the pool writer need a core too: when they preempt one thread of a team that
    spans every core, the whole matmul waits for it (on the 2-core benchmark machine,
    2 threads decoded several times slower than 1; see docs/results.md)."""
    return configured or max(1, (os.cpu_count() or 2) - 1)
