"""The package layout: every public module imports by its path, without the optional dependencies.

The list below is the map in README.md ("Where things are"); a module that goes missing or moves
fails here first.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import subprocess
import sys

import pytest

import edge_inspect

EXPECTED = """
cli errors records imageio localize evidence log_limit
config config.base config.capture config.evidence config.mqtt config.scoring config.vlm config.feedback config.threshold
capture capture.sources capture.reader capture.triggers capture.geometry
scorer scorer.backbone scorer.params scorer.memory_bank scorer.scorer_graph scorer.threshold
scorer.calibrate scorer.synth scorer.product scorer.versions
scorer.backends scorer.backends.ort_backend scorer.backends.trt_backend scorer.backends.trt_plan_cache
scorer.backends.trt_compat scorer.backends.trt_build
vlm vlm.prompt vlm.knowledge vlm.schema vlm.runner vlm.sampling vlm.worker vlm.stage vlm.followup vlm.ask
mqtt mqtt.client mqtt.dispatch mqtt.request_queue mqtt.publisher mqtt.spool mqtt.payloads mqtt.ask mqtt.feedback mqtt.listen
daemon daemon.daemon daemon.pipeline daemon.flagged_queue daemon.reload daemon.health daemon.runtime_stats
daemon.sdnotify daemon.drift
feedback feedback.ledger feedback.defects feedback.apply feedback.service feedback.command
offline offline.evaluate offline.mvtec offline.metrics offline.bench offline.bench_vlm
ops ops.doctor ops.report ops.report.load ops.report.summary ops.report.plot ops.report.html
ops.demo ops.demo.data ops.demo.stream ops.demo.run ops.demo_broker
export export.backbone_export export.reference export.weights
commands
""".split()

# Old flat modules that must not come back (the stage packages replaced them).
GONE = ("backbone", "scoring_params", "memory", "graph", "scoring", "engines", "trt_support", "stats", "publish",
        "broker", "metrics", "bench", "demo", "report", "doctor", "sdnotify", "triggers", "spool", "payloads",
        "vlm.tiny_gguf", "backends")

# Modules that need an optional dependency at import time (torch for the eager reference).
NEEDS = {"export.reference": "torch"}


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(edge_inspect.__path__, "edge_inspect."))


@pytest.mark.parametrize("name", EXPECTED)
def test_expected_module_imports_by_its_new_path(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    importlib.import_module(f"edge_inspect.{name}")


def test_every_module_in_the_package_imports():
    names = _all_modules()
    assert {f"edge_inspect.{n}" for n in EXPECTED} <= set(names) | {"edge_inspect"}
    for name in names:
        short = name.removeprefix("edge_inspect.")
        if short in NEEDS and importlib.util.find_spec(NEEDS[short]) is None:
            continue
        importlib.import_module(name)


def test_old_flat_modules_are_gone():
    names = set(_all_modules())
    assert not [old for old in GONE if f"edge_inspect.{old}" in names]


def test_the_scorer_core_imports_without_a_transport_or_optional_runtime():
    """Algorithm code never imports MQTT; TensorRT, pycuda, llama.cpp, amqtt and torch stay lazy."""
    code = (
        "import sys; import edge_inspect.scorer.product, edge_inspect.scorer.calibrate, edge_inspect.scorer.backends.trt_backend, "
        "edge_inspect.scorer.backends.trt_build, edge_inspect.localize, edge_inspect.daemon.daemon, edge_inspect.ops.doctor, "
        "edge_inspect.ops.demo, edge_inspect.vlm.runner; "
        "loaded = [m for m in ('tensorrt', 'pycuda', 'llama_cpp', 'amqtt', 'torch') if m in sys.modules]; "
        
        "print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"optional runtimes imported at module level: {out}"
    scorer_only = subprocess.run(
        [sys.executable, "-c", "import sys, edge_inspect.scorer.product, edge_inspect.scorer.calibrate, edge_inspect.localize; "
         "print([m for m in sys.modules if m.startswith(('paho', 'edge_inspect.mqtt'))])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert scorer_only == "[]", f"the scorer core imports a transport: {scorer_only}"


def test_schemas_ship_inside_the_mqtt_package():
    from importlib import resources

    schemas = resources.files("edge_inspect.mqtt").joinpath("schemas")
    assert sorted(p.name for p in schemas.iterdir() if p.name.endswith(".json")) == [
        "answer.json", "ask.json", "feedback.json", "feedback_result.json", "product_set.json", "result.json",
        "result_update.json", "stats.json", "trigger.json"]
