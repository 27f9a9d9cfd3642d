"""The ``tensorfleet`` command: generate text and show status through a running cluster.

Not implemented yet in this version: the cluster client arrives with the cluster (``coordinator start``
/ ``node join``). The arguments are parsed so that the interface can be reviewed; every subcommand
then says so and exits with status 2. For single-process generation use ``tensorfleet-generate``.
"""

from __future__ import annotations

import argparse
import sys

from client import DEFAULT_COORDINATOR_PORT

NOT_IMPLEMENTED = (
    "tensorfleet: the cluster client arrives with the cluster (coordinator start / node join), which is "
    "not implemented yet in this version; use `tensorfleet-generate` for single-process generation"
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorfleet",
        description=(
            "Talk to a tensorfleet cluster. NOT IMPLEMENTED YET in this version: the cluster client "
            "arrives with the cluster; every subcommand exits with status 2. Use `tensorfleet-generate` "
            "for single-process generation."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="stream a completion from the cluster (not implemented yet)",
        description="Stream a completion from the cluster. Not implemented yet in this version.",
    )
    _add_coordinator_flag(gen)
    gen.add_argument("prompt", help="prompt text")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="0 turns it off (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=None, help="sampler seed, for reproducible output")

    status = sub.add_parser(
        "status",
        help="show nodes, placement and load (not implemented yet)",
        description="Show the cluster's nodes, placement and load. Not implemented yet in this version.",
    )
    _add_coordinator_flag(status)
    return parser


def _add_coordinator_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--coordinator",
        default=f"127.0.0.1:{DEFAULT_COORDINATOR_PORT}",
        metavar="HOST:PORT",
        help="the coordinator's address (default: %(default)s)",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    print(NOT_IMPLEMENTED, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
