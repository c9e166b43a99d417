"""The online loop with the ACFT objective, real processes (server + Celery worker, toy model,
reward ``keyword:the``): an ACFT job queued through the admin API publishes a version with
its auxiliary head, and the server swaps to it; an unknown objective is a 400."""

from __future__ import annotations

from pathlib import Path

from quark.service.store import ModelStore
from testkit.stack import Stack, TrafficClient, wait_for
from tests.e2e.test_online_loop import run_job

TRAFFIC = [f"Tell me about item {i}:" for i in range(50)]
LIVE = [f"Say something about thing {i}." for i in range(10)]
# A few steps of each model; the gate's bounds are opened wide: this test checks the
# mechanics of the loop, not the effect (tests/integration/test_acft_learns.py does). The
# stack's learning rate (1e-2, for Quark on the toy model) wrecked the toy model's default
# output in 4 ACFT steps (perplexity 17 -> 136,000 in one run): ACFT gets 1e-3 here.
ACFT_JOB = {
    "objective": "acft",
    "lr": 1e-3,
    "steps": 4,
    "acft_aux_steps": 4,
    "acft_aux_batch_size": 8,
    "acft_threshold": 0.05,
    "explore_prompts": 4,
    "reward_tolerance": 1.0,
    "max_perplexity_rise": 1e9,
    "max_kl": 100.0,
}


def test_unknown_objective_is_a_400(loop_stack: Stack) -> None:
    loop_stack.wait_serving("v0000")
    with loop_stack.admin() as admin:
        bad = admin.post("/admin/unlearn", json={"objective": "ppo"})
        wrong_type = admin.post("/admin/unlearn", json={"objective": 5})
    assert bad.status_code == 400, bad.text
    error = bad.json()["error"]
    assert error["code"] == "invalid_params" and "use one of quark, acft" in error["message"]
    assert wrong_type.status_code == 400, wrong_type.text


def test_acft_job_publishes_and_the_server_swaps(
    loop_stack: Stack, on_failure_logs: list[Stack]
) -> None:
    on_failure_logs.append(loop_stack)
    for i, prompt in enumerate(TRAFFIC):  # mostly the default output: the head's samples
        loop_stack.generate(prompt, reward="top" if i % 4 == 0 else "none", n=2, seed=i)
    with loop_stack.admin() as admin:
        wait_for(
            lambda: admin.get("/admin/pool/stats").json()["size"] >= 2 * len(TRAFFIC),
            30,
            "the pool to receive the traffic",
        )
    with TrafficClient(loop_stack.url, LIVE, reward="none", max_new_tokens=6, log=False) as live:
        view = run_job(loop_stack, ACFT_JOB)
        loop_stack.wait_serving("v0001")
        wait_for(lambda: live.versions()[-1:] == ["v0001"], 60, "a response from v0001")
    assert view["state"] == "SUCCESS", view
    result = view["result"]
    assert result["status"] == "published" and result["version"] == "v0001", result
    assert result["objective"] == "acft"
    phases = {p.get("phase") for p in view["seen"]}
    assert {"aux", "train", "eval_candidate"} <= phases | {view["progress"]["phase"]}
    assert live.errors == [], live.errors[:5]
    # Serving is unchanged: no token gives the ACFT output, the reward tokens still work.
    assert loop_stack.generate("Hello", reward="none", log=False)["model_version"] == "v0001"
    top = loop_stack.generate("Hello", reward="top", log=False)
    assert top["model_version"] == "v0001" and top["reward"]["applied"] is True


def test_models_listing_shows_the_objective_and_the_aux_head(loop_stack: Stack) -> None:
    with loop_stack.admin() as admin:
        models = admin.get("/admin/models").raise_for_status().json()
    by_version = {m["version"]: m for m in models["versions"]}
    v1 = by_version["v0001"]
    assert v1["objective"] == "acft" and v1["verified"] and v1["active"]
    assert by_version["v0000"]["objective"] is None
    meta = v1["metadata"]
    assert meta["aux_head"]["base_version"] == "v0000" and meta["aux_head"]["steps"] == 4
    assert meta["data_window"]["aux_samples"] > 0 and meta["data_window"]["corpus"] > 0
    store = ModelStore(Path(loop_stack.env["QUARK_DATA_DIR"]) / "models")
    assert store.aux_head("v0001") is not None
    assert any(name.startswith("aux_head/") for name in store.verify("v0001")["files"])
