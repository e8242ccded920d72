"""llama-cpp-python in process: load a GGUF (plus projector) once, answer chat requests under a grammar.

Used inside the worker subprocess (worker.py), never in the daemon process: a crash or OOM in
llama.cpp must not take the daemon down. Chat handlers are discovered in the installed
llama-cpp-python at runtime (versions differ in what they ship), and `chat_format: auto` picks
one from the GGUF metadata.

Example:
    runner = LlamaRunner.load(VlmConfig(model="m.gguf", mmproj="p.gguf"))
    done = runner.complete(prompt.messages, prompt.grammar, max_tokens=512)
    print(done.text, done.generation_tokens_per_s)
"""

from __future__ import annotations

import inspect
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..config.vlm import VlmConfig
from ..errors import ConfigError, UserError
from .sampling import LazyGrammarSampler

# clip.projector_type -> the handler written for that model family (keys are normalised names).
_PROJECTOR_HANDLERS = {
    "mlp": "llava15",
    "ldp": "llava15",
    "ldpv2": "llava15",
    "resampler": "minicpmv26",
    "qwen2vl_merger": "qwen25vl",
    "qwen2.5vl_merger": "qwen25vl",
}
# Words in general.name that identify a family whose projector type is shared with others.
_NAME_HANDLERS = (("moondream", "moondream"), ("nanollava", "nanollava"), ("obsidian", "obsidian"))
_GENERIC_HANDLER = "mtmd"
# Registered text formats that silently drop `system` messages: the system text goes into the
# first user turn instead (what Gemma's own template does).
_FORMATS_WITHOUT_SYSTEM = {"gemma"}  # uses the model's own chat template (Gemma 3/4, SmolVLM, Qwen3-VL, ...)


class DeadlineExceeded(Exception):
    """The request ran past its time limit; generation was stopped."""


