"""Versioned calibrations: every change to a product's bank or threshold is a new, complete version.

    calibration/<product>/
        current                 the active version number, replaced atomically (one rename)
        versions/<N>/           manifest.json (its "version" block: parent, change, by, why), threshold.json,
                                memory_bank.npy, references/ - everything load_product reads
        good/<sha>.png          the good images the versions were fitted on (shots + frames operators accepted)
        knowledge.yaml          written by people; shared by every version
        feedback.jsonl          the operator feedback ledger (feedback/ledger.py)
        defects/                frames operators confirmed as defects (feedback/)

Why versions instead of overwriting: feedback and `threshold.adapt` change a running product without a
person at the box; each change must be explainable (who, why, what moved) and undoable bit for bit
(`edge-inspect calibration rollback`). A rollback is itself a new version whose files are copies of the
old one, so the history stays a line. Disk use is bounded: the last `keep` versions are kept, and good
images and scorer graphs no kept version names are deleted with them.

Products calibrated before versioning (manifest.json directly in calibration/<product>/) still load;
their first change needs a recalibration (they have no stored good images to refit on).

The read side (which version is active, where its files are) is scorer/layout.py; this module writes.

Example:
    with product_lock(cal_dir, "bracket-a"):
        n = commit_version(cal_dir, "bracket-a", writer, change={"change": "feedback_ok", "by": "op"})
    history(cal_dir, "bracket-a")[-1]["number"] == n
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import cv2
import numpy as np

from ..errors import CalibrationError, UserError
from ..files import bytes_sha256, fsync_dir, fsync_tree, write_atomic
from ..scorer.layout import (
    CURRENT_FILE,
    GOOD_DIR,
    MANIFEST_FILE,
    THRESHOLD_FILE,
    VERSIONS_DIR,
    current_version,
    product_dir,
    read_manifest,
    version_dir,
    version_numbers,
)
from ..scorer.manifest import recalibrate_hint

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
DEFAULT_KEEP = 10
MIN_KEEP = 2  # the active version and the one a rollback goes back to
CHANGES = ("calibrate", "feedback_ok", "threshold_adapt", "rollback", "stream")


@contextlib.contextmanager
def product_lock(calibration_dir: str | Path, product: str) -> Iterator[None]:
    """One writer per product at a time, across processes (the daemon's feedback worker, the CLI)."""
    pdir = product_dir(calibration_dir, product)
    pdir.mkdir(parents=True, exist_ok=True)
    with open(pdir / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def commit_version(
    calibration_dir: str | Path,
    product: str,
    write_files: Callable[[Path], dict[str, Any]],
    change: dict[str, Any],
    keep: int = DEFAULT_KEEP,
    engines_dir: str | Path | None = None,
) -> int:
    """Write a new version and make it the active one. The caller holds `product_lock`.

    write_files(folder) writes threshold.json, memory_bank.npy and references/ into `folder` and returns
    the manifest (without its "version" block). `change`: {"change": one of CHANGES, "by", "why", ...}.
    The new version is complete on disk before `current` names it, so a crash leaves the old one active.
    """
    if change.get("change") not in CHANGES:
        raise ValueError(f"change must be one of {CHANGES}, got {change.get('change')!r}")
    pdir = product_dir(calibration_dir, product)
    vdir = pdir / VERSIONS_DIR
    vdir.mkdir(parents=True, exist_ok=True)
    parent = current_version(calibration_dir, product)
    existing = version_numbers(calibration_dir, product)
    number = max([*existing, parent or 0]) + 1
    tmp = vdir / f".{number}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        manifest = write_files(tmp)
        manifest["version"] = {
            "number": number,
            "parent": parent,
            "created_utc": now_utc(),
            "by": str(change.get("by") or "unknown")[:128],
            "why": str(change.get("why") or "")[:1000],
            **{k: v for k, v in change.items() if k not in ("by", "why")},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        fsync_tree(tmp)  # every file of the version is on disk before `current` can name it
        tmp.replace(vdir / str(number))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(vdir)
    write_atomic(pdir / CURRENT_FILE, f"{number}\n")
    log.info("calibration %s: version %d is active (%s by %s%s)", product, number, change["change"],
             manifest["version"]["by"], f": {manifest['version']['why']}" if manifest["version"]["why"] else "")
    prune(calibration_dir, product, keep, engines_dir)
    return number


def _referenced(manifests: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    good, graphs = set(), set()
    for m in manifests:
        good |= {g["file"] for g in m.get("good_set", []) if isinstance(g, dict) and isinstance(g.get("file"), str)}
        for key in ("scorer_onnx", "features_onnx"):
            entry = m.get(key)
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                graphs.add(entry["file"])
    return good, graphs


def prune(calibration_dir: str | Path, product: str, keep: int = DEFAULT_KEEP, engines_dir: str | Path | None = None) -> list[int]:
    """Delete all but the newest `keep` versions (never the active one), then the good images and this
    product's scorer graphs no kept version names. Returns the deleted version numbers."""
    keep = max(MIN_KEEP, int(keep))
    pdir = product_dir(calibration_dir, product)
    numbers = version_numbers(calibration_dir, product)
    active = current_version(calibration_dir, product)
    doomed = [n for n in numbers[:-keep] if n != active]
    for n in doomed:
        shutil.rmtree(pdir / VERSIONS_DIR / str(n), ignore_errors=True)
    kept = [read_manifest(calibration_dir, product, n) for n in version_numbers(calibration_dir, product)]
    good, graphs = _referenced(kept)
    gdir = pdir / GOOD_DIR
    if gdir.is_dir():
        for path in gdir.iterdir():
            if f"{GOOD_DIR}/{path.name}" not in good and not path.name.startswith("."):
                path.unlink(missing_ok=True)
    if engines_dir is not None and Path(engines_dir).is_dir():
        own = re.compile(rf"^{re.escape(product)}-[0-9a-f]{{12}}(\.features)?\.onnx$")
        for path in Path(engines_dir).iterdir():
            if own.match(path.name) and path.name not in graphs:
                path.unlink(missing_ok=True)
    if doomed:
        log.info("calibration %s: removed version(s) %s (calibration.keep_versions=%d)", product,
                 ", ".join(map(str, doomed)), keep)
    return doomed


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """One version as `calibration history` shows it."""
    version = manifest.get("version") or {}
    good_set = manifest.get("good_set") or []
    return {
        "number": version.get("number"),
        "parent": version.get("parent"),
        "change": version.get("change"),
        "by": version.get("by"),
        "why": version.get("why"),
        "created_utc": version.get("created_utc") or manifest.get("created_utc"),
        "calibration_id": manifest.get("calibration_id"),
        "threshold": manifest.get("threshold"),
        "bank_patches": (manifest.get("bank") or {}).get("patches"),
        "good_images": len(good_set),
        "restored_from": version.get("restored_from"),
        "inspection_ids": version.get("inspection_ids"),
    }


def history(calibration_dir: str | Path, product: str) -> list[dict[str, Any]]:
    """The kept versions, oldest first; the active one has "active": true."""
    active = current_version(calibration_dir, product)
    if active is None and (product_dir(calibration_dir, product) / MANIFEST_FILE).is_file():
        raise UserError(f"product {product!r} was calibrated before calibrations were versioned: it has no history; "
                        f"recalibrate with `edge-inspect calibrate --product {product} --images DIR --force` to start one")
    if active is None:
        raise UserError(f"product {product!r} is not calibrated in {calibration_dir}")
    out = []
    for n in version_numbers(calibration_dir, product):
        row = summary(read_manifest(calibration_dir, product, n))
        row["active"] = n == active
        out.append(row)
    return out


def _threshold_doc(calibration_dir: str | Path, product: str, number: int) -> dict[str, Any]:
    path = version_dir(calibration_dir, product, number) / THRESHOLD_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path} is damaged ({exc})") from None


def diff(calibration_dir: str | Path, product: str, a: int, b: int) -> dict[str, Any]:
    """What changed from version a to version b: threshold, bank, good images, params, threshold evidence."""
    ma, mb = read_manifest(calibration_dir, product, a), read_manifest(calibration_dir, product, b)
    ta, tb = _threshold_doc(calibration_dir, product, a), _threshold_doc(calibration_dir, product, b)
    good_a = {g["file"]: g for g in ma.get("good_set", [])}
    good_b = {g["file"]: g for g in mb.get("good_set", [])}
    ea, eb = ta.get("evidence", {}), tb.get("evidence", {})
    params_a, params_b = ma.get("params", {}), mb.get("params", {})
    out: dict[str, Any] = {
        "product": product,
        "from": summary(ma),
        "to": summary(mb),
        "threshold": {"from": ma.get("threshold"), "to": mb.get("threshold"),
                      "delta": _delta(ma.get("threshold"), mb.get("threshold"))},
        "bank": {"from": ma.get("bank", {}).get("sha256"), "to": mb.get("bank", {}).get("sha256"),
                 "same": ma.get("bank", {}).get("sha256") == mb.get("bank", {}).get("sha256"),
                 "patches": [ma.get("bank", {}).get("patches"), mb.get("bank", {}).get("patches")]},
        "good_images_added": [_good_row(good_b[k]) for k in good_b if k not in good_a],
        "good_images_removed": [_good_row(good_a[k]) for k in good_a if k not in good_b],
        "params_changed": {k: [params_a.get(k), params_b.get(k)] for k in sorted(set(params_a) | set(params_b))
                           if params_a.get(k) != params_b.get(k)},
        "evidence": {k: [ea.get(k), eb.get(k)] for k in ("loo_max", "loo_median", "synthetic_detected")
                     if ea.get(k) != eb.get(k)},
    }
    return out


def _delta(a: Any, b: Any) -> float | None:
    return round(float(b) - float(a), 6) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None


def _good_row(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry.get(k) for k in ("file", "source", "added_by", "inspection_id") if entry.get(k) is not None}


def copy_version_files(source: Path, target: Path) -> dict[str, Any]:
    """The files of one version copied bit for bit into `target`; returns its manifest without the version block."""
    for item in source.iterdir():
        if item.name == MANIFEST_FILE:
            continue
        if item.is_dir():
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)
    manifest = json.loads((source / MANIFEST_FILE).read_text(encoding="utf-8"))
    manifest.pop("version", None)
    return manifest


def commit_threshold(
    calibration_dir: str | Path,
    product: str,
    threshold: float,
    change: dict[str, Any],
    evidence: dict[str, Any] | None = None,
    keep: int = DEFAULT_KEEP,
    engines_dir: str | Path | None = None,
) -> int:
    """A new version that differs from the active one in its threshold only (same bank, same graph files).
    The caller holds `product_lock`. `evidence` is merged into threshold.json's evidence (what moved it)."""
    active = current_version(calibration_dir, product)
    if active is None:
        raise CalibrationError(f"product {product!r} has no versioned calibration: recalibrate it with --force first")
    source = product_dir(calibration_dir, product) / VERSIONS_DIR / str(active)

    def write(folder: Path) -> dict[str, Any]:
        manifest = copy_version_files(source, folder)
        doc = json.loads((folder / THRESHOLD_FILE).read_text(encoding="utf-8"))
        doc["threshold"] = float(threshold)
        if evidence:
            doc.setdefault("evidence", {}).update(evidence)
        (folder / THRESHOLD_FILE).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        manifest["threshold"] = float(threshold)
        return manifest

    return commit_version(calibration_dir, product, write, change, keep=keep, engines_dir=engines_dir)


# --- the good set: images a version was fitted on, stored once by content -------------------------


@dataclass(frozen=True)
class GoodImage:
    """One image of a product's good set: a calibration shot, or a frame an operator overruled as ok."""

    bgr: np.ndarray  # ROI-cropped, in its stored form
    source: str  # the file it came from, or "inspection <id>"
    added_by: str = "calibrate"  # "calibrate" | "feedback"
    inspection_id: str | None = None


def store_good_image(pdir: Path, bgr: np.ndarray) -> str:
    """Store a good image once (content-addressed PNG, lossless) and return its path relative to pdir."""
    ok, png = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise CalibrationError(f"could not encode a good image of shape {bgr.shape} as PNG")
    data = png.tobytes()
    name = f"{GOOD_DIR}/{bytes_sha256(data)[:20]}.png"
    path = pdir / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    return name


def load_good_set(calibration_dir: str | Path, product: str, manifest: dict[str, Any]) -> list[GoodImage]:
    """The stored good images a version was fitted on."""
    pdir = product_dir(calibration_dir, product)
    entries = manifest.get("good_set")
    if not entries:
        raise CalibrationError(
            f"product {product!r} was calibrated before good images were kept with the calibration, so it cannot "
            f"be refitted: {recalibrate_hint(product)} once"
        )
    out = []
    for entry in entries:
        path = pdir / entry["file"]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise CalibrationError(f"{path} (a good image of the active calibration) is missing or damaged: "
                                   f"{recalibrate_hint(product)}")
        out.append(GoodImage(bgr, entry.get("source", entry["file"]), entry.get("added_by", "calibrate"), entry.get("inspection_id")))
    return out
