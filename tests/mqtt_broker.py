"""A real mosquitto broker for tests and benchmarks, on a free loopback port, in its own folder.

Example:
    with MosquittoBroker(persistence_dir=tmp_path / "broker") as broker:
        client.connect("127.0.0.1", broker.port)
        broker.stop()     # SIGTERM: mosquitto saves its persistence file (sessions, queued messages)
        broker.start()    # same port, same persistence
        broker.kill()     # SIGKILL: nothing saved since the last autosave
        broker.pause()    # SIGSTOP: sockets stay open, no PUBACKs; resume() continues

Also: make_password_file(), make_tls_files() (openssl) and MessageCollector (a paho subscriber
that records everything it receives, optionally with a persistent session).
"""

from __future__ import annotations

import getpass
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import uuid
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MOSQUITTO_SEARCH = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
MISSING_REASON = "mosquitto broker binary not found (apt-get install mosquitto mosquitto-clients)"


def mosquitto_binary() -> str | None:
    for candidate in MOSQUITTO_SEARCH:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class BrokerTls:
    """PEM files for a TLS listener. require_certificate: clients must present a cert signed by cafile."""

    cafile: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False


class MosquittoBroker:
    """One mosquitto process. Restartable on the same port; persistence optional."""

    def __init__(
        self,
        port: int | None = None,
        persistence_dir: str | Path | None = None,
        password_file: str | Path | None = None,
        tls: BrokerTls | None = None,
    ):
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError(MISSING_REASON)
        self.binary = binary
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self.persistence_dir = Path(persistence_dir) if persistence_dir else None
        self.password_file = Path(password_file) if password_file else None
        self.tls = tls
        self._workdir = Path(tempfile.mkdtemp(prefix="mosquitto-"))
        self.log_path = self._workdir / "mosquitto.log"
        self.config_path = self._workdir / "mosquitto.conf"
        self._process: subprocess.Popen | None = None

    def _config(self) -> str:
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'false' if self.password_file else 'true'}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "max_queued_messages 100000",
            f"user {getpass.getuser()}",  # mosquitto run as root would otherwise switch to user 'mosquitto'
        ]
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.persistence_dir:
            self.persistence_dir.mkdir(parents=True, exist_ok=True)
            lines += [
                "persistence true",
                f"persistence_location {self.persistence_dir}/",
                "autosave_interval 60",
            ]
        if self.tls:
            lines += [
                f"cafile {self.tls.cafile}",
                f"certfile {self.tls.certfile}",
                f"keyfile {self.tls.keyfile}",
                f"require_certificate {'true' if self.tls.require_certificate else 'false'}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        if self.running:
            return self
        self.config_path.write_text(self._config())
        self._process = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                err = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}: {err}\n{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"mosquitto did not listen on {self.port} within {timeout} s\n{self.log_text()}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM): with persistence, sessions and queued messages are saved."""
        self._end(signal.SIGTERM, timeout)

    def kill(self) -> None:
        """Crash the broker (SIGKILL): no persistence save, clients see the socket close."""
        self._end(signal.SIGKILL, 10.0)

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open, nothing is answered (no PUBACKs)."""
        if self._process is not None:
            self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGCONT)

    def _end(self, sig: int, timeout: float) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        process.send_signal(signal.SIGCONT)  # a paused broker must wake up to handle SIGTERM
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stderr:
            process.stderr.close()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_password_file(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file (hashed by mosquitto_passwd)."""
    path.write_text("".join(f"{user}:{password}\n" for user, password in users.items()))
    path.chmod(0o600)
    subprocess.run(["mosquitto_passwd", "-U", str(path)], check=True, capture_output=True)
    return path


def make_tls_files(folder: Path, hostname: str = "localhost") -> dict[str, Path]:
    """A CA, a broker certificate for `hostname`/127.0.0.1, a client certificate and an unrelated CA.

    Returns paths: ca, server_cert, server_key, client_cert, client_key, other_ca.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=folder)

    def make_ca(name: str) -> None:
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                "-keyout", f"{name}.key", "-out", f"{name}.pem")

    def make_leaf(name: str, ca: str, extensions: str) -> None:
        (folder / f"{name}.ext").write_text(extensions)
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")

    make_ca("test-ca")
    make_ca("other-ca")
    make_leaf("server", "test-ca", f"subjectAltName=DNS:{hostname},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    make_leaf("client", "test-ca", "extendedKeyUsage=clientAuth\n")
    return {
        "ca": folder / "test-ca.pem",
        "server_cert": folder / "server.pem",
        "server_key": folder / "server.key",
        "client_cert": folder / "client.pem",
        "client_key": folder / "client.key",
        "other_ca": folder / "other-ca.pem",
    }


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.perf_counter() on arrival

    def json(self) -> Any:
        return json.loads(self.payload)


class MessageCollector:
    """A paho subscriber that records every message. persistent=True keeps its session across disconnects
    (MQTT 5 clean_start=False with a session expiry, or 3.1.1 clean_session=False)."""

    BARRIER_TOPIC = "edge-inspect-tests/barrier"

    def __init__(self, port: int, topics: list[str], client_id: str | None = None, persistent: bool = False,
                 protocol: str = "5", host: str = "127.0.0.1"):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.messages: list[Received] = []
        self.topics = topics
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._markers: dict[bytes, threading.Event] = {}
        self.connects = 0
        v5 = protocol == "5"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"collector-{os.getpid()}-{time.monotonic_ns()}",
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not persistent,
        )
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        connect_kwargs: dict[str, Any] = {}
        if v5:
            connect_kwargs["clean_start"] = not persistent
            if persistent:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = 3600
                connect_kwargs["properties"] = properties
        self.client.connect_async(host, port, 30, **connect_kwargs)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            return
        self.connects += 1
        client.subscribe([(topic, 1) for topic in [*self.topics, self.BARRIER_TOPIC]])

    def _on_message(self, client, userdata, message) -> None:
        if message.topic == self.BARRIER_TOPIC:
            with self._lock:
                marker = self._markers.get(bytes(message.payload))
            if marker is not None:
                marker.set()
            return
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain), time.perf_counter()))

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        if not self._subscribed.wait(timeout):
            raise TimeoutError("the collector did not get its SUBACK")

    def barrier(self, timeout: float = 30.0) -> None:
        """Return once every message the broker took in before this call has reached this collector.

        A marker published now by this collector is delivered to it after everything the broker queued
        for it before (the broker handles messages one at a time, in order). So "nothing more arrives"
        is checked as: what must have been sent was acknowledged, then barrier(), then count, instead
        of sleeping and hoping."""
        marker = uuid.uuid4().hex.encode()
        arrived = threading.Event()
        with self._lock:
            self._markers[marker] = arrived
        self.client.publish(self.BARRIER_TOPIC, marker, qos=1)
        if not arrived.wait(timeout):
            raise TimeoutError("the barrier marker did not come back from the broker")

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        """wait_until(predicate(messages so far)): the suite's one wait (conftest)."""
        from conftest import wait_until

        def check() -> bool:
            with self._lock:
                return bool(predicate(list(self.messages)))

        return wait_until(check, timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> "MessageCollector":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
