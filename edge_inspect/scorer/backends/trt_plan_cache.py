"""Compiled TensorRT plans in `engines/`: what a plan was built for, and whether it may run here.

A TensorRT plan is only valid for the exact graph, input shape, precision, GPU model (compute
capability) and TensorRT version it was built with. Each plan therefore has a JSON sidecar holding
its key; a plan whose key differs from this device's key is never deserialized: it is rebuilt, or
refused with a message that says how to build it.

    engines/
      widget-fp16-256x256-3f2a9c0d1e4b5a67.plan        the serialized engine
      widget-fp16-256x256-3f2a9c0d1e4b5a67.plan.json   its key, sizes, hashes, build time
      timing-orin-sm87-trt10.3.0.cache                 TensorRT timing cache (per GPU + version)
      widget-9c1e0a4b2f3d-256x256-trt10.3.0.int8cache  INT8 calibration cache (per graph + version)

Example:
    key = plan_key("engines/widget-3f2a.onnx", "widget", "fp16", device)
    plan = find_or_build_plan(key, "engines", allow_build=True, build=my_builder)

This module holds no TensorRT code (edge_inspect/scorer/backends/trt_backend.py does), so the cache rules
are testable on any machine.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import onnx

from ...errors import UserError
from ...files import bytes_sha256, file_sha256, write_atomic
from ..scorer_graph import BANK_INPUT, BANK_SQNORM_INPUT, SHARED_GRAPH_PREFIX
from .base import INPUT_NAME

log = logging.getLogger(__name__)

PLAN_FORMAT = 1
PRECISIONS = ("fp32", "fp16", "int8")
# How trt_backend.build_plan compiles (FP32 nearest-neighbour head, TF32 off). Part of the key, so
# changing the recipe invalidates old plans instead of silently running them. Bump on any change.
BUILD_RECIPE = "head-fp32;tf32-off;r1"


@dataclass(frozen=True)
class DeviceFacts:
    """The GPU and TensorRT a plan is built for or run on."""

    gpu_name: str
    compute_capability: str  # "8.7"
    tensorrt_version: str  # trt.__version__, e.g. "10.3.0"


@dataclass(frozen=True)
class PlanKey:
    """Everything a plan depends on. Two plans are interchangeable only if their keys are equal."""

    product: str  # the product, or for a graph that takes the bank as an input the graph's name (shared)
    graph_sha256: str  # the scorer ONNX (with its memory bank when the bank is a graph constant)
    input_shape: tuple[int, ...]
    precision: str
    gpu_name: str
    compute_capability: str
    tensorrt_version: str
    build_recipe: str = BUILD_RECIPE

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "PlanKey":
        fields = dict(data)
        fields["input_shape"] = tuple(int(d) for d in fields["input_shape"])
        return cls(**fields)

    @property
    def digest(self) -> str:
        """16 hex chars of sha256 over the canonical JSON of the key."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return bytes_sha256(text.encode())[:16]

    def differences(self, other: "PlanKey") -> list[str]:
        """Human-readable field differences, e.g. "gpu_name: plan 'Orin' vs here 'Xavier'"."""
        mine, theirs = self.to_json(), other.to_json()
        return [f"{k}: plan {theirs[k]!r} vs here {mine[k]!r}" for k in mine if mine[k] != theirs.get(k)]


def owner_words(key: PlanKey) -> tuple[str, str]:
    """(what the plan is for, the --product argument that rebuilds it) for messages: a product, or a
    graph every product of its shape shares."""
    if key.product.startswith(SHARED_GRAPH_PREFIX):
        return f"the shared scorer graph {key.product!r}", "PRODUCT (any product scored with this graph)"
    return f"product {key.product!r}", key.product


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-").lower() or "x"


