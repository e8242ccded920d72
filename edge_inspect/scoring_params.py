"""The few numbers that define the scorer algorithm, shared by the ONNX graph and the eager reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass(frozen=True)
class ScorerParams:
    # Input resolution of the graph (H, W). 256 keeps a 32x32 patch grid at stride 8.
    input_size: tuple[int, int] = (256, 256)
    # Backbone blocks whose outputs become patch features. Block 4 ends stage 3 (stride 8, 40 ch: edges,
    # small texture); block 10 ends stage 5 (stride 16, 112 ch: parts, larger context). Like PatchCore's
    # layer2+layer3: mid-level features, neither pixel-level nor ImageNet-class-specific.
    taps: tuple[int, ...] = (4, 10)
    # Gaussian smoothing of the full-resolution map (anomalib uses sigma 4 at 256 px).
    sigma_px: float = 4.0
    # Reflect-pad the image by this many pixels before the backbone and crop the features back.
    # Zero padding inside the CNN makes border patches unlike any other patch, so good parts scored
    # highest along their edges; mirrored context removes that (image AUROC +0.05..0.1 on textures).
    context_pad: int = 16
    # One scale per tapped layer, set at calibration so every layer contributes equally to distances
    # (1 / mean L2 norm of that layer's patch features on the good images). Empty = unscaled.
    layer_scales: tuple[float, ...] = ()
    # Random orthogonal projection of patch features to this many dims (0 = keep all).
    projection_dim: int = 0
    extra: dict = field(default_factory=dict)

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
            taps=tuple(d["taps"]),
            sigma_px=float(d["sigma_px"]),
            context_pad=int(d.get("context_pad", 0)),
            layer_scales=tuple(float(v) for v in d.get("layer_scales", ())),
            projection_dim=int(d.get("projection_dim", 0)),
            extra=dict(d.get("extra", {})),
        )


def gaussian_kernel_1d(sigma: float) -> np.ndarray:
    radius = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)
