"""The ``node`` command (also ``tensorfleet-node``): run a worker that joins a coordinator.

``node join HOST:PORT`` reports this machine's devices (GPUs through pynvml and torch, CPU cores and
memory) with a short capacity probe, heartbeats, and loads the pipeline stage the coordinator gives it
(one executor process per device). Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import re
import signal
import sys

_DEVICE = re.compile(r"cpu(:\d+)?|cuda(:\d+)?")


def parse_address(text: str) -> str:
    """Checks HOST:PORT (IPv6 hosts in brackets: [::1]:50051) and returns it unchanged."""
    from node.stream import split_address

    try:
        split_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def parse_devices(text: str) -> list[str]:
    """'all', or a comma-separated list of 'cpu', 'cpu:N' (N CPU executors) and 'cuda:N'."""
    if text == "all":
        return ["all"]
    devices = [d.strip() for d in text.split(",")]
    bad = [d for d in devices if not _DEVICE.fullmatch(d)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"--devices {text!r}: {', '.join(map(repr, bad))} not understood; "
            "give 'all' or a comma-separated list of 'cpu', 'cpu:N' and 'cuda:N' (e.g. cuda:0,cuda:1)"
        )
    if len(set(devices)) != len(devices):
        raise argparse.ArgumentTypeError(f"--devices {text!r} names a device twice")
    return devices


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in 0..65535 (0 picks a free one)")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="node", description="Run a tensorfleet worker on this machine.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    join = sub.add_parser("join", help="join a coordinator and serve the stage it assigns",
                          description="Join the coordinator at HOST:PORT and serve the pipeline stage it assigns.")
    join.add_argument("coordinator", type=parse_address, metavar="HOST:PORT", help="the coordinator's address")
    join.add_argument("--devices", type=parse_devices, default=None,
                      help="devices to serve with: 'all' (default: every GPU, else the CPU), or e.g. "
                           "'cuda:0,cuda:1', 'cpu', 'cpu:2' (two CPU executors forming a tensor-parallel group)")
    join.add_argument("--name", default="", help="a display name (default: the host name)")
    join.add_argument("--host", default="127.0.0.1",
                      help="the address the coordinator and other nodes reach this node at (default: %(default)s)")
    join.add_argument("--port", type=_port, default=0, help="control port (default: 0, any free port)")
    join.add_argument("--cache-dir", default=None, metavar="DIR",
                      help="where received weights are cached by content hash (default: ~/.cache/tensorfleet)")
    join.add_argument("--model-dir", default=None, metavar="DIR",
                      help="a local directory with the model's files, used instead of streaming them from the "
                           "coordinator")
    join.add_argument("--no-probe", action="store_true",
                      help="skip the capacity probe and report conservative estimates (quick local tests)")
    join.add_argument("--no-standby", action="store_true",
                      help="do not keep an executor process started ahead (saves its memory, about 0.3 GiB on "
                           "CPU; a stage that fails over to this node then starts about 1.5 s later)")
    join.add_argument("--no-shared-memory", action="store_true",
                      help="send hidden states to the next stage over the network stack even where it runs on "
                           "this machine (by default small steps between stages on one GPU, or on this host's "
                           "CPUs, go through shared memory: node/peer_ring.py)")
    _add_token_flag(join)
    leave = sub.add_parser("leave", help="drain a node: move its layers to the others, then stop it",
                           description="Drain NODE (its id, or its name when unique): the coordinator moves its "
                                       "layers to the other nodes (requests pause and continue with the same "
                                       "output), then the node's daemon stops. Refused, with the node left "
                                       "serving, when the other nodes cannot hold the model.")
    leave.add_argument("coordinator", type=parse_address, metavar="HOST:PORT", help="the coordinator's address")
    leave.add_argument("node", help="the node's id or name (see `tensorfleet status`)")
    leave.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the drain (default: "
                                                                    "%(default)s)")
    _add_token_flag(leave)
    return parser


def _add_token_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls", default=None, metavar="DIR",
                        help="the cluster's certificates (ca.pem, cluster.pem, cluster-key.pem: `tensorfleet certs "
                             "create`): TLS to the coordinator, mutual TLS on this node's servers")
    parser.add_argument("--token-file", default=None, metavar="FILE",
                        help="the file holding the cluster's join token, printed by `coordinator start` "
                             "(default: $TENSORFLEET_JOIN_TOKEN, else $TENSORFLEET_HOME/join-token, else "
                             "~/.tensorfleet/join-token)")


def join_token(args: argparse.Namespace) -> str:
    """The join token from --token-file, the environment or the local state directory (ConfigError if none)."""
    from pathlib import Path

    from client.credentials import ENV_JOIN_TOKEN, JOIN_TOKEN_FILE, find_secret, read_secrets, state_dir
    from engine.errors import ConfigError

    if args.token_file:
        return read_secrets(Path(args.token_file))[0]
    token = find_secret(None, ENV_JOIN_TOKEN, state_dir(), JOIN_TOKEN_FILE)
    if not token:
        raise ConfigError("no join token: copy the coordinator's join-token file here and pass --token-file, "
                          "or set TENSORFLEET_JOIN_TOKEN")
    return token


def leave(args: argparse.Namespace) -> int:
    import grpc

    from engine.errors import TensorfleetError
    from node.security import open_channel, with_bearer
    from tensorfleet.v1 import coordinator_pb2, coordinator_pb2_grpc

    try:
        token = join_token(args)
    except (TensorfleetError, ValueError) as e:
        print(f"node: error: {e}", file=sys.stderr)
        return 2
    try:
        channel = open_channel(args.coordinator, args.tls)
    except (TensorfleetError, ValueError) as e:
        print(f"node: error: {e}", file=sys.stderr)
        return 2
    with channel:
        try:
            reply = coordinator_pb2_grpc.CoordinatorStub(with_bearer(channel, token)).Leave(
                coordinator_pb2.LeaveRequest(node=args.node), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"node: error: {e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    print(f"{reply.node_id} drained; the cluster serves on under epoch {reply.epoch.value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from engine.logs import dump_stacks_on_signal

    dump_stacks_on_signal()
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "leave":
        return leave(args)
    from engine.errors import TensorfleetError
    from node.daemon import NodeConfig, NodeDaemon

    devices = None if args.devices in (None, ["all"]) else ",".join(args.devices)
    try:
        config = NodeConfig(coordinator=args.coordinator, devices=devices, name=args.name, host=args.host,
                            port=args.port, cache_dir=args.cache_dir or "", model_dir=args.model_dir,
                            probe=not args.no_probe, standby=not args.no_standby, join_token=join_token(args),
                            tls_dir=args.tls, shared_memory=not args.no_shared_memory)
        daemon = NodeDaemon(config)
        signal.signal(signal.SIGTERM, lambda *_: daemon.stop_event.set())
        daemon.start()
    except (TensorfleetError, ValueError) as e:
        print(f"node: error: {e}", file=sys.stderr)
        return 2
    try:
        daemon.wait()
    except KeyboardInterrupt:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
