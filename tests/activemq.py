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

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eventindex.cli.broker_cmd import ActiveMQProcess, free_port
from eventindex.config import BrokerSettings

ACTIVEMQ_JAR = Path(BrokerSettings().activemq_home) / "bin" / "activemq.jar"
# Small, so the dead-letter tests need few round trips.
TEST_MAX_REDELIVERIES = 2


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
        ActiveMQProcess(self.settings).start()

    def stop(self) -> None:
        ActiveMQProcess(self.settings).stop()

    def restart(self) -> None:
        """Stop and start again on the same ports and data (persistent messages survive)."""
        self.stop()
        self.start()


@dataclass
class _SharedBroker:
    """One broker per process however many test packages import the fixtures: each
    import makes a fixture of its own, so they share this broker and the last one
    torn down stops it."""

    broker: RunningBroker | None = None
    users: int = 0


_SHARED = _SharedBroker()


@pytest.fixture(scope="session")
def activemq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    if not ACTIVEMQ_JAR.exists():
        pytest.skip(f"ActiveMQ is not installed ({ACTIVEMQ_JAR} is missing)")
    if _SHARED.broker is None:
        broker = RunningBroker(isolated_broker_settings(tmp_path_factory.mktemp("activemq")))
        broker.start()
        _SHARED.broker = broker
    _SHARED.users += 1
    try:
        yield _SHARED.broker
    finally:
        _SHARED.users -= 1
        if _SHARED.users == 0:
            _SHARED.broker.stop()
            _SHARED.broker = None


@pytest.fixture(scope="session")
def activemq_url(activemq: RunningBroker) -> str:
    return activemq.url
