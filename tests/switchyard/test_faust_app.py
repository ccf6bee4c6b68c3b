"""Shared Faust settings: the embedded-broker shim applies only on the embedded broker; web binds loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka

from switchyard.faust_app import (
    EMBEDDED_FETCH_WAIT_MS,
    EmbeddedBrokerTransport,
    SwitchyardApp,
    app_settings,
    wait_for_broker,
)
from switchyard.settings import Settings


def _app(settings: Settings, name: str) -> SwitchyardApp:
    return SwitchyardApp(name, embedded_broker=settings.embedded_broker, **app_settings(settings, web_port=6999))


def test_embedded_broker_gets_the_shim_and_its_settings(tmp_path: Path) -> None:
    settings = Settings(broker_port=19999, data_dir=tmp_path)
    app = _app(settings, "t-embedded")
    assert isinstance(app.transport, EmbeddedBrokerTransport)
    assert app.transport.Consumer.__name__ == "_ShortFetchConsumer"
    assert app.conf.producer_max_batch_size == 1
    assert app.conf.broker_session_timeout == 6.0
    assert app.conf.broker_heartbeat_interval == 1.0
    assert str(app.conf.broker[0]) == "kafka://127.0.0.1:19999"
    assert EMBEDDED_FETCH_WAIT_MS <= 50


def test_real_kafka_keeps_fausts_defaults(tmp_path: Path) -> None:
    settings = Settings(broker_url="kafka://kafka.internal:9092", data_dir=tmp_path)
    app = _app(settings, "t-real")
    assert type(app.transport) is faust_aiokafka.Transport
    assert app.conf.producer_max_batch_size != 1
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
