"""Processes started together come up in any order: a worker waits for its broker instead of crashing."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from switchyard.settings import Settings
from switchyard.stack import Stack
from tests.e2e.conftest import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_worker_started_before_the_broker_waits_then_serves(server_dir: Path) -> None:
    settings = Settings(
        broker_port=free_port(),
        executor_web_port=free_port(),
        bridge_web_port=free_port(),
        data_dir=server_dir,
        wait_for_services_s=60,
    )
    stack = Stack(settings, Path(__file__).resolve().parents[2])
    try:
        executor = stack.start_worker("streams.app")
        deadline = time.monotonic() + 30
        while "waiting for the Kafka broker" not in executor.log_tail(200) and time.monotonic() < deadline:
            assert executor.alive(), executor.log_tail()
            time.sleep(0.2)
        assert "waiting for the Kafka broker" in executor.log_tail(200)
        time.sleep(1.0)
        assert executor.alive(), "the worker must wait, not crash"
        stack.start_services()
        health = stack.wait_http(stack.executor_url("/health/"), executor, timeout=90)
        assert health["ready"] is True
    finally:
        stack.stop()


def test_worker_gives_up_after_the_bounded_wait(server_dir: Path) -> None:
    settings = Settings(
        broker_port=free_port(),
        executor_web_port=free_port(),
        bridge_web_port=free_port(),
        data_dir=server_dir,
    )
    stack = Stack(settings, Path(__file__).resolve().parents[2])
    try:
        bridge = stack.start_worker("agents_bridge.app", SWITCHYARD_WAIT_FOR_SERVICES_S="2")
        bridge.popen.wait(60)
        assert bridge.popen.returncode != 0
        assert "no Kafka broker answers" in bridge.log_tail(200)
    finally:
        stack.stop()
