"""Export the pretrained EfficientNet-Lite0 (BatchNorm folded) as the backbone ONNX artifact."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..scorer.backbone import folded_layers
from ..scorer.scorer_graph import build_classifier_model, save_model
from .weights import load_state_dict_numpy, pretrained_weights_path


def export_backbone(out_path: str | Path) -> Path:
    source = pretrained_weights_path()
    folded = folded_layers(load_state_dict_numpy(source))
    model = build_classifier_model(folded)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    for key, value in (("source_weights", source.name), ("source_sha256", digest), ("architecture", "efficientnet-lite0")):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    save_model(model, out_path)
    return Path(out_path)
