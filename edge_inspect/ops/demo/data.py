"""The demo's data: settings, the work folder, the generated dataset, the replayed frames, calibration and config."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...calibration.artifacts import backbone_path, ensure_backbone
from ...calibration.calibrate import calibrate_product
from ...calibration.defects import DEFECT_KINDS
from ...calibration.fit import CalibrationOptions
from ...config import AppConfig, parse_config
from ...errors import UserError
from ...offline.datasets.generate import generate_dataset
from ...scorer.params import ScorerParams

STATION = "demo"


CAMERA = "cam0"


TOPIC_PREFIX = "edge-inspect"


DEFAULT_CATEGORY = "coin"  # an object with a plain background: the clearest demo


DEFAULT_FRAMES, DEFAULT_FPS = 28, 4.0


SHORT_FRAMES, SHORT_FPS = 14, 10.0  # one defect of each kind; CI and `make demo`


CALIBRATION_IMAGES = 8


INPUT_SIZE = 256


MARKER = ".edge-inspect-demo"


DATASET_MARKER = "demo-dataset.json"


MAX_FRAMES = 2000


@dataclass(frozen=True)
class DemoSettings:
    workdir: Path
    engines_dir: Path  # shared cache of the backbone ONNX
    category: str = DEFAULT_CATEGORY
    frames: int = DEFAULT_FRAMES
    fps: float = DEFAULT_FPS
    host: str = "127.0.0.1"
    port: int = 1883
    broker: str = "auto"  # auto | mosquitto | amqtt: which broker to start when none listens
    seed: int = 0
    json: bool = False
    keep_broker: bool = False


@dataclass(frozen=True)
class DemoFrame:
    """One replayed frame and the truth about it."""

    frame_id: int  # the replay's frame seq: 1-based position in name order
    file: Path
    kind: str  # "good" or the defect kind painted into it
    mask: Path | None  # ground-truth mask of the defect

    @property
    def defective(self) -> bool:
        return self.kind != "good"


def prepare_workdir(path: Path) -> Path:
    """Create the workdir, or accept an existing one only if an earlier demo made it (or it is empty)."""
    path = path.expanduser().resolve()
    if path.exists() and not path.is_dir():
        raise UserError(f"--workdir {path} is a file; give a folder for the demo's files")
    if path.is_dir() and any(path.iterdir()) and not (path / MARKER).is_file():
        raise UserError(
            f"--workdir {path} already holds files that the demo did not write (no {MARKER} in it); "
            "the demo clears folders in its workdir, so give a new or empty folder, e.g. --workdir demo-run"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by `edge-inspect demo`; everything in this folder can be deleted\n")
    return path


def link_backbone(shared_engines: Path, engines: Path) -> tuple[Path, bool]:
    """The backbone from the shared engines folder (exported there when missing), visible in `engines`.

    Returns (path in `engines`, whether it had to be exported now).
    """

    shared_engines = shared_engines.expanduser().resolve()
    exported = not backbone_path(shared_engines).is_file()
    source = ensure_backbone(shared_engines)
    target = backbone_path(engines)
    if target.resolve() == source.resolve():
        return target, exported
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_symlink() or target.exists():
        target.unlink()
    try:
        target.symlink_to(source)
    except OSError:  # a file system without symlinks
        shutil.copy2(source, target)
    return target, exported


def dataset_needs(frames: int, kinds: tuple[str, ...]) -> tuple[int, int]:
    """(good test frames, defective frames per kind) for `frames` replayed frames, half of them defective."""
    defects = frames // 2
    return frames - defects, math.ceil(defects / len(kinds)) if defects else 0


def ensure_dataset(root: Path, category: str, frames: int, seed: int) -> tuple[Path, bool]:
    """The generated dataset for `category` under `root`, reused when it holds enough images.

    Returns (the category folder, whether it was cached).
    """

    good, per_kind = dataset_needs(frames, DEFECT_KINDS)
    folder = root / category
    marker = folder / DATASET_MARKER
    wanted = {"category": category, "size": INPUT_SIZE, "seed": seed, "n_train": CALIBRATION_IMAGES,
              "kinds": list(DEFECT_KINDS)}
    try:
        have = json.loads(marker.read_text())
    except (OSError, ValueError):
        have = {}
    same = all(have.get(key) == value for key, value in wanted.items())
    if same and have.get("n_test_good", -1) >= good and have.get("n_test_defect", -1) >= per_kind:
        return folder, True
    if same:  # grow it: generation is deterministic per image, so the first images stay the same
        good, per_kind = max(good, have.get("n_test_good", 0)), max(per_kind, have.get("n_test_defect", 0))
    marker.unlink(missing_ok=True)
    generate_dataset(root, category, n_train=CALIBRATION_IMAGES, n_test_good=good, n_test_defect=per_kind,
                     size=INPUT_SIZE, seed=seed)
    marker.write_text(json.dumps({**wanted, "n_test_good": good, "n_test_defect": per_kind}, indent=1))
    return folder, False


def plan_frames(dataset: Path, count: int, seed: int) -> list[tuple[str, Path, Path | None]]:
    """Which test images the line shows, in order: (kind, image, mask). Half of them (rounded down)
    defective, the kinds taking turns, shuffled by `seed`."""

    good, _ = dataset_needs(count, DEFECT_KINDS)
    chosen: list[tuple[str, Path, Path | None]] = [
        ("good", dataset / "test" / "good" / f"{i:03d}.png", None) for i in range(good)
    ]
    for i in range(count - good):
        kind, index = DEFECT_KINDS[i % len(DEFECT_KINDS)], i // len(DEFECT_KINDS)
        chosen.append((kind, dataset / "test" / kind / f"{index:03d}.png",
                       dataset / "ground_truth" / kind / f"{index:03d}_mask.png"))
    missing = [str(path) for _, path, _ in chosen if not path.is_file()]
    if missing:
        raise UserError(
            f"the demo dataset in {dataset} is incomplete ({missing[0]} is missing); delete that folder and run again"
        )
    order = np.random.default_rng(seed).permutation(len(chosen))
    return [chosen[i] for i in order]


def write_replay(plan: list[tuple[str, Path, Path | None]], folder: Path) -> list[DemoFrame]:
    """Copy the planned images into `folder`, named so that name order is the planned order."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    width = max(3, len(str(len(plan))))
    frames = []
    for position, (kind, image, mask) in enumerate(plan, start=1):
        target = folder / f"{position:0{width}d}-{kind}{image.suffix}"
        shutil.copyfile(image, target)
        frames.append(DemoFrame(position, target, kind, mask))
    return frames


