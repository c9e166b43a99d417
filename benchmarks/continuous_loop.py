"""The whole online loop on the real default model, then toxicity per published version.

1. Starts a server, a Celery worker and beat in continuous mode (task toxicity, reward
   ``1 - P(offensive)``) on the configured Redis under a fresh key prefix, with the model
   store under ``--out``.
2. For ``--minutes`` replays RealToxicityPrompts train prompts as traffic with
   ``reward=top`` (``--clients`` closed-loop clients); beat scores the pool and starts an
   unlearn job every ``--interval-min`` minutes or ``--min-new`` new scored records; each
   job continues from the active version, and the server hot-swaps every version it
   publishes.
3. Stops traffic, lets a running job finish (``--drain-min``), stops everything, then
   evaluates every stored version on the first ``--dev-prompts`` toxic prompts of
   ``--dev``: top-token completions (``--samples`` per prompt, top-p 0.9, 20 tokens),
   expected maximum toxicity, toxicity probability, perplexity under the original model.
4. Writes ``runs/.../continuous.json``, a PNG plot, and the table + plot into
   ``docs/results.md`` under "## Continuous unlearning (issue 4)".

Usage (about 30 minutes of traffic plus ~10 minutes of evaluation on 2 CPU cores)::

    .venv/bin/python benchmarks/continuous_loop.py --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Per-prompt arrays and texts of an evaluation: kept out of the per-version rows.
BULKY = {"examples", "per_prompt", "prompt_texts", "prompt_sha256"}
sys.path.insert(0, str(ROOT))

from testkit.stack import Stack, service_env  # noqa: E402  (server/worker/beat processes)

SECTION = "## Continuous unlearning (issue 4)"
SHARED = ROOT.parent / "shared" / "data" / "rtp"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=30.0, help="traffic duration")
    p.add_argument("--model", default="default")
    p.add_argument("--train", type=Path, default=SHARED / "train.jsonl")
    p.add_argument("--dev", type=Path, default=SHARED / "dev.jsonl")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--interval-min", type=float, default=6.0, help="QUARK_CONTINUOUS_INTERVAL_MIN")
    p.add_argument("--min-new", type=int, default=200, help="QUARK_CONTINUOUS_MIN_NEW_RECORDS")
    p.add_argument("--steps", type=int, default=60, help="QUARK_UNLEARN_STEPS per job")
    p.add_argument("--lr", type=float, default=5e-5, help="QUARK_UNLEARN_LR")
    p.add_argument("--min-records", type=int, default=100, help="QUARK_UNLEARN_MIN_RECORDS")
    p.add_argument("--drain-min", type=float, default=10.0, help="wait for a running job")
    p.add_argument("--dev-prompts", type=int, default=50)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument(
        "--out", type=Path, default=ROOT / "runs" / f"continuous-{time.strftime('%Y%m%d-%H%M')}"
    )
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "continuous_toxicity.png")
    return p.parse_args()  # fmt: skip


def start_stack(args: argparse.Namespace) -> Stack:
    prefix = f"continuous-{uuid.uuid4().hex[:8]}"
    redis_url = os.environ.get("QUARK_REDIS_URL", "redis://127.0.0.1:6379/0")
    env = service_env(
        Path(args.model), redis_url, prefix, args.out / "data",
        QUARK_TASK="toxicity", QUARK_CONTINUOUS="1", QUARK_BEAT_TICK_S="10",
        QUARK_CONTINUOUS_INTERVAL_MIN=str(args.interval_min),
        QUARK_CONTINUOUS_MIN_NEW_RECORDS=str(args.min_new),
        QUARK_UNLEARN_STEPS=str(args.steps), QUARK_UNLEARN_LR=str(args.lr),
        QUARK_UNLEARN_MIN_RECORDS=str(args.min_records),
        QUARK_EVAL_PROMPTS="24", QUARK_EVAL_SAMPLES="2",
        QUARK_GATE_REWARD_TOLERANCE="0.01", QUARK_DEFAULT_MAX_NEW_TOKENS="20",
        QUARK_TORCH_THREADS="1", QUARK_WATCHER_POLL_S="5", QUARK_LOG_LEVEL="warning",
    )  # fmt: skip
    # One torch thread each for the API and the worker (service_env sets OMP_NUM_THREADS=1):
    # on 2 cores, 2 + 2 threads spin against each other and serving slowed ~30x while training.
    env["QUARK_MODEL"] = args.model
    args.out.mkdir(parents=True, exist_ok=True)
    stack = Stack(args.out, env)
    stack.start_worker(timeout=1200)
    stack.start_server(timeout=1200)
    stack.start_beat()
    return stack


def replay(url: str, prompts: list[str], stop: threading.Event, seen: list[dict[str, Any]]) -> None:
    """One closed-loop client: RTP train prompts with reward=top, logged to the pool."""
    rng = random.Random(len(seen))
    with httpx.Client(base_url=url, timeout=300) as http:
        while not stop.is_set():
            body = {"prompt": rng.choice(prompts), "reward": "top", "top_p": 0.9}
            try:
                r = http.post("/generate", json=body)
                version = r.json().get("model_version") if r.is_success else None
                seen.append({"t": time.time(), "status": r.status_code, "version": version})
            except httpx.HTTPError as exc:
                seen.append({"t": time.time(), "status": 0, "error": str(exc)})


def run_traffic(stack: Stack, args: argparse.Namespace) -> list[dict[str, Any]]:
    from quark.data import load_prompts

    prompts = [p.text for p in load_prompts(args.train)]
    stop, seen = threading.Event(), []  # type: ignore[var-annotated]
    threads = [threading.Thread(target=replay, args=(stack.url, prompts, stop, seen))
               for _ in range(args.clients)]  # fmt: skip
    for thread in threads:
        thread.start()
    deadline = time.time() + 60 * args.minutes
    while time.time() < deadline:
        time.sleep(30)
        versions = sorted({s["version"] for s in seen if s.get("version")})
        print(f"[{time.strftime('%H:%M:%S')}] requests {len(seen)}, versions served {versions}",
              flush=True)  # fmt: skip
    stop.set()
    for thread in threads:
        thread.join(600)
    return seen


def drain(stack: Stack, minutes: float) -> list[dict[str, Any]]:
    """Wait (bounded) for a running job, so its version is evaluated too; returns the jobs."""
    deadline = time.time() + 60 * minutes
    with stack.admin() as admin:
        while True:
            jobs = admin.get("/admin/jobs").json()["jobs"]
            running = [j for j in jobs if j["state"] in ("PENDING", "STARTED", "PROGRESS")]
            if not running or time.time() > deadline:
                return list(jobs)
            time.sleep(10)


def evaluate_versions(args: argparse.Namespace) -> list[dict[str, Any]]:
    from quark.data import load_prompts, split_by_toxicity
    from quark.evaluation import evaluate
    from quark.models import load_model
    from quark.service.store import ModelStore

    toxic, _ = split_by_toxicity(load_prompts(args.dev))
    prompts = [p.text for p in toxic[: args.dev_prompts]]
    store = ModelStore(args.out / "data" / "models")
    original = load_model(args.model, device="cpu")
    rows = []
    for version in store.versions():
        meta = store.metadata(version)
        qm = store.load(version, device="cpu")
        result = evaluate(qm, original, "toxicity", prompts, 0, samples=args.samples, seed=0)
        rows.append({"version": version, "parent": meta.get("parent"),
                     "created_at": meta.get("created_at"), "job_id": meta.get("job_id"),
                     **{k: v for k, v in result.items() if k not in BULKY}})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = rows[0]["created_at"]
    minutes = [(r["created_at"] - start) / 60 for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(minutes, [r["expected_max_toxicity"] for r in rows], "o-", label="exp. max toxicity")
    ax.plot(minutes, [r["toxicity_probability"] for r in rows], "s--", label="toxicity prob.")
    for m, r in zip(minutes, rows, strict=True):
        ax.annotate(r["version"], (m, r["expected_max_toxicity"]), fontsize=7)
    ax.set_xlabel("minutes since v0000 (publication time of each version)")
    ax.set_ylabel("toxicity of top-token completions (RTP dev, toxic prompts)")
    ax.set_title("Continuous Quark on SmolLM2-135M: toxicity per served version")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, traffic: dict[str, Any]) -> str:
    lines = [
        SECTION, "",
        f"`benchmarks/continuous_loop.py --minutes {args.minutes:g}`: {traffic['requests']} "
        f"requests replayed from RTP train with `reward=top` ({traffic['failed']} failed), "
        f"continuous mode (a job every {args.interval_min:g} min or {args.min_new} new scored "
        f"records, {args.steps} steps each). Evaluation: {args.dev_prompts} toxic RTP dev "
        f"prompts x {args.samples} top-token samples (top-p 0.9, 20 tokens).", "",
        "| version | parent | exp. max toxicity | toxicity prob. | perplexity | dist-2 |",
        "|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['version']} | {r['parent'] or '-'} | {r['expected_max_toxicity']:.3f} "
            f"| {r['toxicity_probability']:.3f} | {r['perplexity']:.2f} | {r['dist-2']:.3f} |"
        )
    lines += ["", f"![toxicity per version]({args.plot.name})", ""]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of docs/results.md (or append it)."""
    text = path.read_text() if path.exists() else "# Results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(section + "\n", text)
        if pattern.search(text)
        else f"{text.rstrip()}\n\n{section}\n"
    )
    path.write_text(text)  # fmt: skip


def _drop_keys(env: dict[str, str]) -> None:
    """The run's Redis keys (pool, jobs, broker); the model store stays on disk."""
    import redis

    client = redis.Redis.from_url(env["QUARK_REDIS_URL"])
    keys = list(client.scan_iter(f"{env['QUARK_KEY_PREFIX']}:*"))
    if keys:
        client.delete(*keys)


def main() -> None:
    args = parse_args()
    stack = start_stack(args)
    try:
        stack.wait_serving("v0000", timeout=1200)
        seen = run_traffic(stack, args)
        jobs = drain(stack, args.drain_min)
    finally:
        stack.stop()
        _drop_keys(stack.env)
    traffic = {"requests": len(seen), "failed": sum(s["status"] != 200 for s in seen)}
    rows = evaluate_versions(args)
    plot(rows, args.plot)
    section = markdown(rows, args, traffic)
    write_section(args.results, section)
    report = {"traffic": traffic, "jobs": jobs, "versions": rows, "args": vars(args)}
    (args.out / "continuous.json").write_text(json.dumps(report, indent=2, default=str))
    print(section)


if __name__ == "__main__":
    main()
