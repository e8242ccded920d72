"""Config of the VLM stage: which GGUF model explains flagged frames, and how hard it may work."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import Section


class AskConfig(Section):
    """Follow-up questions about a flagged part (`<prefix>/<station>/ask`, `edge-inspect ask`), answered
    by the same VLM from the stored evidence and the earlier turns of that part's conversation. Questions
    wait behind flagged frames (verdicts first), in a bounded queue with a per-station rate limit.
    See docs/vlm.md#follow-up-questions."""

    enabled: bool = Field(
        True,
        title="Answer follow-up questions",
        description="Answer questions on the ask topic (needs vlm.enabled and evidence.enabled); when false "
        "every question gets the error vlm_disabled.",
    )
    max_question_chars: int = Field(
        500, ge=16, le=4000, description="Longest question accepted; a longer one gets the error question_too_long."
    )
    max_turns: int = Field(
        20, ge=1, le=1000,
        description="Questions one conversation may hold (stored with the evidence); more get conversation_full: "
        "start a new conversation_id.",
    )
    history_tokens: int = Field(
        1024, ge=0, le=65536,
        description="Token budget (estimated as characters / 4) for earlier turns in the prompt; older turns beyond "
        "it are dropped and named in one line. The images, the evidence and the first verdict are always kept.",
    )
    max_tokens: int = Field(256, ge=16, le=4096, description="Most tokens the model may generate for one answer.")
    timeout_s: float = Field(60.0, gt=0, le=3600, description="Per-question limit for the model (as vlm.timeout_s).")
    queue_size: int = Field(
        8, ge=1, le=1000, description="Questions waiting for the model; a new one beyond it gets the error queue_full."
    )
    rate_per_min: float = Field(
        6.0, gt=0, le=6000,
        description="Questions per minute this station accepts (token bucket, refilled continuously); more get "
        "rate_limited.",
    )
    burst: int = Field(3, ge=1, le=1000, description="Questions accepted at once before rate_per_min applies.")


class VlmConfig(Section):
    """A quantized GGUF vision-language model (llama-cpp-python, in a worker process) explains each
    flagged frame. The scorer's result is published first with `vlm_status: pending`; the verdict
    follows on .../result/update with the same inspection id. Changes take effect at the next
    restart (SIGHUP keeps the running model). See docs/vlm.md."""

    enabled: bool = Field(
        False,
        title="Explain flagged frames with a VLM",
        description="Send every flagged frame to a quantized GGUF model whose verdict follows the "
        "scorer's result as an update (same inspection id).",
    )
    mode: Literal["image", "text"] = Field(
        "image",
        title="Prompt mode",
        description="image: a vision-language model sees the frame, a crop of the strongest region and "
        "a good reference (needs `mmproj`); text: a text-only GGUF gets the same evidence and "
        "knowledge as words (for boxes that cannot hold a vision model).",
    )
    model: str = Field(
        "",
        title="Model GGUF",
        description="Path to the language model GGUF (e.g. a Q4_K_M quant). Required when enabled.",
    )
    mmproj: str = Field(
        "",
        title="Vision projector GGUF",
        description="Path to the multimodal projector GGUF that belongs to `model` (image mode only).",
    )
    chat_format: str = Field(
        "auto",
        title="Chat format",
        description="auto: picked from the GGUF metadata (projector type, chat template). Otherwise "
        "the name of a chat handler the installed llama-cpp-python has, e.g. llava-1-5, llava-1-6, "
        "moondream, minicpm-v-2-6, qwen2-5-vl, mtmd (image mode) or a registered text format such as "
        "chatml or gemma (text mode). `edge-inspect doctor` lists what is installed.",
    )
    n_ctx: int = Field(4096, ge=512, le=131072, description="Context length in tokens (prompt + images + answer).")
    n_threads: int = Field(
        0,
        ge=0,
        le=128,
        description="CPU threads for llama.cpp; 0 = llama-cpp-python's default (half the cores). Keep it "
        "at or below the cores the scorer leaves free: oversubscribed threads slow generation many times.",
    )
    n_gpu_layers: int = Field(
        0,
        ge=-1,
        le=1000,
        description="Layers offloaded to the GPU (Jetson: -1 = all, which needs llama-cpp-python built "
        "with CUDA); 0 = CPU only.",
    )
    max_tokens: int = Field(512, ge=32, le=8192, description="Most tokens the model may generate for one verdict.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 = greedy (repeatable).")
    seed: int = Field(0, ge=0, description="Sampling seed, so a verdict can be reproduced.")
    repeat_penalty: float = Field(
        1.0,
        ge=1.0,
        le=2.0,
        description="1.0 = off. JSON repeats quotes and commas by design; a penalty pushes the model "
        "towards odd whitespace and words.",
    )
    reasoning: bool = Field(
        True,
        description="Let the model write short step-wise observations before its decision (inside the "
        "constrained JSON); costs tokens, usually helps.",
    )
    timeout_s: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Per-request limit (prompt, images and generation). Past it the verdict is "
        "`failed: timeout` and a stuck worker is killed and restarted.",
    )
    load_timeout_s: float = Field(
        300.0, gt=0, le=3600, description="Limit for loading the model into a fresh worker process."
    )
    image_max_side: int = Field(
        672, ge=64, le=4096, description="The frame and the reference are downscaled to this longest side."
    )
    crop_margin: float = Field(
        0.5, ge=0.0, le=5.0, description="Margin around the strongest region's box in the close-up, as a fraction of the box size."
    )
    use_reference: bool = Field(
        True, description="Show the most similar good calibration image beside the frame (image mode)."
    )
    allow_downgrade: bool = Field(
        False,
        title="VLM may downgrade NG to OK",
        description="false (default): both verdicts are reported, the scorer decides. true: when the VLM "
        "finds no defect (within tolerance) with confidence >= `downgrade_min_confidence`, the final "
        "verdict becomes OK (every done update carries final_verdict and decided_by).",
    )
    downgrade_min_confidence: float = Field(
        0.8, ge=0.0, le=1.0, description="Confidence the VLM needs before it may downgrade an NG."
    )
    restart_backoff_s: float = Field(
        1.0, gt=0, le=600, description="First wait before restarting a crashed worker; doubles per failure."
    )
    restart_backoff_max_s: float = Field(60.0, gt=0, le=3600, description="Longest wait between worker restarts.")
    ask: AskConfig = Field(
        default_factory=AskConfig,
        description="Follow-up questions about a flagged part, answered from its stored evidence (MQTT ask/answer, "
        "edge-inspect ask).",
    )

    @model_validator(mode="after")
    def _paths_when_enabled(self) -> "VlmConfig":
        if self.enabled and not self.model:
            raise ValueError("vlm.model is empty but vlm.enabled is true: set vlm.model to a GGUF file path")
        if self.enabled and self.mode == "image" and not self.mmproj:
            raise ValueError(
                "vlm.mode is 'image' but vlm.mmproj is empty: set vlm.mmproj to the model's projector "
                "GGUF, or use vlm.mode: text"
            )
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ValueError("vlm.restart_backoff_max_s must be >= vlm.restart_backoff_s")
        return self
