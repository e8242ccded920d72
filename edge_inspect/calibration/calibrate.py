"""Calibrate, refit and roll back a product: good images in, a new calibration version on disk out.

The fit itself is calibration/fit.py (arrays only); this module reads the images, writes a version's
files (bank, threshold, references, manifest) through the version store, and the graphs beside them.

Example:
    product = calibrate_product(sorted(Path("good").glob("*.png")), "bracket-a",
                                calibration_dir="calibration", engines_dir="engines")
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import numpy as np
import onnx
import onnxruntime

from .. import __version__
from ..errors import CalibrationError, UserError
from ..files import array_sha256, file_sha256
from ..imageio import crop_roi, read_bgr
from ..records import is_product_name
from ..scorer.layout import (
    BANK_FILE,
    MANIFEST_FILE,
    REFERENCES_DIR,
    THRESHOLD_FILE,
    VERSIONS_DIR,
    active_directory,
    current_version,
    product_dir,
)
from ..scorer.manifest import MANIFEST_VERSION, migrate
from ..scorer.params import ScorerParams
from ..scorer.product import load_product
from .artifacts import BACKBONE_FILE, ensure_graphs, load_folded, write_graphs
from .choose import choose_views
from .fit import MIN_IMAGES, CalibrationOptions, Fitted, fit_calibration
from .store import (
    DEFAULT_KEEP,
    GoodImage,
    commit_version,
    copy_version_files,
    load_good_set,
    product_lock,
    read_manifest,
    store_good_image,
)
from .views import AUTO, stored_good_image

log = logging.getLogger(__name__)

RECOMMENDED_IMAGES = 4
REFERENCE_SIZE = 256  # longest side of the stored good reference images


def validate_product_name(name: str) -> str:
    if not is_product_name(name):
        raise UserError(
            f"product name {name!r} is not allowed: use 1-64 letters, digits, '-', '_' or '.', starting with a "
            "letter or digit (no path separators), e.g. 'bracket-a'"
        )
    return name


def load_good_images(paths: Sequence[Path], roi, size: tuple[int, int]) -> list[np.ndarray]:
    """Read, crop and check the good images; unreadable files are an error naming each one."""
    images, unreadable, shapes = [], [], set()
    for p in paths:
        try:
            bgr = crop_roi(read_bgr(p), roi)
        except UserError as exc:
            unreadable.append(f"{p} ({exc})")
            continue
        shapes.add(bgr.shape[:2])
        images.append(bgr)
    if unreadable:
        raise CalibrationError("cannot read these images (remove or replace them):\n  " + "\n  ".join(unreadable))
    if len(shapes) > 1:
        log.warning(
            "the good images have %d different sizes (%s); all are resized to %dx%d — frames on the line should "
            "have one size", len(shapes), ", ".join(f"{w}x{h}" for h, w in sorted(shapes)[:4]), size[1], size[0],
        )
    return images


REFIT_EVIDENCE_CHOICES = ("all", "shots", "novel")


REFIT_EVIDENCE = "shots"  # measured best on the real sets (docs/calibration.md#learning-from-operator-feedback)


def options_to_json(options: CalibrationOptions) -> dict[str, Any]:
    """What a refit needs to repeat this calibration (params are stored apart, with their layer scales)."""
    return {"bank_size": options.bank_size, "layer_scales": options.layer_scales, "synthetic_per_image": options.synthetic_per_image,
            "false_reject_rate": options.false_reject_rate, "augment": list(options.augment), "seed": options.seed}


def options_from_manifest(manifest: dict[str, Any]) -> CalibrationOptions:
    """The options a version was calibrated with (manifest migrated: scorer/manifest.py)."""
    stored = manifest["options"]
    params = ScorerParams.from_json(manifest["params"])
    if stored["layer_scales"]:
        params = dataclasses.replace(params, layer_scales=())  # measured again on the new good set
    return CalibrationOptions(
        params=params,
        roi=tuple(manifest["roi"]) if manifest.get("roi") else None,
        augment=tuple(stored["augment"]),
        bank_size=int(stored["bank_size"]),
        layer_scales=bool(stored["layer_scales"]),
        false_reject_rate=float(stored["false_reject_rate"]),
        synthetic_per_image=int(stored["synthetic_per_image"]),
        seed=int(stored["seed"]),
    )

def write_version_files(
    folder: Path,
    product: str,
    fitted: Fitted,
    good: Sequence[GoodImage],
    options: CalibrationOptions,
    folded: dict[str, np.ndarray],
    backbone_sha: str,
    engines: Path,
    pdir: Path,
    images_meta: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A version's files (bank, threshold, references) in `folder`, its graphs in `engines`, its good images
    in pdir/good/; returns its manifest."""
    bank = fitted.bank
    bank_sha = array_sha256(bank)
    capacity = max(options.bank_size, int(bank.shape[0]))  # the coreset keeps the bank within bank_size
    engine_name, features_name = write_graphs(folded, product, fitted.params, bank, engines, capacity)
    (folder / REFERENCES_DIR).mkdir(parents=True, exist_ok=True)
    np.save(folder / BANK_FILE, bank)
    names, good_set = [], []
    for i, item in enumerate(good):
        bgr = item.bgr
        scale = REFERENCE_SIZE / max(bgr.shape[:2])
        small = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else bgr
        name = f"{i:03d}.jpg"
        cv2.imwrite(str(folder / REFERENCES_DIR / name), small, [cv2.IMWRITE_JPEG_QUALITY, 92])
        names.append({"file": name, "source": Path(item.source).name if item.added_by == "calibrate" else item.source})
        entry = {"file": store_good_image(pdir, bgr), "source": item.source, "added_by": item.added_by}
        if item.inspection_id:
            entry["inspection_id"] = item.inspection_id
        good_set.append(entry)
    np.save(folder / REFERENCES_DIR / "embeddings.npy", fitted.embeddings)
    (folder / REFERENCES_DIR / "references.json").write_text(json.dumps(names, indent=1))
    threshold_doc = {"threshold": fitted.threshold, "false_reject_rate": options.false_reject_rate, "evidence": fitted.evidence}
    (folder / THRESHOLD_FILE).write_text(json.dumps(threshold_doc, indent=1))
    return {
        "manifest_version": MANIFEST_VERSION,
        "product": product,
        "calibration_id": f"{product}@{bank_sha[:12]}",
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "edge_inspect_version": __version__,
        "versions": _versions(),
        "params": fitted.params.to_json(),
        "options": options_to_json(options),
        "input_size": list(fitted.params.input_size),
        "roi": list(options.roi) if options.roi else None,
        "augment": list(options.augment),
        "seed": options.seed,
        "threshold": fitted.threshold,
        "false_reject_rate": options.false_reject_rate,
        "bank": {"file": BANK_FILE, "patches": int(bank.shape[0]), "dim": int(bank.shape[1]),
                 "from_patches": fitted.from_patches, "sha256": bank_sha},
        "backbone": {"file": BACKBONE_FILE, "sha256": backbone_sha, "architecture": "efficientnet-lite0"},
        "scorer_onnx": {"file": engine_name, "sha256": file_sha256(engines / engine_name), "bank_input": True,
                        "capacity": capacity},
        "features_onnx": {"file": features_name, "sha256": file_sha256(engines / features_name)},
        "images": images_meta if images_meta is not None else [],
        "good_set": good_set,
        "seconds": round(fitted.seconds, 2),
    }


