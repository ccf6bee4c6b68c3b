"""Ten kill -9 restarts of the executor in a row, with a backlog on every partition, with Faust's default batching.

The embedded broker's ListOffsets answers the first offset of a partition's
newest batch + 1; table recovery used to take that for the changelog's end
(a restart could die with ``ConsistencyError``, or a rebuild skip the last
records), so producers sent one record per batch. Now end offsets come from a
fetch's high watermark (:func:`switchyard.kafka.end_offsets`) and producers
batch. Each restart here must recover the whole changelog: while the executor
is down nothing writes it, so its true end is known, and the highwater Faust
logs when it recovers must be exactly that (Faust logs ``end - 1``).
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from streams.recovery import partition_of
from switchyard.settings import Settings
from tests.faults.conftest import PARTITIONS, AgentSpec, FaultStack, chain

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

RESTARTS = int(os.environ.get("RB_RESTARTS", "10"))
RUNS_PER_ROUND = 100
CHANGELOG = "switchyard-executor-runs-changelog"


async def _changelog_ends(settings: Settings) -> tuple[dict[int, int], dict[int, int]]:
    """The changelog's end per partition, read record by record (not from the shim under test), and ListOffsets'.

    Nothing writes the changelog while the executor is down, so reading until
    the broker has no more gives its end.
    """
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(CHANGELOG, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = dict.fromkeys(range(PARTITIONS), 0)
        quiet = 0
        while quiet < 3:
            batches = await consumer.getmany(*tps, timeout_ms=300)
            quiet = 0 if any(batches.values()) else quiet + 1
            for tp, records in batches.items():
                ends[tp.partition] = max(ends[tp.partition], records[-1].offset + 1)
        listed = await consumer.end_offsets(tps)
        return ends, {tp.partition: n for tp, n in listed.items()}
    finally:
        await consumer.stop()


_ROW = re.compile(r"^[|│][^|│]*[|│]\s*(\d+)\s*[|│]\s*(-?\d+)\s*[|│]")
_TABLE = ("|", "│", "+", "┌", "├", "└")


def recovered_highwaters(log: str) -> dict[int, int]:
    """The active changelog highwaters Faust logged last in ``log`` (its table of topic, partition, highwater)."""
    found: dict[int, int] = {}
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "Highwater for active changelog partitions" in line]
    if not starts:
        return found
    for line in lines[starts[-1] + 1 :]:
        line = line.strip()
        if not line.startswith(_TABLE):
            break
        row = _ROW.match(line)
        if row:
            found[int(row[1])] = int(row[2])
    return found


def _log_since(path: Path, offset: int) -> str:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read().decode("utf-8", "replace")


def _kill_mid_flight(faults: FaultStack, run_ids: list[str], plan: dict[str, object], label: str) -> int:
    """Wait until a fifth of ``run_ids`` have completed, top up every partition with fresh runs, and kill -9 at once.

    Partitions move at their own pace, so the top-up (runs submitted just
    before the kill, which it cannot have finished) is what makes sure that
    every partition has a backlog, and the wait that the executor was working
    through one.

    Returns:
        How many runs were not finished at the kill.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        statuses = faults.statuses(run_ids)
        if sum(1 for run_id in run_ids if statuses.get(run_id) == "COMPLETED") >= len(run_ids) // 5:
            break
        time.sleep(0.05)
    topped: set[int] = set()
    while topped != set(range(PARTITIONS)):
        more = faults.submit(plan, PARTITIONS * 4, f"{label} top-up")
        run_ids += more
        topped |= {partition_of(run_id, PARTITIONS) for run_id in more}
    faults.kill("executor")
    statuses = faults.statuses(run_ids)
    return sum(1 for run_id in run_ids if statuses.get(run_id) != "COMPLETED")


def test_recovered_highwaters_are_read_from_fausts_log_table() -> None:
    log = "\n".join(
        [
            "[INFO] Highwater for active changelog partitions:",
            "┌Highwater - Active──────────────────┬───────────┬───────────┐",
            "│ topic                              │ partition │ highwater │",
            "├────────────────────────────────────┼───────────┼───────────┤",
            "│ switchyard-executor-runs-changelog │ 0         │ 121       │",
            "│                                    │ 1         │ -1        │",
            "└────────────────────────────────────┴───────────┴───────────┘",
        ]
    )
    assert recovered_highwaters(log) == {0: 121, 1: -1}
    plain = "\n".join(
        [
            "[INFO] [^---OrderedRecovery]: Highwater for active changelog partitions:",
            "+Highwater - Active-----+-----------+-----------+",
            "| topic                 | partition | highwater |",
            "+-----------------------+-----------+-----------+",
            "| switchyard-executor-r | 0         | 14        |",
            "| 〃                    | 3         | 16        |",
            "+-----------------------+-----------+-----------+ ",
            "[INFO] active offsets at start of reading:",
            "| switchyard-executor-r | 0         | 99        |",
        ]
    )
    assert recovered_highwaters(plain) == {0: 14, 3: 16}
    assert recovered_highwaters("nothing logged") == {}


def test_ten_kill_restarts_with_a_backlog_recover_every_changelog_record(
    make_stack: Callable[..., FaultStack],
) -> None:
    # A stack of its own: a thousand runs would weigh on every later restart of the shared one.
    faults = make_stack({"summarizer": AgentSpec()})
    plan = chain("summarizer", workflow_id="restart-backlog")
    run_ids: list[str] = []
    batched = 0
    for round_no in range(1, RESTARTS + 1):
        fresh = faults.submit(plan, RUNS_PER_ROUND, f"backlog {round_no}")
        left = _kill_mid_flight(faults, fresh, plan, f"backlog {round_no}")
        run_ids += fresh
        true, listed = asyncio.run(_changelog_ends(faults.settings))
        batched += sum(1 for p in true if listed[p] < true[p])
        log_path = faults.process("executor").log_path
        before = log_path.stat().st_size
        took = faults.restart("executor")
        log = _log_since(log_path, before)
        print(f"restart {round_no}: {left} of {len(fresh)} new runs unfinished at the kill; serving in {took:.1f}s")
        assert "ConsistencyError" not in log, log[-4000:]
        highwaters = recovered_highwaters(log)
        expected = {p: end - 1 for p, end in true.items()}
        assert highwaters == expected, (
            f"restart {round_no}: Faust recovered the changelog to {highwaters}, its end is {expected} "
            f"(ListOffsets says {listed})\n{faults.logs('executor')}"
        )
    assert batched, "no changelog partition ever ended in a batch of several records: the test proves nothing"
    # Faust counts the records of a gap in a partition's offsets as processed (switchyard.faust_fetch).
    skipped = [line for line in log_path.read_text(errors="replace").splitlines() if "skipped by the consumer" in line]
    assert not skipped, "\n".join(skipped[:20])
    figures = faults.verify_completed(run_ids, f"{RESTARTS} executor kill -9 restarts with a backlog", timeout=120)
    assert figures.invocations == figures.attempts == 2 * len(run_ids), figures.line()
