"""Follow-up questions about a flagged part: the stored evidence, its conversation, and the prompt.

A part's conversation is kept beside its evidence, one JSON line per answered question::

    <evidence.dir>/20250114/<inspection_id>.chat.jsonl

so it is deleted with the frame by the evidence store's retention (evidence.SUFFIXES). Several
conversations (conversation_id) may share one part; each is bounded by `vlm.ask.max_turns`.

The prompt is the verdict prompt of that frame (prompt.build_prompt: system text with the
knowledge file, the good reference, the frame, the close-up of the strongest region, the scorer's
evidence), then the first verdict as the model's answer, then the earlier turns that fit in
`vlm.ask.history_tokens` (older ones are dropped and named in one line), then the new question with
its answer format. Every earlier message is rendered exactly as when it was new, so the prompt of
turn N+1 starts with the prompt of turn N and llama.cpp can reuse its KV cache for that prefix.

Example:
    stored = load_stored(evidence_root, inspection_id)               # AskError("unknown_inspection") if gone
    history = ConversationLog(stored.chat_path).turns(conversation_id)
    prompt = build_followup_prompt(FollowupInputs(stored, question, history, knowledge, reference, ...))
    reply = worker.infer(prompt.messages, prompt.grammar, max_tokens=256)
    answer = parse_answer(reply.text, prompt.kind)
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..evidence import EvidenceMissing, find_evidence_json, read_evidence  # noqa: F401 - find_evidence_json: re-export
from ..mqtt.ask import ERROR_CODES
from ..records import GRID_WORDS, Region
from .knowledge import Knowledge
from .prompt import PromptInputs, Reference, build_prompt
from .schema import ANSWER_MAX, answer_grammar, answer_schema, question_kind

CHAT_SUFFIX = ".chat.jsonl"  # = evidence.CHAT_SUFFIX (deleted with the entry by retention)
CHARS_PER_TOKEN = 4  # a cheap, tokenizer-free estimate (the daemon process has no tokenizer)
_SUMMARY_MAX = 400
_APPEND_LOCK = threading.Lock()

class AskError(Exception):
    """A question that cannot be answered; `code` is one of ERROR_CODES, the message says what to do."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code


def estimate_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


# --- the stored evidence -------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredInspection:
    """What the evidence store kept of one inspection, read back for a follow-up question."""

    inspection_id: str
    json_path: Path
    body: dict[str, Any]  # the result payload + evidence block + merged VLM update
    frame_bgr: np.ndarray

    @property
    def product(self) -> str:
        return str(self.body.get("product", ""))

    @property
    def chat_path(self) -> Path:
        return self.json_path.with_name(self.inspection_id + CHAT_SUFFIX)

    @property
    def regions(self) -> tuple[Region, ...]:
        regions = []
        for item in self.body.get("regions") or ():
            try:
                regions.append(Region(box=tuple(int(v) for v in item["box"]), area_pct=float(item["area_pct"]),
                                      peak=float(item["peak"]), grid_words=tuple(item.get("grid") or ())))
            except (KeyError, TypeError, ValueError):
                continue
        return tuple(regions)

    @property
    def verdict(self) -> dict[str, Any] | None:
        """The first verdict (the VLM's update merged into the evidence), None when there was none."""
        vlm = self.body.get("vlm")
        return vlm if self.body.get("vlm_status") == "done" and isinstance(vlm, dict) else None


def load_stored(root: str | Path, inspection_id: str) -> StoredInspection:
    """Read an inspection's evidence (evidence.read_evidence); AskError('unknown_inspection') when it is not
    (or no longer) kept."""
    try:
        stored = read_evidence(root, inspection_id)
    except EvidenceMissing as exc:
        raise AskError("unknown_inspection", str(exc)) from None
    return StoredInspection(inspection_id, stored.json_path, stored.body, stored.frame_bgr)


