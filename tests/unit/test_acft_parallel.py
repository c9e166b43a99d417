"""ACFT's parallel scheme on the tiny model with an in-memory pool: the aux job publishes one
head per version (warm-started from the newest earlier head); an LLM job uses the newest head
and builds q from the version that head was trained for, however far the policy moved."""

from __future__ import annotations

from typing import Any

import pytest

from quark.online.job import UnlearnDeps
from quark.online.objectives import run_aux_job, run_job
from quark.online.params import UnlearnParams
from quark.service.aux_heads import AuxHeads
from quark.service.store import ModelStore
from tests.unit import test_acft_job, test_online
from tests.unit.test_online import FakePool

job_env = test_online.job_env  # the same fixture: tiny model store + scored in-memory pool

PARALLEL = {**test_acft_job.ACFT, "acft_parallel": True}


def _params(**changes: Any) -> UnlearnParams:
    return UnlearnParams.from_dict({**PARALLEL, **changes})


@pytest.fixture
def deps(job_env: tuple[UnlearnDeps, FakePool]) -> UnlearnDeps:
    deps, _ = job_env
    assert isinstance(deps.store, ModelStore)
    deps.heads = AuxHeads(deps.store)
    return deps


def test_an_llm_job_waits_for_the_first_head(deps: UnlearnDeps) -> None:
    result = run_job(deps, _params(), job_id="llm-0")
    assert result["status"] == "skipped" and "no auxiliary head" in result["reason"]


def test_aux_job_publishes_one_head_per_version(deps: UnlearnDeps) -> None:
    events: list[dict[str, Any]] = []
    first = run_aux_job(deps, _params(), job_id="aux-1", progress=events.append)
    assert first["status"] == "published" and first["head_for"] == "v0000", first
    assert first["steps"] == 2 and first["warm_start"] is None and first["samples"] > 0
    assert [e["aux_step"] for e in events if e.get("phase") == "aux"] == [1, 2]
    assert deps.heads is not None and deps.heads.latest() is not None
    again = run_aux_job(deps, _params(), job_id="aux-2")
    assert again["status"] == "skipped" and "already has" in again["reason"]


def test_llm_job_uses_the_newest_head_and_its_version_for_q(
    deps: UnlearnDeps, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_aux_job(deps, _params(), job_id="aux-0")
    assert isinstance(deps.store, ModelStore)
    loaded: list[str] = []
    load = deps.store.load
    monkeypatch.setattr(deps.store, "load", lambda v, **kw: loaded.append(v) or load(v, **kw))
    first = run_job(deps, _params(), job_id="llm-1")
    assert first["status"] == "published" and first["version"] == "v0001", first
    meta = deps.store.metadata("v0001")
    assert meta["aux_head"]["base_version"] == "v0000" and meta["aux_head"]["parallel"] is True
    assert meta["data_window"]["head_version"] == "v0000"
    assert deps.store.aux_head("v0001") is not None  # the head it used, with the version
    # No head for v0001 yet: the next LLM job trains v0001 towards q of v0000 (one behind).
    loaded.clear()
    second = run_job(deps, _params(), job_id="llm-2")
    assert second["status"] == "published", second
    assert deps.store.metadata("v0002")["aux_head"]["base_version"] == "v0000"
    assert loaded.count("v0000") == 1 and "v0002" not in loaded  # q's base: v0000's weights
    # The aux job of the active version (v0002) warm-starts from v0000's head.
    aux = run_aux_job(deps, _params(), job_id="aux-2")
    assert aux["head_for"] == "v0002" and aux["warm_start"] == "v0000", aux
    third = run_job(deps, _params(), job_id="llm-3")
    assert deps.store.metadata(third["version"])["aux_head"]["base_version"] == "v0002"
