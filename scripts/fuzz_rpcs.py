#!/usr/bin/env python
"""Fuzz every RPC of a cluster for longer than CI does: random messages and raw bytes with random
credentials (tests/security/fuzz.py), counting each call's status code.

Without ``--coordinator`` it starts a fresh local cluster (the random-init model of the fuzz tests, 2
stages on 2 CPU nodes, in ``--workdir`` or a temporary directory) and watches its processes after every
call. With ``--coordinator HOST:PORT`` it fuzzes a running cluster (plaintext gRPC), whose secrets come
from ``--api-key``/``--join-token``, else $TENSORFLEET_API_KEY/$TENSORFLEET_JOIN_TOKEN, else the state
directory ($TENSORFLEET_HOME or ~/.tensorfleet). That cluster's Generate calls must be short: it should
serve with a small --max-seq-len (valid fuzzed generations ask for at most 4 tokens, but a request
without max_tokens gets the server default). Never point it at a production cluster: a fuzzed Join adds
members (they drop out after the heartbeat timeout) and may start a re-placement.

Progress goes to stderr; at the end, a table of status codes per RPC and the improper outcomes (an
UNKNOWN or INTERNAL status, a hang, a server gone). Exit status 1 if there was any, or if the cluster no
longer serves a generation after an RPC's cases.

    .venv/bin/python scripts/fuzz_rpcs.py --examples 20000
    .venv/bin/python scripts/fuzz_rpcs.py --rpcs Forward,Probe --examples 5000 --seed 7
    .venv/bin/python scripts/fuzz_rpcs.py --http --examples 20000      # the HTTP endpoints instead

``--http`` fuzzes the coordinator's HTTP endpoints (tests/security/http_fuzz.py; ``--endpoints`` to
choose; with ``--coordinator``, ``--http-url`` says where its HTTP API is) instead of the RPCs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "proto"))

from hypothesis import HealthCheck, Phase, example, given, seed, settings  # noqa: E402

from tests.security import fuzz, http_fuzz  # noqa: E402

PROGRESS_S = 10.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=10000, help="cases per RPC (default 10000)")
    p.add_argument("--rpcs", default=",".join(fuzz.RPCS), help="comma-separated (default: all: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="fuzz this running cluster")
    p.add_argument("--api-key", default=None)
    p.add_argument("--join-token", default=None)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    p.add_argument("--workdir", default=None, help="for the local cluster (default: a temporary directory)")
    p.add_argument("--show", type=int, default=20, help="improper outcomes listed (default 20)")
    p.add_argument("--http", action="store_true", help="fuzz the HTTP endpoints instead of the RPCs")
    p.add_argument("--endpoints", default=",".join(http_fuzz.ENDPOINTS),
                   help="with --http, comma-separated (default: all: %(default)s)")
    p.add_argument("--http-url", default=None, help="with --coordinator: its HTTP API (default http://HOST:8000)")
    p.add_argument("--details", type=int, default=0, metavar="N",
                   help="also list each RPC's N most frequent status details")
    args = p.parse_args(argv)
    unknown = [r for r in args.rpcs.split(",") if r not in fuzz.RPCS]
    if unknown:
        p.error(f"unknown RPC(s) {unknown}; known: {', '.join(fuzz.RPCS)}")
    bad = [e for e in args.endpoints.split(",") if e not in http_fuzz.ENDPOINTS]
    if bad:
        p.error(f"unknown endpoint(s) {bad}; known: {', '.join(http_fuzz.ENDPOINTS)}")
    if args.examples < 1:
        p.error("--examples must be >= 1")
    return args


def fuzz_rpc(h: fuzz.Harness, name: str, examples: int, seed_value: int | None) -> str:
    """Run ``examples`` cases of ``name``; returns what is wrong with the cluster afterwards ('' if nothing)."""
    rpc = fuzz.RPCS[name]
    facts, secrets, addresses = h.setup(rpc)
    started = last = time.monotonic()
    done = [0, 0]  # calls, improper

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=fuzz.cases(rpc, facts, secrets, accept=h.accept(rpc, facts)))
    def one_call(case: fuzz.Case) -> None:
        nonlocal last
        _, reason = h.check(case, addresses)  # recorded in h.tally; the run goes on
        done[0] += 1
        done[1] += reason is not None
        if time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            log(f"{name}: {done[0]}/{examples} cases in {last - started:.0f} s, {done[1]} improper")

    for known in fuzz.known_cases(rpc, facts, secrets):  # what the fuzzing found once: always tried
        one_call = example(case=known)(one_call)
    if seed_value is not None:
        one_call = seed(seed_value)(one_call)
    one_call()
    took = time.monotonic() - started
    log(f"{name}: {done[0]} cases in {took:.1f} s ({took / max(done[0], 1) * 1e3:.1f} ms each), "
        f"{done[1]} improper; checking that the cluster serves")
    return h.wait_serving()


def fuzz_endpoint(h: fuzz.Harness, tally: http_fuzz.Tally, endpoint: str, examples: int,
                  seed_value: int | None) -> str:
    """Run ``examples`` requests to ``endpoint``; returns what is wrong with the cluster afterwards."""
    model = h.status().model
    secrets = http_fuzz.Secrets(api_key=h.api_key, join_token=h.join_token)
    started = last = time.monotonic()
    done = [0, 0]  # requests, improper

    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=http_fuzz.cases(endpoint, model, secrets))
    def one_request(case: http_fuzz.Case) -> None:
        nonlocal last
        reason = tally.add(case, http_fuzz.perform(h.http_url, case, timeout=h.timeout))
        if reason is None and h.dead():
            tally.problems.append((f"process(es) died: {', '.join(h.dead())}", repr(case)))
        done[0] += 1
        done[1] += reason is not None
        if time.monotonic() - last > PROGRESS_S:
            last = time.monotonic()
            log(f"{endpoint}: {done[0]}/{examples} requests in {last - started:.0f} s, {done[1]} improper")

    for known in http_fuzz.known_cases(endpoint, model, secrets):  # what the fuzzing found once
        one_request = example(case=known)(one_request)
    if seed_value is not None:
        one_request = seed(seed_value)(one_request)
    one_request()
    took = time.monotonic() - started
    log(f"{endpoint}: {done[0]} requests in {took:.1f} s, {done[1]} improper; checking that the cluster serves")
    return h.wait_serving()


def report_http(tally: http_fuzz.Tally, args: argparse.Namespace) -> None:
    for endpoint, counts in tally.counts.items():
        print(f"{endpoint}: {sum(counts.values())} requests: {dict(sorted(counts.items()))}")
        for count, status, message in tally.common_details(endpoint, args.details):
            print(f"  {count:6d}  {status}  {message}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = None
    if args.coordinator:
        from client.credentials import (
            API_KEYS_FILE,
            ENV_API_KEY,
            ENV_JOIN_TOKEN,
            JOIN_TOKEN_FILE,
            find_secret,
            state_dir,
        )

        api_key = find_secret(args.api_key, ENV_API_KEY, state_dir(), API_KEYS_FILE)
        join_token = find_secret(args.join_token, ENV_JOIN_TOKEN, state_dir(), JOIN_TOKEN_FILE)
        if not api_key or not join_token:
            log("the API key and the join token are needed (--api-key/--join-token or the environment)")
            return 2
        host = args.coordinator.rsplit(":", 1)[0]
        h = fuzz.Harness(args.coordinator, api_key=api_key, join_token=join_token, timeout=args.timeout,
                         http_url=args.http_url or f"http://{host}:8000")
    else:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="tensorfleet-fuzz-"))
        log(f"starting a local cluster in {work}")
        cluster = fuzz.local_cluster(work).start()
        h = fuzz.Harness(cluster.address, api_key=cluster.api_key, join_token=cluster.secrets.join_token,
                         procs=cluster.procs, expected_exits=cluster.expected_exits, timeout=args.timeout,
                         http_url=cluster.http_url)
    broken = []
    http_tally = http_fuzz.Tally()
    try:
        problem = h.wait_serving()
        if problem:
            log(f"the cluster does not serve: {problem}")
            return 1
        names = args.endpoints.split(",") if args.http else args.rpcs.split(",")
        for name in names:
            problem = (fuzz_endpoint(h, http_tally, name, args.examples, args.seed) if args.http
                       else fuzz_rpc(h, name, args.examples, args.seed))
            if problem:
                broken.append(f"after {name}: {problem}")
                log(f"the cluster does not serve after {name}: {problem}")
                break
    finally:
        h.close()
        if cluster is not None:
            cluster.stop()
    if args.http:
        report_http(http_tally, args)
    else:
        print(h.tally.table())
    for name in h.tally.counts if args.details else ():
        print(f"\n{name}:")
        for count, code, details in h.tally.common_details(name, args.details):
            print(f"  {count:6d}  {code:<22} {details}")
    problems = h.tally.problems + http_tally.problems
    if problems:
        print(f"\n{len(problems)} improper outcome(s); the first {min(len(problems), args.show)}:")
        for reason, case in problems[:args.show]:
            print(f"- {reason}\n  {case}")
    for line in broken:
        print(line)
    return 1 if problems or broken else 0


if __name__ == "__main__":
    sys.exit(main())
