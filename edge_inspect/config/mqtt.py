"""Config of the publish stage: the broker connection (`mqtt:`) and the on-disk result spool (`spool:`).

Secrets never live in the YAML file: the password is read from a systemd credential
(`$CREDENTIALS_DIRECTORY/<password_credential>`, e.g. `LoadCredential=mqtt-password:/etc/...`)
or, failing that, from the environment variable named by `password_env`.

Example:
    mqtt:
      host: broker.plant.local
      username: line3
      tls: {enabled: true, ca_file: /etc/edge-inspect/ca.pem}
    spool:
      path: /var/lib/edge-inspect/spool.sqlite3
"""

from __future__ import annotations

import os
import re
import socket
import string
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Section

# Characters MQTT gives a meaning to in topic filters, plus NUL; never allowed in our topic parts.
_TOPIC_FORBIDDEN = re.compile(r"[+#\x00]")

# The names mqtt.client_id may contain, as {name}; nothing else (no index, attribute, conversion or format spec).
CLIENT_ID_FIELDS = ("station", "hostname")


def check_client_id_template(value: str) -> str:
    """Refuse anything str.format would fail on or could abuse; only {station} and {hostname} are filled in."""
    fix = f"use only {', '.join('{' + f + '}' for f in CLIENT_ID_FIELDS)} and write a literal brace as {{{{ or }}}}"
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ValueError(f"client_id {value!r} is not a valid template ({exc}); {fix}") from None
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if field not in CLIENT_ID_FIELDS or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(f"client_id {value!r}: {shown} is not a placeholder edge-inspect fills in; {fix}")
    return value


class TlsConfig(Section):
    """TLS to the broker. Verification is on unless you turn it off on purpose."""

    enabled: bool = Field(False, description="Connect with TLS (the broker's TLS listener, usually port 8883).")
    ca_file: str | None = Field(
        None, description="PEM file with the CA(s) that signed the broker's certificate; null = the system trust store."
    )
    cert_file: str | None = Field(None, description="PEM client certificate for brokers that require one (mutual TLS).")
    key_file: str | None = Field(None, description="PEM private key of cert_file (unencrypted).")
    verify: bool = Field(
        True,
        description="Check the broker's certificate chain and host name. false accepts any certificate "
        "(only for a first test; anyone on the network can then read and forge results).",
    )

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> "TlsConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file go together: set both (mutual TLS) or neither")
        return self


