"""The VLM stage: a flagged frame -> worker -> verdict as a result update.

The scorer decides and localises; the VLM explains. The scorer's result is already published
(vlm_status "pending") when a frame arrives here, and every frame that arrives gets exactly one
update: done (with the verdict), failed (with the reason; the scorer's verdict stands) or skipped.
With vlm.allow_downgrade a done update also says which verdict counts (final_verdict, decided_by).

The stage is the daemon's FlaggedSink: it explains one frame per call, on the thread of the one
flagged-frame queue (daemon.flagged_queue.FlaggedQueue, pipeline.flagged_queue_size), which keeps
the highest-scoring frames when full and serves the highest score first.

Example (what the daemon does when vlm.enabled):
    stage = VlmStage(config.vlm, publisher, "calibration"); stage.start()
    queue = FlaggedQueue(config.pipeline.flagged_queue_size, stage); queue.start()
    ...
    queue.close(deadline, abandon_current=False); stage.stop(timeout=10)   # before publisher.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config.vlm import VlmConfig
from ..errors import ConfigError, UserError
from ..mqtt.payloads import vlm_update
from ..records import Inspection, Region, ScoreResult, Verdict
from ..scorer.product import ReferenceIndex, load_product
from .knowledge import Knowledge, load_knowledge
from .prompt import PromptInputs, Reference, build_prompt, retrieve_reference
from .runner import check_model_files
from .schema import VerdictError, parse_verdict
from .worker import VlmWorker, WorkerReply

log = logging.getLogger(__name__)

UpdateFn = Callable[[dict[str, Any]], None]


# --- pure parts: the decision rule --------------------------------------------------


@dataclass(frozen=True)
class Decision:
    final_verdict: str  # "OK" | "NG"
    decided_by: str  # "scorer" | "vlm"


def decide(scorer_verdict: str, verdict: Verdict | None, allow_downgrade: bool, min_confidence: float) -> Decision:
    """Default: the scorer decides and both verdicts are reported. With `allow_downgrade`, a confident
    'no defect / within tolerance' from the VLM turns an NG into OK. The VLM never upgrades OK to NG."""
    if (
        allow_downgrade
        and verdict is not None
        and scorer_verdict == "NG"
        and not verdict.defect
        and verdict.confidence >= min_confidence
    ):
        return Decision("OK", "vlm")
    return Decision(scorer_verdict, "scorer")


def build_update(
    status: str,
    verdict: Verdict | None = None,
    error: str | None = None,
    decision: Decision | None = None,
) -> dict[str, Any]:
    """The `update` for publisher.publish_update (payloads.vlm_update's keys, plus the decision when
    the VLM may change the verdict)."""

    update = vlm_update(status, verdict, error)
    if decision is not None:
        update["final_verdict"] = decision.final_verdict
        update["decided_by"] = decision.decided_by
    return update


# --- the stage -----------------------------------------------------------------------------------


@dataclass
class _Job:
    inspection: Inspection
    frame_bgr: np.ndarray
    view_bgr: np.ndarray | None
    score: float
    threshold: float
    regions: tuple[Region, ...]
    product: Any | None  # scorer.product.ProductCalibration when the caller has it
    publish: UpdateFn
    queued_at: float = field(default_factory=time.monotonic)
    accepted: bool = False  # counted in VlmStage._outstanding until its update is published


@dataclass
class _ProductContext:
    knowledge: Knowledge | None
    knowledge_error: str
    reference_index: Any | None
    reference_note: str


class VlmStage:
    """Explains flagged frames with a GGUF model in a worker subprocess; never blocks the caller."""

    def __init__(self, config: VlmConfig, publisher: Any, calibration_dir: str | Path, worker: VlmWorker | None = None) -> None:
        self.config = config
        self.publisher = publisher
        self.calibration_dir = Path(calibration_dir)
        self.worker = worker or VlmWorker(config)
        self._running = False
        self._lock = threading.Lock()
        self._products: dict[str, tuple[Any, _ProductContext]] = {}
        self._counts = {k: 0 for k in ("submitted", "accepted", "skipped", "done", "failed", "downgraded", "agreed", "disagreed")}
        self._last: dict[str, Any] = {}
        self._in_flight: _Job | None = None
        self._stopping = False
        self._outstanding = 0  # accepted jobs whose update is not published yet (in progress)
        self.ask_state: Callable[[], dict[str, Any]] | None = None  # vlm.ask.AskService.state, shown under "ask"
        if config.enabled:
            check_model_files(config)  # a wrong path fails the start, not every flagged frame

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker (the model loads in the background)."""
        if self._running:
            return
        if not self.config.enabled:
            raise ConfigError("vlm.enabled is false: the VLM stage is not started (set vlm.enabled: true to explain flagged frames)")
        if self._stopping:
            raise RuntimeError("a stopped VlmStage cannot be restarted; create a new one (e.g. after a config reload)")
        self.worker.start()
        self._running = True

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker: a frame still being explained gets `failed`. Close the flagged-frame queue
        first (with abandon_current=False), so queued frames get `skipped`."""
        self._stopping = True
        self.worker.stop(timeout=min(timeout, 5.0))
        self._running = False

    def state(self) -> dict[str, Any]:
        with self._lock:
            counts = dict(self._counts)
            last = dict(self._last)
        return {
            **counts,
            "outstanding": self.outstanding(),
            "busy": self._in_flight is not None,
            "mode": self.config.mode,
            "last": last,
            "worker": self.worker.state(),
            **({"ask": self.ask_state()} if self.ask_state is not None else {}),
        }

    def outstanding(self) -> int:
        """Frames accepted whose update is not published yet (being explained); 0 = idle."""
        with self._lock:
            return self._outstanding

    # -- input ------------------------------------------------------------------------------------

    def explain(
        self,
        inspection: Inspection,
        frame_bgr: np.ndarray,
        score_result: ScoreResult,
        regions: tuple[Region, ...],
        *,
        view_bgr: np.ndarray | None = None,
        product: Any | None = None,
        publish_update: UpdateFn | None = None,
        queued_at: float | None = None,
    ) -> str:
        """Explain a flagged frame whose result was published with vlm_status 'pending'; blocks until
        its one update is published. Returns the outcome: done, failed or skipped (stage not running).

        `regions` are in `frame_bgr` pixels; `view_bgr` is the image the scorer saw (for retrieval;
        default: the frame). The arrays must not be modified meanwhile.
        """
        publish = publish_update or (lambda update: self.publisher.publish_update(inspection.inspection_id, update))
        job = _Job(
            inspection=inspection,
            frame_bgr=frame_bgr,
            view_bgr=view_bgr,
            score=float(score_result.score),
            threshold=float(score_result.threshold),
            regions=tuple(regions),
            product=product,
            publish=publish,
        )
        if queued_at is not None:
            job.queued_at = queued_at  # the wait in the flagged-frame queue counts in last.queue_ms
        with self._lock:
            self._counts["submitted"] += 1
        if self._stopping or not self._running:
            self._publish(job, build_update("skipped", error="the VLM stage is not running"), "skipped")
            return "skipped"
        with self._lock:
            self._outstanding += 1
            job.accepted = True
            self._counts["accepted"] += 1
        self._in_flight = job
        try:
            update, outcome = self._explain(job)
        except Exception as exc:  # noqa: BLE001 - a bug here must not lose the update
            log.exception("vlm stage failed on inspection %s", job.inspection.inspection_id)
            update, outcome = build_update("failed", error=f"VLM stage error: {type(exc).__name__}: {exc}"), "failed"
        finally:
            self._in_flight = None
        self._publish(job, update, outcome)
        return outcome

    def __call__(self, item: Any) -> None:
        """The daemon's FlaggedSink (a daemon.flagged_queue.FlaggedFrame): explain it now."""
        self.explain(
            item.inspection,
            item.frame.pixels,
            item.score,
            item.inspection.regions,
            view_bgr=item.view,
            product=item.product,
            publish_update=item.publish_update,
            queued_at=getattr(item, "queued_at", None),
        )

    def _explain(self, job: _Job) -> tuple[dict[str, Any], str]:
        config = self.config
        try:
            context = self._product_context(job.inspection.product, job.product)
        except UserError as exc:
            return build_update("failed", error=str(exc)), "failed"
        if context.knowledge_error:
            return build_update("failed", error=context.knowledge_error), "failed"
        reference: Reference | None = None
        if config.mode == "image" and config.use_reference and context.reference_index is not None:
            try:
                reference = retrieve_reference(context.reference_index, job.view_bgr if job.view_bgr is not None else job.frame_bgr)
            except Exception as exc:  # noqa: BLE001 - explain without a reference rather than not at all
                log.warning("vlm: no reference for %s: %s", job.inspection.inspection_id, exc)
        prompt = build_prompt(
            PromptInputs(
                product=job.inspection.product,
                knowledge=context.knowledge,
                frame_bgr=job.frame_bgr,
                score=job.score,
                threshold=job.threshold,
                regions=job.regions,
                reference=reference,
                mode=config.mode,
                reasoning=config.reasoning,
                image_max_side=config.image_max_side,
                crop_margin=config.crop_margin,
            )
        )
        reply: WorkerReply = self.worker.infer(prompt.messages, prompt.grammar, config.timeout_s)
        self._remember(job, reply, prompt.image_count, reference)
        if not reply.ok:
            return build_update("failed", error=reply.reason), "failed"
        if (reply.completion or {}).get("finish_reason") == "length":
            return (
                build_update("failed", error=f"the answer was cut off at vlm.max_tokens={config.max_tokens}; raise it"),
                "failed",
            )
        try:
            verdict, _observations = parse_verdict(
                reply.text, prompt.defect_types, model=reply.model, latency_ms=reply.wall_ms
            )
        except VerdictError as exc:
            return build_update("failed", error=f"invalid model output: {exc}"), "failed"
        decision = decide(job.inspection.verdict, verdict, config.allow_downgrade, config.downgrade_min_confidence)
        with self._lock:
            agrees = verdict.defect == (job.inspection.verdict == "NG")
            self._counts["agreed" if agrees else "disagreed"] += 1
            if decision.decided_by == "vlm":
                self._counts["downgraded"] += 1
        return build_update("done", verdict, decision=decision if config.allow_downgrade else None), "done"

    def _remember(self, job: _Job, reply: WorkerReply, images: int, reference: Reference | None) -> None:
        completion = reply.completion or {}
        with self._lock:
            self._last = {
                "inspection_id": job.inspection.inspection_id,
                "ok": reply.ok,
                "reason": reply.reason,
                "queue_ms": round(1000.0 * (time.monotonic() - job.queued_at) - reply.wall_ms, 1),
                "wall_ms": round(reply.wall_ms, 1),
                "prompt_tokens": completion.get("prompt_tokens"),
                "generated_tokens": completion.get("generated_tokens"),
                "images": images,
                "reference": str(reference.path) if reference is not None else None,
                "reference_similarity": round(reference.similarity, 4) if reference is not None else None,
            }

    def _product_context(self, name: str, product: Any | None) -> _ProductContext:
        """Knowledge and reference index of a product, cached per calibration (reloaded when the
        calibration or the knowledge file changes). The knowledge comes from the calibration the
        scorer used (so a config reload that moves calibration_dir is followed)."""
        calibration_dir = self._calibration_dir(product)
        knowledge_path = calibration_dir / name / "knowledge.yaml"
        stamp = (
            str(calibration_dir),
            getattr(product, "calibration_id", None),
            knowledge_path.stat().st_mtime_ns if knowledge_path.is_file() else None,
        )
        cached = self._products.get(name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        knowledge, knowledge_error = None, ""
        try:
            knowledge = load_knowledge(calibration_dir, name)
        except ConfigError as exc:
            knowledge_error = str(exc)
            log.error("vlm: %s", exc)
        index, note = None, ""
        if self.config.mode == "image" and self.config.use_reference:
            index, note = self._reference_index(name, product)
        context = _ProductContext(knowledge, knowledge_error, index, note)
        self._products[name] = (stamp, context)
        return context

    def _calibration_dir(self, product: Any | None) -> Path:
        directory = getattr(product, "directory", None)
        return Path(directory).parent if directory is not None else self.calibration_dir

    def _reference_index(self, name: str, product: Any | None) -> tuple[Any | None, str]:
        try:

            if product is None:
                product = load_product(self.calibration_dir, name)
            return ReferenceIndex(product), ""
        except Exception as exc:  # noqa: BLE001 - no references: explain without one
            log.warning("vlm: product %s has no usable reference index (%s); prompts go without a reference", name, exc)
            return None, str(exc)

    def _publish(self, job: _Job, update: dict[str, Any], outcome: str) -> None:
        with self._lock:
            self._counts[outcome] += 1
        try:
            job.publish(update)
        except Exception:  # noqa: BLE001 - the publisher logs; the stage must go on
            log.exception("vlm: could not publish the update for inspection %s", job.inspection.inspection_id)
        finally:
            with self._lock:  # after the update is handed on, so outstanding() == 0 means all are out
                if job.accepted:
                    job.accepted = False
                    self._outstanding -= 1