def describe_graph(onnx_path: str | Path) -> tuple[str, tuple[int, ...]]:
    """(sha256 of the ONNX file, static shape of its image input). Reads the file once.

    A scorer graph has the image input and, when the memory bank is an input, the two bank inputs
    (scorer_graph.BANK_INPUT, BANK_SQNORM_INPUT) with static shapes too."""
    data = Path(onnx_path).read_bytes()
    model = onnx.load_from_string(data)
    initializers = {t.name for t in model.graph.initializer}
    inputs = {vi.name: vi for vi in model.graph.input if vi.name not in initializers}
    if set(inputs) not in ({INPUT_NAME}, {INPUT_NAME, BANK_INPUT, BANK_SQNORM_INPUT}):
        raise UserError(f"{onnx_path}: a scorer graph takes {INPUT_NAME!r} (and the bank inputs {BANK_INPUT!r}, "
                        f"{BANK_SQNORM_INPUT!r}), found {sorted(inputs)}")
    shapes = {}
    for name, vi in inputs.items():
        dims = vi.type.tensor_type.shape.dim
        shapes[name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
        if any(d <= 0 for d in shapes[name]):
            raise UserError(f"{onnx_path}: input {name!r} must have a static shape, got {shapes[name]}; re-run calibrate")
    return bytes_sha256(data), shapes[INPUT_NAME]


def plan_owner(onnx_path: str | Path, product: str) -> str:
    """Whose plan a graph gets: the product's for a graph with its bank inside, the graph's own name (shared
    by every product of its shape) for a graph that takes the bank as an input."""
    return Path(onnx_path).stem if takes_bank(onnx_path) else product


def takes_bank(onnx_path: str | Path) -> bool:
    """Whether a scorer graph takes the memory bank as an input (one graph and plan for every product of
    its shape) or holds it as a constant (one per product and bank)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    return BANK_INPUT in {vi.name for vi in model.graph.input}


def plan_key(onnx_path: str | Path, product: str, precision: str, device: DeviceFacts) -> PlanKey:
    if precision not in PRECISIONS:
        raise UserError(f"scoring.precision: {precision!r} is not one of {', '.join(PRECISIONS)}")
    sha, shape = describe_graph(onnx_path)
    return PlanKey(
        product=product,
        graph_sha256=sha,
        input_shape=shape,
        precision=precision,
        gpu_name=device.gpu_name,
        compute_capability=device.compute_capability,
        tensorrt_version=device.tensorrt_version,
    )


def plan_path(engines_dir: str | Path, key: PlanKey) -> Path:
    h, w = key.input_shape[-2:]
    return Path(engines_dir) / f"{_slug(key.product)}-{key.precision}-{h}x{w}-{key.digest}.plan"


def sidecar_path(plan: Path) -> Path:
    return plan.with_name(plan.name + ".json")


def timing_cache_path(engines_dir: str | Path, device: DeviceFacts) -> Path:
    """Timing caches hold kernel timings: valid for one GPU model and TensorRT version only."""
    cc = device.compute_capability.replace(".", "")
    return Path(engines_dir) / f"timing-{_slug(device.gpu_name)}-sm{cc}-trt{_slug(device.tensorrt_version)}.cache"


def calibration_cache_path(engines_dir: str | Path, key: PlanKey) -> Path:
    """INT8 calibration scales depend on the graph and TensorRT version, not on the GPU model."""
    h, w = key.input_shape[-2:]
    return Path(engines_dir) / f"{_slug(key.product)}-{key.graph_sha256[:12]}-{h}x{w}-trt{_slug(key.tensorrt_version)}.int8cache"


def read_sidecar(plan: Path) -> dict[str, Any] | None:
    try:
        return json.loads(sidecar_path(plan).read_text())
    except (OSError, ValueError):
        return None


def plan_problem(plan: Path, key: PlanKey) -> str | None:
    """Why the plan at `plan` must not run for `key`, or None when it may."""
    if not plan.is_file():
        return "no plan file"
    sidecar = read_sidecar(plan)
    if sidecar is None:
        return f"sidecar {sidecar_path(plan).name} is missing or unreadable"
    if sidecar.get("format") != PLAN_FORMAT:
        return f"sidecar format {sidecar.get('format')!r}, expected {PLAN_FORMAT}"
    try:
        built_for = PlanKey.from_json(sidecar["key"])
    except (KeyError, TypeError, ValueError) as exc:
        return f"sidecar key unreadable ({exc})"
    if built_for != key:
        return "built for a different setup: " + "; ".join(key.differences(built_for))
    if sidecar.get("plan_sha256") != file_sha256(plan):
        return "plan file does not match the sha256 in its sidecar (truncated or replaced)"
    return None


def list_plans(engines_dir: str | Path, product: str) -> list[tuple[Path, dict[str, Any] | None]]:
    """Every plan of `product` in engines_dir, with its sidecar (None when unreadable)."""
    directory = Path(engines_dir)
    if not directory.is_dir():
        return []
    return [(p, read_sidecar(p)) for p in sorted(directory.glob(f"{_slug(product)}-*.plan"))]


def write_plan(plan: Path, data: bytes, key: PlanKey, info: dict[str, Any]) -> None:
    """Write the plan, then its sidecar (the sidecar last: a plan without one is never used)."""
    plan.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path(plan).unlink(missing_ok=True)
    write_atomic(plan, data)
    sidecar = {
        "format": PLAN_FORMAT,
        "key": key.to_json(),
        "digest": key.digest,
        "plan_sha256": bytes_sha256(data),
        "plan_bytes": len(data),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **info,
    }
    write_atomic(sidecar_path(plan), (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode())


# build(key) -> (serialized plan bytes, extra sidecar facts such as build_seconds)
PlanBuilder = Callable[[PlanKey], "tuple[bytes, dict[str, Any]]"]


def find_or_build_plan(
    key: PlanKey,
    engines_dir: str | Path,
    *,
    allow_build: bool,
    build: PlanBuilder | None,
    force: bool = False,
) -> Path:
    """The path of a plan valid for `key`: the cached one, or a freshly built one.

    A missing, stale (other graph) or foreign (other GPU / TensorRT) plan is rebuilt when
    allow_build, else refused with a UserError naming what was found and the command that fixes it.
    force rebuilds even when a valid plan exists.
    """
    plan = plan_path(engines_dir, key)
    problem = "rebuild forced" if force else plan_problem(plan, key)
    if problem is None:
        log.info("TensorRT plan %s matches this device", plan)
        return plan
    if not allow_build:
        raise UserError(_refusal(key, engines_dir, plan, problem))
    if build is None:
        raise UserError(f"no TensorRT plan at {plan} ({problem}) and no builder available")
    others = [p for p, _ in list_plans(engines_dir, key.product) if p != plan]
    log.info("building TensorRT plan %s (%s); %d other plan(s) of %s stay untouched", plan.name, problem, len(others), key.product)
    data, info = build(key)
    write_plan(plan, data, key, info)
    return plan


def _refusal(key: PlanKey, engines_dir: str | Path, plan: Path, problem: str) -> str:
    h, w = key.input_shape[-2:]
    lines = [
        f"no usable TensorRT plan for {owner_words(key)[0]} ({key.precision}, {h}x{w}, {key.gpu_name} "
        f"sm_{key.compute_capability.replace('.', '')}, TensorRT {key.tensorrt_version}, graph {key.graph_sha256[:12]}) "
        f"and scoring.allow_engine_build is false.",
        f"  {plan.name}: {problem}",
    ]
    for other, sidecar in list_plans(engines_dir, key.product):
        if other == plan:
            continue
        if sidecar is None or "key" not in sidecar:
            lines.append(f"  {other.name}: sidecar missing or unreadable")
            continue
        try:
            diffs = key.differences(PlanKey.from_json(sidecar["key"]))
        except (TypeError, ValueError, KeyError) as exc:
            diffs = [f"unreadable key ({exc})"]
        lines.append(f"  {other.name}: " + ("; ".join(diffs) or "same key"))
    lines.append(
        f"Fix: run `edge-inspect build-engine --product {owner_words(key)[1]} --precision {key.precision}` on this device, "
        "or set scoring.allow_engine_build: true."
    )
    return "\n".join(lines)
