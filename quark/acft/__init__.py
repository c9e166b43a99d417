"""Attribute-controlled fine-tuning (ACFT, Meng et al. 2024) with a NADO auxiliary model.

See docs/acft.md: ``loss`` holds the pure objectives, ``head`` the auxiliary model R,
``training`` the two training steps, ``config`` the hyper-parameters.
"""

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
