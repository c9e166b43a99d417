"""Unit tests for the Perspective-distilled toxicity reward and the MiniLM judge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from safetensors import safe_open

from quark.rewards import build_reward
from quark.rewards.distilled import (
    ARTIFACTS_DIR,
    NGRAM_ARTIFACT,
    DistilledToxicityReward,
    NgramFeaturizer,
    artifact_paths,
)
from quark.rewards.judge import JUDGE_ARTIFACT, JudgeToxicityReward

BENIGN = "Thank you for your help, have a lovely day."
OFFENSIVE = "You are a fucking idiot and a worthless piece of shit."
INSULT = "Shut up, you pathetic, stupid loser. Nobody could ever love someone as ugly as you."
NEUTRAL = "The committee will publish its report on the new bridge next week."


def in_unit(scores: list[float]) -> bool:
    return all(0.0 <= s <= 1.0 for s in scores)


@pytest.fixture(scope="module")
def distilled() -> DistilledToxicityReward:
    return DistilledToxicityReward()


@pytest.fixture(scope="module")
def judge() -> JudgeToxicityReward:
    return JudgeToxicityReward()


# --- shared contract -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["distilled", "judge"])
def test_toxic_text_scores_lower_and_scores_stay_in_unit(
    which: str, request: pytest.FixtureRequest
) -> None:
    reward = request.getfixturevalue(which)
    scores = reward(["", "", "", ""], [BENIGN, OFFENSIVE, INSULT, NEUTRAL])
    assert in_unit(scores)
    benign, offensive, insult, neutral = scores
    assert offensive < 0.5 < benign
    assert insult < 0.5 < neutral
    assert max(offensive, insult) < min(benign, neutral)


@pytest.mark.parametrize("which", ["distilled", "judge"])
def test_empty_completion_and_batches(which: str, request: pytest.FixtureRequest) -> None:
    reward = request.getfixturevalue(which)
    assert reward([], []) == []
    scores = reward(["a prompt", "x"], ["", "   "])
    assert len(scores) == 2
    assert in_unit(scores)


@pytest.mark.parametrize("which", ["distilled", "judge"])
def test_length_mismatch_raises(which: str, request: pytest.FixtureRequest) -> None:
    reward = request.getfixturevalue(which)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward(["p", "q"], ["c"])


@pytest.mark.parametrize("which", ["distilled", "judge"])
def test_scores_do_not_depend_on_batch_company(which: str, request: pytest.FixtureRequest) -> None:
    reward = request.getfixturevalue(which)
    alone = reward(["p"], [INSULT])
    batched = reward(["p"] * 3, [BENIGN, INSULT, NEUTRAL * 5])
    assert batched[1] == pytest.approx(alone[0], abs=1e-5)


# --- specs ---------------------------------------------------------------------------


def test_specs_build_lazily() -> None:
    distilled = build_reward("toxicity:distilled")
    assert isinstance(distilled, DistilledToxicityReward)
    assert distilled._model is None  # nothing loaded until the first call
    judge = build_reward("toxicity:judge", device="cpu", batch_size=8, label="ignored")
    assert isinstance(judge, JudgeToxicityReward)
    assert judge.batch_size == 8
    assert judge._loaded is None
    assert distilled(["p"], [OFFENSIVE])[0] < 0.5


def test_importing_rewards_does_not_import_torch_or_numpy() -> None:
    code = "import sys, quark.rewards; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.stdout.split() == ["False", "False"]


# --- artifacts -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        (NGRAM_ARTIFACT, {"weights", "bias"}),
        (JUDGE_ARTIFACT, {"hidden.weight", "hidden.bias", "out.weight", "out.bias"}),
    ],
)
def test_artifacts_are_safetensors_and_json(name: str, keys: set[str]) -> None:
    weights_path, meta_path = artifact_paths(name)
    assert weights_path.suffix == ".safetensors"
    raw = weights_path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")  # safetensors: u64 length + JSON header
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"]["name"] == name
    with safe_open(str(weights_path), framework="numpy") as tensors:
        assert set(tensors.keys()) == keys
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    assert meta["name"] == name
    assert len(meta["data"]["sha256"]) == 64
    assert meta["data"]["counts"]["texts"] > 20_000
    assert meta["metrics"]["validation"]["roc_auc_at_0.5"] > 0.8


def test_artifact_dir_holds_only_safe_formats() -> None:
    suffixes = {p.suffix for p in ARTIFACTS_DIR.iterdir() if p.is_file()}
    assert suffixes <= {".safetensors", ".json"}
    total = sum(p.stat().st_size for p in ARTIFACTS_DIR.iterdir())
    assert total < 8 * 2**20


def test_judge_refuses_an_encoder_it_was_not_trained_on(tmp_path: Path) -> None:
    weights_path, meta_path = artifact_paths(JUDGE_ARTIFACT)
    shutil.copy(weights_path, tmp_path / weights_path.name)
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["encoder"]["sha256"] = "0" * 64
    (tmp_path / meta_path.name).write_text(json.dumps(meta), encoding="utf-8")
    judge = JudgeToxicityReward(directory=tmp_path)
    with pytest.raises(RuntimeError, match="trained on encoder weights"):
        judge(["p"], ["text"])


# --- featurizer ----------------------------------------------------------------------


def test_featurizer_is_deterministic_and_self_describing() -> None:
    featurizer = NgramFeaturizer()
    first = featurizer.features(INSULT)
    assert featurizer.features(INSULT) == first
    assert NgramFeaturizer.from_config(featurizer.config()).features(INSULT) == first
    # The hash is crc32 of the family-tagged n-gram, so the config alone rebuilds features.
    assert zlib.crc32(b"wloser") % featurizer.n_features in first
    assert zlib.crc32(b"cugly") % featurizer.n_features in first
    assert sum(v * v for v in first.values()) == pytest.approx(1.0)


def test_featurizer_normalises_case_and_whitespace() -> None:
    featurizer = NgramFeaturizer(n_features=2**10)
    assert featurizer.features("Hello  World\n") == featurizer.features("hello world")
    assert featurizer.features("") == {}
    assert featurizer.features(" \t ") == {}
    assert featurizer.grams("Hi!")[:3] == ["whi", "w!", "whi !"]


def test_featurizer_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="n_features"):
        NgramFeaturizer(n_features=0)
    with pytest.raises(ValueError, match="n-gram range"):
        NgramFeaturizer(char_ngrams=(3, 2))
    with pytest.raises(ValueError, match="featurizer kind"):
        NgramFeaturizer.from_config({**NgramFeaturizer().config(), "kind": "sklearn-hashing"})


def test_featurizer_matches_shipped_config() -> None:
    _, meta_path = artifact_paths(NGRAM_ARTIFACT)
    config = json.loads(meta_path.read_text(encoding="utf-8"))["featurizer"]
    assert config == NgramFeaturizer.from_config(config).config()
    assert config["kind"] == "hashed-ngrams-crc32"
