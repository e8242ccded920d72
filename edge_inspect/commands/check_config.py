"""`edge-inspect check-config FILE`: validate a daemon config without running anything."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "check-config",
        help="validate a daemon config file (exit 0 = valid, 2 = problems, each with its line)",
    )
    p.add_argument("file", metavar="FILE", help="YAML config to check")
    p.add_argument(
        "--products", action="store_true",
        help="also load every camera's product calibration and check the replay folders exist",
    )
    p.add_argument("--json", action="store_true", help="print the validated config (defaults filled in) as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    import json

    from ..capture.sources import create_source
    from ..config import load_config

    from ..errors import ConfigError

    config = load_config(args.file)
    mqtt = config.mqtt
    password, password_from = mqtt.resolve_password()
    if mqtt.username and password is None:
        raise ConfigError(
            f"{args.file}: mqtt.username is {mqtt.username!r} but no password was found: put it in the systemd "
            f"credential {mqtt.password_credential!r} ($CREDENTIALS_DIRECTORY/{mqtt.password_credential}) or the "
            f"environment variable {mqtt.password_env}, or set mqtt.username: null for an anonymous broker"
        )
    if mqtt.tls.enabled:
        from ..mqtt.client import tls_context

        try:
            tls_context(mqtt)  # what `run` builds before connecting: a missing or broken PEM fails here too
        except ConfigError as exc:
            raise ConfigError(f"{args.file}: {exc}") from None
    if args.products:
        from ..scorer.product import load_product

        for camera in config.cameras:
            create_source(camera.source, camera.reconnect).check()
            load_product(config.scoring.calibration_dir, camera.product, config.scoring.engines_dir)
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
    if args.products:
        print("  products: every calibration loads")
    return 0