def normalise_format_name(name: str) -> str:
    """'llava-1.5', 'Llava15', 'llava_1_5' -> 'llava15' (how names are compared)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def vision_chat_handlers() -> dict[str, type]:
    """The multimodal chat handler classes this llama-cpp-python has, by normalised name."""
    import llama_cpp.llama_chat_format as chat_format

    handlers: dict[str, type] = {}
    for attr, obj in vars(chat_format).items():
        if not (isinstance(obj, type) and attr.endswith("ChatHandler") and attr != "ChatHandler"):
            continue
        try:
            params = inspect.signature(obj.__init__).parameters
        except (TypeError, ValueError):
            continue
        if "clip_model_path" in params:
            handlers[normalise_format_name(attr[: -len("ChatHandler")])] = obj
    return handlers


def text_chat_formats() -> list[str]:
    """The registered text chat formats (llama_cpp.llama_chat_format's registry)."""
    import llama_cpp.llama_chat_format as chat_format

    return sorted(chat_format.LlamaChatCompletionHandlerRegistry()._chat_handlers)


def installed_formats() -> dict[str, list[str]]:
    """What `doctor` shows: image-mode handlers and text-mode formats of the installed llama-cpp-python."""
    return {
        "image": sorted(f"{key} ({cls.__name__})" for key, cls in vision_chat_handlers().items()),
        "text": text_chat_formats(),
    }


def resolve_vision_handler(
    chat_format: str, model_meta: dict[str, Any], mmproj_meta: dict[str, Any], handlers: dict[str, type]
) -> str:
    """The handler key to use for image mode; raise ConfigError with the choices when none fits."""
    choices = ", ".join(sorted(handlers))
    if chat_format != "auto":
        key = normalise_format_name(chat_format)
        if key not in handlers:
            raise ConfigError(
                f"vlm.chat_format {chat_format!r} is not a multimodal chat handler of the installed "
                f"llama-cpp-python; use auto or one of: {choices}"
            )
        return key
    names = " ".join(str(meta.get("general.name", "")) for meta in (model_meta, mmproj_meta)).lower()
    names += " " + str(mmproj_meta.get("general.basename", "")).lower()
    for word, key in _NAME_HANDLERS:
        if word in names and key in handlers:
            return key
    projector = str(mmproj_meta.get("clip.projector_type") or mmproj_meta.get("clip.vision.projector_type") or "")
    key = _PROJECTOR_HANDLERS.get(projector)
    if key == "llava15" and "clip.vision.image_grid_pinpoints" in mmproj_meta and "llava16" in handlers:
        key = "llava16"
    if key in handlers:
        return key
    if model_meta.get("tokenizer.chat_template") and _GENERIC_HANDLER in handlers:
        return _GENERIC_HANDLER
    raise ConfigError(
        f"vlm.chat_format is auto but no chat handler matches projector type {projector or 'unknown'!r} "
        f"of {mmproj_meta.get('general.name', 'the mmproj')!r} and the model has no chat template; set "
        f"vlm.chat_format to one of: {choices}"
    )


# Text models whose GGUF lacks tokenizer.chat_template: the registered format of their family.
_ARCH_TEXT_FORMATS = {
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma3n": "gemma",
    "qwen2": "chatml", "qwen3": "chatml", "smollm3": "chatml",
    "mistral": "mistral-instruct",
}


def resolve_text_format(chat_format: str, model_meta: dict[str, Any], formats: list[str]) -> str | None:
    """None lets llama-cpp-python use the GGUF's own chat template (auto with a template)."""
    if chat_format == "auto":
        if model_meta.get("tokenizer.chat_template"):
            return None
        guess = _ARCH_TEXT_FORMATS.get(str(model_meta.get("general.architecture", "")))
        return guess if guess in formats else None
    wanted = normalise_format_name(chat_format)
    for name in formats:
        if normalise_format_name(name) == wanted:
            return name
    raise ConfigError(
        f"vlm.chat_format {chat_format!r} is not a text chat format of the installed llama-cpp-python; "
        f"use auto (the model's own template) or one of: {', '.join(formats)}"
    )


# ---------------------------------------------------------------------------------------------------
# GGUF metadata (key/values only; arrays longer than a few entries are skipped, not read)

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | Path, max_array: int = 16) -> dict[str, Any]:
    """Key/value metadata of a GGUF file; raise UserError when it is not a GGUF."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            if fh.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file (bad magic); point vlm.model/vlm.mmproj at .gguf files")
            version = _unpack(fh, "<I")
            if version < 2:
                raise UserError(f"{path} is GGUF version {version}; re-convert it with a current llama.cpp")
            _unpack(fh, "<Q")  # tensor count
            count = _unpack(fh, "<Q")
            meta: dict[str, Any] = {}
            for _ in range(count):
                key = _read_string(fh)
                meta[key] = _read_value(fh, _unpack(fh, "<I"), max_array)
            return meta
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read GGUF metadata ({exc})") from None


def _unpack(fh: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    data = fh.read(size)
    if len(data) != size:
        raise struct.error("file ends inside the metadata")
    return struct.unpack(fmt, data)[0]


def _read_string(fh: BinaryIO) -> str:
    length = _unpack(fh, "<Q")
    return fh.read(length).decode("utf-8", errors="replace")


def _read_value(fh: BinaryIO, kind: int, max_array: int) -> Any:
    if kind in _GGUF_SCALARS:
        return _unpack(fh, _GGUF_SCALARS[kind])
    if kind == _GGUF_STRING:
        return _read_string(fh)
    if kind == _GGUF_ARRAY:
        item_kind, length = _unpack(fh, "<I"), _unpack(fh, "<Q")
        if item_kind in _GGUF_SCALARS and length > max_array:
            fh.seek(struct.calcsize(_GGUF_SCALARS[item_kind]) * length, os.SEEK_CUR)
            return f"<array of {length}>"
        items = [_read_value(fh, item_kind, max_array) for _ in range(length)]
        return items if length <= max_array else f"<array of {length}>"
    raise struct.error(f"unknown GGUF value type {kind}")


def check_model_files(config: VlmConfig) -> dict[str, dict[str, Any]]:
    """Cheap start-up check (no llama.cpp): the files exist, are GGUF, and the mmproj is a projector.
    Returns their metadata; raises ConfigError/UserError naming the key to fix."""
    model_path = _existing(config.model, "vlm.model")
    found = {"model": read_gguf_metadata(model_path)}
    if found["model"].get("general.architecture") == "clip":
        raise ConfigError(f"vlm.model {model_path} is a vision projector (mmproj); put it in vlm.mmproj and the language model in vlm.model")
    if config.mode == "image":
        mmproj_path = _existing(config.mmproj, "vlm.mmproj")
        found["mmproj"] = read_gguf_metadata(mmproj_path)
        if found["mmproj"].get("general.architecture") != "clip":
            raise ConfigError(
                f"vlm.mmproj {mmproj_path} is a {found['mmproj'].get('general.architecture')!r} GGUF, not a "
                "vision projector (architecture 'clip'); use the mmproj file published with the model"
            )
    return found


# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One answer with llama.cpp's own counters (prompt includes image tokens)."""

    text: str
    finish_reason: str  # stop | length | timeout
    prompt_tokens: int
    generated_tokens: int
    prompt_ms: float
    generation_ms: float
    total_ms: float
    generation_evals: int = 0  # single-token decodes llama.cpp timed in generation_ms
    prompt_evals: int = 0  # prompt tokens llama.cpp decoded (prompt_tokens minus a reused KV-cache prefix)
    sample_ms: float = 0.0  # picking tokens under the grammar (sampling.LazyGrammarSampler), outside the model
    grammar_full_steps: int = 0  # tokens for which the grammar had to look at the whole vocabulary

    @property
    def generation_tokens_per_s(self) -> float:
        return 1000.0 * self.generation_evals / self.generation_ms if self.generation_ms > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "prompt_ms": round(self.prompt_ms, 2),
            "generation_ms": round(self.generation_ms, 2),
            "total_ms": round(self.total_ms, 2),
            "generation_evals": self.generation_evals,
            "prompt_evals": self.prompt_evals,
            "sample_ms": round(self.sample_ms, 2),
            "grammar_full_steps": self.grammar_full_steps,
        }


