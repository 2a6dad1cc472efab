"""``eventindex broker start|status|stop`` as users run it, on free ports in a temporary folder."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from eventindex.cli.broker_cmd import ActiveMQProcess, free_port, stomp_answers
from eventindex.config import BrokerSettings
from eventindex.transport import DLQ_PREFIX
from tests.activemq import (
    ACTIVEMQ_JAR,
    activemq,
    activemq_url,
    isolated_broker_settings,
)

__all__ = ["activemq", "activemq_url"]

EVENTINDEX = Path(sys.executable).parent / "eventindex"
AMQ = "{http://activemq.apache.org/schema/core}"


def broker_command(settings: BrokerSettings, *args: str) -> subprocess.CompletedProcess[str]:
    flags = [
        f"--set=broker.data_dir={settings.data_dir}",
        f"--set=broker.stomp_port={settings.stomp_port}",
        f"--set=broker.openwire_port={settings.openwire_port}",
        f"--set=broker.stomp_ssl_port={settings.stomp_ssl_port}",
        f"--set=broker.activemq_home={settings.activemq_home}",
        f"--set=broker.heap_mb={settings.heap_mb}",
        f"--set=broker.memory_limit_mb={settings.memory_limit_mb}",
    ]
    return subprocess.run(
        [str(EVENTINDEX), *flags, "broker", *args],
        capture_output=True,
        check=False,
        text=True,
        timeout=180,
        env={"PATH": "/usr/bin:/bin", "NO_COLOR": "1", "COLUMNS": "200"},
    )


def test_the_conf_is_filled_from_the_settings(tmp_path: Path) -> None:
    settings = isolated_broker_settings(tmp_path).model_copy(
        update={"max_redeliveries": 7, "journal_sync": "periodic"}
    )
    process = ActiveMQProcess(settings)
    process.install_conf()
    text = (process.conf_dir / "activemq.xml").read_text()
    assert "${eventindex." not in text
    root = ET.fromstring(text)
    broker = root.find(f"{AMQ}broker")
    assert broker is not None
    connectors = {c.get("name"): c.get("uri", "") for c in broker.iter(f"{AMQ}transportConnector")}
    assert connectors["stomp"].startswith(f"stomp://127.0.0.1:{settings.stomp_port}?")
    assert connectors["openwire"].startswith(f"tcp://127.0.0.1:{settings.openwire_port}?")
    assert "stomp+ssl" not in connectors, "the SSL connector ships commented out"
    assert re.search(r'<transportConnector name="stomp\+ssl"', text), "ready to enable"
    (queues,) = [p for p in broker.iter(f"{AMQ}policyEntry") if p.get("queue") == ">"]
    (dead_letters,) = queues.iter(f"{AMQ}individualDeadLetterStrategy")
    assert dead_letters.get("queuePrefix") == DLQ_PREFIX
    (policy,) = broker.iter(f"{AMQ}redeliveryPolicy")
    assert policy.get("maximumRedeliveries") == "7"
    (kahadb,) = broker.iter(f"{AMQ}kahaDB")
    assert kahadb.get("journalDiskSyncStrategy") == "periodic"
    assert kahadb.get("directory") == "${activemq.data}/kahadb"


def test_status_fails_when_nothing_answers(tmp_path: Path) -> None:
    settings = isolated_broker_settings(tmp_path)
    result = broker_command(settings, "status")
    assert result.returncode == 1, result
    assert f"STOMP does not answer on 127.0.0.1:{settings.stomp_port}" in result.stdout


def test_start_without_activemq_says_what_is_missing(tmp_path: Path) -> None:
    settings = isolated_broker_settings(tmp_path).model_copy(
        update={"activemq_home": str(tmp_path / "no-activemq")}
    )
    result = broker_command(settings, "start")
    assert result.returncode == 2, result
    assert "ActiveMQ is not installed" in result.stderr
    assert "Traceback" not in result.stderr


def test_stop_without_a_broker_says_so(tmp_path: Path) -> None:
    result = broker_command(isolated_broker_settings(tmp_path), "stop")
    assert result.returncode == 0, result
    assert "no broker running" in result.stdout


@pytest.mark.integration
@pytest.mark.skipif(not ACTIVEMQ_JAR.exists(), reason=f"ActiveMQ is not installed ({ACTIVEMQ_JAR})")
def test_start_status_stop(tmp_path: Path) -> None:
    settings = isolated_broker_settings(tmp_path)
    try:
        started = broker_command(settings, "start")
        assert started.returncode == 0, started
        assert f"STOMP on 127.0.0.1:{settings.stomp_port}" in started.stdout
        assert stomp_answers("127.0.0.1", settings.stomp_port)
        assert (tmp_path / "data" / "kahadb").is_dir()
        pid = ActiveMQProcess(settings).running_pid()
        assert pid is not None

        again = broker_command(settings, "start")
        assert again.returncode == 0, again
        assert f"pid {pid}" in again.stdout, "a second start reuses the running broker"

        status = broker_command(settings, "status")
        assert status.returncode == 0, status
        assert f"STOMP answers on 127.0.0.1:{settings.stomp_port}" in status.stdout

        stopped = broker_command(settings, "stop")
        assert stopped.returncode == 0, stopped
        assert "stopped" in stopped.stdout
        assert not stomp_answers("127.0.0.1", settings.stomp_port, timeout=0.5)
        assert broker_command(settings, "status").returncode == 1
    finally:
        ActiveMQProcess(settings).stop(timeout=10)


@pytest.mark.integration
@pytest.mark.skipif(not ACTIVEMQ_JAR.exists(), reason=f"ActiveMQ is not installed ({ACTIVEMQ_JAR})")
def test_start_refuses_a_port_another_broker_holds(activemq_url: str, tmp_path: Path) -> None:
    taken = int(activemq_url.rpartition(":")[2])
    settings = isolated_broker_settings(tmp_path).model_copy(
        update={"stomp_port": taken, "openwire_port": free_port()}
    )
    result = broker_command(settings, "start")
    assert result.returncode == 2, result
    assert f"port {taken} on 127.0.0.1 already answers STOMP" in result.stderr
