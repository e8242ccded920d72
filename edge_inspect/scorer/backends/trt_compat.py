"""Will TensorRT 10 compile this ONNX graph? A pure-`onnx` check that runs on any CPU.

The scorer graph is exported on a workstation and compiled on the Jetson; a parser failure there
(an op, attribute or dynamic shape TensorRT rejects) would only show up on the device. This module
answers the question at export time and in CI.

Example:
    problems = check_tensorrt_compat(onnx.load("engines/widget-3f2a.onnx"))
    if problems:
        print("\n".join(problems))

Sources (read them before widening anything here):
- onnx-tensorrt docs/operators.md, "TensorRT 10.x supports operators in the inclusive range of
  opset 9 to opset 20" (10.0) / "opset 24" (10.15), with the per-op restrictions column;
- onnx-tensorrt docs/Changelog.md for when an op or mode arrived (Pad edge/reflect: 8.2, Pad wrap:
  10.0, DeformConv: 10.1, Slice tensor axes: 10.3, Pad tensor axes: 10.4, window ops: 10.4, STFT: 10.5);
- onnx-tensorrt onnxOpImporters.cpp / importerUtils.cpp (Resize, Pad, poolingHelper, reduceTensor:
  "Axis input must be an initializer!").

The target is the oldest TensorRT 10 a supported Jetson ships: JetPack 6.1/6.2 = TensorRT 10.3. So
ops and modes that arrived after 10.3 count as unsupported even though newer TensorRT parses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto, numpy_helper

# Oldest TensorRT this project builds plans with (JetPack 6.1). Its parser accepts opsets 9..20.
TARGET_TENSORRT = "10.3"
MIN_OPSET = 9
MAX_OPSET = 20

# Ops marked "Y" in onnx-tensorrt's operators.md for TensorRT 10, minus those the changelog dates
# after TensorRT 10.3 (window ops, STFT, Attention, RotaryEmbedding, RMSNormalization, TensorScatter)
# and those whose arrival is undated (CastLike, Gelu, Mish): treat them as unsupported until a
# device build proves otherwise.
SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
    DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor
    Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater
    GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log
    LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
    Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu
    QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal
    ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu
    Unsqueeze Upsample Where Xor
    """.split()
)

# Supported by TensorRT, but their output shape depends on the data or they are control flow: a
# static-shape scorer graph must not contain them (they also defeat TensorRT's fusion).
DATA_DEPENDENT_OPS: frozenset[str] = frozenset({"NonZero", "NonMaxSuppression", "Loop", "Scan", "If", "Unique", "Compress"})

# Ops TensorRT runs in floating point only (operators.md "Supported Types" column has no INT32/INT64).
FLOAT_ONLY_OPS: frozenset[str] = frozenset(
    {
        "Conv", "ConvTranspose", "MatMul", "Gemm", "AveragePool", "MaxPool", "LpPool", "GlobalAveragePool",
        "GlobalMaxPool", "GlobalLpPool", "Resize", "Upsample", "Sqrt", "Exp", "Log", "Erf", "Sigmoid", "Tanh",
        "Softmax", "LogSoftmax", "BatchNormalization", "InstanceNormalization", "LayerNormalization",
        "GroupNormalization", "LRN", "Reciprocal", "Floor", "Ceil", "Round", "Sin", "Cos", "Tan",
    }
)

# Element types TensorRT can hold in a tensor (operators.md: DOUBLE is cast down to FLOAT; INT8/INT4/FP8
# only through Q/DQ). Anything else in the graph (strings, unsigned > 8 bit, int16, complex) fails.
TENSOR_TYPES: frozenset[int] = frozenset(
    {
        TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT32, TensorProto.INT64,
        TensorProto.INT8, TensorProto.UINT8, TensorProto.BOOL, TensorProto.DOUBLE,
    }
)
IO_TYPES: frozenset[int] = TENSOR_TYPES - {TensorProto.DOUBLE}

