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
    # Where patch features are tapped (see parse_tap): "blockN" is the output of MBConv block N, "expandN"
    # the ReLU6 activations of block N's 1x1 expansion. Default: PatchCore's layer2 + layer3 on Lite0,
    # i.e. the ends of stage 3 (block 4: stride 8, 40 ch) and stage 5 (block 10: stride 16, 112 ch).
    # Chosen on real parts (ball screw, magnetic tile by lighting, ELPV mono/poly; docs/scorer.md):
    # block 4 + expand 8 had been chosen on generated textures and lost there.
    taps: tuple[str, ...] = ("block4", "block10")
    # Gaussian smoothing of the full-resolution map (anomalib's 4 px at 256 px).
    sigma_px: float = 4.0
    # Reflect-pad the image by this many pixels before the backbone and crop the features back (0 = off).
    # It removed border artefacts on generated textures, but on the real sets it won on two and lost on
    # three (docs/scorer.md), so off by default.
    context_pad: int = 0
    # One scale per tapped layer, set at calibration so every layer contributes equally to distances
    # (1 / mean L2 norm of that layer's patch features on the good images). Empty = unscaled.
    layer_scales: tuple[float, ...] = ()
    # Gaussian random projection of the concatenated patch features to this many dims (0 = keep all). The
    # default 152 raw dims need none; it is for wide taps (expansions), where it cuts the kNN cost.
    projection_dim: int = 0
    projection_seed: int = 0
    # Image score = mean of the highest `score_topk` fraction of anomaly-map pixels (0 = the map's max). With
    # the border padding counted (below) the max wins on the real sets: max 0.811, top 0.1 % 0.810, top 1 %
    # 0.806 mean image AUROC (docs/scorer.md); the top 1 % had been chosen when it hid border noise.
    # Calibrations before the field existed scored the map's max too.
    score_topk: float = 0.0
    # The 3x3 patch aggregation at the image border: True averages the zero padding in (PyTorch's and
    # anomalib's default), False averages only the neighbours inside the image. True is worth +0.09 mean
    # image AUROC over the real sets (0.721 -> 0.811, docs/scorer.md): with False the border patches keep
    # the backbone's own zero-padding artefacts at full strength and good parts score high there.
    # Calibrations before the field existed scored with False (manifest migration).
    pool_count_pad: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.taps:
            raise ValueError("taps: give at least one tap, e.g. ('block4', 'expand8')")
        if not 0.0 <= self.score_topk <= 0.5:
            raise ValueError(f"score_topk {self.score_topk}: use a fraction of the map between 0 (max) and 0.5")
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
        """From a manifest's params block as the current manifest version writes it (older ones are
        migrated first: scorer/manifest.py)."""
        return cls(
            input_size=tuple(d["input_size"]),
            taps=tuple(normalize_tap(t) for t in d["taps"]),
            sigma_px=float(d["sigma_px"]),
            context_pad=int(d["context_pad"]),
            layer_scales=tuple(float(v) for v in d["layer_scales"]),
            projection_dim=int(d["projection_dim"]),
            projection_seed=int(d["projection_seed"]),
            score_topk=float(d["score_topk"]),
            pool_count_pad=bool(d["pool_count_pad"]),
            extra=dict(d["extra"]),
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
