"""What only the STOMP transport does: failover, heart-beats, confirmation timeouts,
and surviving a broker restart in the middle of traffic."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventindex.cli.broker_cmd import free_port
from eventindex.config import BrokerSettings
from eventindex.transport import (
    ConfirmationTimeoutError,
    Transport,
    TransportError,
    open_transport,
)
from eventindex.transport.stomp import StompTransport
from tests.activemq import RunningBroker
from tests.transport.conftest import client_settings

SEQUENCE = "eventindex-sequence"


def stomp_port(url: str) -> int:
    return int(url.rpartition(":")[2])


class SilentStompServer:
    """Accepts a STOMP connection, answers CONNECT, and then never confirms anything.
    With ``tls`` (a server context) it speaks STOMP over TLS."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        plain = socket.create_server(("127.0.0.1", 0))
        self.listener = tls.wrap_socket(plain, server_side=True) if tls else plain
        self.port: int = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(connection)
            received = b""
            while b"\0" not in received:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                received += chunk
            connection.sendall(b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0")

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@pytest.fixture
def silent_server() -> Iterator[SilentStompServer]:
    server = SilentStompServer()
    yield server
    server.close()


def test_an_unconfirmed_send_times_out(silent_server: SilentStompServer) -> None:
    settings = BrokerSettings(receipt_timeout_s=0.5, heartbeat_ms=0, reconnect_attempts=1)
    transport = open_transport(f"stomp://127.0.0.1:{silent_server.port}", settings)
    transport.connect()
    try:
        started = time.monotonic()
        with pytest.raises(ConfirmationTimeoutError, match=r"did not confirm within 0\.5 s"):
            transport.send("/queue/eitest.silent", b"x")
        assert time.monotonic() - started < 5
    finally:
        transport.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_stomp_ssl_connects_over_tls_checking_the_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "broker.pem", tmp_path / "broker.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = SilentStompServer(tls=context)
    url = f"stomp+ssl://127.0.0.1:{server.port}"
    try:
        trusted = BrokerSettings(ssl_ca_file=str(cert), heartbeat_ms=0, receipt_timeout_s=1)
        transport = open_transport(url, trusted)
        transport.connect()
        assert transport.connected
        transport.close()
        untrusted = trusted.model_copy(update={"ssl_ca_file": "", "reconnect_attempts": 1})
        with pytest.raises(TransportError):
            open_transport(url, untrusted).connect()
    finally:
        server.close()


def test_no_broker_at_all_is_a_clear_error() -> None:
    settings = BrokerSettings(reconnect_attempts=1, reconnect_delay_s=0.1)
    port = free_port()
    transport = open_transport(f"stomp://127.0.0.1:{port}", settings)
    with pytest.raises(TransportError, match=f"cannot connect to stomp://127.0.0.1:{port}"):
        transport.connect()
    assert not transport.connected


@pytest.mark.integration
def test_failover_skips_a_dead_broker(activemq_url: str) -> None:
    url = f"stomp://127.0.0.1:{free_port()},127.0.0.1:{stomp_port(activemq_url)}"
    settings = client_settings(url).model_copy(update={"reconnect_attempts": 2})
    with open_transport(url, settings) as transport:
        assert isinstance(transport, StompTransport)
        queue_name = f"/queue/eitest.{uuid.uuid4().hex[:12]}"
        transport.subscribe(queue_name)
        transport.send(queue_name, b"through the second broker")
        message = transport.receive(timeout=10)
        assert message is not None and message.body == b"through the second broker"
        transport.ack(message)


@pytest.mark.integration
def test_heart_beats_flow_while_the_caller_is_busy(activemq_url: str) -> None:
    """Holding a message longer than several heart-beat periods keeps the connection."""
    settings = client_settings(activemq_url).model_copy(update={"heartbeat_ms": 500})
    queue_name = f"/queue/eitest.{uuid.uuid4().hex[:12]}"
    with open_transport(activemq_url, settings) as consumer:
        consumer.subscribe(queue_name)
        consumer.send(queue_name, b"slow work")
        message = consumer.receive(timeout=10)
        assert message is not None
        time.sleep(4)  # busy: no call into the transport at all
        assert consumer.connected
        consumer.ack(message)
        assert isinstance(consumer, StompTransport)
        assert message.ack_id.startswith(f"{consumer._generation}:"), "it reconnected"
    with open_transport(activemq_url, settings) as other:
        other.subscribe(queue_name)
        assert other.receive(timeout=1.0) is None, "the ack was lost"


def _produce(
    transport: Transport, queue_name: str, count: int, errors: list[BaseException]
) -> None:
    try:
        for sequence in range(count):
            transport.send(queue_name, b"x" * 1000, {SEQUENCE: str(sequence)})
            time.sleep(0.01)
    except BaseException as exc:  # reported by the test thread
        errors.append(exc)


@pytest.mark.integration
@pytest.mark.slow
def test_traffic_survives_a_broker_restart(activemq: RunningBroker) -> None:
    queue_name = f"/queue/eitest.{uuid.uuid4().hex[:12]}"
    count = 600
    settings = client_settings(activemq.url)
    producer = open_transport(activemq.url, settings)
    consumer = open_transport(activemq.url, settings)
    producer.connect()
    consumer.connect()
    errors: list[BaseException] = []
    try:
        consumer.subscribe(queue_name, prefetch=20)
        sender = threading.Thread(target=_produce, args=(producer, queue_name, count, errors))
        sender.start()
        acknowledged: set[int] = set()
        restarted = False
        redelivered = 0
        deadline = time.monotonic() + 180
        while len(acknowledged) < count and time.monotonic() < deadline:
            if not restarted and len(acknowledged) >= count // 4:
                activemq.restart()
                restarted = True
            message = consumer.receive(timeout=1.0)
            if message is None:
                continue
            redelivered += message.redelivered
            acknowledged.add(int(message.headers[SEQUENCE]))
            consumer.ack(message)
        sender.join(timeout=120)
        assert not errors, errors
        assert restarted
        assert acknowledged == set(range(count)), (
            f"lost: {sorted(set(range(count)) - acknowledged)[:20]}"
        )
        assert producer.connected and consumer.connected
    finally:
        producer.close()
        consumer.close()


def test_an_unconfirmed_transaction_fails_its_confirmation(
    silent_server: SilentStompServer,
) -> None:
    settings = BrokerSettings(receipt_timeout_s=0.5, heartbeat_ms=0, reconnect_attempts=1)
    transport = open_transport(f"stomp://127.0.0.1:{silent_server.port}", settings)
    transport.connect()
    try:
        confirmation = transport.send_transaction("/queue/eitest.silent", [(b"x", {})])
        with pytest.raises(ConfirmationTimeoutError):
            confirmation.wait()
        with pytest.raises(ConfirmationTimeoutError):
            confirmation.wait()  # the outcome stays
    finally:
        transport.close()


class RefusingStompServer(SilentStompServer):
    """Answers CONNECT, then meets the first COMMIT with an ERROR that names no receipt,
    as ActiveMQ does when a SEND inside the transaction failed."""

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
        except OSError:
            return
        self.connections.append(connection)
        received = b""
        while b"\0" not in received:
            received += connection.recv(4096)
        connection.sendall(b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\0")
        while b"COMMIT" not in received:
            chunk = connection.recv(65536)
            if not chunk:
                return
            received += chunk
        connection.sendall(b"ERROR\nmessage:send refused\n\n\0")


def test_an_error_naming_no_receipt_fails_the_open_transaction() -> None:
    server = RefusingStompServer()
    settings = BrokerSettings(receipt_timeout_s=5, heartbeat_ms=0, reconnect_attempts=1)
    transport = open_transport(f"stomp://127.0.0.1:{server.port}", settings)
    transport.connect()
    try:
        confirmation = transport.send_transaction("/queue/eitest.refused", [(b"x" * 5000, {})])
        started = time.monotonic()
        with pytest.raises(TransportError, match="send refused") as failure:
            confirmation.wait()
        assert not isinstance(failure.value, ConfirmationTimeoutError)
        assert time.monotonic() - started < 4
    finally:
        transport.close()
        server.close()
