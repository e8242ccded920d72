"""`edge-inspect run --config FILE`: the inspection daemon (capture, score, publish), e.g. under systemd."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help="run the inspection daemon: grab frames, score each one, publish results over MQTT",
        description="Runs until SIGTERM/SIGINT (drains in-flight inspections first). SIGHUP reloads the config "
        "and the calibrations without dropping the MQTT session (station, mqtt, spool, evidence and vlm "
        "changes need a restart). Flagged frames are saved as evidence and, with vlm.enabled, explained by "
        "the VLM (result/update). Under systemd (Type=notify) it reports "
        "READY=1 after the models load, feeds the watchdog from the frame loop and keeps STATUS= current. "
        "A replay source without loop ends the run once every frame is inspected and explained.",
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="YAML config (see examples/config.yaml)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..daemon.daemon import Daemon

    config = load_config(args.config)
    return Daemon(config, config_path=args.config).run()
