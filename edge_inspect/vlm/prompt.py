"""Prompt assembly for the VLM: images, product knowledge and the scorer's findings, as chat messages.

Echo's modules made concrete: a retrieved good reference (the model compares instead of guessing
what "normal" is), the product's knowledge guide (names and tolerances to choose from), and the
scorer's findings in words (score vs threshold, regions, area, 3x3 grid location). The scorer has
already decided and localised; the model is asked to explain.

Example:
    prompt = build_prompt(PromptInputs(product="bracket", knowledge=k, frame_bgr=frame,
                                       score=3.1, threshold=2.0, regions=regions, reference=ref))
    runner.complete(prompt.messages, prompt.grammar, ...)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from ..records import GRID_WORDS, Region
from .knowledge import Knowledge, generic_knowledge
from .schema import DESCRIPTION_MAX, verdict_grammar, verdict_schema

BOX_COLOR_BGR = (0, 0, 255)  # red, named in the prompt
CLOSEUP_MIN_SIDE = 224  # small regions are enlarged so the encoder sees detail


class ReferenceLookup(Protocol):
    """What `edge_inspect.scorer.product.ReferenceIndex` offers: the most similar good calibration image."""

    def nearest(self, bgr: np.ndarray) -> tuple[Path, float]: ...


@dataclass(frozen=True)
class Reference:
    """A good calibration image chosen for one frame."""

    path: Path
    similarity: float  # cosine similarity of global embeddings
    bgr: np.ndarray


@dataclass(frozen=True)
class PromptInputs:
    product: str
    knowledge: Knowledge | None
    frame_bgr: np.ndarray  # the image the regions refer to
    score: float
    threshold: float
    regions: tuple[Region, ...] = ()
    reference: Reference | None = None
    mode: Literal["image", "text"] = "image"
    reasoning: bool = True
    image_max_side: int = 672
    crop_margin: float = 0.5


@dataclass(frozen=True)
class Prompt:
    messages: list[dict[str, Any]]
    grammar: str
    schema: dict[str, Any]
    defect_types: tuple[str, ...]
    image_count: int = 0
    reference_path: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def retrieve_reference(index: ReferenceLookup, frame_bgr: np.ndarray) -> Reference:
    """Look up the most similar good image and read it (raises OSError when the file is unreadable)."""
    path, similarity = index.nearest(frame_bgr)
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"reference image {path} cannot be read")
    return Reference(path=Path(path), similarity=float(similarity), bgr=bgr)


def downscale(bgr: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longest side is at most max_side (never enlarges)."""
    h, w = bgr.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1.0:
        return bgr
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)


def strongest_region(regions: tuple[Region, ...]) -> Region | None:
    return max(regions, key=lambda r: r.peak) if regions else None


