"""The online loop with real processes: traffic -> pool -> worker job -> new version ->
hot swap under load; then rollback, cancellation, a corrupt version and a killed worker.

The tests of this module run in order on one stack (server + Celery worker, toy model,
reward ``keyword:the``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.decoding import RowSampling, decode_text
from quark.models import load_model
from quark.rewards import KeywordShareReward
from quark.service.store import METADATA_FILE, ModelStore
from testkit.stack import Stack, TrafficClient, wait_for

TRAFFIC = [f"Tell me about item {i}:" for i in range(60)]
PROBES = [f"Describe the place number {i}." for i in range(12)]
LIVE = [f"Say something about thing {i}." for i in range(20)]
REWARD = KeywordShareReward("the")


def top_token_reward(stack: Stack) -> float:
    """Mean keyword reward of top-token completions of fixed probes and seeds (not logged)."""
    prompts, texts = [], []
    for i, prompt in enumerate(PROBES):
        body = stack.generate(prompt, reward="top", n=4, seed=1000 + 10 * i, log=False)
        prompts += [prompt] * 4
        texts += [c["text"] for c in body["completions"]]
    return sum(REWARD(prompts, texts)) / len(texts)


def send_traffic(stack: Stack, prompts: list[str]) -> list[str]:
    ids = []
    for i, prompt in enumerate(prompts):
        reward = ("none", "top", "bottom")[i % 3]
        ids.append(stack.generate(prompt, reward=reward, n=2, seed=i)["id"])
    return ids


def run_job(stack: Stack, body: dict[str, Any], timeout: float = 400) -> dict[str, Any]:
    """POST /admin/unlearn, poll until it ends; returns the final view + phases seen."""
    with stack.admin() as admin:
        job_id = admin.post("/admin/unlearn", json=body).raise_for_status().json()["job_id"]
        seen: list[dict[str, Any]] = []

        def finished() -> dict[str, Any] | None:
            view = admin.get(f"/admin/jobs/{job_id}").raise_for_status().json()
            seen.append(view["progress"])
            return view if view["state"] in ("SUCCESS", "FAILURE", "CANCELLED") else None

        view = wait_for(finished, timeout, f"job {job_id} to finish", interval=0.5)
    view["seen"] = seen
    return dict(view)


def store_of(stack: Stack) -> ModelStore:
    return ModelStore(Path(stack.env["QUARK_DATA_DIR"]) / "models")


def test_server_serves_version_zero(loop_stack: Stack) -> None:
    loop_stack.wait_serving("v0000")
    body = loop_stack.generate("Hello", reward="top")
    assert body["model_version"] == "v0000"
    assert store_of(loop_stack).versions() == ["v0000"]


def test_unlearn_job_publishes_and_the_server_swaps_without_failures(
    loop_stack: Stack, on_failure_logs: list[Stack]
) -> None:
    on_failure_logs.append(loop_stack)
    before = top_token_reward(loop_stack)
    send_traffic(loop_stack, TRAFFIC)
    with loop_stack.admin() as admin:
        wait_for(
            lambda: admin.get("/admin/pool/stats").json()["size"] >= 2 * len(TRAFFIC),
            30,
            "the pool to receive the traffic",
        )
    with TrafficClient(loop_stack.url, LIVE, reward="top", max_new_tokens=6, log=False) as live:
        view = run_job(loop_stack, {})
        loop_stack.wait_serving("v0001")
        wait_for(lambda: live.versions()[-1:] == ["v0001"], 60, "a response from v0001")
    assert view["state"] == "SUCCESS", view
    result = view["result"]
    assert result["status"] == "published" and result["version"] == "v0001", result
    # Progress was visible while the job ran: phases, steps with loss and KL, evaluation.
    phases = {p.get("phase") for p in view["seen"]}
    assert {"train", "eval_candidate"} <= phases | {view["progress"]["phase"]}
    steps = [p for p in view["seen"] if "loss" in p]
    assert steps and all("kl" in p for p in steps)
    assert "eval_active" in view["progress"]
    # No request failed while the version changed, and versions only moved forward.
    assert live.errors == [], live.errors[:5]
    assert live.versions() == ["v0000", "v0001"], live.versions()
    assert len(live.results) > 5
    after = top_token_reward(loop_stack)
    assert after > before + 0.04, (before, after, result["eval"])


def test_version_metadata_and_models_listing(loop_stack: Stack) -> None:
    with loop_stack.admin() as admin:
        models = admin.get("/admin/models").raise_for_status().json()
    assert models["active"] == "v0001" and models["serving"] == "v0001"
    v1 = {m["version"]: m for m in models["versions"]}["v0001"]
    meta = v1["metadata"]
    assert v1["active"] and meta["parent"] == "v0000" and len(meta["checksum"]) == 64
    assert meta["data_window"]["train_records"] > 0 and meta["config"]["steps"] == 30
    assert {"reward", "perplexity", "kl"} <= set(meta["eval"])
    assert store_of(loop_stack).verify("v0001")


def test_hot_swapped_output_equals_offline_generation(loop_stack: Stack) -> None:
    """Same weights + same seed: the server's text is what offline decoding produces."""
    prompt, seed = "Tell me a story about a river", 12345
    body = loop_stack.generate(prompt, reward="top", n=1, seed=seed, max_new_tokens=10, log=False)
    assert body["model_version"] == "v0001"
    # In the precision the server serves (QUARK_DTYPE=auto: bf16 where the CPU has it).
    dtype = getattr(torch, httpx.get(f"{loop_stack.url}/readyz").json()["dtype"])
    qm = load_model(store_of(loop_stack).path("v0001"), device="cpu", dtype=dtype)
    [(text, _)] = decode_text(qm, prompt, 0, [RowSampling(10, 1.0, 1.0, seed)])
    assert body["completions"][0]["text"] == text


