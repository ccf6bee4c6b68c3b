"""The benches' shared harness: CPU accounting of process trees, and the SIGTERM guard."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from bench.harness import CPU_GROUPS, cpu_seconds, cpu_used, sigterm_as_interrupt

pytestmark = pytest.mark.timeout(60)

BURN = "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass\n"


def test_cpu_used_subtracts_per_process_and_counts_a_new_one_from_zero() -> None:
    before = {"executor": {10: 1.0}, "postgres": {20: 5.0}, "bench": {30: 2.0}}
    after = {"executor": {11: 0.5}, "postgres": {20: 7.5}, "bench": {30: 2.25}, "agents": {40: 1.0}}
    used = cpu_used(before, after)
    assert set(used) == set(CPU_GROUPS)
    # pid 10 is gone (a restarted worker is pid 11, counted from its start); nothing is negative
    assert used == {"executor": 0.5, "bridge": 0.0, "broker": 0.0, "postgres": 2.5, "agents": 1.0, "bench": 0.25}


def test_cpu_seconds_of_a_tree_keeps_children_that_came_and_went() -> None:
    """What a backend used before it exited stays in its parent's figure: the kernel adds it when it is reaped."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import subprocess, sys, time
                subprocess.run([sys.executable, "-c", {BURN.format(s=0.4)!r}], check=True)  # exited, reaped
                child = subprocess.Popen([sys.executable, "-c", {BURN.format(s=0.3)!r} + "time.sleep(60)"])
                print("ready", flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 20
        live: list[psutil.Process] = []
        while time.monotonic() < deadline:  # until the live child has burnt its share
            live = psutil.Process(parent.pid).children()
            if live and sum(live[0].cpu_times()[:2]) >= 0.3:
                break
            time.sleep(0.05)
        tree = cpu_seconds(parent.pid)
        alone = cpu_seconds(parent.pid, tree=False)
        assert tree is not None
        assert alone is not None
        assert alone < 0.3  # the parent itself only waited
        assert tree >= alone + 0.4 + 0.3 - 0.05  # the exited child and the live one (clock ticks of 10 ms)
        assert len(live) == 1
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait(10)
    assert cpu_seconds(parent.pid) is None  # gone


def test_cpu_seconds_of_this_process_without_its_children() -> None:
    own = cpu_seconds(os.getpid(), tree=False)
    assert own is not None
    assert own > 0


def test_sigterm_becomes_keyboard_interrupt_inside_the_guard_only() -> None:
    previous = signal.getsignal(signal.SIGTERM)

    def terminated() -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # interrupted long before

    with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt, match="signal 15"):
        terminated()
    assert signal.getsignal(signal.SIGTERM) is previous
