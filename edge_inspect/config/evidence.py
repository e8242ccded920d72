"""Config of the evidence store: which frames are kept on disk, where, and for how long."""

from __future__ import annotations

from pydantic import Field

from .base import Section


class EvidenceConfig(Section):
    """Flagged frames kept on disk so a person can see what the scorer saw. Every NG inspection is
    saved as `<dir>/<YYYYMMDD>/<inspection_id>` .jpg, .overlay.jpg, .map.png and .json; the result's
    `evidence_path` names the frame relative to `dir`. Writing never holds up inspection: a full
    queue, a full disk or a write error is counted in the stats and logged. Changes take effect at
    the next restart (SIGHUP keeps the running store)."""

    enabled: bool = Field(
        True,
        title="Keep evidence",
        description="Save flagged frames (frame, heatmap overlay, anomaly map, result JSON) to disk.",
    )
    dir: str = Field(
        "evidence",
        min_length=1,
        title="Evidence folder",
        description="Root folder; files go to <dir>/<YYYYMMDD>/<inspection_id>.* (UTC date of the frame). "
        "A relative path is relative to the daemon's working directory (under systemd: /var/lib/edge-inspect/evidence).",
    )
    max_count: int = Field(
        20000, ge=0, le=10_000_000,
        description="Keep at most this many inspections; the oldest are deleted first. 0 = no count limit.",
    )
    max_mb: float = Field(
        2048.0, ge=0, le=10_000_000,
        description="Keep at most this many megabytes of evidence; the oldest are deleted first. 0 = no size limit.",
    )
    max_age_days: float = Field(
        30.0, ge=0, le=36500,
        description="Delete evidence older than this many days. 0 = keep regardless of age.",
    )
    min_free_mb: float = Field(
        500.0, ge=0,
        description="Skip saving (log and count) while the disk holding dir has less free space than this, "
        "so evidence never fills the disk the spool and the system need.",
    )
    jpeg_quality: int = Field(90, ge=30, le=100, description="JPEG quality of saved frames and overlays.")
    save_ok_sample_every: int = Field(
        0, ge=0, le=1_000_000,
        description="Also save every Nth OK frame (for audits and threshold reviews). 0 = never save OK frames.",
    )
    queue_size: int = Field(
        32, ge=1, le=4096,
        description="Frames waiting for the background writer; when full, new evidence is dropped (counted) "
        "rather than stalling the pipeline.",
    )
