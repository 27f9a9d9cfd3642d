"""The ``node`` command (also ``tensorfleet-node``): run a worker that joins a coordinator.

Not implemented yet in this version. The arguments are parsed and validated so that the interface can
be reviewed; ``node join`` then says so and exits with status 2. Nothing heavy is imported here: the
daemon's modules load only once the command runs.
"""

from __future__ import annotations

import argparse
import re
import sys

NOT_IMPLEMENTED = (
    "tensorfleet: the cluster (coordinator start / node join) is not implemented yet in this version; "
    "use `tensorfleet-generate` for single-process generation"
)

_DEVICE = re.compile(r"cpu|cuda:\d+")


def parse_address(text: str) -> str:
    """Checks HOST:PORT (IPv6 hosts in brackets: [::1]:50051) and returns it unchanged."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or host == "[]":
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example 10.0.0.5:50051)")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise argparse.ArgumentTypeError(f"{text!r}: put an IPv6 host in brackets, e.g. [::1]:50051")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number in 1..65535")
    return text


def parse_devices(text: str) -> list[str]:
    """'all', or a comma-separated list of 'cpu' and 'cuda:N'."""
    if text == "all":
        return ["all"]
    devices = [d.strip() for d in text.split(",")]
    bad = [d for d in devices if not _DEVICE.fullmatch(d)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"--devices {text!r}: {', '.join(map(repr, bad))} not understood; "
            "give 'all' or a comma-separated list of 'cpu' and 'cuda:N' (e.g. cuda:0,cuda:1)"
        )
    if len(set(devices)) != len(devices):
        raise argparse.ArgumentTypeError(f"--devices {text!r} names a device twice")
    return devices


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in 0..65535 (0 picks a free one)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="node",
        description=(
            "Run a tensorfleet worker on this machine. NOT IMPLEMENTED YET in this version: the cluster "
            "(coordinator start / node join) arrives later; `node join` exits with status 2. Use "
            "`tensorfleet-generate` for single-process generation."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    join = sub.add_parser(
        "join",
        help="join a coordinator and serve the stages it places here (not implemented yet)",
        description=(
            "Join the coordinator at HOST:PORT, report this machine's devices, and serve the pipeline "
            "stages the coordinator places here. Not implemented yet in this version."
        ),
    )
    join.add_argument(
        "coordinator", type=parse_address, metavar="HOST:PORT", help="the coordinator's address"
    )
    join.add_argument(
        "--devices",
        type=parse_devices,
        default=["all"],
        metavar="LIST",
        help="devices to give to the cluster: 'all' (default) or e.g. 'cuda:0,cuda:1' or 'cpu'",
    )
    join.add_argument(
        "--name", default=None, help="this node's name in status output (default: the host name)"
    )
    join.add_argument(
        "--port",
        type=_port,
        default=0,
        help="port of this node's data-plane server (default: 0, any free port)",
    )
    join.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help="where received weights are cached by content hash (default: ~/.cache/tensorfleet)",
    )
    join.add_argument(
        "--model-dir",
        default=None,
        metavar="DIR",
        help="a local directory with the model's files, used instead of streaming them from the coordinator",
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
