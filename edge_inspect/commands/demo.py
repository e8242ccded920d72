"""`edge-inspect demo`: a simulated line end to end (dataset, calibration, broker, daemon, results, report).

Examples:
    edge-inspect demo                         # ./demo-run, 28 coin parts at 4 fps
    edge-inspect demo --short                 # 14 parts at 10 fps (CI, `make demo`)
    edge-inspect demo --category cup --frames 40 --fps 0 --json

Exit codes: 0 every replayed frame's result arrived; 1 some did not (see the daemon log in the
workdir); 2 usage error or a missing prerequisite (e.g. no broker can be started).
"""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a simulated line end to end: generated parts, calibration, broker, daemon, live results, report",
        description="Generates good and defective parts from real photos (defects painted in with known masks), "
        "calibrates a product from a few good ones, starts an MQTT broker if none listens (mosquitto when "
        "installed, else the pure-Python amqtt), runs `edge-inspect run` on a replay of the parts, prints every "
        "result as it arrives next to what was painted into the frame, and ends with a summary and an HTML "
        "report. No camera, GPU or model download needed. Files go to --workdir; the pretrained backbone is "
        "shared through --engines-dir so a second run is fast.",
    )
    p.add_argument("--workdir", default="demo-run", type=Path, metavar="DIR", help="folder for everything the demo writes (default: ./demo-run)")
    p.add_argument("--short", action="store_true", help="14 parts at 10 fps: the quick run CI and `make demo` use")
    p.add_argument("--category", metavar="NAME", help="what the line makes: coin (default), cup, brick, gravel, grass or tissue")
    p.add_argument("--frames", type=int, metavar="N", help="parts to replay, half of them defective (default 28; 14 with --short)")
    p.add_argument("--fps", type=float, metavar="F", help="replay pace in frames per second; 0 = as fast as the scorer goes (default 4; 10 with --short)")
    p.add_argument("--port", type=int, default=1883, metavar="P", help="MQTT broker port on 127.0.0.1; a broker is started there when none listens (default 1883)")
    p.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto",
                   help="which broker to start when none listens: auto = mosquitto when installed, else amqtt (default auto)")
    p.add_argument("--engines-dir", default="engines", type=Path, metavar="DIR",
                   help="shared folder of the backbone ONNX, exported there when missing (default: ./engines)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the generated parts and their order (default 0)")
    p.add_argument("--json", action="store_true", help="print each payload and the summary as JSON lines; progress goes to stderr")
    p.add_argument("--keep-broker", action="store_true", help="keep the broker the demo started running until Ctrl-C")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ops.demo import (
        DEFAULT_CATEGORY,
        DEFAULT_FPS,
        DEFAULT_FRAMES,
        SHORT_FPS,
        SHORT_FRAMES,
        DemoSettings,
        run_demo,
    )

    settings = DemoSettings(
        workdir=args.workdir,
        engines_dir=args.engines_dir,
        category=args.category or DEFAULT_CATEGORY,
        frames=args.frames if args.frames is not None else (SHORT_FRAMES if args.short else DEFAULT_FRAMES),
        fps=args.fps if args.fps is not None else (SHORT_FPS if args.short else DEFAULT_FPS),
        port=args.port,
        broker=args.broker,
        seed=args.seed,
        json=args.json,
        keep_broker=args.keep_broker,
    )
    return run_demo(settings)
