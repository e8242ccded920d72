#!/usr/bin/env python3
"""Benchmark the VLM stage from a checkout (the measuring is edge_inspect.offline.bench_vlm).

    .venv/bin/python tools/bench_vlm.py --model qwen2.5-vl-3b-q4_k_m.gguf --mmproj mmproj-qwen2.5-vl-3b-f16.gguf
    .venv/bin/python tools/bench_vlm.py --model gemma-3-270m-q4_k_m.gguf            # text mode only
    .venv/bin/python tools/bench_vlm.py --tiny --frames 3 --json                     # plumbing check, no model needed

--tiny (or no --model) builds the tiny random-weight model with tests/tiny_gguf.py (needs the gguf
package): its numbers show overheads only, never model quality.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_gguf, the tests' random-weight model builder

from edge_inspect.offline.bench_vlm import build_parser, render_table, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--tiny", action="store_true", help="use the tiny random-weight model (overheads only)")
    args = parser.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401 - checked before any worker starts
    except ImportError:
        print("llama-cpp-python is not installed: run tools/ensure_llama_wheel.sh .venv", file=sys.stderr)
        return 2
    if args.model and args.tiny:
        print("--tiny and --model exclude each other", file=sys.stderr)
        return 2
    if args.model is None:
        if not args.tiny:
            print("no --model given: using the tiny random-weight model (add --tiny to silence this)", file=sys.stderr)
        from tiny_gguf import build_tiny_vlm, default_model_cache

        pair = build_tiny_vlm(default_model_cache() / "tiny")
        args.model, args.mmproj, args.tiny = str(pair.model), str(pair.mmproj), True
    result = run(args)
    print(json.dumps(result, indent=1) if args.json else render_table(result))
    return 0 if all("error" not in m and m["valid"] == m["frames"] for m in result["modes"]) else 1


if __name__ == "__main__":
    sys.exit(main())
