"""Settings come from SWITCHYARD_* variables, default to the embedded stack, and keep secrets secret."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from switchyard.settings import Settings


def test_defaults_are_the_embedded_stack(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    monkeypatch.delenv("SWITCHYARD_DATABASE_URL", raising=False)
    settings = Settings()
    assert settings.database_dsn() is None
    assert settings.embedded_postgres_dir == Path(".switchyard") / "postgres"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWITCHYARD_DATABASE_URL", "postgresql://app:hunter2@db:5432/switchyard")
    monkeypatch.setenv("SWITCHYARD_DATA_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("SWITCHYARD_DEFAULT_STEP_TIMEOUT_S", "12.5")
    settings = Settings()
    assert settings.database_dsn() == "postgresql://app:hunter2@db:5432/switchyard"
    assert settings.data_dir == tmp_path / "state"
    assert settings.default_step_timeout_s == 12.5
    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.model_dump())


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SWITCHYARD_DB_POOL_SIZE", raising=False)
    (tmp_path / ".env").write_text("SWITCHYARD_DB_POOL_SIZE=7\n")
    assert Settings().db_pool_size == 7


def test_bad_values_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SWITCHYARD_DB_POOL_SIZE", "0")
    with pytest.raises(ValidationError, match="db_pool_size"):
        Settings()


@pytest.mark.parametrize(
    ("bind", "host"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("::", "127.0.0.1"),
        ("10.1.2.3", "10.1.2.3"),
        ("executor.internal", "executor.internal"),
    ],
)
def test_clients_reach_a_wildcard_bind_on_loopback(bind: str, host: str, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, web_bind=bind, executor_web_port=6066)
    assert settings.web_host == host
    assert settings.executor_url == f"http://{host}:6066"
