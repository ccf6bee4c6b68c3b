"""The deployment files agree with the code: docker-compose, Dockerfile, Procfile and .env.example.

Docker cannot run here, so the compose file is checked by reading it.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from models.agents import AgentEntry
from switchyard.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SETTING_NAMES = {f"SWITCHYARD_{name.upper()}" for name in Settings.model_fields}


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    return {k: str(v) for k, v in env.items()}


def test_compose_has_every_service() -> None:
    services = _compose()["services"]
    assert {"kafka", "postgres", "executor", "bridge", "researcher", "summarizer", "reviewer"} <= set(services)
    assert "KRaft" in (ROOT / "docker-compose.yml").read_text() or "controller" in str(services["kafka"])
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_compose_environment_matches_the_settings() -> None:
    for name, service in _compose()["services"].items():
        for key in _env(service):
            if not key.startswith("SWITCHYARD_"):
                continue
            assert key in SETTING_NAMES, f"{name}: {key} is not a setting"
    executor_env = _env(_compose()["services"]["executor"])
    settings = Settings.model_validate(
        {k.removeprefix("SWITCHYARD_").lower(): v for k, v in executor_env.items() if k.startswith("SWITCHYARD_")}
    )
    assert settings.broker_url == "kafka://kafka:9092"
    assert not settings.embedded_broker
    assert settings.database_dsn() == "postgresql://switchyard:switchyard@postgres:5432/switchyard"
    postgres_env = _compose()["services"]["postgres"]["environment"]
    assert f"{postgres_env['POSTGRES_USER']}:{postgres_env['POSTGRES_PASSWORD']}" in settings.database_dsn()  # type: ignore[operator]
    assert settings.broker_url.endswith(":9092")
    assert "PLAINTEXT://kafka:9092" in _compose()["services"]["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]


def test_compose_workers_run_the_apps_and_publish_only_on_loopback() -> None:
    services = _compose()["services"]
    assert services["executor"]["command"][:3] == ["faust", "-A", "streams.app"]
    assert services["bridge"]["command"][:3] == ["faust", "-A", "agents_bridge.app"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    executor_port = int(_env(services["executor"])["SWITCHYARD_EXECUTOR_WEB_PORT"])
    assert f"127.0.0.1:{executor_port}:{executor_port}" in services["executor"]["ports"]


def test_compose_registry_points_at_the_agent_services() -> None:
    services = _compose()["services"]
    command = services["register-agents"]["command"]
    registry = json.loads((ROOT / command[-1]).read_text())
    for raw in registry["agents"]:
        entry = AgentEntry.model_validate(raw)
        host, port = re.match(r"http://([^:/]+):(\d+)/", entry.url).groups()  # type: ignore[union-attr]
        assert host in services, f"{entry.name}: no service {host!r}"
        assert port in services[host]["command"], f"{entry.name}: service {host} does not listen on {port}"


def test_dockerfile_installs_the_project_and_copies_every_package() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for package in ("models", "switchyard", "streams", "agents_bridge", "examples"):
        assert f"COPY {package} ./{package}" in text
    assert "pip install '.[examples]'" in text
    assert "USER switchyard" in text


def test_procfile_lists_every_process_with_real_modules() -> None:
    lines = [line for line in (ROOT / "Procfile").read_text().splitlines() if line and not line.startswith("#")]
    processes = dict(line.split(": ", 1) for line in lines)
    assert set(processes) == {"broker", "database", "executor", "bridge", "researcher", "summarizer", "reviewer"}
    for name, command in processes.items():
        args = shlex.split(command)
        if args[0] == "python":
            module = args[2]
            assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{name}: no module {module}"
        else:
            assert args[:3] in (["faust", "-A", "streams.app"], ["faust", "-A", "agents_bridge.app"])
            assert "--datadir" in args, f"{name}: each worker needs its own datadir (RocksDB lock)"


def test_env_example_documents_every_setting() -> None:
    names = set(re.findall(r"^#?\s*(SWITCHYARD_[A-Z_]+)=", (ROOT / ".env.example").read_text(), re.MULTILINE))
    assert names == SETTING_NAMES