# --- the conversation log ------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One answered question of a conversation (one JSON line)."""

    conversation_id: str
    turn: int  # 1, 2, ... within its conversation
    question: str
    kind: str  # schema.QUESTION_KINDS
    answer: dict[str, Any]  # parse_answer's object: answer (+ yes_no | location)
    request_id: str = ""
    asked_at: float = 0.0
    answered_at: float = 0.0
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "conversation_id": self.conversation_id, "turn": self.turn, "request_id": self.request_id,
            "question": self.question, "kind": self.kind, "answer": self.answer,
            "asked_at": round(self.asked_at, 3), "answered_at": round(self.answered_at, 3), "model": self.model,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Turn":
        return cls(
            conversation_id=str(data["conversation_id"]), turn=int(data["turn"]), question=str(data["question"]),
            kind=str(data.get("kind", "open")), answer=dict(data["answer"]), request_id=str(data.get("request_id", "")),
            asked_at=float(data.get("asked_at", 0.0)), answered_at=float(data.get("answered_at", 0.0)),
            model=str(data.get("model", "")),
        )


class ConversationLog:
    """The JSON-lines file of one inspection's conversations. Lines that cannot be read are skipped
    (a write cut off by a crash), so one bad line never loses the rest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def all_turns(self) -> list[Turn]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        turns = []
        for line in lines:
            try:
                turns.append(Turn.from_json(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                continue
        return turns

    def turns(self, conversation_id: str) -> list[Turn]:
        return [t for t in self.all_turns() if t.conversation_id == conversation_id]

    def conversations(self) -> dict[str, list[Turn]]:
        grouped: dict[str, list[Turn]] = {}
        for turn in self.all_turns():
            grouped.setdefault(turn.conversation_id, []).append(turn)
        return grouped

    def append(self, turn: Turn) -> None:
        """Append one line (one write call, flushed); the evidence folder must still exist."""
        data = (json.dumps(turn.to_json(), ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
        with _APPEND_LOCK:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)


# --- context management --------------------------------------------------------------------------


def select_history(turns: list[Turn], budget_tokens: int) -> tuple[list[Turn], list[Turn]]:
    """(kept, dropped): the newest turns whose messages fit in `budget_tokens`; the older rest is dropped."""
    kept: list[Turn] = []
    used = 0
    for turn in reversed(turns):
        cost = estimate_tokens(question_text(turn.question, turn.kind)) + estimate_tokens(answer_text(turn.answer))
        if used + cost > budget_tokens:
            break
        kept.append(turn)
        used += cost
    kept.reverse()
    return kept, turns[: len(turns) - len(kept)]


def summarize_dropped(dropped: list[Turn]) -> str:
    """One line naming the earlier questions that no longer fit, with their short answers."""
    if not dropped:
        return ""
    parts = []
    for turn in dropped:
        short = turn.answer.get("yes_no") or ", ".join(turn.answer.get("location") or ()) or turn.answer.get("answer", "")
        parts.append(f"{_clip(turn.question, 60)} -> {_clip(str(short), 40)}")
    text = "; ".join(parts)
    return f"({len(dropped)} earlier question{'s' if len(dropped) != 1 else ''} not shown: {_clip(text, _SUMMARY_MAX)})"


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- prompt assembly -----------------------------------------------------------------------------

_FORMATS = {
    "yes_no": '{"yes_no": "yes" or "no", "answer": "one or two sentences"}',
    "location": '{"location": [grid cells from: ' + ", ".join(GRID_WORDS) + '], "answer": "one or two sentences"}',
    "open": '{"answer": "one to three sentences"}',
}


def question_text(question: str, kind: str) -> str:
    """A question as its user turn (the same text whenever it is rendered: the KV cache prefix)."""
    return (
        f"Follow-up question from a quality engineer about this part: {question.strip()}\n"
        f"Answer from the images, the scorer's evidence and the catalogue, as one JSON object: {_FORMATS[kind]} "
        f"(answer at most {ANSWER_MAX} characters). Say so when the evidence cannot tell."
    )


def answer_text(answer: dict[str, Any]) -> str:
    """An earlier answer as the assistant turn, keys in grammar order."""
    ordered = {k: answer[k] for k in ("yes_no", "location", "answer") if k in answer}
    return json.dumps(ordered, ensure_ascii=False, separators=(",", ":"))


def verdict_text(verdict: dict[str, Any]) -> str:
    """The first verdict as the model wrote it (without the observations, which are not stored)."""
    keys = ("defect", "defect_type", "location", "description", "confidence")
    return json.dumps({k: verdict[k] for k in keys if k in verdict}, ensure_ascii=False, separators=(",", ":"))


@dataclass(frozen=True)
class FollowupInputs:
    stored: StoredInspection
    question: str
    history: list[Turn] = field(default_factory=list)  # earlier turns of this conversation, oldest first
    knowledge: Knowledge | None = None
    reference: Reference | None = None
    mode: Literal["image", "text"] = "image"
    reasoning: bool = True  # as vlm.reasoning: the first messages then equal the verdict prompt's
    image_max_side: int = 672
    crop_margin: float = 0.5
    history_tokens: int = 1024
    kind: str | None = None  # None: question_kind(question)


@dataclass(frozen=True)
class FollowupPrompt:
    messages: list[dict[str, Any]]
    grammar: str
    schema: dict[str, Any]
    kind: str
    image_count: int
    kept_turns: int
    dropped_turns: int


def build_followup_prompt(inputs: FollowupInputs) -> FollowupPrompt:
    """Chat messages and answer grammar for one follow-up question (see the module docstring)."""
    stored = inputs.stored
    kind = inputs.kind or question_kind(inputs.question)
    base = build_prompt(
        PromptInputs(
            product=stored.product, knowledge=inputs.knowledge, frame_bgr=stored.frame_bgr,
            score=float(stored.body.get("score", 0.0)), threshold=float(stored.body.get("threshold", 0.0)),
            regions=stored.regions, reference=inputs.reference, mode=inputs.mode, reasoning=inputs.reasoning,
            image_max_side=inputs.image_max_side, crop_margin=inputs.crop_margin,
        )
    )
    messages = list(base.messages)
    verdict = stored.verdict
    if verdict is not None:
        messages.append({"role": "assistant", "content": verdict_text(verdict)})
    kept, dropped = select_history(list(inputs.history), inputs.history_tokens)
    for turn in kept:
        messages.append({"role": "user", "content": question_text(turn.question, turn.kind)})
        messages.append({"role": "assistant", "content": answer_text(turn.answer)})
    last = question_text(inputs.question, kind)
    if verdict is None and not kept:
        last = "(No verdict was made for this part: the model was busy, off or failed.)\n" + last
    summary = summarize_dropped(dropped)
    if summary:
        last = f"{summary}\n{last}"
    messages.append({"role": "user", "content": last})
    return FollowupPrompt(
        messages=merge_consecutive(messages), grammar=answer_grammar(kind), schema=answer_schema(kind), kind=kind,
        image_count=base.image_count, kept_turns=len(kept), dropped_turns=len(dropped),
    )


def merge_consecutive(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Join neighbouring messages of one role (templates such as Gemma's demand alternating roles)."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"] and message["role"] != "system":
            merged[-1] = {"role": message["role"], "content": _join(merged[-1]["content"], message["content"])}
        else:
            merged.append(dict(message))
    return merged


def _join(a: Any, b: Any) -> Any:
    if isinstance(a, str) and isinstance(b, str):
        return f"{a}\n\n{b}"
    parts = lambda c: [{"type": "text", "text": c}] if isinstance(c, str) else list(c)  # noqa: E731
    return [*parts(a), {"type": "text", "text": "\n\n"}, *parts(b)]
