"""Where a product's calibration lies on disk, read side only (writing versions is calibration/store.py).

    calibration/<product>/
        current                 the active version number, replaced atomically (one rename)
        versions/<N>/           manifest.json, threshold.json, memory_bank.npy, references/
        good/<sha>.png          the good images the versions were fitted on
        knowledge.yaml          written by people; shared by every version
        feedback.jsonl          the operator feedback ledger (feedback/ledger.py)
        defects/                frames operators confirmed as defects (feedback/)

A product calibrated before versioning keeps manifest.json directly in calibration/<product>/.

Why apart from the writer: the scorer loads a product and must not import the calibration code that
writes one (a daemon that only scores carries no fitting code).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import CalibrationError, UserError

CURRENT_FILE = "current"
VERSIONS_DIR = "versions"
GOOD_DIR = "good"
MANIFEST_FILE = "manifest.json"
THRESHOLD_FILE = "threshold.json"
BANK_FILE = "memory_bank.npy"
REFERENCES_DIR = "references"
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")


def product_dir(calibration_dir: str | Path, product: str) -> Path:
    return Path(calibration_dir) / product


def version_dir(calibration_dir: str | Path, product: str, number: int) -> Path:
    return product_dir(calibration_dir, product) / VERSIONS_DIR / str(number)


def is_version_name(name: str) -> bool:
    return bool(_VERSION_RE.match(name))


def current_version(calibration_dir: str | Path, product: str) -> int | None:
    """The active version, or None for a product calibrated before versioning (or not at all)."""
    path = product_dir(calibration_dir, product) / CURRENT_FILE
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CalibrationError(f"{path} cannot be read ({exc})") from None
    if not is_version_name(text):
        raise CalibrationError(
            f"{path} is damaged ({text[:40]!r} is not a version number): write the number of a folder in "
            f"{path.parent / VERSIONS_DIR} into it, or recalibrate with --force"
        )
    return int(text)


def active_directory(calibration_dir: str | Path, product: str) -> Path | None:
    """The folder load_product reads: versions/<current>, the legacy flat folder, or None (not calibrated)."""
    pdir = product_dir(calibration_dir, product)
    number = current_version(calibration_dir, product)
    if number is not None:
        return pdir / VERSIONS_DIR / str(number)
    return pdir if (pdir / MANIFEST_FILE).is_file() else None


def calibrated_products(calibration_dir: str | Path) -> list[str]:
    root = Path(calibration_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / CURRENT_FILE).is_file() or (p / MANIFEST_FILE).is_file())


def version_numbers(calibration_dir: str | Path, product: str) -> list[int]:
    vdir = product_dir(calibration_dir, product) / VERSIONS_DIR
    if not vdir.is_dir():
        return []
    return sorted(int(p.name) for p in vdir.iterdir() if is_version_name(p.name) and (p / MANIFEST_FILE).is_file())


def read_manifest(calibration_dir: str | Path, product: str, number: int) -> dict[str, Any]:
    """One version's manifest as written (history and diffs show what is on disk; load_product migrates)."""
    path = version_dir(calibration_dir, product, number) / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        known = version_numbers(calibration_dir, product)
        raise UserError(f"product {product!r} has no calibration version {number} (kept versions: "
                        f"{', '.join(map(str, known)) or 'none'})") from None
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path} is damaged ({exc})") from None
    if not isinstance(data, dict):
        raise CalibrationError(f"{path} is damaged (not a JSON object)")
    return data
