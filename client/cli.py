"""The ``tensorfleet`` command: generate text and show status through a running cluster.

    tensorfleet generate "Once upon a time" --max-tokens 32 --seed 1
    tensorfleet status --coordinator head:50051

The coordinator's address comes from ``--coordinator``, else the environment variable
TENSORFLEET_COORDINATOR (read when the command runs), else 127.0.0.1:50051. Errors (an unreachable
coordinator, a refused request, bad arguments) print one line on stderr and exit with status 2;
an interrupted generation is cancelled on the coordinator and exits with status 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

from client.api import DEFAULT_ADDRESS, ClientError, TensorfleetClient, format_status, status_to_json

ENV_COORDINATOR = "TENSORFLEET_COORDINATOR"
# gRPC targets that are not HOST:PORT, passed through as they are.
_TARGET_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """Reports a usage error as one line (raised to main) instead of usage text plus exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tensorfleet",
        description="Talk to a tensorfleet cluster: generate text, show nodes and placement.",
        epilog=f"The coordinator's address: --coordinator, else ${ENV_COORDINATOR}, else {DEFAULT_ADDRESS}.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser(
        "generate",
        help="stream a completion from the cluster",
        description=(
            "Stream a completion to stdout as it is generated; a summary (tokens, finish reason, "
            "seconds, tokens/s) goes to stderr."
        ),
    )
    gen.add_argument("prompt", help="prompt text ('-' reads it from stdin)")
    _add_common_flags(gen, timeout_help="seconds the whole generation may take (default: no limit)")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=0, help="0 turns it off (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)")
    gen.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="1 turns it off (default: %(default)s)"
    )
    gen.add_argument("--seed", type=int, default=None, help="sampler seed, for reproducible output")
    gen.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop at this string (repeatable)"
    )
    gen.add_argument(
        "--stop-token-id", action="append", type=int, default=[], metavar="ID", help="stop at this token id"
    )
    gen.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence")
    gen.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    gen.add_argument(
        "--json", action="store_true", help="print the completion as one JSON object (implies --no-stream)"
    )

    status = sub.add_parser(
        "status",
        help="show nodes, placement and load",
        description="Show the cluster's model and epoch, its nodes, the placement of stages, and the load.",
    )
    _add_common_flags(status, timeout_help="seconds to wait for the answer (default: %(default)s)", timeout=10.0)
    status.add_argument("--json", action="store_true", help="print the StatusResponse as JSON")
    _add_certs_parser(sub)
    return parser


def _add_common_flags(parser: argparse.ArgumentParser, *, timeout_help: str, timeout: float | None = None) -> None:
    parser.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help=f"the coordinator's address (default: ${ENV_COORDINATOR}, else {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--timeout", type=float, default=timeout, metavar="SECONDS", help=timeout_help)
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="the API key (default: $TENSORFLEET_API_KEY, else the local coordinator's "
                             "$TENSORFLEET_HOME/api-keys; prefer the variable: flags show in `ps`)")
    parser.add_argument("--tls-ca", default=None, metavar="FILE",
                        help="talk TLS, trusting this CA certificate (default: $TENSORFLEET_TLS_CA; none: plaintext)")


def resolve_address(flag: str | None) -> str:
    """The coordinator's address from the flag, else the environment, else the default; validated."""
    if flag is not None:
        return _check_address(flag, "--coordinator")
    env = os.environ.get(ENV_COORDINATOR, "").strip()
    if env:
        return _check_address(env, ENV_COORDINATOR)
    return DEFAULT_ADDRESS