class LlamaRunner:
    """One loaded model (and projector) answering chat requests, one at a time."""

    def __init__(self, llm: Any, mode: str, chat_format: str, model_name: str) -> None:
        self._llm = llm
        self.mode = mode
        self.chat_format = chat_format
        self.model_name = model_name
        self._grammars: dict[str, Any] = {}

    @classmethod
    def load(cls, config: VlmConfig) -> "LlamaRunner":
        """Load the model once; raise ConfigError/UserError with the key to fix when it cannot."""
        try:
            import llama_cpp  # noqa: F401 - fail here with a fix, not deep inside the load
        except ImportError as exc:
            raise UserError(
                f"vlm is enabled but llama-cpp-python cannot be imported ({exc}); install it with "
                "tools/ensure_llama_wheel.sh or `pip install edge-inspect[vlm]`"
            ) from None
        found = check_model_files(config)
        model_path = Path(config.model).expanduser()
        model_meta = found["model"]
        kwargs: dict[str, Any] = dict(
            model_path=str(model_path),
            n_ctx=config.n_ctx,
            n_threads=config.n_threads or None,
            n_threads_batch=config.n_threads or None,
            n_gpu_layers=config.n_gpu_layers,
            seed=config.seed,
            verbose=False,
        )
        _quiet_native_logs()
        if config.mode == "image":
            mmproj_path = Path(config.mmproj).expanduser()
            mmproj_meta = found["mmproj"]
            handlers = vision_chat_handlers()
            chat_format = resolve_vision_handler(config.chat_format, model_meta, mmproj_meta, handlers)
            kwargs["chat_handler"] = handlers[chat_format](clip_model_path=str(mmproj_path), verbose=False)
        else:
            chat_format = resolve_text_format(config.chat_format, model_meta, text_chat_formats()) or "auto"
            if chat_format != "auto":
                kwargs["chat_format"] = chat_format
                if config.chat_format == "auto":
                    chat_format = f"auto:{chat_format}"
        try:
            llm = _deadline_llama_class()(**kwargs)
        except (ValueError, RuntimeError) as exc:
            raise UserError(
                f"llama.cpp could not load vlm.model {model_path} ({exc}); check that the file is a complete "
                "GGUF this llama-cpp-python supports and that vlm.n_ctx fits in memory"
            ) from None
        if chat_format == "auto":
            # llama-cpp-python's own fallback without a template is llama-2
            chat_format = "auto:" + ("gguf-template" if model_meta.get("tokenizer.chat_template") else "llama-2")
        name = str(model_meta.get("general.name") or model_path.stem)
        return cls(llm, config.mode, chat_format, name)

    def complete(
        self,
        messages: list[dict[str, Any]],
        grammar: str,
        max_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        deadline: float | None = None,
        repeat_penalty: float = 1.0,
    ) -> Completion:
        """Generate one grammar-constrained answer; stop at `deadline` (time.monotonic()).

        Not streamed: llama-cpp-python's streaming re-detokenizes the whole prompt for every token
        (quadratic; 35 s instead of 2 s for a 2k-token prompt here).
        """
        import llama_cpp

        start = time.monotonic()
        ctx = self._llm._ctx.ctx
        llama_cpp.llama_perf_context_reset(ctx)
        self._llm.deadline = deadline
        if hasattr(self._llm, "last_sampler"):
            self._llm.last_sampler = None
        if self.chat_format.removeprefix("auto:") in _FORMATS_WITHOUT_SYSTEM:
            messages = fold_system_message(messages)
        try:
            response = self._llm.create_chat_completion(
                messages=messages,
                grammar=self._grammar(grammar),
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                repeat_penalty=repeat_penalty,
            )
            choice = response["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason") or "stop"
            usage = response.get("usage", {})
        except DeadlineExceeded:
            text, finish, usage = "", "timeout", {}
        finally:
            self._llm.deadline = None
        perf = llama_cpp.llama_perf_context(ctx)
        sampler = getattr(self._llm, "last_sampler", None)
        return Completion(
            text=text,
            finish_reason=finish,
            prompt_tokens=int(usage.get("prompt_tokens", perf.n_p_eval)),
            generated_tokens=int(usage.get("completion_tokens", perf.n_eval)),
            prompt_ms=float(perf.t_p_eval_ms),
            generation_ms=float(perf.t_eval_ms),
            generation_evals=int(perf.n_eval),
            prompt_evals=int(perf.n_p_eval),
            total_ms=1000.0 * (time.monotonic() - start),
            sample_ms=1000.0 * sampler.stats["seconds"] if sampler is not None else 0.0,
            grammar_full_steps=sampler.stats["vocabulary"] if sampler is not None else 0,
        )

    def _grammar(self, text: str) -> Any:
        from llama_cpp import LlamaGrammar

        if text not in self._grammars:
            if len(self._grammars) >= 16:
                self._grammars.clear()
            self._grammars[text] = LlamaGrammar.from_string(text, verbose=False)
        return self._grammars[text]

    def close(self) -> None:
        close = getattr(self._llm, "close", None)
        if close is not None:
            close()


