"""One objective selector everywhere: the job parameters (declared once), the QUARK_OBJECTIVE
setting, the POST /admin/unlearn body, ``quark train --objective``, the version listing."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

import pytest

from app.errors import APIError
from app.routes.admin_models import Backend, UnlearnRequest, _objective, start_unlearn
from quark.acft.config import ACFT_OWN, ACFTConfig, ObjectiveParams
from quark.cli import main
from quark.models import QuarkModel
from quark.online.gate import judged_quantile
from quark.online.params import UnlearnParams
from quark.service.settings import UNLEARN_ENV, ServiceSettings
from quark.service.store import MemoryPointer, ModelStore
from quark.service.verification import VerificationCache


# -- declared once -----------------------------------------------------------------------
def test_acft_fields_are_derived_from_acft_config() -> None:
    acft = {f.name: f for f in fields(ACFTConfig)}
    own = {f.name: f for f in fields(ObjectiveParams) if f.name.startswith("acft_")}
    assert sorted(own) == sorted(f"acft_{n}" for n in ACFT_OWN)
    for name, f in own.items():
        source = acft[name.removeprefix("acft_")]
        assert f.default == source.default
        assert f.metadata["help"] == "ACFT: " + source.metadata["help"]
        assert {k: v for k, v in f.metadata.items() if k != "help"} == {
            k: v for k, v in source.metadata.items() if k != "help"
        }


def test_acft_config_takes_the_shared_fields_from_the_job() -> None:
    params = UnlearnParams(steps=7, lr=1e-3, acft_kl_coef=3.0, acft_aux_steps=5, kl_coef=0.2)
    cfg = params.acft_config()
    assert (cfg.steps, cfg.lr, cfg.kl_coef, cfg.aux_steps) == (7, 1e-3, 3.0, 5)
    assert cfg.response_length == params.response_length and cfg.seed == params.seed


def test_every_surface_has_the_objective() -> None:
    assert UNLEARN_ENV["objective"] == "QUARK_OBJECTIVE"
    assert UNLEARN_ENV["acft_kl_coef"] == "QUARK_UNLEARN_ACFT_KL_COEF"
    schema = UnlearnRequest.model_json_schema()["properties"]
    assert schema["objective"]["enum"] == ["quark", "acft"]
    assert {"acft_threshold", "acft_kl_coef", "acft_steps"} - set(schema) == {"acft_steps"}
    assert judged_quantile("quark") == 0 and judged_quantile("acft") is None


# -- QUARK_OBJECTIVE -----------------------------------------------------------------------
def test_objective_setting_is_read_and_validated_at_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUARK_OBJECTIVE", "acft")
    monkeypatch.setenv("QUARK_UNLEARN_ACFT_KL_COEF", "2.5")
    settings = ServiceSettings()
    assert settings.unlearn.objective == "acft"
    assert settings.unlearn_params({}).acft_config().kl_coef == 2.5
    assert settings.unlearn_params({"objective": "quark"}).objective == "quark"
    monkeypatch.setenv("QUARK_OBJECTIVE", "ppo")
    with pytest.raises(ValueError) as caught:
        ServiceSettings()
    message = str(caught.value)
    assert "objective='ppo' is unknown; use one of quark, acft" in message
    assert "fix the environment (objective is QUARK_OBJECTIVE)" in message


def test_a_bad_acft_setting_names_its_own_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUARK_UNLEARN_ACFT_KL_COEF", "-1")
    with pytest.raises(ValueError) as caught:
        ServiceSettings()
    assert "QUARK_UNLEARN_ACFT_KL_COEF" in str(caught.value)
    assert "greater than or equal to 0" in str(caught.value)


@pytest.mark.parametrize("name", ["QUARK_UTILITY_TEXT", "QUARK_ACFT_UTILITY_TEXT"])
def test_utility_text_must_be_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """QUARK_UTILITY_TEXT serves both objectives; its former name still works."""
    monkeypatch.setenv(name, str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match=r"QUARK_UTILITY_TEXT=.* is not a file"):
        ServiceSettings()
    (tmp_path / "wiki.txt").write_text("text\n")
    monkeypatch.setenv(name, str(tmp_path / "wiki.txt"))
    assert ServiceSettings().utility_text == tmp_path / "wiki.txt"
    (tmp_path / "other.txt").write_text("text\n")
    given = ServiceSettings(utility_text=tmp_path / "other.txt")  # by its field name too
    assert given.utility_text == tmp_path / "other.txt"


def test_utility_kl_needs_the_utility_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUARK_UNLEARN_UTILITY_KL_COEF", "0.5")
    with pytest.raises(
        ValueError, match=r"QUARK_UNLEARN_UTILITY_KL_COEF.*needs QUARK_UTILITY_TEXT"
    ):
        ServiceSettings()
    monkeypatch.delenv("QUARK_UNLEARN_UTILITY_KL_COEF")
    settings = ServiceSettings()
    assert settings.unlearn.utility_kl_coef == 0.0 and settings.unlearn_params({}) is not None
    with pytest.raises(ValueError, match="needs QUARK_UTILITY_TEXT"):  # an admin's override
        settings.unlearn_params({"utility_kl_coef": 0.5})
    (tmp_path / "wiki.txt").write_text("text\n")
    with_text = ServiceSettings(utility_text=tmp_path / "wiki.txt")
    assert with_text.unlearn_params({"utility_kl_coef": 0.5}).utility_kl_coef == 0.5
    assert UNLEARN_ENV["utility_kl_coef"] == "QUARK_UNLEARN_UTILITY_KL_COEF"
    assert UNLEARN_ENV["utility_rows"] == "QUARK_UNLEARN_UTILITY_ROWS"
    assert UNLEARN_ENV["utility_tokens"] == "QUARK_UNLEARN_UTILITY_TOKENS"


# -- POST /admin/unlearn ---------------------------------------------------------------------
class _Recorder:
    """Stands in for the job registry and Celery: records what would be queued."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def register(self, job_id: str, trigger: str, overrides: dict[str, Any]) -> None:
        self.sent.append(overrides)

    def send_task(self, name: str, **kwargs: Any) -> None:
        pass