def _warn_synthetic(evidence: dict[str, Any]) -> None:
    if evidence.get("synthetic_detected", 1.0) < 0.5:
        log.warning(
            "at the automatic threshold only %.0f%% of synthetic anomalies are flagged: add more good images, set "
            "an ROI, or raise --false-reject-rate", 100 * evidence["synthetic_detected"],
        )


def calibrate_product(
    image_paths: Sequence[str | Path],
    product: str,
    calibration_dir: str | Path = "calibration",
    engines_dir: str | Path = "engines",
    options: CalibrationOptions | None = None,
    force: bool = False,
    progress: bool = True,
    threads: int = 0,
    on_step: Callable[[str], None] | None = None,
    by: str = "calibrate",
    why: str = "",
    keep: int = DEFAULT_KEEP,
):
    """Calibrate `product` from good images as a new version; returns the loaded scorer.product.ProductCalibration.

    With --force on a product that has versions, the new calibration is one more version (its parent the
    active one), so `calibration rollback` can undo a recalibration too."""

    options = options or CalibrationOptions()
    params = options.params
    validate_product_name(product)
    paths = [Path(p) for p in image_paths]
    if len(paths) < MIN_IMAGES:
        raise CalibrationError(
            f"{len(paths)} good image(s) given; calibration needs at least {MIN_IMAGES} "
            f"(recommended {RECOMMENDED_IMAGES}-10 of different good parts)"
        )
    if len(paths) < RECOMMENDED_IMAGES:
        log.warning("only %d good images: %d or more give a more reliable threshold", len(paths), RECOMMENDED_IMAGES)
    pdir = product_dir(calibration_dir, product)
    if active_directory(calibration_dir, product) is not None and not force:
        raise CalibrationError(f"product {product!r} already exists in {pdir}; use --force to recalibrate it")
    images = [stored_good_image(b, params.input_size) for b in load_good_images(paths, options.roi, params.input_size)]
    folded, backbone_sha = load_folded(engines_dir)
    views = {"chosen": ",".join(options.augment) or "none", "rule": "given (--augment)"}
    if options.augment == AUTO:
        if on_step:
            on_step("choose views")
        augment, views = choose_views(images, folded, params, options.seed, threads)
        options = dataclasses.replace(options, augment=augment)
    fitted = fit_calibration(images, folded, options, threads, progress, on_step, desc=f"calibrate {product}")
    if on_step:
        on_step("write calibration")
    engines = Path(engines_dir)
    good = [GoodImage(bgr, str(p)) for bgr, p in zip(images, paths)]
    images_meta = [{"source": str(p), "sha256": file_sha256(p)} for p in paths]
    with product_lock(calibration_dir, product):
        if current_version(calibration_dir, product) is None:
            _retire_legacy(pdir)
        commit_version(
            calibration_dir, product,
            lambda folder: {**write_version_files(folder, product, fitted, good, options, folded, backbone_sha, engines, pdir,
                                                  images_meta), "views": views},
            {"change": "calibrate", "by": by, "why": why or f"calibrated from {len(paths)} good image(s)"},
            keep=keep, engines_dir=engines,
        )
    _warn_synthetic(fitted.evidence)
    return load_product(calibration_dir, product, engines_dir)


