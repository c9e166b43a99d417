"""A training loop's resumable state (step, optimizer, scheduler, RNG) as safetensors + JSON:
no pickle anywhere. Shared by the Quark trainer and the ACFT trainers."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "trainer_state.json"


def save_loop_state(
    out: Path,
    step: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: random.Random,
) -> None:
    """Write ``OPTIMIZER_FILE`` (tensors) and ``STATE_FILE`` (the rest) into ``out``."""
    tensors, meta = _flatten_optimizer(optimizer)
    save_file(tensors, str(out / OPTIMIZER_FILE))
    state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "optimizer": meta,
        "rng": rng.getstate(),
    }
    (out / STATE_FILE).write_text(json.dumps(state, default=list))


def load_loop_state(
    directory: Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    rng: random.Random,
) -> int:
    """Restore what :func:`save_loop_state` wrote; returns the step."""
    state = json.loads((directory / STATE_FILE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    _restore_optimizer(optimizer, load_file(str(directory / OPTIMIZER_FILE)), state["optimizer"])
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    return int(state["step"])


def _flatten_optimizer(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as named tensors (safetensors, no pickle) plus JSON-able scalars."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{name}"] = value.contiguous().cpu()
            else:
                scalars["state"].setdefault(str(index), {})[name] = float(value)
    return tensors, scalars


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, entry in scalars["state"].items():
        for name, value in entry.items():
            state.setdefault(int(index), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": scalars["param_groups"]})