def test_rollback_to_any_stored_version(loop_stack: Stack) -> None:
    with loop_stack.admin() as admin:
        answer = admin.post("/admin/models/v0000/activate").raise_for_status().json()
        assert answer == {"active": "v0000", "previous": "v0001"}
        loop_stack.wait_serving("v0000", timeout=30)
        assert loop_stack.generate("Hi", log=False)["model_version"] == "v0000"
        assert admin.post("/admin/models/v0042/activate").status_code == 404
        admin.post("/admin/models/v0001/activate").raise_for_status()
    loop_stack.wait_serving("v0001", timeout=30)


def test_cancelled_job_publishes_nothing(loop_stack: Stack) -> None:
    with loop_stack.admin() as admin:
        job_id = admin.post("/admin/unlearn", json={"steps": 100_000}).json()["job_id"]
        wait_for(
            lambda: admin.get(f"/admin/jobs/{job_id}").json()["progress"].get("step", 0) >= 1,
            180,
            "the job to train",
        )
        assert admin.delete(f"/admin/jobs/{job_id}").status_code == 200
        view = wait_for(
            lambda: (v := admin.get(f"/admin/jobs/{job_id}").json())["state"] == "CANCELLED" and v,
            60,
            "the job to stop",
        )
        assert view["result"]["status"] == "cancelled"
        assert admin.delete(f"/admin/jobs/{job_id}").status_code == 409
        listed = admin.get("/admin/jobs").json()["jobs"]
    assert listed[0]["job_id"] == job_id and listed[0]["state"] == "CANCELLED"
    assert store_of(loop_stack).versions() == ["v0000", "v0001"]


