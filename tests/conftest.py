"""Shared fixtures. Broker fixtures start a real mosquitto on a free loopback port (tests/mqtt_broker.py);
scorer fixtures share one exported backbone (cached across runs) and one calibrated product per session."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from pathlib import Path

import pytest
from mqtt_broker import MISSING_REASON, MosquittoBroker, mosquitto_binary


def wait_until(predicate, timeout: float = 30.0, step: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; returns its last value.

    The one wait of the suite: a test waits for a condition, never for the clock. The timeout is a
    bound for a hung test on a loaded machine, not a speed claim; assert on the returned value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


@pytest.fixture
def small_disk(tmp_path):
    """Call with a size ("2m"): a fresh tmpfs of that size (a real file system that fills up), unmounted after
    the test. Needs root (mount); skipped with the reason elsewhere."""
    import subprocess

    mounted: list[Path] = []

    def make(size: str) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a {size} tmpfs to fill (needs root): {done.stderr.strip() or done.returncode}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def fill_disk(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte with one file (returned; delete it to free the space)."""
    filler = Path(folder) / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    try:
        while True:  # the last partial block
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture
def mosquitto_factory(tmp_path):
    """Call with MosquittoBroker's arguments; returns a started broker, closed after the test."""
    if mosquitto_binary() is None:
        pytest.skip(MISSING_REASON)
    brokers: list[MosquittoBroker] = []

    def make(**kwargs) -> MosquittoBroker:
        broker = MosquittoBroker(**kwargs)
        brokers.append(broker)
        return broker.start()

    yield make
    for broker in brokers:
        broker.close()


@pytest.fixture
def mosquitto_broker(mosquitto_factory) -> MosquittoBroker:
    """A plain anonymous broker without persistence."""
    return mosquitto_factory()


# --- the scorer's backbone and a calibrated product, shared by the scorer tests ------------------


def _test_engines_cache() -> Path:
    """Never inside the repository: $EDGE_INSPECT_CACHE (default ~/.cache/edge-inspect)/test-engines."""
    return Path(os.environ.get("EDGE_INSPECT_CACHE", Path.home() / ".cache" / "edge-inspect")) / "test-engines"


@pytest.fixture(scope="session")
def backbone_onnx(tmp_path_factory) -> Path:
    """The backbone ONNX exported from the pretrained weights (needs torch once, ~3 s), cached across runs
    under a folder keyed by the weights' sha256 so a new weights release is exported again."""
    from edge_inspect.calibration.artifacts import BACKBONE_FILE, ensure_backbone
    from edge_inspect.errors import UserError
    from edge_inspect.export.weights import pretrained_weights_path

    try:
        source = pretrained_weights_path()
    except UserError as exc:
        pytest.skip(f"no pretrained weights to export the backbone: {exc}")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cached = _test_engines_cache() / digest / BACKBONE_FILE
    if cached.is_file():
        return cached
    try:
        exported = ensure_backbone(tmp_path_factory.mktemp("backbone-export"))
    except UserError as exc:
        pytest.skip(f"cannot export the backbone: {exc}")
    try:  # publish atomically: a concurrent session sees the old state or the whole file
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
        shutil.copyfile(exported, partial)
        os.replace(partial, cached)
        return cached
    except OSError:  # read-only home: the per-session export still works
        return exported


@pytest.fixture(scope="session")
def engines_factory(backbone_onnx):
    """Call with a folder: makes it an engines dir whose backbone is the cached one (a symlink), so each
    test writes its own scorer graphs without exporting the backbone again."""
    from edge_inspect.calibration.artifacts import BACKBONE_FILE

    def make(folder: Path) -> Path:
        link = Path(folder) / BACKBONE_FILE
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(backbone_onnx, link)
        return Path(folder)

    return make


@pytest.fixture
def engines_dir(tmp_path, engines_factory) -> Path:
    """A fresh engines dir for one test, holding only the (linked) backbone."""
    return engines_factory(tmp_path / "engines")


# Generated object with defects the default scorer separates clearly from good parts; with 8 shots the
# held-out good parts stay well below the automatic threshold.
PRODUCT_CATEGORY = "coin"
PRODUCT_SHOTS = 8
PRODUCT_DEFECTS = ("foreign_patch", "hole")


@pytest.fixture(scope="session")
def calibrated_product(tmp_path_factory, engines_factory) -> dict:
    """Product `coin` calibrated with `edge-inspect calibrate` (default scorer settings) from 8 generated
    good images; the dataset's held-out good images and defects (with masks) come along."""
    from edge_inspect import cli
    from edge_inspect.offline.datasets.generate import generate_dataset

    pytest.importorskip("skimage", reason="the generated dataset is rendered from scikit-image photos")
    root = tmp_path_factory.mktemp("coin-product")
    engines = engines_factory(root / "engines")
    dataset = generate_dataset(
        root / "data", PRODUCT_CATEGORY, n_train=PRODUCT_SHOTS, n_test_good=4, n_test_defect=3, seed=0, kinds=PRODUCT_DEFECTS
    )
    code = cli.main([
        "calibrate", "--product", PRODUCT_CATEGORY, "--images", str(dataset / "train" / "good"),
        "--calibration-dir", str(root / "calibration"), "--engines-dir", str(engines), "--json",
    ])
    assert code == 0
    return {
        "name": PRODUCT_CATEGORY,
        "calibration_dir": root / "calibration",
        "engines_dir": engines,
        "dataset": dataset,
        "good": sorted((dataset / "test" / "good").glob("*.png")),
        "defects": sorted(p for kind in PRODUCT_DEFECTS for p in (dataset / "test" / kind).glob("*.png")),
    }
