"""Helpers shared by tests: scorer graphs without the pretrained weights, the tiny llama.cpp VLM."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None
NO_LLAMA = "llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)"


def tiny_vlm_or_skip(tmp_path_factory):
    """The tiny random-weight vision GGUF and projector (tests/tiny_gguf.py), or a skip saying why."""
    if not HAS_LLAMA:
        pytest.skip(NO_LLAMA)
    pytest.importorskip("gguf", reason="the gguf package writes the tiny test model")
    from tiny_gguf import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny"))


def random_folded_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """EfficientNet-Lite0 folded conv weights with the real layout and He-scaled random values."""
    from edge_inspect.scorer.backbone import lite0_blocks

    rng = np.random.default_rng(seed)

    def he(shape, fan_in):
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    folded = {"stem.w": he((32, 3, 3, 3), 27), "stem.b": np.zeros(32, np.float32)}
    for spec in lite0_blocks():
        p, hidden = f"blocks.{spec.index}", spec.in_channels * spec.expand
        if spec.expand != 1:
            folded[f"{p}.expand.w"] = he((hidden, spec.in_channels, 1, 1), spec.in_channels)
            folded[f"{p}.expand.b"] = np.zeros(hidden, np.float32)
        folded[f"{p}.dw.w"] = he((hidden, 1, spec.kernel, spec.kernel), spec.kernel**2)
        folded[f"{p}.dw.b"] = np.zeros(hidden, np.float32)
        folded[f"{p}.project.w"] = he((spec.out_channels, hidden, 1, 1), hidden)
        folded[f"{p}.project.b"] = np.zeros(spec.out_channels, np.float32)
    return folded
