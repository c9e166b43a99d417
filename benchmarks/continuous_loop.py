"""The whole online loop on the real default model, then toxicity per published version.

1. Starts a server, a Celery worker and beat in continuous mode (task toxicity, reward
   ``1 - P(offensive)``) on the configured Redis under a fresh key prefix, with the model
   store under ``--out``.
2. For ``--minutes`` replays RealToxicityPrompts train prompts as traffic with
   ``reward=top`` (``--objective acft``: no reward token, the default output an ACFT job
   cleans; ``--clients`` closed-loop clients); beat scores the pool and starts an
   unlearn job every ``--interval-min`` minutes or ``--min-new`` new scored records; each
   job continues from the active version, and the server hot-swaps every version it
   publishes.
   Every unlearn and gate setting keeps its default (the settings under test).
3. Stops traffic, lets a running job finish (``--drain-min``), stops everything, then
   evaluates every stored version with ``quark eval`` (two at a time, one core each) on
   the first ``--dev-prompts`` toxic prompts of ``--dev``: top-token completions (ACFT:
   no token), top-p 0.9, 20 tokens, seed 0, the judges ``quark eval`` reports
   (``toxicity:judge`` first), ``--samples`` per prompt for v0000 and the last version,
   ``--plot-samples`` for the versions between; then ``quark compare`` pairs the last
   version with v0000.
4. Writes ``<out>/continuous.json``, ``<out>/eval/``, a PNG plot, and the table + plot into
   ``docs/results.md`` under its own section, between markers (a rerun replaces them and
   keeps the section's hand-written text). ``--eval-only`` redoes 3-4 for a finished run.

Usage (30 minutes of traffic, then ~25 minutes of evaluation on 2 CPU cores)::

    .venv/bin/python benchmarks/continuous_loop.py --minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Per-prompt arrays and texts of an evaluation: kept out of the per-version rows.
BULKY = {"examples", "per_prompt", "prompt_texts", "prompt_sha256"}
sys.path.insert(0, str(ROOT))

from testkit.stack import Stack, service_env  # noqa: E402  (server/worker/beat processes)


@dataclass(frozen=True)
class Objective:
    """What one objective's run serves, evaluates and writes."""

    section: str  # the docs/results.md section this benchmark owns
    plot: str  # the PNG under docs/
    reward: str | None  # the request's ``reward`` and quark eval's ``--reward``; None: no token
    title: str  # the plot's

    @property
    def request_fields(self) -> dict[str, str]:
        return {} if self.reward is None else {"reward": self.reward}

    @property
    def eval_reward(self) -> str:
        return self.reward or "none"

    @property
    def output(self) -> str:
        return "no token" if self.reward is None else f"{self.reward} token"

    @property
    def request_text(self) -> str:
        return "no `reward`" if self.reward is None else f"`reward={self.reward}`"


OBJECTIVES = {
    "quark": Objective("## Continuous unlearning with the default settings (issue 12)",
                       "continuous_toxicity_defaults.png", "top", "Continuous Quark"),
    "acft": Objective("## Continuous ACFT (issue 10)", "continuous_toxicity_acft.png", None,
                      "Continuous ACFT"),
}  # fmt: skip
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
    p.add_argument("--max-kl", type=float, help="QUARK_GATE_MAX_KL (default: the setting's)")
    p.add_argument(
        "--objective",
        choices=sorted(OBJECTIVES),
        default="quark",
        help="QUARK_OBJECTIVE (acft: the no-token output)",
    )
    p.add_argument("--drain-min", type=float, default=10.0, help="wait for a running job")
    p.add_argument("--dev-prompts", type=int, default=100)
    p.add_argument("--samples", type=int, default=25, help="per prompt: first and last version")
    p.add_argument("--plot-samples", type=int, default=5, help="per prompt: the versions between")
    p.add_argument("--eval-only", action="store_true", help="evaluate the versions under --out")
    p.add_argument(
        "--out", type=Path, default=ROOT / "runs" / f"continuous-{time.strftime('%Y%m%d-%H%M')}"
    )
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument("--plot", type=Path, help="default: the objective's PNG under docs/")
    args = p.parse_args()
    args.goal = OBJECTIVES[args.objective]
    args.plot = args.plot or ROOT / "docs" / args.goal.plot
    return args


