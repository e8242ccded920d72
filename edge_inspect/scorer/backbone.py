"""EfficientNet-Lite0 as plain data: the block layout, TF "SAME" padding and BatchNorm folding.

Shared by the ONNX graph builder (edge_inspect/scorer/scorer_graph.py) and the PyTorch eager reference
(edge_inspect/export/reference.py), so both describe the same network.

Lite models (Google's efficientnet-lite) differ from EfficientNet-B0: ReLU6 instead of swish, no
squeeze-and-excitation, and inputs scaled as (x - 127) / 128 on RGB 0..255. They were trained in
TensorFlow with "SAME" padding, which pads asymmetrically (more on the bottom/right) on strided layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

INPUT_MEAN = 127.0
INPUT_STD = 128.0
BN_EPS = 1e-3  # TF's batch_norm_epsilon for EfficientNet

# (repeats, kernel, stride, expand_ratio, in_channels, out_channels) per stage, efficientnet-lite0.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)


@dataclass(frozen=True)
class BlockSpec:
    index: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def lite0_blocks() -> list[BlockSpec]:
    blocks: list[BlockSpec] = []
    for repeats, kernel, stride, expand, cin, cout in LITE0_STAGES:
        for r in range(repeats):
            blocks.append(BlockSpec(len(blocks), kernel, stride if r == 0 else 1, expand, cin if r == 0 else cout, cout))
    return blocks


def block_strides() -> list[int]:
    """Total stride of the output of each block (stem is /2)."""
    total, strides = 2, []
    for block in lite0_blocks():
        total *= block.stride
        strides.append(total)
    return strides


def same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME" padding (before, after) along one axis for a given input size."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def fold_batchnorm(weights: dict[str, np.ndarray], conv: str, bn: str) -> tuple[np.ndarray, np.ndarray]:
    """Conv weight + BatchNorm (eval) -> one conv weight and bias."""
    w = weights[f"{conv}.weight"]
    gamma, beta = weights[f"{bn}.weight"], weights[f"{bn}.bias"]
    mean, var = weights[f"{bn}.running_mean"], weights[f"{bn}.running_var"]
    scale = gamma / np.sqrt(var + BN_EPS)
    return (w * scale.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32), (beta - mean * scale).astype(np.float32)


def folded_layers(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All conv layers with BN folded in, under stable names: stem, blocks.N.{expand,dw,project}, head, fc."""
    out: dict[str, np.ndarray] = {}
    out["stem.w"], out["stem.b"] = fold_batchnorm(weights, "_conv_stem", "_bn0")
    for block in lite0_blocks():
        p = f"_blocks.{block.index}"
        if block.expand != 1:
            out[f"blocks.{block.index}.expand.w"], out[f"blocks.{block.index}.expand.b"] = fold_batchnorm(
                weights, f"{p}._expand_conv", f"{p}._bn0"
            )
        out[f"blocks.{block.index}.dw.w"], out[f"blocks.{block.index}.dw.b"] = fold_batchnorm(
            weights, f"{p}._depthwise_conv", f"{p}._bn1"
        )
        out[f"blocks.{block.index}.project.w"], out[f"blocks.{block.index}.project.b"] = fold_batchnorm(
            weights, f"{p}._project_conv", f"{p}._bn2"
        )
    out["head.w"], out["head.b"] = fold_batchnorm(weights, "_conv_head", "_bn1")
    out["fc.w"], out["fc.b"] = weights["_fc.weight"], weights["_fc.bias"]
    return out


TAP_KINDS = ("block", "expand")


def parse_tap(tap: str) -> tuple[str, int]:
    """("block" | "expand", block index) from "block4" / "expand8"."""
    for kind in TAP_KINDS:
        if tap.startswith(kind) and tap[len(kind):].isdigit():
            return kind, int(tap[len(kind):])
    raise ValueError(f"tap {tap!r}: write blockN (output of block N) or expandN (block N's expansion activations)")


def tap_channels(tap: str) -> int:
    """Channels of a feature tap ("blockN" / "expandN", see parse_tap)."""
    kind, index = parse_tap(tap)
    blocks = lite0_blocks()
    if not 0 <= index < len(blocks):
        raise ValueError(f"tap {tap!r}: EfficientNet-Lite0 has blocks 0..{len(blocks) - 1}")
    spec = blocks[index]
    if kind == "block":
        return spec.out_channels
    if spec.expand == 1:
        raise ValueError(f"tap {tap!r}: block {index} has no expansion layer; tap block{index} instead")
    return spec.in_channels * spec.expand


def tap_stride(tap: str) -> int:
    """Total stride of a tap: a block's expansion runs at the resolution of the block's input."""
    kind, index = parse_tap(tap)
    tap_channels(tap)  # validates the index
    strides = block_strides()
    if kind == "block":
        return strides[index]
    return strides[index - 1] if index > 0 else 2
