"""docker-compose.yml and the Dockerfiles are consistent (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DOCKERFILES = {"api": ROOT / "docker/Dockerfile.api", "worker": ROOT / "docker/Dockerfile.worker"}


def test_expected_services_exist() -> None:
    assert {"redis", "api", "worker", "beat", "flower"} <= set(SERVICES)
    assert SERVICES["flower"].get("profiles") == ["flower"], "Flower must stay optional"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_has_a_healthcheck(name: str) -> None:
    check = SERVICES[name].get("healthcheck")
    assert check and check.get("test"), f"{name} has no healthcheck"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_dependencies_wait_until_healthy(name: str) -> None:
    for dependency, condition in SERVICES[name].get("depends_on", {}).items():
        assert dependency in SERVICES, f"{name} depends on unknown service {dependency}"
        assert condition == {"condition": "service_healthy"}, f"{name} -> {dependency}"
        assert "healthcheck" in SERVICES[dependency]


def test_redis_is_persistent() -> None:
    redis = SERVICES["redis"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_volumes_are_declared_and_model_store_is_shared() -> None:
    declared = set(COMPOSE["volumes"])
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, f"{name} mounts undeclared volume {source}"
    for name in ("api", "worker", "beat"):
        assert "model-store:/data" in SERVICES[name]["volumes"], f"{name} misses the model store"


def test_worker_reserves_a_gpu_with_compose_device_syntax() -> None:
    devices = SERVICES["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert devices[0]["driver"] == "nvidia"


def test_images_and_builds_match() -> None:
    assert SERVICES["api"]["build"]["dockerfile"] == "docker/Dockerfile.api"
    assert SERVICES["worker"]["build"]["dockerfile"] == "docker/Dockerfile.worker"
    worker_image = SERVICES["worker"]["image"]
    assert SERVICES["beat"]["image"] == worker_image
    assert SERVICES["flower"]["image"] == worker_image
    for service in ("api", "worker", "beat"):
        env = SERVICES[service]["environment"]
        assert env["QUARK_REDIS_URL"] == "redis://redis:6379/0"


def test_secrets_come_from_the_environment() -> None:
    token = SERVICES["api"]["environment"]["QUARK_ADMIN_TOKEN"]
    assert token.startswith("${QUARK_ADMIN_TOKEN:?"), "the admin token must be required, not baked"
    for path in DOCKERFILES.values():
        assert not re.search(r"(TOKEN|API_KEY|PASSWORD)\s*=", path.read_text())


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfiles_use_the_readme_setup_and_a_non_root_user(name: str) -> None:
    text = DOCKERFILES[name].read_text()
    assert re.search(r"^RUN make setup\b", text, re.M), "build with the README's `make setup`"
    assert re.search(r"^USER (?!root)\w+", text, re.M), "images must not run as root"
    assert "HEALTHCHECK" in text
    readme = (ROOT / "README.md").read_text()
    assert "make up" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^setup:", makefile, re.M) and "torch==2.13.0" in makefile


def test_commands_point_at_real_modules() -> None:
    commands = [" ".join(s.get("command", [])) for s in SERVICES.values()]
    commands += [path.read_text() for path in DOCKERFILES.values()]
    text = "\n".join(commands)
    assert "worker.celery_app" in text and "app.main:create_app" in text
    assert (ROOT / "worker/celery_app.py").exists()
    assert (ROOT / "app/main.py").exists()
