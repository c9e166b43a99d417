"""A local toxicity reward distilled from Perspective: hashed n-grams + a linear model.

The model is trained by ``scripts/train_toxicity_scorer.py`` on RealToxicityPrompts texts
and their Perspective toxicity scores, and ships inside the package as
``artifacts/toxicity-ngram-v1.safetensors`` (weights) plus ``toxicity-ngram-v1.json``
(featurizer config, data provenance and metrics); neither format can run code on load.

Features are hashed word 1-2-grams and character 2-5-grams. The hash is
``zlib.crc32`` of a family-tagged n-gram, so the artifact alone says how to rebuild the
features (no sklearn internals involved). Scoring is pure Python + numpy; numpy is
imported on first use, so importing :mod:`quark.rewards` stays light.
"""

from __future__ import annotations

import json
import re
import threading
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quark.rewards.base import CompletionReward

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"
NGRAM_ARTIFACT = "toxicity-ngram-v1"
FEATURIZER_KIND = "hashed-ngrams-crc32"

_WORD_RE = re.compile(r"\w+|[^\w\s]")
_SPACE_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class NgramFeaturizer:
    """Hashed, sublinear-tf, L2-normalised word and character n-gram features.

    A text's feature vector has ``n_features`` buckets; each word n-gram ``g`` adds to
    bucket ``crc32("w" + g) % n_features`` and each character n-gram to
    ``crc32("c" + g) % n_features``. Bucket counts become ``1 + log(count)``, then the
    vector is scaled to unit L2 norm (an empty text has no features).
    """

    n_features: int = 2**19
    word_ngrams: tuple[int, int] = (1, 2)
    char_ngrams: tuple[int, int] = (2, 5)

    def __post_init__(self) -> None:
        if self.n_features < 1:
            raise ValueError("n_features must be >= 1")
        for low, high in (self.word_ngrams, self.char_ngrams):
            if not 1 <= low <= high:
                raise ValueError(f"bad n-gram range ({low}, {high})")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NgramFeaturizer:
        if config.get("kind") != FEATURIZER_KIND:
            raise ValueError(f"unknown featurizer kind {config.get('kind')!r}")
        return cls(
            n_features=int(config["n_features"]),
            word_ngrams=_pair(config["word_ngrams"]),
            char_ngrams=_pair(config["char_ngrams"]),
        )

    def config(self) -> dict[str, Any]:
        """JSON-ready description; :meth:`from_config` rebuilds the same featurizer."""
        return {
            "kind": FEATURIZER_KIND,
            "n_features": self.n_features,
            "word_ngrams": list(self.word_ngrams),
            "char_ngrams": list(self.char_ngrams),
        }

    def grams(self, text: str) -> list[str]:
        """The family-tagged n-grams of ``text``: ``w`` + word n-gram, ``c`` + char n-gram.

        Text is lowercased and its whitespace runs collapsed to one space; words are runs
        of word characters or single punctuation marks; character n-grams run over the
        text padded with one space on each side.
        """
        normal = _SPACE_RE.sub(" ", text.lower()).strip()
        if not normal:
            return []
        words = _WORD_RE.findall(normal)
        low, high = self.word_ngrams
        grams = [
            "w" + " ".join(words[i : i + n])
            for n in range(low, high + 1)
            for i in range(len(words) - n + 1)
        ]
        padded = f" {normal} "
        low, high = self.char_ngrams
        grams += [
            "c" + padded[i : i + n]
            for n in range(low, high + 1)
            for i in range(len(padded) - n + 1)
        ]
        return grams

    def bucket_counts(self, text: str) -> Counter[int]:
        """How many of ``text``'s n-grams hash to each bucket."""
        size = self.n_features
        return Counter([zlib.crc32(g.encode("utf-8")) % size for g in self.grams(text)])

    def transform(self, texts: Sequence[str]) -> SparseRows:
        """The ``len(texts) x n_features`` feature matrix, as CSR parts."""
        import numpy as np

        indptr = [0]
        indices: list[int] = []
        counts: list[int] = []
        for text in texts:
            found = self.bucket_counts(text)
            indices.extend(found)
            counts.extend(found.values())
            indptr.append(len(indices))
        rows = np.repeat(np.arange(len(texts)), np.diff(indptr))
        values = 1.0 + np.log(np.asarray(counts, dtype=np.float64))
        norms = np.sqrt(np.bincount(rows, weights=values * values, minlength=len(texts)))
        return SparseRows(
            np.asarray(indptr, dtype=np.int64),
            np.asarray(indices, dtype=np.int64),
            values / norms[rows] if len(values) else values,
        )

    def features(self, text: str) -> dict[int, float]:
        """Sparse feature vector of one text: bucket index -> value."""
        rows = self.transform([text])
        return {int(i): float(v) for i, v in zip(rows.indices, rows.values, strict=True)}