def clip_box(box: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    x0, x1 = sorted((min(max(int(x0), 0), width), min(max(int(x1), 0), width)))
    y0, y1 = sorted((min(max(int(y0), 0), height), min(max(int(y1), 0), height)))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def region_closeup(bgr: np.ndarray, region: Region, margin: float, max_side: int) -> np.ndarray:
    """A crop around the region with its box drawn in red, enlarged when small."""
    h, w = bgr.shape[:2]
    x0, y0, x1, y1 = clip_box(region.box, w, h)
    pad_x = max(8, int((x1 - x0) * margin))
    pad_y = max(8, int((y1 - y0) * margin))
    cx0, cy0 = max(0, x0 - pad_x), max(0, y0 - pad_y)
    cx1, cy1 = min(w, x1 + pad_x), min(h, y1 + pad_y)
    crop = np.ascontiguousarray(bgr[cy0:cy1, cx0:cx1])
    ch, cw = crop.shape[:2]
    scale = 1.0
    if min(ch, cw) < CLOSEUP_MIN_SIDE:
        scale = min(CLOSEUP_MIN_SIDE / min(ch, cw), max_side / max(ch, cw))
    elif max(ch, cw) > max_side:
        scale = max_side / max(ch, cw)
    if scale != 1.0:
        interp = cv2.INTER_CUBIC if scale > 1.0 else cv2.INTER_AREA
        crop = cv2.resize(crop, (max(1, round(cw * scale)), max(1, round(ch * scale))), interpolation=interp)
    thickness = max(1, round(min(crop.shape[:2]) / 112))
    p0 = (round((x0 - cx0) * scale), round((y0 - cy0) * scale))
    p1 = (round((x1 - cx0) * scale) - 1, round((y1 - cy0) * scale) - 1)
    cv2.rectangle(crop, p0, p1, BOX_COLOR_BGR, thickness)
    return crop


def jpeg_data_uri(bgr: np.ndarray, quality: int = 90) -> str:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return "data:image/jpeg;base64," + base64.b64encode(buf.tobytes()).decode("ascii")


def knowledge_text(knowledge: Knowledge) -> str:
    lines = [f"What a good part looks like: {knowledge.good_part}"]
    lines.append("Defect catalogue:")
    for defect in knowledge.defects:
        entry = f"- {defect.name}: {defect.description}"
        if defect.tolerance:
            entry += f" Tolerance: {defect.tolerance}"
        lines.append(entry)
    lines.append("- other: a defect that is not in this catalogue.")
    if knowledge.notes:
        lines.append(f"Notes: {knowledge.notes}")
    return "\n".join(lines)


def findings_text(score: float, threshold: float, regions: tuple[Region, ...], max_regions: int = 3) -> str:
    """The scorer's findings in words (numbers rounded to what a reader can use). ("Evidence" in this
    project is what the evidence store keeps of a flagged frame; the prompt still says "evidence" to
    the model, which is the word it understands.)"""
    ratio = score / threshold if threshold > 0 else float("inf")
    lines = [
        f"Anomaly scorer: score {score:.3g} against threshold {threshold:.3g} "
        f"({ratio:.1f} times the threshold), so the part was flagged."
    ]
    if not regions:
        lines.append("No compact anomalous region was found; the difference is spread over the part.")
        return "\n".join(lines)
    total = sum(r.area_pct for r in regions)
    lines.append(
        f"{len(regions)} anomalous region{'s' if len(regions) != 1 else ''}, together {total:.2f} % of the image "
        "(the image is divided into a 3x3 grid: top left, top, top right, left, center, right, "
        "bottom left, bottom, bottom right)."
    )
    ranked = sorted(regions, key=lambda r: r.peak, reverse=True)
    for rank, region in enumerate(ranked[:max_regions], start=1):
        where = ", ".join(region.grid_words) if region.grid_words else "unknown"
        label = "Strongest region" if rank == 1 else f"Region {rank}"
        lines.append(f"{label}: {region.area_pct:.2f} % of the image, peak {region.peak:.3g}, at {where}.")
    if len(ranked) > max_regions:
        lines.append(f"({len(ranked) - max_regions} weaker regions not listed.)")
    return "\n".join(lines)


def system_text(product: str, knowledge: Knowledge, mode: str, reasoning: bool) -> str:
    sees = (
        "You see a good reference part, the inspected part and a close-up of the flagged area."
        if mode == "image"
        else "You cannot see the images; judge from the scorer's evidence and the catalogue "
        "(for example the size of the area against the tolerances)."
    )
    steps = (
        "First write short step-wise observations: what differs from a good part, where, how large, "
        "and how it compares with the tolerance. Then decide. "
        if reasoning
        else ""
    )
    return (
        f'You inspect parts of the product "{product}" on a production line. An anomaly scorer that '
        "compares each part with good samples has flagged this part and located where it differs. "
        f"Your job is to say what the anomaly is. {sees}\n\n"
        f"{knowledge_text(knowledge)}\n\n"
        f"Answer with one JSON object only. {steps}"
        "Fields: defect (true if the part must be rejected; false if nothing is wrong or the flaw is "
        "within tolerance), defect_type (a catalogue name, 'other', or 'none' when defect is false), "
        f"location (grid cells from: {', '.join(GRID_WORDS)}), description (one sentence, at most "
        f"{DESCRIPTION_MAX} characters), confidence (0 to 1)."
    )


def build_prompt(inputs: PromptInputs) -> Prompt:
    """Assemble chat messages, the output grammar and schema for one flagged frame."""
    knowledge = inputs.knowledge or generic_knowledge(inputs.product)
    defect_types = knowledge.defect_types
    findings = findings_text(inputs.score, inputs.threshold, inputs.regions)
    task = "Explain the flagged anomaly as the JSON object described."
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_text(inputs.product, knowledge, inputs.mode, inputs.reasoning)}
    ]
    notes: list[str] = []
    image_count = 0
    if inputs.knowledge is None:
        notes.append("no knowledge.yaml: generic catalogue")
    if inputs.mode == "image":
        parts: list[tuple[str, str]] = []
        if inputs.reference is not None:
            ref = downscale(inputs.reference.bgr, inputs.image_max_side)
            parts.append(
                (
                    jpeg_data_uri(ref),
                    f"Image {len(parts) + 1}: a good reference part of the same product "
                    f"(similarity {inputs.reference.similarity:.2f}).",
                )
            )
        else:
            notes.append("no reference image")
        frame = downscale(inputs.frame_bgr, inputs.image_max_side)
        parts.append((jpeg_data_uri(frame), f"Image {len(parts) + 1}: the inspected part."))
        region = strongest_region(inputs.regions)
        if region is not None:
            closeup = region_closeup(inputs.frame_bgr, region, inputs.crop_margin, inputs.image_max_side)
            parts.append(
                (
                    jpeg_data_uri(closeup),
                    f"Image {len(parts) + 1}: close-up of the strongest anomaly, inside the red box.",
                )
            )
        # One user turn holding every image with its caption: chat templates that demand alternating
        # roles (Gemma) accept it, and handlers that print a turn's images before its text (LLaVA)
        # still show them in caption order.
        content: list[dict[str, Any]] = []
        for index, (uri, caption) in enumerate(parts):
            content.append({"type": "image_url", "image_url": {"url": uri}})
            content.append({"type": "text", "text": caption + ("\n" if index < len(parts) - 1 else "")})
        content.append({"type": "text", "text": f"\n\n{findings}\n\n{task}"})
        messages.append({"role": "user", "content": content})
        image_count = len(parts)
    else:
        messages.append({"role": "user", "content": f"{findings}\n\n{task}"})
    return Prompt(
        messages=messages,
        grammar=verdict_grammar(defect_types, inputs.reasoning),
        schema=verdict_schema(defect_types, inputs.reasoning),
        defect_types=defect_types,
        image_count=image_count,
        reference_path=str(inputs.reference.path) if inputs.reference is not None else None,
        notes=tuple(notes),
    )
