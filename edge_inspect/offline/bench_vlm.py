"""Benchmark the VLM stage: latency per flagged frame and tokens/s, image mode against text-only mode.

    edge-inspect bench ... --vlm --vlm-model qwen2.5-vl-3b-q4_k_m.gguf --vlm-mmproj mmproj-qwen2.5-vl-3b-f16.gguf
    .venv/bin/python tools/bench_vlm.py --model gemma-3-270m-q4_k_m.gguf            # text mode only
    .venv/bin/python tools/bench_vlm.py --tiny --frames 3 --json                     # plumbing check (source tree)

Every request goes through the real path the daemon uses: prompt assembly (reference image,
knowledge, evidence), the worker subprocess, grammar-constrained generation, parsing into a
verdict. Rows (same frames, same model, same run):
  image   the frame, a close-up of the strongest region and a good reference image (needs --mmproj)
  text    the same evidence and knowledge as words, no images; the reference row when both run
Columns: latency per flagged frame (p50/p95, request to parsed verdict), prompt tokens (images
included), generated tokens, prompt time, decode tokens/s (llama.cpp's own decode timer) and
effective tokens/s (generated tokens over the wall time after the prompt: includes grammar
sampling, which costs about as much as decoding for vocabularies of 150k+ tokens), and how many
answers parsed as valid verdicts. The tiny random-weight model (tools/bench_vlm.py --tiny) shows
overheads only, never model quality.

--followups N adds a second table: after each frame's verdict, N follow-up questions about it on the
same worker (vlm/followup.py prompts: the verdict prompt, the verdict, the earlier turns, the
question), with time to first token (everything before the first generated token, measured in the
worker: template, image encoding, prompt decode), prompt tokens and how many of them llama.cpp
actually decoded (the rest came from the KV cache of the previous request's shared prefix).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..config.vlm import VlmConfig
from ..records import Region
from ..vlm.followup import FollowupInputs, StoredInspection, Turn, build_followup_prompt
from ..vlm.knowledge import Knowledge, parse_knowledge
from ..vlm.prompt import PromptInputs, Reference, build_prompt
from ..vlm.schema import AnswerError, VerdictError, parse_answer, parse_verdict
from ..vlm.worker import VlmWorker

# The prompt's product knowledge when --knowledge is not given (examples/knowledge.yaml, shortened).
DEFAULT_KNOWLEDGE = """\
product: bracket
good_part: >-
  Zinc-plated steel mounting bracket seen from above: an L-shaped plate with two round holes of equal
  size near the short edge, a uniform matte grey surface and straight, burr-free edges.
defects:
  - {name: scratch, description: "A thin bright or dark line in the plating, usually straight."}
  - {name: dent, description: A local deformation that catches the light as a dark crescent or bright ring.}
  - {name: missing_hole, description: One of the two holes is not punched or only partly punched.}
  - {name: rust, description: Orange-brown stain or speckles where the plating is damaged.}
  - {name: burr, description: Ragged metal along an edge or inside a hole.}