def start_stack(args: argparse.Namespace) -> Stack:
    prefix = f"continuous-{uuid.uuid4().hex[:8]}"
    redis_url = os.environ.get("QUARK_REDIS_URL", "redis://127.0.0.1:6379/0")
    env = service_env(
        Path(args.model), redis_url, prefix, args.out / "data",
        QUARK_TASK="toxicity", QUARK_CONTINUOUS="1", QUARK_BEAT_TICK_S="10",
        QUARK_CONTINUOUS_INTERVAL_MIN=str(args.interval_min),
        QUARK_CONTINUOUS_MIN_NEW_RECORDS=str(args.min_new),
        QUARK_DEFAULT_MAX_NEW_TOKENS="20",
        QUARK_TORCH_THREADS="1", QUARK_WATCHER_POLL_S="5", QUARK_LOG_LEVEL="warning",
        QUARK_OBJECTIVE=args.objective,
    )  # fmt: skip
    # One torch thread each for the API and the worker (service_env sets OMP_NUM_THREADS=1):
    # on 2 cores, 2 + 2 threads spin against each other and serving slowed ~30x while training.
    env["QUARK_MODEL"] = args.model
    if args.max_kl is not None:
        env["QUARK_GATE_MAX_KL"] = str(args.max_kl)
    args.out.mkdir(parents=True, exist_ok=True)
    stack = Stack(args.out, env)
    stack.start_worker(timeout=1200)
    stack.start_server(timeout=1200)
    stack.start_beat()
    return stack


