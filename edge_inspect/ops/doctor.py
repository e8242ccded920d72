"""`edge-inspect doctor`: check everything the daemon needs, and say how to fix what is wrong.

Each check is a function of the config that yields `CheckResult`s (name, ok / warn / fail / skip,
what was found, and for warn/fail the fix). A check that cannot run because an earlier one failed
(no config, no calibration) says "skip" with the reason. Nothing here changes state: the broker
gets a connection under its own client id (never the daemon's, which would knock the daemon off),
the camera is opened for one frame, directories get a probe file that is removed again.

Example:
    results = run_checks("/etc/edge-inspect/line3.yaml")
    print(format_table(results))
    sys.exit(exit_code(results))          # 1 when any check failed
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import numpy as np

from ..calibration.store import history
from ..calibration.stream import CandidateStore
from ..capture.sources import EndOfStream, SourceError, create_source
from ..config import load_config
from ..errors import UserError
from ..mqtt.client import describe_connect_error, make_client, tls_context
from ..mqtt.payloads import typical_result_bytes
from ..mqtt.spool import spool_capacity
from ..scorer.backends import create_backend
from ..scorer.backends import trt_plan_cache as plan_cache
from ..scorer.backends.trt_backend import CudaDevice, tensorrt_available
from ..scorer.product import load_product
from ..vlm.runner import check_model_files

Status = Literal["ok", "warn", "fail", "skip"]

GGUF_MAGIC = b"GGUF"
DISK_FAIL_MB = 100.0
DISK_WARN_MB = 1024.0


@dataclass(frozen=True)
class CheckResult:
    """One line of the doctor's table."""

    name: str
    status: Status
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class DoctorContext:
    """What the checks share: the config path, the loaded config (None when it did not load), limits."""

    config_path: Path
    timeout_s: float = 10.0
    config: Any = None
    config_error: str = ""


Check = Callable[[DoctorContext], Iterable[CheckResult]]


def ok(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "ok", detail)


def warn(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "warn", detail, fix)


def fail(name: str, detail: str, fix: str) -> CheckResult:
    return CheckResult(name, "fail", detail, fix)


def skip(name: str, detail: str) -> CheckResult:
    return CheckResult(name, "skip", detail)


# ------------------------------------------------------------------------------------------------
# Checks


def check_config(ctx: DoctorContext) -> Iterator[CheckResult]:
    """The config file parses and validates (everything else reads it)."""

    try:
        ctx.config = load_config(ctx.config_path)
    except UserError as exc:
        ctx.config_error = str(exc)
        yield fail("config", str(exc), f"edit {ctx.config_path} (every key is described in docs/config.md)")
        return
    cameras = ctx.config.cameras
    yield ok("config", f"{ctx.config_path}: station {ctx.config.station}, {len(cameras)} camera"
                       f"{'s' if len(cameras) != 1 else ''} ({', '.join(c.name for c in cameras)})")


def check_sources(ctx: DoctorContext) -> Iterator[CheckResult]:
    """Every camera's source opens and delivers one frame."""
    if ctx.config is None:
        yield skip("source", "needs a valid config")
        return
    for camera in ctx.config.cameras:
        yield _check_source(camera, ctx.timeout_s)


