"""Answering follow-up questions about a flagged part: one question (`Asker`) and the daemon's queue (`AskService`).

    MQTT <prefix>/<station>/ask ──▶ AskService.submit (paho's thread: checks only, never blocks)
        │ bounded queue (vlm.ask.queue_size), token-bucket rate limit (vlm.ask.rate_per_min, burst)
        ▼ its own thread; waits while flagged frames are queued or explained (verdicts first)
    Asker.answer: evidence + conversation ──▶ followup prompt ──▶ the VLM stage's worker ──▶ parsed answer
        ▼                                                              (appended to <id>.chat.jsonl)
    <prefix>/<station>/answer (same request_id, inspection_id, conversation_id), errors too

`edge-inspect ask` uses `Asker` directly on a station's evidence folder, with its own worker.

Example:
    asker = Asker(stage, "evidence")                   # stage: a started vlm.VlmStage
    body = asker.answer(AskRequest(inspection_id, "Is the scratch deeper than the coating?", "r-1"))
    body["status"], body["answer"], body.get("yes_no")
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..config.vlm import AskConfig
from ..errors import ConfigError, UserError
from ..mqtt.ask import AskRequest
from ..mqtt.dispatch import TokenBucket
from ..mqtt.request_queue import RequestQueue
from .followup import (
    AskError,
    ConversationLog,
    FollowupInputs,
    StoredInspection,
    Turn,
    build_followup_prompt,
    load_stored,
)
from .knowledge import load_knowledge
from .prompt import Reference, retrieve_reference
from .schema import AnswerError, parse_answer

log = logging.getLogger(__name__)

DEFAULT_CONVERSATION = "default"
STOPPING = "the daemon is stopping; ask again when it is back"


def error_body(request: AskRequest, code: str, message: str) -> dict[str, Any]:
    """The answer body of a question that got no answer."""
    return {
        "request_id": request.request_id,
        "inspection_id": request.inspection_id,
        "conversation_id": request.conversation_id or DEFAULT_CONVERSATION,
        "status": "error",
        "error_code": code,
        "error": message,
    }


class Asker:
    """Answers one question at a time from the evidence folder with a VlmStage's knowledge, references
    and worker. Raises nothing for a bad question: `answer()` returns an error body instead."""

    def __init__(self, stage: Any, evidence_root: str | Path, flush: Callable[[float], bool] | None = None):
        self.stage = stage
        self.config = stage.config
        self.ask: AskConfig = stage.config.ask
        self.root = Path(evidence_root)
        self._flush = flush
        self._contexts: dict[str, tuple[Any, Any]] = {}

    def check(self, request: AskRequest) -> None:
        """The cheap checks (no disk, no model): AskError when the question is not acceptable."""
        if request.error:
            raise AskError("invalid_request", request.error)
        question = request.question.strip()
        if not question:
            raise AskError("invalid_request", "the question is empty")
        if len(question) > self.ask.max_question_chars:
            raise AskError(
                "question_too_long",
                f"the question has {len(question)} characters; at most vlm.ask.max_question_chars="
                f"{self.ask.max_question_chars}: shorten it",
            )

    def answer(self, request: AskRequest) -> dict[str, Any]:
        started = time.monotonic()
        try:
            return self._answer(request, started)
        except AskError as exc:
            return error_body(request, exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must still answer the asker
            log.exception("ask: answering %s failed", request.request_id)
            return error_body(request, "failed", f"internal error: {type(exc).__name__}: {exc}")

    def _answer(self, request: AskRequest, started: float) -> dict[str, Any]:
        self.check(request)
        conversation_id = request.conversation_id or DEFAULT_CONVERSATION
        if self._flush is not None:
            self._flush(2.0)  # the evidence (and the merged verdict) of a just-flagged part is on disk
        stored = load_stored(self.root, request.inspection_id)
        chat = ConversationLog(stored.chat_path)
        history = chat.turns(conversation_id)
        if len(history) >= self.ask.max_turns:
            raise AskError(
                "conversation_full",
                f"conversation {conversation_id!r} of inspection {request.inspection_id} has vlm.ask.max_turns="
                f"{self.ask.max_turns} questions; start a new conversation_id",
            )
        knowledge, reference = self._context(stored)
        prompt = build_followup_prompt(
            FollowupInputs(
                stored=stored, question=request.question.strip(), history=history, knowledge=knowledge,
                reference=reference, mode=self.config.mode, reasoning=self.config.reasoning,
                image_max_side=self.config.image_max_side, crop_margin=self.config.crop_margin,
                history_tokens=self.ask.history_tokens,
            )
        )
        worker = self.stage.worker
        state = worker.state()
        if not state.get("ready"):
            reason = state.get("last_error") or ("model still loading" if state.get("loading") else "not started")
            raise AskError("vlm_unavailable", f"the VLM worker is not ready ({reason}); ask again later")
        reply = worker.infer(prompt.messages, prompt.grammar, self.ask.timeout_s, max_tokens=self.ask.max_tokens)
        if not reply.ok:
            code = "vlm_unavailable" if reply.reason.startswith(("model load failed", "worker unavailable")) else "failed"
            raise AskError(code, reply.reason)
        completion = reply.completion or {}
        if completion.get("finish_reason") == "length":
            raise AskError("failed", f"the answer was cut off at vlm.ask.max_tokens={self.ask.max_tokens}; raise it")
        try:
            answer = parse_answer(reply.text, prompt.kind)
        except AnswerError as exc:
            raise AskError("failed", f"invalid model output: {exc}") from None
        turn = Turn(
            conversation_id=conversation_id, turn=len(history) + 1, question=request.question.strip(),
            kind=prompt.kind, answer=answer, request_id=request.request_id,
            asked_at=request.received_at or time.time(), answered_at=time.time(), model=reply.model,
        )
        try:
            chat.append(turn)
        except OSError as exc:  # deleted by retention meanwhile, or a full disk: the answer still goes out
            log.warning("ask: conversation of %s not saved: %s", request.inspection_id, exc)
        return {
            "request_id": request.request_id,
            "inspection_id": request.inspection_id,
            "conversation_id": conversation_id,
            "status": "answered",
            "kind": prompt.kind,
            "turn": turn.turn,
            **answer,
            "model": reply.model,
            "latency_ms": round(1000.0 * (time.monotonic() - started), 1),
            "prompt_tokens": completion.get("prompt_tokens"),
            "generated_tokens": completion.get("generated_tokens"),
            "dropped_turns": prompt.dropped_turns,
        }

    def _context(self, stored: StoredInspection) -> tuple[Any, Reference | None]:
        """The product's knowledge and the good reference for the stored frame (retrieved again: the same
        frame gives the same reference, so the prompt prefix stays the same across turns)."""
        name = stored.product
        cal_dir = self.stage.calibration_dir
        knowledge_path = cal_dir / name / "knowledge.yaml"
        stamp = knowledge_path.stat().st_mtime_ns if knowledge_path.is_file() else None
        cached = self._contexts.get(name)
        if cached is None or cached[0] != stamp:
            try:
                knowledge = load_knowledge(cal_dir, name)
            except ConfigError as exc:
                raise AskError("failed", str(exc)) from None
            index = None
            if self.config.mode == "image" and self.config.use_reference:
                index, _note = self.stage._reference_index(name, None)
            cached = (stamp, (knowledge, index))
            self._contexts[name] = cached
        knowledge, index = cached[1]
        reference = None
        if index is not None:
            try:
                reference = retrieve_reference(index, stored.frame_bgr)
            except Exception as exc:  # noqa: BLE001 - answer without a reference rather than not at all
                log.warning("ask: no reference for %s: %s", stored.inspection_id, exc)
        return knowledge, reference


class AskService:
    """The daemon's question queue in front of an Asker. `submit()` is called on paho's network thread
    and never blocks; every question gets exactly one body through `publish` (answer or error)."""

    def __init__(
        self,
        config: AskConfig,
        asker: Asker | None,
        publish: Callable[[dict[str, Any]], Any],
        busy: Callable[[], bool] = lambda: False,
        unavailable: str = "",
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.asker = asker
        self._publish = publish
        self._busy = busy
        self._unavailable = unavailable or ("" if asker is not None else "the VLM is off (vlm.enabled is false)")
        self._counts = dict.fromkeys(("asked", "answered", "errors", "rate_limited", "queue_full"), 0)
        self._requests: RequestQueue[AskRequest] = RequestQueue(
            config.queue_size, TokenBucket(config.rate_per_min / 60.0, config.burst, clock), AskError, self._counts,
            stopping=STOPPING,
            rate_limited=f"more than vlm.ask.rate_per_min={config.rate_per_min:g} questions per minute "
                         f"(burst {config.burst}) for this station; ask again in a minute",
            queue_full=f"vlm.ask.queue_size={config.queue_size} questions are already waiting; ask again later",
        )
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.asker is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vlm-ask", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Questions still queued get the error 'stopping'; the one being answered may finish until timeout."""
        for request in self._requests.drain():
            self._reply(error_body(request, "stopping", STOPPING))
        if self._thread is not None:
            self._thread.join(timeout)

    def state(self) -> dict[str, Any]:
        with self._requests.cond:
            return {**self._counts, "queued": len(self._requests), "busy": self._requests.busy}

    def submit(self, request: AskRequest) -> None:
        self._requests.count("asked")
        try:
            self._requests.admit(request, check=lambda: self._check(request))
        except AskError as exc:
            self._reply(error_body(request, exc.code, str(exc)))

    def _check(self, request: AskRequest) -> None:
        if self.asker is None:
            raise AskError("vlm_disabled", f"questions cannot be answered: {self._unavailable}")
        self.asker.check(request)

    def _run(self) -> None:
        while (request := self._requests.take()) is not None:
            try:
                body = self._wait_for_frames(request) or self.asker.answer(request)
            finally:
                self._requests.done()
            self._reply(body)

    def _wait_for_frames(self, request: AskRequest) -> dict[str, Any] | None:
        """Verdicts first: wait while flagged frames are queued or explained (None = go ahead)."""
        end = time.monotonic() + self.config.timeout_s
        while self._busy():
            if self._requests.stopping:
                return error_body(request, "stopping", STOPPING)
            if time.monotonic() > end:
                return error_body(
                    request, "busy",
                    f"the VLM was explaining flagged frames for vlm.ask.timeout_s={self.config.timeout_s:g} s "
                    "(verdicts go first); ask again later",
                )
            time.sleep(0.05)
        return None

    def _reply(self, body: dict[str, Any]) -> None:
        self._requests.count("answered" if body.get("status") == "answered" else "errors")
        try:
            self._publish(body)
        except Exception:  # noqa: BLE001 - the publisher logs; questions go on
            log.exception("ask: could not publish the answer to request %s", body.get("request_id"))