def fold_system_message(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move system text to the front of the first user turn (for formats without a system role)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system" and isinstance(m["content"], str))
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    for message in rest:
        if message["role"] != "user":
            continue
        if isinstance(message["content"], str):
            message["content"] = f"{system}\n\n{message['content']}"
        else:
            message["content"] = [{"type": "text", "text": system + "\n\n"}, *message["content"]]
        return rest
    return [{"role": "user", "content": system}, *rest]


_DEADLINE_LLAMA: type | None = None


def _quiet_native_logs() -> None:
    """Route mtmd/clip logs through llama-cpp-python's logger (errors only when not verbose); by
    default they print every prompt and image batch to stderr, i.e. into the journal."""
    try:
        import llama_cpp._logger as llama_logger
        import llama_cpp.mtmd_cpp as mtmd_cpp
    except ImportError:
        return
    for name in ("mtmd_log_set", "mtmd_helper_log_set"):
        setter = getattr(mtmd_cpp, name, None)
        if setter is not None:
            setter(llama_logger.llama_log_callback, None)


def _deadline_llama_class() -> type:
    """llama_cpp.Llama that checks a deadline before each sampled token and each prompt batch.

    Both hooks are plain Python calls inside llama-cpp-python's generation loop, so the exception
    leaves the model usable (a C callback could not raise).
    """
    global _DEADLINE_LLAMA
    if _DEADLINE_LLAMA is None:
        import llama_cpp

        class DeadlineLlama(llama_cpp.Llama):
            deadline: float | None = None
            lazy_grammar: bool = True
            last_sampler: LazyGrammarSampler | None = None

            def _check(self) -> None:
                if self.deadline is not None and time.monotonic() > self.deadline:
                    raise DeadlineExceeded()

            def eval(self, tokens):  # noqa: D401 - same contract as Llama.eval
                self._check()
                return super().eval(tokens)

            def sample(self, *args, **kwargs):
                self._check()
                return super().sample(*args, **kwargs)

            def _init_sampler(self, *args, **kwargs):
                # The grammar checked on the token picked, not on the whole vocabulary (sampling.py).
                grammar = kwargs.get("grammar")
                if grammar is None or not self.lazy_grammar:
                    self.last_sampler = None
                    return super()._init_sampler(*args, **kwargs)
                self.last_sampler = LazyGrammarSampler(
                    self, grammar, temp=kwargs.get("temp", 0.8), top_k=kwargs.get("top_k", 40),
                    top_p=kwargs.get("top_p", 0.95), min_p=kwargs.get("min_p", 0.05),
                    repeat_penalty=kwargs.get("repeat_penalty", 1.0), seed=self._seed,
                )
                return self.last_sampler

        _DEADLINE_LLAMA = DeadlineLlama
    return _DEADLINE_LLAMA


def _existing(value: str, key: str) -> Path:
    if not value:
        raise ConfigError(f"{key} is empty; set it to a GGUF file path")
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}: {path} does not exist; download the GGUF there or fix the path")
    return path
