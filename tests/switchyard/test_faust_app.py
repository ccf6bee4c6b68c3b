"""Shared Faust settings: the embedded-broker shim applies only on the embedded broker; web binds loopback."""

from __future__ import annotations

from pathlib import Path

import faust
import pytest

from switchyard.faust_app import (
    AdaptiveFetchWait,
    EmbeddedBrokerTransport,
    FetchWaits,
    SwitchyardApp,
    app_settings,
    wait_for_broker,
)
from switchyard.faust_fetch import GuardedConsumer, GuardedTransport
from switchyard.settings import Settings


def _faust_default_batch_size() -> int:
    return int(faust.Settings("t-defaults").producer_max_batch_size)


def _app(settings: Settings, name: str) -> SwitchyardApp:
    return SwitchyardApp(name, settings=settings, **app_settings(settings, web_port=6999))


def test_embedded_broker_gets_the_shim_and_its_settings(tmp_path: Path) -> None:
    settings = Settings(broker_port=19999, data_dir=tmp_path, embedded_fetch_wait_ms=7)
    app = _app(settings, "t-embedded")
    assert isinstance(app.transport, EmbeddedBrokerTransport)
    assert app.transport.Consumer.__name__ == "_EmbeddedBrokerConsumer"
    # The broker's end offsets come from a fetch (switchyard.kafka.end_offsets), so producers batch.
    assert app.conf.producer_max_batch_size == _faust_default_batch_size()
    assert app.conf.broker_session_timeout == 6.0
    assert app.conf.broker_heartbeat_interval == 1.0
    assert str(app.conf.broker[0]) == "kafka://127.0.0.1:19999"
    assert app.fetch_waits == FetchWaits(
        busy_ms=7, idle_ms=500, idle_after_s=1.0
    )  # the app's settings, not the environment's


def test_real_kafka_keeps_fausts_defaults(tmp_path: Path) -> None:
    settings = Settings(broker_url="kafka://kafka.internal:9092", data_dir=tmp_path)
    app = _app(settings, "t-real")
    # Faust's aiokafka transport, with only the fetch guard (switchyard.faust_fetch) and none of Tansu's shims.
    assert type(app.transport) is GuardedTransport
    assert app.transport.Consumer is GuardedConsumer
    assert app.conf.producer_max_batch_size == _faust_default_batch_size()
    assert app.conf.broker_session_timeout != 6.0


def test_web_binds_loopback_unless_told(tmp_path: Path) -> None:
    app = _app(Settings(data_dir=tmp_path), "t-web")
    assert app.conf.web_bind == "127.0.0.1"
    assert str(app.conf.canonical_url).startswith("http://127.0.0.1:6999")
    opened = _app(Settings(data_dir=tmp_path, web_bind="::"), "t-web-open")  # every interface (IPv6 wildcard)
    assert opened.conf.web_bind == "::"
    assert str(opened.conf.canonical_url).startswith("http://127.0.0.1:")


def test_values_are_raw_bytes_so_switchyard_decodes_them(tmp_path: Path) -> None:
    app = _app(Settings(data_dir=tmp_path), "t-raw")
    assert app.conf.key_serializer == "raw"
    assert app.conf.value_serializer == "raw"


@pytest.mark.parametrize("url", ["127.0.0.1:9092", "kafka://127.0.0.1:9092"])
def test_broker_url_forms(url: str, tmp_path: Path) -> None:
    assert Settings(broker_url=url, data_dir=tmp_path).bootstrap_servers == "127.0.0.1:9092"


def test_wait_for_broker_times_out_with_a_clear_message(tmp_path: Path) -> None:
    settings = Settings(broker_port=1, data_dir=tmp_path)
    with pytest.raises(TimeoutError, match=r"no Kafka broker answers at 127\.0\.0\.1:1 after 0\.3s"):
        wait_for_broker(settings, timeout=0.3)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_fetch_wait_is_short_while_records_flow_and_long_once_idle() -> None:
    clock = _Clock()
    adaptive = AdaptiveFetchWait(FetchWaits(busy_ms=5, idle_ms=400, idle_after_s=1.0), clock=clock)
    assert adaptive.wait_ms(got_records=False) == 5  # just started: not idle yet
    clock.now += 0.9
    assert adaptive.wait_ms(got_records=False) == 5
    clock.now += 0.2
    assert adaptive.wait_ms(got_records=False) == 400  # 1.1 s without records, and the third empty answer
    assert adaptive.wait_ms(got_records=True) == 5  # records again: short at once
    clock.now += 5  # busy with what it got: no fetch for a while
    assert adaptive.wait_ms(got_records=False) == 5  # one empty answer is not idle yet
    assert adaptive.wait_ms(got_records=False) == 5
    assert adaptive.wait_ms(got_records=False) == 400


async def test_the_wrapped_fetcher_sets_its_wait_after_each_answer() -> None:
    answers = iter([True, False, False, False])

    class Fetcher:
        _fetch_max_wait_ms = 1500

        async def _proc_fetch_request(self, assignment: object, node_id: int, request: object) -> bool:
            return next(answers)

    clock = _Clock()
    fetcher = Fetcher()
    AdaptiveFetchWait(FetchWaits(busy_ms=10, idle_ms=500, idle_after_s=1.0), clock=clock).install(fetcher)
    assert fetcher._fetch_max_wait_ms == 10
    assert await fetcher._proc_fetch_request(None, 0, None) is True
    assert fetcher._fetch_max_wait_ms == 10
    clock.now += 2
    for _ in range(AdaptiveFetchWait.EMPTY_FETCHES_WHEN_IDLE):
        assert await fetcher._proc_fetch_request(None, 0, None) is False
    assert fetcher._fetch_max_wait_ms == 500


def test_the_idle_wait_is_never_shorter_than_the_busy_one(tmp_path: Path) -> None:
    waits = FetchWaits.of(Settings(data_dir=tmp_path, embedded_fetch_wait_ms=50, embedded_idle_fetch_wait_ms=20))
    assert waits.idle_ms == 50
