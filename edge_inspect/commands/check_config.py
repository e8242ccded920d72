"""`edge-inspect check-config FILE`: validate a daemon config and the files it names, without running anything."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check-config",
        help="validate a daemon config file and the files it names (exit 0 = valid, 2 = problems, each with its fix)",
        description="Checks what `run` refuses at start, before you restart a service with it: the YAML (each "
        "problem with its line), the MQTT password and TLS files, every camera's product calibration (it loads), "
        "replay folders, the spool and evidence folders (writable by this user) and, with vlm.enabled, the GGUF "
        "files. It opens no camera and dials no broker (`doctor` does); run it as the daemon's user.",
    )
    p.add_argument("file", metavar="FILE", help="YAML config to check")
    p.add_argument(
        "--syntax-only", action="store_true",
        help="check the YAML only, not the files it names (a config written for another machine)",
    )
    p.add_argument("--products", action="store_true", help=argparse.SUPPRESS)  # the file checks are the default now
    p.add_argument("--json", action="store_true", help="print the validated config (defaults filled in) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..capture.sources import create_source
    from ..config import load_config
    from ..errors import ConfigError

    config = load_config(args.file)
    problems: list[tuple[str, str]] = []  # (what, fix)
    mqtt = config.mqtt
    password, password_from = mqtt.resolve_password()
    if mqtt.username and password is None:
        problems.append((
            f"mqtt.username is {mqtt.username!r} but no password was found",
            f"put it in the systemd credential {mqtt.password_credential!r} ($CREDENTIALS_DIRECTORY/"
            f"{mqtt.password_credential}) or the environment variable {mqtt.password_env}, or set mqtt.username: "
            "null for an anonymous broker",
        ))
    if mqtt.tls.enabled:
        from ..mqtt.client import tls_context

        try:
            tls_context(mqtt)  # what `run` builds before connecting: a missing or broken PEM fails here too
        except ConfigError as exc:
            problems.append((str(exc), "fix the mqtt.tls paths (they are read as the daemon's user)"))
    if not args.syntax_only:
        from ..ops.doctor import config_file_problems

        problems += [(result.detail, result.fix) for result in config_file_problems(config)]
    if problems:
        lines = "\n".join(f"  - {what}\n    fix: {fix}" for what, fix in problems)
        raise ConfigError(f"{args.file}: {len(problems)} problem{'s' if len(problems) != 1 else ''} to fix before "
                          f"`run`:\n{lines}")
    if args.json:
        print(json.dumps(config.model_dump(mode="json"), indent=2))
        return 0
    print(f"{args.file}: OK")
    print(f"  station {config.station}; broker {config.mqtt.host}:{config.mqtt.broker_port}"
          f"{' (TLS)' if config.mqtt.tls.enabled else ''}; password: {password_from}")
    for camera in config.cameras:
        source = create_source(camera.source, camera.reconnect)
        trigger = camera.trigger.mode + (f" {camera.trigger.fps:g} fps" if camera.trigger.mode == "free_run" else "")
        print(f"  camera {camera.name}: {source.describe()}; product {camera.product}; trigger {trigger}")
    if args.syntax_only:
        print("  files: not checked (--syntax-only)")
    else:
        print("  files: every calibration loads; sources, spool and evidence folders and VLM files are usable")
    return 0