def _check_source(camera: Any, timeout_s: float) -> CheckResult:
    name = f"source {camera.name}"
    kind = camera.source.type
    fixes = {
        "v4l2": "check source.device (ls /dev/v4l/by-id/), that the user is in the 'video' group, and that no "
                "other program (or the running daemon: systemctl stop edge-inspect) holds the camera",
        "url": "check source.url (open it with ffplay/VLC from this machine), credentials, and the network path",
        "gstreamer": "run the pipeline with gst-launch-1.0 (ending in fakesink) to see which element fails",
        "replay": "point source.path at a folder of images or a video file",
    }
    try:
        source = create_source(camera.source, camera.reconnect)
        source.check()
    except UserError as exc:
        return fail(name, str(exc), fixes.get(kind, "fix the camera's source section"))
    outcome: dict[str, Any] = {}

    def grab() -> None:
        try:
            source.open()
            outcome["frame"] = source.read()
        except (SourceError, EndOfStream) as exc:
            if isinstance(exc, SourceError):
                outcome["error"] = str(exc)
            elif getattr(source, "skipped", 0):
                outcome["error"] = f"no readable frame in it ({source.skipped} skipped; last: {source.last_skip})"
            else:
                outcome["error"] = "no frames in it"
        except Exception as exc:  # a driver or decoder exception also means "no frame"
            outcome["error"] = f"{type(exc).__name__}: {exc}"
        finally:
            source.close()

    limit = max(timeout_s, float(getattr(camera.reconnect, "open_timeout_s", 0)) + 2.0)
    thread = threading.Thread(target=grab, name=f"doctor-{camera.name}", daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        return fail(name, f"{source.describe()}: no frame within {limit:.0f} s", fixes.get(kind, ""))
    if "error" in outcome:
        return fail(name, f"{source.describe()}: {outcome['error']}", fixes.get(kind, ""))
    frame = outcome["frame"]
    height, width = frame.shape[:2]
    detail = f"{source.describe()}: {width}x{height} frame in {(time.monotonic() - started) * 1000:.0f} ms"
    roi = getattr(camera, "roi", None)
    if roi is not None and (roi.x + roi.width > width or roi.y + roi.height > height):
        return warn(name, f"{detail}; roi {roi.x},{roi.y} {roi.width}x{roi.height} reaches outside the frame",
                    "shrink or move the camera's roi to fit the frame (the crop is clipped otherwise)")
    return ok(name, detail)


_CONNACK_FIXES = {
    0x84: "the broker does not speak this MQTT version: set mqtt.protocol: \"3.1.1\"",
    0x85: "the broker rejected the client id: set mqtt.client_id to a plain name (letters, digits, '-')",
    0x88: "the broker is up but not accepting clients yet: check its log, then retry",
    0x8A: "this client is banned on the broker: ask its administrator",
    0x8C: "the broker wants another authentication method: check its listener settings",
    0x9F: "too many connections in a short time: wait and retry",
}


def check_broker(ctx: DoctorContext) -> Iterator[CheckResult]:
    """The broker is reachable and accepts our credentials (CONNACK reason in words)."""
    if ctx.config is None:
        yield skip("broker", "needs a valid config")
        return
    yield _check_broker(ctx.config.mqtt, ctx.config.station, ctx.timeout_s)


def _check_broker(mqtt_config: Any, station: str, timeout_s: float) -> CheckResult:
    name = "broker"
    broker = f"{mqtt_config.host}:{mqtt_config.broker_port}"
    password, password_source = mqtt_config.resolve_password()
    auth_fix = (f"check mqtt.username ({mqtt_config.username!r}) and the password (systemd credential "
                f"{mqtt_config.password_credential!r} or env {mqtt_config.password_env}; found: {password_source}) "
                "against the broker's password file and ACL")
    try:
        context = tls_context(mqtt_config) if mqtt_config.tls.enabled else None
    except UserError as exc:
        return fail(name, str(exc), "fix mqtt.tls (paths are read as the daemon's user)")
    client_id = f"{mqtt_config.resolved_client_id(station)}-doctor-{os.getpid()}"[:128]
    client = make_client(mqtt_config, client_id, password=password, tls=context)
    answer: dict[str, Any] = {}
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        answer["reason"] = reason_code
        done.set()

    def on_disconnect(client, userdata, flags, reason_code, properties) -> None:
        answer.setdefault("closed", reason_code)
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    started = time.monotonic()
    try:
        client.connect(mqtt_config.host, mqtt_config.broker_port, keepalive=mqtt_config.keepalive_s)
    except (OSError, ValueError) as exc:
        return fail(name, describe_connect_error(exc, broker, mqtt_config),
                    f"start the broker (systemctl start mosquitto) or fix mqtt.host / mqtt.port (now {broker})")
    client.loop_start()
    try:
        if not done.wait(timeout_s):
            return fail(name, f"{broker} accepted the TCP connection but sent no CONNACK within {timeout_s:.0f} s",
                        "check that this port is an MQTT listener (not TLS when mqtt.tls.enabled is false, "
                        "or the other way round)")
        reason = answer.get("reason")
        if reason is None:
            return fail(name, f"{broker} closed the connection before accepting it ({answer.get('closed')})",
                        "check mqtt.tls (the broker may require TLS or a client certificate) and its log")
        if reason.is_failure:
            code = int(reason.value)
            fix = auth_fix if code in (4, 5, 0x86, 0x87) else _CONNACK_FIXES.get(code, "see the broker's log")
            return fail(name, f"{broker} refused the connection: {reason} (CONNACK {code:#04x})", fix)
        elapsed = (time.monotonic() - started) * 1000
        how = ", ".join(filter(None, [
            f"MQTT {mqtt_config.protocol}", "TLS" if context is not None else "",
            f"user {mqtt_config.username}" if mqtt_config.username else "anonymous",
        ]))
        detail = f"{broker} accepted the connection ({how}) in {elapsed:.0f} ms"
        if mqtt_config.username and password is None:
            return warn(name, f"{detail}, but no password was found", auth_fix)
        if context is not None and not mqtt_config.tls.verify:
            return warn(name, f"{detail}; the certificate is NOT verified",
                        "set mqtt.tls.verify: true and mqtt.tls.ca_file to the broker's CA")
        return ok(name, detail)
    finally:
        client.disconnect()
        client.loop_stop()


def check_calibrations(ctx: DoctorContext) -> Iterator[CheckResult]:
    """Every product the cameras use is calibrated and its scorer graph loads and runs here."""
    if ctx.config is None:
        yield skip("calibration", "needs a valid config")
        return
    scoring = ctx.config.scoring
    for product in dict.fromkeys(camera.product for camera in ctx.config.cameras):
        calibration = None
        for result in _check_calibration(product, scoring):
            if isinstance(result, CheckResult):
                yield result
            else:
                calibration = result
        if calibration is None:
            yield skip(f"engine {product}", "needs a valid calibration")
        else:
            yield _check_engine(calibration, scoring)
            yield _check_stream(calibration, ctx.config.stream, scoring.calibration_dir)


def _check_calibration(product: str, scoring: Any) -> Iterator[Any]:
    name = f"calibration {product}"
    try:
        calibration = load_product(scoring.calibration_dir, product, scoring.engines_dir)
    except UserError as exc:
        yield fail(name, str(exc),
                   f"edge-inspect calibrate --product {product} --images DIR_OF_GOOD_PARTS "
                   f"--calibration-dir {scoring.calibration_dir} --engines-dir {scoring.engines_dir}")
        return
    height, width = calibration.input_size
    created = str(calibration.manifest.get("created_utc") or "")[:10]
    yield ok(name, f"threshold {calibration.threshold:.4g}, input {width}x{height}, calibration "
                   f"{calibration.calibration_id}" + (f", calibrated {created}" if created else ""))
    yield calibration


def _check_stream(calibration: Any, stream: Any, calibration_dir: Any) -> CheckResult:
    """Learning from the line: on or off for this product, what it has learned, what it holds on disk."""
    name = f"stream {calibration.name}"
    if not stream.learns(calibration.name):
        return ok(name, "learning from the line is off for this product (stream.enabled / stream.products)")
    if calibration.bank_capacity is None:
        return warn(name, "learning from the line is on, but this product's scorer graph holds its bank (calibrated before "
                          "the bank was a graph input): it learns nothing",
                    f"recalibrate once: edge-inspect calibrate --product {calibration.name} --images DIR --force")
    store = CandidateStore(calibration_dir, calibration.name, stream.max_frames)
    entries = store.entries()
    learned = (calibration.manifest.get("stream") or {}).get("frames_used")
    try:
        kept = history(calibration_dir, calibration.name)
    except UserError:  # calibrated before versions: no history
        kept = []
    versions = [h for h in kept if h.get("change") == "stream"]
    return ok(name, f"learning from the line: {len(entries)} candidate frame(s) on disk ({store.disk_bytes() / 2**20:.1f} MB of "
                    f"at most ~{stream.max_frames * 0.3:.0f} MB), {len(versions)} stream version(s) kept"
                    + (f"; the active version learned from {learned} frame(s)" if learned else "")
                    + f"; refit every {stream.refit_every} candidates or {stream.refit_minutes:g} min")


def _check_engine(calibration: Any, scoring: Any) -> CheckResult:
    """TensorRT: a plan built for this GPU and TensorRT exists (or may be built); else ONNX Runtime runs the graph."""
    name = f"engine {calibration.name}"
    if scoring.backend in ("auto", "tensorrt"):
        try:

            usable, reason = tensorrt_available()
        except ImportError as exc:
            usable, reason = False, f"TensorRT backend unavailable: {exc}"
        if usable:
            return _check_tensorrt_plan(calibration, scoring, name)
        if scoring.backend == "tensorrt":
            return fail(name, f"scoring.backend is tensorrt but {reason}",
                        "install TensorRT 10 and pycuda (pip install 'edge-inspect[tensorrt]'), or set "
                        "scoring.backend: onnxruntime")
    return _check_onnxruntime(calibration, scoring, name)


def _check_onnxruntime(calibration: Any, scoring: Any, name: str) -> CheckResult:


    started = time.monotonic()
    try:
        backend = create_backend("onnxruntime", calibration.scorer_onnx, threads=scoring.threads, bank=calibration.bank)
    except Exception as exc:  # a corrupt graph, an opset this onnxruntime lacks, out of memory
        return fail(name, f"ONNX Runtime cannot load {calibration.scorer_onnx}: {type(exc).__name__}: {exc}",
                    f"recalibrate (edge-inspect calibrate --product {calibration.name} --force ...) or upgrade "
                    "onnxruntime to the version it was exported for")
    try:
        shape = backend.input_shape
        if tuple(shape[-2:]) != tuple(calibration.input_size):
            return fail(name, f"graph input {shape} does not match the calibration's input size "
                              f"{calibration.input_size}", f"recalibrate {calibration.name} with --force")
        anomaly_map, score = backend.run(np.zeros(shape, np.float32))
        if not np.isfinite(score) or not np.all(np.isfinite(anomaly_map)):
            return fail(name, "the graph runs but returns NaN or infinite scores",
                        f"recalibrate {calibration.name} with --force")
        providers = ", ".join(getattr(backend, "providers", []) or ["onnxruntime"])
        elapsed = (time.monotonic() - started) * 1000
        detail = f"ONNX Runtime ({providers}) loads and runs {calibration.scorer_onnx.name} in {elapsed:.0f} ms"
        if scoring.backend == "auto":
            detail += " (TensorRT not usable here)"
        return ok(name, detail)
    finally:
        backend.close()


def _check_tensorrt_plan(calibration: Any, scoring: Any, name: str) -> CheckResult:
    device = CudaDevice(0)
    try:
        facts = device.facts()
    finally:
        device.release()
    owner = plan_cache.plan_owner(calibration.scorer_onnx, calibration.name)
    key = plan_cache.plan_key(calibration.scorer_onnx, owner, scoring.precision, facts)
    plan = plan_cache.plan_path(scoring.engines_dir, key)
    problem = plan_cache.plan_problem(plan, key)
    where = f"{facts.gpu_name}, TensorRT {facts.tensorrt_version}, {scoring.precision}"
    if problem is None:
        return ok(name, f"TensorRT plan {plan.name} matches this device ({where})")
    build = (f"edge-inspect build-engine --product {calibration.name} --precision {scoring.precision} "
             f"--engines-dir {scoring.engines_dir}")
    if scoring.allow_engine_build:
        return warn(name, f"no usable TensorRT plan for {where} ({problem}); the daemon will build one at start "
                          "(minutes, before the first frame)", f"build it now: {build}")
    return fail(name, f"no usable TensorRT plan for {where} ({problem}) and scoring.allow_engine_build is false",
                build)


def read_gguf_header(path: Path) -> tuple[int, int]:
    """(format version, tensor count) of a GGUF file; ValueError when it is not one."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if len(head) < 16 or head[:4] != GGUF_MAGIC:
        raise ValueError(f"not a GGUF file (starts with {head[:4]!r}, expected {GGUF_MAGIC!r})")
    version = int.from_bytes(head[4:8], "little")
    if version not in (1, 2, 3):
        raise ValueError(f"GGUF version {version} is not one llama.cpp reads (1-3)")
    return version, int.from_bytes(head[8:16], "little")


def check_vlm(ctx: DoctorContext) -> Iterator[CheckResult]:
    """When the VLM is enabled: llama-cpp-python imports and the GGUF files are GGUF files."""
    if ctx.config is None:
        yield skip("vlm", "needs a valid config")
        return
    vlm = getattr(ctx.config, "vlm", None)
    if vlm is None or not vlm.enabled:
        yield skip("vlm", "vlm.enabled is false: flagged frames get no explanation")
        return
    try:
        import llama_cpp

        yield ok("vlm runtime", f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}")
    except ImportError as exc:
        yield fail("vlm runtime", f"llama-cpp-python does not import ({exc})",
                   "pip install 'edge-inspect[vlm]' (on a Jetson: tools/ensure_llama_wheel.sh for a CUDA build)")
    files = [("vlm model", "model", vlm.model)]
    if vlm.mode == "image":
        files.append(("vlm projector", "mmproj", vlm.mmproj))
    for name, key, value in files:
        if not value:
            yield fail(name, f"vlm.{key} is empty", f"set vlm.{key} to the GGUF file"
                       + (" (the mmproj that belongs to the model), or vlm.mode: text" if key == "mmproj" else ""))
            continue
        path = Path(value)
        try:
            version, tensors = read_gguf_header(path)
        except FileNotFoundError:
            yield fail(name, f"vlm.{key}: {path} does not exist", f"download the GGUF or fix vlm.{key}")
            continue
        except (OSError, ValueError) as exc:
            yield fail(name, f"vlm.{key}: {path}: {exc}", f"download the file again (a partial download or an "
                                                          f"HTML error page looks like this) or fix vlm.{key}")
            continue
        yield ok(name, f"{path.name}: GGUF v{version}, {tensors} tensors, {path.stat().st_size / 1e9:.2f} GB")


def check_directories(ctx: DoctorContext) -> Iterator[CheckResult]:
    """The folders the daemon writes to exist (or can be made), are writable, and have room."""
    if ctx.config is None:
        yield skip("disk", "needs a valid config")
        return
    config = ctx.config
    folders: list[tuple[str, Path, bool]] = [  # (role, path, daemon writes there)
        ("calibration", Path(config.scoring.calibration_dir), False),
        ("engines", Path(config.scoring.engines_dir), bool(config.scoring.allow_engine_build)),
        ("spool", Path(config.spool.path).parent, True),
    ]
    evidence = getattr(config, "evidence", None)
    if evidence is not None and evidence.enabled:
        folders.append(("evidence", Path(evidence.dir), True))
    for role, path, writes in folders:
        extra = spool_capacity_note(config.spool) if role == "spool" else ""
        yield _check_folder(f"disk {role}", path, writes, extra)


def _check_folder(name: str, path: Path, writes: bool, extra: str = "") -> CheckResult:
    problem = folder_problem(path, writes)
    if problem is not None:
        return fail(name, *problem)
    existing = _nearest_existing(path)
    free_mb = shutil.disk_usage(existing).free / 1e6
    where = f"{path}" + ("" if existing == path else f" (not there yet; created in {existing})")
    detail = f"{where}: {'writable' if writes else 'readable'}, {free_mb / 1024:.1f} GB free{extra}"
    if free_mb < DISK_FAIL_MB:
        return fail(name, detail, "free disk space: the spool and evidence need room to keep results")
    if free_mb < DISK_WARN_MB:
        return warn(name, detail, "free disk space or lower evidence.max_mb / spool.max_bytes")
    return ok(name, detail)


def _nearest_existing(path: Path) -> Path:
    return next((p for p in [path, *path.absolute().parents] if p.exists()), Path("/"))


def folder_problem(path: Path, writes: bool) -> tuple[str, str] | None:
    """(what is wrong, the fix) when this user cannot use the folder `path` (one not there yet is judged by its
    nearest existing parent, where the daemon would create it), else None. A probe file is created and removed."""
    user = _user_name()
    existing = _nearest_existing(path)
    if existing != path and not writes:
        return f"{path} does not exist", "create it or fix the path in the config"
    if not existing.is_dir():
        return f"{existing} is not a folder", "fix the path in the config"
    where = f"{path}" + ("" if existing == path else f" (not there yet; created in {existing})")
    if writes:
        try:
            with tempfile.NamedTemporaryFile(dir=existing, prefix=".edge-inspect-doctor-"):
                pass
        except OSError as exc:
            return (f"{where}: {user} cannot write there ({exc.strerror or exc})",
                    f"chown/chmod it for {user} (under systemd: StateDirectory=) or point the config elsewhere")
    elif not os.access(existing, os.R_OK | os.X_OK):
        return f"{where}: {user} cannot read it", f"chmod/chown it so {user} can read it"
    return None


def spool_capacity_note(spool_config: Any) -> str:
    """How many typical results the spool holds through a broker outage, and what limits it."""
    capacity = spool_capacity(spool_config)
    size = typical_result_bytes()
    limit = ("its disk (spool.max_bytes does not fit)" if capacity.limited_by == "disk"
             else f"spool.max_bytes, {capacity.max_bytes / 2**20:g} MiB")
    rows = " and spool.max_rows" if capacity.results(size) == capacity.max_rows else ""
    return (f"; holds about {capacity.results(size):,} results of {size} B through an outage (limited by "
            f"{limit}{rows}; log bound {capacity.wal_bytes // 1024} KiB)")


def config_file_problems(config: Any) -> list[CheckResult]:
    """What `run` refuses at start, found by reading files only: no camera is opened, no broker dialled, no model
    loaded (`check-config` runs these; `doctor` runs the fuller checks). Failures only."""
    problems: list[CheckResult] = []
    scoring = config.scoring
    for camera in config.cameras:
        try:
            create_source(camera.source, camera.reconnect).check()
        except UserError as exc:
            problems.append(fail(f"source {camera.name}", f"cameras[{camera.name}].{exc}",
                                 "fix the camera's source section (a replay path must be a folder of images or a video)"))
    for product in dict.fromkeys(camera.product for camera in config.cameras):
        problems += [r for r in _check_calibration(product, scoring) if isinstance(r, CheckResult) and r.status == "fail"]
    spool = Path(config.spool.path)
    problem = folder_problem(spool.parent, writes=True)
    if problem is None:
        for file in (spool, spool.with_name(spool.name + ".lock")):
            if file.exists() and not os.access(file, os.R_OK | os.W_OK):
                problem = (f"{file}: {_user_name()} cannot read and write it",
                           "chown it to the daemon's user or point spool.path elsewhere")
    if problem is not None:
        problems.append(fail("spool", f"spool.path: {problem[0]}", problem[1]))
    evidence = getattr(config, "evidence", None)
    if evidence is not None and evidence.enabled:
        problem = folder_problem(Path(evidence.dir), writes=True)
        if problem is not None:
            problems.append(fail("evidence", f"evidence.dir: {problem[0]}", f"{problem[1]}, or evidence.enabled: false"))
    vlm = getattr(config, "vlm", None)
    if vlm is not None and vlm.enabled:
        try:
            check_model_files(vlm)
        except UserError as exc:
            problems.append(fail("vlm", str(exc), "download the GGUF files or fix vlm.model / vlm.mmproj, or vlm.enabled: false"))
    return problems


def _user_name() -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name}"
    except (ImportError, KeyError):
        return "this user"


CHECKS: tuple[Check, ...] = (
    check_config, check_sources, check_broker, check_calibrations, check_vlm, check_directories,
)


def run_checks(config_path: str | Path, timeout_s: float = 10.0, checks: Iterable[Check] = CHECKS) -> list[CheckResult]:
    """Run every check in order; a check that raises is reported as a failure, never a traceback."""
    ctx = DoctorContext(Path(config_path), timeout_s=timeout_s)
    results: list[CheckResult] = []
    for check in checks:
        try:
            results.extend(check(ctx))
        except Exception as exc:  # a check's own bug must not hide the other checks' answers
            name = check.__name__.removeprefix("check_")
            results.append(fail(name, f"the check itself failed: {type(exc).__name__}: {exc}",
                                "report this as a bug (edge-inspect -vv doctor shows the traceback)"))

            logging.getLogger(__name__).debug("check %s failed", name, exc_info=True)
    return results


def exit_code(results: Iterable[CheckResult]) -> int:
    """0 when nothing failed (warnings allowed), 1 when any check failed."""
    return 1 if any(result.status == "fail" for result in results) else 0


_MARKS = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}
_COLOURS = {"ok": "\033[32m", "warn": "\033[33m", "fail": "\033[31m", "skip": "\033[90m"}


def format_table(results: list[CheckResult], colour: bool = False, width: int | None = None) -> str:
    """Status, check and detail per line; a `fix:` line under every warning and failure."""

    width = width or shutil.get_terminal_size((120, 24)).columns
    name_width = max([len(r.name) for r in results] + [5])
    indent = 6 + name_width + 2
    lines = []
    for result in results:
        mark = _MARKS[result.status]
        shown = f"{_COLOURS[result.status]}{mark:<4}\033[0m" if colour else f"{mark:<4}"
        detail = textwrap.wrap(result.detail, max(40, width - indent)) or [""]
        lines.append(f"{shown}  {result.name:<{name_width}}  {detail[0]}")
        lines += [" " * indent + more for more in detail[1:]]
        if result.fix and result.status in ("warn", "fail"):
            fix = textwrap.wrap(f"fix: {result.fix}", max(40, width - indent))
            lines += [" " * indent + part for part in fix]
    counts = {status: sum(r.status == status for r in results) for status in ("ok", "warn", "fail", "skip")}
    lines.append("")
    lines.append(f"{counts['ok']} ok, {counts['warn']} warning{'s' if counts['warn'] != 1 else ''}, "
                 f"{counts['fail']} failed" + (f", {counts['skip']} skipped" if counts["skip"] else ""))
    return "\n".join(lines)


def to_json(results: list[CheckResult]) -> dict[str, Any]:
    return {
        "checks": [result.to_json() for result in results],
        "ok": exit_code(results) == 0,
        "exit_code": exit_code(results),
    }


def use_colour(stream: Any = sys.stdout) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("NO_COLOR") is None
