"""Start an API server subprocess for a benchmark and wait until it is ready."""

from __future__ import annotations

import subprocess
import time
import uuid
from pathlib import Path

import httpx

from quark.service.up import api_argv, free_port
from testkit.env import isolated_env

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 600


def launch_server(settings: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """uvicorn on a free port with only these QUARK_* settings (plus the model cache dir)."""
    port = free_port()
    env = isolated_env(
        {"QUARK_LOG_LEVEL": "warning", "QUARK_ADMIN_TOKEN": uuid.uuid4().hex}, settings
    )
    command = [*api_argv("127.0.0.1", port), "--log-level", "warning"]
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"server did not become ready in {READY_TIMEOUT_S} s")
