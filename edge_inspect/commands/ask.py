"""`edge-inspect ask INSPECTION_ID "question"`: a follow-up question about a flagged part (docs/cli.md)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "ask",
        help="ask the VLM a follow-up question about a flagged part, from the station's stored evidence",
        description="Answers from the stored frame, the region close-up, the nearest good reference, the "
        "product's knowledge.yaml, the scorer's evidence and the earlier turns of the part's conversation "
        "(saved beside the evidence). Loads the VLM of the config itself; the daemon may keep running. "
        "Exit code 2: unknown or expired inspection id, question too long, VLM off or not loadable.",
    )
    p.add_argument("inspection_id", metavar="INSPECTION_ID", help="inspection_id of an NG result (see its evidence_path)")
    p.add_argument("question", nargs="?", help="the question (with --chat: the first one; optional)")
    p.add_argument("--config", "-c", required=True, metavar="FILE",
                   help="the station's daemon config (evidence.dir, vlm, scoring.calibration_dir)")
    p.add_argument("--evidence", metavar="DIR", help="evidence folder (default: evidence.dir of the config)")
    p.add_argument("--conversation", metavar="ID", default=None,
                   help="conversation to continue (default: the part's default conversation)")
    p.add_argument("--chat", action="store_true", help="interactive: ask one question per line until EOF or 'quit'")
    p.add_argument("--json", action="store_true", help="print each answer as one JSON line (the answer topic's body)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..errors import UserError
    from ..vlm.ask import run_cli

    if not args.chat and not args.question:
        raise UserError('give a question (edge-inspect ask ID "question") or use --chat')
    config = load_config(args.config)
    return run_cli(config, args.inspection_id, args.question, evidence_dir=args.evidence,
                   conversation_id=args.conversation, chat=args.chat, as_json=args.json)