"""

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def flagged_frames(count: int) -> list[dict[str, Any]]:
    """Photos with a painted scratch and the region the scorer would report for it."""
    from skimage import data  # an optional dependency (the export/demo/dev extras)

    frames = []
    for i in range(count):
        rgb = getattr(data, PHOTOS[i % len(PHOTOS)])()
        bgr = cv2.cvtColor(rgb if rgb.ndim == 3 else np.stack([rgb] * 3, -1), cv2.COLOR_RGB2BGR)
        bgr = np.ascontiguousarray(bgr)
        h, w = bgr.shape[:2]
        x0, y0 = int(w * (0.15 + 0.1 * (i % 3))), int(h * 0.2)
        cv2.line(bgr, (x0, y0), (x0 + w // 6, y0 + h // 12), (235, 235, 235), max(2, w // 200))
        box = (x0 - 6, y0 - 6, x0 + w // 6 + 6, y0 + h // 12 + 6)
        area = 100.0 * (box[2] - box[0]) * (box[3] - box[1]) / (w * h)
        region = Region(box=box, area_pct=area, peak=3.1, grid_words=("top left", "top"))
        reference = cv2.cvtColor(getattr(data, PHOTOS[(i + 1) % len(PHOTOS)])(), cv2.COLOR_RGB2BGR)
        frames.append({"bgr": bgr, "regions": (region,), "score": 3.1, "threshold": 2.0, "reference": reference})
    return frames


def bench_mode(config: VlmConfig, knowledge: Knowledge, frames: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    """Start a worker for `config.mode`, run warm-up requests, then time one request per frame."""
    worker = VlmWorker(config, name=f"bench-{config.mode}")
    started = time.monotonic()
    worker.start()
    try:
        if not worker.wait_ready(config.load_timeout_s):
            return {"mode": config.mode, "error": worker.state()["last_error"] or "worker not ready"}
        load_s = time.monotonic() - started
        rows = []
        for index, frame in enumerate(frames[:warmup] + frames):
            prompt = build_prompt(
                PromptInputs(
                    product="bracket", knowledge=knowledge, frame_bgr=frame["bgr"], score=frame["score"],
                    threshold=frame["threshold"], regions=frame["regions"], mode=config.mode,
                    reference=Reference(Path("reference.jpg"), 0.9, frame["reference"]) if config.mode == "image" else None,
                    reasoning=config.reasoning, image_max_side=config.image_max_side,
                )
            )
            t0 = time.monotonic()
            reply = worker.infer(prompt.messages, prompt.grammar, config.timeout_s)
            valid, error = False, reply.reason
            if reply.ok:
                try:
                    parse_verdict(reply.text, prompt.defect_types)
                    valid, error = True, ""
                except VerdictError as exc:
                    error = str(exc)
            latency_ms = 1000.0 * (time.monotonic() - t0)
            if index < warmup:
                continue
            c = reply.completion or {}
            after_prompt_s = max(1e-9, (reply.wall_ms - c.get("prompt_ms", 0.0)) / 1000.0)
            rows.append(
                {
                    "latency_ms": latency_ms,
                    **time_split(latency_ms, c),
                    "images": prompt.image_count,
                    "prompt_tokens": c.get("prompt_tokens", 0),
                    "generated_tokens": c.get("generated_tokens", 0),
                    "prompt_ms": c.get("prompt_ms", 0.0),
                    "decode_tps": 1000.0 * c.get("generation_evals", 0) / c["generation_ms"] if c.get("generation_ms") else 0.0,
                    "effective_tps": c.get("generated_tokens", 0) / after_prompt_s if reply.ok else 0.0,
                    "valid": valid,
                    "error": error,
                }
            )
        state = worker.state()
    finally:
        worker.stop(timeout=10)
    latencies = sorted(r["latency_ms"] for r in rows)
    return {
        "mode": config.mode,
        "model": state["model"],
        "chat_format": state["chat_format"],
        "load_s": round(load_s, 2),
        "frames": len(rows),
        "images_per_frame": rows[0]["images"] if rows else 0,
        "latency_ms_p50": round(_percentile(latencies, 50), 1),
        "latency_ms_p95": round(_percentile(latencies, 95), 1),
        "prompt_tokens": round(statistics.mean(r["prompt_tokens"] for r in rows), 1) if rows else 0,
        "generated_tokens": round(statistics.mean(r["generated_tokens"] for r in rows), 1) if rows else 0,
        "prompt_ms": round(statistics.mean(r["prompt_ms"] for r in rows), 1) if rows else 0,
        "decode_tokens_per_s": round(statistics.mean(r["decode_tps"] for r in rows), 1) if rows else 0,
        "effective_tokens_per_s": round(statistics.mean(r["effective_tps"] for r in rows), 1) if rows else 0,
        "valid": sum(r["valid"] for r in rows),
        "errors": sorted({r["error"] for r in rows if r["error"]}),
        "split": summarise_split(rows),
    }


def time_split(latency_ms: float, completion: dict[str, Any]) -> dict[str, float]:
    """Where one request's time went: the model's prompt and decode (llama.cpp's own timers), picking
    tokens under the grammar (timed in the worker), and everything else (chat template, tokenising,
    the worker pipe, parsing): the request's wall time minus the other three."""
    prompt = float(completion.get("prompt_ms", 0.0))
    decode = float(completion.get("generation_ms", 0.0))
    sample = float(completion.get("sample_ms", 0.0))
    return {
        "split_prompt_ms": prompt,
        "split_decode_ms": decode,
        "split_sample_ms": sample,
        "split_other_ms": max(0.0, latency_ms - prompt - decode - sample),
        "model_ms": prompt + decode,
        "grammar_full_steps": int(completion.get("grammar_full_steps", 0)),
    }


def summarise_split(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Medians of the split over the timed requests, and the headline ratio: p50 latency over p50 of the
    model's own time (prompt + decode); 1.0 would mean nothing outside the model costs anything."""
    if not rows:
        return {}

    def p50(key: str) -> float:
        return round(_percentile(sorted(r[key] for r in rows), 50), 1)

    model = p50("model_ms")
    latency = p50("latency_ms")
    return {
        "prompt_ms": p50("split_prompt_ms"),
        "decode_ms": p50("split_decode_ms"),
        "sample_ms": p50("split_sample_ms"),
        "other_ms": p50("split_other_ms"),
        "latency_ms": latency,
        "model_ms": model,
        "ratio_to_model": round(latency / model, 2) if model else 0.0,
        "grammar_full_steps": p50("grammar_full_steps"),
    }


def render_split(result: dict[str, Any]) -> str:
    """The second table: p50 of each part per flagged frame and the ratio to the model's own time."""
    header = ("mode", "prompt ms", "decode ms", "sampling+grammar ms", "other ms", "p50 ms", "p50 / (prompt+decode)",
              "full-vocab grammar steps")
    lines = []
    for m in result["modes"]:
        split = m.get("split")
        if not split:
            continue
        lines.append((
            m["mode"], f"{split['prompt_ms']:.0f}", f"{split['decode_ms']:.0f}", f"{split['sample_ms']:.0f}",
            f"{split['other_ms']:.0f}", f"{split['latency_ms']:.0f}", f"{split['ratio_to_model']:.2f}x",
            f"{split['grammar_full_steps']:.0f} of {m['generated_tokens']:.0f} tokens",
        ))
    if not lines:
        return ""
    widths = [max(len(h), *(len(row[i]) for row in lines)) for i, h in enumerate(header)]
    out = ["where the time of one flagged frame goes (p50 of each part; other = template, tokenising, worker pipe, parsing):",
           "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in lines]
    return "\n".join(out)


FOLLOWUP_QUESTIONS = (
    "Is the defect deeper than the coating?",
    "Which side of the part is it on?",
    "What could have caused it?",
    "Is it within the tolerance of the catalogue?",
    "Where exactly does it start?",
)


def bench_followups(config: VlmConfig, knowledge: Knowledge, frames: list[dict[str, Any]], questions: int) -> dict[str, Any]:
    """Per frame: the verdict (untimed, as the daemon makes it first), then `questions` follow-ups, timed."""
    worker = VlmWorker(config, name=f"bench-ask-{config.mode}")
    worker.start()
    rows: list[dict[str, Any]] = []
    try:
        if not worker.wait_ready(config.load_timeout_s):
            return {"mode": config.mode, "error": worker.state()["last_error"] or "worker not ready"}
        for frame in frames:
            reference = Reference(Path("reference.jpg"), 0.9, frame["reference"]) if config.mode == "image" else None
            body: dict[str, Any] = {
                "product": "bracket", "score": frame["score"], "threshold": frame["threshold"],
                "regions": [r.to_json() for r in frame["regions"]],
            }
            verdict_prompt = build_prompt(
                PromptInputs(
                    product="bracket", knowledge=knowledge, frame_bgr=frame["bgr"], score=frame["score"],
                    threshold=frame["threshold"], regions=frame["regions"], mode=config.mode, reference=reference,
                    reasoning=config.reasoning, image_max_side=config.image_max_side,
                )
            )
            reply = worker.infer(verdict_prompt.messages, verdict_prompt.grammar, config.timeout_s)
            try:
                verdict, _ = parse_verdict(reply.text, verdict_prompt.defect_types)
                body.update(vlm_status="done", vlm=verdict.to_json())
            except VerdictError:
                pass  # follow-ups without a first verdict
            stored = StoredInspection("bench", Path("bench.json"), body, frame["bgr"])
            history: list[Turn] = []
            for turn in range(1, questions + 1):
                question = FOLLOWUP_QUESTIONS[(turn - 1) % len(FOLLOWUP_QUESTIONS)]
                prompt = build_followup_prompt(
                    FollowupInputs(
                        stored, question, history, knowledge=knowledge, reference=reference, mode=config.mode,
                        reasoning=config.reasoning, image_max_side=config.image_max_side,
                        history_tokens=config.ask.history_tokens,
                    )
                )
                t0 = time.monotonic()
                reply = worker.infer(prompt.messages, prompt.grammar, config.ask.timeout_s, max_tokens=config.ask.max_tokens)
                latency_ms = 1000.0 * (time.monotonic() - t0)
                c = reply.completion or {}
                valid, error = False, reply.reason
                if reply.ok:
                    try:
                        answer = parse_answer(reply.text, prompt.kind)
                        history.append(Turn("bench", turn, question, prompt.kind, answer))
                        valid, error = True, ""
                    except AnswerError as exc:
                        error = str(exc)
                gen_ms = c.get("generation_ms", 0.0)
                after_first_s = max(1e-9, gen_ms / 1000.0)
                rows.append({
                    "turn": turn, "latency_ms": latency_ms,
                    "ttft_ms": max(0.0, c.get("total_ms", 0.0) - gen_ms),
                    "prompt_tokens": c.get("prompt_tokens", 0), "prompt_evals": c.get("prompt_evals", 0),
                    "generated_tokens": c.get("generated_tokens", 0),
                    "decode_tps": 1000.0 * c.get("generation_evals", 0) / gen_ms if gen_ms else 0.0,
                    "effective_tps": c.get("generated_tokens", 0) / max(1e-9, (c.get("total_ms", 0.0) - c.get("prompt_ms", 0.0)) / 1000.0)
                    if reply.ok else 0.0,
                    "after_first_tps": max(0, c.get("generated_tokens", 0) - 1) / after_first_s if reply.ok else 0.0,
                    "valid": valid, "error": error,
                })
    finally:
        worker.stop(timeout=10)

    def mean(key: str, subset: list[dict[str, Any]] | None = None) -> float:
        chosen = rows if subset is None else subset
        return round(statistics.mean(r[key] for r in chosen), 1) if chosen else 0.0

    later = [r for r in rows if r["turn"] > 1]
    return {
        "mode": config.mode,
        "questions": len(rows),
        "latency_ms_p50": round(_percentile(sorted(r["latency_ms"] for r in rows), 50), 1),
        "ttft_ms_p50": round(_percentile(sorted(r["ttft_ms"] for r in rows), 50), 1),
        "ttft_ms_turn1": mean("ttft_ms", [r for r in rows if r["turn"] == 1]),
        "ttft_ms_later": mean("ttft_ms", later),
        "prompt_tokens": mean("prompt_tokens"),
        "prompt_decoded": mean("prompt_evals"),
        "generated_tokens": mean("generated_tokens"),
        "decode_tokens_per_s": mean("decode_tps"),
        "effective_tokens_per_s": mean("effective_tps"),
        "valid": sum(r["valid"] for r in rows),
        "errors": sorted({r["error"] for r in rows if r["error"]}),
    }


def render_followups(result: dict[str, Any]) -> str:
    header = ("mode", "questions", "p50 ms", "TTFT p50 ms", "TTFT turn 1", "TTFT later", "prompt tok", "decoded tok",
              "gen tok", "decode tok/s", "eff. tok/s", "valid")
    lines = []
    for m in result.get("followups", []):
        if "error" in m:
            lines.append((m["mode"], f"error: {m['error']}"))
            continue
        lines.append((
            m["mode"], str(m["questions"]), f"{m['latency_ms_p50']:.0f}", f"{m['ttft_ms_p50']:.0f}",
            f"{m['ttft_ms_turn1']:.0f}", f"{m['ttft_ms_later']:.0f}", f"{m['prompt_tokens']:.0f}",
            f"{m['prompt_decoded']:.0f}", f"{m['generated_tokens']:.0f}", f"{m['decode_tokens_per_s']:.1f}",
            f"{m['effective_tokens_per_s']:.1f}", f"{m['valid']}/{m['questions']}",
        ))
    widths = [max(len(h), *(len(row[i]) for row in lines if len(row) == len(header))) for i, h in enumerate(header)]
    out = ["follow-up questions (after each verdict, same worker; decoded tok < prompt tok = KV-cache prefix reused):",
           "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    for row in lines:
        out.append("  ".join(c.rjust(w) for c, w in zip(row, widths)) if len(row) == len(header) else f"{row[0]:>{widths[0]}}  {row[1]}")
    for m in result.get("followups", []):
        for error in m.get("errors", []):
            out.append(f"  {m['mode']}: {error}")
    return "\n".join(out)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    k = (len(values) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def render_table(result: dict[str, Any]) -> str:
    header = ("mode", "frames", "imgs", "p50 ms", "p95 ms", "prompt tok", "gen tok", "prompt ms", "decode tok/s", "eff. tok/s", "valid", "vs text")
    reference = next((m for m in result["modes"] if m.get("mode") == "text" and "error" not in m), None)
    lines = []
    for m in result["modes"]:
        if "error" in m:
            lines.append((m["mode"], f"error: {m['error']}"))
            continue
        ratio = f"{m['latency_ms_p50'] / reference['latency_ms_p50']:.2f}x" if reference and reference["latency_ms_p50"] else "-"
        lines.append((
            m["mode"], str(m["frames"]), str(m["images_per_frame"]), f"{m['latency_ms_p50']:.0f}", f"{m['latency_ms_p95']:.0f}",
            f"{m['prompt_tokens']:.0f}", f"{m['generated_tokens']:.0f}", f"{m['prompt_ms']:.0f}",
            f"{m['decode_tokens_per_s']:.1f}", f"{m['effective_tokens_per_s']:.1f}", f"{m['valid']}/{m['frames']}",
            "reference" if m is reference else ratio,
        ))
    widths = [max(len(h), *(len(row[i]) for row in lines if len(row) == len(header))) for i, h in enumerate(header)]
    out = [
        f"VLM benchmark: {result['model_file']} (threads {result['n_threads'] or 'default'}, n_gpu_layers {result['n_gpu_layers']}, "
        f"max_tokens {result['max_tokens']}, reasoning {'on' if result['reasoning'] else 'off'})",
        f"host: {result['host']}; llama.cpp: {result['llama_system_info']}",
        "  ".join(h.rjust(w) for h, w in zip(header, widths)),
    ]
    for row in lines:
        out.append("  ".join(c.rjust(w) for c, w in zip(row, widths)) if len(row) == len(header) else f"{row[0]:>{widths[0]}}  {row[1]}")
    for m in result["modes"]:
        for error in m.get("errors", []):
            out.append(f"  {m['mode']}: {error}")
    split = render_split(result)
    if split:
        out.append(split)
    if result.get("followups"):
        out.append(render_followups(result))
    if result["tiny"]:
        out.append("note: tiny random-weight model: overheads only, answers are meaningless")
    return "\n".join(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Time every mode of args.model (a GGUF path; args.mmproj for image mode). args.tiny only labels
    the result (the tiny random-weight model: overheads only)."""
    import llama_cpp  # optional: the vlm extra

    tiny = bool(getattr(args, "tiny", False))
    model, mmproj = args.model, args.mmproj
    if not model:
        raise ValueError("bench_vlm.run needs a model GGUF (args.model)")
    if args.knowledge:
        knowledge = parse_knowledge(Path(args.knowledge).read_text(), str(args.knowledge))
    else:
        knowledge = parse_knowledge(DEFAULT_KNOWLEDGE, "bench_vlm.DEFAULT_KNOWLEDGE")
    modes = [m for m in args.modes.split(",") if m]
    if not mmproj and "image" in modes:
        modes.remove("image")
    common = dict(
        enabled=True, model=model, n_ctx=args.n_ctx, n_threads=args.threads, n_gpu_layers=args.n_gpu_layers,
        max_tokens=args.max_tokens, timeout_s=args.timeout, reasoning=not args.no_reasoning,
        image_max_side=args.image_max_side,
    )
    frames = flagged_frames(args.frames)
    results = []
    for mode in modes:
        config = VlmConfig(
            mode=mode, mmproj=mmproj if mode == "image" else "",
            chat_format=args.chat_format if mode == "image" else args.text_chat_format, **common,
        )
        results.append(bench_mode(config, knowledge, frames, args.warmup))
    followups = []
    for mode in modes if getattr(args, "followups", 0) else ():
        config = VlmConfig(
            mode=mode, mmproj=mmproj if mode == "image" else "",
            chat_format=args.chat_format if mode == "image" else args.text_chat_format,
            ask={"max_tokens": args.ask_max_tokens, "timeout_s": args.timeout}, **common,
        )
        followups.append(bench_followups(config, knowledge, frames, args.followups))
    return {
        "model_file": os.path.basename(model),
        "mmproj_file": os.path.basename(mmproj) if mmproj else None,
        "tiny": tiny,
        "n_threads": args.threads,
        "n_gpu_layers": args.n_gpu_layers,
        "max_tokens": args.max_tokens,
        "reasoning": not args.no_reasoning,
        "host": f"{cpu_model()}, {platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "llama_cpp_python": llama_cpp.__version__,
        "llama_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "modes": results,
        **({"followups": followups} if followups else {}),
    }


def cpu_model() -> str:
    """The CPU's name (/proc/cpuinfo `model name`), so absolute times are read next to the hardware."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="language model GGUF")
    parser.add_argument("--mmproj", help="projector GGUF for image mode (without it only text mode runs)")
    parser.add_argument("--chat-format", default="auto", help="image-mode chat handler (vlm.chat_format)")
    parser.add_argument("--text-chat-format", default="auto", help="text-mode chat format")
    parser.add_argument("--modes", default="image,text", help="comma list of modes to run (default: image,text)")
    parser.add_argument("--frames", type=int, default=5, help="timed flagged frames per mode (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests first (default 1)")
    parser.add_argument("--knowledge", help="knowledge.yaml for the prompt (default: a bracket catalogue like examples/knowledge.yaml)")
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=0, help="llama.cpp threads; 0 = its default")
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="-1 = all layers on the GPU (CUDA build)")
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--image-max-side", type=int, default=672)
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    parser.add_argument("--no-reasoning", action="store_true", help="no observations field before the verdict")
    parser.add_argument("--followups", type=int, default=0, metavar="N",
                        help="also time N follow-up questions per frame after its verdict (vlm/followup.py)")
    parser.add_argument("--ask-max-tokens", type=int, default=256, help="vlm.ask.max_tokens for the follow-ups")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    return parser
