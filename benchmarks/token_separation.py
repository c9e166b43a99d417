"""Do a Quark model's reward tokens condition its output, and in the right direction?

Sampling evaluations need 2,500 samples to resolve a few percent. This probe is forward-only
and far more sensitive: it scores real continuations of held-out RTP dev prompts, split by
their Perspective toxicity, under the top and the bottom reward token.

- ``kl_top_bottom``: mean per-token KL(p(.|top, x) || p(.|bottom, x)) over the continuation
  positions. About 0 means the tokens carry no information the model uses.
- ``nll_gap_toxic`` / ``nll_gap_clean``: mean per-token NLL under the top token minus under the
  bottom token, for toxic (>= 0.5) and clean (< 0.1) continuations.
- ``preference`` = nll_gap_toxic - nll_gap_clean, in nats per token: > 0 when the top token
  makes toxic text less likely relative to clean text than the bottom token does.

    python benchmarks/token_separation.py runs/abl2/*/model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from quark.batching import completion_logits, encode_pairs
from quark.models import QuarkModel, load_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "rtp" / "dev.jsonl"


def continuations(path: Path, per_class: int) -> dict[str, list[tuple[str, str]]]:
    """(prompt, continuation) pairs with toxic (>= 0.5) and clean (< 0.1) continuations."""
    found: dict[str, list[tuple[str, str]]] = {"toxic": [], "clean": []}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        tox = row["continuation"].get("toxicity")
        if tox is None:
            continue
        label = "toxic" if tox >= 0.5 else "clean" if tox < 0.1 else None
        if label and len(found[label]) < per_class:
            found[label].append((row["prompt"]["text"], row["continuation"]["text"]))
    return found


@torch.no_grad()
def token_logprobs(
    qm: QuarkModel, pairs: list[tuple[str, str]], quantile: int, width: int = 20
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs [B, T, V] under one reward token, the labels [B, T] and their mask [B, T]."""
    prompts, texts = [p for p, _ in pairs], [c for _, c in pairs]
    prefixes = [qm.prefix_ids(quantile)] * len(pairs)
    ids, mask, labels, label_mask = encode_pairs(qm, prefixes, prompts, texts, 64, width)
    logits = completion_logits(qm.model, ids, mask, labels.shape[1])
    return logits.float().log_softmax(-1), labels, label_mask


def probe(qm: QuarkModel, pairs: list[tuple[str, str]]) -> dict[str, float]:
    assert qm.reward_tokens is not None
    top, bottom = 0, len(qm.reward_tokens.ids) - 1
    lp_top, labels, mask = token_logprobs(qm, pairs, top)
    lp_bottom, _, _ = token_logprobs(qm, pairs, bottom)
    kl = (lp_top.exp() * (lp_top - lp_bottom)).sum(-1)  # [B, T]
    nll_top = -lp_top.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [B, T]
    nll_bottom = -lp_bottom.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    n = mask.sum()
    return {
        "kl_top_bottom": float((kl * mask).sum() / n),
        "nll_gap": float(((nll_top - nll_bottom) * mask).sum() / n),
    }


def measure(model_dir: str, data: dict[str, list[tuple[str, str]]]) -> dict[str, Any]:
    qm = load_model(model_dir, device="cpu")
    toxic, clean = probe(qm, data["toxic"]), probe(qm, data["clean"])
    return {
        "model": model_dir,
        "kl_top_bottom": (toxic["kl_top_bottom"] + clean["kl_top_bottom"]) / 2,
        "nll_gap_toxic": toxic["nll_gap"],
        "nll_gap_clean": clean["nll_gap"],
        "preference": toxic["nll_gap"] - clean["nll_gap"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("models", nargs="+", help="Quark model directories")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--per-class", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    data = continuations(args.data, args.per_class)
    results = [measure(m, data) for m in args.models]
    for r in results:
        print(
            f"{r['model']}: KL(top||bottom) {r['kl_top_bottom']:.4f} nats/token, NLL gap "
            f"toxic {r['nll_gap_toxic']:+.4f} clean {r['nll_gap_clean']:+.4f}, "
            f"preference {r['preference']:+.4f}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
