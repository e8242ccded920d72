"""Command dispatch: a topic -> handler table, apart from the transport (Frigate's dispatcher shape).

The MQTT client only hands over (topic, payload, retained); a route parses the payload and calls its
handler. A new command is one handler and one row. Malformed payloads and handler errors are
counted and logged (repeats at most every 10 s with their count: `log_limit`), never raised into the
network thread. `TokenBucket` is the per-station rate limit
of the commands that start work (ask, feedback), checked in their handlers without blocking.

Example:
    commands = CommandDispatcher({topics.trigger: Route("trigger", parse_trigger, on_trigger, "triggers",
                                                        ignore_retained=True)}, counts)
    commands.dispatch(message.topic, message.payload, message.retain)
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..log_limit import LogLimiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    """One command topic: how to parse its payload and who handles the parsed command."""

    name: str  # for logs: "trigger", "product/set"
    parse: Callable[[bytes], Any]  # raises ValueError on a malformed payload
    handler: Callable[[Any], None] | None
    counter: str  # counts commands received on this route
    ignore_retained: bool = False  # a retained command is stale state, not a command


class CommandDispatcher:
    """Routes command messages by topic. `counts` is updated in place (malformed_commands,
    retained_triggers_ignored, command_errors and each route's counter)."""

    def __init__(self, routes: dict[str, Route], counts: dict[str, int]):
        self.routes = dict(routes)
        self.counts = counts
        self.log = LogLimiter(log)  # a burst of bad commands gives a line per 10 s per kind, with the count

    @property
    def topics(self) -> list[str]:
        return list(self.routes)

    def dispatch(self, topic: str, payload: bytes, retained: bool = False) -> None:
        route = self.routes.get(topic)
        if route is None:
            return
        if retained and route.ignore_retained:
            self.counts["retained_triggers_ignored"] += 1
            self.log.log(logging.WARNING, f"retained {route.name}", "ignored a retained %s on %s (clear it: "
                         "mosquitto_pub -r -n -t '%s')", route.name, topic, topic)
            return
        try:
            command = route.parse(payload)
        except (ValueError, RecursionError, MemoryError) as exc:
            self.counts["malformed_commands"] += 1
            self.log.log(logging.WARNING, f"malformed {route.name}", "ignored malformed %s command: %s (payload %r)",
                         route.name, exc, payload[:80])
            return
        except Exception:  # noqa: BLE001 - a parser bug must not escape into paho's network thread
            self.counts["command_errors"] += 1
            self.log.log(logging.ERROR, f"parser {route.name}", "parsing a %s command failed (payload %r)",
                         route.name, payload[:80], exc_info=True)
            return
        self.counts[route.counter] += 1
        if route.handler is None:
            log.info("received %s %r but nothing handles it", route.name, command)
            return
        try:
            route.handler(command)
        except Exception:  # noqa: BLE001 - a handler bug must not take the MQTT session down
            self.counts["command_errors"] += 1
            self.log.log(logging.ERROR, f"handler {route.name}", "the %s handler failed on %r", route.name, command,
                         exc_info=True)


class TokenBucket:
    """`rate_per_s` tokens per second up to `burst`; `take()` is False when none is left. The per-station
    rate limit of commands that start work (ask, feedback), checked on paho's thread without blocking."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self._clock = rate_per_s, float(burst), clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
            self._at = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True
