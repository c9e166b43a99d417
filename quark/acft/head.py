"""The auxiliary model R: a small head over a frozen causal LM's final hidden states.

NADO's official GPT-2 code reads the frozen base model's last hidden states, runs a few extra
transformer layers over them and projects to one logit per vocabulary token with a
zero-initialised output layer. On two shared CPU cores we keep the read-out and drop the extra
layers: a low-rank MLP H -> r -> V (docs/acft.md gives the sizes and the reasons).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quark.batching import completion_forward
from quark.fsutil import fsync_tree

HEAD_WEIGHTS = "aux_head.safetensors"
HEAD_CONFIG = "aux_head.json"


class AuxHead(torch.nn.Module):
    """R(x<t, v) = sigmoid(u_v . f(h_t) + b_v) with f(h) = gelu(W_down norm(h)) in R^r.

    ``hidden_states`` [B, T, H] (the frozen model's final hidden states at the positions that
    predict completion tokens) -> logits [B, T, V]. The output layers start at zero, so an
    untrained head says R = 1/2 for every token: constant R leaves q equal to the base model.
    Parameters: 2H (norm) + H r + r (down) + r V + V (up).
    """

    def __init__(self, hidden_size: int, vocab_size: int, rank: int = 64) -> None:
        super().__init__()
        self.hidden_size, self.vocab_size, self.rank = hidden_size, vocab_size, rank
        self.norm = torch.nn.LayerNorm(hidden_size)
        self.down = torch.nn.Linear(hidden_size, rank)
        self.up = torch.nn.Linear(rank, vocab_size)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.gelu(self.down(self.norm(hidden_states)))  # [B, T, r]
        return self.up(x)  # [B, T, V]

    def config(self) -> dict[str, int]:
        return {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "rank": self.rank}


@dataclass(frozen=True)
class BaseOutputs:
    hidden: torch.Tensor  # [B, T, H] final hidden states at the completion positions
    logits: torch.Tensor  # [B, T, V] the base model's logits at the same positions


@torch.no_grad()
def base_outputs(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int
) -> BaseOutputs:
    """One frozen forward: hidden states and logits at the ``width`` positions that predict
    the (right-aligned) completion (``quark.batching.completion_forward``)."""
    out = completion_forward(model, input_ids, attention_mask, width, hidden_states=True)
    # hidden_states[-1] is after the final norm: the LM head's input (checked in the tests).
    hidden = out.hidden_states[-1][:, -(width + 1) : -1, :]
    return BaseOutputs(hidden=hidden, logits=out.logits[:, :-1, :])


def save_head(head: AuxHead, directory: Path, extra: dict[str, object] | None = None) -> Path:
    """Write the head's weights (safetensors) and its shape (JSON) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(directory / HEAD_WEIGHTS))
    meta = {**head.config(), **(extra or {})}
    (directory / HEAD_CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    fsync_tree(directory)
    return directory


def load_head(directory: Path, device: torch.device | str = "cpu") -> AuxHead:
    """The head saved by ``save_head`` (no pickle: safetensors + JSON)."""
    meta = json.loads((directory / HEAD_CONFIG).read_text())
    head = AuxHead(int(meta["hidden_size"]), int(meta["vocab_size"]), int(meta["rank"]))
    head.load_state_dict(load_file(str(directory / HEAD_WEIGHTS), device=str(device)))
    return head.to(device)


def head_parameters(hidden_size: int, vocab_size: int, rank: int) -> int:
    """Number of parameters of ``AuxHead(hidden_size, vocab_size, rank)``."""
    return 2 * hidden_size + hidden_size * rank + rank + rank * vocab_size + vocab_size
