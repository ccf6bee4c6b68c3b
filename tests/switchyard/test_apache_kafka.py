"""Apache Kafka without Docker: the pinned release from Maven, on loopback, with aiokafka and Faust.

Needs ``java`` (17+) and, until the jars are in ``.switchyard/kafka/lib``,
``mvn``; without them the tests skip, or fail when ``SWITCHYARD_REQUIRE_KAFKA=1``
(for a CI that must run them).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from switchyard import embedded
from switchyard.embedded import (
    CONTROLLER_PORT_OFFSET,
    DEFAULT_KAFKA_LIB,
    ApacheKafka,
    EmbeddedUnavailableError,
    kafka_version,
    start_kafka,
)

REQUIRE_ENV = "SWITCHYARD_REQUIRE_KAFKA"


def _not_here(reason: str) -> None:
    """Skip, or fail when the environment says Kafka is mandatory."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1 makes Apache Kafka mandatory)")
    pytest.skip(reason)


def _check_tools() -> None:
    if shutil.which("java") is None:
        _not_here("Apache Kafka needs Java 17+ and java is not installed")
    if shutil.which("mvn") is None and not (DEFAULT_KAFKA_LIB / f"kafka_2.13-{kafka_version()}.jar").is_file():
        _not_here(f"Apache Kafka's jars are not in {DEFAULT_KAFKA_LIB} and mvn is not installed to download them")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _free_base_port(nodes: int) -> int:
    """A port P with P..P+nodes-1 and their controller ports all free on loopback."""
    for _ in range(50):
        base = _free_port()
        if base + CONTROLLER_PORT_OFFSET + nodes > 65535:
            continue
        wanted = [base + i for i in range(nodes)] + [base + CONTROLLER_PORT_OFFSET + i for i in range(nodes)]
        try:
            held = []
            for port in wanted:
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
        return base
    raise RuntimeError("no free ports")


def _start(data_dir: Path, nodes: int) -> ApacheKafka:
    _check_tools()
    try:
        return start_kafka(data_dir, nodes=nodes, base_port=_free_base_port(nodes))
    except EmbeddedUnavailableError as error:
        _not_here(str(error))
        raise  # not reached: _not_here raises


def _gone(pids: list[int]) -> bool:
    return all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in pids)


@pytest.fixture(scope="module")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApacheKafka]:
    cluster = _start(tmp_path_factory.mktemp("kafka-1"), nodes=1)
    pids = cluster.pids
    try:
        yield cluster
    finally:
        cluster.stop()
    assert _gone(pids), f"Kafka processes left running: {pids}"


def test_without_java_the_error_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(EmbeddedUnavailableError, match="Java 17"):
        start_kafka(tmp_path / "data")


def test_without_maven_or_jars_the_error_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "mvn" else real_which(name))
    with pytest.raises(EmbeddedUnavailableError, match=r"Maven \(mvn\)"):
        embedded.fetch_kafka_jars(tmp_path / "empty-lib")


def test_one_node_answers_and_reports_itself(kafka: ApacheKafka) -> None:
    assert kafka_version().startswith("4.")
    assert len(kafka.nodes) == 1
    assert len(kafka.pids) == 1
    assert kafka.bootstrap.startswith("127.0.0.1:")
    assert kafka.url == f"kafka://{kafka.bootstrap}"
    node = kafka.nodes[0]
    assert (node.directory / "data" / "meta.properties").is_file(), "the storage was formatted"
    assert (node.directory / "server.log").stat().st_size > 0, "the broker logs to its folder"
    # Every listener is on loopback (Java shows an IPv4 bind on its dual-stack socket as ::ffff:127.0.0.1).
    listening = {c.laddr for c in psutil.Process(kafka.pids[0]).net_connections("tcp") if c.status == "LISTEN"}
    assert {addr.ip.removeprefix("::ffff:") for addr in listening} == {"127.0.0.1"}
    assert {node.port, node.controller_port} <= {addr.port for addr in listening}


async def test_aiokafka_creates_topics_produces_consumes_and_commits_in_a_group(kafka: ApacheKafka) -> None:
    topic = "compat-aiokafka"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        assert topic in await admin.list_topics()
    finally:
        await admin.close()

    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for i in range(12):
            await producer.send_and_wait(
                topic, f"v{i}".encode(), key=f"k{i}".encode(), headers=[("n", str(i).encode())]
            )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        group_id="compat-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        received: list[tuple[bytes, bytes, list[tuple[str, bytes]]]] = []
        deadline = time.monotonic() + 60
        while len(received) < 12 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                received.extend((r.key, r.value, list(r.headers)) for r in records)
        assert sorted(value for _, value, _ in received) == sorted(f"v{i}".encode() for i in range(12))
        assert all(headers == [("n", value[1:])] for _, value, headers in received)
        assignment = consumer.assignment()
        assert {tp.partition for tp in assignment} == {0, 1, 2}, "the group coordinator assigned every partition"
        await consumer.commit()
        committed = {tp.partition: await consumer.committed(tp) for tp in assignment}
        assert sum(offset or 0 for offset in committed.values()) == 12
    finally:
        await consumer.stop()