def _retire_legacy(pdir: Path) -> None:
    """A product calibrated before versioning, recalibrated: its flat files go (knowledge.yaml stays)."""
    for name in (MANIFEST_FILE, THRESHOLD_FILE, BANK_FILE):
        (pdir / name).unlink(missing_ok=True)
    shutil.rmtree(pdir / REFERENCES_DIR, ignore_errors=True)


def refit_product(
    calibration_dir: str | Path,
    product: str,
    engines_dir: str | Path,
    add: Sequence[GoodImage],
    change: dict[str, Any],
    keep: int = DEFAULT_KEEP,
    threads: int = 0,
    progress: bool = False,
    max_good: int | None = None,
    evidence_from: str = REFIT_EVIDENCE,
) -> int:
    """A new version fitted on the active version's good set plus `add` (frames operators accepted, already
    ROI-cropped): their patches join the bank (coreset-bounded) and the threshold evidence is recomputed.
    The caller holds `product_lock`. Returns the new version number.

    max_good: the good set's size limit; beyond it the oldest accepted frames leave it (the shots stay).
    evidence_from: "all" = every good image gives threshold evidence (leave-one-out); "shots" = only the
    calibration shots do and accepted frames only join the bank; "novel" = as "shots", and of each
    accepted frame only its novel patches join (novel_patches). docs/calibration.md compares them."""
    if evidence_from not in REFIT_EVIDENCE_CHOICES:
        raise UserError(f"evidence_from must be one of {REFIT_EVIDENCE_CHOICES}, got {evidence_from!r}")
    number = current_version(calibration_dir, product)
    if number is None:
        raise CalibrationError(
            f"product {product!r} has no versioned calibration (calibrated before versioning, or not at all): "
            f"recalibrate with `edge-inspect calibrate --product {product} --images DIR --force`"
        )
    manifest = migrate(read_manifest(calibration_dir, product, number))
    options = options_from_manifest(manifest)
    good = load_good_set(calibration_dir, product, manifest)
    good += [GoodImage(stored_good_image(g.bgr, options.params.input_size), g.source, g.added_by, g.inspection_id) for g in add]
    if max_good is not None and len(good) > max_good:
        shots = [g for g in good if g.added_by == "calibrate"]
        accepted = [g for g in good if g.added_by != "calibrate"]
        good = shots + accepted[max(0, len(accepted) - max(0, max_good - len(shots))):]
    folded, backbone_sha = load_folded(engines_dir)
    n_shots = sum(g.added_by == "calibrate" for g in good)
    fitted = fit_calibration([g.bgr for g in good], folded, options, threads, progress, desc=f"refit {product}",
                             evidence_images=None if evidence_from == "all" else n_shots, novel_only=evidence_from == "novel")
    pdir = product_dir(calibration_dir, product)
    return commit_version(
        calibration_dir, product,
        lambda folder: {**write_version_files(folder, product, fitted, good, options, folded, backbone_sha, Path(engines_dir),
                                              pdir, manifest["images"]), "views": manifest.get("views")},
        change, keep=keep, engines_dir=engines_dir,
    )


def rollback_product(
    calibration_dir: str | Path,
    product: str,
    engines_dir: str | Path,
    to: int | None = None,
    by: str = "unknown",
    why: str = "",
    keep: int = DEFAULT_KEEP,
) -> int:
    """A new version whose bank, threshold and references are bit-for-bit copies of version `to` (default:
    the active version's parent). Its scorer graph is rebuilt from the bank when it was deleted."""
    with product_lock(calibration_dir, product):
        active = current_version(calibration_dir, product)
        if active is None:
            raise UserError(f"product {product!r} has no versioned calibration to roll back")
        if to is None:
            parent = read_manifest(calibration_dir, product, active).get("version", {}).get("parent")
            if parent is None:
                raise UserError(f"version {active} of product {product!r} has no parent: nothing to roll back to")
            to = int(parent)
        if to == active:
            raise UserError(f"version {to} of product {product!r} is already the active one")
        source = product_dir(calibration_dir, product) / VERSIONS_DIR / str(to)
        old = migrate(read_manifest(calibration_dir, product, to))  # a clear error when it was pruned
        ensure_graphs(old, product, source, Path(engines_dir))
        return commit_version(
            calibration_dir, product, lambda folder: copy_version_files(source, folder),
            {"change": "rollback", "by": by, "why": why or f"rolled back to version {to}", "restored_from": to},
            keep=keep, engines_dir=engines_dir,
        )


def _versions() -> dict[str, str]:
    return {"numpy": np.__version__, "opencv": cv2.__version__, "onnxruntime": onnxruntime.__version__,
            "onnx": onnx.__version__}