def _check_address(text: str, source: str) -> str:
    if text.startswith(_TARGET_SCHEMES):
        return text
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise _UsageError(f"tensorfleet: error: {source}={text!r} is not HOST:PORT")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise _UsageError(f"tensorfleet: error: {source}={text!r}: put an IPv6 host in brackets, as in [::1]:50051")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise _UsageError(f"tensorfleet: error: {source}={text!r}: the port must be a number in 1..65535")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        if args.command == "certs":
            return _certs(args)
        address = resolve_address(args.coordinator)
        if args.command == "generate":
            return _generate(args, address)
        return _status(args, address)
    except _UsageError as e:
        print(e, file=sys.stderr)
        return 2
    except (ClientError, ValueError, TypeError) as e:
        print(f"tensorfleet: {e}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace, address: str) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        stop_token_ids=args.stop_token_id,
        ignore_eos=args.ignore_eos,
    )
    with TensorfleetClient(address, timeout=args.timeout, api_key=args.api_key, tls_ca=args.tls_ca) as tf:
        start = time.perf_counter()
        if args.no_stream or args.json:
            completion = tf.generate(prompt, **sampling)
            seconds = time.perf_counter() - start
            if args.json:
                print(json.dumps({**asdict(completion), "seconds": round(seconds, 4)}))
            else:
                print(completion.text)
            _summary(completion.completion_tokens, completion.finish_reason, seconds)
            return 0

        stream = tf.generate_stream(prompt, **sampling)
        tokens, finish, ends_with_newline = 0, None, True
        try:
            for delta in stream:
                if delta.text:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
                    ends_with_newline = delta.text.endswith("\n")
                tokens += len(delta.token_ids)
                finish = delta.finish_reason or finish
        except KeyboardInterrupt:
            stream.close()  # cancels the request on the coordinator
            print("\ntensorfleet: interrupted; the request was cancelled", file=sys.stderr)
            return 130
        finally:
            if not ends_with_newline:
                sys.stdout.write("\n")
                sys.stdout.flush()
        _summary(tokens, finish or "", time.perf_counter() - start)
        return 0


def _summary(tokens: int, finish: str, seconds: float) -> None:
    rate = f"{tokens / seconds:.1f}" if seconds > 0 else "-"
    print(f"[{tokens} tokens, finish: {finish}, {seconds:.2f} s, {rate} tokens/s]", file=sys.stderr)


def _status(args: argparse.Namespace, address: str) -> int:
    with TensorfleetClient(address, timeout=args.timeout, api_key=args.api_key, tls_ca=args.tls_ca) as tf:
        status = tf.status()
    print(status_to_json(status) if args.json else format_status(status))
    return 0


# ----------------------------------------------------------------------------------- certs
def _add_certs_parser(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="create the cluster's TLS certificates",
                           description="Create the TLS certificates of a cluster (a CA and one shared certificate).")
    actions = certs.add_subparsers(dest="certs_command", metavar="ACTION", required=True)
    create = actions.add_parser(
        "create",
        help="write a new CA and a certificate for the coordinator and nodes",
        description=(
            "Write DIR/ca.pem and DIR/ca-key.pem (a new CA), and DIR/cluster.pem and DIR/cluster-key.pem: one "
            "certificate that the coordinator and every node use, as server and as client. Copy ca.pem, "
            "cluster.pem and cluster-key.pem to each machine; clients need only ca.pem; keep ca-key.pem safe."
        ),
    )
    create.add_argument("directory", metavar="DIR", help="where to write the files (created if missing)")
    create.add_argument("--hosts", required=True, metavar="HOST[,HOST...]",
                        help="the addresses and names that the coordinator and nodes are reached by "
                             "(localhost and 127.0.0.1 are always included)")
    create.add_argument("--days", type=int, default=825, help="validity of the certificate (default: %(default)s)")
    create.add_argument("--overwrite", action="store_true", help="replace existing files (a new CA: reissue all)")


def _certs(args: argparse.Namespace) -> int:
    # Imported here: the client package stays importable without the server dependencies (cryptography).
    from node.certs import CLUSTER_NAME, create_cluster_certs

    hosts = [h.strip() for h in args.hosts.split(",")]
    if not any(hosts) or not all(hosts):
        raise _UsageError(f"tensorfleet: error: --hosts={args.hosts!r}: give a comma-separated list of hosts, "
                          f"e.g. --hosts 10.0.0.5,node1.example")
    directory = args.directory
    try:
        written = create_cluster_certs(directory, hosts, days=args.days, overwrite=args.overwrite)
    except OSError as e:
        raise ValueError(f"cannot write certificates to {directory}: {e.strerror or e}") from None
    roles = ["CA certificate: copy to every machine and client",
             "CA key: needed only to issue certificates; keep it here, off the workers",
             f"certificate of the coordinator and nodes, for {', '.join(hosts)} and localhost",
             f"its key: copy with ca.pem and {CLUSTER_NAME}.pem to each machine, keep mode 0600"]
    print(f"wrote the cluster's TLS certificates (valid {args.days} days):")
    width = max(len(str(p)) for p in written)
    for path, role in zip(written, roles, strict=True):
        print(f"  {str(path):<{width}}  {role}")
    print("next:")
    print(f"  coordinator start --tls {directory} ...")
    print(f"  node join COORDINATOR:PORT --tls {directory} ...")
    print(f"  tensorfleet status --tls-ca {directory}/ca.pem --coordinator COORDINATOR:PORT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
