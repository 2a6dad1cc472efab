"""One transport fixture over every implementation, as tests/catalog does for catalogs.

``memory``: a fresh named in-process broker per test. ``stomp``: the real ActiveMQ
broker of the session (tests/activemq.py), marked ``integration``; each test uses
destinations of its own so tests never see each other's messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from eventindex.config import BrokerSettings
from eventindex.transport import Transport, open_transport
from eventindex.transport.memory import MemoryBroker
from tests.activemq import TEST_MAX_REDELIVERIES, activemq, activemq_url

__all__ = ["activemq", "activemq_url"]


@dataclass
class BrokerUnderTest:
    """Opens connected transports on one broker; all are closed at teardown."""

    name: str
    url: str
    settings: BrokerSettings
    opened: list[Transport] = field(default_factory=list)

    def open(self) -> Transport:
        transport = open_transport(self.url, self.settings)
        transport.connect()
        self.opened.append(transport)
        return transport

    @property
    def max_redeliveries(self) -> int:
        return self.settings.max_redeliveries


def client_settings(url: str) -> BrokerSettings:
    return BrokerSettings(
        url=url,
        max_redeliveries=TEST_MAX_REDELIVERIES,
        heartbeat_ms=2000,
        receipt_timeout_s=10,
        reconnect_delay_s=0.2,
        reconnect_delay_max_s=1.0,
    )


@pytest.fixture(params=["memory", pytest.param("stomp", marks=pytest.mark.integration)])
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerUnderTest]:
    if request.param == "memory":
        name = f"test-{uuid.uuid4().hex[:8]}"
        url = f"memory://{name}"
    else:
        url = request.getfixturevalue("activemq_url")
    under_test = BrokerUnderTest(request.param, url, client_settings(url))
    try:
        yield under_test
    finally:
        for transport in under_test.opened:
            transport.close()
        if request.param == "memory":
            MemoryBroker.forget(name)


@pytest.fixture
def queue_name() -> str:
    return f"/queue/eitest.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def topic_name() -> str:
    return f"/topic/eitest.{uuid.uuid4().hex[:12]}"