@dataclass(frozen=True)
class SparseRows:
    """A CSR matrix's parts: row ``r`` has ``values[indptr[r]:indptr[r + 1]]`` at ``indices``."""

    indptr: npt.NDArray[np.int64]
    indices: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]

    def row_ids(self) -> npt.NDArray[np.int64]:
        """The row of each stored value."""
        import numpy as np

        return np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))


@dataclass(frozen=True)
class LinearToxicityModel:
    """``P(toxic) = sigmoid(features . weights + bias)`` over an :class:`NgramFeaturizer`."""

    featurizer: NgramFeaturizer
    weights: npt.NDArray[np.float32]
    bias: float

    def predict(self, texts: Sequence[str]) -> list[float]:
        """Predicted Perspective toxicity of each text, in [0, 1]."""
        import numpy as np

        rows = self.featurizer.transform(texts)
        contrib = rows.values * self.weights[rows.indices]
        sums = np.bincount(rows.row_ids(), weights=contrib, minlength=len(texts))
        logits = np.clip(sums + self.bias, -50.0, 50.0)
        return [float(p) for p in 1.0 / (1.0 + np.exp(-logits))]


def artifact_paths(name: str, directory: Path = ARTIFACTS_DIR) -> tuple[Path, Path]:
    """``(weights.safetensors, metadata.json)`` of artifact ``name`` in ``directory``."""
    return directory / f"{name}.safetensors", directory / f"{name}.json"


def load_metadata(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return meta


def load_ngram_model(
    name: str = NGRAM_ARTIFACT, directory: Path = ARTIFACTS_DIR
) -> LinearToxicityModel:
    """Load a model written by ``scripts/train_toxicity_scorer.py`` (safetensors + JSON)."""
    from safetensors.numpy import load_file

    weights_path, meta_path = artifact_paths(name, directory)
    meta = load_metadata(meta_path)
    tensors = load_file(weights_path)
    featurizer = NgramFeaturizer.from_config(meta["featurizer"])
    weights = tensors["weights"]
    if weights.shape != (featurizer.n_features,):
        raise ValueError(
            f"{weights_path}: weights have shape {weights.shape}, "
            f"expected ({featurizer.n_features},)"
        )
    return LinearToxicityModel(featurizer, weights, float(tensors["bias"].reshape(-1)[0]))


class DistilledToxicityReward(CompletionReward):
    """Non-toxicity reward ``1 - P(toxic)`` from the shipped n-gram model.

    The artifact loads on the first call, so constructing the reward stays cheap.
    """

    def __init__(self, name: str = NGRAM_ARTIFACT, directory: str | Path = ARTIFACTS_DIR) -> None:
        self.name = name
        self.directory = Path(directory)
        self._model: LinearToxicityModel | None = None
        self._lock = threading.Lock()

    @property
    def model(self) -> LinearToxicityModel:
        with self._lock:
            if self._model is None:
                self._model = load_ngram_model(self.name, self.directory)
            return self._model

    def toxicity(self, texts: Sequence[str]) -> list[float]:
        """Predicted Perspective toxicity of each text, in [0, 1]."""
        return self.model.predict(texts)

    def score(self, completions: list[str]) -> list[float]:
        return [min(1.0, max(0.0, 1.0 - p)) for p in self.toxicity(completions)]


def _pair(value: Any) -> tuple[int, int]:
    low, high = value
    return int(low), int(high)