RESIZE_MODES = frozenset({"nearest", "linear"})
RESIZE_COORDINATE_MODES = frozenset({"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"})
RESIZE_NEAREST_MODES = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})
PAD_MODES = frozenset({"constant", "reflect", "edge", "wrap"})  # edge/reflect since 8.2, wrap since 10.0
REDUCE_OPS = frozenset(
    {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
     "ReduceProd", "ReduceSum", "ReduceSumSquare"}
)


@dataclass(frozen=True)
class _Graph:
    """Lookups over one ONNX graph that the per-op rules need."""

    constants: dict[str, onnx.TensorProto]  # initializers and Constant-node outputs
    producers: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    elem_types: dict[str, int]

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def const_values(self, name: str) -> list | None:
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor).reshape(-1).tolist()


def check_tensorrt_compat(model: onnx.ModelProto) -> list[str]:
    """Every reason TensorRT 10.3's ONNX parser would reject `model`, or build it wrongly. Empty = fine.

    Checks: opset range, op allow-list, per-op attribute restrictions, tensor element types,
    static input/output shapes, constant shape-defining inputs, and one open accuracy bug
    (NVIDIA/TensorRT#4606). Needs no GPU and no TensorRT.
    """
    problems: list[str] = []
    problems += _check_opsets(model)
    graph = _index(model)
    problems += _check_io(model)
    for index, node in enumerate(model.graph.node):
        where = f"node {node.name or index} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: custom domain {node.domain!r} needs a TensorRT plugin; export with standard ops only")
            continue
        if node.op_type not in SUPPORTED_OPS:
            problems.append(f"{where}: op {node.op_type} is not supported by TensorRT {TARGET_TENSORRT}'s ONNX parser")
            continue
        if node.op_type in DATA_DEPENDENT_OPS:
            problems.append(f"{where}: data-dependent shape or control flow; the scorer graph must be static")
        if node.op_type in FLOAT_ONLY_OPS:
            for name in node.input[:1]:
                elem = graph.elem_types.get(name)
                if elem is not None and elem not in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16):
                    problems.append(f"{where}: input {name!r} is {TensorProto.DataType.Name(elem)}; TensorRT runs {node.op_type} in floating point only")
        problems += [f"{where}: {p}" for p in _check_node(node, graph)]
    for name, elem in graph.elem_types.items():
        if elem not in TENSOR_TYPES and elem != TensorProto.UNDEFINED:
            problems.append(f"tensor {name!r}: element type {TensorProto.DataType.Name(elem)} is not supported by TensorRT")
    return problems


def _check_opsets(model: onnx.ModelProto) -> list[str]:
    problems = []
    default = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        problems.append("model declares no default-domain opset")
    for version in default:
        if not MIN_OPSET <= version <= MAX_OPSET:
            problems.append(
                f"opset {version} is outside TensorRT {TARGET_TENSORRT}'s range {MIN_OPSET}..{MAX_OPSET}; export with opset 17"
            )
    for o in model.opset_import:
        if o.domain not in ("", "ai.onnx"):
            problems.append(f"opset domain {o.domain!r} (version {o.version}) is not a standard ONNX domain TensorRT parses")
    return problems


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape.dim]


def _check_io(model: onnx.ModelProto) -> list[str]:
    problems = []
    initializer_names = {t.name for t in model.graph.initializer}
    for kind, values in (("input", model.graph.input), ("output", model.graph.output)):
        for vi in values:
            if vi.name in initializer_names:
                continue  # old exporters list initializers as inputs
            tensor_type = vi.type.tensor_type
            if not vi.type.HasField("tensor_type"):
                problems.append(f"graph {kind} {vi.name!r} is not a tensor (sequences/maps are not supported)")
                continue
            if tensor_type.elem_type not in IO_TYPES:
                problems.append(f"graph {kind} {vi.name!r} has element type {TensorProto.DataType.Name(tensor_type.elem_type)}, not a TensorRT I/O type")
            if not tensor_type.HasField("shape"):
                problems.append(f"graph {kind} {vi.name!r} has no shape; the scorer graph must declare static shapes")
                continue
            dims = _dims(vi)
            if any(not isinstance(d, int) or d <= 0 for d in dims):
                problems.append(f"graph {kind} {vi.name!r} has a dynamic shape {dims}; export static shapes (e.g. [1, 3, 256, 256])")
    return problems


