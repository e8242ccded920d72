"""Reload (SIGHUP) and product switch (MQTT product/set): new scorers and pipelines without a restart.

`ReloadMixin` is part of `Daemon` (daemon.py). A reload keeps the MQTT session, the spool, the
evidence store and the VLM stage (the `_RESTART_ONLY` sections); captures whose source did not
change keep running, and an mqtt trigger is handed over with the triggers waiting in it.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from ..capture.reader import Capture
from ..config import load_config
from ..errors import CalibrationError, UserError
from ..scorer.product import Scorer, load_product
from .drift import keep_versions
from .pipeline import CameraPipeline

log = logging.getLogger(__name__)

# Config sections a SIGHUP does not apply: they hold the MQTT session, the spool, the evidence store and
# the loaded VLM, which live as long as the process.
_RESTART_ONLY = ("station", "mqtt", "spool", "evidence", "vlm", "feedback")


class ReloadMixin:
    """Product switch, scorer loading and config reload of the Daemon."""

    def _on_product_set(self, product: str) -> None:
        """paho's network thread: hand the name to the one switch worker (the latest request wins)."""
        with self._switch_cond:
            self._switch_wanted = product
            if self._switch_thread is None or not self._switch_thread.is_alive():
                self._switch_thread = threading.Thread(target=self._switch_worker, name="product-switch", daemon=True)
                self._switch_thread.start()
            self._switch_cond.notify()

    def _switch_worker(self) -> None:
        """The one product-switch thread: takes the newest wanted product, never dies on an error."""
        while True:
            with self._switch_cond:
                while self._switch_wanted is None and not self._stopping:
                    self._switch_cond.wait(1.0)
                if self._stopping:
                    return
                product, self._switch_wanted = self._switch_wanted, None
            try:
                self._switch_product(product)
            except Exception:  # noqa: BLE001 - a bug in one switch must not end every later one
                self.counters.add("product_switch_errors")
                log.exception("product switch to %r failed; still running the previous product", product)

    def _switch_product(self, product: str) -> None:
        with self._product_lock:
            with self._pipelines_lock:
                names = list(self.pipelines)
                current = {p.product_name for p in self.pipelines.values()}
            if current == {product}:
                log.info("product/set %s: every camera already runs it; nothing to do", product)
                return
            log.info("switching every camera to product %s (MQTT product/set)", product)
            scorers: dict[str, object] = {}
            try:
                for name in names:
                    # Never a TensorRT build on a remote command: it takes minutes and a broker user could start it.
                    scorers[name] = self._load_scorer(product, allow_build=False)
            except Exception as exc:  # noqa: BLE001 - UserError is the expected kind; anything else is logged in full
                for scorer in scorers.values():
                    scorer.close()
                self.counters.add("product_switch_errors")
                if isinstance(exc, UserError):
                    log.error("product switch to %r refused, still running the previous product: %s", product, exc)
                else:
                    log.exception("product switch to %r failed, still running the previous product", product)
                return
            self._product_override = product
            with self._pipelines_lock:
                for name, scorer in scorers.items():
                    pipeline = self.pipelines.get(name)
                    if pipeline is None:
                        scorer.close()
                    else:
                        pipeline.swap_scorer(scorer)
            self.counters.add("product_switches")

    def reload_product(self, product: str) -> int:
        """A new calibration version of `product` was written while running (operator feedback, a threshold
        step): every pipeline scoring it gets a scorer of the new version from its next frame on, so no frame
        is lost. Returns the number of cameras swapped; raises (UserError) when the version does not load,
        and the previous scorers keep running."""
        with self._product_lock:  # no product switch or reload in between
            with self._pipelines_lock:
                targets = [p for p in self.pipelines.values() if p.product_name == product]
            scorers = []
            try:
                for _ in targets:
                    scorers.append(self._load_scorer(product, allow_build=False))  # one per pipeline: not thread-safe
            except BaseException:
                for scorer in scorers:
                    scorer.close()
                raise
            swapped = 0
            with self._pipelines_lock:
                for pipeline, scorer in zip(targets, scorers):
                    if self.pipelines.get(pipeline.name) is pipeline and pipeline.product_name == product:
                        pipeline.swap_scorer(scorer)
                        swapped += 1
                    else:
                        scorer.close()
        log.info("product %s: new calibration loaded on %d camera(s)", product, swapped)
        return swapped

    def running_product(self, camera: str) -> str | None:
        """The product `camera` scores now (after switches), None when there is no such camera."""
        with self._pipelines_lock:
            pipeline = self.pipelines.get(camera)
        return pipeline.product_name if pipeline is not None else None

    # --- models -------------------------------------------------------------------------------

    def _load_scorer(self, product_name: str, allow_build: bool | None = None):
        """Load a calibration and build its scorer, warmed up (the first run of a graph is slow).

        allow_build None = scoring.allow_engine_build (the start); reloads and switches pass False.
        Every failure is a UserError naming the file and the fix; nothing half-built is left open.
        """
        scoring = self.config.scoring
        product = load_product(scoring.calibration_dir, product_name, scoring.engines_dir)
        build = scoring.allow_engine_build if allow_build is None else allow_build
        scorer = Scorer(product, backend=scoring.backend, threads=scoring.threads, precision=scoring.precision, allow_build=build)
        try:
            h, w = product.input_size
            scorer.score(np.zeros((h, w, 3), np.uint8))
        except Exception as exc:  # noqa: BLE001 - a graph that loads but cannot run
            scorer.close()
            raise CalibrationError(
                f"the scorer graph {product.scorer_onnx} of product {product_name!r} fails on a test frame "
                f"({type(exc).__name__}: {exc}); recalibrate with `edge-inspect calibrate --product {product_name} "
                "--images DIR --force`"
            ) from None
        log.info("loaded product %s (calibration %s, threshold %.4f, %s)", product.name, product.calibration_id,
                 product.threshold, scorer.backend.describe())
        return scorer

    # --- reload (SIGHUP) ----------------------------------------------------------------------

    def _reload(self) -> None:
        if self.config_path is None:
            log.warning("SIGHUP ignored: the daemon was not started from a config file")
            return
        self.notifier.reloading()
        log.info("reloading %s", self.config_path)
        scorers: dict[str, object] = {}
        try:
            new = load_config(self.config_path)
            changed = [key for key in _RESTART_ONLY if getattr(new, key) != getattr(self.config, key)]
            if new.pipeline.flagged_queue_size != self.config.pipeline.flagged_queue_size:
                changed.append("pipeline.flagged_queue_size")  # the flagged-frame queue lives as long as the process
            if changed:
                log.warning("%s changes take effect at the next restart; the MQTT session, the evidence store and "
                            "the VLM stage are kept", "/".join(changed))
            new = new.model_copy(update={key: getattr(self.config, key) for key in _RESTART_ONLY})
            with self._product_lock:
                for c in new.cameras:
                    # No TensorRT build here: this runs on the loop that feeds the systemd watchdog.
                    scorers[c.name] = self._load_scorer(self._product_override or c.product, allow_build=False)
                for camera in new.cameras:
                    Capture(camera.name, camera.source, camera.reconnect).check()
        except Exception as exc:  # noqa: BLE001 - whatever fails, the previous config keeps running
            for scorer in scorers.values():
                scorer.close()
            self.counters.add("reload_errors")
            if isinstance(exc, UserError):
                log.error("reload refused, still running the previous config: %s", exc)
            else:
                log.exception("reload failed, still running the previous config")
            self.notifier.ready(status=f"reload failed: {(str(exc).splitlines() or [type(exc).__name__])[0]}")
            return
        deadline = time.monotonic() + new.pipeline.drain_timeout_s
        with self._pipelines_lock:
            old_pipelines = dict(self.pipelines)
        replaced: dict[str, CameraPipeline] = {}
        for camera in new.cameras:
            old = old_pipelines.pop(camera.name, None)
            keep_capture = old is not None and (old.config.source, old.config.reconnect) == (camera.source, camera.reconnect)
            # An mqtt trigger is handed over with the triggers still waiting in it.
            keep_trigger = (old is not None and keep_capture and old.config.trigger == camera.trigger
                            and camera.trigger.mode == "mqtt")
            if old is not None:
                old.drain(deadline)
                old.close_scorer()
                if not keep_capture:
                    old.capture.stop()
            pipeline = CameraPipeline(
                new.station, camera, new.pipeline, scorers[camera.name], self.publisher, self.flagged,
                capture=old.capture if keep_capture else Capture(camera.name, camera.source, camera.reconnect, on_state=self._on_capture_state),
                trigger=old.trigger if keep_trigger else None,
                stats=old.stats if old is not None else None,
                evidence=self.evidence, drift=getattr(self, "drift", None),
            )
            if keep_trigger:
                pipeline.trigger.last_seq = old.trigger.last_seq
            pipeline.start(start_capture=not keep_capture)
            replaced[camera.name] = pipeline
        for gone in old_pipelines.values():
            log.info("camera %s is no longer in the config: stopping it", gone.name)
            gone.capture.stop()
            gone.drain(deadline)
            gone.close_scorer()
        with self._pipelines_lock:
            self.pipelines = replaced
        self.config = new
        if getattr(self, "drift", None) is not None:
            self.drift.configure(new.threshold, keep_versions(new), new.scoring.calibration_dir)  # the drift alarm and threshold.adapt apply at once
        self.counters.add("reloads")
        log.info("reloaded: %s", ", ".join(f"{p.name} [{p.product_name}]" for p in replaced.values()))
        self.notifier.ready(status=self.status_line())
