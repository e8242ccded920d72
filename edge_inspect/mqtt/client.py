"""The one paho client factory (paho 2, callback API 2) and the connection helpers around it.

The publisher, `listen`, `doctor` and the demo build their clients here, so protocol, session,
credentials and TLS are set up the same way everywhere. The client knows nothing of what a
message means: routing commands is `mqtt.dispatch`.

Example:
    client = make_client(config.mqtt, client_id="line1-listen", password=config.mqtt.resolve_password()[0],
                         tls=tls_context(config.mqtt) if config.mqtt.tls.enabled else None)
    client.connect_async(config.mqtt.host, config.mqtt.broker_port, config.mqtt.keepalive_s)
"""

from __future__ import annotations

import logging
import socket
import ssl
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from ..config.mqtt import MqttConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)


def new_client(protocol: str = "5", client_id: str = "", clean: bool = True) -> paho.Client:
    """A bare paho client speaking MQTT `protocol` ("5" or "3.1.1"); `clean` = no persistent session
    (MQTT 3.1.1; with MQTT 5 the session is chosen at connect time with clean_start)."""
    v5 = protocol == "5"
    return paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        clean_session=None if v5 else clean,
    )


def make_client(config: MqttConfig, client_id: str = "", *, password: str | None = None,
                tls: ssl.SSLContext | None = None, clean: bool = True) -> paho.Client:
    """A paho client for the broker in `config`: protocol, credentials (mqtt.username + `password`) and TLS."""
    client = new_client(config.protocol, client_id, clean)
    if config.username:
        client.username_pw_set(config.username, password)
    if tls is not None:
        client.tls_set_context(tls)
        if not config.tls.verify:
            client.tls_insecure_set(True)
    return client


def tls_context(config: MqttConfig) -> ssl.SSLContext:
    """Build the TLS context up front so a missing or broken file is a config error, not a retry loop."""
    tls = config.tls
    for key in ("ca_file", "cert_file", "key_file"):
        value = getattr(tls, key)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"mqtt.tls.{key}: {value!r} does not exist or is not a file")
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file)
        if tls.cert_file and tls.key_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(f"mqtt.tls: cannot load the certificates ({exc}); check ca_file/cert_file/key_file are PEM") from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def describe_connect_error(exc: BaseException | None, broker: str, config: MqttConfig) -> str:
    """A failed connection attempt in words, with the config key to fix (the daemon's log and `doctor`).

    Example: describe_connect_error(ConnectionRefusedError(), "localhost:1883", config.mqtt)
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"TLS certificate check of {broker} failed ({getattr(exc, 'verify_message', None) or exc}); set mqtt.tls.ca_file to the CA "
                f"that signed the broker's certificate and make mqtt.host match a name in it")
    if isinstance(exc, ssl.SSLError):
        return (f"TLS handshake with {broker} failed ({exc.reason or exc}); check the port is the broker's TLS "
                f"listener and mqtt.tls.cert_file/key_file if it requires a client certificate")
    if isinstance(exc, ConnectionRefusedError):
        return f"connection to {broker} refused; is the broker running and listening on that port?"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve mqtt.host {config.host!r} ({exc.strerror})"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"connecting to {broker} timed out; check mqtt.host/port and the network"
    if exc is not None and config.tls.enabled and isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return f"{broker} closed the TLS connection ({exc}); it may require a client certificate (mqtt.tls.cert_file)"
    return f"cannot connect to {broker} ({exc or 'unknown error'})"
