"""The feedback ledger: calibration/<product>/feedback.jsonl, one JSON line per applied feedback.

Why a ledger: feedback must never be applied twice (a repeated MQTT message, an HMI that retries, the CLI
after the daemon). The inspection id is the key; the line is appended and fsynced before the result goes
out, so the answer "duplicate" survives restarts and power cuts. Lines that cannot be read (a write cut
off by a crash) are skipped, so one bad line never loses the rest. A refit whose ledger line was lost
in a crash is still found: its version's manifest names the inspection ids it was made from (apply.py).

Example:
    ledger = FeedbackLedger(calibration_dir, "bracket-a")
    ledger.find("5f0c...")         # None, or the entry it was applied with
    ledger.append({"inspection_id": "5f0c...", "verdict": "ok", "calibration_version": 4, ...})
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from ..files import fsync_dir
from ..scorer.layout import calibrated_products, product_dir

LEDGER_FILE = "feedback.jsonl"
_APPEND_LOCK = threading.Lock()  # one process's threads; other processes hold versions.product_lock


def append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line in one write, then fsync it (and the folder, when the file is new)."""
    data = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with _APPEND_LOCK:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    if new:
        fsync_dir(path.parent)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every readable JSON object line of a file (none when it does not exist)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


class FeedbackLedger:
    """The applied feedback of one product (see the module docstring). Writers hold versions.product_lock."""

    def __init__(self, calibration_dir: str | Path, product: str):
        self.product = product
        self.path = product_dir(calibration_dir, product) / LEDGER_FILE

    def entries(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)

    def find(self, inspection_id: str) -> dict[str, Any] | None:
        """The entry an inspection's feedback was applied with (the first one: later ones cannot exist)."""
        for entry in self.entries():
            if entry.get("inspection_id") == inspection_id:
                return entry
        return None

    def append(self, entry: dict[str, Any]) -> None:
        append_jsonl(self.path, entry)


def find_applied(calibration_dir: str | Path, inspection_id: str) -> dict[str, Any] | None:
    """An inspection's ledger entry in any product's ledger (the evidence may be gone by the time a repeat
    arrives, so the product is not known yet)."""
    for product in calibrated_products(calibration_dir):
        entry = FeedbackLedger(calibration_dir, product).find(inspection_id)
        if entry is not None:
            return entry
    return None
