"""Pieces of executor recovery that need no broker: partitioning, reading RocksDB offsets, asking again."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from streams.recovery import PartitionRecovery, partition_of, persisted_offset


@given(st.text(min_size=1, max_size=64), st.integers(min_value=1, max_value=64))
def test_partition_of_matches_the_producers_partitioner(run_id: str, partitions: int) -> None:
    everything = list(range(partitions))
    assert partition_of(run_id, partitions) == DefaultPartitioner()(run_id.encode(), everything, everything)


def test_persisted_offset_reads_what_faust_wrote(tmp_path: Path) -> None:
    path = tmp_path / "runs-0.db"
    db = Rdict(str(path), options=Options(raw_mode=True))
    db[b"__faust\0offset__"] = b"41"
    db[b"run-1"] = b"{}"
    db.close()
    assert persisted_offset(path) == 41
    empty = tmp_path / "runs-1.db"
    Rdict(str(empty), options=Options(raw_mode=True)).close()
    assert persisted_offset(empty) is None


class _Shell:
    def __init__(self) -> None:
        self.asked: list[tuple[list[str], bool]] = []

    async def resume_all(self, now: Any, belongs: Any = None, *, dispatches_only: bool = False) -> int:
        runs = [f"run-{i}" for i in range(40)]
        chosen = [r for r in runs if belongs(r)]
        self.asked.append((chosen, dispatches_only))
        return len(chosen)


async def test_asking_again_covers_the_partitions_gained_and_still_owned() -> None:
    shell = _Shell()
    app = SimpleNamespace(settings=SimpleNamespace(resume_grace_s=0.02, topic_partitions=4), shell=shell)
    recovery = PartitionRecovery(cast(Any, app))
    recovery.owned = {0, 1}  # partition 2 moved away meanwhile

    await recovery.ask_again({1, 2})

    ((chosen, dispatches_only),) = shell.asked
    assert dispatches_only
    assert chosen, "some of the runs are on partition 1"
    assert {partition_of(run_id, 4) for run_id in chosen} == {1}


async def test_no_grace_means_no_second_pass() -> None:
    shell = _Shell()
    app = SimpleNamespace(settings=SimpleNamespace(resume_grace_s=0.0, topic_partitions=4), shell=shell)
    recovery = PartitionRecovery(cast(Any, app))
    recovery.owned = {0}
    await recovery.ask_again({0})
    assert shell.asked == []