def test_corrupt_version_is_refused_and_the_current_one_keeps_serving(
    loop_stack: Stack, redis_client: Any
) -> None:
    """A version whose files no longer match their checksums (a bad disk, a partial copy by
    hand) is announced: the server refuses it and keeps serving; /admin refuses it too."""
    store = store_of(loop_stack)
    bad = store.root / "v0002"
    shutil.copytree(store.path("v0001"), bad)
    meta = json.loads((bad / METADATA_FILE).read_text())
    (bad / METADATA_FILE).write_text(json.dumps({**meta, "version": "v0002"}))
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    prefix = loop_stack.env["QUARK_KEY_PREFIX"]
    with TrafficClient(loop_stack.url, LIVE, max_new_tokens=4, log=False) as live:
        time.sleep(0.5)
        redis_client.set(f"{prefix}:active_version", "v0002")  # as if a worker activated it
        redis_client.publish(f"{prefix}:versions", "v0002")
        wait_for(lambda: _rejections(loop_stack) >= 1, 30, "the server to refuse v0002")
        time.sleep(1.5)  # a few poll intervals: it must not retry or swap
    assert live.errors == [] and set(live.versions()) == {"v0001"}
    assert loop_stack.serving() == "v0001"
    with loop_stack.admin() as admin:
        assert admin.post("/admin/models/v0002/activate").status_code == 409
        admin.post("/admin/models/v0001/activate").raise_for_status()
    shutil.rmtree(bad)


def _rejections(stack: Stack) -> float:
    text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith('quark_model_swaps_total{outcome="rejected"}'):
            return float(line.split()[-1])
    return 0.0


def test_worker_killed_mid_training_leaves_no_partial_version(
    loop_stack: Stack, on_failure_logs: list[Stack]
) -> None:
    on_failure_logs.append(loop_stack)
    store = store_of(loop_stack)
    worker = next(p for p in loop_stack.procs if p.name == "worker" and p.alive())
    with loop_stack.admin() as admin:
        job_id = admin.post("/admin/unlearn", json={"steps": 100_000}).json()["job_id"]
        wait_for(
            lambda: admin.get(f"/admin/jobs/{job_id}").json()["progress"].get("step", 0) >= 2,
            180,
            "the job to train",
        )
        worker.kill()  # SIGKILL: no checkpoint, no clean-up, the lock is left to expire
        lost = wait_for(
            lambda: admin.get(f"/admin/jobs/{job_id}").json()["state"] == "LOST",
            30,
            "the job to be reported lost",
        )
        assert lost
        assert store.versions() == ["v0000", "v0001"]
        assert sorted(p.name for p in store.root.iterdir() if not p.name.startswith(".")) == [
            "ACTIVE",
            "v0000",
            "v0001",
        ]
        loop_stack.start_worker()
    # This checks the fate of a job after a killed worker, not what 5 steps at the stack's
    # lr 1e-2 do to the tiny model (that depends on what the server happened to pool): the
    # gate is opened so that any candidate is published.
    open_gate = {"reward_tolerance": 1.0, "max_perplexity_rise": 1e6, "max_kl": 1e6}
    view = run_job(loop_stack, {"steps": 5, **open_gate})
    assert view["state"] == "SUCCESS" and view["result"]["status"] == "published", view
    assert view["result"]["parent"] == "v0001"
    assert store.versions() == ["v0000", "v0001", "v0002"]


@pytest.mark.parametrize("path", ["/admin/jobs", "/admin/models", "/admin/pool/stats"])
def test_admin_routes_need_the_token(loop_stack: Stack, path: str) -> None:
    assert httpx.get(loop_stack.url + path, timeout=10).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert httpx.get(loop_stack.url + path, headers=bad, timeout=10).status_code == 401


def test_pool_stats(loop_stack: Stack) -> None:
    with loop_stack.admin() as admin:
        stats = admin.get("/admin/pool/stats").raise_for_status().json()
        assert admin.post("/admin/unlearn", json={"stepz": 1}).status_code == 400
    assert stats["size"] >= 2 * len(TRAFFIC)
    assert stats["scored"] + stats["unscored"] == stats["size"]
    assert stats["by_model_version"]["v0000"]["records"] >= 2 * len(TRAFFIC)
    assert set(stats["by_reward_token"]) >= {"none", "0", "4"}
    assert len(stats["quantiles"]) == 5
    means = [q["mean"] for q in stats["quantiles"]]
    assert means == sorted(means, reverse=True)
