"""Reward from a local Hugging Face sequence-classification model."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quark.rewards.base import CompletionReward

# Weight formats that are unpickled on load; loading them from an untrusted dir
# can execute arbitrary code, so we refuse dirs that only ship these.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def resolve_label(id2label: Mapping[Any, str], label: str) -> int:
    """Index of ``label`` in ``id2label`` (case-insensitive); ValueError if absent."""
    wanted = label.casefold()
    for idx, name in id2label.items():
        if str(name).casefold() == wanted:
            return int(idx)
    available = ", ".join(repr(str(n)) for n in id2label.values())
    raise ValueError(f"label {label!r} not in the classifier's labels: {available}")


def check_safe_weights(model_dir: Path) -> None:
    """Require safetensors weights in ``model_dir`` (never unpickle)."""
    if not model_dir.is_dir():
        raise ValueError(f"classifier model dir not found: {model_dir}")
    if any(model_dir.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(
            f"refusing to load {model_dir}: it only has pickle weights ({', '.join(pickled)}), "
            "which can run arbitrary code when loaded; convert them to .safetensors"
        )
    raise ValueError(f"no .safetensors weights found in {model_dir}")


class ClassifierReward(CompletionReward):
    """Score = P(label) from a local classifier, or 1 - P(label) when ``invert``.

    The config and label are checked eagerly; tokenizer and weights load on the
    first call so constructing the reward (e.g. at service start) stays cheap.
    Multi-label models (``problem_type == "multi_label_classification"``, e.g.
    toxic-bert) use a per-label sigmoid, since their labels are not exclusive;
    all others use a softmax.
    """

    def __init__(
        self,
        model_dir: str | Path,
        label: str,
        invert: bool = False,
        device: str = "cpu",
        batch_size: int = 32,
        max_length: int = 512,
    ) -> None:
        from transformers import AutoConfig

        if batch_size < 1 or max_length < 1:
            raise ValueError("batch_size and max_length must be >= 1")
        self.model_dir = Path(model_dir)
        check_safe_weights(self.model_dir)
        self.config = AutoConfig.from_pretrained(self.model_dir, local_files_only=True)
        self.label = label
        self.label_index = resolve_label(self.config.id2label, label)
        self.invert = invert
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._multi_label = self.config.problem_type == "multi_label_classification"
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        if tokenizer.pad_token is None:
            # Decoder-only tokenizers often lack a pad token; batching needs one.
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForSequenceClassification.from_pretrained(
            self.model_dir, config=self.config, local_files_only=True, use_safetensors=True
        )
        if model.config.pad_token_id is None:
            # Decoder classifiers pool the last non-pad token, found via pad_token_id.
            model.config.pad_token_id = tokenizer.pad_token_id
        self._tokenizer, self._model = tokenizer, model.to(self.device).eval()

    def _ensure_loaded(self) -> None:
        with self._lock:
            if self._model is None:
                self._load()

    def score(self, completions: list[str]) -> list[float]:
        self._ensure_loaded()
        probs: list[float] = []
        for start in range(0, len(completions), self.batch_size):
            probs.extend(self._label_probs(completions[start : start + self.batch_size]))
        return [1.0 - p if self.invert else p for p in probs]

    def _label_probs(self, texts: list[str]) -> list[float]:
        import torch

        # Tokenizers without BOS turn "" into zero tokens, which models reject.
        texts = [t if t else " " for t in texts]
        batch = self._tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.inference_mode():
            logits = self._model(**batch).logits.float()
        probs = torch.sigmoid(logits) if self._multi_label else torch.softmax(logits, dim=-1)
        return [float(p) for p in probs[:, self.label_index].cpu()]