def _index(model: onnx.ModelProto) -> _Graph:
    constants = {t.name: t for t in model.graph.initializer}
    producers: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for out in node.output:
            producers[out] = node
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
        if node.op_type == "Constant" and node.output:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value.t
    elem_types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # shape inference is best effort; an unreadable graph fails elsewhere
        inferred = model
    for vi in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
        if vi.type.HasField("tensor_type"):
            elem_types[vi.name] = vi.type.tensor_type.elem_type
    for name, tensor in constants.items():
        elem_types.setdefault(name, tensor.data_type)
    return _Graph(constants, producers, consumers, elem_types)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_node(node: onnx.NodeProto, g: _Graph) -> list[str]:
    attrs = _attrs(node)
    op = node.op_type
    problems: list[str] = []
    if op in ("Conv", "ConvTranspose"):
        w = g.constants.get(node.input[1]) if len(node.input) > 1 else None
        rank = len(w.dims) if w is not None else len(attrs.get("kernel_shape", [])) + 2
        if rank not in (3, 4, 5):
            problems.append(f"{rank - 2}D convolution; TensorRT supports 1D, 2D and 3D only")
    if op in ("AveragePool", "MaxPool", "LpPool"):
        kernel = attrs.get("kernel_shape", [])
        if len(kernel) not in (1, 2, 3):
            problems.append(f"{len(kernel)}D pooling; TensorRT supports 2D or 3D pooling (1D via expansion)")
        if any(d != 1 for d in attrs.get("dilations", [])):
            problems.append(f"dilations {attrs['dilations']}; TensorRT pooling needs dilations empty or all ones")
        if op == "MaxPool" and len(node.output) > 1 and node.output[1]:
            problems.append("MaxPool Indices output is not supported")
    if op == "Resize":
        problems += _check_resize(node, attrs, g)
    if op == "Pad":
        mode = _text(attrs.get("mode", "constant"))
        if mode not in PAD_MODES:
            problems.append(f"Pad mode {mode!r}; TensorRT supports {sorted(PAD_MODES)}")
        if len(node.input) > 1 and node.input[1] and not g.is_constant(node.input[1]):
            problems.append("pads input is computed at run time; make it an initializer so shapes stay static")
        if len(node.input) > 3 and node.input[3] and not g.is_constant(node.input[3]):
            problems.append(f"axes input is a tensor; TensorRT {TARGET_TENSORRT} needs constant Pad axes (tensor axes arrived in 10.4)")
    if op in REDUCE_OPS and len(node.input) > 1 and node.input[1] and not g.is_constant(node.input[1]):
        problems.append("axes input must be an initializer or Constant (TensorRT: 'Axis input must be an initializer!')")
    if op in ("Squeeze", "Unsqueeze") and len(node.input) > 1 and node.input[1] and not g.is_constant(node.input[1]):
        problems.append("axes must be a constant (dynamic axes arrived in TensorRT 10.7)")
    if op == "CumSum" and len(node.input) > 1 and not g.is_constant(node.input[1]):
        problems.append("axis must be a build-time constant")
    if op == "TopK":
        if int(attrs.get("sorted", 1)) != 1:
            problems.append("sorted must be 1")
        k = g.const_values(node.input[1]) if len(node.input) > 1 else None
        if k is None:
            problems.append("K must be a constant")
        elif k and k[0] >= 3840:
            problems.append(f"K={k[0]}; TensorRT needs K < 3840")
    if op == "Dropout" and len(node.input) > 2 and node.input[2]:
        training = g.const_values(node.input[2])
        if training is None or any(training):
            problems.append("is_training must be an initializer that is False")
    if op == "LSTM" and (int(attrs.get("input_forget", 0)) != 0 or int(attrs.get("layout", 0)) != 0):
        problems.append("input_forget and layout must be 0")
    if op == "LayerNormalization" and any(node.output[1:]):
        problems.append("only the first output Y is supported")
    if op == "ScatterND" and _text(attrs.get("reduction", "none")) != "none":
        problems.append("reduction other than 'none' is not supported")
    if op == "Constant" and any(k in attrs for k in ("sparse_value", "value_string", "value_strings")):
        problems.append("sparse and string constants are not supported")
    if op == "Cast" and int(attrs.get("to", TensorProto.FLOAT)) not in TENSOR_TYPES:
        problems.append(f"cast to {TensorProto.DataType.Name(int(attrs['to']))} is not a TensorRT type")
    if op == "Clip":
        problems += _check_clip_after_matmul(node, g)
    return problems


