"""The few numbers that define the scorer algorithm, shared by the ONNX graph and the eager reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from .backbone import TAP_KINDS, parse_tap, tap_channels  # noqa: F401 - parse_tap and TAP_KINDS are part of this API
from .memory_bank import random_projection


@dataclass(frozen=True)
class ScorerParams:
    # Input resolution of the graph (H, W). 256 keeps a 32x32 patch grid at stride 8.
    input_size: tuple[int, int] = (256, 256)
    # Where patch features are tapped (see parse_tap): "blockN" is the output of MBConv block N (a linear
    # bottleneck: few channels), "expandN" the ReLU6 activations of block N's 1x1 expansion (6x the
    # channels, nonlinear). Defaults, like PatchCore's layer2+layer3 (mid-level, neither pixel-level nor
    # ImageNet-class-specific): block 4 ends stage 3 (stride 8, 40 ch: edges, fine texture); expand 8
    # is block 8's view of stage 4's output (stride 16, 480 ch: parts, larger context). The rich stride-16
    # activations beat block 10's 112-ch bottleneck by +0.02 image and +0.03 pixel AUROC on average over
    # seven test sets (docs/scorer.md).
    taps: tuple[str, ...] = ("block4", "expand8")
    # Gaussian smoothing of the full-resolution map. anomalib uses 4 px at 256 px; the bilinear
    # upsampling from the 8-px patch grid already smooths, and less blur keeps a small defect's peak:
    # image AUROC fell steadily from sigma 1 to 8 over seven test sets (docs/scorer.md), so 2.
    sigma_px: float = 2.0
    # Reflect-pad the image by this many pixels before the backbone and crop the features back.
    # Zero padding inside the CNN makes border patches unlike any other patch, so good parts scored
    # highest along their edges; mirrored context removes that (image AUROC +0.05..0.1 on textures).
    context_pad: int = 16
    # One scale per tapped layer, set at calibration so every layer contributes equally to distances
    # (1 / mean L2 norm of that layer's patch features on the good images). Empty = unscaled.
    layer_scales: tuple[float, ...] = ()
    # Gaussian random projection of the concatenated patch features to this many dims (0 = keep all):
    # keeps distances (Johnson-Lindenstrauss) at a fraction of the kNN cost of 520 raw dims.
    projection_dim: int = 192
    projection_seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.taps:
            raise ValueError("taps: give at least one tap, e.g. ('block4', 'expand8')")
        if len(set(self.taps)) != len(self.taps):
            raise ValueError(f"taps: {list(self.taps)} names a tap twice")
        object.__setattr__(self, "taps", tuple(sorted((normalize_tap(t) for t in self.taps), key=tap_order)))

    def to_json(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["taps"] = list(self.taps)
        d["layer_scales"] = [float(v) for v in self.layer_scales]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ScorerParams":
        return cls(
            input_size=tuple(d["input_size"]),
            taps=tuple(normalize_tap(t) for t in d["taps"]),
            sigma_px=float(d["sigma_px"]),
            context_pad=int(d.get("context_pad", 0)),
            layer_scales=tuple(float(v) for v in d.get("layer_scales", ())),
            projection_dim=int(d.get("projection_dim", 0)),
            projection_seed=int(d.get("projection_seed", 0)),
            extra=dict(d.get("extra", {})),
        )


def normalize_tap(tap: str | int) -> str:
    """Older manifests stored block outputs as plain integers (4 = "block4")."""
    if isinstance(tap, int):
        return f"block{tap}"
    parse_tap(tap)
    return tap


def tap_order(tap: str) -> tuple[int, int]:
    """Network order: block N's expansion comes before block N's output."""
    kind, index = parse_tap(tap)
    return index, 0 if kind == "expand" else 1


def feature_dim(params: ScorerParams) -> int:
    """Channels of the concatenated taps, before any projection."""
    return sum(tap_channels(t) for t in params.taps)


def projection_matrix(params: ScorerParams) -> np.ndarray | None:
    """[projection_dim, feature_dim] Gaussian random projection, or None. Derived from the params alone
    (dims + seed), so calibration, the ONNX graph and the eager reference all use the same matrix."""
    d = feature_dim(params)
    if not params.projection_dim or params.projection_dim >= d:
        return None
    return random_projection(d, params.projection_dim, params.projection_seed)


def output_dim(params: ScorerParams) -> int:
    """Dimension of the patch features the memory bank holds."""
    p = projection_matrix(params)
    return feature_dim(params) if p is None else int(p.shape[0])


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)