def daemon_ask_service(config: Any, stage: Any, evidence: Any, publisher: Any, flagged: Any) -> AskService:
    """The daemon's AskService (config: AppConfig). Without a usable VLM stage, evidence or with
    vlm.ask.enabled false, every question is answered with the error vlm_disabled and the reason."""
    ask = config.vlm.ask
    reason = ""
    if not config.vlm.enabled:
        reason = "the VLM is off (vlm.enabled is false); enable it to answer questions"
    elif not ask.enabled:
        reason = "vlm.ask.enabled is false on this station"
    elif evidence is None or not config.evidence.enabled:
        reason = "evidence.enabled is false: no stored evidence to answer from"
    elif stage is None:
        reason = "this daemon runs a custom flagged-frame sink, not the VLM stage"
    asker = None if reason else Asker(stage, evidence.root, flush=evidence.flush)

    def busy() -> bool:
        return flagged is not None and flagged.outstanding() > 0

    service = AskService(ask, asker, publisher.publish_answer, busy, reason)
    if stage is not None:
        stage.ask_state = service.state
    return service


class AskFailed(UserError):
    """A question the CLI could not get answered (exit code 2); the message has the code and the reason."""


def _print_body(body: dict[str, Any], as_json: bool, out: Any) -> None:
    if as_json:
        print(json.dumps(body, ensure_ascii=False), file=out, flush=True)
        return
    typed = body.get("yes_no") or (", ".join(body["location"]) if body.get("location") else "")
    print(f"{typed.upper() + ': ' if body.get('yes_no') else (typed + ': ' if typed else '')}{body['answer']}",
          file=out, flush=True)


