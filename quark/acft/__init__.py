"""Attribute-controlled fine-tuning (ACFT, Meng et al. 2024) with a NADO auxiliary model.

See docs/acft.md: ``loss`` holds the pure objectives, ``head`` the auxiliary model R,
``training`` the two training steps, ``config`` the hyper-parameters (torch-free),
``corpus`` the fine-tuning corpus, ``offline`` ``quark train --objective acft``.

The names below are imported lazily, on first use: ``quark.acft.config`` is read by the
service's settings, which must not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quark.acft.config import ACFTConfig
    from quark.acft.head import AuxHead, base_outputs, head_parameters, load_head, save_head
    from quark.acft.loss import ACFTStats, NadoStats, acft_loss, nado_loss, q_logprobs
    from quark.acft.training import (
        ACFTTrainer,
        AuxTrainer,
        Example,
        LabelledSample,
        encode_examples,
        label_records,
        new_head,
        sample_labelled,
    )

_HOME = {
    "ACFTConfig": "config",
    "AuxHead": "head",
    "base_outputs": "head",
    "head_parameters": "head",
    "load_head": "head",
    "save_head": "head",
    "ACFTStats": "loss",
    "NadoStats": "loss",
    "acft_loss": "loss",
    "nado_loss": "loss",
    "q_logprobs": "loss",
    "ACFTTrainer": "training",
    "AuxTrainer": "training",
    "Example": "training",
    "LabelledSample": "training",
    "encode_examples": "training",
    "label_records": "training",
    "new_head": "training",
    "sample_labelled": "training",
}

__all__ = [
    "ACFTConfig",
    "ACFTStats",
    "ACFTTrainer",
    "AuxHead",
    "AuxTrainer",
    "Example",
    "LabelledSample",
    "NadoStats",
    "acft_loss",
    "base_outputs",
    "encode_examples",
    "head_parameters",
    "label_records",
    "load_head",
    "nado_loss",
    "new_head",
    "q_logprobs",
    "sample_labelled",
    "save_head",
]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'quark.acft' has no attribute {name!r}")
    return getattr(importlib.import_module(f"quark.acft.{_HOME[name]}"), name)
