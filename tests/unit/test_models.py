"""quark.models: reward tokens, RewardTokens.resolve, safetensors checkpoints, model sources."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from quark.models import (
    QUARK_METADATA_FILE,
    REWARD_TOKEN_FORMAT,
    QuarkModel,
    RewardTokens,
    add_reward_tokens,
    load_model,
    resolve_source,
    save_model,
)
from testkit.tiny_model import build_tiny_model


@pytest.fixture
def bare_qm(tokenizer_cache: Path) -> QuarkModel:
    """A tiny model without reward tokens yet."""
    return build_tiny_model(tokenizer_cache, num_quantiles=None)


def test_add_reward_tokens_adds_k_consecutive_single_id_tokens(bare_qm: QuarkModel) -> None:
    vocab = len(bare_qm.tokenizer)
    rows = bare_qm.model.get_input_embeddings().weight.shape[0]
    tokens = add_reward_tokens(bare_qm, 5, torch.Generator().manual_seed(0))

    assert bare_qm.reward_tokens is tokens
    assert tokens.tokens == tuple(REWARD_TOKEN_FORMAT.format(i) for i in range(5))
    assert tokens.ids == tuple(range(vocab, vocab + 5))
    assert (tokens.top_id, tokens.bottom_id, len(tokens)) == (vocab, vocab + 4, 5)
    for token, token_id in zip(tokens.tokens, tokens.ids, strict=True):
        assert bare_qm.tokenizer(token, add_special_tokens=False)["input_ids"] == [token_id]
        # ... also glued to a prompt, the way batching and sampling use it.
        ids = bare_qm.tokenizer(token + "Hello world", add_special_tokens=False)["input_ids"]
        assert ids[0] == token_id and token_id not in ids[1:]
    assert bare_qm.model.get_input_embeddings().weight.shape[0] == rows + 5
    assert bare_qm.model.get_output_embeddings().weight.shape[0] == rows + 5
    assert bare_qm.base_vocab_size == vocab  # the reference vocabulary does not grow
    assert bare_qm.prefix_ids(0) == [tokens.top_id]
    assert bare_qm.prefix_ids(None) == []


def test_new_embedding_rows_follow_the_per_dimension_statistics(bare_qm: QuarkModel) -> None:
    embeddings = bare_qm.model.get_input_embeddings().weight
    hidden = embeddings.shape[1]
    # Give every dimension its own mean and spread, so "per dimension" is actually tested.
    shift = torch.linspace(-1.0, 1.0, hidden)
    scale = torch.linspace(0.5, 2.0, hidden)
    with torch.no_grad():
        centred = (embeddings - embeddings.mean(dim=0)) / embeddings.std(dim=0)
        embeddings.copy_(centred * scale + shift)
    old = embeddings.detach().clone()
    old_mean, old_std = old.mean(dim=0), old.std(dim=0)

    k = 256  # enough rows for loose statistics; a paper run uses 5
    tokens = add_reward_tokens(bare_qm, k, torch.Generator().manual_seed(0))
    new = bare_qm.model.get_input_embeddings().weight.detach()[list(tokens.ids)]

    assert torch.equal(bare_qm.model.get_input_embeddings().weight[: old.shape[0]], old)
    # Standard error of the mean is std / 16 and of the std about 4.5%: 5-7 sigma bounds.
    assert ((new.mean(dim=0) - old_mean).abs() / old_std).max() < 0.4
    ratio = new.std(dim=0) / old_std
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.3
    # Random rows, not copies of the mean (that would make every reward token identical).
    assert torch.cdist(new[:5], new[:5]).fill_diagonal_(1e9).min() > 0.1 * old_std.norm()


def test_add_reward_tokens_is_idempotent(tiny_qm: QuarkModel) -> None:
    first = tiny_qm.reward_tokens
    assert first is not None
    weights = tiny_qm.model.get_input_embeddings().weight.detach().clone()
    vocab = len(tiny_qm.tokenizer)
    again = add_reward_tokens(tiny_qm, 5, torch.Generator().manual_seed(123))
    assert again == first
    assert len(tiny_qm.tokenizer) == vocab
    assert torch.equal(tiny_qm.model.get_input_embeddings().weight, weights)


def test_add_reward_tokens_with_another_k_raises(tiny_qm: QuarkModel) -> None:
    with pytest.raises(ValueError, match=r"has 5 reward tokens.*asked for 3"):
        add_reward_tokens(tiny_qm, 3)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("top", 0),
        ("bottom", 4),
        ("none", None),
        (" Top ", 0),
        ("BOTTOM", 4),
        ("2", 2),
        (2, 2),
        (0, 0),
        ("4", 4),
    ],
)
def test_resolve(selector: str | int, expected: int | None) -> None:
    tokens = RewardTokens(tuple(f"t{i}" for i in range(5)), tuple(range(100, 105)))
    assert tokens.resolve(selector) == expected


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ("best", r"unknown reward 'best': use 'top', 'bottom', 'none' or a quantile index 0\.\.4"),
        (7, r"quantile 7 is out of range: this model has 5 reward tokens, 0 \(best\) \.\. 4"),
        (-1, r"quantile -1 is out of range"),
        ("-1", r"quantile -1 is out of range"),
        ("5", r"quantile 5 is out of range"),
    ],
)
def test_resolve_errors_are_helpful(selector: str | int, message: str) -> None:
    tokens = RewardTokens(tuple(f"t{i}" for i in range(5)), tuple(range(100, 105)))
    with pytest.raises(ValueError, match=message):
        tokens.resolve(selector)


def test_prefix_ids_without_reward_tokens_raises(bare_qm: QuarkModel) -> None:
    assert bare_qm.prefix_ids(None) == []
    with pytest.raises(ValueError, match="no reward tokens"):
        bare_qm.prefix_ids(0)


def test_save_and_load_round_trip(tiny_qm: QuarkModel, tmp_path: Path) -> None:
    with torch.no_grad():  # make sure trained-looking weights, not just the init, survive
        tiny_qm.model.get_input_embeddings().weight[tiny_qm.reward_tokens.top_id] += 1.5
    out = save_model(tiny_qm, tmp_path / "ckpt", extra={"step": 7})
    loaded = load_model(out, device="cpu")

    assert loaded.reward_tokens == tiny_qm.reward_tokens
    assert loaded.base_vocab_size == tiny_qm.base_vocab_size
    assert loaded.metadata["step"] == 7
    assert loaded.metadata["base_model"] == "tiny"
    assert loaded.metadata["reward_token_ids"] == list(tiny_qm.reward_tokens.ids)
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.convert_tokens_to_ids(list(loaded.reward_tokens.tokens)) == list(
        tiny_qm.reward_tokens.ids
    )
    original, restored = tiny_qm.model.state_dict(), loaded.model.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    assert not loaded.model.training


def test_save_model_replaces_an_existing_checkpoint(tiny_qm: QuarkModel, tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    save_model(tiny_qm, out, extra={"step": 1})
    save_model(tiny_qm, out, extra={"step": 2})
    assert load_model(out, device="cpu").metadata["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary dirs left behind


def test_load_model_refuses_pickled_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", QUARK_METADATA_FILE):
        shutil.copy(tiny_model_dir / name, pickled / name)
    # Not even a valid pickle: the check must happen before anything tries to read it.
    (pickled / "pytorch_model.bin").write_bytes(b"this would be unpickled")
    with pytest.raises(ValueError, match=r"no \.safetensors weights; refusing to unpickle"):
        load_model(pickled, device="cpu")


def test_resolve_source_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found: give 'default'"):
        resolve_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"without config\.json"):
        resolve_source(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_source(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing", device="cpu")


def test_resolve_source_passes_hf_directories_through(tiny_model_dir: Path) -> None:
    assert resolve_source(tiny_model_dir) == tiny_model_dir
    assert resolve_source(str(tiny_model_dir)) == tiny_model_dir