_FAUST_APP = """
import json, pathlib, sys

import faust

BROKER, OUT, WEB_PORT = sys.argv.pop(1), pathlib.Path(sys.argv.pop(1)), int(sys.argv.pop(1))
app = faust.App(
    "compat-faust",
    broker=BROKER,
    store="memory://",
    web_enabled=False,
    # Should Faust bind its web server after all, only on loopback.
    web_bind="127.0.0.1",
    web_host="127.0.0.1",
    web_port=WEB_PORT,
    topic_partitions=1,
    datadir=str(OUT.parent / "faust-data"),
)
source = app.topic("compat-faust-in", key_type=bytes, value_type=bytes, value_serializer="raw", key_serializer="raw")
counts = app.Table("compat-counts", default=int, partitions=1)


@app.agent(source)
async def count(stream):
    async for key, value in stream.items():
        counts[key.decode()] += 1
        OUT.write_text(json.dumps({"key": key.decode(), "value": value.decode(), "count": counts[key.decode()]}))


if __name__ == "__main__":
    app.main()
"""


async def _create_topic(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


async def _produce_one(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


async def _topics(bootstrap: str) -> set[str]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        return set(await consumer.topics())
    finally:
        await consumer.stop()


def test_a_faust_worker_with_an_agent_and_a_table_processes_a_message(kafka: ApacheKafka, tmp_path: Path) -> None:
    asyncio.run(_create_topic(kafka.bootstrap, "compat-faust-in"))
    script = tmp_path / "compat_app.py"
    script.write_text(textwrap.dedent(_FAUST_APP))
    out = tmp_path / "out.json"
    log = tmp_path / "worker.log"
    with log.open("wb") as output:
        worker = subprocess.Popen(
            [sys.executable, str(script), kafka.url, str(out), str(_free_port()), "worker", "--loglevel", "info"],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        asyncio.run(_produce_one(kafka.bootstrap, "compat-faust-in", b"k", b"hello"))
        deadline = time.monotonic() + 90
        while not out.exists() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.25)
        worker_log = log.read_text(errors="replace")
        assert out.exists(), f"the agent processed nothing; worker log:\n{worker_log[-4000:]}"
        assert json.loads(out.read_text()) == {"key": "k", "value": "hello", "count": 1}
        # The table's changelog topic was created on the broker by Faust.
        assert "compat-faust-compat-counts-changelog" in asyncio.run(_topics(kafka.bootstrap))
    finally:
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)


async def _cluster_view(bootstrap: str, topic: str) -> tuple[int, list[tuple[int, int]]]:
    """How many brokers the metadata lists, and (replicas, in-sync replicas) of each partition of a new ``topic``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        brokers = len((await admin.describe_cluster())["brokers"])
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=3)])
        deadline = time.monotonic() + 30
        while True:
            (described,) = await admin.describe_topics([topic])
            partitions = sorted(described["partitions"], key=lambda p: p["partition"])
            replicas = [(len(p["replicas"]), len(p["isr"])) for p in partitions]
            if replicas == [(3, 3), (3, 3)] or time.monotonic() > deadline:
                return brokers, replicas
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


def test_a_three_node_cluster_lists_three_brokers_and_stops_completely(tmp_path: Path) -> None:
    cluster = _start(tmp_path / "kafka-3", nodes=3)
    pids = cluster.pids
    try:
        assert len(pids) == 3
        assert len(cluster.bootstrap.split(",")) == 3
        properties = (cluster.nodes[0].directory / "server.properties").read_text()
        assert "min.insync.replicas=2\n" in properties
        assert "default.replication.factor=3\n" in properties
        brokers, replicas = asyncio.run(_cluster_view(cluster.bootstrap, "compat-replicated"))
        assert brokers == 3
        assert replicas == [(3, 3), (3, 3)]
    finally:
        stopped = time.monotonic()
        cluster.stop()
        print(f"three nodes stopped in {time.monotonic() - stopped:.1f}s")
    assert cluster.pids == []
    assert _gone(pids), f"Kafka processes left running: {pids}"
    assert json.loads((tmp_path / "kafka-3" / "cluster.json").read_text())["nodes"] == 3
