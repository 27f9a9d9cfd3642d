"""The ``coordinator`` command (also ``tensorfleet-coordinator``): run the head of a cluster.

Not implemented yet in this version. The arguments are parsed and validated so that the interface can
be reviewed; ``coordinator start`` then says so and exits with status 2. Nothing heavy is imported
here: the coordinator's modules load only once the command runs.
"""

from __future__ import annotations

import argparse
import sys

from client import DEFAULT_COORDINATOR_PORT

NOT_IMPLEMENTED = (
    "tensorfleet: the cluster (coordinator start / node join) is not implemented yet in this version; "
    "use `tensorfleet-generate` for single-process generation"
)


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in 1..65535")
    return int(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coordinator",
        description=(
            "Run the head of a tensorfleet cluster. NOT IMPLEMENTED YET in this version: the cluster "
            "(coordinator start / node join) arrives later; `coordinator start` exits with status 2. "
            "Use `tensorfleet-generate` for single-process generation."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = sub.add_parser(
        "start",
        help="serve a model over the nodes that join (not implemented yet)",
        description=(
            "Serve one model over the nodes that join: place its layers by capacity, schedule requests, "
            "and recover from node failures. Not implemented yet in this version."
        ),
    )
    start.add_argument(
        "--model",
        default=None,
        help="model directory or GGUF file (default: the embedded SmolLM2 model)",
    )
    start.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s; use 0.0.0.0 to accept nodes and clients "
        "from other machines)",
    )
    start.add_argument(
        "--port", type=_port, default=DEFAULT_COORDINATOR_PORT, help="gRPC port (default: %(default)s)"
    )
    start.add_argument(
        "--min-nodes",
        type=_positive_int,
        default=1,
        metavar="N",
        help="wait for N nodes before placing the model (default: %(default)s)",
    )
    return parser


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