def _check_resize(node: onnx.NodeProto, attrs: dict, g: _Graph) -> list[str]:
    problems = []
    mode = _text(attrs.get("mode", "nearest"))
    if mode not in RESIZE_MODES:
        problems.append(f"Resize mode {mode!r}; TensorRT supports {sorted(RESIZE_MODES)}")
    coord = _text(attrs.get("coordinate_transformation_mode", "half_pixel"))
    if coord not in RESIZE_COORDINATE_MODES:
        problems.append(f"coordinate_transformation_mode {coord!r}; TensorRT supports {sorted(RESIZE_COORDINATE_MODES)}")
    nearest = _text(attrs.get("nearest_mode", "round_prefer_floor"))
    if mode == "nearest" and nearest not in RESIZE_NEAREST_MODES:
        problems.append(f"nearest_mode {nearest!r}; TensorRT supports {sorted(RESIZE_NEAREST_MODES)}")
    if int(attrs.get("antialias", 0)) != 0:
        problems.append("antialias is not supported")
    policy = _text(attrs.get("keep_aspect_ratio_policy", "stretch"))
    if policy != "stretch":
        problems.append(f"keep_aspect_ratio_policy {policy!r}; only 'stretch' is supported")
    # opset >= 11: X, roi, scales, sizes. opset 10: X, scales.
    scales = node.input[2] if len(node.input) > 2 and node.input[2] else (node.input[1] if len(node.input) == 2 else "")
    sizes = node.input[3] if len(node.input) > 3 and node.input[3] else ""
    if not any(name and g.is_constant(name) for name in (scales, sizes)):
        problems.append("neither scales nor sizes is a constant; the output shape must be static")
    values = g.const_values(scales) if scales else None
    if values and mode == "linear" and sum(1 for s in values if s != 1.0) > 3:
        problems.append("linear Resize on more than the innermost 3 dimensions is not supported")
    if "axes" in attrs and not (values is not None or sizes):
        problems.append("axes attribute with tensor scales is not supported")
    return problems


def _check_clip_after_matmul(node: onnx.NodeProto, g: _Graph) -> list[str]:
    """NVIDIA/TensorRT#4606 (open, seen in 10.12/10.13): MatMul->Add->Clip(min=0, max=X) and Gemm->Clip are
    fused into an unbounded ReLU, dropping the upper bound. Conv->Clip (ReLU6 in CNNs) is not affected."""
    low = g.const_values(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    high = g.const_values(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    attrs = _attrs(node)
    low = low if low is not None else ([attrs["min"]] if "min" in attrs else None)
    high = high if high is not None else ([attrs["max"]] if "max" in attrs else None)
    if not (low and high and low[0] == 0.0):
        return []
    producer = g.producers.get(node.input[0])
    chain = producer is not None and (
        producer.op_type == "Gemm"
        or (producer.op_type == "Add" and any(getattr(g.producers.get(i), "op_type", "") == "MatMul" for i in producer.input))
    )
    if chain:
        return [
            f"Clip(0, {high[0]}) after {producer.op_type}: TensorRT 10.x may drop the upper bound "
            "(NVIDIA/TensorRT#4606); use Min(Relu(x), max) or put the Clip after a Conv"
        ]
    return []


def check_tensorrt_compat_file(path: str) -> list[str]:
    """check_tensorrt_compat() on a file; weights stay on disk (external data is not loaded)."""
    return check_tensorrt_compat(onnx.load(str(path), load_external_data=False))
