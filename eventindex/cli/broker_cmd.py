"""``eventindex broker start|stop|status``: run Debian's ActiveMQ with the project's configuration.

The broker lives in ``broker.data_dir``: ``conf/`` (a copy of conf/activemq),
``data/`` (KahaDB and activemq.log), ``activemq.pid`` and ``activemq.out`` (the
JVM's own output). Ports, limits and redelivery come from the [broker] settings as
Java system properties, so the same conf files serve every instance.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from contextlib import closing
from pathlib import Path
from typing import Annotated
from xml.sax.saxutils import escape

import typer

from eventindex.cli.context import EXIT_NOT_FOUND, state, stdout
from eventindex.config import BrokerSettings
from eventindex.errors import EventIndexError

CONF_SOURCE = Path(__file__).resolve().parents[2] / "conf" / "activemq"
CONF_FILES = ("activemq.xml", "log4j.properties")
PLACEHOLDER = re.compile(r"\$\{eventindex\.([A-Za-z]+)\}")
STOP_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 3.0
POLL_S = 0.25


class BrokerError(EventIndexError):
    """The broker did not start, or did not stop."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (for brokers of tests and benchmarks)."""
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def stomp_answers(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a STOMP server on ``host:port`` completes a CONNECT handshake."""
    frame = f"CONNECT\naccept-version:1.2\nhost:{host}\nheart-beat:0,0\n\n\0".encode()
    try:
        with closing(socket.create_connection((host, port), timeout=timeout)) as sock:
            sock.settimeout(timeout)
            sock.sendall(frame)
            reply = b""
            while b"\0" not in reply and len(reply) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                reply += chunk
            if reply.lstrip(b"\r\n").startswith(b"CONNECTED"):
                sock.sendall(b"DISCONNECT\n\n\0")
                return True
            # An ERROR frame (bad credentials) still proves STOMP is there.
            return reply.lstrip(b"\r\n").startswith(b"ERROR")
    except OSError:
        return False


class ActiveMQProcess:
    """One ActiveMQ broker run in the background from ``settings.data_dir``."""

    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.base = Path(settings.data_dir).resolve()
        self.conf_dir = self.base / "conf"
        self.data = self.base / "data"
        self.pid_file = self.base / "activemq.pid"
        self.output = self.base / "activemq.out"
        self.home = Path(settings.activemq_home)
        self.jar = self.home / "bin" / "activemq.jar"

    @property
    def stomp_address(self) -> tuple[str, int]:
        return self.settings.listen_host, self.settings.stomp_port

    def running_pid(self) -> int | None:
        """The pid in the pid file if that process is alive (and is a JVM), else None."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return pid
        # The pid may be reused by another program after a reboot.
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return pid
        return pid if b"activemq" in command else None

    def conf_values(self) -> dict[str, str]:
        """The ``${eventindex.NAME}`` values of conf/activemq/activemq.xml, from the settings."""
        settings = self.settings
        values: dict[str, object] = {
            "host": settings.listen_host,
            "stompPort": settings.stomp_port,
            "stompSslPort": settings.stomp_ssl_port,
            "openwirePort": settings.openwire_port,
            "maxRedeliveries": settings.max_redeliveries,
            "redeliveryDelayMs": settings.redelivery_delay_ms,
            "memoryLimit": f"{settings.memory_limit_mb} mb",
            "destinationMemoryLimit": f"{max(settings.memory_limit_mb // 2, 1)} mb",
            "storeLimit": f"{settings.store_limit_mb} mb",
            "tempLimit": f"{settings.temp_limit_mb} mb",
            "journalSync": settings.journal_sync,
        }
        return {name: str(value) for name, value in values.items()}

    def install_conf(self) -> None:
        """Instantiate the project's broker configuration in the base folder.

        The ``${eventindex.*}`` placeholders are filled here rather than by Spring, so
        ActiveMQ still validates the file against its schema (which wants numbers in
        numeric attributes); ``${activemq.*}`` ones are left to ActiveMQ.
        """
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(parents=True, exist_ok=True)
        values = self.conf_values()

        def fill(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in values:
                raise BrokerError(f"{CONF_SOURCE}: unknown placeholder ${{eventindex.{name}}}")
            return escape(values[name], {'"': "&quot;"})

        for name in CONF_FILES:
            text = (CONF_SOURCE / name).read_text()
            (self.conf_dir / name).write_text(PLACEHOLDER.sub(fill, text))

    def command(self) -> list[str]:
        properties = {
            "activemq.base": self.base,
            "activemq.home": self.home,
            "activemq.conf": self.conf_dir,
            "activemq.data": self.data,
            "java.io.tmpdir": self.data / "tmp",
            "log4j.configuration": f"file:{self.conf_dir / 'log4j.properties'}",
        }
        return [
            shutil.which("java") or "java",
            f"-Xms{min(self.settings.heap_mb, 256)}m",
            f"-Xmx{self.settings.heap_mb}m",
            "-XX:+UseG1GC",
            *(f"-D{key}={value}" for key, value in properties.items()),
            "-jar",
            str(self.jar),
            "start",
            f"xbean:file:{self.conf_dir / 'activemq.xml'}",
        ]

    def start(self) -> int:
        """Start the broker and wait until STOMP answers; returns its pid."""
        settings = self.settings
        if not self.jar.exists():
            raise BrokerError(
                f"ActiveMQ is not installed: {self.jar} is missing "
                "(apt-get install activemq, or set broker.activemq_home)"
            )
        if shutil.which("java") is None:
            raise BrokerError("java is not on PATH: ActiveMQ 5.17 needs Java 17")
        running = self.running_pid()
        if running is not None:
            if stomp_answers(*self.stomp_address):
                return running
            raise BrokerError(
                f"a broker (pid {running}) runs from {self.base} but STOMP does not answer"
            )
        if stomp_answers(*self.stomp_address):
            raise BrokerError(
                f"port {settings.stomp_port} on {settings.listen_host} already answers STOMP: "
                "another broker runs there (set broker.stomp_port)"
            )
        self.install_conf()
        (self.data / "tmp").mkdir(exist_ok=True)
        with self.output.open("ab") as output:
            process = subprocess.Popen(
                self.command(),
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(f"{process.pid}\n")
        deadline = time.monotonic() + settings.start_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise BrokerError(
                    f"ActiveMQ exited with status {process.returncode} while starting; "
                    f"{self.output} says: {self._tail()}"
                )
            if stomp_answers(*self.stomp_address, timeout=1.0):
                return process.pid
            time.sleep(POLL_S)
        self.stop()
        raise BrokerError(
            f"STOMP did not answer on {settings.listen_host}:{settings.stomp_port} within "
            f"{settings.start_timeout_s:g} s; last lines of {self.output}:\n{self._tail()}"
        )

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> bool:
        """Stop the broker (SIGTERM, then SIGKILL after ``timeout``); False if none ran."""
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, timeout):
            os.kill(pid, signal.SIGKILL)
            if not _wait_gone(pid, 10.0):
                raise BrokerError(f"ActiveMQ (pid {pid}) survived SIGKILL")
        self.pid_file.unlink(missing_ok=True)
        return True

    def _tail(self) -> str:
        """Why ActiveMQ failed: the first error of its log (with the exception line that
        follows), else the error line of its output, else the output's last lines."""
        try:
            log_lines = (self.data / "activemq.log").read_text(errors="replace").splitlines()
        except FileNotFoundError:
            log_lines = []
        for index, line in enumerate(log_lines):
            if "| ERROR |" in line:
                return " ".join(log_lines[index : index + 2])
        try:
            lines = self.output.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return "(no output)"
        errors = [line for line in lines if line.startswith("ERROR:")]
        return errors[-1] if errors else "\n".join(lines[-5:]) or "(no output)"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child (start() in this process); else just probe.
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished == pid:
                return True
        except ChildProcessError:
            pass
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(POLL_S)
    return False


def _status_addresses(settings: BrokerSettings) -> list[tuple[str, int]]:
    """The brokers ``status`` probes: those of a stomp:// broker.url, else the local one."""
    from eventindex.transport import parse_broker_addresses

    if settings.url.startswith("stomp://"):
        return parse_broker_addresses(settings.url)
    return [(settings.listen_host, settings.stomp_port)]


app = typer.Typer(
    help="Run the ActiveMQ broker (Debian's activemq package) with conf/activemq.",
    no_args_is_help=True,
)


@app.command()
def start(
    ctx: typer.Context,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds to wait for STOMP (broker.start_timeout_s).")
    ] = None,
) -> None:
    """Start the broker in the background and wait until STOMP answers."""
    settings = state(ctx).settings.broker
    if timeout is not None:
        if timeout <= 0:
            raise typer.BadParameter("must be positive", param_hint="--timeout")
        settings = settings.model_copy(update={"start_timeout_s": timeout})
    process = ActiveMQProcess(settings)
    began = time.monotonic()
    pid = process.start()
    host, port = process.stomp_address
    stdout.print(
        f"ActiveMQ running (pid {pid}), STOMP on {host}:{port}, data in {process.base} "
        f"({time.monotonic() - began:.1f} s)"
    )


@app.command()
def stop(
    ctx: typer.Context,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for a clean stop before killing.")
    ] = STOP_TIMEOUT_S,
) -> None:
    """Stop the broker started from broker.data_dir (killing it if it does not stop)."""
    process = ActiveMQProcess(state(ctx).settings.broker)
    if process.stop(timeout):
        stdout.print(f"ActiveMQ stopped ({process.base})")
    else:
        stdout.print(f"no broker running from {process.base}")


@app.command()
def status(ctx: typer.Context) -> None:
    """Say whether STOMP answers (exit 0) or not (exit 1)."""
    settings = state(ctx).settings.broker
    addresses = _status_addresses(settings)
    pid = ActiveMQProcess(settings).running_pid()
    local = f" (local broker pid {pid})" if pid is not None else ""
    answering = [f"{host}:{port}" for host, port in addresses if stomp_answers(host, port)]
    if answering:
        stdout.print(f"STOMP answers on {', '.join(answering)}{local}")
        return
    where = ", ".join(f"{host}:{port}" for host, port in addresses)
    stdout.print(f"STOMP does not answer on {where}{local}")
    raise typer.Exit(EXIT_NOT_FOUND)
