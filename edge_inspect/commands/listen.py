"""`edge-inspect listen`: print the results a station publishes and check the stream for gaps.

Examples:
    edge-inspect listen --host broker.local                       # every station, human-readable
    edge-inspect listen --config line3.yaml --updates --json      # this station's results and VLM updates
    edge-inspect listen --count 300 --timeout 60 --check-gaps     # exit 1 if a seq is missing

Exit codes: 0 fine; 1 a check failed (gaps or a reused seq with --check-gaps, fewer than --count
results before --timeout, invalid payloads with --validate); 2 usage or config error.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "listen",
        help="print published results; check the result stream for gaps",
        description="Subscribe to <prefix>/<station>/result (and result/update) and print what arrives. "
        "With --check-gaps, report missing or reused sequence numbers per station (deduplicating by inspection id).",
    )
    parser.add_argument("--config", help="daemon config file: broker, TLS, credentials, topic prefix and station are read from it")
    parser.add_argument("--host", help="broker host (overrides the config; default localhost)")
    parser.add_argument("--port", type=int, help="broker port (overrides the config; default 1883, 8883 with TLS)")
    parser.add_argument("--protocol", choices=["5", "3.1.1"], help="MQTT version (default: from the config, else 5)")
    parser.add_argument("--prefix", help="topic prefix (default: from the config, else edge-inspect)")
    parser.add_argument("--station", help="station to listen to; '+' = all (default: the config's station, else +)")
    parser.add_argument("--updates", action="store_true", help="also print result updates (the VLM verdicts)")
    parser.add_argument("--count", type=int, metavar="N", help="exit after N distinct results")
    parser.add_argument("--timeout", type=float, metavar="S", help="exit after S seconds (exit 1 if --count was not reached)")
    parser.add_argument("--check-gaps", action="store_true", help="exit 1 if a result seq is missing or reused")
    parser.add_argument("--json", action="store_true", help="print each payload as one JSON line, then a summary line")
    parser.add_argument("--validate", action="store_true", help="check each payload against its JSON Schema (needs jsonschema)")
    parser.add_argument("--client-id", help="MQTT client id (default: a random one)")
    parser.add_argument(
        "--persistent", action="store_true",
        help="keep the session on the broker between runs (needs --client-id): results published while "
        "this listener is away are delivered when it comes back",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..mqtt.listen import listen  # paho is imported when the command runs, not for --help

    return listen(args)