def _backend(recorder: _Recorder) -> Backend:
    return cast(
        Backend,
        type("FakeBackend", (), {"settings": ServiceSettings(), "jobs": recorder,
                                 "celery": recorder})(),
    )  # fmt: skip


def test_admin_unknown_objective_is_a_400_naming_the_choices() -> None:
    recorder = _Recorder()
    with pytest.raises(APIError) as caught:
        start_unlearn(_backend(recorder), UnlearnRequest(objective="ppo"))
    assert caught.value.status == 400 and caught.value.code == "invalid_params"
    assert "objective='ppo' is unknown; use one of quark, acft" in caught.value.message
    assert recorder.sent == []  # nothing queued
    created = start_unlearn(_backend(recorder), UnlearnRequest(objective="acft", acft_kl_coef=2))
    assert created.job_id and recorder.sent == [{"objective": "acft", "acft_kl_coef": 2.0}]


def test_version_listing_names_the_objective() -> None:
    assert _objective({"kind": "base"}) is None
    assert _objective({"kind": "unlearn"}) == "quark"  # a version made before ACFT existed
    assert _objective({"kind": "unlearn", "objective": "acft"}) == "acft"


# -- the store keeps the auxiliary head's versions beside the LLM's ---------------------------
def test_store_keeps_the_aux_head_under_its_checksums(tmp_path: Path, tiny_qm: QuarkModel) -> None:
    store = ModelStore(tmp_path / "models", MemoryPointer())
    head = tmp_path / "head"
    head.mkdir()
    (head / "aux_head.safetensors").write_bytes(b"weights")
    (head / "aux_head.json").write_text(json.dumps({"base_version": "v0000"}))
    v0 = store.publish(tiny_qm, {"parent": None, "kind": "base"})
    v1 = store.publish(
        tiny_qm, {"parent": v0, "kind": "unlearn", "objective": "acft"}, {"aux_head": head}
    )
    meta = store.verify(v1)
    assert meta["objective"] == "acft"
    assert {"aux_head/aux_head.safetensors", "aux_head/aux_head.json"} <= set(meta["files"])
    assert store.aux_head(v1) == store.path(v1) / "aux_head" and store.aux_head(v0) is None
    cache = VerificationCache()
    assert cache.error(store, v1) is None
    (store.path(v1) / "aux_head" / "aux_head.safetensors").write_bytes(b"tampered")
    assert "aux_head/aux_head.safetensors" in str(cache.error(store, v1))
    with pytest.raises(ValueError, match="bad subdirectory"):
        store.publish(tiny_qm, {"parent": v0}, {"../x": head})


# -- quark train --objective ---------------------------------------------------------------
def test_train_objective_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"The cat number {i} sat on the" for i in range(8)) + "\n")
    out = tmp_path / "run"
    argv = [
        "train", "--objective", "acft", "--model", str(tiny_model_dir), "--prompts",
        str(prompts), "--out", str(out), "--steps", "2", "--batch-size", "2",
        "--response-length", "4", "--warmup-steps", "0", "--acft-aux-steps", "2",
        "--acft-threshold", "0", "--reward", "keyword:the", "--device", "cpu", "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    model = out / "model"
    assert json.loads((model / "quark.json").read_text())["objective"] == "acft"
    assert (model / "aux_head" / "aux_head.safetensors").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines]
    assert events == ["samples", "aux", "aux", "train", "train"]
    with pytest.raises(SystemExit):  # argparse refuses an unknown objective
        main([*argv[:2], "ppo", *argv[3:]])
