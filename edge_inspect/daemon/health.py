"""Daemon health: stats, the STATUS= line, hung-thread detection for the systemd watchdog, memory.

`HealthMixin` is part of `Daemon` (daemon.py); it reads the daemon's pipelines, flagged queue,
evidence store, VLM stage and publisher.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from ..capture.reader import CaptureState

log = logging.getLogger(__name__)


class HealthMixin:
    """Stats, status and watchdog checks of the Daemon."""

    def _hung(self, now: float, limit: float) -> list[str]:
        with self._pipelines_lock:
            hung = [name for p in self.pipelines.values() for name in p.hung_threads(now, limit)]
        if self.flagged is not None and self.flagged.hung(now, limit):
            hung.append("flagged-sink")
        if self.publisher is not None:
            hung.extend(self.publisher.hung_threads())  # a dead sender, or a network thread given up on
        return hung

    def stats(self) -> dict[str, Any]:
        with self._pipelines_lock:
            cameras = {name: p.snapshot() for name, p in self.pipelines.items()}
        stats: dict[str, Any] = {
            "uptime_s": round(time.monotonic() - self._started_at, 1),
            "rss_mb": rss_mb(),
            "cameras": cameras,
            **self.counters.snapshot(),
        }
        if self.flagged is not None:
            stats["flagged_queue"] = {"depth": self.flagged.depth(), "capacity": self.flagged.capacity,
                                      **self.flagged.counters.snapshot()}
        if self.evidence is not None:
            stats["evidence"] = {"enabled": self.evidence.config.enabled, **self.evidence.stats()}
        if self.vlm_stage is not None:
            stats["vlm"] = self.vlm_stage.state()
        feedback = getattr(self, "feedback", None)
        if feedback is not None:
            stats["feedback"] = feedback.state()  # operator feedback: received, applied, duplicates, errors
        drift = getattr(self, "drift", None)
        if drift is not None:
            stats["drift"] = drift.snapshot()  # per product: the OK-score window against the calibration
        stream = getattr(self, "stream", None)
        if stream is not None:
            stats["stream"] = stream.snapshot()  # per product: candidates, refits, the last outcome
        return stats

    def _publish_stats(self) -> None:
        if self.publisher is None:
            return
        try:
            self.publisher.publish_stats(self.stats())
        except Exception:  # noqa: BLE001 - stats must never take the daemon down
            log.exception("could not publish stats")

    def status_line(self) -> str:
        with self._pipelines_lock:
            pipelines = list(self.pipelines.values())
        parts = []
        for p in pipelines:
            snap = p.stats.snapshot()
            last = "-" if snap["last_score"] is None else f"{snap['last_score']:.3f} {snap['last_verdict']}"
            parts.append(
                f"{p.name}: {p.capture.state.value} {p.capture.frames_in.rate():.1f} fps in, "
                f"{snap['fps_out']:.1f} out, last {last}, product {p.product_name}"
            )
        broker = "-"
        if self.publisher is not None:
            state = self.publisher.state()
            broker = f"{'connected' if state.get('connected') else 'disconnected'}, spool {state.get('spool_depth', '?')}"
            if not state.get("spool_available", True):
                broker += " (spool unusable: publishing unspooled)"
            if state.get("network_restarts"):
                broker += f", network thread restarted {state['network_restarts']}x"
        line = "; ".join(parts) + f"; broker {broker}"
        drift = getattr(self, "drift", None)
        alarms = drift.alarms() if drift is not None else []
        if alarms:
            line += "; drift alarm: " + ", ".join(
                f"{product} (position {snap['position']:.2f})" if snap["reason"] == "position"
                else f"{product} (NG {snap['flag_rate']:.0%} of frames)" for product, snap in alarms)
        return line

    def _on_capture_state(self, camera: str, state: CaptureState, detail: str) -> None:
        if state in (CaptureState.RECONNECTING, CaptureState.STALLED):
            self.notifier.status(f"{camera}: {state.value} ({detail})")


def rss_mb() -> float:
    """Resident memory of this process in MiB (Linux /proc), 0 when unknown."""
    try:
        with open(f"/proc/{os.getpid()}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0