class MqttConfig(Section):
    """Broker connection, topics and QoS. Topics are `<topic_prefix>/<station>/...` (docs/mqtt.md)."""

    host: str = Field("localhost", min_length=1, description="Broker host name or IP address.")
    port: int | None = Field(
        None, ge=1, le=65535, description="Broker port; null = 1883, or 8883 when tls.enabled."
    )
    protocol: Literal["5", "3.1.1"] = Field(
        "5", description="MQTT protocol version: 5 (default) or 3.1.1 for older brokers."
    )
    topic_prefix: str = Field(
        "edge-inspect",
        min_length=1,
        max_length=128,
        description="First topic level(s); every topic is <topic_prefix>/<station>/... (may contain '/', "
        "no wildcards, no leading or trailing '/').",
    )
    client_id: str = Field(
        "edge-inspect-{station}",
        min_length=1,
        max_length=128,
        description="MQTT client id; {station} and {hostname} are filled in (no other placeholder; a literal "
        "brace is written {{ or }}). Must be unique per station: a second client with the same id disconnects the first.",
    )
    keepalive_s: int = Field(
        30, ge=5, le=3600,
        description="Keep-alive interval; the broker publishes the last will ('offline') after 1.5x this without traffic.",
    )
    username: str | None = Field(None, min_length=1, description="Broker user name; null = anonymous.")
    password_env: str = Field(
        "EDGE_INSPECT_MQTT_PASSWORD",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Environment variable holding the password (used when no systemd credential is found).",
    )
    password_credential: str = Field(
        "mqtt-password",
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="systemd credential name holding the password ($CREDENTIALS_DIRECTORY/<name>, "
        "from LoadCredential= or SetCredentialEncrypted=); tried before password_env.",
    )
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS settings (CA, client certificate, verification).")
    reconnect_min_s: float = Field(0.5, ge=0.1, le=60, description="First reconnect delay after losing the broker.")
    reconnect_max_s: float = Field(
        2.0, ge=0.5, le=600,
        description="Longest reconnect delay; delays double from reconnect_min_s up to this. The default keeps results "
        "flowing within about 2 s of the broker's return; raise it only for many daemons on one broker."
    )
    max_inflight: int = Field(
        20, ge=1, le=1000,
        description="Results/updates sent but not yet acknowledged (PUBACK). Bounds the duplicates a subscriber "
        "can see after a broker or daemon crash; capped by the broker's Receive Maximum.",
    )
    publish_images: bool = Field(False, description="Publish the JPEG of flagged frames on <prefix>/<station>/image/<inspection_id>.")
    image_max_bytes: int = Field(
        262_144, ge=1024, le=16 * 1024 * 1024, description="Larger JPEGs are not published (counted as images_skipped)."
    )
    stats_interval_s: float = Field(10.0, ge=1, le=3600, description="How often the daemon publishes <prefix>/<station>/stats.")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: object) -> object:
        # YAML reads `protocol: 5` as an integer.
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("client_id")
    @classmethod
    def _valid_client_id(cls, value: str) -> str:
        return check_client_id_template(value)

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        if _TOPIC_FORBIDDEN.search(value):
            raise ValueError(f"topic_prefix {value!r} contains '+', '#' or NUL; use plain topic levels such as 'factory/line3'")
        if value.startswith("/") or value.endswith("/") or "//" in value:
            raise ValueError(f"topic_prefix {value!r} has an empty level; remove the leading/trailing or doubled '/'")
        return value

    @model_validator(mode="after")
    def _delays_ordered(self) -> "MqttConfig":
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) is below reconnect_min_s ({self.reconnect_min_s}); raise it"
            )
        return self

    @property
    def broker_port(self) -> int:
        return self.port if self.port is not None else (8883 if self.tls.enabled else 1883)

    def resolved_client_id(self, station: str, hostname: str | None = None) -> str:
        return self.client_id.format(station=station, hostname=hostname or socket.gethostname())

    def resolve_password(self) -> tuple[str | None, str]:
        """The password and where it came from ("credential <path>", "env <NAME>" or "none").

        A systemd credential wins over the environment: it is not inherited by child processes.
        """
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if directory:
            path = Path(directory) / self.password_credential
            if path.is_file():
                return path.read_text(encoding="utf-8").rstrip("\r\n"), f"credential {path}"
        value = os.environ.get(self.password_env)
        if value is not None:
            return value, f"env {self.password_env}"
        return None, "none"


class SpoolConfig(Section):
    """The SQLite spool every result passes through before it is published (docs/mqtt.md, 'Durability')."""

    path: str = Field(
        "spool/results.sqlite3",
        min_length=1,
        description="SQLite file (WAL mode); relative paths are relative to the working directory "
        "(systemd: StateDirectory). One daemon per file: a second one is refused.",
    )
    max_rows: int = Field(
        100_000, ge=100, le=10_000_000,
        description="Most messages kept while the broker is unreachable; beyond it the policy drops some.",
    )
    max_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024, le=64 * 1024**3,
        description="Most payload bytes kept; beyond it the policy drops some. On a smaller disk the spool keeps "
        "what fits there (its files and free space, less 5 % of the file system and room for its write-ahead log): "
        "doctor says how many results that is.",
    )
    policy: Literal["keep_ng", "drop_oldest"] = Field(
        "keep_ng",
        description="What goes when the spool is full. keep_ng: oldest OK results first, then oldest result "
        "updates, NG results last (a new OK result is dropped rather than an NG one). drop_oldest: the oldest "
        "message, whatever it is. Every drop is counted in stats and leaves a gap in the result seq.",
    )
    synchronous: Literal["normal", "full"] = Field(
        "normal",
        description="SQLite synchronous mode. normal: a spooled result survives a crash or kill of the daemon, "
        "but the last ones (since the last WAL sync) can be lost on power loss. full: fsync per result, "
        "survives power loss too, slower on SD cards/eMMC.",
    )