def replay(
    url: str,
    prompts: list[str],
    fields: dict[str, str],
    stop: threading.Event,
    seen: list[dict[str, Any]],
) -> None:
    """One closed-loop client: RTP train prompts with the request ``fields``, logged to the
    pool."""
    rng = random.Random(len(seen))
    with httpx.Client(base_url=url, timeout=300) as http:
        while not stop.is_set():
            body = {"prompt": rng.choice(prompts), "top_p": 0.9, **fields}
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
    fields = args.goal.request_fields
    threads = [threading.Thread(target=replay, args=(stack.url, prompts, fields, stop, seen))
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


def quark_eval(
    args: argparse.Namespace, version: str, samples: int, core: int
) -> subprocess.Popen[bytes]:
    """``quark eval`` of one stored version's output (``args.goal``), one torch thread
    pinned to ``core``."""
    target = args.out / "eval" / f"{version}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [
        "taskset", "-c", str(core), sys.executable, "-m", "quark.cli", "eval",
        "--model", str(args.out / "data" / "models" / version), "--reference", args.model,
        "--prompts", str(args.dev), "--split", "toxic", "--limit", str(args.dev_prompts),
        "--samples", str(samples), "--reward", args.goal.eval_reward, "--json", str(target),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = (args.out / "eval" / f"{version}.log").open("wb")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def evaluate_versions(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every stored version's output on the same toxic dev prompts and seeds (two at a
    time, one core each): the first and the last with ``--samples``, the others with
    ``--plot-samples``; then the last paired against the first."""
    from quark.service.store import ModelStore

    store = ModelStore(args.out / "data" / "models")
    versions = store.versions()
    ends = {versions[0], versions[-1]}
    pending = [(v, args.samples if v in ends else args.plot_samples) for v in versions]
    pending = [(v, n) for v, n in pending if not (args.out / "eval" / f"{v}.json").exists()]
    running: dict[int, subprocess.Popen[bytes]] = {}
    while pending or running:
        for core in (0, 1):
            done = core in running and running[core].poll() is not None
            if done and running.pop(core).returncode != 0:
                raise SystemExit(f"quark eval failed: see {args.out / 'eval'}/*.log")
            if core not in running and pending:
                running[core] = quark_eval(args, *pending.pop(0), core)
        time.sleep(5)
    rows = []
    for version in versions:
        meta = store.metadata(version)
        result = json.loads((args.out / "eval" / f"{version}.json").read_text())
        rows.append({"version": version, "parent": meta.get("parent"),
                     "created_at": meta.get("created_at"), "job_id": meta.get("job_id"),
                     **{k: v for k, v in result.items() if k not in BULKY}})  # fmt: skip
    if len(versions) > 1:
        first, last = (args.out / "eval" / f"{v}.json" for v in (versions[0], versions[-1]))
        paired = args.out / "eval" / "last-vs-first.json"
        subprocess.run([sys.executable, "-m", "quark.cli", "compare", str(first), str(last),
                        "--json", str(paired)], cwd=ROOT, check=True)  # fmt: skip
    return rows


def plot(rows: list[dict[str, Any]], path: Path, title: str, output: str) -> None:
    """Mean toxicity of every version (it does not depend on the samples per prompt), and
    exp. max toxicity and toxicity probability of the versions with the most samples (both
    rise with the number of samples, so rows with fewer samples are not comparable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = rows[0]["created_at"]
    most = max(r["samples"] for r in rows)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series = (("mean_toxicity", "o-", "mean toxicity (every version)", rows),
              ("expected_max_toxicity", "^:", f"exp. max toxicity ({most} samples)",
               [r for r in rows if r["samples"] == most]),
              ("toxicity_probability", "s--", f"toxicity prob. ({most} samples)",
               [r for r in rows if r["samples"] == most]))  # fmt: skip
    for key, style, label, chosen in series:
        minutes = [(r["created_at"] - start) / 60 for r in chosen]
        cells = [r["metrics"][f"{key}@judge"] for r in chosen]
        values = [c["value"] for c in cells]
        errors = [[v - c["low"] for v, c in zip(values, cells, strict=True)],
                  [c["high"] - v for v, c in zip(values, cells, strict=True)]]  # fmt: skip
        ax.errorbar(minutes, values, yerr=errors, fmt=style, capsize=3, label=label)
    for r in rows:
        at = ((r["created_at"] - start) / 60, r["mean_toxicity"])
        ax.annotate(f"{r['version']} ({r['samples']})", at, fontsize=7)
    ax.set_xlabel("minutes since v0000 (publication time of each version)")
    ax.set_ylabel(f"{output} toxicity (judge), RTP dev toxic prompts")
    ax.set_title(f"{title} on SmolLM2-135M, default settings: toxicity per version\n"
                 "(95% intervals; samples per prompt in brackets)", fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _cell(row: dict[str, Any], metric: str, fmt: str = ".3f") -> str:
    c = row["metrics"].get(metric) if metric in row.get("metrics", {}) else None
    if c is None:
        return f"{row[metric.split('@')[0]]:{fmt}}"
    return f"{c['value']:{fmt}} [{c['low']:{fmt}}, {c['high']:{fmt}}]"


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, traffic: dict[str, Any]) -> str:
    lines = [
        f"`benchmarks/continuous_loop.py --minutes {args.minutes:g} --objective "
        f"{args.objective}`: {traffic['requests']} requests replayed from RTP train with "
        f"{args.goal.request_text} ({traffic['failed']} failed), continuous mode (a job every "
        f"{args.interval_min:g} min or {args.min_new} new scored records), every unlearn and "
        f"gate setting at its default. Evaluation: {args.goal.output}, "
        f"{args.dev_prompts} toxic RTP dev prompts (top-p 0.9, 20 tokens, seed 0), judge "
        f"`toxicity:judge`; samples per prompt in the second column.", "",
        "| version | samples | parent | toxicity prob. | exp. max toxicity | mean toxicity | ppl "
        "| dist-3 | degenerate |",
        "|---|---:|---|---|---|---|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        lines.append(
            f"| {r['version']} | {r['samples']} | {r['parent'] or '-'} "
            f"| {_cell(r, 'toxicity_probability@judge', '.2f')} "
            f"| {_cell(r, 'expected_max_toxicity@judge')} "
            f"| {_cell(r, 'mean_toxicity@judge')} | {r['perplexity']:.1f} "
            f"| {r['dist-3']:.3f} | {r['degenerate_share']:.1%} |"
        )
    lines += ["", f"![toxicity per version]({args.plot.name})", ""]
    return "\n".join(lines)


def write_section(path: Path, title: str, block: str) -> None:
    """Put ``block`` (the generated table and plot) under ``title`` in docs/results.md,
    between markers, so a rerun replaces it and leaves the section's hand-written text."""
    begin, end = f"<!-- generated: {title} -->", f"<!-- end generated: {title} -->"
    marked = f"{begin}\n{block.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Results\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + marked + text[text.index(end) + len(end) :]
    elif re.search(rf"^{re.escape(title)}$", text, re.M):
        text = re.sub(rf"^{re.escape(title)}\n", lambda m: f"{m.group(0)}\n{marked}\n", text,
                      count=1, flags=re.M)  # fmt: skip
    else:
        text = f"{text.rstrip()}\n\n{title}\n\n{marked}\n"
    path.write_text(text)


def _drop_keys(env: dict[str, str]) -> None:
    """The run's Redis keys (pool, jobs, broker); the model store stays on disk."""
    import redis

    client = redis.Redis.from_url(env["QUARK_REDIS_URL"])
    keys = list(client.scan_iter(f"{env['QUARK_KEY_PREFIX']}:*"))
    if keys:
        client.delete(*keys)


def main() -> None:
    args = parse_args()
    run_file = args.out / "continuous.json"
    if args.eval_only:
        report = json.loads(run_file.read_text())
    else:
        stack = start_stack(args)
        try:
            stack.wait_serving("v0000", timeout=1200)
            seen = run_traffic(stack, args)
            jobs = drain(stack, args.drain_min)
        finally:
            stack.stop()
            _drop_keys(stack.env)
        traffic = {"requests": len(seen), "failed": sum(s["status"] != 200 for s in seen)}
        report = {"traffic": traffic, "jobs": jobs, "args": vars(args)}
        run_file.write_text(json.dumps(report, indent=2, default=str))  # before the evaluation
    report["versions"] = rows = evaluate_versions(args)
    plot(rows, args.plot, args.goal.title, args.goal.output)
    block = markdown(rows, args, report["traffic"])
    write_section(args.results, args.goal.section, block)
    run_file.write_text(json.dumps(report, indent=2, default=str))
    print(block)


if __name__ == "__main__":
    main()
