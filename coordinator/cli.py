"""The ``coordinator`` command (also ``tensorfleet-coordinator``): run the head of a cluster.

``coordinator start`` loads the model's manifest (config, tensor index, tokenizer; default the embedded
model), serves the Coordinator gRPC service, waits for ``--min-nodes`` nodes that can hold the model,
places it, and serves requests until interrupted. Nothing heavy is imported until the command runs.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from client import DEFAULT_COORDINATOR_PORT
from coordinator import defaults


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number in 1..65535")
    return int(text)


def _lookahead(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= defaults.MAX_LOOKAHEAD:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer from 0 to {defaults.MAX_LOOKAHEAD}")
    return value


def _lookahead_of(args: argparse.Namespace) -> int:
    return 0 if args.no_lookahead else defaults.LOOKAHEAD if args.lookahead is None else args.lookahead


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description="Run the head of a tensorfleet cluster.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = sub.add_parser("start", help="serve a model over the nodes that join",
                           description="Serve one model over the nodes that join: place its layers by capacity "
                                       "and schedule requests through the pipeline.")
    start.add_argument("--model", default=None,
                       help="model directory or GGUF file (default: the embedded SmolLM2 model)")
    start.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: %(default)s; use 0.0.0.0 to accept nodes and clients "
                            "from other machines)")
    start.add_argument("--port", type=_port, default=DEFAULT_COORDINATOR_PORT, help="gRPC port (default: %(default)s)")
    start.add_argument("--http-port", type=_port, default=defaults.HTTP_PORT,
                       help="HTTP port of the OpenAI-compatible API (/v1/models, /v1/completions, "
                            "/v1/chat/completions), Prometheus /metrics and /health probes, on --host "
                            "(default: %(default)s)")
    start.add_argument("--no-http", action="store_true", help="serve no HTTP API (gRPC only)")
    start.add_argument("--min-nodes", type=_positive_int, default=1, metavar="N",
                       help="wait for N nodes before placing the model (default: %(default)s)")
    start.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="serving dtype (default: %(default)s)")
    start.add_argument("--stages", type=_positive_int, default=None,
                       help="use exactly this many pipeline stages (default: whatever the planner finds fastest)")
    start.add_argument("--micro-batches", type=_positive_int, default=None,
                       help="steps in flight through the pipeline (default: one per stage, counting stages that share "
                            "a GPU as one)")
    start.add_argument("--lookahead", type=_lookahead, default=None, metavar="K",
                       help=f"steps a decoding request is sent ahead of its oldest step in flight, 0 to "
                            f"{defaults.MAX_LOOKAHEAD} (default {defaults.LOOKAHEAD}): stage 0 takes each row's "
                            "token from the step before it, so the pipeline does not wait for the round trip "
                            "through the coordinator")
    start.add_argument("--no-lookahead", action="store_true",
                       help="the same as --lookahead 0: a decoding request's next step leaves once its previous "
                            "one has returned")
    start.add_argument("--slots", type=_positive_int, default=None,
                       help="KV cache slots: sequences that run at once (default: as many as each stage's free "
                            "memory holds, up to --max-slots)")
    start.add_argument("--max-slots", type=_positive_int, default=defaults.MAX_SLOTS,
                       help="upper bound on the slots derived from memory (default: %(default)s)")
    start.add_argument("--kv-memory-fraction", type=_fraction, default=defaults.KV_MEMORY_FRACTION,
                       help="share of each device's free memory (beside the weights) for the KV cache "
                            "(default: %(default)s)")
    start.add_argument("--max-step-tokens", type=_positive_int, default=defaults.MAX_STEP_TOKENS,
                       help="tokens per step: decode rows plus prompt chunks; longer prompts are prefilled in "
                            "chunks (default: %(default)s)")
    start.add_argument("--max-queue", type=_positive_int, default=defaults.MAX_QUEUE,
                       help="requests waiting for a slot before new ones are refused with RESOURCE_EXHAUSTED "
                            "(default: %(default)s)")
    start.add_argument("--max-streams-per-client", type=_positive_int, default=defaults.MAX_STREAMS_PER_CLIENT,
                       help="Generate streams one API key (without keys: one address) may hold at once; more are "
                            "refused with RESOURCE_EXHAUSTED (default: %(default)s)")
    start.add_argument("--max-seq-len", type=_positive_int, default=None,
                       help="longest sequence (prompt + generated); at most the model's positions (default: "
                            f"{defaults.MAX_SEQ_LEN}, or the model's max_position_embeddings if fewer)")
    start.add_argument("--heartbeat-ms", type=_positive_int, default=defaults.HEARTBEAT_INTERVAL_MS,
                       help="heartbeat interval in ms (default: %(default)s)")
    start.add_argument("--heartbeat-timeout-ms", type=_positive_int, default=defaults.HEARTBEAT_TIMEOUT_MS,
                       help="a node silent this long is declared failed and its layers re-placed "
                            "(default: %(default)s)")
    start.add_argument("--capacity-wait", type=float, default=defaults.CAPACITY_WAIT_S, metavar="SECONDS",
                       help="while the nodes left cannot hold the model, requests wait this long for a node to "
                            "join, then fail with UNAVAILABLE (default: %(default)s)")
    start.add_argument("--codec", default="exact", metavar="SPEC",
                       help="compress the hidden states stages send to each other: exact (default); a codec for "
                            "every link, e.g. int8:rotate=true,outliers=3, int4, lowrank:rank=8 (engine/codecs.py); "
                            "or auto / auto:SPEC: each link measures its bandwidth and compresses with SPEC "
                            "(default int8:rotate=true,outliers=3) the messages where that saves time (node/link.py)")
    start.add_argument("--codec-min-tokens", type=int, default=defaults.CODEC_MIN_TOKENS, metavar="N",
                       help="messages of fewer tokens (decode steps) go uncompressed (default: %(default)s)")
    start.add_argument("--state-dir", default=None, metavar="DIR",
                       help="where the cluster's join token and API keys live (created 0600 on first start and "
                            "printed once; default: $TENSORFLEET_HOME, else ~/.tensorfleet)")
    start.add_argument("--tls", default=None, metavar="DIR",
                       help="serve over TLS and talk to the nodes over mutual TLS with the certificates in DIR "
                            "(ca.pem, cluster.pem, cluster-key.pem: `tensorfleet certs create`)")
    start.add_argument("--no-auth", action="store_true",
                       help="clients need no API key (local use only; nodes still need the join token)")
    start.add_argument("--tp-codec", default="exact", metavar="SPEC",
                       help="compress the all-reduces inside tensor-parallel stages: exact (default), "
                            "int8:rotate=true,outliers=3, int4, lowrank:rank=8, ... (engine/collectives.py); "
                            "pays only where a group's ranks share a slow network")
    start.add_argument("--tp-codec-min-elements", type=int, default=0, metavar="N",
                       help="all-reduces of fewer elements stay exact (default 0: 65536, engine/collectives.py)")
    start.add_argument("--tp-across-nodes", action="store_true",
                       help="let a tensor-parallel group take devices of several nodes (e.g. node daemons given "
                            "one GPU each on one host, or hosts on a fast fabric); its ranks meet through the "
                            "leading node's rendezvous store, and gloo/NCCL between them is not authenticated")
    return parser


def _announce_secrets(coordinator) -> None:  # noqa: ANN001 - coordinator.server.Coordinator
    """Print the secrets created by this start, once; later starts only say where they are."""
    from node.security import API_KEYS_FILE, JOIN_TOKEN_FILE, state_dir

    where = state_dir(coordinator.config.state_dir)
    secrets = coordinator.secrets
    if JOIN_TOKEN_FILE in secrets.created:
        print(f"join token (node join --token-file {where / JOIN_TOKEN_FILE}): {secrets.join_token}", flush=True)
    if API_KEYS_FILE in secrets.created:
        print(f"API key for clients (TENSORFLEET_API_KEY; one per line in {where / API_KEYS_FILE}): "
              f"{secrets.api_keys[0]}", flush=True)
    if not secrets.created:
        print(f"join token and API keys: in {where}", flush=True)
    if not coordinator.config.client_auth:
        print("client authentication is off (--no-auth): anyone who reaches this port can generate", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "start" and args.no_lookahead and args.lookahead not in (None, 0):
        parser.error(f"--no-lookahead contradicts --lookahead {args.lookahead}")
    from engine.logs import dump_stacks_on_signal

    dump_stacks_on_signal()
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    from engine.errors import TensorfleetError

    try:
        from coordinator.server import CoordinatorConfig, serve

        config = CoordinatorConfig(model=args.model, host=args.host, port=args.port, min_nodes=args.min_nodes,
                                   dtype=args.dtype, num_slots=args.slots, max_slots=args.max_slots,
                                   kv_memory_fraction=args.kv_memory_fraction, num_stages=args.stages,
                                   micro_batches=args.micro_batches, max_step_tokens=args.max_step_tokens,
                                   lookahead=_lookahead_of(args),
                                   max_queue=args.max_queue, max_streams_per_client=args.max_streams_per_client,
                                   max_seq_len=args.max_seq_len,
                                   heartbeat_interval_ms=args.heartbeat_ms,
                                   heartbeat_timeout_ms=args.heartbeat_timeout_ms,
                                   capacity_wait_s=args.capacity_wait, codec=args.codec,
                                   codec_min_tokens=args.codec_min_tokens, tp_codec=args.tp_codec,
                                   tp_codec_min_elements=args.tp_codec_min_elements,
                                   tp_across_nodes=args.tp_across_nodes, state_dir=args.state_dir,
                                   client_auth=not args.no_auth, tls_dir=args.tls,
                                   http_port=None if args.no_http else args.http_port)
        server, coordinator = serve(config)
        _announce_secrets(coordinator)
    except TensorfleetError as e:
        print(f"coordinator: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    coordinator.stop()
    server.stop(grace=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
