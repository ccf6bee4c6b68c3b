"""Pieces of executor recovery that need no broker: partitioning and reading RocksDB offsets."""

from __future__ import annotations

from pathlib import Path

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st
from rocksdict import Options, Rdict

from streams.recovery import partition_of, persisted_offset


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
