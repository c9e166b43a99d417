"""One crashed child is not an outage: `quark up` (its own embedded Redis) loses its worker
to SIGKILL in the middle of a job, keeps serving every request, shows the worker down then up
again in /readyz, restarts it and says so; killed itself by SIGKILL, it leaves no child."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from testkit.stack import ADMIN_TOKEN, TrafficClient, free_port, service_env, wait_for
from tests.e2e.conftest import FAST_JOBS
from tests.e2e.test_quark_up import UpProcess, _listening, start_up


@pytest.fixture
def own_redis_env(toy_model_dir: Path, tmp_path: Path) -> dict[str, str]:
    """Nothing answers at QUARK_REDIS_URL: `quark up` starts its embedded Redis."""
    jobs = {**FAST_JOBS, "QUARK_UNLEARN_STEPS": "400"}  # still training when it is killed
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = service_env(toy_model_dir, dead, "qs-up-restart", tmp_path / "data", **jobs)
    env["QUARK_PORT"] = str(free_port())
    return env


def _worker(url: str) -> dict[str, object]:
    body: dict[str, object] = httpx.get(f"{url}/readyz", timeout=5).json()["worker"]
    return body


def _worker_pids(up: UpProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"started worker \(pid (\d+)\)", up.output())]


def _children_by_name(up: UpProcess) -> dict[str, int]:
    """The newest pid of each child, from the supervisor's log."""
    return {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", up.output())}


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_killed_worker_is_restarted_while_the_api_keeps_serving(
    own_redis_env: dict[str, str],
) -> None:
    up = start_up(own_redis_env)
    children: list[int] = []
    try:
        wait_for(up.ready, 240, "quark up to be ready")
        wait_for(lambda: _worker(up.url)["state"] == "up", 120, "the worker's heartbeat")
        for i in range(32):  # 20 training records (QUARK_UNLEARN_MIN_RECORDS) + 20% held out
            body = {"prompt": f"Tell me about item {i}:", "seed": i}
            httpx.post(f"{up.url}/generate", json=body, timeout=60).raise_for_status()
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=up.url, headers=auth, timeout=30) as admin:
            job = admin.post("/admin/unlearn", json={}).raise_for_status().json()["job_id"]

            def training() -> bool:
                view = admin.get(f"/admin/jobs/{job}").json()
                assert view["state"] not in ("SUCCESS", "FAILURE", "CANCELLED"), view
                progress = view.get("progress") or {}
                return progress.get("phase") == "train" and int(progress.get("step", 0)) >= 1

            wait_for(training, 120, "the job to train", interval=0.5)
        [worker] = _worker_pids(up)
        prompts = [f"During the outage {i}:" for i in range(8)]
        with TrafficClient(up.url, prompts, log=False) as traffic:
            time.sleep(1)
            killed, killed_at = time.monotonic(), time.time()
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda: _worker(up.url)["state"] == "down", 15, "/readyz: worker down")
            down_s = time.monotonic() - killed
            wait_for(lambda: len(_worker_pids(up)) == 2, 30, "the worker's restart")
            restart_s = time.monotonic() - killed
            wait_for(lambda: _worker(up.url)["state"] == "up", 90, "/readyz: worker up again")
            up_s = time.monotonic() - killed
            during = [r for r in traffic.results if r[0] >= killed_at]
            time.sleep(1)
        print(
            f"worker down in /readyz after {down_s:.1f}s, restarted after {restart_s:.1f}s, "
            f"up again after {up_s:.1f}s; {len(during)} requests meanwhile, "
            f"{len(traffic.errors)} failed"
        )
        assert traffic.errors == [], traffic.errors[:5]
        assert len(during) >= 5 and all(status == 200 for _, status, _, _ in traffic.results)
        log = up.output()
        assert "worker exited with code -9 (SIGKILL); restarting it in 1s" in log, log[-5000:]
        assert "restarted worker (restart 1, pid" in log
        new_worker = _worker_pids(up)[1]
        assert new_worker != worker and _alive(new_worker)
        assert up.process.poll() is None
        metrics = httpx.get(f"{up.url}/metrics", timeout=10).text
        assert re.search(r"^quark_worker_up 1\.0$", metrics, re.M)

        print("\n".join(line for line in up.output().splitlines() if "quark.up:" in line))
        with httpx.Client(base_url=up.url, headers=auth, timeout=30) as admin:
            print("the killed job:", admin.get(f"/admin/jobs/{job}").json()["state"])

        # SIGKILL `quark up` itself: no child may live on holding the port.
        named = _children_by_name(up)
        children = up.children()
        assert sorted(children) == sorted(named.values()), (named, children)
        assert set(named) == {"redis", "api", "worker", "beat"}
        killed = time.monotonic()
        os.kill(up.process.pid, signal.SIGKILL)
        up.process.wait(10)
        gone: dict[str, float] = {}
        while len(gone) < len(named) and time.monotonic() - killed < 30:
            for name, pid in named.items():
                if name not in gone and not _alive(pid):
                    gone[name] = time.monotonic() - killed
            time.sleep(0.05)
        print("gone after quark up was killed:", {k: f"{v:.1f}s" for k, v in gone.items()})
        assert set(gone) == set(named), f"orphans: {set(named) - set(gone)}"
        assert not _listening(up.url), "something still listens on the API port"
    except BaseException:
        print(up.output()[-30_000:])
        raise
    finally:
        if up.process.poll() is None:
            os.killpg(up.process.pid, signal.SIGKILL)
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
