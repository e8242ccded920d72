"""Applying one operator feedback: the one code path of the daemon's queue and `edge-inspect feedback --local`.

    request ──▶ cheap checks ──▶ applied before? (any product's ledger) ──▶ duplicate / conflict
        ▼ evidence (<evidence>/<day>/<id>.json + .jpg)          unknown_inspection / evidence_missing
        ▼ same product on that camera, not recalibrated since    product_changed
        ▼ under versions.product_lock(calibration, product):
          frame ──camera ROI + resize──▶ view ──product ROI──▶ what the scorer saw
          ok on an NG: refit_product (the frame joins the good set: a new version, threshold evidence recomputed)
          ng:          defects/<id>.png + defects.jsonl (no new version)
          labelled-defect report (when the product has any), ledger line (fsynced)
        ▼ result body (mqtt/feedback.py makes it the feedback/result payload)

Idempotent by inspection id: a repeat is "duplicate" with the version it was applied in; the other verdict
for the same id is the error "conflict". A crash between the new version and its ledger line is repaired
from the version's manifest (its "inspection_ids") or the defects list, never refitted twice.

Example:
    applier = FeedbackApplier("calibration", "engines", "evidence", FeedbackConfig(),
                              camera=lambda name: cameras.get(name), running_product=lambda name: "bracket-a")
    outcome = applier.apply(parse_feedback(b'{"inspection_id": "5f0c...", "verdict": "ok"}'))
    outcome.body["status"], outcome.body["calibration_version"], outcome.refitted   # "applied", 4, "bracket-a"
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..calibration.calibrate import refit_product
from ..calibration.store import GoodImage, product_lock
from ..calibration.stream import CandidateStore, StreamLearner
from ..capture.geometry import camera_view
from ..capture.sources import SourceError
from ..config.capture import CameraConfig
from ..config.feedback import FeedbackConfig
from ..errors import UserError
from ..evidence import EvidenceMissing, StoredEvidence, read_evidence
from ..imageio import crop_roi
from ..mqtt.feedback import ERROR_CODES, FeedbackRequest
from ..records import is_plain_name
from ..scorer.layout import current_version, read_manifest, version_numbers
from ..scorer.product import ProductCalibration, load_product
from .defects import UNSPECIFIED, DefectScorer, DefectStore, record_report
from .ledger import FeedbackLedger, find_applied

log = logging.getLogger(__name__)

_MAX_LINEAGE = 10_000  # versions followed back to the calibration a version descends from


class FeedbackError(Exception):
    """Feedback that is not applied; `code` is one of mqtt.feedback.ERROR_CODES, the message says what to do.
    `known` carries what was found out before it failed (product, camera), for the result."""

    def __init__(self, code: str, message: str, **known: Any):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.known = known


@dataclass(frozen=True)
class FeedbackOutcome:
    body: dict[str, Any]  # the feedback result body (feedback_result_payload makes it the message)
    refitted: str | None = None  # the product a new calibration version was written for: the daemon swaps its scorers


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).isoformat(timespec="milliseconds")


def result_body(request: FeedbackRequest, status: str, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "request_id": request.request_id,
        "inspection_id": request.inspection_id or None,
        "status": status,
        "verdict": request.verdict or None,
        "calibration_version": None,
        "previous_version": None,
        "threshold": None,
    }
    body.update(fields)
    return body


def error_body(request: FeedbackRequest, code: str, message: str, **known: Any) -> dict[str, Any]:
    """The result body of feedback that was not applied."""
    return result_body(request, "error", error_code=code, error=message, **known)


class FeedbackApplier:
    """Applies feedback to a station's calibration and evidence folders (see the module docstring).

    camera(name): the camera's current config (None: no longer configured); running_product(name): the
    product that camera scores now. `flush` waits for the evidence writer (the daemon's store), so feedback
    on a result just published finds its frame. Not thread-safe: one caller thread (the daemon's feedback
    worker, or the CLI); other processes are kept out by versions.product_lock.
    """

    def __init__(
        self,
        calibration_dir: str | Path,
        engines_dir: str | Path,
        evidence_root: str | Path,
        config: FeedbackConfig,
        camera: Callable[[str], CameraConfig | None],
        running_product: Callable[[str], str | None],
        flush: Callable[[float], bool] | None = None,
    ):
        self.calibration_dir = Path(calibration_dir)
        self.engines_dir = Path(engines_dir)
        self.evidence_root = Path(evidence_root)
        self.config = config
        self._camera = camera
        self._running_product = running_product
        self._flush = flush
        self._defect_scorer = DefectScorer(threads=1)

    def check(self, request: FeedbackRequest) -> None:
        """The cheap checks (no disk): FeedbackError when the request is not acceptable."""
        if request.error:
            raise FeedbackError("invalid_request", request.error)

    def apply(self, request: FeedbackRequest) -> FeedbackOutcome:
        """Apply one feedback; never raises for bad feedback: the outcome's body is an error instead."""
        try:
            return self._apply(request)
        except FeedbackError as exc:
            return FeedbackOutcome(error_body(request, exc.code, str(exc), **exc.known))
        except UserError as exc:  # CalibrationError and kin: the calibration cannot take it; the message names the fix
            log.error("feedback on %s not applied: %s", request.inspection_id, exc)
            return FeedbackOutcome(error_body(request, "calibration_failed", str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug must still answer the operator
            log.exception("feedback on %s failed", request.inspection_id)
            return FeedbackOutcome(error_body(request, "failed", f"internal error: {type(exc).__name__}: {exc}"))

    # --- the steps ----------------------------------------------------------------------------

    def _apply(self, request: FeedbackRequest) -> FeedbackOutcome:
        self.check(request)
        prior = find_applied(self.calibration_dir, request.inspection_id)
        if prior is not None:
            return self._repeat(request, prior)
        if self._flush is not None:
            self._flush(2.0)  # the evidence of a result just published is on disk
        stored = self._stored(request)
        product, camera = str(stored.body.get("product") or ""), str(stored.body.get("camera") or "")
        if not is_plain_name(product):
            raise FeedbackError("failed", f"the evidence of inspection {request.inspection_id} names no valid product ({product!r})")
        known = {"product": product, **({"camera": camera} if is_plain_name(camera) else {})}
        camera_config = self._same_product(request, product, camera, known)
        with product_lock(self.calibration_dir, product):
            ledger = FeedbackLedger(self.calibration_dir, product)
            prior = ledger.find(request.inspection_id) or self._recover(product, request.inspection_id, ledger)
            if prior is not None:
                return self._repeat(request, prior)
            self._not_recalibrated(request, product, stored.body.get("calibration_version"), known)
            active = load_product(self.calibration_dir, product, self.engines_dir)
            crop = self._scored_view(request, stored, camera_config, active, known)
            if request.verdict == "ok":
                now, refitted = self._accept(request, stored, active, crop)
            else:
                refitted = self._confirm(request, stored, crop, active)
                now = load_product(self.calibration_dir, product, self.engines_dir) if refitted else active
            report = self._defect_scorer.report(now, DefectStore(self.calibration_dir, product))
            if report is not None and refitted:
                record_report(now.directory, report)
            entry = {
                "inspection_id": request.inspection_id,
                "verdict": request.verdict,
                "product": product,
                "camera": camera,
                "calibration_version": now.version,
                "previous_version": active.version,
                "threshold": now.threshold,
                "refit": refitted,
                "defect_type": request.defect_type,
                "operator": request.operator,
                "note": request.note,
                "request_id": request.request_id,
                "score": stored.body.get("score"),
                "scored_version": stored.body.get("calibration_version"),
                "received_utc": _iso(request.received_at or time.time()),
                "applied_utc": _iso(time.time()),
            }
            ledger.append(entry)
        log.info("feedback %s on inspection %s (%s, by %s) applied%s", request.verdict, request.inspection_id, product,
                 request.operator or "unnamed operator",
                 f": calibration version {now.version} is active" if refitted else "")
        body = result_body(request, "applied", **known, calibration_version=now.version, previous_version=active.version,
                           threshold=now.threshold)
        if report is not None:
            body["labelled_defects"] = report
        return FeedbackOutcome(body, product if refitted else None)

    def _stored(self, request: FeedbackRequest) -> StoredEvidence:
        try:
            return read_evidence(self.evidence_root, request.inspection_id)
        except EvidenceMissing as exc:
            code = "unknown_inspection" if exc.what == "entry" else "evidence_missing"
            raise FeedbackError(code, str(exc)) from None

    def _same_product(self, request: FeedbackRequest, product: str, camera: str, known: dict[str, Any]) -> CameraConfig:
        """The camera still exists and still runs the inspection's product: otherwise the frame would teach
        a product it was never scored as."""
        config = self._camera(camera)
        if config is None:
            raise FeedbackError("product_changed", f"camera {camera!r} of inspection {request.inspection_id} is no longer "
                                                   "in the config: its frame cannot be cropped as the scorer saw it", **known)
        running = self._running_product(camera)
        if running != product:
            raise FeedbackError(
                "product_changed",
                f"inspection {request.inspection_id} was of product {product!r}, but camera {camera} now runs {running!r}: "
                f"switch back to {product} to give feedback on it, or use `edge-inspect feedback --local` with a config "
                f"whose camera {camera} runs {product}", **known,
            )
        return config

    def _not_recalibrated(self, request: FeedbackRequest, product: str, scored: Any, known: dict[str, Any]) -> None:
        """The version that scored the inspection and the active one descend from the same calibration: after
        a recalibration from scratch the frame's score and the operator's verdict belong to another product."""
        active = current_version(self.calibration_dir, product)
        scored = scored if isinstance(scored, int) and not isinstance(scored, bool) else None
        if active is None and scored is None:
            return  # a product calibrated before versions: nothing to compare (an ok then fails with the fix)
        changed = active is None or scored is None
        if not changed:
            base_scored, base_active = self._lineage(product, scored), self._lineage(product, active)
            if base_scored is not None and base_active is not None:
                changed = base_scored != base_active
            else:  # the history between them was pruned: any recalibration kept after the scoring counts
                changed = any(self._change(product, n) == "calibrate" for n in version_numbers(self.calibration_dir, product)
                              if n > scored)
        if changed:
            raise FeedbackError(
                "product_changed",
                f"product {product} was recalibrated after inspection {request.inspection_id} was scored (by version "
                f"{scored}; active now {active}): feedback on it would mix two calibrations; send feedback on new "
                "results instead", **known,
            )

    def _change(self, product: str, number: int) -> str | None:
        try:
            return (read_manifest(self.calibration_dir, product, number).get("version") or {}).get("change")
        except UserError:
            return None

    def _lineage(self, product: str, number: int) -> int | None:
        """The calibration (a version with change "calibrate") a version descends from: through its parents,
        and through what a rollback restored. None when the chain reaches a pruned version."""
        for _ in range(_MAX_LINEAGE):
            try:
                version = read_manifest(self.calibration_dir, product, number).get("version") or {}
            except UserError:
                return None
            change = version.get("change")
            if change == "calibrate":
                return number
            step = version.get("restored_from") if change == "rollback" else version.get("parent")
            if not isinstance(step, int):
                return None
            number = step
        return None

    def _scored_view(self, request: FeedbackRequest, stored: StoredEvidence, camera: CameraConfig,
                     product: ProductCalibration, known: dict[str, Any]):
        """The stored frame as the scorer saw it: camera ROI + resize (the pipeline's view), then the product ROI."""
        try:
            view = camera_view(stored.frame_bgr, camera.roi_box, camera.resize_to)
        except SourceError as exc:
            raise FeedbackError("failed", f"the frame of inspection {request.inspection_id} does not fit the camera's "
                                          f"geometry any more: {exc}", **known) from None
        return crop_roi(view, product.roi)

    def _accept(self, request: FeedbackRequest, stored: StoredEvidence, active: ProductCalibration, crop) -> tuple[ProductCalibration, bool]:
        """ok: an NG overruled joins the good set as a new version; an OK confirmed changes nothing."""
        if stored.body.get("verdict") != "NG":
            return active, False
        inspection_id = request.inspection_id
        shots = sum(1 for g in active.manifest.get("good_set") or () if isinstance(g, dict) and g.get("added_by") == "calibrate")
        if shots >= self.config.max_good_images:  # the shots always stay: the frame would be dropped again at once
            raise FeedbackError(
                "calibration_failed",
                f"product {active.name} was calibrated from {shots} images and feedback.max_good_images is "
                f"{self.config.max_good_images}: no room for frames operators accept; raise feedback.max_good_images",
                product=active.name,
            )
        number = refit_product(
            self.calibration_dir, active.name, self.engines_dir,
            add=[GoodImage(crop, source=f"inspection {inspection_id}", added_by="feedback", inspection_id=inspection_id)],
            change={"change": "feedback_ok", "by": request.operator or "feedback",
                    "why": request.note or f"operator overruled the NG of inspection {inspection_id}",
                    "inspection_ids": [inspection_id]},
            keep=self.config.keep_versions, threads=1, max_good=self.config.max_good_images,
        )
        now = load_product(self.calibration_dir, active.name, self.engines_dir)
        if now.version != number:  # another writer cannot get in (we hold the lock): a bug if it happens
            raise RuntimeError(f"refit wrote version {number} but version {now.version} is active")
        return now, True

    def _confirm(self, request: FeedbackRequest, stored: StoredEvidence, crop, active: ProductCalibration) -> bool:
        """ng: the frame is kept as a labelled defect of the product, and it never teaches the bank: it leaves
        the stream candidates, and when the active version learned from it, a refit without it is committed
        at once (True: a new version)."""
        body = stored.body
        DefectStore(self.calibration_dir, str(body["product"])).add(request.inspection_id, crop, {
            "defect_type": request.defect_type or UNSPECIFIED,
            "operator": request.operator,
            "note": request.note,
            "score": body.get("score"),
            "threshold": body.get("threshold"),
            "calibration_version": body.get("calibration_version"),
            "received_utc": _iso(request.received_at or time.time()),
        })
        product = str(body["product"])
        CandidateStore(self.calibration_dir, product).remove(request.inspection_id)
        learned_from = (active.manifest.get("stream") or {}).get("inspection_ids") or []  # only versions a refit wrote
        if request.inspection_id not in learned_from:
            return False
        outcome = StreamLearner(self.calibration_dir, self.engines_dir, product, keep=self.config.keep_versions).refit(
            why=f"operator ng on inspection {request.inspection_id}: its frame leaves the bank", check=False)
        return outcome.committed

    def _recover(self, product: str, inspection_id: str, ledger: FeedbackLedger) -> dict[str, Any] | None:
        """Feedback whose ledger line a crash lost: a kept version made from it, or its labelled defect.
        The line is written now, so the next repeat finds it directly."""
        entry = None
        for number in reversed(version_numbers(self.calibration_dir, product)):
            try:
                manifest = read_manifest(self.calibration_dir, product, number)
            except UserError:
                continue
            version = manifest.get("version") or {}
            if version.get("change") == "feedback_ok" and inspection_id in (version.get("inspection_ids") or ()):
                entry = {"verdict": "ok", "calibration_version": number, "previous_version": version.get("parent"),
                         "threshold": manifest.get("threshold")}
                break
        if entry is None:
            defect = DefectStore(self.calibration_dir, product).find(inspection_id)
            if defect is None:
                return None
            entry = {"verdict": "ng", "calibration_version": current_version(self.calibration_dir, product),
                     "previous_version": current_version(self.calibration_dir, product),
                     "threshold": defect.get("threshold"), "defect_type": defect.get("defect_type")}
        entry = {"inspection_id": inspection_id, "product": product, **entry, "recovered": True,
                 "applied_utc": _iso(time.time())}
        log.warning("feedback on %s was applied before a crash but missing from %s; recorded it now", inspection_id, ledger.path)
        ledger.append(entry)
        return entry

    def _repeat(self, request: FeedbackRequest, prior: dict[str, Any]) -> FeedbackOutcome:
        known = {k: prior[k] for k in ("product", "camera") if is_plain_name(prior.get(k))}
        if prior.get("verdict") != request.verdict:
            product = prior.get("product", "?")
            undo = (f"to undo the refit, roll product {product} back (`edge-inspect calibration rollback --product {product}`)"
                    if prior.get("verdict") == "ok" else "a labelled defect stays one")
            raise FeedbackError(
                "conflict",
                f"inspection {request.inspection_id} was already fed back as {prior.get('verdict')!r}"
                f"{' by ' + str(prior['operator']) if prior.get('operator') else ''} (calibration version "
                f"{prior.get('calibration_version')}); feedback is applied once per inspection: {undo}", **known,
            )
        return FeedbackOutcome(result_body(
            request, "duplicate", **known, calibration_version=prior.get("calibration_version"),
            previous_version=prior.get("previous_version"), threshold=prior.get("threshold"),
        ))


def apply_local(config: Any, request: FeedbackRequest, evidence_dir: str | None = None) -> dict[str, Any]:
    """Apply on the folders of the config (no daemon): the camera runs the product the config gives it."""
    cameras = {camera.name: camera for camera in config.cameras}
    applier = FeedbackApplier(
        config.scoring.calibration_dir, config.scoring.engines_dir, evidence_dir or config.evidence.dir, config.feedback,
        camera=cameras.get, running_product=lambda name: cameras[name].product if name in cameras else None,
    )
    return applier.apply(request).body
