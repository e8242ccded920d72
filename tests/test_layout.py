"""The package layout: every public module imports by its path, without the optional dependencies.

The list below is the map in README.md ("Where things are"); a module that goes missing or moves
fails here first.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import edge_inspect

EXPECTED = """
cli errors records imageio localize evidence log_limit
config config.base config.capture config.evidence config.mqtt config.scoring config.vlm config.feedback config.threshold
capture capture.sources capture.reader capture.triggers capture.geometry
files
scorer scorer.backbone scorer.params scorer.memory_bank scorer.anomaly_map scorer.scorer_graph scorer.features
scorer.layout scorer.manifest scorer.product
scorer.backends scorer.backends.base scorer.backends.ort_backend scorer.backends.trt_backend scorer.backends.trt_plan_cache
scorer.backends.trt_compat scorer.backends.trt_build
calibration calibration.fit calibration.views calibration.defects calibration.threshold calibration.artifacts
calibration.store calibration.calibrate calibration.stream calibration.choose
vlm vlm.prompt vlm.knowledge vlm.schema vlm.runner vlm.sampling vlm.worker vlm.stage vlm.followup vlm.ask
mqtt mqtt.client mqtt.dispatch mqtt.request_queue mqtt.publisher mqtt.spool mqtt.payloads mqtt.ask mqtt.feedback mqtt.listen
daemon daemon.daemon daemon.pipeline daemon.flagged_queue daemon.reload daemon.health daemon.runtime_stats
daemon.sdnotify daemon.drift daemon.stream
feedback feedback.ledger feedback.defects feedback.apply feedback.service
offline offline.evaluate offline.metrics offline.bench offline.bench_vlm offline.anomalib_floor offline.stream_eval
offline.datasets offline.datasets.mvtec offline.datasets.convert offline.datasets.generate
ops ops.doctor ops.report ops.report.load ops.report.summary ops.report.plot ops.report.html
ops.demo ops.demo.data ops.demo.stream ops.demo.run ops.demo_broker
export export.backbone_export export.reference export.weights
commands
""".split()

# Old flat modules that must not come back (the stage packages replaced them).
GONE = ("backbone", "scoring_params", "memory", "graph", "scoring", "engines", "trt_support", "stats", "publish",
        "broker", "metrics", "bench", "demo", "report", "doctor", "sdnotify", "triggers", "spool", "payloads",
        "vlm.tiny_gguf", "backends", "scorer.calibrate", "scorer.synth", "scorer.versions", "scorer.threshold",
        "offline.mvtec", "feedback.command")

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
        "import sys; import edge_inspect.scorer.product, edge_inspect.calibration.calibrate, edge_inspect.scorer.backends.trt_backend, "
        "edge_inspect.scorer.backends.trt_build, edge_inspect.localize, edge_inspect.daemon.daemon, edge_inspect.ops.doctor, "
        "edge_inspect.ops.demo, edge_inspect.vlm.runner; "
        "loaded = [m for m in ('tensorrt', 'pycuda', 'llama_cpp', 'amqtt', 'torch') if m in sys.modules]; "
        
        "print(loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"optional runtimes imported at module level: {out}"
    scorer_only = subprocess.run(
        [sys.executable, "-c", "import sys, edge_inspect.scorer.product, edge_inspect.calibration.calibrate, edge_inspect.localize; "
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


# --- the import graph, read from the source (module-level and function-level imports alike) ------------

PACKAGE = Path(edge_inspect.__file__).parent


def _module_files() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (lazy imports included). Importing
    a.b.c also runs the packages a and a.b, except those the importer lives in (already running)."""
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rsplit(".", 1)[0] if "." in target else ""
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    ancestor = ".".join(parts[:i])
                    if ancestor in files and ancestor != name and not (name + ".").startswith(ancestor + "."):
                        found.add(ancestor)
        graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += graph[name]
    return seen


def test_no_import_circle():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_scorer_imports_nothing_of_the_stages_around_it():
    """scorer/ runs frames: no calibration (fitting), offline tools, transports, VLM or daemon code."""
    graph = import_graph()
    outside = ("calibration", "offline", "mqtt", "vlm", "daemon", "feedback", "ops", "commands", "export")
    bad = {name: sorted(m for m in deps if m.split(".")[1] in outside)
           for name, deps in graph.items() if name.startswith("edge_inspect.scorer")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_files_imports_nothing_of_the_project():
    assert import_graph()["edge_inspect.files"] == set()


def test_the_daemon_loads_no_dataset_code():
    """Everything the daemon can import (lazily too) holds no dataset generator, converter or offline tool."""
    reached = _reachable(import_graph(), "edge_inspect.daemon.daemon")
    assert sorted(m for m in reached if m.startswith(("edge_inspect.offline", "edge_inspect.ops", "edge_inspect.commands"))) == []


def test_every_project_module_attribute_the_code_uses_exists():
    """`from . import trt_plan_cache as plan_cache` then `plan_cache.something`: a moved or renamed function
    breaks such a call only when it runs, and some never run here (the TensorRT backend needs a GPU).
    Every `alias.name` on an imported project module must name something that module has."""
    files = _module_files()
    missing = []
    for name, path in sorted(files.items()):
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        modules: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                for alias in node.names:
                    if f"{source}.{alias.name}" in files:
                        modules[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in files:
                        modules[alias.asname] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                target = modules[node.value.id]
                short = target.removeprefix("edge_inspect.")
                if short in NEEDS and importlib.util.find_spec(NEEDS[short]) is None:
                    continue
                if not hasattr(importlib.import_module(target), node.attr):
                    missing.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.value.id}.{node.attr}")
    assert missing == []