def run_cli(
    config: Any,
    inspection_id: str,
    question: str | None,
    evidence_dir: str | None = None,
    conversation_id: str | None = None,
    chat: bool = False,
    as_json: bool = False,
    input_fn: Callable[[str], str] | None = None,
    out: Any = None,
) -> int:
    """`edge-inspect ask`: answer on the station's evidence folder with a worker of its own.
    Raises AskFailed (exit code 2) for the error cases; in --chat a bad question is reported and the
    session goes on (an unknown inspection id still ends it with 2)."""
    import sys

    from ..mqtt.ask import parse_ask
    from .stage import VlmStage

    out = out or sys.stdout
    input_fn = input_fn or _read_line
    vlm = config.vlm
    if not vlm.enabled:
        raise AskFailed("vlm_disabled: vlm.enabled is false in the config; set vlm.enabled: true and vlm.model "
                        "(and vlm.mmproj in image mode) to ask questions")
    root = Path(evidence_dir or config.evidence.dir)
    if not _valid_id(inspection_id):
        raise AskFailed(f"invalid_request: {inspection_id!r} is not an inspection id")
    try:
        load_stored(root, inspection_id)
    except AskError as exc:
        raise AskFailed(f"{exc.code}: {exc}") from None
    stage = VlmStage(vlm, publisher=None, calibration_dir=config.scoring.calibration_dir)
    stage.start()
    try:
        if not stage.worker.wait_ready(vlm.load_timeout_s):
            reason = stage.worker.state().get("last_error") or "not ready"
            raise AskFailed(f"vlm_unavailable: the VLM did not load ({reason}); check vlm.model / vlm.mmproj")
        asker = Asker(stage, root)
        counter = 0

        def ask(text: str) -> dict[str, Any]:
            nonlocal counter
            counter += 1
            request = parse_ask(json.dumps({
                "inspection_id": inspection_id, "question": text, "request_id": f"cli-{counter}",
                **({"conversation_id": conversation_id} if conversation_id else {}),
            }).encode("utf-8"))
            return asker.answer(request)

        if not chat:
            body = ask(question or "")
            if body["status"] != "answered":
                raise AskFailed(f"{body['error_code']}: {body['error']}")
            _print_body(body, as_json, out)
            return 0
        print(f"asking about inspection {inspection_id} (empty line, 'quit' or Ctrl-D ends)", file=sys.stderr)
        pending = [question] if question else []
        while True:
            if pending:
                text = pending.pop(0)
            else:
                try:
                    text = input_fn("> ")
                except EOFError:
                    return 0
            if not text.strip() or text.strip().lower() in ("quit", "exit"):
                return 0
            body = ask(text)
            if body["status"] == "answered":
                _print_body(body, as_json, out)
            elif body["error_code"] == "unknown_inspection":
                raise AskFailed(f"{body['error_code']}: {body['error']}")
            else:
                print(f"error: {body['error_code']}: {body['error']}", file=sys.stderr, flush=True)
    finally:
        stage.stop(timeout=5.0)


def _read_line(prompt: str) -> str:
    """One line from stdin, the prompt on stderr (stdout carries only answers, e.g. with --json)."""
    import sys

    if sys.stdin.isatty():
        sys.stderr.write(prompt)
        sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def _valid_id(inspection_id: str) -> bool:
    from ..records import is_inspection_id

    return is_inspection_id(inspection_id)
