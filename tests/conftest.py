"""Shared fixtures: the SmolLM2 tokenizer (read from the GGUF once per session), tiny models,
and the real Redis (at REDIS_URL; `make test` starts one when none answers)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import ModuleType

import pytest
import redis
import torch

from quark.models import QuarkModel
from quark.service.redis_client import answers as redis_answers
from testkit.tiny_model import build_tiny_model, save_tiny_model, smollm2_tokenizer

# The test machine has two cores shared with long training runs: with two intra-op threads
# torch spins against the other processes and tiny-model steps get ~5x slower, not faster.
torch.set_num_threads(1)

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_client() -> redis.Redis:
    if not redis_answers(REDIS_URL):
        pytest.skip(f"no Redis answers at {REDIS_URL} (.ci/run starts one)")
    return redis.Redis.from_url(REDIS_URL)


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session directory holding the SmolLM2 tokenizer files (converted once, ~5 s)."""
    root = tmp_path_factory.mktemp("tokenizer-cache")
    smollm2_tokenizer(root)  # warms testkit.tiny_model's per-directory cache
    return root


@pytest.fixture(scope="session")
def _pristine_tiny_qm(tokenizer_cache: Path) -> QuarkModel:
    return build_tiny_model(tokenizer_cache)


@pytest.fixture
def tiny_qm(_pristine_tiny_qm: QuarkModel) -> QuarkModel:
    """A fresh tiny 2-layer Llama with 5 reward tokens (each test may mutate it).

    A deep copy of one session-built model (same weights as ``build_tiny_model``, seed 0):
    model, tokenizer and metadata are independent, and copying is ~3x cheaper than building.
    """
    return copy.deepcopy(_pristine_tiny_qm)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_cache: Path) -> Path:
    """A saved tiny checkpoint (safetensors + tokenizer + quark.json); treat it as read-only."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model") / "tiny", tokenizer_cache)


LogitBias = Callable[..., AbstractContextManager[None]]


@contextmanager
def _logit_bias(
    models: torch.nn.Module | list[torch.nn.Module], bias: Mapping[int, float]
) -> Iterator[None]:
    """Add a constant to the LM-head output of ``models`` for the given token ids.

    The tiny model ties its LM head to the input embeddings and has no head bias, so a
    forward hook on the output embedding module is the least invasive way to add one.
    """
    handles = []
    for model in models if isinstance(models, list) else [models]:
        head = model.get_output_embeddings()
        vector = torch.zeros(head.weight.shape[0], device=head.weight.device)
        for token_id, value in bias.items():
            vector[token_id] = value

        def hook(
            _module: torch.nn.Module,
            _inputs: object,
            output: torch.Tensor,
            vector: torch.Tensor = vector,
        ) -> torch.Tensor:
            return output + vector.to(output.dtype)

        handles.append(head.register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@pytest.fixture
def logit_bias() -> LogitBias:
    """``with logit_bias(model_or_models, {token_id: value}):`` biases the LM head's logits."""
    return _logit_bias


def _load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the benchmarks are scripts, not a package)."""
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while they are built
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_benchmark() -> Callable[[str], ModuleType]:
    return _load_benchmark