def calibrate_demo(dataset: Path, product: str, calibration_dir: Path, engines: Path, seed: int):
    """Calibrate `product` from the dataset's good training images (replacing an earlier one);
    remove the graphs of earlier demo calibrations of it from `engines`."""

    images = sorted((dataset / "train" / "good").glob("*.png"))
    options = CalibrationOptions(params=ScorerParams(input_size=(INPUT_SIZE, INPUT_SIZE)), seed=seed)
    calibration = calibrate_product(images, product, calibration_dir, engines, options, force=True, progress=False)
    keep = {calibration.scorer_onnx.name, calibration.features_onnx.name}
    for old in engines.glob(f"{product}-*.onnx"):
        if old.name not in keep:
            old.unlink()
    return calibration, len(images)


def demo_config(settings: DemoSettings, workdir: Path, product: str, protocol: str) -> dict[str, Any]:
    """The daemon config of the demo, validated against the real schema."""

    config: dict[str, Any] = {
        "station": STATION,
        "cameras": [{
            "name": CAMERA,
            "product": product,
            # lossless: paced, but a frame waits for the scorer instead of being replaced on a busy machine,
            # so the demo prints every frame it replayed (a camera would drop; the record says which)
            "source": {"type": "replay", "path": str(workdir / "frames"), "fps": settings.fps, "loop": False,
                       "lossless": True},
            "trigger": {"mode": "every_frame"},
        }],
        # ONNX Runtime even where TensorRT exists: a plan build would take minutes.
        "scoring": {"backend": "onnxruntime", "calibration_dir": str(workdir / "calibration"),
                    "engines_dir": str(workdir / "engines")},
        "mqtt": {"host": settings.host, "port": settings.port, "protocol": protocol, "topic_prefix": TOPIC_PREFIX,
                 "client_id": "edge-inspect-demo-{hostname}", "stats_interval_s": 2},
        "spool": {"path": str(workdir / "spool" / "results.sqlite3")},
        "pipeline": {"drain_timeout_s": 10},
    }
    if "evidence" in AppConfig.model_fields:  # keep flagged frames for the report's pictures
        config["evidence"] = {"dir": str(workdir / "evidence"), "min_free_mb": 50}
    parse_config(json.dumps(config), source="demo config")
    return config
