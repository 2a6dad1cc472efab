"""The real ActiveMQ broker for integration tests, started once per test session.

Import the fixtures into a test package's ``conftest.py``::

    from tests.activemq import activemq, activemq_url

``activemq_url`` is a ``stomp://127.0.0.1:PORT`` URL; ``activemq`` is the
:class:`RunningBroker` (its ``restart()`` stops and starts the broker on the same
ports and data, for fault tests). The broker runs through the same code as
``eventindex broker start``, on free ports and in a temporary data folder, so it
never clashes with a broker a user runs. Tests using them are skipped when
ActiveMQ is not installed; mark them ``integration``.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from eventindex.config import BrokerSettings

ACTIVEMQ_JAR = Path(BrokerSettings().activemq_home) / "bin" / "activemq.jar"
# Small, so the dead-letter tests need few round trips.
TEST_MAX_REDELIVERIES = 2


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def isolated_broker_settings(data_dir: Path) -> BrokerSettings:
    """Settings of a broker of its own: free ports, a private data folder, quick redelivery."""
    stomp_port = free_port()
    return BrokerSettings(
        url=f"stomp://127.0.0.1:{stomp_port}",
        data_dir=str(data_dir),
        stomp_port=stomp_port,
        stomp_ssl_port=free_port(),
        openwire_port=free_port(),
        max_redeliveries=TEST_MAX_REDELIVERIES,
        redelivery_delay_ms=1000,
        heap_mb=512,
        memory_limit_mb=128,
        store_limit_mb=2048,
        temp_limit_mb=512,
        heartbeat_ms=2000,
        receipt_timeout_s=15,
        reconnect_delay_s=0.2,
        reconnect_delay_max_s=1.0,
    )


@dataclass
class RunningBroker:
    """A broker this test session started."""

    settings: BrokerSettings

    @property
    def url(self) -> str:
        return self.settings.url

    def start(self) -> None:
        from eventindex.cli.broker_cmd import ActiveMQProcess

        ActiveMQProcess(self.settings).start()

    def stop(self) -> None:
        from eventindex.cli.broker_cmd import ActiveMQProcess

        ActiveMQProcess(self.settings).stop()

    def restart(self) -> None:
        """Stop and start again on the same ports and data (persistent messages survive)."""
        self.stop()
        self.start()


@pytest.fixture(scope="session")
def activemq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    if not ACTIVEMQ_JAR.exists():
        pytest.skip(f"ActiveMQ is not installed ({ACTIVEMQ_JAR} is missing)")
    broker = RunningBroker(isolated_broker_settings(tmp_path_factory.mktemp("activemq")))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def activemq_url(activemq: RunningBroker) -> str:
    return activemq.url
